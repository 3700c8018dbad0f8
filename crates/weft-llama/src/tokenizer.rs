//! Text ↔ token ids through Hugging Face's `tokenizers` (pure Rust, offline), from the
//! `tokenizer.json` an import writes.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer {path}: {detail}")]
    Load { path: String, detail: String },
    #[error("tokenizing failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
}

pub struct LlamaTokenizer {
    inner: tokenizers::Tokenizer,
}

impl LlamaTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.display().to_string(), detail: e.to_string() })?;
        Ok(Self { inner })
    }

    pub fn from_json(json: &str) -> Result<Self, TokenizerError> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e: tokenizers::Error| TokenizerError::Load {
            path: "(in memory)".into(),
            detail: e.to_string(),
        })?;
        Ok(Self { inner })
    }

    /// Token ids of `text`, with no special tokens added around it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
