//! Data beyond CIFAR-10: CIFAR-100 in its official layout (fine and coarse labels), image folders
//! of any size and format (decoded once into a cache), and what a model carries of its data.

mod common;

use common::{CLASSES, cli, drawn, write_folder};
use resnet_cifar::data::{DataOptions, Format, Images, LabelSet, open};
use std::path::Path;

const CIFAR100_RECORD: usize = 2 + 3072;

/// CIFAR-100 files as the official archive lays them out, in `dir/cifar-100-binary`: image i
/// has fine label i % 100, coarse label (i % 100) / 5, and pixels that depend on i.
fn write_cifar100(dir: &Path) -> std::path::PathBuf {
    let inner = dir.join("cifar-100-binary");
    std::fs::create_dir_all(&inner).unwrap();
    for (name, n) in [("train.bin", 50_000usize), ("test.bin", 10_000)] {
        let mut bytes = Vec::with_capacity(n * CIFAR100_RECORD);
        for i in 0..n {
            let fine = (i % 100) as u8;
            bytes.extend([fine / 5, fine]);
            bytes.extend((0..3072).map(|p| ((i + p * (p % 3 + 1)) % 256) as u8));
        }
        std::fs::write(inner.join(name), bytes).unwrap();
    }
    let fine: String = (0..100).map(|i| format!("fine_{i}\n")).collect();
    let coarse: String = (0..20).map(|i| format!("coarse_{i}\n")).collect();
    std::fs::write(inner.join("fine_label_names.txt"), fine).unwrap();
    std::fs::write(inner.join("coarse_label_names.txt"), coarse).unwrap();
    inner
}

fn no_progress(_: u64, _: u64) {}

#[test]
fn cifar100_reads_fine_and_coarse_labels() {
    let dir = tempfile::tempdir().unwrap();
    let inner = write_cifar100(dir.path());
    let fine = open(dir.path(), &DataOptions::default(), &no_progress).unwrap();
    assert_eq!(fine.format, Format::Cifar100(LabelSet::Fine));
    assert_eq!(fine.dir, inner);
    assert_eq!((fine.train.len(), fine.test.as_ref().unwrap().len()), (50_000, 10_000));
    assert_eq!(fine.classes.len(), 100);
    assert_eq!(fine.classes[37], "fine_37");
    assert_eq!(&fine.train.labels[..3], &[0, 1, 2]);
    assert_eq!(fine.train.labels[199], 99);
    // Pixels follow the labels: record i's pixel p.
    assert_eq!(fine.train.image(7)[5], 7 + 5 * 3);
    // Normalisation: the training images' own statistics, not CIFAR-10's constants.
    assert_eq!(fine.norm, fine.train.channel_stats());
    assert!(fine.summary().contains("CIFAR-100") && fine.summary().contains("100 classes"));

    let coarse = open(
        dir.path(),
        &DataOptions {
            labels: Some(LabelSet::Coarse),
            ..DataOptions::default()
        },
        &no_progress,
    )
    .unwrap();
    assert_eq!(coarse.classes.len(), 20);
    assert_eq!(coarse.classes[19], "coarse_19");
    assert_eq!(coarse.train.labels[199], 19);
    assert_eq!(coarse.test.as_ref().unwrap().labels[12], 2);
    assert_eq!(coarse.train.pixels, fine.train.pixels);

    // A fine label out of range names the file and the record.
    let mut bytes = std::fs::read(inner.join("test.bin")).unwrap();
    bytes[3 * CIFAR100_RECORD + 1] = 100;
    std::fs::write(inner.join("test.bin"), bytes).unwrap();
    let err = open(dir.path(), &DataOptions::default(), &no_progress)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("test.bin") && err.contains("record 3") && err.contains("label 100, expected 0-99"),
        "{err}"
    );
}

