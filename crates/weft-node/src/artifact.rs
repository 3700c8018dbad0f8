//! The sovereign artifact: the node's own trained model, kept on its own disk every round.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_core::{ContentHash, ModelState, NodeId};
use weft_model::GptConfig;

/// What the node measured about its own training. Reported to the coordinator as *declared*
/// metrics, which the coordinator records and never uses for weights.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalMetrics {
    pub steps: u64,
    pub tokens: u64,
    /// Mean training loss over the cycle, nats/byte.
    pub train_loss: f64,
    /// Mean training loss over the cycle's last quarter, nats/byte.
    pub final_train_loss: f64,
    /// Loss on the node's own validation tail before and after training, nats/byte.
    pub validation_loss_before: f64,
    pub validation_loss_after: f64,
    /// Global gradient norm of the last step, before clipping.
    pub grad_norm: f64,
}

/// `manifest.json` beside each artifact's `model.safetensors`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArtifactManifest {
    pub node: NodeId,
    pub language: String,
    pub round: u64,
    /// The shared base this artifact was trained from.
    pub base_hash: ContentHash,
    /// Content hash of the artifact's own weights.
    pub artifact_hash: ContentHash,
    pub model: GptConfig,
    pub metrics: LocalMetrics,
    pub file: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SovereignArtifact {
    pub manifest: ArtifactManifest,
    /// Directory holding `model.safetensors` and `manifest.json`.
    pub dir: PathBuf,
}

impl SovereignArtifact {
    pub const MODEL_FILE: &'static str = "model.safetensors";
    pub const MANIFEST_FILE: &'static str = "manifest.json";

    /// Writes weights and manifest into `dir` (each file atomically: temp file, fsync, rename).
    pub fn write(dir: &Path, manifest: ArtifactManifest, weights: &ModelState) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let meta = HashMap::from([
            ("weft.node".to_owned(), manifest.node.to_string()),
            ("weft.round".to_owned(), manifest.round.to_string()),
            ("weft.base_hash".to_owned(), manifest.base_hash.to_string()),
        ]);
        let bytes = weights.to_safetensors(Some(meta)).map_err(std::io::Error::other)?;
        write_atomic(&dir.join(Self::MODEL_FILE), &bytes)?;
        let json = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
        write_atomic(&dir.join(Self::MANIFEST_FILE), &json)?;
        Ok(SovereignArtifact { manifest, dir: dir.to_owned() })
    }

    /// Reads the weights back and checks them against the manifest's hash.
    pub fn load_weights(&self) -> std::io::Result<ModelState> {
        let path = self.dir.join(Self::MODEL_FILE);
        let bytes = std::fs::read(&path)?;
        let state = ModelState::from_safetensors(&bytes)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        if state.content_hash() != self.manifest.artifact_hash {
            return Err(std::io::Error::other(format!(
                "{}: content hash {} does not match the manifest's {}",
                path.display(),
                state.content_hash(),
                self.manifest.artifact_hash
            )));
        }
        Ok(state)
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}
