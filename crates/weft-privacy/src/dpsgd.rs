//! DP-SGD's mechanism, for any trainer: records, Poisson sampling, per-record clipping and
//! Gaussian noise, from a stream only the node can reproduce.

use chacha20::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::accountant::{AccountingError, SubsampledGaussian};

/// Record-level DP-SGD as the consortium sets it for every node.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpSgd {
    /// Each record's gradient is scaled down to at most this L2 norm.
    pub clip_norm: f64,
    /// Noise standard deviation over `clip_norm`.
    pub noise_multiplier: f64,
    /// Probability that a record is in a step's batch.
    pub sample_rate: f64,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DpSgdError {
    #[error("clip norm must be a positive number, got {0}")]
    ClipNorm(f64),
    #[error(transparent)]
    Mechanism(#[from] AccountingError),
}

impl DpSgd {
    pub fn validate(&self) -> Result<(), DpSgdError> {
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(DpSgdError::ClipNorm(self.clip_norm));
        }
        self.mechanism().validate()?;
        Ok(())
    }

    /// What the accountant sees of one step.
    pub fn mechanism(&self) -> SubsampledGaussian {
        SubsampledGaussian { sample_rate: self.sample_rate, noise_multiplier: self.noise_multiplier }
    }
}

/// The consortium's differential-privacy rule: the mechanism every node trains with, the δ
/// every ε is stated at, and the ε no node may exceed over the consortium's life.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpRule {
    pub mechanism: DpSgd,
    pub delta: f64,
    /// Each node's budget: the composed ε of all its charged rounds may not exceed it.
    pub epsilon_budget: f64,
}

impl DpRule {
    pub fn validate(&self) -> Result<(), DpSgdError> {
        self.mechanism.validate()?;
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(AccountingError::Delta(self.delta).into());
        }
        if !(self.epsilon_budget.is_finite() && self.epsilon_budget > 0.0) {
            return Err(AccountingError::Epsilon(self.epsilon_budget).into());
        }
        Ok(())
    }

    /// The ε of `rounds` rounds of `steps` steps each, composed (the curves add, so this is
    /// the RDP of `rounds · steps` steps).
    pub fn spent(&self, rounds: u64, steps: u64) -> Result<crate::Spent, AccountingError> {
        crate::RdpCurve::of_steps(self.mechanism.mechanism(), rounds.saturating_mul(steps))?.epsilon(self.delta)
    }
}

/// The unit DP protects: disjoint spans of `record_len` items (bytes, tokens) of a corpus of
/// `len` items; the last may be shorter. A span of one item predicts nothing and is left out.
pub fn records(len: usize, record_len: usize) -> Vec<std::ops::Range<usize>> {
    let record_len = record_len.max(2);
    (0..len).step_by(record_len).map(|start| start..(start + record_len).min(len)).filter(|r| r.len() >= 2).collect()
}

/// The node's private randomness for one round: which records each step samples and the noise
/// it adds. Keyed by 32 secret bytes the node derives from its own key and the round, so the
/// coordinator — which knows the round's public seed — can neither replay the sampling nor
/// subtract the noise; the same node, key and round give the same stream (runs reproduce).
pub struct PrivateStream {
    rng: ChaCha20Rng,
    spare: Option<f64>,
}

