use serde::{Deserialize, Serialize};

/// Bytes are tokens: the vocabulary is every byte value.
pub const VOCAB: usize = 256;

/// The shape of the transformer. Every field is validated by [`GptConfig::validate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Number of transformer blocks.
    pub layers: usize,
    /// Attention heads per block; must divide `width`.
    pub heads: usize,
    /// Model width (embedding size).
    pub width: usize,
    /// Context length in bytes.
    pub context: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{field} must be at least 1")]
    Zero { field: &'static str },
    #[error("width {width} is not divisible by heads {heads}")]
    Heads { width: usize, heads: usize },
    #[error("{field} = {value} is larger than weft allows ({max})")]
    TooLarge { field: &'static str, value: usize, max: usize },
}

impl Default for GptConfig {
    fn default() -> Self {
        GptConfig { layers: 2, heads: 4, width: 64, context: 64 }
    }
}

impl GptConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value, max) in [
            ("layers", self.layers, 256),
            ("heads", self.heads, 256),
            ("width", self.width, 16384),
            ("context", self.context, 65536),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
            if value > max {
                return Err(ConfigError::TooLarge { field, value, max });
            }
        }
        if !self.width.is_multiple_of(self.heads) {
            return Err(ConfigError::Heads { width: self.width, heads: self.heads });
        }
        Ok(())
    }

    pub fn head_size(&self) -> usize {
        self.width / self.heads
    }
}
