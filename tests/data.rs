//! The CIFAR-10 reader, the seed's transforms, the archive extraction and the seed recipe.

mod common;

use resnet_cifar::data::cifar::{self, IMAGE_BYTES, RECORD_BYTES, TRAIN_FILES};
use resnet_cifar::data::transform::make_batch;
use resnet_cifar::data::{Augment, BatchKey, Cifar10, EpochPlan, Images, Normalization, Splits, fetch};
use resnet_cifar::model::Stem;
use resnet_cifar::optim::{AdamConfig, Schedule};
use resnet_cifar::train::{OptimizerConfig, Recipe};
use std::path::Path;

const NORM: Normalization = Normalization::CIFAR10;

/// A CIFAR-10 byte after ToTensor and the seed's Normalize.
fn normalize(v: u8, c: usize) -> f32 {
    NORM.apply(v, c)
}

fn record(label: u8, fill: u8) -> Vec<u8> {
    let mut r = vec![fill; RECORD_BYTES];
    r[0] = label;
    r
}

/// A folder with five training files of `n` records each (labels i % 10).
fn write_dataset(dir: &Path, n: usize) {
    for name in TRAIN_FILES {
        let bytes: Vec<u8> = (0..n).flat_map(|i| record((i % 10) as u8, i as u8)).collect();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn reads_the_shared_training_set() {
    let data = Cifar10::load(&common::shared_dir().join("data/cifar10")).unwrap();
    assert_eq!(data.train.len(), 50_000);
    assert_eq!(data.train.pixels.len(), 50_000 * IMAGE_BYTES);
    assert!(data.test.is_none(), "the shared copy has no test set");
    assert_eq!(data.classes[0], "airplane");
    assert_eq!(data.classes[9], "truck");
    let mut counts = [0usize; 10];
    for &l in &data.train.labels {
        counts[l as usize] += 1;
    }
    assert!(
        counts.iter().all(|&c| c == 5000),
        "CIFAR-10 has 5,000 images of each class: {counts:?}"
    );
    let splits = Splits::new(data, 5000, None).unwrap();
    assert_eq!((splits.train.len(), splits.val.as_ref().unwrap().len()), (45_000, 5000));
}

#[test]
fn finds_files_in_the_archive_subfolder() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&inner).unwrap();
    for name in TRAIN_FILES {
        let bytes: Vec<u8> = (0..10_000).flat_map(|i| record((i % 10) as u8, 0)).collect();
        std::fs::write(inner.join(name), bytes).unwrap();
    }
    let data = Cifar10::load(dir.path()).unwrap();
    assert_eq!(data.train.len(), 50_000);
    assert_eq!(data.dir, inner);
}

#[test]
fn bad_files_are_refused_with_file_and_record() {
    let p = Path::new("data_batch_3.bin");
    let good: Vec<u8> = (0..3).flat_map(|i| record(i, 7)).collect();
    assert_eq!(cifar::parse_records(p, &good, None).unwrap().labels, [0, 1, 2]);

    let err = cifar::parse_records(p, &good[..good.len() - 10], None)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("data_batch_3.bin:") && err.contains("not a whole number of 3073-byte records"),
        "{err}"
    );

    let mut bad_label = good.clone();
    bad_label[2 * RECORD_BYTES] = 10;
    let err = cifar::parse_records(p, &bad_label, None).unwrap_err().to_string();
    assert!(
        err.contains("record 2") && err.contains("label 10, expected 0-9"),
        "{err}"
    );

    let err = cifar::parse_records(p, &good, Some(10_000)).unwrap_err().to_string();
    assert!(err.contains("holds 3 records, expected 10000"), "{err}");

    let err = cifar::parse_records(p, &[], None).unwrap_err().to_string();
    assert!(err.contains("file is empty"), "{err}");
}

