//! PyTorch's GELU in its default, exact form (`approximate='none'`): `x * Phi(x)`, with
//! `Phi(x) = (1 + erf(x / sqrt 2)) / 2` the standard normal's distribution function.

use std::f32::consts::FRAC_1_SQRT_2;

/// 1 / sqrt(2 pi): the standard normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// Phi(x), as `erfc(-x / sqrt 2) / 2`: the same as `(1 + erf(x / sqrt 2)) / 2` without its
/// cancellation for negative x (f32's `1 + erf` keeps 12 bits at x = -3).
#[inline]
fn cdf(x: f32) -> f32 {
    0.5 * libm::erfcf(-x * FRAC_1_SQRT_2)
}

/// GELU(x).
#[inline]
pub fn forward(x: f32) -> f32 {
    x * cdf(x)
}

/// dGELU/dx = Phi(x) + x * phi(x), as PyTorch's `gelu_backward`.
#[inline]
pub fn slope(x: f32) -> f32 {
    let pdf = FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
    cdf(x) + x * pdf
}

#[cfg(test)]
mod tests {
    /// GELU and its slope at a few points against their values in f64 (Python's `math.erf`),
    /// within f32's reach (an f32 `x / sqrt 2` alone moves `Phi(-3)` by 5e-7 of itself).
    #[test]
    fn gelu_matches_the_exact_values() {
        for (x, y, dy) in [
            (-3.0f32, -0.004_049_694_094_890_31f64, -0.011_945_647_204_183_92f64),
            (-1.0, -0.158_655_253_931_457_07, -0.083_315_470_587_686_29),
            (-0.5, -0.154_268_769_362_993_44, 0.132_504_875_343_837_12),
            (0.0, 0.0, 0.5),
            (0.5, 0.345_731_230_637_006_56, 0.867_495_124_656_162_9),
            (1.0, 0.841_344_746_068_542_9, 1.083_315_470_587_686_4),
            (3.0, 2.995_950_305_905_11, 1.011_945_647_204_184),
        ] {
            let (got, slope) = (super::forward(x) as f64, super::slope(x) as f64);
            assert!(
                (got - y).abs() <= 1e-6 * y.abs().max(1e-3),
                "gelu({x}) = {got}, not {y}"
            );
            assert!((slope - dy).abs() <= 2e-7, "gelu'({x}) = {slope}, not {dy}");
        }
        assert!(super::forward(f32::NAN).is_nan() && super::slope(f32::NAN).is_nan());
    }
}
