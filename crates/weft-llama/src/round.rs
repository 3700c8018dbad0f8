//! A node's side of an adapter round on a Llama base: start from the round's frozen factors,
//! train on the node's own tokens, send the round's update form, keep every factor.

use weft_core::{AdapterRound, AdapterTrack, ModelState, StateError, UpdateForm};
use weft_model::{
    AdamWSettings, AdapterJobForm, AdapterTrainer, AdapterTraining, FamilyError, SplitMix64, TrainedAdapter,
};

use crate::config::LlamaConfig;
use crate::family::{FullLora, SharedLora};
use crate::lora::Adapters;
use crate::model::{Llama, LlamaError};
use crate::train::{LoraReport, LoraTrainer, LoraTraining, Windows};

/// A round's adapter as a node sees it: where training starts and what it sends.
#[derive(Clone, Debug)]
pub enum RoundAdapter {
    Shared(SharedLora),
    Full(FullLora),
}

impl RoundAdapter {
    pub fn new(config: &LlamaConfig, record: &AdapterRound) -> Result<Self, StateError> {
        Ok(match record.track {
            AdapterTrack::Shared => RoundAdapter::Shared(SharedLora::new(config, record)?),
            AdapterTrack::Full => RoundAdapter::Full(FullLora::new(config, record)?),
        })
    }

    /// The round's factors before training: `A` from the round's seed, `B = 0`.
    pub fn initial(&self) -> &Adapters {
        match self {
            RoundAdapter::Shared(form) => form.initial(),
            RoundAdapter::Full(form) => form.initial(),
        }
    }

    /// What a node sends for its trained `adapters`: `B` on the shared track, every factor on
    /// the full track.
    pub fn update_of(&self, adapters: &Adapters) -> Result<ModelState, StateError> {
        match self {
            RoundAdapter::Shared(form) => form.update_of(adapters),
            RoundAdapter::Full(_) => Ok(adapters.to_state()),
        }
    }

    /// f32 values in one update.
    pub fn update_values(&self) -> usize {
        match self {
            RoundAdapter::Shared(form) => form.layout(&ModelState::new()).num_values(),
            RoundAdapter::Full(form) => form.layout(&ModelState::new()).num_values(),
        }
    }

    /// Whether nodes train `A` too (the full track); the shared track keeps it frozen.
    pub fn trains_a(&self) -> bool {
        matches!(self, RoundAdapter::Full(_))
    }
}

/// `steps` steps of adapter training, one at a time so that `on_step(step, loss)` can report
/// each; the windows are drawn from `rng` exactly as [`LoraTrainer::train`] draws them.
#[allow(clippy::too_many_arguments)]
pub fn train_steps(
    model: &Llama,
    adapters: &mut Adapters,
    training: LoraTraining,
    tokens: &[u32],
    steps: u64,
    windows: Windows,
    rng: &mut SplitMix64,
    on_step: &mut dyn FnMut(u64, f64),
) -> Result<LoraReport, LlamaError> {
    let mut trainer = LoraTrainer::new(training, adapters);
    let mut total = LoraReport::default();
    let mut sum = 0.0;
    for step in 1..=steps {
        let report = trainer.train(model, adapters, tokens, 1, windows, rng)?;
        sum += report.mean_loss;
        total.steps += report.steps;
        total.tokens += report.tokens;
        total.last_loss = report.last_loss;
        on_step(step, report.last_loss);
    }
    total.mean_loss = sum / steps.max(1) as f64;
    Ok(total)
}

/// A Llama base's side of an adapter round trained in another process (`weft node join
/// --trainer` on a pretrained base): Hugging Face's `config.json` and `tokenizer.json` for the
/// trainer, the round's factors, and the update for what it trained.
pub struct LlamaAdapterJobs {
    config: LlamaConfig,
    tokenizer: Vec<u8>,
}

impl LlamaAdapterJobs {
    /// `tokenizer` is the base's `tokenizer.json`, as the node's kit holds it.
    pub fn new(config: LlamaConfig, tokenizer: impl Into<Vec<u8>>) -> Self {
        LlamaAdapterJobs { config, tokenizer: tokenizer.into() }
    }
}

