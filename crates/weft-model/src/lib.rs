//! weft's built-in trainer: a byte-level GPT-style causal transformer with a hand-written
//! backward pass, AdamW, and held-out evaluation in nats per byte.
//!
//! The rest of weft sees a model only as a [`weft_core::ModelState`] of named f32 tensors
//! ([`Gpt::to_state`], [`Gpt::from_state`]), so another trainer can take this one's place.
//!
//! Why hand-written rather than a framework: every kernel below is a fixed-order loop, so a run is
//! bitwise reproducible for a seed on any thread count, the crate builds in seconds, and the
//! padding mask and global-norm clipping are exactly what the round engine needs.

mod config;
mod elementary;
pub mod family;
pub mod gemm;
mod kernels;
mod layout;
mod model;
pub mod profile;
mod rng;
mod train;

pub use config::{ConfigError, GptConfig};
pub use family::{
    AdapterJobForm, AdapterTrainer, AdapterTraining, ByteGpt, ByteGptTrainer, CorpusText, Evaluator, FamilyError,
    ModelFamily, PrivateTraining, TrainedAdapter, TrainedWeights, WeightTrainer,
};
pub use layout::ModelError;
pub use model::Gpt;
pub use rng::SplitMix64;
pub use train::{AdamW, AdamWSettings, Batch, DpReport, TrainReport};