impl PrivateStream {
    /// The stream for `round` of the node holding `secret`.
    pub fn new(secret: &[u8; 32], round: u64) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key("weft dp-sgd private stream v1");
        hasher.update(secret).update(&round.to_le_bytes());
        PrivateStream { rng: ChaCha20Rng::from_seed(*hasher.finalize().as_bytes()), spare: None }
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    fn open_unit(&mut self) -> f64 {
        ((self.rng.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Poisson sampling: the indices of `records` records, each kept with probability `rate`.
    pub fn sample(&mut self, records: usize, rate: f64) -> Vec<usize> {
        (0..records).filter(|_| self.open_unit() <= rate).collect()
    }

    /// A standard normal draw (Box–Muller, both halves used).
    pub fn gaussian(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let radius = (-2.0 * self.open_unit().ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * self.open_unit();
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }
}

/// One step's sum of clipped per-record gradients, then noised.
pub struct ClippedSum {
    sum: Vec<f64>,
    records: usize,
    clipped: usize,
    clip_norm: f64,
}

impl ClippedSum {
    pub fn new(params: usize, clip_norm: f64) -> Self {
        ClippedSum { sum: vec![0.0; params], records: 0, clipped: 0, clip_norm }
    }

    /// Adds one record's gradient scaled to norm ≤ C; returns its norm before clipping.
    pub fn add(&mut self, gradient: &[f32]) -> f64 {
        let norm = gradient.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>().sqrt();
        // A non-finite gradient contributes nothing rather than poisoning the sum.
        let scale = if !norm.is_finite() {
            0.0
        } else if norm > self.clip_norm {
            self.clipped += 1;
            self.clip_norm / norm
        } else {
            1.0
        };
        self.records += 1;
        if scale == 0.0 {
            return norm;
        }
        for (s, &g) in self.sum.iter_mut().zip(gradient) {
            *s += scale * f64::from(g);
        }
        norm
    }

    pub fn records(&self) -> usize {
        self.records
    }

    /// Records whose gradient was scaled down.
    pub fn clipped(&self) -> usize {
        self.clipped
    }

    /// (Σ clipped + N(0, σ²C²)) / expected batch size — the estimator whose sensitivity the
    /// accountant assumes (dividing by the sampled count would leak it).
    pub fn noised_mean(self, noise_multiplier: f64, expected_batch: f64, stream: &mut PrivateStream) -> Vec<f32> {
        let std = noise_multiplier * self.clip_norm;
        let divisor = expected_batch.max(f64::MIN_POSITIVE);
        self.sum.into_iter().map(|s| ((s + std * stream.gaussian()) / divisor) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_disjoint_and_cover_the_corpus() {
        let r = records(10, 4);
        assert_eq!(r, vec![0..4, 4..8, 8..10]);
        assert_eq!(records(9, 4), vec![0..4, 4..8]);
        assert!(records(0, 4).is_empty());
    }

    #[test]
    fn the_stream_depends_on_the_secret_and_the_round() {
        let draw = |secret: [u8; 32], round| {
            let mut s = PrivateStream::new(&secret, round);
            (0..4).map(|_| s.gaussian().to_bits()).collect::<Vec<_>>()
        };
        let key = [7u8; 32];
        assert_eq!(draw(key, 1), draw(key, 1));
        assert_ne!(draw(key, 1), draw(key, 2));
        let mut other = key;
        other[31] ^= 1;
        assert_ne!(draw(key, 1), draw(other, 1));
    }

    #[test]
    fn gaussian_and_sampling_have_the_right_moments() {
        let mut s = PrivateStream::new(&[1; 32], 0);
        let n = 200_000;
        let draws: Vec<f64> = (0..n).map(|_| s.gaussian()).collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|z| (z - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.01, "{mean} {var}");
        let picked = s.sample(100_000, 0.02).len();
        assert!((1800..2200).contains(&picked), "{picked}");
    }

    #[test]
    fn clipping_bounds_each_record() {
        let mut sum = ClippedSum::new(2, 1.0);
        assert_eq!(sum.add(&[3.0, 4.0]), 5.0);
        sum.add(&[0.3, 0.4]);
        sum.add(&[f32::NAN, 0.0]);
        assert_eq!((sum.records(), sum.clipped()), (3, 1));
        // Zero noise: the mean of (0.6, 0.8) and (0.3, 0.4) over an expected batch of 2.
        let mean = sum.noised_mean(0.0, 2.0, &mut PrivateStream::new(&[0; 32], 0));
        assert!((mean[0] - 0.45).abs() < 1e-6 && (mean[1] - 0.6).abs() < 1e-6, "{mean:?}");
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let good = DpSgd { clip_norm: 1.0, noise_multiplier: 1.0, sample_rate: 0.01 };
        assert_eq!(good.validate(), Ok(()));
        assert_eq!(DpSgd { clip_norm: 0.0, ..good }.validate(), Err(DpSgdError::ClipNorm(0.0)));
        assert!(matches!(
            DpSgd { sample_rate: 0.0, ..good }.validate(),
            Err(DpSgdError::Mechanism(AccountingError::SampleRate(_)))
        ));
    }
}