impl AdapterJobForm for LlamaAdapterJobs {
    fn family(&self) -> &'static str {
        "llama"
    }

    fn configuration(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn tokenizer(&self) -> &[u8] {
        &self.tokenizer
    }

    fn optimizer(&self, lr: f32) -> AdamWSettings {
        let built_in = LoraTraining { lr, ..LoraTraining::default() };
        AdamWSettings {
            lr,
            beta1: built_in.beta1,
            beta2: built_in.beta2,
            eps: built_in.eps,
            weight_decay: built_in.weight_decay,
            warmup_steps: 0,
            clip_norm: built_in.clip_norm,
        }
    }

    fn initial(&self, round: &AdapterRound) -> Result<ModelState, FamilyError> {
        Ok(RoundAdapter::new(&self.config, round)?.initial().to_state())
    }

    fn update_of(&self, round: &AdapterRound, trained: &ModelState) -> Result<ModelState, FamilyError> {
        let form = RoundAdapter::new(&self.config, round)?;
        let initial = form.initial();
        if !form.trains_a() {
            for (name, frozen) in initial.to_state().iter().filter(|(name, _)| name.ends_with(".lora_A.weight")) {
                let same = trained.get(name).is_some_and(|t| {
                    t.data().len() == frozen.data().len()
                        && t.data().iter().zip(frozen.data()).all(|(x, y)| x.to_bits() == y.to_bits())
                });
                if !same {
                    return Err(format!(
                        "the trainer changed `{name}`, a factor this round keeps frozen (the shared track trains the B factors only)"
                    )
                    .into());
                }
            }
        }
        let adapters = Adapters::from_state(&self.config, initial.spec().clone(), trained)?;
        Ok(form.update_of(&adapters)?)
    }
}

/// How one node trains every adapter round: the model's configuration and the node's text.
#[derive(Clone, Debug)]
pub struct LoraNodeTrainer {
    pub config: LlamaConfig,
    /// The node's training text, tokenized once.
    pub tokens: Vec<u32>,
    /// Record-level DP-SGD (records are disjoint windows of the training context); absent: plain
    /// AdamW on windows drawn with the round's stream.
    pub privacy: Option<weft_model::PrivateTraining>,
}

impl LoraNodeTrainer {
    /// Trains round `round`'s adapter `record` on `model` (the round's base, already built: one
    /// copy can serve every node of a process in turn).
    pub fn train_on(
        &self,
        model: &Llama,
        round: u64,
        record: &AdapterRound,
        settings: &AdapterTraining,
        rng: &mut SplitMix64,
        on_step: &mut dyn FnMut(u64, f64),
    ) -> Result<TrainedAdapter, FamilyError> {
        if settings.steps == 0 || settings.batch == 0 || settings.context < 2 {
            return Err(format!(
                "adapter training needs at least one step of one window of two tokens, got {settings:?}"
            )
            .into());
        }
        if settings.context > self.config.max_position_embeddings {
            return Err(format!(
                "a training window of {} tokens exceeds the model's {} positions",
                settings.context, self.config.max_position_embeddings
            )
            .into());
        }
        if self.tokens.len() < settings.context {
            return Err(format!(
                "the node's text has {} tokens, fewer than one training window of {}",
                self.tokens.len(),
                settings.context
            )
            .into());
        }
        let form = RoundAdapter::new(&self.config, record)?;
        let mut adapters = form.initial().clone();
        // Nodes train A as well only on the full track.
        let training = LoraTraining { lr: settings.lr, train_a: form.trains_a(), ..LoraTraining::default() };
        let windows = Windows { rows: settings.batch, context: settings.context };
        let (report, dp) = match &self.privacy {
            Some(private) => {
                let mut trainer = LoraTrainer::new(training, &adapters);
                let (report, dp) = trainer.train_private(
                    model,
                    &mut adapters,
                    &self.tokens,
                    settings.steps,
                    settings.context,
                    private,
                    round,
                    on_step,
                )?;
                (report, Some(dp))
            }
            None => (
                train_steps(model, &mut adapters, training, &self.tokens, settings.steps, windows, rng, on_step)?,
                None,
            ),
        };
        Ok(TrainedAdapter {
            update: form.update_of(&adapters)?,
            adapter: adapters.to_state(),
            steps: report.steps,
            tokens: report.tokens,
            mean_loss: report.mean_loss,
            last_loss: report.last_loss,
            dp,
        })
    }
}

impl AdapterTrainer for LoraNodeTrainer {
    fn train_round(
        &mut self,
        round_number: u64,
        base: &ModelState,
        round: &AdapterRound,
        settings: &AdapterTraining,
        rng: &mut SplitMix64,
        on_step: &mut dyn FnMut(u64, f64),
    ) -> Result<TrainedAdapter, FamilyError> {
        let model = Llama::from_state(self.config.clone(), base)?;
        self.train_on(&model, round_number, round, settings, rng, on_step)
    }

    fn with_privacy(&mut self, private: weft_model::PrivateTraining) -> Result<(), FamilyError> {
        self.privacy = Some(private);
        Ok(())
    }
}
