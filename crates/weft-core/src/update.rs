//! What the tensors a node sends stand for: a change of every weight (the byte model's deltas),
//! or a low-rank adapter that expands into a change of some weights.
//!
//! The coordinator checks, measures, caps and aggregates updates in their own layout (for LoRA's
//! shared track: the B factors, a few MB instead of the model) and only expands through
//! [`UpdateForm::apply`] when it needs weights: to measure a candidate and to publish a base.
//! Where applying is linear in the update, `apply(base, Σ wᵢ·uᵢ)` is exactly the weighted mean
//! of the weight changes `Σ wᵢ·W(uᵢ)`. Where it is not (both LoRA factors trained), the weighted
//! mean is taken of the expanded changes ([`UpdateForm::expand_into`]) — never the FedIT error of
//! averaging two factors apart.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::delta::Delta;
use crate::robust::Aggregator;
use crate::state::{ModelState, StateError};

/// How an update maps onto the base.
pub trait UpdateForm: Send + Sync + fmt::Debug {
    /// A state with the names and shapes every update must have (its values mean nothing):
    /// aggregation works in this layout. Borrowed, so that checking an update never copies a
    /// model.
    fn layout<'a>(&'a self, base: &'a ModelState) -> &'a ModelState;

    /// `base + scale · W(update)`, as a new state; `base` is untouched.
    fn apply(&self, base: &ModelState, update: &ModelState, scale: f32) -> Result<ModelState, StateError>;

    /// What the ledger records so that a replay rebuilds this form (`None`: full weights).
    fn adapter(&self) -> Option<&AdapterRound>;

    /// Whether `apply` is linear in the update, so that a weighted mean of updates stands for the
    /// weighted mean of their weight changes. A product of two trained factors is not: such
    /// updates are aggregated in weight space through [`expand_into`](Self::expand_into).
    fn is_linear(&self) -> bool {
        true
    }

    /// Adds `coefficient · W(update)` to `step`, a state in [`expanded_layout`](Self::expanded_layout)
    /// (only called for forms that are not linear).
    fn expand_into(&self, update: &ModelState, coefficient: f32, step: &mut ModelState) -> Result<(), StateError> {
        let _ = (update, coefficient, step);
        Err(StateError::Format("this update form aggregates in its own layout".into()))
    }

    /// Zeros shaped as the weight change of a non-linear form: the weights it touches.
    fn expanded_layout(&self, base: &ModelState) -> ModelState {
        base.zeros_like()
    }

    /// The L2 norm of the weight change `update` stands for (what norm bounds and reports read).
    fn norm(&self, update: &ModelState) -> f64 {
        update.iter().map(|(_, t)| t.squared_norm()).sum::<f64>().sqrt()
    }

    /// Whether an update is in the weights' own coordinates, the same every round, so that an
    /// outer optimizer's momentum or a robust center carried from one round to the next means
    /// something. Adapter factors change every round: they have no such state.
    fn carries_state_across_rounds(&self) -> bool {
        self.adapter().is_none()
    }
}

/// A change of every weight: the update is `local − base` with the base's layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FullWeights;

impl UpdateForm for FullWeights {
    fn layout<'a>(&'a self, base: &'a ModelState) -> &'a ModelState {
        base
    }

    fn apply(&self, base: &ModelState, update: &ModelState, scale: f32) -> Result<ModelState, StateError> {
        Delta::from_state(update.clone()).applied_to(base, scale)
    }

    fn adapter(&self) -> Option<&AdapterRound> {
        None
    }
}

/// One round's low-rank adapter: the seed of its frozen A factors and the adapter's shape. The
/// coordinator derives it before any upload and the ledger records it with the round, so nodes
/// and a later replay rebuild the same factors bit for bit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterRound {
    /// Seed of the round's A factors.
    pub seed: u64,
    pub rank: usize,
    /// LoRA's α; the weight change is `(α / rank) · B·A`. (JSON writes an f32 exactly.)
    pub alpha: f32,
    /// The projections adapted in every layer, as the model family names them (`q`, `v`, …).
    pub targets: Vec<String>,
    /// Which factors nodes train and send.
    #[serde(default, skip_serializing_if = "AdapterTrack::is_shared")]
    pub track: AdapterTrack,
}