/// Training on CIFAR-100's coarse labels: the run says what it reads, and the checkpoint
/// carries the 20 classes into `eval` (per-class accuracy and a 20x20 confusion matrix).
#[test]
fn a_cifar100_run_carries_its_classes_into_eval() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar100(dir.path());
    let (data, out) = (dir.path().to_str().unwrap(), dir.path().join("run"));
    let (code, stdout, stderr) = cli(&[
        "train",
        "--data",
        data,
        "--labels",
        "coarse",
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--threads",
        "1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let first = stdout.lines().next().unwrap();
    assert!(
        first.contains("CIFAR-100 (binary, coarse labels), 20 classes, 32x32 images, 50000 train / 10000 test"),
        "{first}"
    );
    let ckpt = out.join("last.safetensors");
    let (code, stdout, stderr) = cli(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        data,
        "--json",
        "--threads",
        "1",
        "--batch-size",
        "500",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["images"], 10_000);
    assert_eq!(v["classes"].as_array().unwrap().len(), 20);
    assert_eq!(v["classes"][3], "coarse_3");
    assert_eq!(v["per_class"].as_array().unwrap().len(), 20);
    assert_eq!(v["confusion"].as_array().unwrap().len(), 20);

    // In text: per-class accuracy and the whole 20x20 matrix.
    let eval_text = |ckpt: &Path| {
        let ckpt = ckpt.to_str().unwrap();
        cli(&["eval", "--checkpoint", ckpt, "--data", data, "--batch-size", "500"])
    };
    let (code, stdout, stderr) = eval_text(&ckpt);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("confusion matrix") && stdout.contains("coarse_19"),
        "{stdout}"
    );
    // 100 classes: the matrix gives way to the 10 most confused pairs.
    let fine = dir.path().join("fine");
    let (code, _, stderr) = cli(&[
        "train",
        "--data",
        data,
        "--out",
        fine.to_str().unwrap(),
        "--max-steps",
        "1",
        "--batch-size",
        "8",
        "--threads",
        "1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = eval_text(&fine.join("last.safetensors"));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stdout.contains("confusion matrix") && stdout.contains("most confused pairs"),
        "{stdout}"
    );
    let pairs = stdout
        .lines()
        .skip_while(|l| !l.starts_with("most confused"))
        .skip(1)
        .count();
    assert_eq!(pairs, 10, "{stdout}");
    // And CIFAR-10 has no coarse labels.
    let cifar10 = common::shared_dir().join("data/cifar10");
    let (code, _, stderr) = cli(&[
        "train",
        "--data",
        cifar10.to_str().unwrap(),
        "--labels",
        "coarse",
        "--max-steps",
        "1",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--labels applies to CIFAR-100"), "{stderr}");
}

#[test]
fn image_folders_decode_once_into_a_cache() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_folder(d, 8, false);
    let calls = std::sync::atomic::AtomicU64::new(0);
    let count = |_: u64, _: u64| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let first = open(d, &DataOptions::default(), &count).unwrap();
    assert_eq!(first.format, Format::ImageFolder);
    assert_eq!(first.classes, CLASSES);
    // 8 per class plus the grayscale and the RGBA image; 2 per class held out.
    assert_eq!((first.train.len(), first.test.as_ref().unwrap().len()), (26, 6));
    assert_eq!(first.train.side, 32);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::Relaxed),
        32,
        "one progress call per image"
    );
    assert!(first.notes[0].starts_with("decoded 32 images"), "{:?}", first.notes);
    // Labels in the sorted class order; the 32x32 PNG is taken pixel for pixel.
    assert_eq!(first.train.labels[0], 0);
    let png = drawn(0, 32, 32, 0);
    assert_eq!(
        first.train.image(0)[..32],
        png.pixels().take(32).map(|p| p[0]).collect::<Vec<_>>()[..]
    );
    let stats: Images = first.train.clone();
    assert_eq!(first.norm, stats.channel_stats());

    // The second read comes from the cache: same images, no decoding.
    calls.store(0, std::sync::atomic::Ordering::Relaxed);
    let second = open(d, &DataOptions::default(), &count).unwrap();
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(second.notes[0].contains("from the cache"), "{:?}", second.notes);
    assert_eq!(
        (second.train.clone(), second.test.clone(), second.norm),
        (first.train.clone(), first.test.clone(), first.norm)
    );

    // A changed file invalidates it.
    std::thread::sleep(std::time::Duration::from_millis(20));
    drawn(1, 32, 32, 99).save(d.join("train/crimson/0000.png")).unwrap();
    let third = open(d, &DataOptions::default(), &count).unwrap();
    assert!(third.notes[0].starts_with("decoded 32 images"), "{:?}", third.notes);
    assert_ne!(third.train.image(0), first.train.image(0));

    // Another size is another cache, and every image comes out at that size.
    let big = open(
        d,
        &DataOptions {
            image_size: Some(48),
            ..DataOptions::default()
        },
        &count,
    )
    .unwrap();
    assert_eq!(big.train.side, 48);
    assert_eq!(big.train.pixels.len(), 26 * 3 * 48 * 48);
    assert!(d.join(".resnet-cifar-cache/images-48.safetensors").is_file());
    assert!(d.join(".resnet-cifar-cache/images-32.safetensors").is_file());
}