#[test]
fn missing_or_short_files_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let err = Cifar10::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("no CIFAR-10 data in") && err.contains("data_batch_1.bin"),
        "{err}"
    );
    let err = Cifar10::load(&dir.path().join("nope")).unwrap_err().to_string();
    assert!(err.contains("does not exist"), "{err}");

    write_dataset(dir.path(), 10_000);
    std::fs::remove_file(dir.path().join("data_batch_4.bin")).unwrap();
    let err = Cifar10::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("data_batch_4.bin") && err.contains("No such file"),
        "{err}"
    );

    write_dataset(dir.path(), 100);
    let err = Cifar10::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("data_batch_1.bin: holds 100 records, expected 10000"),
        "{err}"
    );
}

#[test]
fn normalisation_uses_the_seed_constants() {
    assert_eq!(NORM.mean, [0.4914, 0.4822, 0.4465]);
    assert_eq!(NORM.std, [0.2023, 0.1994, 0.2010]);
    assert!((normalize(255, 0) - (1.0 - 0.4914) / 0.2023).abs() < 1e-6);
    assert!((normalize(0, 2) - (-0.4465 / 0.2010)).abs() < 1e-6);
    // The test transform is the identity layout change plus normalisation: pixel (y, x) of
    // channel c lands at NHWC offset (y * 32 + x) * 3 + c.
    let img = Images {
        pixels: (0..IMAGE_BYTES).map(|i| (i % 251) as u8).collect(),
        labels: vec![4],
        side: 32,
    };
    let b = make_batch(&img, &[0], Augment::NONE, BatchKey::new(0, 0, 0), &NORM);
    for (c, y, x) in [(0, 0, 0), (1, 5, 7), (2, 31, 31)] {
        let v = img.pixels[c * 1024 + y * 32 + x];
        assert_eq!(b.x[(y * 32 + x) * 3 + c], normalize(v, c));
    }
    assert_eq!(b.labels, [4]);
}

#[test]
fn crop_and_flip_statistics() {
    // An image whose pixel value encodes its column; crop offsets and flips show in batch 0.
    let mut img = Images::new(32);
    let n = 2000;
    for _ in 0..n {
        for _channel in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    img.pixels.push(if y == 16 { 100 + x as u8 } else { 50 });
                }
            }
        }
        img.labels.push(0);
    }
    let idx: Vec<u32> = (0..n as u32).collect();
    let b = make_batch(&img, &idx, Augment::SEED, BatchKey::new(123, 0, 0), &NORM);
    let zero = normalize(0, 0);
    let (mut flips, mut padded_rows, mut shifts) = (0, 0, std::collections::HashMap::new());
    for k in 0..n {
        let im = &b.x[k * 3072..(k + 1) * 3072];
        let at = |y: usize, x: usize| im[(y * 32 + x) * 3];
        // Find the marked row (the crop moves it by -4..=4).
        let row = (0..32).find(|&y| (0..32).any(|x| at(y, x) > normalize(99, 0)));
        let Some(row) = row else { continue };
        let vals: Vec<f32> = (0..32).map(|x| at(row, x)).collect();
        let marked: Vec<usize> = (0..32).filter(|&x| vals[x] > normalize(99, 0)).collect();
        let (a, z) = (marked[0], *marked.last().unwrap());
        let increasing = vals[a] < vals[z];
        if !increasing {
            flips += 1;
        }
        *shifts.entry(row as i32 - 16).or_insert(0) += 1;
        if (0..32).any(|x| vals[x] == zero) {
            padded_rows += 1;
        }
    }
    let frac = flips as f64 / n as f64;
    assert!((frac - 0.5).abs() < 0.05, "flip probability {frac}");
    assert_eq!(shifts.len(), 9, "vertical offsets -4..=4 all occur: {shifts:?}");
    for (&s, &count) in &shifts {
        assert!((-4..=4).contains(&s));
        assert!(
            count as f64 > n as f64 / 9.0 * 0.7,
            "offset {s} is drawn uniformly: {count}"
        );
    }
    assert!(
        padded_rows > n / 2,
        "horizontal crops bring zero padding in: {padded_rows}"
    );
    // Same seed, same batch; another seed, another batch.
    assert_eq!(
        make_batch(&img, &idx[..10], Augment::SEED, BatchKey::new(5, 0, 0), &NORM).x,
        make_batch(&img, &idx[..10], Augment::SEED, BatchKey::new(5, 0, 0), &NORM).x
    );
    assert_ne!(
        make_batch(&img, &idx[..10], Augment::SEED, BatchKey::new(5, 0, 0), &NORM).x,
        make_batch(&img, &idx[..10], Augment::SEED, BatchKey::new(6, 0, 0), &NORM).x
    );
}

