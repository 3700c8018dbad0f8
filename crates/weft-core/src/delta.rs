//! A delta: what a node's local training changed, `local − base`, tensor by tensor.

use crate::hash::ContentHash;
use crate::state::{ModelState, StateError};
use crate::tensor::Tensor;

/// `local − base` with exactly the base's names and shapes. Only deltas cross the node boundary.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta(ModelState);

impl Delta {
    /// `local − base`; fails if the two states do not have the same layout.
    pub fn between(base: &ModelState, local: &ModelState) -> Result<Self, StateError> {
        local.check_layout(base)?;
        let mut out = ModelState::new();
        for (name, b) in base.iter() {
            // check_layout guarantees the name exists with the same shape.
            let l = local.get(name).ok_or_else(|| StateError::MissingTensor { name: name.to_owned() })?;
            let data = l.data().iter().zip(b.data()).map(|(l, b)| l - b).collect();
            let tensor = Tensor::new(b.shape().to_vec(), data).map_err(|e| StateError::Format(e.to_string()))?;
            out.insert(name, tensor);
        }
        Ok(Delta(out))
    }

    /// Wraps tensors received from elsewhere; check them with [`crate::contribution::check`].
    pub fn from_state(state: ModelState) -> Self {
        Delta(state)
    }

    pub fn state(&self) -> &ModelState {
        &self.0
    }

    pub fn into_state(self) -> ModelState {
        self.0
    }

    pub fn content_hash(&self) -> ContentHash {
        self.0.content_hash()
    }

    /// `base + scale · self` as a new state (a candidate base, for measuring this delta alone).
    pub fn applied_to(&self, base: &ModelState, scale: f32) -> Result<ModelState, StateError> {
        self.0.check_layout(base)?;
        let mut out = base.clone();
        for (name, tensor) in out.iter_mut() {
            let d = self.0.get(name).ok_or_else(|| StateError::MissingTensor { name: name.to_owned() })?;
            for (v, dv) in tensor.data_mut().iter_mut().zip(d.data()) {
                *v += scale * dv;
            }
        }
        Ok(out)
    }

    /// L2 norm over every value.
    pub fn norm(&self) -> f64 {
        self.0.iter().map(|(_, t)| t.squared_norm()).sum::<f64>().sqrt()
    }

    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|(_, t)| t.data().iter().all(|&v| v == 0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(values: &[f32]) -> ModelState {
        let mut s = ModelState::new();
        s.insert("w", Tensor::new(vec![values.len()], values.to_vec()).unwrap());
        s
    }

    #[test]
    fn between_then_apply_recovers_local() {
        let base = state(&[1.0, 2.0, 3.0]);
        let local = state(&[1.5, 2.0, 2.0]);
        let delta = Delta::between(&base, &local).unwrap();
        assert_eq!(delta.state().get("w").unwrap().data(), &[0.5, 0.0, -1.0]);
        assert_eq!(delta.applied_to(&base, 1.0).unwrap(), local);
        assert!(!delta.is_zero());
        assert!((delta.norm() - 1.25f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn between_refuses_a_different_layout() {
        let base = state(&[1.0, 2.0]);
        let local = state(&[1.0, 2.0, 3.0]);
        assert!(matches!(Delta::between(&base, &local), Err(StateError::Shape { .. })));
    }
}
