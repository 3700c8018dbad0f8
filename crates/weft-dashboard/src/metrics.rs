//! `/metrics`: the consortium in Prometheus' text exposition format (version 0.0.4), derived
//! from committed state, so every scrape of the same state gives the same numbers.

use std::collections::BTreeMap;
use std::fmt::Write;

use weft_coordinator::ContributionRecord;

use crate::snapshot::Snapshot;
use crate::Verification;

/// Upper bounds (seconds) of the round-duration histogram's buckets.
const ROUND_BUCKETS: [f64; 12] = [1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0];
/// Upper bounds (seconds) of the aggregation- and intake-duration histograms' buckets.
const STEP_BUCKETS: [f64; 12] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

/// The exposition of `s`.
pub fn render(s: &Snapshot, verification: &Verification) -> String {
    let mut out = String::new();
    let closed = s.rounds.len() as f64;
    family(&mut out, "weft_rounds_closed_total", "counter", "Rounds closed.", &[(vec![], closed)]);
    family(
        &mut out,
        "weft_last_closed_round",
        "gauge",
        "The last closed round (0 before the first).",
        &[(vec![], s.head.round as f64)],
    );
    family(
        &mut out,
        "weft_round_open",
        "gauge",
        "1 while a round is open.",
        &[(vec![], if s.open.is_some() { 1.0 } else { 0.0 })],
    );

    let mut wire = 0u64;
    let mut update = 0u64;
    let mut intake = Vec::new();
    let closed_contributions = s.rounds.iter().flat_map(|r| r.record.contributions.iter());
    let open_contributions = s.open.iter().flat_map(|o| o.contributions.iter());
    let (by_decision, pending) = decisions(closed_contributions.clone().chain(open_contributions.clone()));
    for c in closed_contributions.chain(open_contributions) {
        wire += c.wire_bytes.unwrap_or(0);
        update += c.update_bytes.unwrap_or(0);
        if let Some(t) = c.timing {
            intake.push(t.intake_ms / 1e3);
        }
    }
    let samples: Vec<_> = by_decision.into_iter().map(|(d, n)| (vec![("decision", d)], n)).collect();
    family(
        &mut out,
        "weft_contributions_total",
        "counter",
        "Contributions decided, by decision: accepted, or the refusal's code.",
        &samples,
    );
    family(
        &mut out,
        "weft_contributions_pending",
        "gauge",
        "Contributions the open round has taken in and not yet decided.",
        &[(vec![], pending as f64)],
    );
    family(
        &mut out,
        "weft_received_wire_bytes_total",
        "counter",
        "Bytes of updates received over the network.",
        &[(vec![], wire as f64)],
    );
    family(
        &mut out,
        "weft_received_update_bytes_total",
        "counter",
        "Size of the updates received, as f32 values.",
        &[(vec![], update as f64)],
    );

    let round_seconds: Vec<f64> = s
        .rounds
        .iter()
        .filter_map(|r| {
            let t = r.record.timing?;
            Some(t.closed_unix_ms.saturating_sub(t.opened_unix_ms?) as f64 / 1e3)
        })
        .collect();
    histogram(
        &mut out,
        "weft_round_duration_seconds",
        "From a round's opening to its close (rounds that ran across a restart are not counted).",
        &ROUND_BUCKETS,
        &round_seconds,
    );
    let aggregation: Vec<f64> =
        s.rounds.iter().filter_map(|r| r.record.timing.map(|t| t.aggregation_ms / 1e3)).collect();
    histogram(
        &mut out,
        "weft_aggregation_duration_seconds",
        "Closing a round: deciding, aggregating, the per-language check and the gauntlet.",
        &STEP_BUCKETS,
        &aggregation,
    );
    histogram(
        &mut out,
        "weft_contribution_intake_duration_seconds",
        "Taking in one contribution: checks, measurement, storing the delta.",
        &STEP_BUCKETS,
        &intake,
    );

    let losses: Vec<_> = s
        .head
        .base_loss
        .iter()
        .filter(|(_, v)| v.is_finite())
        .map(|(l, v)| (vec![("language", l.clone())], *v))
        .collect();
    family(
        &mut out,
        "weft_heldout_loss_nats_per_byte",
        "gauge",
        "Held-out loss of the base in force, per language.",
        &losses,
    );
    family(
        &mut out,
        "weft_ledger_entries",
        "gauge",
        "Ledger entries that check (chain, hashes, signatures).",
        &[(vec![], s.entries.len() as f64)],
    );
    if let Some(ok) = verification.passed() {
        family(
            &mut out,
            "weft_ledger_verified",
            "gauge",
            "1 when the last full verification (replay included) passed, 0 when it failed.",
            &[(vec![], if ok { 1.0 } else { 0.0 })],
        );
    }
    if let Some((_, rows)) = s.reputation() {
        let samples: Vec<_> = rows
            .iter()
            .map(|r| (vec![("node", r.node.to_string()), ("topic", r.topic.clone())], r.reputation))
            .collect();
        family(&mut out, "weft_reputation", "gauge", "Reputation R per node and topic.", &samples);
    }
    let budgets = s.budgets();
    if !budgets.is_empty() {
        let spent: Vec<_> = budgets.iter().map(|b| (vec![("node", b.node.clone())], b.epsilon_total)).collect();
        let budget: Vec<_> = budgets.iter().map(|b| (vec![("node", b.node.clone())], b.budget)).collect();
        family(&mut out, "weft_privacy_epsilon_spent", "gauge", "Privacy loss ε charged to each node so far.", &spent);
        family(&mut out, "weft_privacy_epsilon_budget", "gauge", "Each node's privacy budget ε.", &budget);
    }
    out
}

