//! Where the coordinator keeps model states: a content-addressed store of blobs, each the
//! canonical safetensors encoding of one state (a delta, a base, outer-optimizer state, a
//! center), named by the state's content hash, written once and never changed or deleted.
//!
//! The round engine sees only the [`BlobStore`] interface — put a state, open a blob by hash to
//! stream it, verify it — so an object store can take the filesystem's place without touching
//! it. [`FsBlobStore`] (`<dir>/<hash>.safetensors`, memory-mapped reads) is the default;
//! [`MemoryBlobStore`] keeps blobs in memory (tests, throw-away runs). The coordinator writes each
//! delta as it arrives and drops it; aggregation then reads one tensor of one delta at a time,
//! so the coordinator's memory does not grow with the number of nodes.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use safetensors::SafeTensors;
use weft_core::{CanonicalHasher, ContentHash, ModelState, StateError};

/// A content-addressed store of model states.
pub trait BlobStore: Send + Sync {
    /// Stores `state` under its content hash (a no-op if it is already there) and returns the
    /// hash. When this returns the blob is durable: a later transaction may refer to it.
    fn put(&self, state: &ModelState) -> Result<ContentHash, StoreError>;
    /// The stored bytes of blob `hash`, unchecked: [`Blob::reader`] checks them as it streams,
    /// [`Blob::check`] and [`Blob::state`] at once.
    fn open(&self, hash: &ContentHash) -> Result<Blob, StoreError>;
    fn contains(&self, hash: &ContentHash) -> bool;
    /// Where blob `hash` lives, for messages (a path, a URL).
    fn location(&self, hash: &ContentHash) -> String;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob store {location}: {source}")]
    Io { location: String, source: std::io::Error },
    #[error("blob {location}: {source}")]
    Format { location: String, source: StateError },
    #[error("blob {location}: tensor '{name}' is missing")]
    MissingTensor { location: String, name: String },
    #[error("blob {location}: the bytes are not the canonical encoding of its tensors: the store was altered")]
    NotCanonical { location: String },
    #[error("blob {location}: content hash is {actual}, the blob is named for {expected}: the store was altered")]
    Corrupt { location: String, expected: ContentHash, actual: ContentHash },
    #[error("no blob {hash} in the store ({location})")]
    Missing { hash: ContentHash, location: String },
}

/// One stored blob's bytes, mapped or in memory, with what they must hash to.
pub struct Blob {
    location: String,
    expected: ContentHash,
    bytes: BlobBytes,
}

enum BlobBytes {
    Mapped(Mmap),
    Shared(Arc<Vec<u8>>),
}

impl Blob {
    /// A blob held in memory (what a store that downloads blobs would return).
    pub fn from_shared(location: String, expected: ContentHash, bytes: Arc<Vec<u8>>) -> Self {
        Blob { location, expected, bytes: BlobBytes::Shared(bytes) }
    }

    /// The stored bytes, e.g. to stream a base to a node.
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            BlobBytes::Mapped(map) => map,
            BlobBytes::Shared(bytes) => bytes,
        }
    }

    pub fn hash(&self) -> ContentHash {
        self.expected
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    fn format(&self, source: StateError) -> StoreError {
        StoreError::Format { location: self.location.clone(), source }
    }

    /// Parses the header and checks it is canonical (so that the content hash, checked at the
    /// end, covers every byte); tensors are then read one by one with [`BlobReader::read`].
    pub fn reader(&self) -> Result<BlobReader<'_>, StoreError> {
        let file =
            SafeTensors::deserialize(self.bytes()).map_err(|e| self.format(StateError::Format(e.to_string())))?;
        check_canonical(&self.location, self.bytes(), &file)?;
        let hasher = CanonicalHasher::new(file.len());
        Ok(BlobReader { source: self, file, hasher, current: None })
    }

    /// Decodes the whole state and checks it is the one the blob is named for, byte for byte:
    /// the tensors hash to the name and the bytes are their canonical encoding (so not even the
    /// header's padding can change unnoticed).
    pub fn state(&self) -> Result<ModelState, StoreError> {
        let state = ModelState::from_safetensors(self.bytes()).map_err(|e| self.format(e))?;
        let actual = state.content_hash();
        if actual != self.expected {
            return Err(StoreError::Corrupt { location: self.location.clone(), expected: self.expected, actual });
        }
        let file =
            SafeTensors::deserialize(self.bytes()).map_err(|e| self.format(StateError::Format(e.to_string())))?;
        check_canonical(&self.location, self.bytes(), &file)?;
        Ok(state)
    }

    /// Checks the blob byte for byte without decoding it (one streaming pass): the header is
    /// canonical and the tensors hash to the blob's name. Returns its size in bytes.
    pub fn check(&self) -> Result<u64, StoreError> {
        let reader = self.reader()?;
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
        if actual != self.expected {
            return Err(StoreError::Corrupt { location: self.location.clone(), expected: self.expected, actual });
        }
        Ok(self.bytes().len() as u64)
    }
}

