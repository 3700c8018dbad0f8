//! The consortium's rules for one round: which contributions are admitted (a floor), how they
//! are weighted (by measured quality, equally, or Tapestry's declared baseline), a per-node cap
//! that is never exceeded, a quorum, and how the consortium's languages are treated
//! ([`Fairness`]).
//!
//! Weights are computed by water-filling: each accepted node gets `min(cap, t · sᵢ)` where `sᵢ` is
//! its score and `t` is the largest level with `Σ wᵢ ≤ 1`. When fewer than ⌈1/cap⌉ nodes are
//! accepted every node sits at the cap and the weights sum to less than one: the unassigned share
//! stays with the current base.
//!
//! ## Every language gains (the default fairness)
//!
//! A consortium is made of languages, and a round must not trade one away. Each contribution's
//! relative gain per held-out language (see [`crate::quality`]) is the input:
//!
//! 1. **Admission**: a contribution that gains at least the floor on *some* language has
//!    something to offer; one that gains nothing anywhere (a sign flip, noise, a free rider) is
//!    refused. Admission does not average over languages: a node whose language is far from the
//!    others' is not refused for the harm its delta alone would do to them (that stalled a
//!    nine-language consortium: every Latin-script delta "harmed" Japanese and Chinese on average).
//! 2. **Language-balanced weights**: every language ℓ owns a share `λℓ / Σλ` of the step (its
//!    *priority*; all equal to start with), and splits it among the contributions in proportion to
//!    how much each helps that language (positive gains only). A contribution's score is the sum
//!    of its shares. A node that helps only its own language can win at most that language's
//!    share, however large its gain there; a node that helps many languages earns from each.
//!    Scores are then water-filled under the cap.
//! 3. **The per-language check** ([`crate::language_check`], run by the coordinator): the
//!    round's candidate base is measured before it is published. If any language's held-out loss
//!    would rise by more than `tolerance` (relative), the languages that rose get priority — in
//!    proportion to how far they rose — and the candidate is measured again, the priority found
//!    by a bracket and bisection search; if no priority helps, the step is halved, down to 1/16.
//!    If no candidate passes, the base stays (`language_regression`). Every candidate is
//!    recorded in the ledger.
//!
//! Why a selfish node cannot game it: its weight comes only from the coordinator's measurements
//! (never from what it declares); it can take no more than its own language's share; what its
//! delta does to the other languages is measured on the candidate base, and any language it pushes
//! back beyond the tolerance gains priority — its helpers' weight rises, the selfish node's falls.
//! The cap and the unassigned share are untouched: every weight is still water-filled under the
//! cap, a halved step leaves the other half with the base, and the round's unassigned share is
//! `1 − Σ` what the deltas carried.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::contribution::{NodeId, Rejection};
use crate::quality::Gains;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weighting {
    /// By the quality the coordinator measured (under every-language fairness: the
    /// language-balanced shares).
    Quality,
    /// The same for every accepted node.
    Equal,
    /// Tapestry's rule: proportional to the quality each node *declares* about itself, with the
    /// floor applied to that declaration. Unsafe by design (a node claiming 10⁹ takes the cap);
    /// kept only as a baseline to compare defences against.
    Declared,
}

/// How the policy treats the consortium's languages.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum Fairness {
    /// Languages are averaged: a contribution is admitted on its mean relative gain over
    /// languages and weighted by it; nothing is checked per language. (weft before every-language.)
    Mean,
    /// As `Mean`, with each score multiplied by `Lᵢ^q`, `Lᵢ` the current base's held-out loss on
    /// node i's own language: nodes of worse-off languages weigh more (q-FFL's reweighting, Li et
    /// al., "Fair Resource Allocation in Federated Learning", ICLR 2020; Flower's QFedAvg).
    QFedAvg { q: f64 },
    /// Every language gains (see the module documentation): admission on the best language,
    /// language-balanced weights, and a per-language check of the round's base with `tolerance`
    /// the largest relative rise of any language's held-out loss a round may cause.
    EveryLanguage { tolerance: f64 },
}

impl Fairness {
    /// The default: every language gains, a round may raise no language's loss by more than 0.5 %.
    pub const DEFAULT: Fairness = Fairness::EveryLanguage { tolerance: 0.005 };

