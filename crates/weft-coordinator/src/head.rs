//! The coordinator's head on the model side: the shared base and what moves with it from round
//! to round (the outer optimizer's momentum, centered clipping's center), loaded from and stored
//! to the blob store in one place each, for the round engine, restarts, rollback and
//! `weft ledger verify`'s replay alike.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_core::quality::LossTable;
use weft_core::{ContentHash, ModelState, OuterState, StateError, Tensor};

use crate::store::{BlobStore, StoreError};

/// The model-side state by blob hash: what the journal keeps and the ledger names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRefs {
    pub base_hash: ContentHash,
    /// The outer optimizer's state (momentum), stored as a blob; `null` when it holds nothing.
    pub outer_state: Option<ContentHash>,
    /// Centered clipping's center, stored as a blob; `null` when there is none.
    pub center: Option<ContentHash>,
}

/// What one round's aggregation moves: the base, the outer optimizer's momentum (per tensor) and
/// centered clipping's center.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelPoint {
    pub base: ModelState,
    pub momentum: BTreeMap<String, OuterState>,
    pub center: Option<ModelState>,
}

impl ModelPoint {
    /// A point with no momentum and no center: the genesis.
    pub fn new(base: ModelState) -> Self {
        ModelPoint { base, momentum: BTreeMap::new(), center: None }
    }

    /// Reads the point `refs` names, every blob checked against its hash.
    pub fn load(store: &dyn BlobStore, refs: &ModelRefs) -> Result<Self, StoreError> {
        let base = store.open(&refs.base_hash)?.state()?;
        let momentum = match &refs.outer_state {
            Some(hash) => momentum_from_state(store.open(hash)?.state()?),
            None => BTreeMap::new(),
        };
        let center = refs.center.as_ref().map(|hash| store.open(hash)?.state()).transpose()?;
        Ok(ModelPoint { base, momentum, center })
    }

    /// Stores base, momentum and center as blobs (before anything refers to them) and returns
    /// their hashes.
    pub fn store(&self, store: &dyn BlobStore) -> Result<ModelRefs, StoreError> {
        let base_hash = store.put(&self.base)?;
        let outer_state = match self
            .momentum_state()
            .map_err(|source| StoreError::Format { location: "the outer optimizer's state".into(), source })?
        {
            Some(state) => Some(store.put(&state)?),
            None => None,
        };
        let center = self.center.as_ref().map(|c| store.put(c)).transpose()?;
        Ok(ModelRefs { base_hash, outer_state, center })
    }

    /// The hashes [`store`](Self::store) would return, without storing anything.
    pub fn refs(&self) -> Result<ModelRefs, StateError> {
        Ok(ModelRefs {
            base_hash: self.base.content_hash(),
            outer_state: self.momentum_state()?.map(|s| s.content_hash()),
            center: self.center.as_ref().map(ModelState::content_hash),
        })
    }

    /// The momentum as a storable state (tensors shaped as the base's); `None` when it holds
    /// nothing.
    fn momentum_state(&self) -> Result<Option<ModelState>, StateError> {
        let mut state = ModelState::new();
        for (name, tensor) in self.base.iter() {
            if let Some(s) = self.momentum.get(name).filter(|s| !s.velocity.is_empty()) {
                let velocity =
                    Tensor::new(tensor.shape().to_vec(), s.velocity.clone()).map_err(|_| StateError::Shape {
                        name: name.to_owned(),
                        expected: tensor.shape().to_vec(),
                        got: vec![s.velocity.len()],
                    })?;
                state.insert(name, velocity);
            }
        }
        Ok((!state.is_empty()).then_some(state))
    }
}

fn momentum_from_state(state: ModelState) -> BTreeMap<String, OuterState> {
    state.iter().map(|(name, t)| (name.to_owned(), OuterState { velocity: t.data().to_vec() })).collect()
}

/// The coordinator's model-side head: the point, its blob hashes and the base's held-out loss.
/// In memory-only mode nothing is stored, so only the base is named (`refs.outer_state` and
/// `refs.center` stay `None`: the optimizer state is neither copied nor hashed).
#[derive(Clone, Debug)]
pub struct ModelHead {
    pub point: ModelPoint,
    pub refs: ModelRefs,
    pub base_loss: LossTable,
}

impl ModelHead {
    pub fn base(&self) -> &ModelState {
        &self.point.base
    }

    pub fn base_hash(&self) -> ContentHash {
        self.refs.base_hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryBlobStore;

    #[test]
    fn a_point_reads_back_as_stored_with_the_hashes_it_promised() {
        let mut base = ModelState::new();
        base.insert("w", Tensor::new(vec![2], vec![1.0, 2.0]).unwrap());
        base.insert("b", Tensor::new(vec![1], vec![0.5]).unwrap());
        let mut point = ModelPoint::new(base.clone());
        let store = MemoryBlobStore::new();
        let bare = point.store(&store).unwrap();
        assert_eq!(bare, ModelRefs { base_hash: base.content_hash(), outer_state: None, center: None });
        point.momentum.insert("w".into(), OuterState { velocity: vec![0.1, -0.1] });
        point.center = Some(base.zeros_like());
        let refs = point.store(&store).unwrap();
        assert_eq!(Ok(refs), point.refs());
        assert!(refs.outer_state.is_some() && refs.center.is_some());
        let loaded = ModelPoint::load(&store, &refs).unwrap();
        assert_eq!(loaded.base, point.base);
        assert_eq!(loaded.center, point.center);
        assert_eq!(loaded.momentum["w"], point.momentum["w"]);
    }
}
