//! The consortium's rules for one round: a quality floor, a per-node cap that is never exceeded,
//! a quorum, and how accepted contributions are weighted.
//!
//! Weights are computed by water-filling: each accepted node gets `min(cap, t · sᵢ)` where `sᵢ` is
//! its score (its measured quality, or 1 for equal weighting) and `t` is the largest level with
//! `Σ wᵢ ≤ 1`. When fewer than ⌈1/cap⌉ nodes are accepted every node sits at the cap and the
//! weights sum to less than one: the unassigned share stays with the current base.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::contribution::{NodeId, Rejection};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weighting {
    /// Proportional to the quality the coordinator measured.
    Quality,
    /// The same for every accepted node.
    Equal,
    /// Tapestry's rule: proportional to the quality each node *declares* about itself, with the
    /// floor applied to that declaration. Unsafe by design (a node claiming 10⁹ takes the cap);
    /// kept only as a baseline to compare defences against.
    Declared,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Minimum measured quality (nats/byte of held-out loss removed) to be accepted.
    pub floor: f64,
    /// Largest weight any one node may receive, in (0, 1].
    pub cap: f64,
    /// Share of the roster that must be accepted for the base to move, in [0, 1].
    pub quorum: f64,
    pub weighting: Weighting,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("cap must be in (0, 1], got {0}")]
    Cap(f64),
    #[error("floor must be a finite number, got {0}")]
    Floor(f64),
    #[error("quorum must be in [0, 1], got {0}")]
    Quorum(f64),
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
    pub fn new(floor: f64, cap: f64, quorum: f64, weighting: Weighting) -> Result<Self, PolicyError> {
        let policy = Policy { floor, cap, quorum, weighting };
        policy.validate()?;
        Ok(policy)
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
        Ok(())
    }

    /// Accepted contributions needed for the base to move: ⌈quorum · roster size⌉.
    pub fn required(&self, roster_size: usize) -> usize {
        // The epsilon keeps 0.5 · 4 = 2 from becoming 3 through rounding noise.
        (self.quorum * roster_size as f64 - 1e-9).ceil().max(0.0) as usize
    }

    /// Decides the weights from measured qualities (declared ones for [`Weighting::Declared`]).
    /// The result does not depend on the order of `measured`; an id listed twice is rejected as a
    /// duplicate in every copy.
    pub fn decide(&self, measured: &[(NodeId, f64)], roster_size: usize) -> Decision {
        let mut decision = Decision::default();
        let mut seen = BTreeMap::<&NodeId, usize>::new();
        for (node, _) in measured {
            *seen.entry(node).or_default() += 1;
        }
        let mut scores: Vec<(f64, &NodeId)> = Vec::new();
        for (node, quality) in measured {
            let quality = *quality;
            let verdict = if seen[node] > 1 {
                Err(Rejection::DuplicateNode)
            } else if !quality.is_finite() {
                Err(Rejection::Unmeasurable)
            } else if quality < self.floor {
                Err(Rejection::BelowFloor { quality, floor: self.floor })
            } else if self.weighting != Weighting::Equal && quality <= 0.0 {
                Err(Rejection::NonPositiveQuality { quality })
            } else {
                Ok(match self.weighting {
                    Weighting::Quality | Weighting::Declared => quality,
                    Weighting::Equal => 1.0,
                })
            };
            match verdict {
                Ok(score) => scores.push((score, node)),
                Err(reason) => {
                    decision.rejected.insert(node.clone(), reason);
                }
            }
        }
        let (weights, capped) = capped_weights(scores, self.cap);
        decision.unassigned = (1.0 - weights.values().sum::<f64>()).max(0.0);
        decision.weights = weights;
        decision.capped = capped;
        self.check_quorum(&mut decision, roster_size);
        decision
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

    fn policy(cap: f64) -> Policy {
        Policy::new(0.0, cap, 0.0, Weighting::Quality).unwrap()
    }

    #[test]
    fn floor_rejects_and_cap_holds() {
        let p = Policy::new(0.1, 0.5, 0.0, Weighting::Quality).unwrap();
        let d = p.decide(&[(id(0), 5.0), (id(1), 0.5), (id(2), 0.05), (id(3), 0.5)], 4);
        assert_eq!(d.rejected[&id(2)].code(), RejectionCode::BelowFloor);
        assert_eq!(d.weights[&id(0)], 0.5);
        assert!((d.weights[&id(1)] - 0.25).abs() < 1e-12);
        assert!(d.capped.contains(&id(0)));
        assert!(d.unassigned.abs() < 1e-12);
    }

    #[test]
    fn infeasible_cap_is_never_exceeded() {
        // Tapestry gave 0.5/0.5 here, breaking its own cap of 0.4.
        let d = policy(0.4).decide(&[(id(0), 1.0), (id(1), 3.0)], 2);
        assert_eq!(d.weights[&id(0)], 0.4);
        assert_eq!(d.weights[&id(1)], 0.4);
        assert!((d.unassigned - 0.2).abs() < 1e-12);
    }

    #[test]
    fn quorum_leaves_the_base_alone() {
        let p = Policy::new(0.0, 1.0, 0.75, Weighting::Equal).unwrap();
        assert_eq!(p.required(4), 3);
        assert_eq!(Policy::new(0.0, 1.0, 0.5, Weighting::Equal).unwrap().required(4), 2);
        let d = p.decide(&[(id(0), 1.0), (id(1), 1.0), (id(2), -1.0)], 4);
        assert!(d.weights.is_empty());
        assert_eq!(d.unassigned, 1.0);
        assert_eq!(d.rejected[&id(0)].code(), RejectionCode::QuorumNotMet);
        assert_eq!(d.rejected[&id(2)].code(), RejectionCode::BelowFloor);
    }

    #[test]
    fn quality_weighting_needs_positive_quality_and_nan_is_unmeasurable() {
        let p = Policy::new(-1.0, 1.0, 0.0, Weighting::Quality).unwrap();
        let d = p.decide(&[(id(0), 0.0), (id(1), f64::NAN), (id(2), f64::INFINITY), (id(3), 0.2)], 4);
        assert_eq!(d.rejected[&id(0)].code(), RejectionCode::NonPositiveQuality);
        assert_eq!(d.rejected[&id(1)].code(), RejectionCode::Unmeasurable);
        assert_eq!(d.rejected[&id(2)].code(), RejectionCode::Unmeasurable);
        assert_eq!(d.weights[&id(3)], 1.0);
    }

    #[test]
    fn duplicates_are_all_rejected() {
        let d = policy(1.0).decide(&[(id(0), 1.0), (id(0), 2.0), (id(1), 1.0)], 3);
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
            let d = p.decide(&measured, measured.len());
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
            prop_assert_eq!(p.decide(&measured, measured.len()), p.decide(&shuffled, measured.len()));
        }

        #[test]
        fn weight_is_monotone_in_quality(qualities in prop::collection::vec(0.001..2.0f64, 1..16), cap in 0.05..=1.0f64, which in any::<prop::sample::Index>(), boost in 0.0..3.0f64) {
            let p = policy(cap);
            let i = which.index(qualities.len());
            let measured: Vec<_> = qualities.iter().enumerate().map(|(j, q)| (id(j), *q)).collect();
            let mut better = measured.clone();
            better[i].1 += boost;
            let before = p.decide(&measured, measured.len()).weights[&id(i)];
            let after = p.decide(&better, measured.len()).weights[&id(i)];
            prop_assert!(after >= before - 1e-12, "{} -> {}", before, after);
        }
    }
}