    /// The per-language check's tolerance, when the rule has one.
    pub fn tolerance(&self) -> Option<f64> {
        match *self {
            Fairness::EveryLanguage { tolerance } => Some(tolerance),
            _ => None,
        }
    }
}

impl Default for Fairness {
    fn default() -> Self {
        Fairness::DEFAULT
    }
}

impl fmt::Display for Fairness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fairness::Mean => write!(f, "mean"),
            Fairness::QFedAvg { q } => write!(f, "q-fedavg:{q}"),
            Fairness::EveryLanguage { tolerance } => write!(f, "every-language:{tolerance}"),
        }
    }
}

impl FromStr for Fairness {
    type Err = PolicyError;
    fn from_str(spec: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::Fairness(spec.to_owned());
        let number = |s: &str| s.parse::<f64>().map_err(|_| bad());
        let rule = match spec.split(':').collect::<Vec<_>>().as_slice() {
            ["mean"] => Fairness::Mean,
            ["q-fedavg", q] => Fairness::QFedAvg { q: number(q)? },
            ["every-language"] => Fairness::DEFAULT,
            ["every-language", tolerance] => Fairness::EveryLanguage { tolerance: number(tolerance)? },
            _ => return Err(bad()),
        };
        rule.validate()?;
        Ok(rule)
    }
}

impl Fairness {
    pub fn validate(&self) -> Result<(), PolicyError> {
        match *self {
            Fairness::Mean => Ok(()),
            Fairness::QFedAvg { q } if q.is_finite() && (0.0..=20.0).contains(&q) => Ok(()),
            Fairness::EveryLanguage { tolerance } if tolerance.is_finite() && (0.0..1.0).contains(&tolerance) => Ok(()),
            _ => Err(PolicyError::Fairness(self.to_string())),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Minimum relative gain to be admitted: of the mean over languages, or (every-language) of
    /// the best language.
    pub floor: f64,
    /// Largest weight any one node may receive, in (0, 1].
    pub cap: f64,
    /// Share of the roster that must be accepted for the base to move, in [0, 1].
    pub quorum: f64,
    pub weighting: Weighting,
    #[serde(default)]
    pub fairness: Fairness,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("cap must be in (0, 1], got {0}")]
    Cap(f64),
    #[error("floor must be a finite number, got {0}")]
    Floor(f64),
    #[error("quorum must be in [0, 1], got {0}")]
    Quorum(f64),
    #[error("fairness rule {0:?}: expected mean, q-fedavg:Q (Q in [0, 20]) or every-language[:TOLERANCE] (TOLERANCE in [0, 1), e.g. 0.005 for 0.5 %)")]
    Fairness(String),
}

/// The outcome of one round's policy: who is in, with which weight, and why the others are out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub weights: BTreeMap<NodeId, f64>,
    pub rejected: BTreeMap<NodeId, Rejection>,
    /// Nodes whose weight was limited by the cap.
    pub capped: BTreeSet<NodeId>,
    /// `1 − Σ wᵢ`: the share of the step that stays with the current base.
    pub unassigned: f64,
}

/// One measured contribution, as the policy sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    pub node: NodeId,
    /// The mean relative gain over languages (for [`Weighting::Declared`]: what the node declared).
    pub quality: f64,
    /// The relative gain per language of its probe (empty when it could not be measured).
    pub gains: Gains,
    /// The current base's held-out loss on the node's own language (q-FedAvg's reweighting).
    pub own_loss: f64,
}

impl Decision {
    /// Moves every accepted node to the rejected, each with `reason(accepted, node)` (`accepted`:
    /// how many had been accepted): the base then stays bitwise unchanged.
    pub fn reject_all(&mut self, reason: impl Fn(usize) -> Rejection) {
        let accepted = self.weights.len();
        for node in std::mem::take(&mut self.weights).into_keys() {
            self.rejected.insert(node, reason(accepted));
        }
        self.capped.clear();
        self.unassigned = 1.0;
    }
}

impl Policy {
    /// A policy that averages languages ([`Fairness::Mean`]); see [`with_fairness`](Self::with_fairness).
    pub fn new(floor: f64, cap: f64, quorum: f64, weighting: Weighting) -> Result<Self, PolicyError> {
        let policy = Policy { floor, cap, quorum, weighting, fairness: Fairness::Mean };
        policy.validate()?;
        Ok(policy)
    }

