//! How a delta travels: f32 (lossless), f16, bf16, or blockwise int8. Every encoding is a
//! safetensors file, so any tool can read what was sent.
//!
//! A node signs the content hash of the delta *as the coordinator will decode it*
//! ([`sent_hash`]), so a lossy encoding is checked exactly like a lossless one.

use std::str::FromStr;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use weft_core::{ContentHash, ModelState, StateError, Tensor};

use crate::proto;

/// Values per int8 block; each block has its own f32 scale.
pub const INT8_BLOCK: usize = 256;
const SCALE_SUFFIX: &str = "#scale";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    F32,
    F16,
    Bf16,
    Int8,
}

#[derive(Debug, thiserror::Error)]
pub enum EncodingError {
    #[error("unknown encoding '{0}' (f32, f16, bf16, int8)")]
    Unknown(String),
    #[error("not a readable {encoding:?} delta: {detail}")]
    Malformed { encoding: Encoding, detail: String },
    #[error(transparent)]
    State(#[from] StateError),
}

impl FromStr for Encoding {
    type Err = EncodingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Encoding::F32),
            "f16" => Ok(Encoding::F16),
            "bf16" => Ok(Encoding::Bf16),
            "int8" => Ok(Encoding::Int8),
            other => Err(EncodingError::Unknown(other.to_owned())),
        }
    }
}

impl Encoding {
    pub fn to_proto(self) -> proto::Encoding {
        match self {
            Encoding::F32 => proto::Encoding::F32,
            Encoding::F16 => proto::Encoding::F16,
            Encoding::Bf16 => proto::Encoding::Bf16,
            Encoding::Int8 => proto::Encoding::Int8,
        }
    }

    pub fn from_proto(value: i32) -> Option<Self> {
        match proto::Encoding::try_from(value).ok()? {
            proto::Encoding::F32 => Some(Encoding::F32),
            proto::Encoding::F16 => Some(Encoding::F16),
            proto::Encoding::Bf16 => Some(Encoding::Bf16),
            proto::Encoding::Int8 => Some(Encoding::Int8),
            proto::Encoding::Unspecified => None,
        }
    }

    /// Largest encoded size of a delta with `values` f32 values (header slack included).
    pub fn max_bytes(self, values: usize, tensors: usize) -> u64 {
        let data = match self {
            Encoding::F32 => values * 4,
            Encoding::F16 | Encoding::Bf16 => values * 2,
            Encoding::Int8 => values + values.div_ceil(INT8_BLOCK) * 4 + tensors * 4,
        };
        (data + 256 * tensors + 4096) as u64
    }
}

fn malformed(encoding: Encoding, detail: impl Into<String>) -> EncodingError {
    EncodingError::Malformed { encoding, detail: detail.into() }
}

/// Encodes a delta for the wire.
pub fn encode(delta: &ModelState, encoding: Encoding) -> Result<Vec<u8>, EncodingError> {
    if encoding == Encoding::F32 {
        return Ok(delta.to_safetensors(None)?);
    }
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, tensor) in delta.iter() {
        let data = tensor.data();
        match encoding {
            Encoding::F16 => {
                let bytes = data.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
                buffers.push((name.to_owned(), Dtype::F16, tensor.shape().to_vec(), bytes));
            }
            Encoding::Bf16 => {
                let bytes = data.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
                buffers.push((name.to_owned(), Dtype::BF16, tensor.shape().to_vec(), bytes));
            }
            Encoding::Int8 => {
                let (q, scales) = quantize(data);
                buffers.push((name.to_owned(), Dtype::I8, tensor.shape().to_vec(), q));
                let scale_bytes = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                buffers.push((format!("{name}{SCALE_SUFFIX}"), Dtype::F32, vec![scales.len()], scale_bytes));
            }
            Encoding::F32 => unreachable!("handled above"),
        }
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| malformed(encoding, e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| malformed(encoding, e.to_string()))
}

/// Symmetric int8 per block: q = round(x / s), s = max|x| / 127 (0 for an all-zero block).
fn quantize(data: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::with_capacity(data.len());
    let mut scales = Vec::with_capacity(data.len().div_ceil(INT8_BLOCK));
    for block in data.chunks(INT8_BLOCK) {
        let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = max / 127.0;
        scales.push(scale);
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        q.extend(block.iter().map(|v| ((v * inverse).round().clamp(-127.0, 127.0) as i8) as u8));
    }
    (q, scales)
}

