//! A GGUF (v2/v3) reader: metadata, tensor infos, and dequantization of F32, F16, BF16, Q8_0 and
//! Q4_1 tensors to f32.
//!
//! Every length, count and offset in the file is checked against the bytes that are there before
//! it is used, so a truncated or hostile file is an error naming what was wrong and where, never
//! a panic or a huge allocation.

use std::collections::BTreeMap;
use std::fmt;

/// The file's magic number, "GGUF" in little-endian bytes.
const MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Values per block of the quantized types read here.
const BLOCK: usize = 32;
/// Dimensions per tensor that ggml supports.
const MAX_DIMS: u32 = 4;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    #[error("not a GGUF file: it starts with {found:?}, not \"GGUF\"")]
    Magic { found: Vec<u8> },
    #[error("GGUF version {0} is not supported (weft reads versions 2 and 3)")]
    Version(u32),
    #[error("the file ends at byte {len} while reading {what} at byte {offset}: truncated?")]
    Truncated { what: String, offset: u64, len: u64 },
    #[error("metadata key '{key}' has unknown value type {kind}")]
    ValueType { key: String, kind: u32 },
    #[error("{what} at byte {offset} is not UTF-8")]
    Utf8 { what: String, offset: u64 },
    #[error("metadata key '{key}' appears twice")]
    DuplicateKey { key: String },
    #[error("tensor '{name}' appears twice")]
    DuplicateTensor { name: String },
    #[error("tensor '{name}' has {dims} dimensions; ggml allows 1 to {MAX_DIMS}")]
    Dimensions { name: String, dims: u32 },
    #[error("tensor '{name}' has a zero or overflowing shape {shape:?}")]
    Shape { name: String, shape: Vec<u64> },
    #[error("tensor '{name}' is of type {kind}; weft reads F32, F16, BF16, Q8_0 and Q4_1")]
    UnsupportedType { name: String, kind: TensorType },
    #[error("tensor '{name}' of type {kind} has {row} values per row, not a multiple of the block size {BLOCK}")]
    PartialBlock { name: String, kind: TensorType, row: u64 },
    #[error("tensor '{name}': its data (bytes {start}..{end} of the data section) lies outside the file's {available} data bytes")]
    DataRange { name: String, start: u64, end: u64, available: u64 },
    #[error("tensor '{name}': data offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned { name: String, offset: u64, alignment: u64 },
    #[error("general.alignment is {0}; it must be a non-zero power of two")]
    Alignment(u64),
    #[error("metadata key '{key}' is missing")]
    MissingKey { key: String },
    #[error("metadata key '{key}' is {found}, expected {expected}")]
    KeyType { key: String, expected: &'static str, found: &'static str },
    #[error("tensor '{name}' is not in the file")]
    MissingTensor { name: String },
}

/// A ggml tensor type, by its number in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorType(pub u32);

