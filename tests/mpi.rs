//! Data-parallel training under `mpirun` (cargo feature `mpi`; needs Open MPI's `mpirun`):
//! two ranks of one thread each on a small image folder cut from the CIFAR-10 files.
#![cfg(feature = "mpi")]

mod common;

use resnet_cifar::checkpoint;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// 20 images a class for training (21 of class 0) and 4 for testing, the first of the shared
/// CIFAR-10 files: 201 train images, 7 steps an epoch at the global batch of 32, the last one
/// of 9 images split 5 and 4 (weighted by the ranks' loss gradients).
fn write_data(dir: &Path) -> PathBuf {
    let raw = std::fs::read(common::shared_dir().join("data/cifar10/data_batch_1.bin")).unwrap();
    let mut count = [0usize; 10];
    for rec in raw.chunks_exact(3073) {
        let class = rec[0] as usize;
        let i = count[class];
        count[class] += 1;
        let extra = usize::from(class == 0);
        let split = match i {
            _ if i < 20 + extra => "train",
            _ if i < 24 + extra => "test",
            _ => continue,
        };
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            let p = (y * 32 + x) as usize;
            image::Rgb([rec[1 + p], rec[1 + 1024 + p], rec[1 + 2048 + p]])
        });
        let d = dir.join(split).join(format!("class{class}"));
        std::fs::create_dir_all(&d).unwrap();
        img.save(d.join(format!("{i:03}.png"))).unwrap();
    }
    dir.to_path_buf()
}

/// `mpirun -np 2 resnet-cifar ARGS`, one thread a rank, as root in a container if need be.
fn mpirun(args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", "2", env!("CARGO_BIN_EXE_resnet-cifar")])
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    c
}

fn train_args<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--data",
        data,
        "--out",
        out,
        "--recipe",
        "fast",
        "--batch-size",
        "32",
        "--epochs",
        "10",
        "--threads",
        "1",
    ];
    a.extend_from_slice(extra);
    a
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let (t, _) = checkpoint::parse("state", &std::fs::read(path).unwrap()).unwrap();
    t.into_iter().map(|(k, v)| (k, v.bytes)).collect()
}