/// Reads a blob tensor by tensor, in sorted-name order, hashing as it goes. A tensor may be read
/// whole ([`read`](Self::read)) or in consecutive ranges ([`read_range`](Self::read_range)).
pub struct BlobReader<'a> {
    source: &'a Blob,
    file: SafeTensors<'a>,
    hasher: CanonicalHasher,
    /// The tensor being read in ranges and how far it has been read.
    current: Option<(String, usize)>,
}

impl<'a> BlobReader<'a> {
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
        let view = self.view(name)?;
        if view.dtype() != safetensors::Dtype::F32 {
            let dtype = format!("{:?}", view.dtype());
            return Err(self.source.format(StateError::Dtype { name: name.to_owned(), dtype }));
        }
        let total: usize = view.shape().iter().product();
        let raw = view.data();
        let in_order = match &self.current {
            Some((current, next)) if current == name => *next == start,
            _ => start == 0,
        };
        if !in_order || start + len > total || raw.len() != total * 4 {
            return Err(self.source.format(StateError::Format(format!(
                "tensor '{name}': range {start}+{len} of {total} read out of order"
            ))));
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
            .map_err(|_| StoreError::MissingTensor { location: self.source.location.clone(), name: name.to_owned() })
    }

    /// A value-level fault found while using what was read (e.g. a length mismatch).
    pub fn fault(&self, name: &str, detail: impl std::fmt::Display) -> StoreError {
        self.source.format(StateError::Format(format!("tensor '{name}': {detail}")))
    }

    /// Checks that what was read is exactly the state the blob is named for.
    pub fn verify(self) -> Result<(), StoreError> {
        let actual = self.hasher.finish();
        if actual != self.source.expected {
            return Err(StoreError::Corrupt {
                location: self.source.location.clone(),
                expected: self.source.expected,
                actual,
            });
        }
        Ok(())
    }
}

/// The bytes must be exactly the canonical header followed by the tensors' data: with the
/// content hash over the data, every byte is then accounted for.
fn check_canonical(location: &str, bytes: &[u8], file: &SafeTensors<'_>) -> Result<(), StoreError> {
    let mut layout = Vec::new();
    let mut data = 0usize;
    for (name, view) in file.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(StoreError::NotCanonical { location: location.to_owned() });
        }
        data += view.data().len();
        layout.push((name, view.shape().to_vec()));
    }
    let header = ModelState::canonical_header(layout.iter().map(|(n, s)| (n.as_str(), s.as_slice())))
        .map_err(|source| StoreError::Format { location: location.to_owned(), source })?;
    if !bytes.starts_with(&header) || bytes.len() != header.len() + data {
        return Err(StoreError::NotCanonical { location: location.to_owned() });
    }
    Ok(())
}

/// The default store: `<dir>/<hash>.safetensors`, read through memory maps.
pub struct FsBlobStore {
    dir: PathBuf,
}

impl FsBlobStore {
    /// Opens the store in `dir` for writing, creating the directory if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|source| StoreError::Io { location: dir.display().to_string(), source })?;
        Ok(FsBlobStore { dir })
    }

    /// Opens an existing store without creating anything (for reading: `weft ledger verify`,
    /// operator commands).
    pub fn open_existing(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        if !dir.is_dir() {
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no blob store here");
            return Err(StoreError::Io { location: dir.display().to_string(), source });
        }
        Ok(FsBlobStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file blob `hash` is (or would be) stored in.
    pub fn path_of(&self, hash: &ContentHash) -> PathBuf {
        self.dir.join(format!("{hash}.safetensors"))
    }
}

impl BlobStore for FsBlobStore {
    fn put(&self, state: &ModelState) -> Result<ContentHash, StoreError> {
        let hash = state.content_hash();
        let path = self.path_of(&hash);
        if !path.exists() {
            let location = path.display().to_string();
            let bytes = state
                .to_safetensors(None)
                .map_err(|source| StoreError::Format { location: location.clone(), source })?;
            // A crash leaves either nothing or the whole blob under its content name, and a blob a
            // later transaction refers to survives power loss.
            weft_durable::write_atomic_past(&path, &bytes, Some("blob-written"))
                .map_err(|source| StoreError::Io { location, source })?;
        }
        Ok(hash)
    }

    fn open(&self, hash: &ContentHash) -> Result<Blob, StoreError> {
        let path = self.path_of(hash);
        let location = path.display().to_string();
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Missing { hash: *hash, location: self.dir.display().to_string() })
            }
            Err(source) => return Err(StoreError::Io { location, source }),
        };
        // SAFETY: the store's files are written once under a temporary name and renamed into
        // place; nothing in weft writes to a published file, and any outside change is caught by
        // the content hash check that every reader finishes with.
        let map =
            unsafe { Mmap::map(&file) }.map_err(|source| StoreError::Io { location: location.clone(), source })?;
        Ok(Blob { location, expected: *hash, bytes: BlobBytes::Mapped(map) })
    }

    fn contains(&self, hash: &ContentHash) -> bool {
        self.path_of(hash).is_file()
    }

    fn location(&self, hash: &ContentHash) -> String {
        self.path_of(hash).display().to_string()
    }
}

