//! How the coordinator measures a model: held-out loss per language on text no node trains on.

use std::collections::BTreeMap;
use std::sync::Arc;

use weft_core::quality::LossTable;
use weft_core::{ContentHash, ItemLosses, ModelState};
use weft_model::{Evaluator, FamilyError, ModelFamily};

/// Anything that can score a model state on the consortium's held-out sets.
pub trait Measure {
    /// Held-out loss per language in nats per byte.
    fn heldout_loss(&mut self, state: &ModelState) -> Result<LossTable, MeasureError>;
    /// The languages scored, in order.
    fn languages(&self) -> Vec<String>;
    /// Loss per item (document) of each language's held-out set, items in a fixed order: what
    /// the champion–challenger gauntlet compares pairwise. A measure without items refuses.
    fn item_losses(&mut self, state: &ModelState) -> Result<ItemLosses, MeasureError> {
        let _ = state;
        Err(MeasureError::NoItems)
    }
    /// BLAKE3 of the items [`item_losses`](Self::item_losses) scores (the ledger records it, so
    /// that a change of items between rounds shows).
    fn items_hash(&self) -> ContentHash {
        ContentHash([0; 32])
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("cannot evaluate the model ({family}): {source}")]
    Model { family: &'static str, source: FamilyError },
    #[error("held-out set for '{0}' is too short to score (needs at least 2 bytes)")]
    Empty(String),
    #[error("this measure scores no items, so the gauntlet cannot compare models pairwise")]
    NoItems,
}

/// An item of a held-out set is a run of whole lines of at least this many bytes (the last may be
/// longer): long enough that its loss is not noise, short enough for tens of items per language.
pub const ITEM_BYTES: usize = 256;

/// Splits a held-out text into items: consecutive whole lines, each item at least
/// [`ITEM_BYTES`] long; a short tail joins the item before it. Never splits inside a line, so
/// never inside a character.
pub fn split_items(text: &[u8]) -> Vec<&[u8]> {
    let mut items = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'\n' && i + 1 - start >= ITEM_BYTES {
            items.push(&text[start..=i]);
            start = i + 1;
        }
        i += 1;
    }
    if start < text.len() {
        match items.pop() {
            // `last` ends where the tail starts.
            Some(last) if text.len() - start < ITEM_BYTES / 2 => items.push(&text[start - last.len()..]),
            Some(last) => {
                items.push(last);
                items.push(&text[start..]);
            }
            None => items.push(&text[start..]),
        }
    }
    items
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

    fn item_losses(&mut self, state: &ModelState) -> Result<ItemLosses, MeasureError> {
        let family = self.family.name();
        let model = |source| MeasureError::Model { family, source };
        self.evaluator.load(state).map_err(model)?;
        let mut losses = ItemLosses::new();
        for (language, text) in &self.texts {
            let items = split_items(text)
                .into_iter()
                .filter(|item| item.len() >= 2)
                .map(|item| self.evaluator.nats_per_byte(item).map_err(model))
                .collect::<Result<Vec<f64>, _>>()?;
            losses.insert(language.clone(), items);
        }
        Ok(losses)
    }

    fn items_hash(&self) -> ContentHash {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"weft-heldout-items/1\n");
        for (language, text) in &self.texts {
            for item in split_items(text).into_iter().filter(|item| item.len() >= 2) {
                hasher.update(language.as_bytes());
                hasher.update(&[0]);
                hasher.update(&(item.len() as u64).to_le_bytes());
                hasher.update(item);
            }
        }
        ContentHash(*hasher.finalize().as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_whole_lines_that_cover_the_text_in_order() {
        // 39-byte lines: 7 make an item (273 bytes).
        let line = "a line of text, thirty-odd bytes long.\n";
        let text = line.repeat(40) + "a tail";
        let items = split_items(text.as_bytes());
        assert_eq!(items.len(), 6);
        assert_eq!(items.concat(), text.as_bytes());
        for item in &items[..items.len() - 1] {
            assert!(item.len() >= ITEM_BYTES && item.ends_with(b"\n"));
        }
        // A remainder of at least half an item is an item of its own …
        assert_eq!(items[5].len(), 5 * 39 + 6);
        // … a shorter one joins the item before it.
        let text = line.repeat(35) + "a tail";
        let items = split_items(text.as_bytes());
        assert_eq!(items.len(), 5);
        assert_eq!(items[4].len(), 7 * 39 + 6);
        assert_eq!(items.concat(), text.as_bytes());
        assert_eq!(split_items(b"one line"), vec![&b"one line"[..]]);
        assert!(split_items(b"").is_empty());
        let cjk = "世界人权宣言\n".repeat(30);
        for item in split_items(cjk.as_bytes()) {
            assert!(std::str::from_utf8(item).is_ok());
        }
    }
}