#[test]
fn two_ranks_train_as_one_run_and_resume_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(&tmp.path().join("data"));
    let data = data.to_str().unwrap();
    let unbroken = tmp.path().join("unbroken");
    let o = mpirun(&train_args(data, unbroken.to_str().unwrap(), &["--max-steps", "30"]))
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    // Rank 0 alone speaks: each line once.
    assert_eq!(stdout.matches("rank 0 of 2").count(), 1, "{stdout}");
    assert_eq!(stdout.matches("training on 201 images").count(), 1, "{stdout}");
    // 30 steps cross four epoch ends (7 steps each), each
    // evaluated on the 40 test images shared out between the ranks and summed.
    assert_eq!(stdout.matches("/40)").count(), 4, "every image counted once: {stdout}");
    // The ranks checked at every save that they hold the same weights.
    assert!(stdout.contains("all 2 ranks hold the same weights"), "{stdout}");

    // Stopped at step 12 (mid-epoch) and resumed: the same weights, BN statistics and Adam
    // state as the unbroken run, bit for bit.
    let cut = tmp.path().join("cut");
    let cut_s = cut.to_str().unwrap();
    let o = mpirun(&train_args(data, cut_s, &["--max-steps", "12"]))
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    let o = mpirun(&["train", "--resume", cut_s, "--max-steps", "30", "--threads", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(
        tensors(&cut.join("train_state.safetensors")) == tensors(&unbroken.join("train_state.safetensors")),
        "a resumed 2-rank run differs from the unbroken one"
    );

    // Another number of ranks is refused in one line; the checkpoint loads in one process.
    let (code, _, err) = common::cli(&["train", "--resume", cut_s, "--threads", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("2 rank(s)") && err.contains("--init"), "{err}");
    let (code, out, err) = common::cli(&[
        "eval",
        "--checkpoint",
        cut.join("last.safetensors").to_str().unwrap(),
        "--data",
        data,
    ]);
    assert_eq!(code, 0, "{out}{err}");
}

/// The worst, over the tensors of two checkpoints, of max |a - b| / max |b|.
fn worst_relative_difference(a: &Path, b: &Path) -> (f64, String) {
    let (ta, _) = checkpoint::parse("a", &std::fs::read(a).unwrap()).unwrap();
    let (tb, _) = checkpoint::parse("b", &std::fs::read(b).unwrap()).unwrap();
    let floats = |bytes: &[u8]| -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let mut worst = (0.0, String::new());
    for (name, va) in &ta {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let (x, y) = (floats(&va.bytes), floats(&tb[name].bytes));
        let scale = y.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-12);
        let diff = x.iter().zip(&y).fold(0f64, |m, (p, q)| m.max((p - q).abs() as f64));
        if diff / scale > worst.0 {
            worst = (diff / scale, name.clone());
        }
    }
    worst
}

/// With `--sync-bn`, 2 ranks take one step as one process does: the same batch statistics,
/// running statistics and gradient, up to the order of float sums. Compared after one step:
/// later steps amplify rounding differences until any two runs differ (a one-process run whose
/// learning rate differs by 5e-8 ends 97% away after 30 steps of this recipe; see the README).
#[test]
fn two_ranks_with_sync_bn_step_as_one_process_does() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(&tmp.path().join("data"));
    let data = data.to_str().unwrap();
    let run = |name: &str, ranks: usize, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut extra = extra.to_vec();
        extra.extend(["--max-steps", "1"]);
        let args = train_args(data, out.to_str().unwrap(), &extra);
        let o = if ranks == 2 {
            mpirun(&args).output().unwrap()
        } else {
            Command::new(env!("CARGO_BIN_EXE_resnet-cifar"))
                .args(&args)
                .output()
                .unwrap()
        };
        assert!(o.status.success(), "{name}: {:?}", text(&o));
        out.join("last.safetensors")
    };
    // A batch split evenly (16 + 16), and one of 9 images split 5 + 4 (the training set cut
    // to 9 images by the validation split).
    for (case, extra) in [("even", &[][..]), ("uneven", &["--val-split", "192"][..])] {
        let one = run(&format!("{case}-one"), 1, extra);
        let synced = run(&format!("{case}-synced"), 2, &[extra, &["--sync-bn", "true"]].concat());
        let own = run(&format!("{case}-own"), 2, extra);
        let (sync_gap, sync_at) = worst_relative_difference(&synced, &one);
        let (own_gap, own_at) = worst_relative_difference(&own, &one);
        eprintln!(
            "{case} split, one step: worst relative difference from one process, 2 ranks with \
             --sync-bn {sync_gap:.2e} ({sync_at}), without {own_gap:.2e} ({own_at})"
        );
        assert!(
            sync_gap < 1e-4,
            "{case}: --sync-bn differs by {sync_gap:e} at {sync_at}"
        );
        // Each rank normalising over its own slice is another computation: the check can fail.
        assert!(own_gap > 1e-2, "{case}: without sync BN only {own_gap:e} at {own_at}");
    }
    // A last batch with fewer images than ranks would leave a rank out of the exchanges.
    let out = tmp.path().join("refused");
    let mut args = train_args(data, out.to_str().unwrap(), &["--sync-bn", "true"]);
    let at = args.iter().position(|a| *a == "--batch-size").unwrap();
    args[at + 1] = "10";
    let o = mpirun(&args).output().unwrap();
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("--sync-bn: the last batch of an epoch has 1 image(s)"),
        "{stderr}"
    );
}

/// The pids of `mpirun`'s rank processes, by rank (read from /proc: Open MPI starts local
/// ranks as its children and tells each its rank in the environment).
fn rank_pids(mpirun: &Child) -> Vec<(usize, u32)> {
    let mut ranks = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid: u32 = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        if ppid != mpirun.id() {
            continue;
        }
        let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        for var in env.split(|&b| b == 0) {
            if let Some(r) = var.strip_prefix(b"OMPI_COMM_WORLD_RANK=") {
                ranks.push((String::from_utf8_lossy(r).parse().unwrap(), pid));
            }
        }
    }
    ranks.sort();
    ranks
}