/// Which images of a batch came out mirrored, for images whose pixels rise left to right.
fn mirrored(b: &resnet_cifar::data::Batch) -> Vec<bool> {
    (0..b.len()).map(|k| b.x[k * 3072] > b.x[k * 3072 + 31 * 3]).collect()
}

#[test]
fn alternating_flips_mirror_each_image_every_other_epoch() {
    let n = 1000;
    let mut img = Images::new(32);
    for _ in 0..n {
        img.pixels.extend((0..IMAGE_BYTES).map(|i| (i % 32 * 4) as u8));
        img.labels.push(0);
    }
    let alternate = Augment {
        flip: true,
        alternate_flip: true,
        ..Augment::NONE
    };
    let idx: Vec<u32> = (0..n as u32).collect();
    let rev: Vec<u32> = idx.iter().rev().copied().collect();
    let epoch = |e: usize| mirrored(&make_batch(&img, &idx, alternate, BatchKey::new(9, e, 0), &NORM));
    let first = epoch(0);
    let frac = first.iter().filter(|&&f| f).count() as f64 / n as f64;
    assert!(
        (frac - 0.5).abs() < 0.06,
        "half the images mirrored in the first epoch: {frac}"
    );
    for e in 1..4 {
        let expect: Vec<bool> = first.iter().map(|&f| f ^ (e % 2 == 1)).collect();
        assert_eq!(epoch(e), expect, "epoch {e} mirrors the images epoch {} did not", e - 1);
    }
    // The choice belongs to the image, wherever it sits in whichever batch.
    let mut moved = mirrored(&make_batch(&img, &rev, alternate, BatchKey::new(9, 2, 7), &NORM));
    moved.reverse();
    assert_eq!(moved, first);
    // Another run seed, another pattern; coin flips (the default) do not alternate.
    assert_ne!(
        mirrored(&make_batch(&img, &idx, alternate, BatchKey::new(10, 0, 0), &NORM)),
        first
    );
    let coin = Augment {
        alternate_flip: false,
        ..alternate
    };
    let (c0, c1) = (
        mirrored(&make_batch(&img, &idx, coin, BatchKey::new(9, 0, 0), &NORM)),
        mirrored(&make_batch(&img, &idx, coin, BatchKey::new(9, 1, 0), &NORM)),
    );
    let same = c0.iter().zip(&c1).filter(|(a, b)| a == b).count();
    assert!(
        (400..600).contains(&same),
        "coin flips are independent across epochs: {same}"
    );
}

/// airbench's translation: `F.pad(images, (2,) * 4, 'reflect')` then a crop of the image's
/// size; numpy's and PyTorch's `reflect` do not repeat the edge pixel, so the row
/// `[a b c d]` padded by 2 reads `[c b a b c d c b]`.
#[test]
fn reflect_padding_mirrors_the_image_without_its_edge() {
    use resnet_cifar::data::transform::{Crop, write_image};
    let side = 4;
    // Channel c, row y, column x holds 10 * y + x + 100 * c.
    let src: Vec<u8> = (0..3 * side * side)
        .map(|i| (i / 16 * 100 + i % 16 / 4 * 10 + i % 4) as u8)
        .collect();
    let unit = Normalization {
        mean: [0.0; 3],
        std: [1.0 / 255.0; 3],
    };
    let padded_row = |y: usize| -> [usize; 8] {
        let r = [2, 1, 0, 1, 2, 3, 2, 1][y];
        [2, 1, 0, 1, 2, 3, 2, 1].map(|x| 10 * r + x)
    };
    for (top, left, flip) in [(0, 0, false), (2, 2, false), (4, 1, false), (1, 3, true)] {
        let mut out = vec![0f32; 3 * side * side];
        let crop = Crop {
            side,
            pad: 2,
            reflect: true,
            top,
            left,
            flip,
        };
        write_image(&src, &mut out, crop, &unit);
        for y in 0..side {
            for x in 0..side {
                let sx = if flip { side - 1 - x } else { x };
                let want = padded_row(y + top)[sx + left];
                for c in 0..3 {
                    let got = out[(y * side + x) * 3 + c].round() as usize;
                    assert_eq!(
                        got,
                        want + 100 * c,
                        "crop at ({top}, {left}), flip {flip}: pixel ({y}, {x})"
                    );
                }
            }
        }
    }
}

