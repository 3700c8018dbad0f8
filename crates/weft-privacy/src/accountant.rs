//! The Rényi-DP accountant of DP-SGD: the RDP of the Poisson-subsampled Gaussian mechanism at
//! integer and fractional orders (Mironov, Talwar, Zhang 2019, §3.3), composition by adding
//! curves, and the tight RDP → (ε, δ) conversion (Balle et al. 2020, Prop. 12; Asoodeh et al.
//! 2020, Eq. 20). It follows Google's `dp-accounting` 0.6.0 term for term, and the tests check it
//! against that package's values (tests/fixtures/rdp_reference.json, from bench/dp_reference.py).

use serde::{Deserialize, Serialize};

/// The orders every curve is kept at: `dp-accounting`'s default list (1.1 … 10.9 by tenths,
/// 11 … 63, 128, 256, 512, 1024), so that ε agrees with it for the same mechanism.
pub fn orders() -> &'static [f64] {
    static ORDERS: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    ORDERS.get_or_init(|| {
        let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
        orders.extend((11..64).map(f64::from));
        orders.extend([128.0, 256.0, 512.0, 1024.0]);
        orders
    })
}

/// A mechanism's parameters out of range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AccountingError {
    #[error("sampling rate must be in (0, 1], got {0}")]
    SampleRate(f64),
    #[error("noise multiplier must be a positive number, got {0}")]
    NoiseMultiplier(f64),
    #[error("delta must be in (0, 1), got {0}")]
    Delta(f64),
    #[error("epsilon must be a positive number, got {0}")]
    Epsilon(f64),
    #[error(
        "no noise multiplier up to {max} keeps {steps} steps at sampling rate {sample_rate} within epsilon {epsilon} (delta {delta})"
    )]
    Unreachable { epsilon: f64, delta: f64, sample_rate: f64, steps: u64, max: f64 },
}

/// ln(e^x + e^y).
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// ln |C(n, k)|, through ln |Γ| as scipy's `gammaln` gives it (so fractional `n` works too).
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// ln erfc(x), accurate at both ends: below 0, erfc(x) = 2 − erfc(−x) and the tiny part must
/// survive (the RDP is ln A / (α − 1) with A ≈ 1, so it is all that matters); where erfc
/// underflows or goes subnormal, the asymptotic series at infinity.
fn log_erfc(x: f64) -> f64 {
    if x < 0.0 {
        return std::f64::consts::LN_2 + (-0.5 * libm::erfc(-x)).ln_1p();
    }
    let r = libm::erfc(x);
    // Subnormal results have lost their precision (from x ≈ 26.6).
    if r >= f64::MIN_POSITIVE {
        return r.ln();
    }
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x * x - 0.5 * x.powi(-2) + 0.625 * x.powi(-4) - 37.0 / 24.0 * x.powi(-6)
        + 353.0 / 64.0 * x.powi(-8)
}

fn log_a_integer(q: f64, sigma: f64, alpha: u64) -> f64 {
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let alpha_f = alpha as f64;
    (0..=alpha).fold(f64::NEG_INFINITY, |log_a, i| {
        let i = i as f64;
        let term = log_comb(alpha_f, i) + i * log_q + (alpha_f - i) * log_1mq + (i * i - i) / (2.0 * sigma * sigma);
        log_add(log_a, term)
    })
}

/// As `dp-accounting`: give up after this many terms and leave the order out (∞).
const MAX_FRACTIONAL_TERMS: u32 = 1000;

fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for i in 0..MAX_FRACTIONAL_TERMS {
        let i = f64::from(i);
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * log_q + j * log_1mq;
        let log_t1 = log_coef + j * log_q + i * log_1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / (std::f64::consts::SQRT_2 * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * sigma));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// RDP at order `alpha` of one step of the Gaussian mechanism with noise multiplier `sigma` on a
/// Poisson sample of rate `q`. ∞ where the series does not converge (that order is then useless).
pub fn subsampled_gaussian_rdp(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if alpha.is_infinite() || sigma == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a =
        if alpha.fract() == 0.0 { log_a_integer(q, sigma, alpha as u64) } else { log_a_fractional(q, sigma, alpha) };
    log_a / (alpha - 1.0)
}

/// DP-SGD's parameters: what the accountant needs to know about one node's local training.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubsampledGaussian {
    /// Probability that each record is in a step's batch (Poisson sampling).
    pub sample_rate: f64,
    /// Noise standard deviation over the clipping norm.
    pub noise_multiplier: f64,
}

impl SubsampledGaussian {
    pub fn validate(&self) -> Result<(), AccountingError> {
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err(AccountingError::SampleRate(self.sample_rate));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(AccountingError::NoiseMultiplier(self.noise_multiplier));
        }
        Ok(())
    }
}

/// RDP at every one of [`orders`]: a privacy loss that composes by addition.
#[derive(Clone, Debug, PartialEq)]
pub struct RdpCurve(Vec<f64>);

/// An (ε, δ) guarantee and the order that gave it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    pub epsilon: f64,
    pub delta: f64,
    pub order: f64,
}

impl RdpCurve {
    /// No privacy spent.
    pub fn zero() -> Self {
        RdpCurve(vec![0.0; orders().len()])
    }

    /// `steps` steps of a subsampled Gaussian.
    pub fn of_steps(mechanism: SubsampledGaussian, steps: u64) -> Result<Self, AccountingError> {
        mechanism.validate()?;
        if steps == 0 {
            // Not ∞ · 0 at the orders whose series did not converge.
            return Ok(Self::zero());
        }
        Ok(RdpCurve(
            orders()
                .iter()
                .map(|&alpha| {
                    subsampled_gaussian_rdp(mechanism.sample_rate, mechanism.noise_multiplier, alpha) * steps as f64
                })
                .collect(),
        ))
    }

