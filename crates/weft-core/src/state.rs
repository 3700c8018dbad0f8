//! Named-tensor model state: what every trainer, node and coordinator exchange.
//!
//! A [`ModelState`] is a sorted map from tensor name to f32 [`Tensor`]. Its canonical
//! [`content_hash`](ModelState::content_hash) identifies a base or a delta independently of how it
//! was stored; [`to_safetensors`](ModelState::to_safetensors) and
//! [`from_safetensors`](ModelState::from_safetensors) read and write the Hugging Face format.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::hash::ContentHash;
use crate::tensor::{numel, Tensor};

/// Domain-separation prefix of the canonical hash: bump it if the canonical form ever changes.
const HASH_DOMAIN: &[u8] = b"weft.model-state.v1\0";

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelState {
    tensors: BTreeMap<String, Tensor>,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum StateError {
    #[error("not a readable safetensors file: {0}")]
    Format(String),
    #[error("tensor '{name}' has dtype {dtype}; weft exchanges f32 only")]
    Dtype { name: String, dtype: String },
    #[error("tensor '{name}' is missing")]
    MissingTensor { name: String },
    #[error("tensor '{name}' is not expected here")]
    UnexpectedTensor { name: String },
    #[error("tensor '{name}' has shape {got:?}, expected {expected:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("tensor '{name}' holds a non-finite value at index {index}")]
    NonFinite { name: String, index: usize },
    #[error("{got} values for a layout of {expected}")]
    FlatLength { expected: usize, got: usize },
}

impl ModelState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Option<Tensor> {
        self.tensors.insert(name.into(), tensor)
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.tensors.get_mut(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// Tensors in canonical (byte-wise sorted name) order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(name, tensor)| (name.as_str(), tensor))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.tensors.iter_mut().map(|(name, tensor)| (name.as_str(), tensor))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_values(&self) -> usize {
        self.tensors.values().map(Tensor::len).sum()
    }

    /// Every value in canonical (name) order, as one vector: secure aggregation masks one.
    pub fn flat_values(&self) -> Vec<f32> {
        let mut values = Vec::with_capacity(self.num_values());
        for tensor in self.tensors.values() {
            values.extend_from_slice(tensor.data());
        }
        values
    }

    /// `layout`'s names and shapes holding `values` in canonical order (the inverse of
    /// [`flat_values`](Self::flat_values)).
    pub fn from_flat(layout: &ModelState, values: &[f32]) -> Result<Self, StateError> {
        let expected = layout.num_values();
        if values.len() != expected {
            return Err(StateError::FlatLength { expected, got: values.len() });
        }
        let mut tensors = BTreeMap::new();
        let mut at = 0;
        for (name, t) in &layout.tensors {
            let n = t.len();
            let tensor = Tensor::new(t.shape().to_vec(), values[at..at + n].to_vec())
                .map_err(|e| StateError::FlatLength { expected: e.expected, got: e.got })?;
            tensors.insert(name.clone(), tensor);
            at += n;
        }
        Ok(ModelState { tensors })
    }

    /// The same names and shapes, all zeros.
    pub fn zeros_like(&self) -> Self {
        let tensors = self.tensors.iter().map(|(name, t)| (name.clone(), Tensor::zeros(t.shape().to_vec()))).collect();
        ModelState { tensors }
    }

    /// BLAKE3 over the canonical form: the tensor count, then every tensor in byte-wise sorted
    /// name order (see [`CanonicalHasher::tensor`]).
    pub fn content_hash(&self) -> ContentHash {
        let mut hasher = CanonicalHasher::new(self.tensors.len());
        for (name, tensor) in &self.tensors {
            hasher.tensor(name, tensor.shape(), tensor.data());
        }
        hasher.finish()
    }

    /// Checks that `self` has exactly the names and shapes of `reference`.
    pub fn check_layout(&self, reference: &ModelState) -> Result<(), StateError> {
        for (name, expected) in &reference.tensors {
            let Some(got) = self.tensors.get(name) else {
                return Err(StateError::MissingTensor { name: name.clone() });
            };
            if got.shape() != expected.shape() {
                return Err(StateError::Shape {
                    name: name.clone(),
                    expected: expected.shape().to_vec(),
                    got: got.shape().to_vec(),
                });
            }
        }
        if let Some(name) = self.tensors.keys().find(|n| !reference.tensors.contains_key(*n)) {
            return Err(StateError::UnexpectedTensor { name: name.clone() });
        }
        Ok(())
    }

    /// The first NaN or infinite value, by tensor name and flat index.
    pub fn check_finite(&self) -> Result<(), StateError> {
        for (name, tensor) in &self.tensors {
            if let Some(index) = tensor.first_non_finite() {
                return Err(StateError::NonFinite { name: name.clone(), index });
            }
        }
        Ok(())
    }

    /// Encodes as safetensors (f32, little-endian), with optional string metadata.
    pub fn to_safetensors(&self, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>, StateError> {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let raw = t.data().iter().flat_map(|v| v.to_le_bytes()).collect();
                (name.clone(), t.shape().to_vec(), raw)
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, shape, raw)| {
                TensorView::new(Dtype::F32, shape.clone(), raw)
                    .map(|view| (name.as_str(), view))
                    .map_err(|e| StateError::Format(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize(views, metadata).map_err(|e| StateError::Format(e.to_string()))
    }

    /// The first bytes of [`to_safetensors(None)`](Self::to_safetensors) for f32 tensors of these
    /// names and shapes: the 8-byte header length and the JSON header, padded to 8 bytes. Built
    /// with the safetensors crate's own header type, so that a stored file can be checked to be
    /// canonical without re-encoding its data.
    pub fn canonical_header<'a>(
        tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> Result<Vec<u8>, StateError> {
        use safetensors::tensor::{Metadata, TensorInfo};
        let mut sorted: Vec<(&str, &[usize])> = tensors.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let mut offset = 0;
        let mut infos = Vec::with_capacity(sorted.len());
        for (name, shape) in sorted {
            let len = numel(shape).saturating_mul(4);
            infos.push((
                name.to_owned(),
                TensorInfo { dtype: Dtype::F32, shape: shape.to_vec(), data_offsets: (offset, offset + len) },
            ));
            offset += len;
        }
        let metadata = Metadata::new(None, infos).map_err(|e| StateError::Format(e.to_string()))?;
        let mut json = serde_json::to_string(&metadata).map_err(|e| StateError::Format(e.to_string()))?.into_bytes();
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut header = (json.len() as u64).to_le_bytes().to_vec();
        header.extend_from_slice(&json);
        Ok(header)
    }

    /// Decodes a safetensors buffer. Only f32 tensors are accepted; shapes and offsets are
    /// validated by the safetensors parser, values are not (see [`check_finite`](Self::check_finite)).
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, StateError> {
        let file = SafeTensors::deserialize(bytes).map_err(|e| StateError::Format(e.to_string()))?;
        let mut state = ModelState::new();
        for (name, view) in file.iter() {
            state.insert(name, tensor_from_view(name, &view)?);
        }
        Ok(state)
    }

    /// The `__metadata__` strings of a safetensors buffer.
    pub fn safetensors_metadata(bytes: &[u8]) -> Result<HashMap<String, String>, StateError> {
        let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| StateError::Format(e.to_string()))?;
        Ok(metadata.metadata().clone().unwrap_or_default())
    }
}

/// The canonical hash fed one tensor at a time, in sorted-name order, so that a state streamed
/// from disk can be verified without holding it whole. [`ModelState::content_hash`] is this over
/// every tensor.
pub struct CanonicalHasher {
    hasher: blake3::Hasher,
}

impl CanonicalHasher {
    pub fn new(tensor_count: usize) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(HASH_DOMAIN);
        hasher.update(&(tensor_count as u64).to_le_bytes());
        CanonicalHasher { hasher }
    }

    /// The name, the dtype, the shape and the little-endian bytes, each length-prefixed so no two
    /// states collide by re-splitting the same bytes.
    pub fn tensor(&mut self, name: &str, shape: &[usize], data: &[f32]) {
        self.begin_tensor(name, shape, data.len());
        self.update(data);
    }

    /// Starts a tensor of `len` values whose data will follow through [`update`](Self::update).
    pub fn begin_tensor(&mut self, name: &str, shape: &[usize], len: usize) {
        let h = &mut self.hasher;
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(b"F32");
        h.update(&(shape.len() as u64).to_le_bytes());
        for &dim in shape {
            h.update(&(dim as u64).to_le_bytes());
        }
        h.update(&((len * 4) as u64).to_le_bytes());
    }

    /// The next values of the current tensor as little-endian bytes (as stored in safetensors),
    /// hashed without conversion.
    pub fn update_le_bytes(&mut self, bytes: &[u8]) {
        // BLAKE3's tree splits large inputs across threads with the same result.
        if bytes.len() >= 1 << 20 {
            self.hasher.update_rayon(bytes);
        } else {
            self.hasher.update(bytes);
        }
    }

    /// The next values of the current tensor, in order.
    pub fn update(&mut self, data: &[f32]) {
        #[cfg(target_endian = "little")]
        {
            // SAFETY: f32 has no padding and any alignment satisfies u8; on a little-endian
            // machine these bytes are exactly the canonical little-endian form.
            let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) };
            self.update_le_bytes(bytes);
        }
        #[cfg(not(target_endian = "little"))]
        self.update_converted(data);
    }

    #[cfg(not(target_endian = "little"))]
    fn update_converted(&mut self, data: &[f32]) {
        // In blocks, so that a large tensor needs no second full-size byte copy.
        let mut block = Vec::with_capacity(16 * 1024);
        for chunk in data.chunks(4096) {
            block.clear();
            block.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
            self.hasher.update(&block);
        }
    }

    pub fn finish(self) -> ContentHash {
        ContentHash(*self.hasher.finalize().as_bytes())
    }
}