    pub fn with_fairness(mut self, fairness: Fairness) -> Result<Self, PolicyError> {
        fairness.validate()?;
        self.fairness = fairness;
        Ok(self)
    }

    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(self.cap > 0.0 && self.cap <= 1.0) {
            return Err(PolicyError::Cap(self.cap));
        }
        if !self.floor.is_finite() {
            return Err(PolicyError::Floor(self.floor));
        }
        if !(0.0..=1.0).contains(&self.quorum) {
            return Err(PolicyError::Quorum(self.quorum));
        }
        self.fairness.validate()
    }

    /// Accepted contributions needed for the base to move: ⌈quorum · roster size⌉.
    pub fn required(&self, roster_size: usize) -> usize {
        // The epsilon keeps 0.5 · 4 = 2 from becoming 3 through rounding noise.
        (self.quorum * roster_size as f64 - 1e-9).ceil().max(0.0) as usize
    }

    /// Decides the weights from the measurements. The result does not depend on the order of
    /// `measured`; an id listed twice is rejected as a duplicate in every copy.
    pub fn decide(&self, measured: &[Measured], roster_size: usize) -> Decision {
        self.decide_with(measured, roster_size, &Priorities::new())
    }

    /// [`decide`](Self::decide) with the languages' priorities of the per-language check (a
    /// language missing from `priorities` has priority 1).
    pub fn decide_with(&self, measured: &[Measured], roster_size: usize, priorities: &Priorities) -> Decision {
        let mut decision = Decision::default();
        let mut seen = BTreeMap::<&NodeId, usize>::new();
        for m in measured {
            *seen.entry(&m.node).or_default() += 1;
        }
        let mut admitted: Vec<&Measured> = Vec::new();
        for m in measured {
            let verdict = if seen[&m.node] > 1 { Err(Rejection::DuplicateNode) } else { self.admit(m) };
            match verdict {
                Ok(()) => admitted.push(m),
                Err(reason) => {
                    decision.rejected.insert(m.node.clone(), reason);
                }
            }
        }
        // A fixed order: every sum below is then independent of arrival order.
        admitted.sort_by(|a, b| a.node.cmp(&b.node));
        let shares = match (self.fairness, self.weighting) {
            (Fairness::EveryLanguage { .. }, Weighting::Quality) => language_shares(&admitted, priorities),
            _ => BTreeMap::new(),
        };
        let scores: Vec<(f64, &NodeId)> = admitted
            .iter()
            .map(|m| {
                let score = match self.weighting {
                    Weighting::Equal => 1.0,
                    Weighting::Declared => m.quality,
                    Weighting::Quality => match self.fairness {
                        Fairness::EveryLanguage { .. } => shares.get(&m.node).copied().unwrap_or(0.0),
                        _ => m.quality,
                    },
                };
                let score = match self.fairness {
                    Fairness::QFedAvg { q } => score * m.own_loss.max(0.0).powf(q),
                    _ => score,
                };
                (score, &m.node)
            })
            .filter(|(score, _)| *score > 0.0 && score.is_finite())
            .collect();
        for m in &admitted {
            if !scores.iter().any(|(_, node)| *node == &m.node) {
                // Only possible with a degenerate own loss under q-FedAvg: no usable score.
                decision.rejected.insert(m.node.clone(), Rejection::Unmeasurable);
            }
        }
        let (weights, capped) = capped_weights(scores, self.cap);
        decision.unassigned = (1.0 - weights.values().sum::<f64>()).max(0.0);
        decision.weights = weights;
        decision.capped = capped;
        self.check_quorum(&mut decision, roster_size);
        decision
    }

    /// Whether one contribution may be weighed at all: its quality (or, under every-language, its
    /// best language's gain) must be measurable and reach the floor, and be positive when it is
    /// to carry a quality-proportional weight.
    fn admit(&self, m: &Measured) -> Result<(), Rejection> {
        if !m.quality.is_finite() {
            return Err(Rejection::Unmeasurable);
        }
        let positive_needed = self.weighting != Weighting::Equal;
        match self.fairness {
            Fairness::EveryLanguage { .. } if self.weighting != Weighting::Declared => {
                let Some((language, best)) = best_gain(&m.gains) else { return Err(Rejection::Unmeasurable) };
                if best < self.floor || (positive_needed && best <= 0.0) {
                    return Err(Rejection::NoLanguageGains { language, best, floor: self.floor });
                }
                Ok(())
            }
            _ => {
                if m.quality < self.floor {
                    Err(Rejection::BelowFloor { quality: m.quality, floor: self.floor })
                } else if positive_needed && m.quality <= 0.0 {
                    Err(Rejection::NonPositiveQuality { quality: m.quality })
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Fewer accepted than ⌈quorum · roster⌉: everyone is rejected (`quorum_not_met`) and the
    /// base stays unchanged. Applied after the policy and again after governance removed some.
    pub fn check_quorum(&self, decision: &mut Decision, roster_size: usize) {
        let required = self.required(roster_size);
        if decision.weights.len() < required {
            decision.reject_all(|accepted| Rejection::QuorumNotMet { accepted, required });
        }
    }
}

/// The language with the largest gain (ties: the first by name), if every gain is finite.
fn best_gain(gains: &Gains) -> Option<(String, f64)> {
    if gains.is_empty() || gains.values().any(|g| !g.is_finite()) {
        return None;
    }
    gains.iter().fold(None, |best: Option<(String, f64)>, (language, &g)| match best {
        Some((_, b)) if b >= g => best,
        _ => Some((language.clone(), g)),
    })
}

/// Each language's priority in the per-language check (1 when absent).
pub type Priorities = BTreeMap<String, f64>;

/// Every language's share `λℓ/Σλ` of the step, split among the contributions in proportion to
/// their positive gain on it; a contribution's score is the sum of its shares (`admitted` in node
/// order, languages in name order: the same bits whatever the arrival order).
fn language_shares(admitted: &[&Measured], priorities: &Priorities) -> BTreeMap<NodeId, f64> {
    let languages: BTreeSet<&String> = admitted.iter().flat_map(|m| m.gains.keys()).collect();
    let priority = |language: &String| priorities.get(language).copied().unwrap_or(1.0);
    let total_priority: f64 = languages.iter().map(|l| priority(l)).sum();
    let mut scores: BTreeMap<NodeId, f64> = admitted.iter().map(|m| (m.node.clone(), 0.0)).collect();
    if total_priority.is_nan() || total_priority <= 0.0 {
        return scores;
    }
    for language in languages {
        let helped = |m: &&Measured| m.gains.get(language).copied().unwrap_or(0.0).max(0.0);
        let total: f64 = admitted.iter().map(helped).sum();
        if total <= 0.0 {
            continue;
        }
        let share = priority(language) / total_priority;
        for m in admitted {
            if let Some(score) = scores.get_mut(&m.node) {
                *score += helped(m) / total * share;
            }
        }
    }
    scores
}

/// Water-filling: the largest nodes are pinned at the cap one by one until the rest, shared in
/// proportion to their scores, all fit under it. Scores must be positive and finite.
pub fn capped_weights(mut scores: Vec<(f64, &NodeId)>, cap: f64) -> (BTreeMap<NodeId, f64>, BTreeSet<NodeId>) {
    // A fixed order (score descending, then id) makes every sum, and so every bit, order-free.
    scores.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    let mut pinned = 0;
    loop {
        let rest = &scores[pinned..];
        let Some(&(top, _)) = rest.first() else { break };
        let mass = (1.0 - pinned as f64 * cap).max(0.0);
        let total: f64 = rest.iter().map(|(s, _)| s).sum();
        if top * mass / total > cap {
            pinned += 1;
        } else {
            break;
        }
    }
    let mass = (1.0 - pinned as f64 * cap).max(0.0);
    let rest_total: f64 = scores[pinned..].iter().map(|(s, _)| s).sum();
    let mut weights = BTreeMap::new();
    let mut capped = BTreeSet::new();
    for (i, (score, node)) in scores.iter().enumerate() {
        let w = if i < pinned {
            capped.insert((*node).clone());
            cap
        } else {
            (score * mass / rest_total).clamp(0.0, cap)
        };
        weights.insert((*node).clone(), w);
    }
    (weights, capped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contribution::RejectionCode;
    use proptest::prelude::*;

    fn id(i: usize) -> NodeId {
        NodeId::new(format!("n{i}")).unwrap()
    }

    /// Contributions measured only by their mean quality (what the `Mean` rule reads).
    fn scored(pairs: &[(NodeId, f64)]) -> Vec<Measured> {
        pairs
            .iter()
            .map(|(node, q)| Measured { node: node.clone(), quality: *q, gains: Gains::new(), own_loss: 1.0 })
            .collect()
    }

    fn policy(cap: f64) -> Policy {
        Policy::new(0.0, cap, 0.0, Weighting::Quality).unwrap()
    }

    #[test]
    fn floor_rejects_and_cap_holds() {
        let p = Policy::new(0.1, 0.5, 0.0, Weighting::Quality).unwrap();
        let d = p.decide(&scored(&[(id(0), 5.0), (id(1), 0.5), (id(2), 0.05), (id(3), 0.5)]), 4);
        assert_eq!(d.rejected[&id(2)].code(), RejectionCode::BelowFloor);
        assert_eq!(d.weights[&id(0)], 0.5);
        assert!((d.weights[&id(1)] - 0.25).abs() < 1e-12);
        assert!(d.capped.contains(&id(0)));
        assert!(d.unassigned.abs() < 1e-12);
    }

    #[test]
    fn infeasible_cap_is_never_exceeded() {
        // Tapestry gave 0.5/0.5 here, breaking its own cap of 0.4.
        let d = policy(0.4).decide(&scored(&[(id(0), 1.0), (id(1), 3.0)]), 2);
        assert_eq!(d.weights[&id(0)], 0.4);
        assert_eq!(d.weights[&id(1)], 0.4);
        assert!((d.unassigned - 0.2).abs() < 1e-12);
    }

    #[test]
    fn quorum_leaves_the_base_alone() {
        let p = Policy::new(0.0, 1.0, 0.75, Weighting::Equal).unwrap();
        assert_eq!(p.required(4), 3);
        assert_eq!(Policy::new(0.0, 1.0, 0.5, Weighting::Equal).unwrap().required(4), 2);
        let d = p.decide(&scored(&[(id(0), 1.0), (id(1), 1.0), (id(2), -1.0)]), 4);
        assert!(d.weights.is_empty());
        assert_eq!(d.unassigned, 1.0);
        assert_eq!(d.rejected[&id(0)].code(), RejectionCode::QuorumNotMet);
        assert_eq!(d.rejected[&id(2)].code(), RejectionCode::BelowFloor);
    }

    #[test]
    fn quality_weighting_needs_positive_quality_and_nan_is_unmeasurable() {
        let p = Policy::new(-1.0, 1.0, 0.0, Weighting::Quality).unwrap();
        let d = p.decide(&scored(&[(id(0), 0.0), (id(1), f64::NAN), (id(2), f64::INFINITY), (id(3), 0.2)]), 4);
        assert_eq!(d.rejected[&id(0)].code(), RejectionCode::NonPositiveQuality);
        assert_eq!(d.rejected[&id(1)].code(), RejectionCode::Unmeasurable);
        assert_eq!(d.rejected[&id(2)].code(), RejectionCode::Unmeasurable);
        assert_eq!(d.weights[&id(3)], 1.0);
    }

    #[test]
    fn duplicates_are_all_rejected() {
        let d = policy(1.0).decide(&scored(&[(id(0), 1.0), (id(0), 2.0), (id(1), 1.0)]), 3);
        assert_eq!(d.rejected[&id(0)].code(), RejectionCode::DuplicateNode);
        assert_eq!(d.weights[&id(1)], 1.0);
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert_eq!(Policy::new(0.0, 0.0, 0.0, Weighting::Equal), Err(PolicyError::Cap(0.0)));
        assert_eq!(Policy::new(0.0, 1.5, 0.0, Weighting::Equal), Err(PolicyError::Cap(1.5)));
        assert!(matches!(Policy::new(f64::NAN, 0.5, 0.0, Weighting::Equal), Err(PolicyError::Floor(_))));
        assert_eq!(Policy::new(0.0, 0.5, 1.1, Weighting::Equal), Err(PolicyError::Quorum(1.1)));
    }

    fn population() -> impl Strategy<Value = (Vec<f64>, f64, f64, bool)> {
        (
            prop::collection::vec(prop_oneof![-1.0..2.0f64, 1e-9..1e-6f64, Just(0.0), 1e3..1e9f64], 0..24),
            0.01..=1.0f64,
            -0.5..0.5f64,
            any::<bool>(),
        )
    }

    proptest! {
        #[test]
        fn weights_respect_every_invariant((qualities, cap, floor, equal) in population()) {
            let weighting = if equal { Weighting::Equal } else { Weighting::Quality };
            let p = Policy::new(floor, cap, 0.0, weighting).unwrap();
            let measured: Vec<_> = qualities.iter().enumerate().map(|(i, q)| (id(i), *q)).collect();
            let d = p.decide(&scored(&measured), measured.len());
            let sum: f64 = d.weights.values().sum();
            for (node, w) in &d.weights {
                prop_assert!(*w >= 0.0 && *w <= cap, "{node}: {w} > cap {cap}");
                prop_assert!(!d.rejected.contains_key(node));
            }
            prop_assert!(sum <= 1.0 + 1e-12);
            prop_assert_eq!(d.weights.len() + d.rejected.len(), measured.len());
            let accepted = d.weights.len();
            if accepted as f64 * cap >= 1.0 + 1e-9 {
                prop_assert!((sum - 1.0).abs() < 1e-9, "feasible but sum {}", sum);
            } else if accepted > 0 {
                prop_assert!((sum - accepted as f64 * cap).abs() < 1e-9);
            }
            prop_assert!((d.unassigned - (1.0 - sum).max(0.0)).abs() < 1e-15);
            for (i, q) in qualities.iter().enumerate() {
                if *q < floor || (!equal && *q <= 0.0) {
                    prop_assert!(!d.weights.contains_key(&id(i)));
                }
            }
        }

        #[test]
        fn weights_are_invariant_to_node_order((qualities, cap, floor, equal) in population(), seed in any::<u64>()) {
            let weighting = if equal { Weighting::Equal } else { Weighting::Quality };
            let p = Policy::new(floor, cap, 0.0, weighting).unwrap();
            let measured: Vec<_> = qualities.iter().enumerate().map(|(i, q)| (id(i), *q)).collect();
            let mut shuffled = measured.clone();
            // A deterministic Fisher-Yates shuffle from the seed.
            let mut state = seed;
            for i in (1..shuffled.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (state >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(p.decide(&scored(&measured), measured.len()), p.decide(&scored(&shuffled), measured.len()));
        }

        #[test]
        fn weight_is_monotone_in_quality(qualities in prop::collection::vec(0.001..2.0f64, 1..16), cap in 0.05..=1.0f64, which in any::<prop::sample::Index>(), boost in 0.0..3.0f64) {
            let p = policy(cap);
            let i = which.index(qualities.len());
            let measured: Vec<_> = qualities.iter().enumerate().map(|(j, q)| (id(j), *q)).collect();
            let mut better = measured.clone();
            better[i].1 += boost;
            let before = p.decide(&scored(&measured), measured.len()).weights[&id(i)];
            let after = p.decide(&scored(&better), measured.len()).weights[&id(i)];
            prop_assert!(after >= before - 1e-12, "{} -> {}", before, after);
        }
    }

    // ---- every-language fairness ----

    const LANGUAGES: [&str; 4] = ["de", "en", "ja", "zh"];

    fn gains(values: [f64; 4]) -> Gains {
        LANGUAGES.iter().zip(values).map(|(l, g)| (l.to_string(), g)).collect()
    }

    fn measured_by_gains(rows: &[[f64; 4]]) -> Vec<Measured> {
        rows.iter()
            .enumerate()
            .map(|(i, row)| {
                let gains = gains(*row);
                Measured { node: id(i), quality: crate::quality::mean(&gains), gains, own_loss: 1.0 }
            })
            .collect()
    }

    fn every_language(cap: f64) -> Policy {
        policy(cap).with_fairness(Fairness::DEFAULT).unwrap()
    }

    #[test]
    fn a_node_is_admitted_for_its_best_language_not_its_mean() {
        // Node 0 helps German and English, harms Japanese and Chinese more: a negative mean.
        let rows = [[0.02, 0.02, -0.03, -0.03], [-0.001, 0.0, 0.1, 0.08], [-0.01, -0.01, -0.01, -0.01]];
        let measured = measured_by_gains(&rows);
        assert!(measured[0].quality < 0.0);
        let mean_rule = policy(1.0).decide(&measured, 3);
        assert!(matches!(mean_rule.rejected[&id(0)], Rejection::BelowFloor { .. }));
        let decision = every_language(1.0).decide(&measured, 3);
        assert!(decision.weights[&id(0)] > 0.0 && decision.weights[&id(1)] > 0.0);
        // A delta that helps no language (a sign flip, noise) is still refused.
        assert_eq!(decision.rejected[&id(2)].code(), RejectionCode::BelowFloor);
        assert!(matches!(decision.rejected[&id(2)], Rejection::NoLanguageGains { .. }));
    }

    #[test]
    fn each_language_splits_its_share_among_its_helpers() {
        // Two nodes help only German (one twice as much), one only Japanese, one English and Chinese.
        let rows = [[0.2, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0], [0.0, 0.1, 0.0, 0.1]];
        let d = every_language(1.0).decide(&measured_by_gains(&rows), 4);
        let w = |i: usize| d.weights[&id(i)];
        assert!((w(0) - 0.25 * 2.0 / 3.0).abs() < 1e-12, "{}", w(0));
        assert!((w(1) - 0.25 / 3.0).abs() < 1e-12);
        assert!((w(2) - 0.25).abs() < 1e-12, "a gain of 0.5 wins no more than its language's quarter");
        assert!((w(3) - 0.5).abs() < 1e-12, "two languages' shares");
        // Raising a language's priority moves weight to its helpers.
        let priorities = Priorities::from([("ja".to_string(), 3.0)]);
        let d = every_language(1.0).decide_with(&measured_by_gains(&rows), 4, &priorities);
        assert!((d.weights[&id(2)] - 0.5).abs() < 1e-12, "{}", d.weights[&id(2)]);
    }

    #[test]
    fn q_fedavg_weighs_worse_off_languages_more() {
        let mut measured = scored(&[(id(0), 0.1), (id(1), 0.1)]);
        measured[1].own_loss = 3.0;
        let p = policy(1.0).with_fairness(Fairness::QFedAvg { q: 1.0 }).unwrap();
        let d = p.decide(&measured, 2);
        assert!((d.weights[&id(1)] - 0.75).abs() < 1e-12);
        assert_eq!("q-fedavg:1".parse::<Fairness>(), Ok(Fairness::QFedAvg { q: 1.0 }));
        assert_eq!("every-language".parse::<Fairness>(), Ok(Fairness::DEFAULT));
        assert!("every-language:2".parse::<Fairness>().is_err());
        assert!("fair".parse::<Fairness>().is_err());
    }

    fn gain_rows() -> impl Strategy<Value = Vec<[f64; 4]>> {
        prop::collection::vec(prop::array::uniform4(prop_oneof![-0.2..0.3f64, Just(0.0)]), 1..12)
    }

    proptest! {
        #[test]
        fn every_language_weights_keep_the_cap_and_a_selfish_node_its_share(rows in gain_rows(), cap in 0.05..=1.0f64) {
            let measured = measured_by_gains(&rows);
            let d = every_language(cap).decide(&measured, rows.len());
            prop_assert!(d.weights.values().all(|w| *w >= 0.0 && *w <= cap));
            prop_assert!(d.weights.values().sum::<f64>() <= 1.0 + 1e-9);
            prop_assert_eq!(d.weights.len() + d.rejected.len(), rows.len());
            // Without a binding cap, a node that gains on one language only takes at most that
            // language's share of the mass the helped languages own, however large its gain.
            let d = every_language(1.0).decide(&measured, rows.len());
            let helped = LANGUAGES.iter().filter(|l| measured.iter().any(|m| m.gains[**l] > 0.0)).count() as f64;
            for (i, row) in rows.iter().enumerate() {
                if row.iter().filter(|g| **g > 0.0).count() == 1 {
                    if let Some(w) = d.weights.get(&id(i)) {
                        prop_assert!(*w <= 1.0 / helped + 1e-9, "{w} with {helped} languages helped");
                    }
                }
            }
        }

        #[test]
        fn every_language_weights_do_not_depend_on_arrival_order(rows in gain_rows(), seed in any::<u64>()) {
            let measured = measured_by_gains(&rows);
            let mut shuffled = measured.clone();
            let mut state = seed;
            for i in (1..shuffled.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (state >> 33) as usize % (i + 1));
            }
            let p = every_language(0.5);
            prop_assert_eq!(p.decide(&measured, rows.len()), p.decide(&shuffled, rows.len()));
        }
    }
}
