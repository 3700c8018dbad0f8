//! Differential privacy as the coordinator enforces it: every contribution must state the
//! consortium's DP-SGD mechanism (signed with it), and the coordinator charges each node the ε
//! it computes itself — the composed RDP of all the node's charged rounds — refusing the
//! contribution that would take a node past its budget.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_core::{Contribution, Rejection};
use weft_privacy::DpRule;

/// The consortium's DP rule and the local steps every round trains (the accountant's steps).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyRules {
    pub rule: DpRule,
    pub steps_per_round: u64,
}

/// The privacy loss charged to one node for one round, as the ledger records it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyCharge {
    /// ε of this round alone, at `delta`.
    pub epsilon_round: f64,
    /// ε of all the node's charged rounds so far, this one included, composed.
    pub epsilon_total: f64,
    pub delta: f64,
    /// How many rounds the node has been charged for, this one included.
    pub rounds_charged: u64,
    pub budget: f64,
}

/// The names a DP contribution states its mechanism under (set by `weft-node`).
const NOISE_MULTIPLIER: &str = "dp_noise_multiplier";
const SAMPLE_RATE: &str = "dp_sample_rate";
const CLIP_NORM: &str = "dp_clip_norm";
const STEPS: &str = "dp_steps";
const EPSILON: &str = "dp_epsilon";
const DELTA: &str = "dp_delta";

impl PrivacyRules {
    /// The charge for `contribution` after `charged_before` charged rounds of the same node, or
    /// why it is refused: a mechanism other than the consortium's (or none), or a budget it
    /// would exceed.
    pub fn charge(&self, contribution: &Contribution, charged_before: u64) -> Result<PrivacyCharge, Rejection> {
        let m = self.rule.mechanism;
        let expected = [
            (NOISE_MULTIPLIER, m.noise_multiplier),
            (SAMPLE_RATE, m.sample_rate),
            (CLIP_NORM, m.clip_norm),
            (STEPS, self.steps_per_round as f64),
            (DELTA, self.rule.delta),
        ];
        for (key, want) in expected {
            match contribution.declared.get(key) {
                None => {
                    return Err(Rejection::PrivacyMismatch {
                        detail: format!("the contribution does not state {key} (was it trained with DP-SGD?)"),
                    })
                }
                Some(&got) if got != want => {
                    return Err(Rejection::PrivacyMismatch {
                        detail: format!("it states {key} = {got}, the consortium's is {want}"),
                    })
                }
                Some(_) => {}
            }
        }
        let mismatch = |e: weft_privacy::AccountingError| Rejection::PrivacyMismatch { detail: e.to_string() };
        let round = self.rule.spent(1, self.steps_per_round).map_err(mismatch)?;
        // The node's own ε must be the accountant's: a trainer that computes another one does
        // not run the mechanism the consortium accounts for.
        let declared = contribution.declared.get(EPSILON).copied().unwrap_or(f64::NAN);
        let agrees = (declared - round.epsilon).abs() <= 1e-6 * round.epsilon.max(1e-12);
        if !agrees {
            return Err(Rejection::PrivacyMismatch {
                detail: format!(
                    "it states {EPSILON} = {declared}, the accountant gives {} for one round",
                    round.epsilon
                ),
            });
        }
        let before = self.rule.spent(charged_before, self.steps_per_round).map_err(mismatch)?;
        let rounds_charged = charged_before + 1;
        let total = self.rule.spent(rounds_charged, self.steps_per_round).map_err(mismatch)?;
        if total.epsilon > self.rule.epsilon_budget {
            return Err(Rejection::PrivacyBudgetExhausted {
                spent: before.epsilon,
                would_be: total.epsilon,
                budget: self.rule.epsilon_budget,
                delta: self.rule.delta,
            });
        }
        Ok(PrivacyCharge {
            epsilon_round: round.epsilon,
            epsilon_total: total.epsilon,
            delta: self.rule.delta,
            rounds_charged,
            budget: self.rule.epsilon_budget,
        })
    }
}