/// Blobs in memory: for tests and runs that keep nothing. Shows that the round engine needs no
/// filesystem: anything that can put, open and name blobs will do.
#[derive(Default)]
pub struct MemoryBlobStore {
    blobs: Mutex<HashMap<ContentHash, Arc<Vec<u8>>>>,
}

impl MemoryBlobStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn blobs(&self) -> std::sync::MutexGuard<'_, HashMap<ContentHash, Arc<Vec<u8>>>> {
        // A panic while holding the lock leaves a valid map: keep going.
        self.blobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces a blob's bytes (tests of what tampering is caught).
    pub fn tamper(&self, hash: &ContentHash, bytes: Vec<u8>) {
        self.blobs().insert(*hash, Arc::new(bytes));
    }
}

impl BlobStore for MemoryBlobStore {
    fn put(&self, state: &ModelState) -> Result<ContentHash, StoreError> {
        let hash = state.content_hash();
        if !self.contains(&hash) {
            let bytes = state
                .to_safetensors(None)
                .map_err(|source| StoreError::Format { location: self.location(&hash), source })?;
            self.blobs().insert(hash, Arc::new(bytes));
        }
        Ok(hash)
    }

    fn open(&self, hash: &ContentHash) -> Result<Blob, StoreError> {
        let bytes = self.blobs().get(hash).cloned();
        match bytes {
            Some(bytes) => Ok(Blob::from_shared(self.location(hash), *hash, bytes)),
            None => Err(StoreError::Missing { hash: *hash, location: "memory".into() }),
        }
    }

    fn contains(&self, hash: &ContentHash) -> bool {
        self.blobs().contains_key(hash)
    }

    fn location(&self, hash: &ContentHash) -> String {
        format!("memory:{hash}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::Tensor;

    fn state() -> ModelState {
        let mut s = ModelState::new();
        s.insert("a", Tensor::new(vec![3], vec![1.0, -2.0, 0.5]).unwrap());
        s.insert("b", Tensor::new(vec![1], vec![4.0]).unwrap());
        s
    }

    fn stores() -> (tempfile::TempDir, Vec<Box<dyn BlobStore>>) {
        let tmp = tempfile::tempdir().unwrap();
        let fs = FsBlobStore::open(tmp.path().join("blobs")).unwrap();
        (tmp, vec![Box::new(fs), Box::new(MemoryBlobStore::new())])
    }

    #[test]
    fn streams_back_what_was_stored() {
        let (_tmp, stores) = stores();
        for store in stores {
            let hash = store.put(&state()).unwrap();
            assert_eq!(store.put(&state()).unwrap(), hash);
            assert!(store.contains(&hash));
            let blob = store.open(&hash).unwrap();
            assert_eq!(blob.state().unwrap(), state());
            assert_eq!(blob.check().unwrap(), blob.bytes().len() as u64);
            let mut reader = blob.reader().unwrap();
            let mut buf = Vec::new();
            reader.read("a", &mut buf).unwrap();
            assert_eq!(buf, [1.0, -2.0, 0.5]);
            reader.read("b", &mut buf).unwrap();
            reader.verify().unwrap();
            // In ranges, the same values and the same hash.
            let mut reader = blob.reader().unwrap();
            reader.read_range("a", 0, 2, &mut buf).unwrap();
            assert_eq!(buf, [1.0, -2.0]);
            assert!(reader.read_range("a", 0, 1, &mut buf).is_err(), "a range out of order is refused");
            let mut reader = blob.reader().unwrap();
            reader.read_range("a", 0, 2, &mut buf).unwrap();
            reader.read_range("a", 2, 1, &mut buf).unwrap();
            assert_eq!(buf, [0.5]);
            reader.read("b", &mut buf).unwrap();
            reader.verify().unwrap();
        }
    }

    #[test]
    fn a_missing_blob_is_named() {
        let (_tmp, stores) = stores();
        for store in stores {
            let absent = ContentHash([9; 32]);
            assert!(!store.contains(&absent));
            assert!(matches!(store.open(&absent), Err(StoreError::Missing { hash, .. }) if hash == absent));
        }
    }

    #[test]
    fn detects_a_flipped_byte_in_either_store() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = FsBlobStore::open(tmp.path()).unwrap();
        let hash = fs.put(&state()).unwrap();
        let path = fs.path_of(&hash);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let memory = MemoryBlobStore::new();
        memory.put(&state()).unwrap();
        memory.tamper(&hash, bytes);
        for store in [&fs as &dyn BlobStore, &memory] {
            let blob = store.open(&hash).unwrap();
            let mut reader = blob.reader().unwrap();
            let mut buf = Vec::new();
            reader.read("a", &mut buf).unwrap();
            reader.read("b", &mut buf).unwrap();
            assert!(matches!(reader.verify(), Err(StoreError::Corrupt { .. })));
            assert!(matches!(blob.check(), Err(StoreError::Corrupt { .. })));
            assert!(matches!(blob.state(), Err(StoreError::Corrupt { .. })));
        }
    }

    #[test]
    fn opening_an_existing_store_creates_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("absent");
        assert!(matches!(FsBlobStore::open_existing(&dir), Err(StoreError::Io { .. })));
        assert!(!dir.exists());
    }
}
