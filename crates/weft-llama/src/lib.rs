//! Llama-family models for weft: a GGUF reader, an importer to Hugging Face's layout
//! (`model.safetensors`, `config.json`, `tokenizer.json`), and a forward pass.
//!
//! A model family of its own crate: the round engine still sees only named f32 tensors; this
//! crate is where a pretrained open-weights base enters.

pub mod config;
pub mod family;
pub mod gguf;
pub mod import;
pub mod lora;
pub mod model;
pub mod round;
pub mod tokenizer;
pub mod train;

pub use config::{LlamaConfig, LlamaConfigError};
pub use family::{FullLora, LlamaAdapters, LlamaFamily, SharedLora};
pub use gguf::{Gguf, GgufError};
pub use import::{import, ImportError, ImportManifest, Imported};
pub use lora::{Adapters, LoraError, LoraSpec, Projection};
pub use model::{Llama, LlamaError};
pub use round::{train_steps, LlamaAdapterJobs, LoraNodeTrainer, RoundAdapter};
pub use tokenizer::{LlamaTokenizer, TokenizerError};
pub use train::{LoraReport, LoraTrainer, LoraTraining, Windows};
