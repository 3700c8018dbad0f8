//! The sovereign artifact: the node's own trained model, kept on its own disk every round.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_core::{ContentHash, ModelState, NodeId};
use weft_durable::write_atomic;

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
    /// What DP-SGD did (mechanism, this round's ε, records sampled and clipped), when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<weft_model::DpReport>,
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
    /// The trained model's configuration, as its trainer describes it.
    pub model: serde_json::Value,
    pub metrics: LocalMetrics,
    pub file: String,
    /// AdamW steps over the node's life after this round (its moments are in `optimizer.safetensors`).
    #[serde(default)]
    pub optimizer_steps: u64,
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
    pub const OPTIMIZER_FILE: &'static str = "optimizer.safetensors";

    /// Writes weights, optimizer state and manifest into `dir`, each file atomically (temp file,
    /// fsync, rename) and the manifest last: an artifact is complete once its manifest exists.
    pub fn write(
        dir: &Path,
        manifest: ArtifactManifest,
        weights: &ModelState,
        optimizer: &ModelState,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let bytes = optimizer.to_safetensors(None).map_err(std::io::Error::other)?;
        write_atomic(&dir.join(Self::OPTIMIZER_FILE), &bytes)?;
        let meta = HashMap::from([
            ("weft.node".to_owned(), manifest.node.to_string()),
            ("weft.round".to_owned(), manifest.round.to_string()),
            ("weft.base_hash".to_owned(), manifest.base_hash.to_string()),
        ]);
        let bytes = weights.to_safetensors(Some(meta)).map_err(std::io::Error::other)?;
        write_atomic(&dir.join(Self::MODEL_FILE), &bytes)?;
        weft_durable::crash::point("artifact-before-manifest");
        let json = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
        write_atomic(&dir.join(Self::MANIFEST_FILE), &json)?;
        Ok(SovereignArtifact { manifest, dir: dir.to_owned() })
    }

    /// Where round `round`'s artifact lives under a node's artifact directory.
    pub fn round_dir(node_dir: &Path, round: u64) -> PathBuf {
        node_dir.join(format!("round-{round:04}"))
    }

    /// Every complete artifact (one with a manifest) under a node's artifact directory, by round.
    /// A directory that does not exist holds none.
    pub fn all_in(node_dir: &Path) -> std::io::Result<Vec<Self>> {
        let entries = match std::fs::read_dir(node_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut artifacts = Vec::new();
        for entry in entries {
            let entry = entry?;
            let round_dir = entry.file_name().to_string_lossy().starts_with("round-");
            if round_dir && entry.path().join(Self::MANIFEST_FILE).is_file() {
                artifacts.push(Self::read(&entry.path())?);
            }
        }
        artifacts.sort_by_key(|a| a.manifest.round);
        Ok(artifacts)
    }

    /// Reads a complete artifact (one with a manifest) from `dir`.
    pub fn read(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join(Self::MANIFEST_FILE);
        let manifest = serde_json::from_slice(&std::fs::read(&path)?)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        Ok(SovereignArtifact { manifest, dir: dir.to_owned() })
    }

    /// The optimizer state saved with the artifact.
    pub fn load_optimizer(&self) -> std::io::Result<ModelState> {
        let path = self.dir.join(Self::OPTIMIZER_FILE);
        ModelState::from_safetensors(&std::fs::read(&path)?)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
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
