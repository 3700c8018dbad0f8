//! Measured quality: how much a contribution, applied alone at its fair share, lowers the
//! consortium's held-out loss — per language, and on average over languages.
//!
//! For every held-out language ℓ the coordinator measures the **relative gain** of the probe
//! `base + s·Δᵢ` (s: the probe scale, by default 1/N for a roster of N nodes, the share a delta
//! gets under equal weighting):
//!
//! `ρᵢℓ = (loss(base, ℓ) − loss(base + s·Δᵢ, ℓ)) / loss(base, ℓ)`
//!
//! where `loss` is the mean next-token cross-entropy on the consortium's held-out text of ℓ
//! (text no node trains on). A relative gain is a fraction of the language's own loss removed:
//! unit-free (nats or bits, per byte or per character give the same ratio on the same text), so a
//! language written with 3-byte characters, or one whose text is intrinsically harder, counts
//! as much as any other. The **quality** of a contribution is the mean of its relative gains over
//! languages. Both are measured by the coordinator, never taken from the node.

use std::collections::BTreeMap;

/// Held-out loss per language, in nats per byte (or per token of the model's own vocabulary).
pub type LossTable = BTreeMap<String, f64>;

/// Relative gain per language (a fraction: 0.01 is 1 % of the language's loss removed).
pub type Gains = BTreeMap<String, f64>;

/// `(base − candidate) / base` for every language; `None` if a language is missing, a loss is not
/// finite or a base loss is not positive, so that the policy rejects the candidate as unmeasurable.
pub fn relative_gains(base: &LossTable, candidate: &LossTable) -> Option<Gains> {
    if base.is_empty() || base.len() != candidate.len() {
        return None;
    }
    base.iter()
        .map(|(language, &b)| {
            let &c = candidate.get(language)?;
            let gain = (b - c) / b;
            (b.is_finite() && c.is_finite() && b > 0.0 && gain.is_finite()).then(|| (language.clone(), gain))
        })
        .collect()
}

/// The mean of the relative gains over languages; NaN when they cannot be measured.
pub fn measured_quality(base: &LossTable, candidate: &LossTable) -> f64 {
    relative_gains(base, candidate).map_or(f64::NAN, |gains| mean(&gains))
}

/// The mean of a table's values (NaN when empty), summed in language order.
pub fn mean(table: &BTreeMap<String, f64>) -> f64 {
    if table.is_empty() {
        return f64::NAN;
    }
    table.values().sum::<f64>() / table.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, f64)]) -> LossTable {
        pairs.iter().map(|(l, v)| (l.to_string(), *v)).collect()
    }

    #[test]
    fn relative_gain_per_language_and_its_mean() {
        let base = table(&[("de", 2.0), ("ja", 6.0)]);
        let cand = table(&[("de", 1.5), ("ja", 6.3)]);
        let gains = relative_gains(&base, &cand).unwrap();
        assert!((gains["de"] - 0.25).abs() < 1e-12);
        assert!((gains["ja"] + 0.05).abs() < 1e-12);
        assert!((measured_quality(&base, &cand) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn the_unit_does_not_matter() {
        // The same text scored per byte or per character (×3 bytes/char, ÷ ln 2 for bits).
        let per_byte = (table(&[("ja", 2.1)]), table(&[("ja", 1.9)]));
        let factor = 3.0 / std::f64::consts::LN_2;
        let per_char = (table(&[("ja", 2.1 * factor)]), table(&[("ja", 1.9 * factor)]));
        let a = relative_gains(&per_byte.0, &per_byte.1).unwrap()["ja"];
        let b = relative_gains(&per_char.0, &per_char.1).unwrap()["ja"];
        assert!((a - b).abs() < 1e-12);
    }

    #[test]
    fn unmeasurable_when_incomplete_or_not_finite() {
        let base = table(&[("de", 2.0), ("en", 1.5)]);
        assert!(measured_quality(&base, &table(&[("de", 1.0)])).is_nan());
        assert!(measured_quality(&base, &table(&[("de", 1.0), ("fr", 1.0)])).is_nan());
        assert!(measured_quality(&base, &table(&[("de", f64::INFINITY), ("en", 1.0)])).is_nan());
        assert!(measured_quality(&LossTable::new(), &LossTable::new()).is_nan());
        assert!(relative_gains(&table(&[("de", 0.0)]), &table(&[("de", 0.0)])).is_none());
    }
}
