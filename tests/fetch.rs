//! Downloads from a mirror or a local web server: the MD5 still decides, a broken connection
//! leaves only a `.part` file that the next attempt replaces, and `train` takes
//! `RESNET_CIFAR_MIRROR`. The servers here listen on 127.0.0.1 only, answer a fixed number of
//! requests and stop by themselves.

mod common;

use md5::{Digest, Md5};
use resnet_cifar::data::fetch::{self, Archive};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

/// Serves one response per connection, in order: `body` announced whole (Content-Length) but
/// only its first `send` bytes written before the connection closes. Returns the base URL.
/// The server stops after its last response, or after 60 s.
fn serve(responses: Vec<(Vec<u8>, usize)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        for (body, send) in responses {
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => return,
                }
            };
            stream.set_nonblocking(false).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                request.push(byte[0]);
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/gzip\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body[..send]);
            let _ = stream.flush();
        }
    });
    format!("http://{addr}")
}

fn tar_gz(members: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

fn md5_hex(bytes: &[u8]) -> &'static str {
    let hex: String = Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    Box::leak(hex.into_boxed_str())
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_mirror_serves_the_archive_checked_by_md5() {
    let good = tar_gz(&[
        ("cifar-100-binary/train.bin", b"records"),
        ("cifar-100-binary/fine_label_names.txt", b"a\n"),
        ("cifar-100-binary/coarse_label_names.txt", b"b\n"),
        ("cifar-100-binary/extra.html", b"not taken"),
    ]);
    // The publisher's archive with this one's checksum, as a mirror would hold it.
    let spec = Archive {
        md5: md5_hex(&good),
        bytes: good.len() as u64,
        ..fetch::CIFAR100
    };
    let url = serve(vec![(good.clone(), good.len())]);
    let dir = tempfile::tempdir().unwrap();
    let mut seen = 0;
    let got = fetch::ensure(
        dir.path(),
        &spec,
        Some(&format!("{url}/any/name.tar.gz")),
        |done, total| {
            assert_eq!(total, Some(good.len() as u64));
            seen = done;
        },
    )
    .unwrap();
    assert_eq!(seen, good.len() as u64);
    assert_eq!(got, dir.path().join("cifar-100-binary"));
    assert_eq!(
        files_in(&got),
        ["coarse_label_names.txt", "fine_label_names.txt", "train.bin"]
    );
    assert_eq!(files_in(dir.path()), ["cifar-100-binary", "cifar-100-binary.tar.gz"]);
    // Present now: nothing is downloaded again (the server has no response left).
    assert_eq!(
        fetch::ensure(dir.path(), &spec, Some(&url), |_, _| panic!("downloads")).unwrap(),
        got
    );
}

#[test]
fn a_wrong_archive_or_a_broken_connection_leaves_nothing_extracted() {
    let wrong = tar_gz(&[("cifar-100-binary/train.bin", b"something else")]);
    let big = vec![7u8; 40_000];
    let small = vec![9u8; 10_000];
    let url = serve(vec![
        (wrong.clone(), wrong.len()),
        (big.clone(), 20_000),
        (small.clone(), 3_000),
        (wrong.clone(), wrong.len()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let archive_url = format!("{url}/cifar-100-binary.tar.gz");
    let fetch_cmd = [
        "data",
        "fetch",
        "--dataset",
        "cifar100",
        "--dir",
        d,
        "--url",
        archive_url.as_str(),
    ];

    // The wrong archive: refused by its MD5, nothing extracted, nothing kept.
    let (code, _, err) = common::cli(&fetch_cmd);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&archive_url)
            && err.contains("expected 03b5dce01913d631647c71ecec9e9cb8")
            && err.contains("nothing extracted"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(files_in(dir.path()).is_empty(), "{:?}", files_in(dir.path()));

    // A connection that drops halfway: a clear error, and only the .part file.
    let (code, _, err) = common::cli(&fetch_cmd);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("could not download") && err.contains(&archive_url),
        "{err}"
    );
    assert_eq!(files_in(dir.path()), ["cifar-100-binary.tar.gz.part"]);
    let part = dir.path().join("cifar-100-binary.tar.gz.part");
    assert_eq!(std::fs::read(&part).unwrap(), big[..20_000]);

    // The next attempt starts the .part file again instead of appending to it.
    let (code, _, err) = common::cli(&fetch_cmd);
    assert_eq!(code, 2, "{err}");
    assert_eq!(std::fs::read(&part).unwrap(), small[..3_000]);

    // `train` without --data fetches CIFAR-10 through RESNET_CIFAR_MIRROR (base URL + file name).
    let work = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_resnet-cifar"))
        .args(["train", "--max-steps", "1"])
        .current_dir(work.path())
        .env(fetch::MIRROR_VAR, format!("{url}/mirror/"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{url}/mirror/cifar-10-binary.tar.gz"))
            && err.contains("expected c32a1d4ab5d03f1284b67883e8d87530"),
        "{err}"
    );
    assert!(!work.path().join("data/cifar-10-batches-bin").exists());
}

/// A server that sends more than the archive's known size is cut off there: the download
/// fails naming the size, and no `.part` file is left (one that never stopped sending filled
/// 2.26 GB in 8 s before the limit).
#[test]
fn a_download_stops_at_the_archives_known_size() {
    let body = vec![7u8; 200_000];
    let spec = Archive {
        md5: md5_hex(&body[..1000]),
        bytes: 1000,
        ..fetch::CIFAR100
    };
    let url = serve(vec![(body.clone(), body.len())]);
    let dir = tempfile::tempdir().unwrap();
    let err = fetch::download(dir.path(), &spec, Some(&format!("{url}/big.tar.gz")), |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("more than the archive's 1000 bytes"), "{err}");
    assert_eq!(files_in(dir.path()), Vec::<String>::new(), "nothing left behind");
}