    /// Sequential composition: the curves add.
    pub fn compose(&mut self, other: &RdpCurve) {
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            *mine += theirs;
        }
    }

    pub fn values(&self) -> &[f64] {
        &self.0
    }

    /// The smallest ε over the orders for this δ, by the tight conversion.
    pub fn epsilon(&self, delta: f64) -> Result<Spent, AccountingError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(AccountingError::Delta(delta));
        }
        let mut best = Spent { epsilon: f64::INFINITY, delta, order: orders()[0] };
        for (&alpha, &rdp) in orders().iter().zip(&self.0) {
            let epsilon = if rdp < 0.0 || delta * delta + (-rdp).exp_m1() > 0.0 {
                // Bounded through the KL divergence: δ ≤ sqrt(1 − e^−KL).
                0.0
            } else if alpha > 1.01 {
                rdp + (-1.0 / alpha).ln_1p() - (delta * alpha).ln() / (alpha - 1.0)
            } else {
                f64::INFINITY
            };
            // Strictly smaller: the first order wins ties, as numpy's argmin.
            if epsilon < best.epsilon {
                best = Spent { epsilon, delta, order: alpha };
            }
        }
        best.epsilon = best.epsilon.max(0.0);
        Ok(best)
    }
}

/// The smallest noise multiplier (to 0.1 %) that keeps `steps` steps at `sample_rate` within
/// `epsilon` at `delta` — how `--epsilon 8` becomes a σ before the first round.
pub fn calibrate_noise(epsilon: f64, delta: f64, sample_rate: f64, steps: u64) -> Result<f64, AccountingError> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(AccountingError::Epsilon(epsilon));
    }
    let spent = |sigma: f64| -> Result<f64, AccountingError> {
        Ok(RdpCurve::of_steps(SubsampledGaussian { sample_rate, noise_multiplier: sigma }, steps)?
            .epsilon(delta)?
            .epsilon)
    };
    const MAX: f64 = 1000.0;
    let (mut low, mut high) = (0.01, MAX);
    if spent(high)? > epsilon {
        return Err(AccountingError::Unreachable { epsilon, delta, sample_rate, steps, max: MAX });
    }
    if spent(low)? <= epsilon {
        return Ok(low);
    }
    // ε falls as σ grows: bisect in the log of σ until the bracket is 0.1 % wide.
    while high / low > 1.001 {
        let mid = (low * high).sqrt();
        if spent(mid)? <= epsilon {
            high = mid;
        } else {
            low = mid;
        }
    }
    Ok(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_sampling_is_the_plain_gaussian() {
        for alpha in [2.0, 3.5, 32.0] {
            assert_eq!(subsampled_gaussian_rdp(1.0, 2.0, alpha), alpha / 8.0);
        }
        assert_eq!(subsampled_gaussian_rdp(0.0, 2.0, 4.0), 0.0);
    }

    #[test]
    fn integer_and_fractional_series_agree_where_they_meet() {
        // The fractional series evaluated just off an integer order lands next to the integer sum.
        let (q, sigma) = (0.01, 1.1);
        let at_8 = subsampled_gaussian_rdp(q, sigma, 8.0);
        let near = subsampled_gaussian_rdp(q, sigma, 8.0 + 1e-9);
        assert!((at_8 - near).abs() < 1e-7 * at_8, "{at_8} vs {near}");
    }

    #[test]
    fn composition_adds_and_spends_more() {
        let m = SubsampledGaussian { sample_rate: 0.02, noise_multiplier: 1.0 };
        let mut two = RdpCurve::of_steps(m, 30).unwrap();
        two.compose(&RdpCurve::of_steps(m, 30).unwrap());
        assert_eq!(two, RdpCurve::of_steps(m, 60).unwrap());
        let one = RdpCurve::of_steps(m, 30).unwrap().epsilon(1e-5).unwrap().epsilon;
        let both = two.epsilon(1e-5).unwrap().epsilon;
        // Sub-additive in ε: composing curves beats adding ε's.
        assert!(one < both && both < 2.0 * one, "{one} {both}");
        assert_eq!(RdpCurve::zero().epsilon(1e-5).unwrap().epsilon, 0.0);
    }

    #[test]
    fn calibration_lands_on_the_budget() {
        let (epsilon, delta, q, steps) = (8.0, 1e-5, 0.02, 30);
        let sigma = calibrate_noise(epsilon, delta, q, steps).unwrap();
        let at = |s: f64| {
            RdpCurve::of_steps(SubsampledGaussian { sample_rate: q, noise_multiplier: s }, steps)
                .unwrap()
                .epsilon(delta)
                .unwrap()
                .epsilon
        };
        assert!(at(sigma) <= epsilon);
        assert!(at(sigma / 1.002) > epsilon, "σ {sigma} is not the smallest");
        assert!(matches!(calibrate_noise(-1.0, delta, q, steps), Err(AccountingError::Epsilon(_))));
    }

    #[test]
    fn bad_parameters_are_refused_by_name() {
        let bad = SubsampledGaussian { sample_rate: 1.5, noise_multiplier: 1.0 };
        assert_eq!(RdpCurve::of_steps(bad, 1), Err(AccountingError::SampleRate(1.5)));
        let bad = SubsampledGaussian { sample_rate: 0.1, noise_multiplier: f64::NAN };
        assert!(matches!(RdpCurve::of_steps(bad, 1), Err(AccountingError::NoiseMultiplier(_))));
        assert_eq!(RdpCurve::zero().epsilon(0.0), Err(AccountingError::Delta(0.0)));
    }
}
