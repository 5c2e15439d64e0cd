//! Property tests: arbitrary and mutated bytes fed to the CIFAR reader and the checkpoint
//! reader never panic; each input is either accepted or refused with an error. Inputs come
//! from a seeded generator (reproducible), built around valid files so that the mutations
//! reach deep into the parsers: bit flips, truncations, extensions, spliced headers.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use resnet_cifar::checkpoint;
use resnet_cifar::data::cifar::{RECORD_BYTES, parse_records};
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::model::{ResNet, ResNetConfig, Stem};
use std::path::Path;

/// A mutation of `valid`: random bytes, a truncation, an extension, or flipped bytes.
fn mutate(rng: &mut ChaCha8Rng, valid: &[u8]) -> Vec<u8> {
    match rng.random_range(0..5) {
        0 => (0..rng.random_range(0..4 * valid.len().min(4096)))
            .map(|_| rng.random())
            .collect(),
        1 => valid[..rng.random_range(0..valid.len())].to_vec(),
        2 => {
            let mut v = valid.to_vec();
            v.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>()));
            v
        }
        3 => {
            // Flip bytes, mostly near the start where headers live.
            let mut v = valid.to_vec();
            for _ in 0..rng.random_range(1..8) {
                let span = if rng.random_bool(0.7) {
                    v.len().min(512)
                } else {
                    v.len()
                };
                let i = rng.random_range(0..span);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            v
        }
        _ => {
            // Overwrite a run with random bytes.
            let mut v = valid.to_vec();
            let at = rng.random_range(0..v.len());
            let len = rng.random_range(1..64).min(v.len() - at);
            for b in &mut v[at..at + len] {
                *b = rng.random();
            }
            v
        }
    }
}

fn no_panic<T, E>(what: &str, i: usize, f: impl FnOnce() -> Result<T, E> + std::panic::UnwindSafe) -> bool {
    match std::panic::catch_unwind(f) {
        Ok(r) => r.is_ok(),
        Err(_) => panic!("{what}: input {i} made the reader panic"),
    }
}

#[test]
fn cifar_reader_never_panics() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut valid = Vec::new();
    for i in 0..20u8 {
        valid.push(i % 10);
        valid.extend((0..RECORD_BYTES - 1).map(|_| rng.random::<u8>()));
    }
    let path = Path::new("fuzz.bin");
    assert!(parse_records(path, &valid, Some(20)).is_ok());
    let mut accepted = 0;
    for i in 0..3000 {
        let bytes = mutate(&mut rng, &valid);
        let expected = [None, Some(20)][i % 2];
        if no_panic("cifar", i, || parse_records(path, &bytes, expected)) {
            accepted += 1;
            // What is accepted is well-formed: whole records, labels below 10.
            let images = parse_records(path, &bytes, expected).unwrap();
            assert_eq!(images.pixels.len(), images.labels.len() * (RECORD_BYTES - 1));
            assert!(images.labels.iter().all(|&l| l < 10));
        }
    }
    eprintln!("cifar reader: {accepted} of 3000 mutated inputs accepted, the rest refused");
}

#[test]
fn checkpoint_reader_never_panics_or_loads_partly() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let cfg = ResNetConfig {
        stem: Stem::Seed,
        stages: 3,
        num_classes: 10,
        image_size: 32,
    };
    let mut model = ResNet::new(&Cpu::default(), cfg, 0);
    let valid = checkpoint::to_bytes(&checkpoint::state_dict(&Cpu::default(), &mut model), None);
    let before = checkpoint::to_bytes(&checkpoint::state_dict(&Cpu::default(), &mut model), None);
    let mut target = ResNet::new(&Cpu::default(), cfg, 1);
    let untouched = checkpoint::to_bytes(&checkpoint::state_dict(&Cpu::default(), &mut target), None);
    let (mut parsed, mut loaded) = (0, 0);
    for i in 0..1000 {
        let bytes = mutate(&mut rng, &valid);
        if no_panic("checkpoint parse", i, || checkpoint::parse("fuzz", &bytes)) {
            parsed += 1;
        }
        let ok = {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                checkpoint::load_bytes("fuzz", &bytes, &Cpu::default(), &mut target)
            }));
            result.unwrap_or_else(|_| panic!("checkpoint load: input {i} made the loader panic"))
        };
        if ok.is_ok() {
            loaded += 1;
            // Restore the reference weights for the next input.
            checkpoint::load_bytes("reference", &untouched, &Cpu::default(), &mut target).unwrap();
        } else if i % 50 == 0 {
            // Refused inputs change nothing (checked on a sample: a full comparison is slow).
            let now = checkpoint::to_bytes(&checkpoint::state_dict(&Cpu::default(), &mut target), None);
            assert!(now == untouched, "input {i}: a refused checkpoint changed the model");
        }
    }
    assert_eq!(valid, before);
    eprintln!("checkpoint reader: {parsed} of 1000 mutated files parsed, {loaded} loaded, the rest refused");
}