/// Secure aggregation's seed for a round: fixed by what the round's opening recorded, so the
/// coordinator cannot pick a partition (and so cannot draw a second, different one).
pub fn community_seed(
    round: u64,
    base_hash: &weft_core::ContentHash,
    config_hash: &weft_core::ContentHash,
    roster_hash: &weft_core::ContentHash,
) -> weft_core::ContentHash {
    let mut hasher = blake3::Hasher::new_derive_key("weft secure aggregation communities v1");
    hasher.update(&round.to_le_bytes()).update(&base_hash.0).update(&config_hash.0).update(&roster_hash.0);
    weft_core::ContentHash(*hasher.finalize().as_bytes())
}

/// The id of the `index`-th community (1-based), as the coordinator's roster holds it.
pub fn community_id(index: usize) -> String {
    format!("community-{index}")
}

/// The partition of `nodes` into communities of `size` for this seed: community id → members.
pub fn draw_communities(
    seed: &weft_core::ContentHash,
    nodes: &[String],
    size: usize,
) -> Result<BTreeMap<String, Vec<String>>, weft_privacy::secagg::SecAggError> {
    let drawn = weft_privacy::secagg::Partitions::default().draw(0, &seed.0, nodes, size)?;
    Ok(drawn.into_iter().enumerate().map(|(i, members)| (community_id(i + 1), members)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::{Delta, ModelState, NodeId};
    use weft_privacy::DpSgd;

    fn rules() -> PrivacyRules {
        PrivacyRules {
            rule: DpRule {
                mechanism: DpSgd { clip_norm: 1.0, noise_multiplier: 1.0, sample_rate: 0.02 },
                delta: 1e-5,
                epsilon_budget: 2.0,
            },
            steps_per_round: 60,
        }
    }

    fn contribution(rules: &PrivacyRules) -> Contribution {
        let m = rules.rule.mechanism;
        let epsilon = rules.rule.spent(1, rules.steps_per_round).unwrap().epsilon;
        Contribution {
            node: NodeId::new("n").unwrap(),
            round: 1,
            base_hash: ModelState::new().content_hash(),
            delta: Delta::from_state(ModelState::new()),
            token_count: 0,
            declared: BTreeMap::from([
                (NOISE_MULTIPLIER.into(), m.noise_multiplier),
                (SAMPLE_RATE.into(), m.sample_rate),
                (CLIP_NORM.into(), m.clip_norm),
                (STEPS.into(), 60.0),
                (EPSILON.into(), epsilon),
                (DELTA.into(), 1e-5),
            ]),
        }
    }

    #[test]
    fn charges_compose_and_the_budget_stops_them() {
        let rules = rules();
        let c = contribution(&rules);
        let first = rules.charge(&c, 0).unwrap();
        assert_eq!(first.epsilon_round, first.epsilon_total);
        let second = rules.charge(&c, 1).unwrap();
        // Composed through RDP: more than one round's, less than two rounds' ε added.
        assert!(second.epsilon_total > first.epsilon_total && second.epsilon_total < 2.0 * first.epsilon_total);
        let mut k = 1;
        while rules.charge(&c, k).is_ok() {
            k += 1;
        }
        let Err(Rejection::PrivacyBudgetExhausted { spent, would_be, budget, .. }) = rules.charge(&c, k) else {
            unreachable!()
        };
        assert!(spent <= budget && would_be > budget, "{spent} {would_be} {budget}");
    }

    #[test]
    fn a_contribution_without_the_consortiums_mechanism_is_refused_by_name() {
        let rules = rules();
        let mut c = contribution(&rules);
        c.declared.insert(NOISE_MULTIPLIER.into(), 0.5);
        let err = rules.charge(&c, 0).unwrap_err();
        assert_eq!(err.code(), weft_core::RejectionCode::PrivacyMismatch);
        assert!(err.to_string().contains("dp_noise_multiplier = 0.5"), "{err}");
        let mut c = contribution(&rules);
        c.declared.clear();
        assert_eq!(rules.charge(&c, 0).unwrap_err().code(), weft_core::RejectionCode::PrivacyMismatch);
        let mut c = contribution(&rules);
        c.declared.insert(EPSILON.into(), 0.01);
        assert!(rules.charge(&c, 0).unwrap_err().to_string().contains("the accountant gives"));
    }
}
