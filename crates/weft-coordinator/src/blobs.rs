//! A content-addressed store of model states: `<dir>/<blake3 content hash>.safetensors`.
//!
//! Deltas, bases, outer-optimizer state and centers live here, named by the canonical hash of
//! their tensors, written once and never changed or deleted. The coordinator writes each delta
//! as it arrives and drops it from memory; aggregation later reads one tensor of one delta at a
//! time through a memory map, so the coordinator's memory does not grow with the number of nodes.
//!
//! Only the local filesystem is implemented. An object store would keep this interface (put a
//! state, stream one back by hash) behind a local read cache.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use weft_core::{CanonicalHasher, ContentHash, Delta, ModelState, StateError};

pub struct BlobStore {
    dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("blob store {path}: {source}")]
    Format { path: PathBuf, source: StateError },
    #[error("blob {path}: tensor '{name}' is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("blob {path}: the file is not the canonical encoding of its tensors: the store was altered")]
    NotCanonical { path: PathBuf },
    #[error("blob {path}: content hash is {actual}, the file is named for {expected}: the store was altered")]
    Corrupt { path: PathBuf, expected: ContentHash, actual: ContentHash },
}

impl BlobStore {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir.clone(), source })?;
        Ok(BlobStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, hash: &ContentHash) -> PathBuf {
        self.dir.join(format!("{hash}.safetensors"))
    }

    /// Stores a delta under its content hash (no-op if already present) and returns the hash.
    pub fn put(&self, delta: &Delta) -> Result<ContentHash, StoreError> {
        self.put_state(delta.state())
    }

    /// Stores any state (a base, optimizer state, a center) under its content hash.
    pub fn put_state(&self, state: &ModelState) -> Result<ContentHash, StoreError> {
        let hash = state.content_hash();
        let path = self.path_of(&hash);
        if !path.exists() {
            let bytes =
                state.to_safetensors(None).map_err(|source| StoreError::Format { path: path.clone(), source })?;
            write_atomic(&path, &bytes).map_err(|source| StoreError::Io { path: path.clone(), source })?;
        }
        Ok(hash)
    }

    pub fn contains(&self, hash: &ContentHash) -> bool {
        self.path_of(hash).is_file()
    }

    /// Reads a whole stored state and checks it is the one its name promises, byte for byte:
    /// the tensors hash to the name and the file is their canonical encoding (so not even the
    /// header's padding can change unnoticed).
    pub fn get_state(&self, hash: &ContentHash) -> Result<ModelState, StoreError> {
        let path = self.path_of(hash);
        let bytes = std::fs::read(&path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
        let state =
            ModelState::from_safetensors(&bytes).map_err(|source| StoreError::Format { path: path.clone(), source })?;
        let actual = state.content_hash();
        if actual != *hash {
            return Err(StoreError::Corrupt { path, expected: *hash, actual });
        }
        let file = SafeTensors::deserialize(&bytes)
            .map_err(|e| StoreError::Format { path: path.clone(), source: StateError::Format(e.to_string()) })?;
        check_canonical(&path, &bytes, &file)?;
        Ok(state)
    }

    /// Checks a stored blob byte for byte without decoding it (one streaming read): the header
    /// is canonical and the tensors hash to the blob's name. Returns its size.
    pub fn check(&self, hash: &ContentHash) -> Result<u64, StoreError> {
        let mapped = self.map(hash)?;
        let reader = mapped.reader()?;
        let mut hasher = CanonicalHasher::new(reader.file.len());
        let mut names: Vec<String> = reader.file.names().into_iter().map(str::to_owned).collect();
        names.sort();
        for name in &names {
            let view = reader.view(name)?;
            let len: usize = view.shape().iter().product();
            hasher.begin_tensor(name, view.shape(), len);
            hasher.update_le_bytes(view.data());
        }
        let actual = hasher.finish();
        if actual != *hash {
            return Err(StoreError::Corrupt { path: mapped.path.clone(), expected: *hash, actual });
        }
        Ok(mapped.map.len() as u64)
    }

    /// Memory-maps a stored delta for streaming reads.
    pub fn map(&self, hash: &ContentHash) -> Result<MappedDelta, StoreError> {
        let path = self.path_of(hash);
        let file = File::open(&path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
        // SAFETY: the store's files are written once under a temporary name and renamed into
        // place; nothing in weft writes to a published file, and any outside change is caught by
        // the content hash check that streaming readers finish with.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| StoreError::Io { path: path.clone(), source })?;
        Ok(MappedDelta { path, expected: *hash, map })
    }
}

/// A stored delta, mapped into memory but not read.
pub struct MappedDelta {
    path: PathBuf,
    expected: ContentHash,
    map: Mmap,
}

impl MappedDelta {
    /// Parses the header and checks it is canonical (so that the content hash, checked at the
    /// end, covers every byte of the file); tensors are then read one by one with
    /// [`DeltaReader::read`].
    pub fn reader(&self) -> Result<DeltaReader<'_>, StoreError> {
        let file = SafeTensors::deserialize(&self.map)
            .map_err(|e| StoreError::Format { path: self.path.clone(), source: StateError::Format(e.to_string()) })?;
        check_canonical(&self.path, &self.map, &file)?;
        let hasher = CanonicalHasher::new(file.len());
        Ok(DeltaReader { source: self, file, hasher, current: None })
    }
}

/// Reads a stored delta tensor by tensor, in sorted-name order, hashing as it goes. A tensor may
/// be read whole ([`read`](Self::read)) or in consecutive ranges ([`read_range`](Self::read_range)).
pub struct DeltaReader<'a> {
    source: &'a MappedDelta,
    file: SafeTensors<'a>,
    hasher: CanonicalHasher,
    /// The tensor being read in ranges and how far it has been read.
    current: Option<(String, usize)>,
}

