//! PyTorch's GELU in its default, exact form (`approximate='none'`): `x * Phi(x)`, with
//! `Phi(x) = (1 + erf(x / sqrt 2)) / 2` the standard normal's distribution function.
//!
//! Computed branch-free from `erfc` (Numerical Recipes' `erfcc`, relative error below 1.2e-7
//! for every argument) and a polynomial `exp` (Cephes' `expf`), so that the loops over a layer's
//! values vectorise: libm's scalar `erfcf` took 30% of a training step of airbench's network.
//! Below zero, `Phi(x) = erfc(-x / sqrt 2) / 2` keeps its relative precision far into the tail
//! (`1 + erf` in f32 keeps 12 bits at x = -3), and the exponent `x^2 / 2` is carried as an
//! exact sum of two floats, so the whole stays within a few f32 roundings of the exact value.

/// 1 / sqrt(2 pi): the standard normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `e^(a + b)` within 2 ulp of the exact sum's, NaN passing; 0 below -87 and capped above 88. The sum is never rounded: `a` (large) is reduced by a multiple of ln 2 first, and
/// `b` (small) added to the remainder.
#[inline(always)]
fn exp_sum(a: f32, b: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: n * LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and taking away 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let sum = a + b;
    let shifted = sum.clamp(-87.0, 88.0) * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, a) + b);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5e-1);
    let e = p.mul_add(r * r, r) + 1.0;
    // 2^n built from n's bits in `shifted` (its low mantissa bits hold n): a float-to-integer
    // `as` saturates, which the compiler does one lane at a time.
    let biased = shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let y = f32::from_bits(biased.wrapping_shl(23)) * e;
    if sum < -87.0 { 0.0 } else { y }
}

/// `exp(-x^2 / 2)` with `x^2 / 2` as the exact sum `hi + lo` (the error of f32's `x * x` taken
/// back by a fused multiply-add): its relative precision does not fall as x grows.
#[inline(always)]
fn exp_neg_half_square(x: f32, extra: f32) -> f32 {
    // Beyond 20 the value is 0 in f32 anyway; the clamp keeps x * x finite (NaN stays NaN).
    let x = x.clamp(-20.0, 20.0);
    let hi = x * x;
    let lo = x.mul_add(x, -hi);
    exp_sum(-0.5 * hi, extra) * (1.0 - 0.5 * lo)
}

/// Phi(x): `erfc(|x| / sqrt 2) / 2` below 0, one minus it above.
#[inline(always)]
fn cdf(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / 0.5f32.mul_add(z, 1.0);
    let mut p = 0.170_872_77f32;
    for c in [
        -0.822_152_23,
        1.488_515_9,
        -1.135_204,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
    ] {
        p = p.mul_add(t, c);
    }
    let p = p.mul_add(t, -1.265_512_2);
    let tail = 0.5 * t * exp_neg_half_square(x, p);
    if x < 0.0 { tail } else { 1.0 - tail }
}

/// GELU(x).
#[inline(always)]
pub fn forward(x: f32) -> f32 {
    x * cdf(x)
}

/// dGELU/dx = Phi(x) + x * phi(x), as PyTorch's `gelu_backward`.
#[inline(always)]
pub fn slope(x: f32) -> f32 {
    let pdf = FRAC_1_SQRT_2PI * exp_neg_half_square(x, 0.0);
    x.mul_add(pdf, cdf(x))
}

/// `y = GELU(x)` over a slice.
pub fn forward_slice(x: &[f32], y: &mut [f32]) {
    super::wide::run(
        #[inline(always)]
        || {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = forward(x);
            }
        },
    )
}

/// `dx = dy * GELU'(x)` over slices.
pub fn backward_slice(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    super::wide::run(
        #[inline(always)]
        || {
            for ((d, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
                *d = g * slope(x);
            }
        },
    )
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

    /// The loops over slices (compiled for AVX-512 where the CPU has it, `wide.rs`) give the
    /// bits of the scalar functions, compiled for the crate's baseline, on every value of the
    /// grid below and on the edge cases; lengths that leave a partial vector at the end.
    #[test]
    fn gelu_over_slices_gives_the_scalar_bits() {
        #[cfg(target_arch = "x86_64")]
        if !std::arch::is_x86_feature_detected!("avx512f") {
            println!("no AVX-512F on this CPU: the slice loops run the baseline code checked here");
        }
        let mut x: Vec<f32> = (-1000..=1000).map(|i| i as f32 / 64.0 + 0.003).collect();
        x.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -1e30,
            1e30,
            0.0,
            -0.0,
            88.5,
            -88.5,
        ]);
        let dy: Vec<f32> = (0..x.len()).map(|i| (i as f32 * 0.37).sin()).collect();
        let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        super::forward_slice(&x, &mut y);
        super::backward_slice(&x, &dy, &mut dx);
        for i in 0..x.len() {
            let (want, want_dx) = (super::forward(x[i]), dy[i] * super::slope(x[i]));
            assert_eq!(y[i].to_bits(), want.to_bits(), "GELU({}) {} vs {}", x[i], y[i], want);
            assert_eq!(
                dx[i].to_bits(),
                want_dx.to_bits(),
                "GELU'({}) {} vs {}",
                x[i],
                dx[i],
                want_dx
            );
        }
    }

    /// Over every f32 step of 1/64 from -12 to 12: GELU within 1e-6 of its exact value
    /// (relative, or absolute below 1e-30) and its slope within 3e-7, against f64 erfc and exp.
    #[test]
    fn gelu_is_within_a_few_roundings_everywhere() {
        let (mut worst, mut worst_slope) = (0f64, 0f64);
        for i in -768..=768 {
            let x = i as f32 / 64.0;
            let xd = x as f64;
            let phi = 0.5 * libm::erfc(-xd / std::f64::consts::SQRT_2);
            let (y, dy) = (
                xd * phi,
                phi + xd * (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt(),
            );
            let got = super::forward(x) as f64;
            worst = worst.max((got - y).abs() / y.abs().max(1e-30));
            worst_slope = worst_slope.max((super::slope(x) as f64 - dy).abs());
        }
        assert!(worst < 1e-6, "GELU's largest relative error {worst:.2e}");
        assert!(worst_slope < 3e-7, "GELU slope's largest error {worst_slope:.2e}");
        // Far out: the exact values, as PyTorch gives them (GELU(-inf) is NaN there too).
        for (x, y, dy) in [(-30.0f32, 0.0f32, 0.0f32), (-1e30, 0.0, 0.0), (1e30, 1e30, 1.0)] {
            assert_eq!((super::forward(x), super::slope(x)), (y, dy), "at {x}");
        }
        assert!(super::forward(f32::NEG_INFINITY).is_nan());
        assert_eq!(super::forward(f32::INFINITY), f32::INFINITY);
        assert!(
            super::slope(f32::INFINITY).is_nan(),
            "1 + inf * 0, as PyTorch's backward"
        );
    }
}
