//! The node's own text. It has no `Serialize`, no `Clone` and a `Debug` that shows only sizes:
//! there is no way to put it into a message, a log line or a report.
//!
//! ```compile_fail
//! fn send<T: serde::Serialize>(_: &T) {}
//! let corpus = weft_node::LocalCorpus::from_bytes(b"private text".to_vec());
//! send(&corpus); // does not compile: a corpus cannot be serialised
//! ```
//!
//! The same harness with a serialisable type compiles, so the failure above is the missing trait:
//!
//! ```
//! fn send<T: serde::Serialize>(_: &T) {}
//! let metrics = weft_node::LocalMetrics::default();
//! send(&metrics);
//! ```

use std::fmt;
use std::path::Path;

use weft_model::CorpusText;

/// Share of the corpus held back for the node's own validation loss.
const VALIDATION_SHARE: usize = 20;
/// Upper bound of the validation slice, to keep the per-round evaluation cheap.
const VALIDATION_MAX: usize = 16 * 1024;

pub struct LocalCorpus {
    train: Vec<u8>,
    validation: Vec<u8>,
}

impl LocalCorpus {
    /// Splits `bytes` into a training part and a validation tail (1/20, at most 16 KiB).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let hold = (bytes.len() / VALIDATION_SHARE).min(VALIDATION_MAX);
        let mut train = bytes;
        let validation = train.split_off(train.len() - hold);
        LocalCorpus { train, validation }
    }

    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        Ok(Self::from_bytes(std::fs::read(path)?))
    }

    /// Lent to the node's trainer for one round.
    pub(crate) fn text(&self) -> CorpusText<'_> {
        CorpusText { train: &self.train, validation: &self.validation }
    }

    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    pub fn validation_len(&self) -> usize {
        self.validation.len()
    }
}

impl fmt::Debug for LocalCorpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalCorpus {{ train: {} bytes, validation: {} bytes }}", self.train.len(), self.validation.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_never_prints_text() {
        let corpus = LocalCorpus::from_bytes(b"secret".repeat(100));
        assert_eq!(corpus.train_len() + corpus.validation_len(), 600);
        assert_eq!(corpus.validation_len(), 30);
        assert!(!format!("{corpus:?}").contains("secret"));
    }
}