/// Contributions by decision (`accepted` or a refusal's code), and how many are not decided yet.
/// Undecided ones are counted apart (a gauge): under a label of their own they would leave it when
/// the round closes, and a counter must never go down.
fn decisions<'a>(records: impl Iterator<Item = &'a ContributionRecord>) -> (BTreeMap<String, f64>, u64) {
    let mut by_decision: BTreeMap<String, f64> = BTreeMap::new();
    let mut pending = 0;
    for c in records {
        match (&c.reason, c.accepted) {
            (_, true) => *by_decision.entry("accepted".into()).or_default() += 1.0,
            (Some(code), false) => *by_decision.entry(code.as_str().into()).or_default() += 1.0,
            (None, false) => pending += 1,
        }
    }
    (by_decision, pending)
}

type Sample = (Vec<(&'static str, String)>, f64);

fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[Sample]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{} {}", label_set(labels), value_text(*value));
    }
}

fn histogram(out: &mut String, name: &str, help: &str, bounds: &[f64], values: &[f64]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for bound in bounds {
        let count = values.iter().filter(|v| **v <= *bound).count();
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {count}", value_text(*bound));
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", values.len());
    let _ = writeln!(out, "{name}_sum {}", value_text(values.iter().sum()));
    let _ = writeln!(out, "{name}_count {}", values.len());
}

fn label_set(labels: &[(&str, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape_label(v))).collect();
    format!("{{{}}}", parts.join(","))
}

/// A label value as the format requires: backslash, double quote and newline escaped.
fn escape_label(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

fn value_text(v: f64) -> String {
    match v {
        v if v.is_nan() => "NaN".into(),
        v if v == f64::INFINITY => "+Inf".into(),
        v if v == f64::NEG_INFINITY => "-Inf".into(),
        v => format!("{v}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Parses one histogram out of an exposition: (bucket bounds and counts, sum, count).
    fn parse_histogram(text: &str, name: &str) -> (Vec<(String, u64)>, f64, u64) {
        let mut buckets = Vec::new();
        let (mut sum, mut count) = (f64::NAN, u64::MAX);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (key, value) = line.rsplit_once(' ').expect("a sample is a name and a value");
            if let Some(rest) = key.strip_prefix(&format!("{name}_bucket{{le=\"")) {
                buckets.push((rest.trim_end_matches("\"}").to_string(), value.parse().expect("a count")));
            } else if key == format!("{name}_sum") {
                sum = value.parse().expect("a sum");
            } else if key == format!("{name}_count") {
                count = value.parse().expect("a count");
            }
        }
        (buckets, sum, count)
    }

    proptest! {
        #[test]
        fn histogram_buckets_are_cumulative_and_end_at_the_count(values in prop::collection::vec(0.0f64..10_000.0, 0..50)) {
            let mut out = String::new();
            histogram(&mut out, "h", "test", &ROUND_BUCKETS, &values);
            let (buckets, sum, count) = parse_histogram(&out, "h");
            prop_assert_eq!(buckets.len(), ROUND_BUCKETS.len() + 1);
            prop_assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1));
            prop_assert_eq!(buckets.last().map(|b| (b.0.as_str(), b.1)), Some(("+Inf", values.len() as u64)));
            prop_assert_eq!(count, values.len() as u64);
            prop_assert!((sum - values.iter().sum::<f64>()).abs() <= 1e-9 * sum.abs().max(1.0));
            for (bound, n) in &buckets[..ROUND_BUCKETS.len()] {
                let bound: f64 = bound.parse().unwrap();
                prop_assert_eq!(*n, values.iter().filter(|v| **v <= bound).count() as u64);
            }
        }
    }

    fn record(node: &str) -> ContributionRecord {
        let mut delta = weft_core::ModelState::new();
        delta.insert("w", weft_core::Tensor::new(vec![2], vec![0.1, 0.2]).unwrap());
        let contribution = weft_core::Contribution {
            node: weft_core::NodeId::new(node).unwrap(),
            round: 1,
            base_hash: weft_core::ContentHash([0; 32]),
            delta: weft_core::Delta::from_state(delta),
            token_count: 1,
            declared: BTreeMap::new(),
        };
        ContributionRecord::arrived(&contribution, None)
    }

    proptest! {
        /// Whatever the open round's contributions become when it closes, no decision's count
        /// goes down: `weft_contributions_total` stays a counter.
        #[test]
        fn decision_counts_never_go_down_when_a_round_closes(
            taken_in in prop::collection::vec(prop::option::of(0usize..3), 1..12),
            outcomes in prop::collection::vec(0usize..3, 12),
        ) {
            use weft_core::RejectionCode as Code;
            let codes = [Code::BelowFloor, Code::NonFinite, Code::CanaryOverfit];
            // Open: some refused at intake (their code), the others waiting for the close.
            let open: Vec<ContributionRecord> = taken_in
                .iter()
                .enumerate()
                .map(|(i, refused)| {
                    let mut r = record(&format!("node-{i}"));
                    r.reason = refused.map(|k| codes[k]);
                    r
                })
                .collect();
            // Closed: each waiting one accepted or refused.
            let closed: Vec<ContributionRecord> = open
                .iter()
                .zip(&outcomes)
                .map(|(r, outcome)| {
                    let mut r = r.clone();
                    if r.reason.is_none() {
                        match outcome {
                            0 => r.accepted = true,
                            k => r.reason = Some(codes[*k]),
                        }
                    }
                    r
                })
                .collect();
            let (before, pending) = decisions(open.iter());
            let (after, still_pending) = decisions(closed.iter());
            prop_assert_eq!(still_pending, 0);
            prop_assert_eq!(before.values().sum::<f64>() + pending as f64, after.values().sum::<f64>());
            for (decision, n) in &before {
                prop_assert!(after.get(decision).copied().unwrap_or(0.0) >= *n, "{} went down", decision);
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_set(&[("node", "a\"b\\c\nd".into())]), r#"{node="a\"b\\c\nd"}"#);
    }

    #[test]
    fn special_values_use_the_format_spelling() {
        assert_eq!(value_text(f64::INFINITY), "+Inf");
        assert_eq!(value_text(f64::NAN), "NaN");
        assert_eq!(value_text(2.5), "2.5");
        assert_eq!(value_text(3.0), "3");
    }
}