impl TensorType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_1: Self = Self(3);
    pub const Q8_0: Self = Self(8);
    pub const BF16: Self = Self(30);

    /// ggml's name for the type, so that an error names what the file holds.
    pub fn name(self) -> Option<&'static str> {
        const NAMES: [&str; 40] = [
            "F32",
            "F16",
            "Q4_0",
            "Q4_1",
            "Q4_2",
            "Q4_3",
            "Q5_0",
            "Q5_1",
            "Q8_0",
            "Q8_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
            "IQ2_XXS",
            "IQ2_XS",
            "IQ3_XXS",
            "IQ1_S",
            "IQ4_NL",
            "IQ3_S",
            "IQ2_S",
            "IQ4_XS",
            "I8",
            "I16",
            "I32",
            "I64",
            "F64",
            "IQ1_M",
            "BF16",
            "Q4_0_4_4",
            "Q4_0_4_8",
            "Q4_0_8_8",
            "TQ1_0",
            "TQ2_0",
            "IQ4_NL_4_4",
            "IQ4_NL_4_8",
            "IQ4_NL_8_8",
            "MXFP4",
        ];
        NAMES.get(self.0 as usize).copied()
    }

    /// Bytes that `values` values of this type take, for the types weft reads.
    fn byte_len(self, values: u64) -> Option<u64> {
        let blocks = values / BLOCK as u64;
        match self {
            Self::F32 => values.checked_mul(4),
            Self::F16 | Self::BF16 => values.checked_mul(2),
            Self::Q8_0 => blocks.checked_mul(34),
            Self::Q4_1 => blocks.checked_mul(20),
            _ => None,
        }
    }

    fn is_blocked(self) -> bool {
        self == Self::Q8_0 || self == Self::Q4_1
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "#{}", self.0),
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::U8(_) | Value::U16(_) | Value::U32(_) | Value::U64(_) => "an unsigned integer",
            Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => "a signed integer",
            Value::F32(_) | Value::F64(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as f64. An f32 is read as the shortest decimal that names it (1e-5, not
    /// 9.99999974e-6): the number the converter was given, as config.json writes it.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => v.to_string().parse().ok(),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// Where one tensor is and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous axis.
    pub dims: Vec<u64>,
    pub kind: TensorType,
    /// From the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The row-major shape (slowest axis first), as Hugging Face and safetensors write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn num_values(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file over its bytes.
pub struct Gguf<'a> {
    bytes: &'a [u8],
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
}

impl<'a> Gguf<'a> {
    /// Parses the header, metadata and tensor infos, and checks that every supported tensor's
    /// data lies inside the file. Tensor data is read only by [`dequantize`](Self::dequantize).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, GgufError> {
        let mut cursor = Cursor { bytes, pos: 0 };
        let magic = cursor.take(4, "the magic number")?;
        if magic != MAGIC {
            return Err(GgufError::Magic { found: magic.to_vec() });
        }
        let version = cursor.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let tensor_count = cursor.u64("the tensor count")?;
        let key_count = cursor.u64("the metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..key_count {
            let key = cursor.string("a metadata key")?;
            let kind = cursor.u32("a metadata value type")?;
            let value = cursor.value(&key, kind, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::DuplicateKey { key });
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(value) => value.as_u64().ok_or(GgufError::KeyType {
                key: "general.alignment".into(),
                expected: "an unsigned integer",
                found: value.kind(),
            })?,
        };
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(GgufError::Alignment(alignment));
        }
        let mut tensors: Vec<TensorInfo> = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..tensor_count {
            let name = cursor.string("a tensor name")?;
            let dim_count = cursor.u32("a tensor's dimension count")?;
            if dim_count == 0 || dim_count > MAX_DIMS {
                return Err(GgufError::Dimensions { name, dims: dim_count });
            }
            let dims = (0..dim_count).map(|_| cursor.u64("a tensor dimension")).collect::<Result<Vec<_>, _>>()?;
            let kind = TensorType(cursor.u32("a tensor type")?);
            let offset = cursor.u64("a tensor offset")?;
            if !names.insert(name.clone()) {
                return Err(GgufError::DuplicateTensor { name });
            }
            tensors.push(TensorInfo { name, dims, kind, offset });
        }
        let data_start = (cursor.pos as u64).div_ceil(alignment) * alignment;
        let available = (bytes.len() as u64).saturating_sub(data_start);
        for info in &tensors {
            let values = info.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d).filter(|&n| n > 0));
            let Some(values) = values.filter(|&n| usize::try_from(n).is_ok()) else {
                return Err(GgufError::Shape { name: info.name.clone(), shape: info.dims.clone() });
            };
            if info.offset % alignment != 0 {
                return Err(GgufError::Misaligned { name: info.name.clone(), offset: info.offset, alignment });
            }
            // Types weft cannot read are reported when (and if) they are asked for, so that a file
            // whose unused tensors are exotic still imports.
            let Some(len) = info.kind.byte_len(values) else { continue };
            if info.kind.is_blocked() && info.dims[0] % BLOCK as u64 != 0 {
                return Err(GgufError::PartialBlock { name: info.name.clone(), kind: info.kind, row: info.dims[0] });
            }
            let end = info.offset.saturating_add(len);
            if end > available {
                return Err(GgufError::DataRange { name: info.name.clone(), start: info.offset, end, available });
            }
        }
        Ok(Self { bytes, version, metadata, tensors, data_start })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey { key: key.into() })
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let value = self.get(key)?;
        value.as_u64().ok_or(GgufError::KeyType {
            key: key.into(),
            expected: "an unsigned integer",
            found: value.kind(),
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let value = self.get(key)?;
        value.as_f64().ok_or(GgufError::KeyType { key: key.into(), expected: "a number", found: value.kind() })
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            other => Err(GgufError::KeyType { key: key.into(), expected: "a string", found: other.kind() }),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value], GgufError> {
        match self.get(key)? {
            Value::Array(values) => Ok(values),
            other => Err(GgufError::KeyType { key: key.into(), expected: "an array", found: other.kind() }),
        }
    }

    /// The tensor's values as f32, row-major (ggml's `dims[0]` fastest).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor(name).ok_or_else(|| GgufError::MissingTensor { name: name.into() })?;
        let values = info.num_values() as usize;
        let len = info
            .kind
            .byte_len(values as u64)
            .ok_or(GgufError::UnsupportedType { name: name.into(), kind: info.kind })?;
        // `parse` checked that these bytes are inside the file.
        let start = (self.data_start + info.offset) as usize;
        let raw = &self.bytes[start..start + len as usize];
        let mut out = Vec::with_capacity(values);
        match info.kind {
            TensorType::F32 => out.extend(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            TensorType::F16 => out.extend(raw.chunks_exact(2).map(|b| f16(b[0], b[1]))),
            TensorType::BF16 => out
                .extend(raw.chunks_exact(2).map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))),
            TensorType::Q8_0 => {
                // 34 bytes: f16 scale d, then 32 × i8; x = d·q.
                for block in raw.chunks_exact(34) {
                    let d = f16(block[0], block[1]);
                    out.extend(block[2..].iter().map(|&q| d * f32::from(q as i8)));
                }
            }
            TensorType::Q4_1 => {
                // 20 bytes: f16 scale d, f16 minimum m, 16 bytes of nibbles; the low nibbles are
                // values 0..16 and the high nibbles values 16..32: x = d·q + m.
                for block in raw.chunks_exact(20) {
                    let (d, m) = (f16(block[0], block[1]), f16(block[2], block[3]));
                    let nibbles = &block[4..];
                    out.extend(nibbles.iter().map(|&b| d * f32::from(b & 0x0F) + m));
                    out.extend(nibbles.iter().map(|&b| d * f32::from(b >> 4) + m));
                }
            }
            kind => return Err(GgufError::UnsupportedType { name: name.into(), kind }),
        }
        debug_assert_eq!(out.len(), values);
        Ok(out)
    }
}