/// Decodes one f32 safetensors view into `out`, reusing its allocation.
pub fn decode_f32_into(name: &str, view: &TensorView<'_>, out: &mut Vec<f32>) -> Result<(), StateError> {
    if view.dtype() != Dtype::F32 {
        return Err(StateError::Dtype { name: name.to_owned(), dtype: format!("{:?}", view.dtype()) });
    }
    let raw = view.data();
    if raw.len() != numel(view.shape()).saturating_mul(4) {
        return Err(StateError::Format(format!(
            "tensor '{name}' has {} bytes for shape {:?}",
            raw.len(),
            view.shape()
        )));
    }
    out.clear();
    out.extend(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
    Ok(())
}

fn tensor_from_view(name: &str, view: &TensorView<'_>) -> Result<Tensor, StateError> {
    let mut data = Vec::new();
    decode_f32_into(name, view, &mut data)?;
    Tensor::new(view.shape().to_vec(), data).map_err(|e| StateError::Format(format!("tensor '{name}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ModelState {
        let mut state = ModelState::new();
        state.insert("b", Tensor::new(vec![2], vec![1.0, -2.0]).unwrap());
        state.insert("a", Tensor::new(vec![2, 2], vec![0.5, 0.25, -0.0, 3.0]).unwrap());
        state
    }

    #[test]
    fn safetensors_round_trip_keeps_hash() {
        let state = sample();
        let bytes = state.to_safetensors(None).unwrap();
        let back = ModelState::from_safetensors(&bytes).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.content_hash(), state.content_hash());
    }

    #[test]
    fn flat_values_follow_name_order_and_come_back() {
        let state = sample();
        let flat = state.flat_values();
        assert_eq!(flat, vec![0.5, 0.25, -0.0, 3.0, 1.0, -2.0]);
        assert_eq!(ModelState::from_flat(&state, &flat).unwrap(), state);
        assert_eq!(
            ModelState::from_flat(&state, &flat[1..]).unwrap_err(),
            StateError::FlatLength { expected: 6, got: 5 }
        );
    }

    proptest::proptest! {
        /// The header written by `to_safetensors` is exactly `canonical_header`, whatever the
        /// names (including ones that sort differently as bytes and as chars) and shapes.
        #[test]
        fn canonical_header_is_the_prefix_to_safetensors_writes(
            shapes in proptest::collection::btree_map("[a-zA-Z_.0-9é]{1,12}", proptest::collection::vec(0usize..4, 0..3), 1..6)
        ) {
            let mut state = ModelState::new();
            for (name, shape) in &shapes {
                state.insert(name.clone(), Tensor::zeros(shape.clone()));
            }
            let bytes = state.to_safetensors(None).unwrap();
            let header = ModelState::canonical_header(state.iter().map(|(n, t)| (n, t.shape()))).unwrap();
            proptest::prop_assert_eq!(&bytes[..header.len()], &header[..]);
            let data: usize = state.iter().map(|(_, t)| t.data().len() * 4).sum();
            proptest::prop_assert_eq!(bytes.len(), header.len() + data);
        }
    }

    #[test]
    fn metadata_round_trips() {
        let meta = HashMap::from([("round".to_owned(), "3".to_owned())]);
        let bytes = sample().to_safetensors(Some(meta.clone())).unwrap();
        assert_eq!(ModelState::safetensors_metadata(&bytes).unwrap(), meta);
    }

    #[test]
    fn hash_sees_every_part() {
        let base = sample().content_hash();
        let mut changed_value = sample();
        changed_value.get_mut("a").unwrap().data_mut()[3] = 3.0000002;
        let mut changed_shape = sample();
        changed_shape.insert("a", Tensor::new(vec![4], vec![0.5, 0.25, -0.0, 3.0]).unwrap());
        let mut renamed = sample();
        let t = renamed.remove("b").unwrap();
        renamed.insert("c", t);
        let mut signed_zero = sample();
        signed_zero.get_mut("a").unwrap().data_mut()[2] = 0.0;
        for other in [changed_value, changed_shape, renamed, signed_zero] {
            assert_ne!(other.content_hash(), base);
        }
    }

    #[test]
    fn rejects_non_f32_and_garbage() {
        let raw = [0u8; 4];
        let view = TensorView::new(Dtype::I32, vec![1], &raw).unwrap();
        let bytes = safetensors::serialize([("x", view)], None).unwrap();
        assert!(matches!(ModelState::from_safetensors(&bytes), Err(StateError::Dtype { .. })));
        assert!(matches!(ModelState::from_safetensors(b"garbage"), Err(StateError::Format(_))));
        assert!(matches!(ModelState::from_safetensors(&[]), Err(StateError::Format(_))));
    }

    #[test]
    fn layout_check_names_the_tensor() {
        let base = sample();
        let mut missing = sample();
        missing.remove("a");
        assert_eq!(missing.check_layout(&base), Err(StateError::MissingTensor { name: "a".into() }));
        let mut extra = sample();
        extra.insert("z", Tensor::zeros(vec![1]));
        assert_eq!(extra.check_layout(&base), Err(StateError::UnexpectedTensor { name: "z".into() }));
        let mut reshaped = sample();
        reshaped.insert("b", Tensor::zeros(vec![3]));
        assert!(matches!(reshaped.check_layout(&base), Err(StateError::Shape { .. })));
        let mut nan = sample();
        nan.get_mut("b").unwrap().data_mut()[1] = f32::NAN;
        assert_eq!(nan.check_finite(), Err(StateError::NonFinite { name: "b".into(), index: 1 }));
    }
}
