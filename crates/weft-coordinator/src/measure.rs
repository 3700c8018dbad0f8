//! How the coordinator measures a model: held-out loss per language on text no node trains on.

use std::collections::BTreeMap;
use std::sync::Arc;

use weft_core::quality::LossTable;
use weft_core::ModelState;
use weft_model::{Evaluator, FamilyError, ModelFamily};

/// Anything that can score a model state on the consortium's held-out sets.
pub trait Measure {
    /// Held-out loss per language in nats per byte.
    fn heldout_loss(&mut self, state: &ModelState) -> Result<LossTable, MeasureError>;
    /// The languages scored, in order.
    fn languages(&self) -> Vec<String>;
}

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("cannot evaluate the model ({family}): {source}")]
    Model { family: &'static str, source: FamilyError },
    #[error("held-out set for '{0}' is too short to score (needs at least 2 bytes)")]
    Empty(String),
}

/// The consortium's held-out text, one set per language, scored with the consortium's model
/// family (whichever it is).
pub struct HeldoutSet {
    family: Arc<dyn ModelFamily>,
    texts: BTreeMap<String, Vec<u8>>,
    evaluator: Box<dyn Evaluator>,
}

impl HeldoutSet {
    pub fn new(family: Arc<dyn ModelFamily>, texts: BTreeMap<String, Vec<u8>>) -> Result<Self, MeasureError> {
        if let Some((language, _)) = texts.iter().find(|(_, t)| t.len() < 2) {
            return Err(MeasureError::Empty(language.clone()));
        }
        let evaluator = family.evaluator().map_err(|source| MeasureError::Model { family: family.name(), source })?;
        Ok(HeldoutSet { family, texts, evaluator })
    }

    pub fn bytes(&self) -> usize {
        self.texts.values().map(Vec::len).sum()
    }

    pub fn family(&self) -> &Arc<dyn ModelFamily> {
        &self.family
    }
}

impl Measure for HeldoutSet {
    fn heldout_loss(&mut self, state: &ModelState) -> Result<LossTable, MeasureError> {
        let family = self.family.name();
        let model = |source| MeasureError::Model { family, source };
        self.evaluator.load(state).map_err(model)?;
        let mut table = LossTable::new();
        for (language, text) in &self.texts {
            table.insert(language.clone(), self.evaluator.nats_per_byte(text).map_err(model)?);
        }
        Ok(table)
    }

    fn languages(&self) -> Vec<String> {
        self.texts.keys().cloned().collect()
    }
}

/// A cheap deterministic stand-in for a held-out set, for benchmarks and tests of the
/// machinery around measurement (storage, transport, ledger) at sizes the built-in model cannot
/// evaluate quickly: the "loss" is the mean squared distance of the first tensor's first
/// `sample` values to 1.0. It says nothing about language quality.
pub struct SampledDistance {
    pub sample: usize,
}

impl Measure for SampledDistance {
    fn heldout_loss(&mut self, state: &ModelState) -> Result<LossTable, MeasureError> {
        let (_, t) = state.iter().next().ok_or_else(|| MeasureError::Empty("state".into()))?;
        let values = &t.data()[..t.data().len().min(self.sample.max(1))];
        let loss = values.iter().map(|v| f64::from(v - 1.0).powi(2)).sum::<f64>() / values.len().max(1) as f64;
        Ok(LossTable::from([("sample".to_owned(), loss)]))
    }

    fn languages(&self) -> Vec<String> {
        vec!["sample".into()]
    }
}