#[test]
fn cutout_zeroes_one_clipped_square_per_image() {
    let n = 2000;
    let img = Images {
        pixels: vec![200; n * IMAGE_BYTES],
        labels: vec![0; n],
        side: 32,
    };
    let idx: Vec<u32> = (0..n as u32).collect();
    let key = BatchKey::new(3, 1, 4);
    let plain = make_batch(&img, &idx, Augment::NONE, key, &NORM);
    assert!(plain.x.iter().all(|&v| v != 0.0));
    for side in [8usize, 5] {
        let aug = Augment {
            cutout: side,
            ..Augment::NONE
        };
        let cut = make_batch(&img, &idx, aug, key, &NORM);
        assert_eq!(
            cut.x,
            make_batch(&img, &idx, aug, key, &NORM).x,
            "same key, same squares"
        );
        let (mut full, mut clipped, mut lowest, mut highest) = (0, [0; 4], 32, 0);
        for k in 0..n {
            let image = &cut.x[k * 3072..(k + 1) * 3072];
            let zero = |y: usize, x: usize| image[(y * 32 + x) * 3..][..3].iter().all(|&v| v == 0.0);
            let places: Vec<(usize, usize)> = (0..32 * 32)
                .map(|p| (p / 32, p % 32))
                .filter(|&(y, x)| zero(y, x))
                .collect();
            let top = places.iter().map(|p| p.0).min().unwrap();
            let bottom = places.iter().map(|p| p.0).max().unwrap();
            let left = places.iter().map(|p| p.1).min().unwrap();
            let right = places.iter().map(|p| p.1).max().unwrap();
            let (h, w) = (bottom - top + 1, right - left + 1);
            assert_eq!(places.len(), h * w, "image {k}: the zeros form one rectangle");
            assert!(h <= side && w <= side, "image {k}: {h}x{w} within {side}x{side}");
            // A side shorter than the square's only where the square meets the image's edge.
            assert!(
                h == side || top == 0 || bottom == 31,
                "image {k}: rows {top}..={bottom}"
            );
            assert!(
                w == side || left == 0 || right == 31,
                "image {k}: columns {left}..={right}"
            );
            let edges = [
                top == 0 && h < side,
                bottom == 31 && h < side,
                left == 0 && w < side,
                right == 31 && w < side,
            ];
            for (c, e) in clipped.iter_mut().zip(edges) {
                *c += e as usize;
            }
            full += (h * w == side * side) as usize;
            (lowest, highest) = (lowest.min(top), highest.max(bottom));
            // Everything outside the square is the image as it was.
            for (i, (a, b)) in image.iter().zip(&plain.x[k * 3072..(k + 1) * 3072]).enumerate() {
                assert!(*a == *b || zero(i / 3 / 32, i / 3 % 32), "image {k}, value {i}");
            }
        }
        // Centres anywhere on the image: mostly whole squares, some clipped at every edge.
        assert!(full > n / 2, "{full} whole squares of {n}");
        assert!(
            clipped.iter().all(|&c| c > n / 100),
            "clipped at top, bottom, left, right: {clipped:?}"
        );
        assert_eq!((lowest, highest), (0, 31));
    }
}

