//! The one interface through which the coordinator, governance and nodes see a model: a
//! [`ModelFamily`] scores named f32 state on text. Which architecture sits behind it — the byte
//! GPT here, a Llama in `weft-llama` — is the family's business.

use std::fmt;

use weft_core::{AdapterRound, ModelState};

use crate::{Gpt, GptConfig, ModelError, SplitMix64};

/// A family's own error, carried as is (its message names what was wrong).
pub type FamilyError = Box<dyn std::error::Error + Send + Sync>;

/// A model family with its configuration.
pub trait ModelFamily: Send + Sync + fmt::Debug {
    /// A short name for reports and logs (`byte-gpt`, `llama`).
    fn name(&self) -> &'static str;
    /// A fresh evaluator; it keeps its buffers between the states it scores.
    fn evaluator(&self) -> Result<Box<dyn Evaluator>, FamilyError>;
}

/// Scores one state at a time on texts.
pub trait Evaluator: Send {
    /// Makes `state` the model scored next; fails if `state` does not fit the family's layout.
    fn load(&mut self, state: &ModelState) -> Result<(), FamilyError>;
    /// The loaded model's loss on `text`, in nats per byte of text scored (comparable across
    /// tokenizers and families).
    fn nats_per_byte(&mut self, text: &[u8]) -> Result<f64, FamilyError>;
}

/// How a node trains a round's adapter, whatever the family behind it: the node hands over the
/// base as named f32 state and the round's adapter record, and gets named f32 state back.
pub trait AdapterTrainer: Send {
    /// Trains `round`'s adapter from `base` on the node's own text as `settings` say, drawing
    /// its windows from `rng`; `on_step(step, loss)` reports progress.
    fn train_round(
        &mut self,
        base: &ModelState,
        round: &AdapterRound,
        settings: &AdapterTraining,
        rng: &mut SplitMix64,
        on_step: &mut dyn FnMut(u64, f64),
    ) -> Result<TrainedAdapter, FamilyError>;
}

/// How every node trains a round's adapter: the consortium's settings, the same for all.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterTraining {
    /// Optimizer steps per round.
    pub steps: u64,
    /// Windows per step.
    pub batch: usize,
    /// Tokens per window.
    pub context: usize,
    /// AdamW learning rate.
    pub lr: f32,
}

/// One round's adapter training, as the node keeps and sends it.
#[derive(Clone, Debug)]
pub struct TrainedAdapter {
    /// What the node sends, in the round's update form (the `B` factors on the shared track).
    pub update: ModelState,
    /// What the node keeps: every factor of the adapter it trained.
    pub adapter: ModelState,
    pub steps: u64,
    pub tokens: u64,
    /// Mean training loss over the round, nats per token.
    pub mean_loss: f64,
    pub last_loss: f64,
}

/// The built-in byte-level GPT, scored in batches of `batch_rows` windows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ByteGpt {
    pub config: GptConfig,
    pub batch_rows: usize,
}

impl ByteGpt {
    pub fn new(config: GptConfig, batch_rows: usize) -> Result<Self, ModelError> {
        config.validate()?;
        Ok(ByteGpt { config, batch_rows: batch_rows.max(1) })
    }
}

impl ModelFamily for ByteGpt {
    fn name(&self) -> &'static str {
        "byte-gpt"
    }

    fn evaluator(&self) -> Result<Box<dyn Evaluator>, FamilyError> {
        Ok(Box::new(ByteGptEvaluator { family: *self, model: None }))
    }
}

struct ByteGptEvaluator {
    family: ByteGpt,
    /// One model buffer reused for every state: no allocation per contribution.
    model: Option<Gpt>,
}

impl Evaluator for ByteGptEvaluator {
    fn load(&mut self, state: &ModelState) -> Result<(), FamilyError> {
        match self.model.as_mut() {
            Some(model) => model.load_state(state)?,
            None => self.model = Some(Gpt::from_state(self.family.config, state)?),
        }
        Ok(())
    }

    fn nats_per_byte(&mut self, text: &[u8]) -> Result<f64, FamilyError> {
        let model = self.model.as_mut().ok_or("no state loaded")?;
        Ok(model.loss_per_byte(text, self.family.batch_rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_gpt_family_scores_what_the_model_scores() {
        let config = GptConfig { layers: 1, heads: 2, width: 16, context: 16 };
        let mut model = Gpt::init(config, 3).unwrap();
        let text = b"The same text, scored twice, gives the same loss.";
        let family = ByteGpt::new(config, 4).unwrap();
        let mut evaluator = family.evaluator().unwrap();
        evaluator.load(&model.to_state()).unwrap();
        let loss = evaluator.nats_per_byte(text).unwrap();
        assert_eq!(loss.to_bits(), model.loss_per_byte(text, 4).to_bits());
        let wrong = Gpt::init(GptConfig { width: 32, ..config }, 3).unwrap().to_state();
        assert!(evaluator.load(&wrong).is_err());
    }
}
