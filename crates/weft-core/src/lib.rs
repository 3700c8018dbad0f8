//! weft's domain, free of IO and of any ML framework.
//!
//! Data flows through these types in one direction:
//! a [`ModelState`] (the shared base) → a node trains it and sends a [`Contribution`] carrying a
//! [`Delta`] → the coordinator checks it ([`contribution::check`]), measures its [`quality`],
//! lets the [`Policy`] decide the weights, and folds the accepted deltas into the next base with
//! the [`aggregate`] kernels and an [`OuterOptimizer`].

pub mod aggregate;
pub mod contribution;
pub mod cpu;
pub mod delta;
pub mod gauntlet;
pub mod hash;
pub mod language_check;
pub mod policy;
pub mod proposal;
pub mod quality;
pub mod reputation;
pub mod robust;
pub mod state;
pub mod tensor;
pub mod update;

pub use aggregate::{OuterOptimizer, OuterState};
pub use contribution::{Contribution, NodeId, Rejection, RejectionCode};
pub use delta::Delta;
pub use gauntlet::{BreakerRules, GauntletOutcome, GauntletRules, GauntletVerdict, ItemLosses};
pub use hash::ContentHash;
pub use policy::{Decision, Fairness, Measured, Policy, PolicyError, Priorities, Weighting};
pub use proposal::{RuleChange, Tally, VotingRules};
pub use robust::{Aggregator, AggregatorError, NormBound};
pub use state::{CanonicalHasher, ModelState, StateError};
pub use tensor::Tensor;
pub use update::{AdapterFamily, AdapterPlan, AdapterRound, AdapterTrack, FullWeights, UpdateForm};