#[test]
fn epoch_plans_follow_the_seed_loader() {
    let plan = EpochPlan::new(50_000, 64, false, 0, 0);
    assert_eq!(plan.num_batches(), 782);
    assert_eq!(plan.batch(781).len(), 16, "the last batch keeps the remainder");
    assert_eq!(plan.batch(1)[0], 64, "no shuffling: images in file order");
    let a = EpochPlan::new(1000, 10, true, 1, 0);
    let b = EpochPlan::new(1000, 10, true, 1, 1);
    assert_ne!(a.batch(0), b.batch(0), "shuffled differently each epoch");
    let mut all: Vec<u32> = (0..100).flat_map(|i| a.batch(i).to_vec()).collect();
    all.sort();
    assert_eq!(all, (0..1000).collect::<Vec<_>>(), "a permutation");
}

fn tar_gz(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    for (name, data) in members {
        let mut header = tar::Header::new_old();
        // Write the raw name so that the builder's own path checks cannot sanitise it.
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, data.as_slice()).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

#[test]
fn extraction_takes_only_expected_members() {
    let dir = tempfile::tempdir().unwrap();
    let mut members: Vec<(String, Vec<u8>)> = TRAIN_FILES
        .iter()
        .map(|f| (format!("cifar-10-batches-bin/{f}"), record(1, 2)))
        .collect();
    members.push(("cifar-10-batches-bin/readme.html".into(), b"hi".to_vec()));
    members.push(("other/data_batch_1.bin".into(), b"not this".to_vec()));
    let refs: Vec<(&str, Vec<u8>)> = members.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    let archive = dir.path().join("a.tar.gz");
    std::fs::write(&archive, tar_gz(&refs)).unwrap();
    let out = dir.path().join("out");
    fetch::extract(&archive, &out, &fetch::CIFAR10).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(out.join("cifar-10-batches-bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        TRAIN_FILES.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "only the batch files, no temporaries"
    );
    assert_eq!(
        std::fs::read(out.join("cifar-10-batches-bin/data_batch_1.bin")).unwrap(),
        record(1, 2)
    );
    assert!(!out.join("other").exists());
}

#[test]
fn extraction_refuses_archives_that_climb_out() {
    for evil in ["../evil.bin", "cifar-10-batches-bin/../../evil.bin", "/tmp/evil.bin"] {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.tar.gz");
        std::fs::write(
            &archive,
            tar_gz(&[
                ("cifar-10-batches-bin/data_batch_1.bin", record(0, 0)),
                (evil, b"x".to_vec()),
            ]),
        )
        .unwrap();
        let out = dir.path().join("out");
        let err = fetch::extract(&archive, &out, &fetch::CIFAR10).unwrap_err().to_string();
        assert!(err.contains("refused") && err.contains(evil), "{evil}: {err}");
        assert!(!out.exists(), "{evil}: nothing written");
        assert!(!dir.path().join("evil.bin").exists());
    }
}

#[test]
fn extraction_reports_a_corrupt_or_incomplete_archive() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.tar.gz");
    std::fs::write(&archive, b"this is not gzip").unwrap();
    let err = fetch::extract(&archive, dir.path(), &fetch::CIFAR10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a valid archive"), "{err}");
    std::fs::write(
        &archive,
        tar_gz(&[("cifar-10-batches-bin/data_batch_1.bin", record(0, 0))]),
    )
    .unwrap();
    let err = fetch::extract(&archive, dir.path(), &fetch::CIFAR10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lacks") && err.contains("data_batch_5.bin"), "{err}");
}

#[test]
fn seed_recipe_is_the_seed_run() {
    let cfg = Recipe::Seed.config();
    assert_eq!(cfg.model.stem, Stem::Seed);
    assert_eq!((cfg.model.stages, cfg.model.num_classes), (4, 10));
    assert_eq!(
        cfg.optimizer,
        OptimizerConfig::Adam(AdamConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decay_1d: true,
        })
    );
    assert_eq!(cfg.schedule, Schedule::InverseEpoch { lr: 0.01 });
    assert_eq!((cfg.epochs, cfg.batch_size, cfg.eval_batch_size), (50.0, 64, 64));
    assert!(!cfg.shuffle && !cfg.drop_last);
    assert_eq!(
        cfg.augment,
        Augment {
            crop_pad: 4,
            reflect: false,
            flip: true,
            alternate_flip: false,
            cutout: 0,
        }
    );
    assert_eq!(cfg.log_every, 100);
    assert_eq!("seed".parse::<Recipe>().unwrap(), Recipe::Seed);
    assert_eq!((cfg.label_smoothing, cfg.tta), (0.0, resnet_cifar::eval::Tta::Off));
    assert!(
        "quick"
            .parse::<Recipe>()
            .unwrap_err()
            .contains("unknown recipe 'quick'")
    );
}

#[test]
fn flip_tta_mirrors_each_row() {
    // 2 images of 2x3 pixels, 2 channels: value = image*100 + y*10 + x, channel adds 0.5.
    let (n, h, w, c) = (2, 2, 3, 2);
    let x: Vec<f32> = (0..n * h * w * c)
        .map(|i| {
            let (ch, px) = (i % c, i / c);
            let (xx, yy, img) = (px % w, px / w % h, px / (w * h));
            (img * 100 + yy * 10 + xx) as f32 + 0.5 * ch as f32
        })
        .collect();
    let f = resnet_cifar::eval::flip_horizontal(&x, n, h, w, c);
    assert_eq!(&f[..c * w], &[2.0, 2.5, 1.0, 1.5, 0.0, 0.5]);
    assert_eq!(
        f[(n * h * w - 1) * c],
        110.0,
        "last pixel of the last image came from x = 0"
    );
    assert_eq!(
        resnet_cifar::eval::flip_horizontal(&f, n, h, w, c),
        x,
        "flipping twice is the identity"
    );
}

#[test]
fn tta_shift_moves_pixels_and_fills_with_black() {
    use resnet_cifar::eval::{Padding, Tta, shift_image};
    // One 4x4 image, pixel (x, y) = [10y + x, 100 + 10y + x, 200 + 10y + x].
    let side = 4;
    let x: Vec<f32> = (0..side * side)
        .flat_map(|p| (0..3).map(move |c| (100 * c + 10 * (p / side) + p % side) as f32))
        .collect();
    let fill = [-1.0, -2.0, -3.0];
    let s = shift_image(&x, 1, side, 2, 0, Padding::Fill(fill));
    let px = |v: &[f32], x: usize, y: usize| v[(y * side + x) * 3..(y * side + x + 1) * 3].to_vec();
    assert_eq!(px(&s, 2, 1), px(&x, 0, 1), "content moves 2 pixels right");
    assert_eq!(px(&s, 1, 3), fill.to_vec(), "uncovered pixels are the fill");
    let s = shift_image(&x, 1, side, 0, -2, Padding::Fill(fill));
    assert_eq!(px(&s, 3, 0), px(&x, 3, 2), "content moves 2 pixels up");
    assert_eq!(px(&s, 0, 2), fill.to_vec());
    assert_eq!(shift_image(&x, 1, side, 0, 0, Padding::Fill(fill)), x);
    let s = shift_image(&x, 1, side, 1, 0, Padding::Reflect);
    assert_eq!(px(&s, 0, 2), px(&x, 1, 2), "reflected, the edge not repeated");
    assert_eq!("flip-shift".parse::<Tta>().unwrap().name(), "flip-shift");
    assert!("mirror".parse::<Tta>().is_err());
    // The views: each shift comes with and without the mirror, shifted 2 or 1 pixels.
    let plain = |v: Vec<resnet_cifar::eval::View>| v.iter().map(|v| (v.dx, v.dy, v.mirrored)).collect::<Vec<_>>();
    assert_eq!(plain(Tta::Off.views()), [(0, 0, false)]);
    assert_eq!(plain(Tta::Flip.views()), [(0, 0, false), (0, 0, true)]);
    for (tta, d) in [(Tta::FlipShift, 2), (Tta::FlipShift1, 1)] {
        let v = plain(tta.views());
        assert_eq!(v.len(), 10, "{tta:?}");
        for (dx, dy, _) in &v {
            assert!([0, d].contains(&(dx.abs() + dy.abs())), "{tta:?}: {v:?}");
        }
        assert_eq!(v.iter().filter(|x| x.2).count(), 5, "{tta:?}");
        assert_eq!(v.iter().filter(|x| x.0 == -d && x.1 == 0).count(), 2, "{tta:?}");
        assert!(tta.views().iter().all(|v| v.share == 10.0), "equal shares");
    }
    assert_eq!("flip-shift1".parse::<Tta>(), Ok(Tta::FlipShift1));
}

/// airbench's `tta_level=2` (`infer_mirror_translate`), written out as its code does it: the
/// mirror pair of the image, and the mirror pairs of `F.pad(x, 1, 'reflect')[0:side, 0:side]`
/// and `[2:side+2, 2:side+2]`, weighted 1/2 and 1/4 + 1/4 of 1/2. Ours builds each view by
/// mirroring and then shifting over reflect padding: the same six images, the same weights.
#[test]
fn mirror_translate_views_are_airbenchs() {
    use resnet_cifar::eval::{Tta, flip_horizontal, shift_image};
    let (n, side) = (2, 5);
    let x: Vec<f32> = (0..n * side * side * 3).map(|i| ((i * 37) % 101) as f32).collect();
    let at = |img: &[f32], b: usize, y: usize, xx: usize| {
        let o = ((b * side + y) * side + xx) * 3;
        img[o..o + 3].to_vec()
    };
    // F.pad(x, (1, 1, 1, 1), 'reflect'), then the window at (top, left).
    let reflect = |i: isize| if i < 0 { -i } else if i >= side as isize { 2 * (side as isize - 1) - i } else { i } as usize;
    let window = |img: &[f32], top: isize, left: isize| -> Vec<f32> {
        let mut out = Vec::new();
        for b in 0..n {
            for y in 0..side {
                for xx in 0..side {
                    out.extend(at(
                        img,
                        b,
                        reflect(y as isize + top - 1),
                        reflect(xx as isize + left - 1),
                    ));
                }
            }
        }
        out
    };
    let mirror = |img: &[f32]| flip_horizontal(img, n, side, side, 3);
    let (down_right, up_left) = (window(&x, 0, 0), window(&x, 2, 2));
    let reference = [
        (x.clone(), 0.25),
        (mirror(&x), 0.25),
        (down_right.clone(), 0.125),
        (mirror(&down_right), 0.125),
        (up_left.clone(), 0.125),
        (mirror(&up_left), 0.125),
    ];
    let tta = Tta::MirrorTranslate;
    let views = tta.views();
    assert_eq!(views.len(), reference.len());
    for (v, (want, weight)) in views.iter().zip(&reference) {
        let mut img = if v.mirrored { mirror(&x) } else { x.clone() };
        if (v.dx, v.dy) != (0, 0) {
            img = shift_image(&img, n, side, v.dx, v.dy, tta.padding([0.0; 3]));
        }
        assert_eq!(&img, want, "{v:?}");
        assert_eq!(1.0 / v.share, *weight, "{v:?}");
    }
    assert_eq!("mirror-translate".parse::<Tta>(), Ok(Tta::MirrorTranslate));
}

#[test]
fn fast_recipe_resolves() {
    let cfg = "fast".parse::<Recipe>().unwrap().config();
    assert_eq!(cfg.recipe, "fast");
    assert!(matches!(cfg.optimizer, OptimizerConfig::Sgd(s) if s.nesterov && s.momentum == 0.9));
    assert!(matches!(cfg.schedule, Schedule::OneCycle { max_lr, .. } if max_lr == 0.2));
    assert!(cfg.shuffle && cfg.label_smoothing == 0.1);
    assert_eq!(cfg.tta, resnet_cifar::eval::Tta::Flip);
    assert_eq!(cfg.model.stem, Stem::Seed, "same network as the seed");
    assert_eq!(cfg.augment.crop_pad, 1);

    let cifar = "cifar".parse::<Recipe>().unwrap().config();
    assert_eq!((cifar.recipe.as_str(), cifar.model.stem), ("cifar", Stem::Cifar));
    assert_eq!(
        (cifar.epochs, cifar.augment.crop_pad, cifar.augment.cutout),
        (60.0, 4, 16)
    );
    assert!(matches!(cifar.optimizer, OptimizerConfig::Sgd(s) if s.weight_decay == 5e-4 && s.nesterov));
}
