//! The whitening initialisation against airbench's own code (`scripts/whitening_fixture.py`,
//! run in PyTorch, in float64, on the first 500 images of data_batch_1.bin).

mod common;

use resnet_cifar::data::{Cifar10, Normalization};
use resnet_cifar::nn::whiten::whitening_weights;

#[test]
fn whitening_matches_airbenchs_init() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/whitening.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let floats = |k: &str| -> Vec<f64> {
        fixture[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (want_values, want_weight) = (floats("eigenvalues"), floats("weight"));
    let data = Cifar10::load(&common::shared_dir().join("data/cifar10")).unwrap();
    // airbench's CIFAR-10 statistics.
    let norm = Normalization {
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2470, 0.2435, 0.2616],
    };
    let count = fixture["images"].as_u64().unwrap() as usize;
    let (weight, values) = whitening_weights(&data.train, &norm, count, 2, fixture["eps"].as_f64().unwrap());
    assert_eq!((weight.len(), values.len()), (288, 12));
    // Both in f64 (the mean and std are f32 constants on both sides).
    for (i, (got, want)) in values.iter().zip(&want_values).enumerate() {
        assert!(
            (got - want).abs() <= 1e-9 * want_values[0],
            "eigenvalue {i}: {got} vs {want}"
        );
    }
    // An eigenvector's sign is arbitrary (PyTorch's eigh and ours may differ): filter i is
    // airbench's or its negative, and filter 12 + i is then the other.
    for i in 0..12 {
        let (row, want) = (&weight[12 * i..12 * i + 12], &want_weight[12 * i..12 * i + 12]);
        let sign = if row.iter().zip(want).map(|(a, b)| *a as f64 * b).sum::<f64>() < 0.0 {
            -1.0
        } else {
            1.0
        };
        let norm_want = want.iter().map(|v| v * v).sum::<f64>().sqrt();
        let err = row
            .iter()
            .zip(want)
            .map(|(a, b)| (sign * *a as f64 - b).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(err <= 1e-6 * norm_want, "filter {i}: {row:?} vs {want:?}");
        let negative = &weight[12 * (12 + i)..12 * (13 + i)];
        assert!(
            negative.iter().zip(row).all(|(n, r)| *n == -r),
            "filter {} is filter {i}'s negative",
            12 + i
        );
    }
}