impl<'a> DeltaReader<'a> {
    /// Decodes tensor `name` into `out`. Call in sorted-name order over every tensor, then
    /// [`verify`](Self::verify).
    pub fn read(&mut self, name: &str, out: &mut Vec<f32>) -> Result<(), StoreError> {
        let len = self.tensor_len(name)?;
        self.read_range(name, 0, len, out)
    }

    /// Number of values of tensor `name`.
    pub fn tensor_len(&self, name: &str) -> Result<usize, StoreError> {
        let view = self.view(name)?;
        Ok(view.shape().iter().product())
    }

    /// Decodes values `start..start + len` of tensor `name` into `out`. Ranges of one tensor must
    /// be read from 0 upwards without gaps, tensors in sorted-name order, so that the content
    /// hash can be checked at the end.
    pub fn read_range(&mut self, name: &str, start: usize, len: usize, out: &mut Vec<f32>) -> Result<(), StoreError> {
        let path = self.source.path.clone();
        let view = self.view(name)?;
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(StoreError::Format {
                path,
                source: StateError::Dtype { name: name.to_owned(), dtype: format!("{:?}", view.dtype()) },
            });
        }
        let total: usize = view.shape().iter().product();
        let raw = view.data();
        let in_order = match &self.current {
            Some((current, next)) if current == name => *next == start,
            _ => start == 0,
        };
        if !in_order || start + len > total || raw.len() != total * 4 {
            return Err(StoreError::Format {
                path,
                source: StateError::Format(format!(
                    "tensor '{name}': range {start}+{len} of {total} read out of order"
                )),
            });
        }
        if start == 0 {
            self.hasher.begin_tensor(name, view.shape(), total);
        }
        let bytes = &raw[start * 4..(start + len) * 4];
        out.clear();
        out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        // The stored bytes are the canonical little-endian form: hashed as they are.
        self.hasher.update_le_bytes(bytes);
        self.current = Some((name.to_owned(), start + len));
        Ok(())
    }

    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'a>, StoreError> {
        self.file
            .tensor(name)
            .map_err(|_| StoreError::MissingTensor { path: self.source.path.clone(), name: name.to_owned() })
    }

    /// Checks that what was read is exactly the delta the file is named for.
    pub fn verify(self) -> Result<(), StoreError> {
        let actual = self.hasher.finish();
        if actual != self.source.expected {
            return Err(StoreError::Corrupt { path: self.source.path.clone(), expected: self.source.expected, actual });
        }
        Ok(())
    }
}

/// The file must be exactly the canonical header followed by the tensors' data: with the
/// content hash over the data, every byte is then accounted for.
fn check_canonical(path: &Path, bytes: &[u8], file: &SafeTensors<'_>) -> Result<(), StoreError> {
    let mut layout = Vec::new();
    let mut data = 0usize;
    for (name, view) in file.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(StoreError::NotCanonical { path: path.to_owned() });
        }
        data += view.data().len();
        layout.push((name, view.shape().to_vec()));
    }
    let header = ModelState::canonical_header(layout.iter().map(|(n, s)| (n.as_str(), s.as_slice())))
        .map_err(|source| StoreError::Format { path: path.to_owned(), source })?;
    if !bytes.starts_with(&header) || bytes.len() != header.len() + data {
        return Err(StoreError::NotCanonical { path: path.to_owned() });
    }
    Ok(())
}

/// Temp file, fsync, rename, fsync the directory: a crash leaves either nothing or the whole
/// blob under its content name, and a blob a later transaction refers to survives power loss.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    weft_core::crash::point("blob-written");
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::Tensor;

    fn delta() -> Delta {
        let mut s = ModelState::new();
        s.insert("a", Tensor::new(vec![3], vec![1.0, -2.0, 0.5]).unwrap());
        s.insert("b", Tensor::new(vec![1], vec![4.0]).unwrap());
        Delta::from_state(s)
    }

    #[test]
    fn streams_back_what_was_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let hash = store.put(&delta()).unwrap();
        assert_eq!(store.put(&delta()).unwrap(), hash);
        let mapped = store.map(&hash).unwrap();
        let mut reader = mapped.reader().unwrap();
        let mut buf = Vec::new();
        reader.read("a", &mut buf).unwrap();
        assert_eq!(buf, [1.0, -2.0, 0.5]);
        reader.read("b", &mut buf).unwrap();
        reader.verify().unwrap();
        // In ranges, the same values and the same hash.
        let mut reader = mapped.reader().unwrap();
        reader.read_range("a", 0, 2, &mut buf).unwrap();
        assert_eq!(buf, [1.0, -2.0]);
        assert!(reader.read_range("a", 0, 1, &mut buf).is_err(), "a range out of order is refused");
        let mut reader = mapped.reader().unwrap();
        reader.read_range("a", 0, 2, &mut buf).unwrap();
        reader.read_range("a", 2, 1, &mut buf).unwrap();
        assert_eq!(buf, [0.5]);
        reader.read("b", &mut buf).unwrap();
        reader.verify().unwrap();
    }

    #[test]
    fn detects_a_flipped_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let hash = store.put(&delta()).unwrap();
        let path = store.path_of(&hash);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        let mapped = store.map(&hash).unwrap();
        let mut reader = mapped.reader().unwrap();
        let mut buf = Vec::new();
        reader.read("a", &mut buf).unwrap();
        reader.read("b", &mut buf).unwrap();
        assert!(matches!(reader.verify(), Err(StoreError::Corrupt { .. })));
    }
}