/// Decodes a delta received on the wire into f32, checking it against the base's layout
/// (names, shapes) as it goes.
pub fn decode(bytes: &[u8], encoding: Encoding, layout: &ModelState) -> Result<ModelState, EncodingError> {
    if encoding == Encoding::F32 {
        return Ok(ModelState::from_safetensors(bytes)?);
    }
    let file = SafeTensors::deserialize(bytes).map_err(|e| malformed(encoding, e.to_string()))?;
    let expected_tensors = layout.len() * if encoding == Encoding::Int8 { 2 } else { 1 };
    if file.len() != expected_tensors {
        return Err(malformed(encoding, format!("{} tensors, expected {expected_tensors}", file.len())));
    }
    let mut state = ModelState::new();
    for (name, reference) in layout.iter() {
        let view = file.tensor(name).map_err(|_| malformed(encoding, format!("tensor '{name}' is missing")))?;
        if view.shape() != reference.shape() {
            return Err(malformed(
                encoding,
                format!("tensor '{name}' has shape {:?}, expected {:?}", view.shape(), reference.shape()),
            ));
        }
        let raw = view.data();
        let values: Vec<f32> = match (encoding, view.dtype()) {
            (Encoding::F16, Dtype::F16) => {
                raw.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            (Encoding::Bf16, Dtype::BF16) => {
                raw.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            (Encoding::Int8, Dtype::I8) => {
                let scale_name = format!("{name}{SCALE_SUFFIX}");
                let scales = file
                    .tensor(&scale_name)
                    .map_err(|_| malformed(encoding, format!("tensor '{scale_name}' is missing")))?;
                let blocks = raw.len().div_ceil(INT8_BLOCK);
                if scales.dtype() != Dtype::F32 || scales.shape() != [blocks] {
                    return Err(malformed(encoding, format!("'{scale_name}' must be {blocks} f32 scales")));
                }
                let scales: Vec<f32> =
                    scales.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                raw.chunks(INT8_BLOCK)
                    .zip(&scales)
                    .flat_map(|(block, &s)| block.iter().map(move |&q| f32::from(q as i8) * s))
                    .collect()
            }
            (_, dtype) => return Err(malformed(encoding, format!("tensor '{name}' has dtype {dtype:?}"))),
        };
        let tensor = Tensor::new(view.shape().to_vec(), values).map_err(|e| malformed(encoding, e.to_string()))?;
        state.insert(name, tensor);
    }
    Ok(state)
}

/// The content hash of `delta` as the coordinator will decode it from `encoded` (its
/// encoding). Lossless f32 decodes to the delta itself: no second copy is made.
pub fn sent_hash(delta: &ModelState, encoded: &[u8], encoding: Encoding) -> Result<ContentHash, EncodingError> {
    match encoding {
        Encoding::F32 => Ok(delta.content_hash()),
        _ => Ok(decode(encoded, encoding, delta)?.content_hash()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta() -> ModelState {
        let mut s = ModelState::new();
        s.insert("w", Tensor::new(vec![3, 200], (0..600).map(|i| ((i as f32) * 0.37).sin() * 1e-3).collect()).unwrap());
        s.insert("b", Tensor::new(vec![5], vec![0.0, 1.5, -2.25, 1e-8, 0.0]).unwrap());
        s
    }

    #[test]
    fn f32_is_lossless_and_canonical() {
        let d = delta();
        let bytes = encode(&d, Encoding::F32).unwrap();
        assert_eq!(bytes, d.to_safetensors(None).unwrap());
        assert_eq!(decode(&bytes, Encoding::F32, &d).unwrap(), d);
        assert_eq!(sent_hash(&d, &bytes, Encoding::F32).unwrap(), d.content_hash());
    }

    #[test]
    fn lossy_encodings_are_close_smaller_and_decode_deterministically() {
        let d = delta();
        let f32_size = encode(&d, Encoding::F32).unwrap().len();
        for (encoding, tolerance) in [(Encoding::F16, 1e-3), (Encoding::Bf16, 8e-3), (Encoding::Int8, 8e-3)] {
            let bytes = encode(&d, encoding).unwrap();
            assert!(bytes.len() < f32_size, "{encoding:?}");
            let back = decode(&bytes, encoding, &d).unwrap();
            assert_eq!(back.content_hash(), sent_hash(&d, &bytes, encoding).unwrap());
            assert_ne!(back.content_hash(), d.content_hash(), "{encoding:?} is lossy on this delta");
            for ((_, a), (_, b)) in d.iter().zip(back.iter()) {
                let max = a.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (x, y) in a.data().iter().zip(b.data()) {
                    assert!((x - y).abs() <= tolerance * max.max(1e-30), "{encoding:?}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn a_delta_that_does_not_fit_the_base_is_refused() {
        let d = delta();
        let mut other = ModelState::new();
        other.insert("w", Tensor::new(vec![600, 1], vec![0.0; 600]).unwrap());
        other.insert("b", Tensor::new(vec![5], vec![0.0; 5]).unwrap());
        let bytes = encode(&d, Encoding::Int8).unwrap();
        assert!(decode(&bytes, Encoding::Int8, &other).is_err());
        assert!(decode(&bytes[..bytes.len() - 3], Encoding::Int8, &d).is_err());
        assert!(decode(b"garbage", Encoding::F16, &d).is_err());
    }
}
