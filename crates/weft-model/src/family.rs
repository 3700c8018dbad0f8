//! The one interface through which the coordinator, governance and nodes see a model: a
//! [`ModelFamily`] scores named f32 state on text. Which architecture sits behind it — the byte
//! GPT here, a Llama in `weft-llama` — is the family's business.

use std::fmt;

use weft_core::{AdapterRound, ModelState};

use crate::{AdamW, AdamWSettings, DpReport, Gpt, GptConfig, ModelError, SplitMix64, TrainReport};

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
    /// Trains round `round`'s adapter (`adapter`) from `base` on the node's own text as
    /// `settings` say, drawing its windows from `rng`; `on_step(step, loss)` reports progress.
    fn train_round(
        &mut self,
        round: u64,
        base: &ModelState,
        adapter: &AdapterRound,
        settings: &AdapterTraining,
        rng: &mut SplitMix64,
        on_step: &mut dyn FnMut(u64, f64),
    ) -> Result<TrainedAdapter, FamilyError>;

    /// Trains every later round with record-level DP-SGD. A trainer that cannot (one in another
    /// process, which weft cannot check) refuses, and the node does not join a DP consortium.
    fn with_privacy(&mut self, private: PrivateTraining) -> Result<(), FamilyError> {
        let _ = private;
        Err("this adapter trainer does not apply DP-SGD (weft's built-in adapter trainer does)".into())
    }
}

/// What a node needs of a family to hand a round's adapter to a trainer in another process and
/// take it back: the model's configuration and tokenizer as such a trainer reads them, the
/// round's factors before training, and the update a node sends for the factors trained.
pub trait AdapterJobForm: Send {
    /// The family's name as the job writes it (`llama`).
    fn family(&self) -> &'static str;
    /// The model's configuration as the job carries it (for Llama, Hugging Face's `config.json`).
    fn configuration(&self) -> serde_json::Value;
    /// The tokenizer, written as a file for the trainer (`tokenizer.json`).
    fn tokenizer(&self) -> &[u8];
    /// The optimizer the family's built-in adapter trainer runs at learning rate `lr`: the job
    /// asks an outside trainer for the same.
    fn optimizer(&self, lr: f32) -> AdamWSettings;
    /// The round's factors before training (for LoRA: `A` from the round's seed, `B = 0`).
    fn initial(&self, round: &AdapterRound) -> Result<ModelState, FamilyError>;
    /// The update a node sends for `trained` (every factor, as the trainer wrote them, already
    /// checked against [`initial`](Self::initial)'s names and shapes); refuses a factor the round
    /// keeps frozen that the trainer changed, by name.
    fn update_of(&self, round: &AdapterRound, trained: &ModelState) -> Result<ModelState, FamilyError>;
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
    /// Under record-level DP-SGD: the mechanism applied and the round's (ε, δ).
    pub dp: Option<crate::DpReport>,
}

/// How a node trains a full-weight round, whatever the family behind it: from the base as named
/// f32 state to the node's own trained state. The optimizer's state lives in the trainer across
/// rounds; the node keeps it beside each round's artifact, as named f32 state, and hands it back
/// after a restart.
pub trait WeightTrainer: Send {
    /// The trained model's configuration, as the node's artifact manifest records it.
    fn configuration(&self) -> serde_json::Value;
    /// Trains round `round` from `base` on the node's `text`, drawing batches from `rng`;
    /// `on_step(step, loss)` reports progress.
    fn train_round(
        &mut self,
        round: u64,
        base: &ModelState,
        text: CorpusText<'_>,
        rng: &mut SplitMix64,
        on_step: &mut dyn FnMut(u64, f64),
    ) -> Result<TrainedWeights, FamilyError>;
    /// Whether the optimizer has a state in this process (trained or restored).
    fn has_optimizer(&self) -> bool;
    /// The optimizer's steps over the node's life.
    fn optimizer_steps(&self) -> u64;
    /// The optimizer's state, to keep beside a round's artifact.
    fn optimizer_state(&self) -> Result<ModelState, FamilyError>;
    /// Continues from a kept optimizer state after `steps` steps; `layout` is any state of the
    /// model (it gives the shapes the state must fit).
    fn restore_optimizer(&mut self, layout: &ModelState, state: &ModelState, steps: u64) -> Result<(), FamilyError>;
}

/// The node's own text as a trainer reads it, borrowed for one round: it stays with the node.
#[derive(Clone, Copy)]
pub struct CorpusText<'a> {
    pub train: &'a [u8],
    /// The node's validation tail, never trained on.
    pub validation: &'a [u8],
}