/// Starts a long 2-rank run and waits until it has trained a few steps.
fn started_run(data: &str, out: &Path) -> (Child, Vec<(usize, u32)>) {
    let mut child = mpirun(&train_args(data, out.to_str().unwrap(), &["--log-every", "1"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let ranks = rank_pids(&child);
        if ranks.len() == 2 && out.join("config.json").exists() {
            std::thread::sleep(Duration::from_secs(3));
            return (child, ranks);
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the run did not start");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn signal(pid: u32, sig: &str) {
    let s = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -{sig} {pid}"))
        .status()
        .unwrap();
    assert!(s.success());
}

/// Waits up to `limit` for `child`; its output.
fn wait_for(mut child: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn an_interrupted_rank_stops_every_rank_with_one_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    let (child, ranks) = started_run(data.to_str().unwrap(), &out);
    // Rank 1, which writes nothing itself: the vote carries the stop to rank 0.
    signal(ranks[1].1, "INT");
    let o = wait_for(child, Duration::from_secs(60));
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(stderr.contains("interrupted after step"), "{stderr}");
    assert!(out.join("train_state.safetensors").exists() && out.join("last.safetensors").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_killed_rank_ends_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    let (child, ranks) = started_run(data.to_str().unwrap(), &out);
    let t0 = Instant::now();
    signal(ranks[1].1, "KILL");
    let o = wait_for(child, Duration::from_secs(60));
    assert!(!o.status.success(), "{:?}", text(&o));
    eprintln!(
        "the launch ended {:.1} s after rank 1 was killed",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn bench_under_mpirun_times_the_gradient_all_reduce() {
    let o = mpirun(&["bench", "--threads", "1", "--steps", "3", "--warmup", "1"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    // Rank 0 alone reports, for the whole arena (44.7 MB for ResNet-18 on 10 classes).
    assert_eq!(
        stdout.matches("all-reduce (mean) of the gradients").count(),
        1,
        "{stdout}"
    );
    assert!(stdout.contains("(44.7 MB), over 2 ranks"), "{stdout}");
}

/// GPU ranks need NCCL: where it cannot be found, the launch exits 2 with one line a rank
/// naming the library, and no rank waits for another (checked before any GPU is opened, so
/// this runs on machines without one).
#[test]
fn gpu_ranks_without_nccl_exit_2_in_one_line() {
    let cache = Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    let cuda = ["/usr/local/cuda/lib64", "/usr/local/cuda/lib"];
    if String::from_utf8_lossy(&cache).contains("libnccl.so.2")
        || cuda.iter().any(|d| Path::new(d).join("libnccl.so.2").exists())
    {
        let why = "this machine has NCCL where every process finds it";
        return resnet_cifar::test_support::skip("no-nccl", "ranks on GPUs without NCCL", why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    let mut cmd = mpirun(&train_args(
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        &["--device", "cuda"],
    ));
    // Hide NCCL where the search would look besides the system's folders (a PyTorch install).
    for var in [
        "LD_LIBRARY_PATH",
        "RESNET_CIFAR_CUDA_LIBS",
        "CUDA_HOME",
        "CUDA_PATH",
        "VIRTUAL_ENV",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("PYTHON", "/bin/false");
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let o = wait_for(child, Duration::from_secs(60));
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stdout}\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(!errors.is_empty() && errors.len() <= 2, "{stderr}");
    for e in errors {
        assert!(
            e.contains("--device cuda: NCCL") && e.contains("libnccl.so.2 not found"),
            "{e}"
        );
    }
    assert!(!out.exists(), "nothing written");
}

/// A rank that meets an error alone (here its data folder is missing: the other rank's is
/// fine) says so and ends the launch with the error's exit code, instead of leaving the other
/// rank waiting for it in the first collective.
#[test]
fn an_error_on_one_rank_ends_the_launch_with_its_message() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    let missing = tmp.path().join("missing");
    let (data, out, missing) = (data.to_str().unwrap(), out.to_str().unwrap(), missing.to_str().unwrap());
    // Two programs in one launch (MPMD): rank 0 with the data, rank 1 without.
    let mut cmd = Command::new("mpirun");
    cmd.arg("--oversubscribe")
        .args(["-np", "1", env!("CARGO_BIN_EXE_resnet-cifar")])
        .args(train_args(data, out, &[]))
        .args([":", "-np", "1", env!("CARGO_BIN_EXE_resnet-cifar")])
        .args(train_args(missing, out, &[]));
    for (k, v) in mpirun(&[]).get_envs() {
        cmd.env(k, v.unwrap());
    }
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let o = wait_for(child, Duration::from_secs(60));
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("error: rank 1: {missing}: the folder does not exist")),
        "{stderr}"
    );
}