/// LoRA's two tracks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterTrack {
    /// `A` frozen from the round's seed, nodes send `B`: linear, aggregated on `B`.
    #[default]
    Shared,
    /// Nodes train and send both factors (starting from the round's `A`); the weighted mean is
    /// taken of the products `Bᵢ·Aᵢ`, in weight space.
    Full,
}

impl AdapterTrack {
    pub fn is_shared(&self) -> bool {
        *self == AdapterTrack::Shared
    }
}

/// A model family's adapters: builds a round's form (its frozen A factors) from the ledger's
/// record of the round. The coordinator, a replay and the nodes call the same function.
pub trait AdapterFamily: Send + Sync {
    fn form(&self, round: &AdapterRound) -> Result<Arc<dyn UpdateForm>, StateError>;
}

/// A consortium's adapter settings; every round draws its own A seed from `seed`, so that no
/// round's factors can be chosen after seeing the uploads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterPlan {
    pub seed: u64,
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
    #[serde(default, skip_serializing_if = "AdapterTrack::is_shared")]
    pub track: AdapterTrack,
}

impl AdapterPlan {
    /// Why `rule` cannot combine this plan's adapters: centered clipping carries a center across
    /// rounds (whose adapters share no coordinates); with both factors trained an update's
    /// tensors are not coordinates of its weight change, so only weighted sums of whole updates
    /// apply.
    pub fn refuses(&self, rule: &Aggregator) -> Option<String> {
        match rule {
            Aggregator::CenteredClipping { .. } => Some("centered clipping carries a center across rounds".into()),
            Aggregator::WeightedMean | Aggregator::NormBound { .. } => None,
            _ if self.track == AdapterTrack::Full => Some(format!(
                "{rule} combines updates coordinate by coordinate; with both factors trained (--adapter-track full) only mean and norm-bound apply"
            )),
            _ => None,
        }
    }

    /// Round `round`'s adapter: its seed is the first 8 bytes of BLAKE3 over a domain tag, the
    /// plan's seed and the round.
    pub fn round(&self, round: u64) -> AdapterRound {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"weft/adapter-round/v1");
        hasher.update(&self.seed.to_le_bytes());
        hasher.update(&round.to_le_bytes());
        let digest = hasher.finalize();
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&digest.as_bytes()[..8]);
        AdapterRound {
            seed: u64::from_le_bytes(seed),
            rank: self.rank,
            alpha: self.alpha,
            targets: self.targets.clone(),
            track: self.track,
        }
    }
}

impl fmt::Display for AdapterRound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let track = if self.track == AdapterTrack::Full { " (A and B trained)" } else { "" };
        write!(
            f,
            "LoRA{track} rank {} alpha {} on {} (A seed {:#018x})",
            self.rank,
            self.alpha,
            self.targets.join(","),
            self.seed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    #[test]
    fn full_weights_applies_a_delta_and_keeps_the_base_layout() {
        let mut base = ModelState::new();
        base.insert("w", Tensor::new(vec![2], vec![1.0, 2.0]).unwrap());
        let mut update = ModelState::new();
        update.insert("w", Tensor::new(vec![2], vec![0.5, -1.0]).unwrap());
        let applied = FullWeights.apply(&base, &update, 2.0).unwrap();
        assert_eq!(applied.get("w").unwrap().data(), &[2.0, 0.0]);
        assert_eq!(FullWeights.layout(&base), &base);
        assert!(FullWeights.carries_state_across_rounds());
    }

    #[test]
    fn every_round_draws_its_own_seed_and_the_same_round_the_same_one() {
        let plan = AdapterPlan { seed: 7, rank: 4, alpha: 8.0, targets: vec!["q".into()], track: AdapterTrack::Shared };
        assert_eq!(plan.round(3), plan.round(3));
        assert_ne!(plan.round(3).seed, plan.round(4).seed);
        assert_ne!(plan.round(3).seed, AdapterPlan { seed: 8, ..plan.clone() }.round(3).seed);
        assert_eq!(plan.round(3).rank, 4);
    }

    #[test]
    fn an_adapter_round_survives_json_exactly() {
        let round = AdapterRound {
            seed: u64::MAX - 3,
            rank: 8,
            alpha: 16.0,
            targets: vec!["q".into(), "v".into()],
            track: AdapterTrack::Full,
        };
        let text = serde_json::to_string(&round).unwrap();
        assert_eq!(serde_json::from_str::<AdapterRound>(&text).unwrap(), round);
    }
}