/// One round of full-weight training, as the node keeps it.
#[derive(Clone, Debug)]
pub struct TrainedWeights {
    pub weights: ModelState,
    pub report: TrainReport,
    /// Loss on the node's validation tail before and after the round.
    pub validation_loss_before: f64,
    pub validation_loss_after: f64,
    /// What DP-SGD did, when the round trained with it.
    pub dp: Option<DpReport>,
}

/// Record-level DP-SGD for a node's trainer: the consortium's mechanism and the node's own
/// secret, which keys its sampling and noise (see [`weft_privacy::PrivateStream`]).
#[derive(Clone)]
pub struct PrivateTraining {
    pub dp: weft_privacy::DpSgd,
    /// The δ the node states its ε at.
    pub delta: f64,
    pub secret: [u8; 32],
}

// Never print the secret.
impl std::fmt::Debug for PrivateTraining {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateTraining").field("dp", &self.dp).field("delta", &self.delta).finish_non_exhaustive()
    }
}

/// The byte GPT's node trainer: AdamW, `steps` steps of `batch_rows` windows per round, its
/// moments carried from round to round.
pub struct ByteGptTrainer {
    config: GptConfig,
    steps: u64,
    batch_rows: usize,
    adamw: AdamWSettings,
    optimizer: Option<AdamW>,
    privacy: Option<PrivateTraining>,
}

impl ByteGptTrainer {
    pub fn new(config: GptConfig, steps: u64, batch_rows: usize, adamw: AdamWSettings) -> Result<Self, ModelError> {
        config.validate()?;
        Ok(ByteGptTrainer { config, steps, batch_rows, adamw, optimizer: None, privacy: None })
    }

    /// Trains every round with DP-SGD instead of fixed batches of random windows.
    pub fn with_privacy(mut self, privacy: PrivateTraining) -> Self {
        self.privacy = Some(privacy);
        self
    }
}

impl WeightTrainer for ByteGptTrainer {
    fn configuration(&self) -> serde_json::Value {
        serde_json::to_value(self.config).unwrap_or_default()
    }

    fn train_round(
        &mut self,
        round: u64,
        base: &ModelState,
        text: CorpusText<'_>,
        rng: &mut SplitMix64,
        on_step: &mut dyn FnMut(u64, f64),
    ) -> Result<TrainedWeights, FamilyError> {
        let mut model = Gpt::from_state(self.config, base)?;
        let eval_rows = self.batch_rows.max(1);
        let validation_loss_before = model.loss_per_byte(text.validation, eval_rows);
        let optimizer = self.optimizer.get_or_insert_with(|| AdamW::new(self.adamw, &model));
        let (report, dp) = match &self.privacy {
            Some(private) => {
                let (report, dp) = optimizer
                    .train_private(&mut model, text.train, self.steps, private, round, on_step)
                    .map_err(|e| format!("differential privacy: {e}"))?;
                (report, Some(dp))
            }
            None => (optimizer.train(&mut model, text.train, self.steps, self.batch_rows, rng, on_step), None),
        };
        Ok(TrainedWeights {
            weights: model.to_state(),
            report,
            validation_loss_before,
            validation_loss_after: model.loss_per_byte(text.validation, eval_rows),
            dp,
        })
    }

    fn has_optimizer(&self) -> bool {
        self.optimizer.is_some()
    }

    fn optimizer_steps(&self) -> u64 {
        self.optimizer.as_ref().map_or(0, AdamW::steps_taken)
    }

    fn optimizer_state(&self) -> Result<ModelState, FamilyError> {
        let optimizer = self.optimizer.as_ref().ok_or("no optimizer state: nothing trained yet")?;
        let (m, v) = optimizer.moments();
        let mut state = ModelState::new();
        for (name, data) in [("m", m), ("v", v)] {
            let tensor = weft_core::Tensor::new(vec![data.len()], data.to_vec())
                .map_err(|e| format!("optimizer moment {name}: {e}"))?;
            state.insert(name, tensor);
        }
        Ok(state)
    }

    fn restore_optimizer(&mut self, layout: &ModelState, state: &ModelState, steps: u64) -> Result<(), FamilyError> {
        let model = Gpt::from_state(self.config, layout)?;
        let (m, v) = match (state.get("m"), state.get("v")) {
            (Some(m), Some(v)) => (m.data().to_vec(), v.data().to_vec()),
            _ => return Err("optimizer state lacks its moments".into()),
        };
        let optimizer =
            AdamW::restore(self.adamw, &model, m, v, steps).ok_or("optimizer state does not fit the model")?;
        self.optimizer = Some(optimizer);
        Ok(())
    }
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
