//! Measured quality: how much a contribution, applied alone, lowers the consortium's held-out loss.
//!
//! `quality(Δᵢ) = (1/|L|) · Σ_{ℓ ∈ L} [ loss(base, ℓ) − loss(base + s·Δᵢ, ℓ) ]`
//!
//! where `L` is the set of held-out languages, `loss` is the mean next-byte cross-entropy in
//! nats per byte on the consortium's held-out text of that language (text no node trains on),
//! and `s` is the probe scale: by default `1/N` for a roster of N nodes, the share a delta gets
//! under equal weighting. Measuring the whole delta (`s = 1`) would score a local model that has
//! drifted towards its own language; at its fair share the score says whether the delta helps
//! the base at the size it can actually enter it. Positive means it helps the consortium on
//! average; it is measured by the coordinator and never taken from the node.

use std::collections::BTreeMap;

/// Held-out loss per language, in nats per byte.
pub type LossTable = BTreeMap<String, f64>;

/// The mean over languages of `base − candidate`; NaN if a language is missing or any loss is not
/// finite, so that the policy rejects it as unmeasurable.
pub fn measured_quality(base: &LossTable, candidate: &LossTable) -> f64 {
    if base.is_empty() || base.len() != candidate.len() {
        return f64::NAN;
    }
    let mut total = 0.0;
    for (language, b) in base {
        match candidate.get(language) {
            Some(c) if b.is_finite() && c.is_finite() => total += b - c,
            _ => return f64::NAN,
        }
    }
    total / base.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, f64)]) -> LossTable {
        pairs.iter().map(|(l, v)| (l.to_string(), *v)).collect()
    }

    #[test]
    fn mean_gain_over_languages() {
        let base = table(&[("de", 2.0), ("en", 1.5)]);
        let cand = table(&[("de", 1.5), ("en", 1.6)]);
        assert!((measured_quality(&base, &cand) - 0.2).abs() < 1e-12);
    }

    #[test]
    fn unmeasurable_when_incomplete_or_not_finite() {
        let base = table(&[("de", 2.0), ("en", 1.5)]);
        assert!(measured_quality(&base, &table(&[("de", 1.0)])).is_nan());
        assert!(measured_quality(&base, &table(&[("de", 1.0), ("fr", 1.0)])).is_nan());
        assert!(measured_quality(&base, &table(&[("de", f64::INFINITY), ("en", 1.0)])).is_nan());
        assert!(measured_quality(&LossTable::new(), &LossTable::new()).is_nan());
    }
}