#[test]
fn bad_image_folders_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_folder(d, 4, true);
    let err = open(d, &DataOptions::default(), &no_progress).unwrap_err().to_string();
    assert!(
        err.contains("1 image file(s) cannot be decoded")
            && err.contains("train/forest/broken.png")
            && err.contains("--skip-bad-images"),
        "{err}"
    );
    let skipped = open(
        d,
        &DataOptions {
            skip_bad_images: true,
            ..DataOptions::default()
        },
        &no_progress,
    )
    .unwrap();
    assert_eq!(skipped.train.len(), 14);
    assert!(
        skipped.notes.iter().any(|n| n.contains("skipped 1 image file")),
        "{:?}",
        skipped.notes
    );

    std::fs::create_dir(d.join("train/empty")).unwrap();
    let err = open(d, &DataOptions::default(), &no_progress).unwrap_err().to_string();
    assert!(err.contains("train/empty: the class folder is empty"), "{err}");
    std::fs::remove_dir(d.join("train/empty")).unwrap();

    std::fs::create_dir_all(d.join("test/unknown")).unwrap();
    std::fs::write(d.join("test/unknown/a.png"), b"x").unwrap();
    let err = open(d, &DataOptions::default(), &no_progress).unwrap_err().to_string();
    assert!(err.contains("class 'unknown' is not among the classes of"), "{err}");
    std::fs::remove_dir_all(d.join("test/unknown")).unwrap();

    // A folder with CIFAR-10 files too holds two datasets.
    std::fs::write(d.join("data_batch_1.bin"), b"").unwrap();
    let err = open(d, &DataOptions::default(), &no_progress).unwrap_err().to_string();
    assert!(err.contains("more than one dataset"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = open(empty.path(), &DataOptions::default(), &no_progress)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the folder is empty"), "{err}");
    std::fs::write(empty.path().join("notes.txt"), b"hello").unwrap();
    let err = open(empty.path(), &DataOptions::default(), &no_progress)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no known dataset"), "{err}");
}

/// The tool as a user runs it on their own images: flags refused in one line; a run that
/// learns the classes; `predict` names them; `summary --checkpoint` describes the model.
#[test]
fn an_image_folder_trains_and_predict_names_its_classes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_folder(d, 40, true);
    let data = d.to_str().unwrap();
    let out = d.join("run");
    let run = out.to_str().unwrap();

    for (flags, says) in [
        (vec!["--image-size", "0"], "--image-size"),
        (vec!["--image-size", "5000"], "--image-size"),
        (vec!["--mean", "0.5,0.5"], "expected three numbers"),
        (
            vec!["--model", "vgg16", "--image-size", "16"],
            "vgg16 needs images of at least 32x32",
        ),
        (vec![], "cannot be decoded"),
    ] {
        let mut args = vec!["train", "--data", data, "--out", run, "--max-steps", "1"];
        args.extend(flags);
        let (code, _, stderr) = cli(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert!(
        !out.join("last.safetensors").exists(),
        "a refused run writes no checkpoint"
    );

    let (code, stdout, stderr) = cli(&[
        "train",
        "--data",
        data,
        "--out",
        run,
        "--skip-bad-images",
        "--recipe",
        "fast",
        "--epochs",
        "15",
        "--batch-size",
        "8",
        "--threads",
        "2",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("image folder, 3 classes, 32x32 images, 122 train / 30 test"),
        "{stdout}"
    );
    assert!(stdout.contains("skipped 1 image file"), "{stdout}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v["kind"] == "eval")
        .unwrap();
    // A few hundred steps: 16 a epoch.
    assert_eq!(last["step"], 240);
    assert!(last["accuracy"].as_f64().unwrap() >= 0.95, "{last}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dataset"]["classes"], serde_json::json!(CLASSES));
    assert_eq!(config["model"]["num_classes"], 3);

    let probe = d.join("probe.jpg");
    drawn(1, 90, 60, 4242).save(&probe).unwrap();
    let ckpt = out.join("last.safetensors");
    let (code, stdout, stderr) = cli(&[
        "predict",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        probe.to_str().unwrap(),
        "--top-k",
        "2",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with(&format!("{}: forest ", probe.display())), "{stdout}");

    let (code, stdout, stderr) = cli(&["summary", "--checkpoint", ckpt.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("3 classes (crimson, forest, navy), 32x32 images"),
        "{stdout}"
    );
    assert!(stdout.contains("out_features=3"), "{stdout}");
}

#[test]
fn bench_and_summary_take_an_image_size() {
    let (code, stdout, stderr) = cli(&[
        "bench",
        "--image-size",
        "48",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
        "--threads",
        "1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["image_size"], 48);
    let (code, stdout, stderr) = cli(&["summary", "--model", "lenet", "--image-size", "64", "--batch-size", "1"]);
    assert_eq!(code, 0, "{stderr}");
    // LeNet's classifier follows the feature map: 64 channels of 8x8 after three pools.
    assert!(stdout.contains("in_features=4096"), "{stdout}");
    let (code, _, stderr) = cli(&["bench", "--model", "vgg16", "--image-size", "24"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("vgg16 needs images of at least 32x32"), "{stderr}");
}

/// CIFAR at another size: every image resized as an image folder's would be.
#[test]
fn cifar_images_resize_to_the_asked_size() {
    let dir = common::shared_dir().join("data/cifar10");
    let opts = DataOptions {
        image_size: Some(16),
        ..DataOptions::default()
    };
    let small = open(&dir, &opts, &no_progress).unwrap();
    let full = open(&dir, &DataOptions::default(), &no_progress).unwrap();
    assert_eq!((small.train.side, small.train.len()), (16, 50_000));
    assert_eq!(small.train.labels, full.train.labels);
    assert_eq!(small.norm, full.norm, "CIFAR-10 keeps the seed's constants");
    let one = Images {
        pixels: full.train.image(123).to_vec(),
        labels: vec![0],
        side: 32,
    };
    let want = resnet_cifar::data::folder::resize_all(&one, 16);
    assert_eq!(small.train.image(123), want.image(0));
    assert!(small.summary().contains("16x16 images"), "{}", small.summary());
}

/// Every class's count among `labels`.
fn per_class(labels: &[u32]) -> Vec<usize> {
    (0..CLASSES.len() as u32)
        .map(|c| labels.iter().filter(|&&l| l == c).count())
        .collect()
}

/// An image folder's `--val-split N` takes every class in proportion (an image folder lists
/// its files class by class, so the last N would be one class), the same images every time
/// and whatever the seed; CIFAR's stays the last N. The run records how it split, and says so.
#[test]
fn an_image_folders_validation_split_takes_every_class() {
    use resnet_cifar::data::{Splits, ValSplit};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_folder(d, 20, false);
    // No test images: the validation split stands in.
    std::fs::remove_dir_all(d.join("test")).unwrap();
    let data = open(d, &DataOptions::default(), &no_progress).unwrap();
    // 21 crimson (a grayscale image besides), 20 forest, 21 navy.
    assert_eq!(per_class(&data.train.labels), [21, 20, 21]);
    for (n, want) in [(3, [1, 1, 1]), (6, [2, 2, 2]), (30, [10, 10, 10]), (40, [14, 13, 13])] {
        let s = Splits::new(data.clone(), n, None).unwrap();
        assert_eq!(s.val_method, ValSplit::Stratified);
        let val = s.val.as_ref().unwrap();
        assert_eq!(per_class(&val.labels), want, "--val-split {n}");
        assert_eq!(s.train.len() + val.len(), data.train.len());
        let again = Splits::new(data.clone(), n, None).unwrap();
        assert_eq!(again.val.unwrap().pixels, val.pixels, "the same images every time");
        // Every held-out image is an image of the training set, and none stays in it.
        let image = |set: &Images, i: usize| set.image(i).to_vec();
        let all: Vec<Vec<u8>> = (0..data.train.len()).map(|i| image(&data.train, i)).collect();
        let kept: Vec<Vec<u8>> = (0..s.train.len()).map(|i| image(&s.train, i)).collect();
        for i in 0..val.len() {
            assert!(all.contains(&image(val, i)) && !kept.contains(&image(val, i)));
        }
    }
    // Fewer than one per class: in proportion, the largest classes first.
    let two = Splits::new(data.clone(), 2, None).unwrap();
    assert_eq!(per_class(&two.val.unwrap().labels), [1, 0, 1]);
    // As a resumed run or a checkpoint recorded: the last N.
    let last = Splits::new(data.clone(), 5, Some(ValSplit::Last)).unwrap();
    assert_eq!(last.val.unwrap().labels, data.train.labels[57..]);

    let out = d.join("run");
    let (code, stdout, stderr) = cli(&[
        "train",
        "--data",
        d.to_str().unwrap(),
        "--val-split",
        "6",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--model",
        "lenet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("evaluating on the val set (6 images, stratified by class)"),
        "{stdout}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["val_split_method"], "stratified");
    let ckpt = out.join("last.safetensors");
    let (code, stdout, stderr) = cli(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
        "--split",
        "val",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("6 images"), "{stdout}");
}

/// Class folders read as torchvision's ImageFolder reads them: images in sub-folders belong to
/// the class, files without an image extension are skipped with a note, a link that loops is a
/// bad image (named, or skipped with --skip-bad-images); a folder of one class is refused.
#[test]
fn class_folders_read_as_torchvisions_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_folder(d, 4, false);
    let base = open(d, &DataOptions::default(), &no_progress).unwrap().train.len();
    let nested = d.join("train/forest/more/deeper");
    std::fs::create_dir_all(&nested).unwrap();
    drawn(1, 32, 32, 77).save(nested.join("x.PNG")).unwrap();
    drawn(1, 32, 32, 78).save(d.join("train/forest/more/y.gif")).unwrap();
    std::fs::write(d.join("train/navy/README.txt"), "about these images").unwrap();
    // A link to the class folder itself: walked once.
    std::os::unix::fs::symlink(d.join("train/forest"), d.join("train/forest/more/again")).unwrap();
    let data = open(d, &DataOptions::default(), &no_progress).unwrap();
    assert_eq!(data.train.len(), base + 2);
    assert_eq!(per_class(&data.train.labels)[1], 4 + 2);
    assert!(
        data.notes
            .iter()
            .any(|n| n.contains("skipped 1 file(s) without an image extension") && n.contains("README.txt")),
        "{:?}",
        data.notes
    );

    std::os::unix::fs::symlink("loop.png", d.join("train/navy/loop.png")).unwrap();
    let err = open(d, &DataOptions::default(), &no_progress).unwrap_err().to_string();
    assert!(
        err.contains("train/navy/loop.png") && err.contains("--skip-bad-images"),
        "{err}"
    );
    let skip = DataOptions {
        skip_bad_images: true,
        ..DataOptions::default()
    };
    assert_eq!(open(d, &skip, &no_progress).unwrap().train.len(), base + 2);

    let one = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(one.path().join("train/cats")).unwrap();
    drawn(0, 32, 32, 1).save(one.path().join("train/cats/a.png")).unwrap();
    let err = open(one.path(), &DataOptions::default(), &no_progress)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("one class folder (cats); a classifier needs two classes or more"),
        "{err}"
    );
}