fn f16(lo: u8, hi: u8) -> f32 {
    half::f16::from_le_bytes([lo, hi]).to_f32()
}

/// Reads little-endian values with every length checked against the bytes left.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// Nesting depth of metadata arrays weft accepts (GGUF uses one level; the bound stops a file
/// from recursing without end).
const MAX_ARRAY_DEPTH: usize = 4;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(GgufError::Truncated {
                what: what.into(),
                offset: self.pos as u64,
                len: self.bytes.len() as u64,
            });
        }
        let slice = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let offset = self.pos as u64;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Utf8 { what: what.into(), offset })
    }

    fn value(&mut self, key: &str, kind: u32, depth: usize) -> Result<Value, GgufError> {
        let what = format!("the value of '{key}'");
        Ok(match kind {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                _ => return Err(GgufError::ValueType { key: key.into(), kind }),
            },
            8 => Value::String(self.string(&what)?),
            9 if depth < MAX_ARRAY_DEPTH => {
                let element = self.u32(&what)?;
                let count = self.u64(&what)?;
                // Every element takes at least one byte: a count beyond the bytes left is a
                // truncated (or hostile) file, refused before anything is allocated for it.
                let left = (self.bytes.len() - self.pos) as u64;
                if count > left {
                    return Err(GgufError::Truncated { what, offset: self.pos as u64, len: self.bytes.len() as u64 });
                }
                let mut values = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    values.push(self.value(key, element, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            _ => return Err(GgufError::ValueType { key: key.into(), kind }),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a GGUF v3 file: the format's definition, used to build test inputs.
    pub(crate) struct Writer {
        metadata: Vec<(String, u32, Vec<u8>)>,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    }

    impl Writer {
        pub(crate) fn new() -> Self {
            Self { metadata: Vec::new(), tensors: Vec::new() }
        }

        fn string_bytes(s: &str) -> Vec<u8> {
            let mut out = (s.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(s.as_bytes());
            out
        }

        pub(crate) fn u32(mut self, key: &str, v: u32) -> Self {
            self.metadata.push((key.into(), 4, v.to_le_bytes().to_vec()));
            self
        }

        pub(crate) fn f32(mut self, key: &str, v: f32) -> Self {
            self.metadata.push((key.into(), 6, v.to_le_bytes().to_vec()));
            self
        }

        pub(crate) fn string(mut self, key: &str, v: &str) -> Self {
            self.metadata.push((key.into(), 8, Self::string_bytes(v)));
            self
        }

        pub(crate) fn strings(mut self, key: &str, values: &[&str]) -> Self {
            let mut raw = 8u32.to_le_bytes().to_vec();
            raw.extend_from_slice(&(values.len() as u64).to_le_bytes());
            for v in values {
                raw.extend(Self::string_bytes(v));
            }
            self.metadata.push((key.into(), 9, raw));
            self
        }

        pub(crate) fn i32s(mut self, key: &str, values: &[i32]) -> Self {
            let mut raw = 5u32.to_le_bytes().to_vec();
            raw.extend_from_slice(&(values.len() as u64).to_le_bytes());
            for v in values {
                raw.extend_from_slice(&v.to_le_bytes());
            }
            self.metadata.push((key.into(), 9, raw));
            self
        }

        pub(crate) fn tensor(mut self, name: &str, dims: &[u64], kind: TensorType, data: Vec<u8>) -> Self {
            self.tensors.push((name.into(), dims.to_vec(), kind.0, data));
            self
        }

        /// An f32 tensor with row-major `shape`.
        pub(crate) fn f32_tensor(self, name: &str, shape: &[usize], values: &[f32]) -> Self {
            let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.tensor(name, &dims, TensorType::F32, data)
        }

        pub(crate) fn finish(self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
            for (key, kind, raw) in &self.metadata {
                out.extend(Self::string_bytes(key));
                out.extend_from_slice(&kind.to_le_bytes());
                out.extend_from_slice(raw);
            }
            let mut offset = 0u64;
            let mut offsets = Vec::new();
            for (name, dims, kind, data) in &self.tensors {
                out.extend(Self::string_bytes(name));
                out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&kind.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                offsets.push(offset);
                offset = (offset + data.len() as u64).div_ceil(32) * 32;
            }
            out.resize(out.len().div_ceil(32) * 32, 0);
            let data_start = out.len();
            for ((_, _, _, data), offset) in self.tensors.iter().zip(offsets) {
                out.resize(data_start + offset as usize, 0);
                out.extend_from_slice(data);
            }
            out
        }
    }

    fn f16_bytes(v: f32) -> [u8; 2] {
        half::f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn reads_metadata_and_every_supported_type() {
        let q8: Vec<u8> = f16_bytes(0.5).into_iter().chain((0..32).map(|i| (i as i8 - 16) as u8)).collect();
        let mut q4 = f16_bytes(0.25).to_vec();
        q4.extend(f16_bytes(-1.0));
        q4.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let f16s: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&v| f16_bytes(v)).collect();
        let bf16s: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
        let bytes = Writer::new()
            .string("general.architecture", "llama")
            .u32("llama.block_count", 2)
            .f32("llama.rope.freq_base", 10000.0)
            .strings("tokenizer.ggml.tokens", &["a", "b"])
            .tensor("q8", &[32], TensorType::Q8_0, q8)
            .tensor("q4", &[32], TensorType::Q4_1, q4)
            .tensor("h", &[2], TensorType::F16, f16s)
            .tensor("b", &[2], TensorType::BF16, bf16s)
            .f32_tensor("f", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            .finish();
        let gguf = Gguf::parse(&bytes).unwrap();
        assert_eq!(gguf.version, 3);
        assert_eq!(gguf.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(gguf.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(gguf.get_f64("llama.rope.freq_base").unwrap(), 10000.0);
        assert_eq!(gguf.get_array("tokenizer.ggml.tokens").unwrap().len(), 2);
        let q8 = gguf.dequantize("q8").unwrap();
        assert_eq!(q8, (0..32).map(|i| 0.5 * (i - 16) as f32).collect::<Vec<_>>());
        let q4 = gguf.dequantize("q4").unwrap();
        let expected: Vec<f32> =
            (0..16).map(|j| 0.25 * j as f32 - 1.0).chain((0..16).map(|j| 0.25 * (15 - j) as f32 - 1.0)).collect();
        assert_eq!(q4, expected);
        assert_eq!(gguf.dequantize("h").unwrap(), vec![1.5, -2.0]);
        assert_eq!(gguf.dequantize("b").unwrap(), vec![1.5, -2.0]);
        assert_eq!(gguf.tensor("f").unwrap().shape(), vec![2, 3]);
        assert_eq!(gguf.dequantize("f").unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(gguf.dequantize("nope"), Err(GgufError::MissingTensor { name: "nope".into() }));
        assert!(matches!(gguf.get_u64("general.architecture"), Err(GgufError::KeyType { .. })));
    }

    #[test]
    fn names_an_unsupported_type() {
        let bytes = Writer::new().tensor("w", &[256], TensorType(12), vec![0; 144]).finish();
        let gguf = Gguf::parse(&bytes).unwrap();
        let err = gguf.dequantize("w").unwrap_err();
        assert_eq!(err, GgufError::UnsupportedType { name: "w".into(), kind: TensorType(12) });
        assert!(err.to_string().contains("Q4_K"), "{err}");
    }

    #[test]
    fn refuses_malformed_files() {
        assert!(matches!(Gguf::parse(b"GGML...."), Err(GgufError::Magic { .. })));
        let mut v4 = Writer::new().finish();
        v4[4] = 4;
        assert_eq!(Gguf::parse(&v4).err(), Some(GgufError::Version(4)));
        // Data cut short.
        let good = Writer::new().f32_tensor("w", &[4, 4], &[0.0; 16]).finish();
        let cut = &good[..good.len() - 4];
        assert!(matches!(Gguf::parse(cut), Err(GgufError::DataRange { .. })));
        // Cut inside the header: every prefix is an error, never a panic.
        for end in 0..good.len() - 64 {
            assert!(Gguf::parse(&good[..end]).is_err(), "prefix of {end} bytes parsed");
        }
        // A Q8_0 row that is not whole blocks.
        let partial = Writer::new().tensor("w", &[16, 2], TensorType::Q8_0, vec![0; 68]).finish();
        assert!(matches!(Gguf::parse(&partial), Err(GgufError::PartialBlock { .. })));
        // A zero dimension and an overflowing one.
        let zero = Writer::new().tensor("w", &[0, 2], TensorType::F32, vec![]).finish();
        assert!(matches!(Gguf::parse(&zero), Err(GgufError::Shape { .. })));
        let huge = Writer::new().tensor("w", &[u64::MAX, 2], TensorType::F32, vec![]).finish();
        assert!(matches!(Gguf::parse(&huge), Err(GgufError::Shape { .. })));
        // A metadata array that claims more elements than bytes follow.
        let mut lying = Writer::new().i32s("a", &[1, 2]).finish();
        let count_at = 4 + 4 + 8 + 8 + 8 + 1 + 4 + 4;
        lying[count_at..count_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Gguf::parse(&lying), Err(GgufError::Truncated { .. })));
        let twice = Writer::new().f32_tensor("w", &[1], &[0.0]).f32_tensor("w", &[1], &[0.0]).finish();
        assert_eq!(Gguf::parse(&twice).err(), Some(GgufError::DuplicateTensor { name: "w".into() }));
    }

    proptest::proptest! {
        /// Arbitrary bytes after a valid magic and version never panic the parser.
        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut bytes = b"GGUF\x03\x00\x00\x00".to_vec();
            bytes.extend(tail);
            if let Ok(gguf) = Gguf::parse(&bytes) {
                for info in gguf.tensors.clone() {
                    let _ = gguf.dequantize(&info.name);
                }
            }
        }
    }
}
