//! `exp` and `tanh` for the trainer's softmax and GELU, written with `+ − × ÷` only.
//!
//! Why not the platform's `expf`/`tanhf`: their last bit may differ between C libraries and
//! their versions, and they are calls the compiler cannot vectorise (they were a third of the
//! trainer's time). These are branch-free, so a loop over them vectorises, and every operation
//! is an exactly rounded IEEE operation (Rust never fuses them), so they give the same bits on
//! every machine.

use std::f32::consts::LOG2_E;

/// 1.5 · 2²³: adding it rounds a float of magnitude below 2²² to an integer (ties to even),
/// and the integer can be read from the sum's low bits.
const ROUND: f32 = 12_582_912.0;
/// ln 2 split in two, so that `x − n·ln 2` loses nothing for |n| ≤ 128 (Cody–Waite).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// eˣ to within about 1 ulp, for x ≤ 88.3. Larger x give about 2.3e38 (finite) instead of
/// infinity, and x below −87.3 give about 1.2e-38 instead of a subnormal or zero: the trainer's
/// callers take exp of values ≤ 0 (softmax) or feed it to `tanh`, where neither matters.
/// NaN gives NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Cephes' minimax polynomial for eʳ on |r| ≤ ln2/2.
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * (r * r) + r + 1.0;
    // 2ⁿ from n's bits: the low bits of `shifted` hold n in two's complement.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    er * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// tanh x as 1 − 2/(e²ˣ + 1): accurate to about 1e-7 *absolute*, which is what GELU needs (it
/// adds the result to 1). Near 0 its relative error is larger than a correctly rounded tanh's.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_correctly_rounded_value() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = f64::from(x).exp();
            let got = f64::from(exp(x));
            let ulp = f64::from(f32::EPSILON) * exact;
            assert!((got - exact).abs() <= 2.0 * ulp, "exp({x}) = {got}, want {exact}");
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
    }

    #[test]
    fn tanh_is_within_an_absolute_1e7() {
        let mut x = -20.0f32;
        while x < 20.0 {
            let exact = f64::from(x).tanh();
            assert!((f64::from(tanh(x)) - exact).abs() < 2e-7, "tanh({x})");
            x += 0.00731;
        }
        assert_eq!(tanh(100.0), 1.0);
        assert_eq!(tanh(-100.0), -1.0);
        assert!(tanh(f32::NAN).is_nan());
    }
}
