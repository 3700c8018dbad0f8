//! One sovereign node and its training cycle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_core::{ContentHash, Contribution, Delta, ModelState, NodeId, StateError};
use weft_model::{AdamW, AdamWSettings, Gpt, GptConfig, ModelError, SplitMix64};

use crate::artifact::{ArtifactManifest, LocalMetrics, SovereignArtifact};

/// AdamW's moments as a storable state.
fn moments_state(m: &[f32], v: &[f32]) -> Result<ModelState, StateError> {
    let mut state = ModelState::new();
    for (name, data) in [("m", m), ("v", v)] {
        let tensor = weft_core::Tensor::new(vec![data.len()], data.to_vec())
            .map_err(|e| StateError::Format(format!("optimizer moment {name}: {e}")))?;
        state.insert(name, tensor);
    }
    Ok(state)
}
use crate::corpus::LocalCorpus;

/// How a node trains each round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeSettings {
    /// Local optimizer steps per round (K).
    pub steps: u64,
    /// Sequences per batch.
    pub batch_rows: usize,
    pub adamw: AdamWSettings,
    /// The run's seed; each node and round draws its own stream from it.
    pub seed: u64,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings { steps: 60, batch_rows: 16, adamw: AdamWSettings::default(), seed: 0 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "node {node}: the base received does not match its announced hash (announced {announced}, content {actual})"
    )]
    BaseMismatch { node: NodeId, announced: ContentHash, actual: ContentHash },
    #[error("node {node}: the base does not fit the configured model: {source}")]
    Model { node: NodeId, source: ModelError },
    #[error("node {node}: training corpus is empty")]
    EmptyCorpus { node: NodeId },
    #[error("node {node}: cannot write its sovereign artifact under {dir}: {source}")]
    Artifact { node: NodeId, dir: PathBuf, source: std::io::Error },
    #[error("node {node}: {source}")]
    Delta { node: NodeId, source: StateError },
    #[error("node {node}: training failed: {detail}")]
    Training { node: NodeId, detail: String },
}

/// What one cycle leaves: the artifact the node keeps and the contribution it sends.
pub struct Cycle {
    pub artifact: SovereignArtifact,
    pub contribution: Contribution,
}

pub struct Node {
    id: NodeId,
    language: String,
    corpus: LocalCorpus,
    config: GptConfig,
    settings: NodeSettings,
    dir: PathBuf,
    /// Lives across rounds: AdamW's moments and step count are the node's, never sent.
    optimizer: Option<AdamW>,
    latest: Option<SovereignArtifact>,
}

impl Node {
    /// A node that keeps its artifacts under `dir` (one sub-directory per round).
    pub fn new(
        id: NodeId,
        language: impl Into<String>,
        corpus: LocalCorpus,
        config: GptConfig,
        settings: NodeSettings,
        dir: impl Into<PathBuf>,
    ) -> Result<Self, NodeError> {
        if corpus.train_len() == 0 {
            return Err(NodeError::EmptyCorpus { node: id });
        }
        config.validate().map_err(|e| NodeError::Model { node: id.clone(), source: e.into() })?;
        Ok(Node {
            id,
            language: language.into(),
            corpus,
            config,
            settings,
            dir: dir.into(),
            optimizer: None,
            latest: None,
        })
    }

    pub fn id(&self) -> &NodeId {
        &self.id
    }

    pub fn language(&self) -> &str {
        &self.language
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sovereign artifact of the last cycle.
    pub fn latest_artifact(&self) -> Option<&SovereignArtifact> {
        self.latest.as_ref()
    }

    /// Optimizer steps over the node's whole life (AdamW state persists across rounds).
    pub fn optimizer_steps(&self) -> u64 {
        self.optimizer.as_ref().map_or(0, AdamW::steps_taken)
    }

    /// One cycle: check and load the base, train K steps, keep the sovereign artifact, return
    /// the contribution. `on_step(step, loss)` reports progress.
    pub fn run_cycle(
        &mut self,
        round: u64,
        base: &ModelState,
        base_hash: ContentHash,
        on_step: impl FnMut(u64, f64),
    ) -> Result<Cycle, NodeError> {
        let actual = base.content_hash();
        if actual != base_hash {
            return Err(NodeError::BaseMismatch { node: self.id.clone(), announced: base_hash, actual });
        }
        let dir = SovereignArtifact::round_dir(&self.dir, round);
        // A cycle completed before a restart is not trained again: same artifact, same delta.
        if let Ok(artifact) = SovereignArtifact::read(&dir) {
            if artifact.manifest.base_hash == base_hash && artifact.manifest.round == round {
                return self.resume_cycle(artifact, base);
            }
        }
        let mut model =
            Gpt::from_state(self.config, base).map_err(|source| NodeError::Model { node: self.id.clone(), source })?;
        let eval_rows = self.settings.batch_rows.max(1);
        let validation_loss_before = model.loss_per_byte(self.corpus.validation(), eval_rows);
        if self.optimizer.is_none() {
            self.optimizer = self.saved_optimizer(round, &model)?;
        }
        let optimizer = self.optimizer.get_or_insert_with(|| AdamW::new(self.settings.adamw, &model));
        let mut rng = SplitMix64::derive(self.settings.seed, self.id.as_str(), round);
        let report = optimizer.train(
            &mut model,
            self.corpus.train(),
            self.settings.steps,
            self.settings.batch_rows,
            &mut rng,
            on_step,
        );
        let local = model.to_state();
        let (m, v) = optimizer.moments();
        let optimizer_steps = optimizer.steps_taken();
        let moments = moments_state(m, v).map_err(|source| NodeError::Delta { node: self.id.clone(), source })?;
        let metrics = LocalMetrics {
            steps: report.steps,
            tokens: report.tokens,
            train_loss: report.mean_loss,
            final_train_loss: report.final_loss,
            validation_loss_before,
            validation_loss_after: model.loss_per_byte(self.corpus.validation(), eval_rows),
            grad_norm: report.last_grad_norm,
        };
        let manifest = ArtifactManifest {
            node: self.id.clone(),
            language: self.language.clone(),
            round,
            base_hash,
            artifact_hash: local.content_hash(),
            model: self.config,
            metrics: metrics.clone(),
            file: SovereignArtifact::MODEL_FILE.to_owned(),
            optimizer_steps,
        };
        weft_durable::crash::point("node-trained");
        let artifact = SovereignArtifact::write(&dir, manifest, &local, &moments)
            .map_err(|source| NodeError::Artifact { node: self.id.clone(), dir: dir.clone(), source })?;
        self.contribution_of(artifact, base, &local)
    }

    /// The contribution of a cycle already kept on disk; the optimizer continues from its state.
    fn resume_cycle(&mut self, artifact: SovereignArtifact, base: &ModelState) -> Result<Cycle, NodeError> {
        let io = |source| NodeError::Artifact { node: self.id.clone(), dir: artifact.dir.clone(), source };
        let local = artifact.load_weights().map_err(io)?;
        let model = Gpt::from_state(self.config, &local)
            .map_err(|source| NodeError::Model { node: self.id.clone(), source })?;
        self.optimizer = Some(self.optimizer_from(&artifact, &model)?);
        tracing::info!(node = %self.id, round = artifact.manifest.round, "cycle already on disk: sending it again");
        self.contribution_of(artifact, base, &local)
    }

    /// AdamW as saved by the latest complete cycle before `round`, if there is one.
    fn saved_optimizer(&self, round: u64, model: &Gpt) -> Result<Option<AdamW>, NodeError> {
        let latest =
            (1..round).rev().find_map(|r| SovereignArtifact::read(&SovereignArtifact::round_dir(&self.dir, r)).ok());
        latest.map(|artifact| self.optimizer_from(&artifact, model)).transpose()
    }

    fn optimizer_from(&self, artifact: &SovereignArtifact, model: &Gpt) -> Result<AdamW, NodeError> {
        let io = |source| NodeError::Artifact { node: self.id.clone(), dir: artifact.dir.clone(), source };
        let saved = artifact.load_optimizer().map_err(io)?;
        let (m, v) = match (saved.get("m"), saved.get("v")) {
            (Some(m), Some(v)) => (m.data().to_vec(), v.data().to_vec()),
            _ => return Err(io(std::io::Error::other("optimizer state lacks its moments"))),
        };
        AdamW::restore(self.settings.adamw, model, m, v, artifact.manifest.optimizer_steps)
            .ok_or_else(|| io(std::io::Error::other("optimizer state does not fit the model")))
    }

    fn contribution_of(
        &mut self,
        artifact: SovereignArtifact,
        base: &ModelState,
        local: &ModelState,
    ) -> Result<Cycle, NodeError> {
        let metrics = artifact.manifest.metrics.clone();
        let round = artifact.manifest.round;
        let base_hash = artifact.manifest.base_hash;
        self.latest = Some(artifact.clone());
        let delta = Delta::between(base, local).map_err(|source| NodeError::Delta { node: self.id.clone(), source })?;
        let declared = BTreeMap::from([
            ("train_loss".to_owned(), metrics.train_loss),
            ("final_train_loss".to_owned(), metrics.final_train_loss),
            ("validation_loss".to_owned(), metrics.validation_loss_after),
            ("validation_gain".to_owned(), metrics.validation_loss_before - metrics.validation_loss_after),
        ]);
        let contribution =
            Contribution { node: self.id.clone(), round, base_hash, delta, token_count: metrics.tokens, declared };
        Ok(Cycle { artifact, contribution })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "Everyone has the right to life, liberty and security of person. \
        No one shall be held in slavery or servitude; slavery and the slave trade shall be prohibited in all their forms. ";

    fn node(dir: &Path) -> Node {
        let config = GptConfig { layers: 1, heads: 2, width: 16, context: 16 };
        let settings = NodeSettings { steps: 8, batch_rows: 4, ..NodeSettings::default() };
        let corpus = LocalCorpus::from_bytes(TEXT.repeat(4).into_bytes());
        Node::new(NodeId::new("n1").unwrap(), "en", corpus, config, settings, dir).unwrap()
    }

    /// Tapestry invariant 1: the node keeps a full artifact and returns a non-zero delta with the
    /// base's keys.
    #[test]
    fn keeps_a_full_artifact_and_returns_a_nonzero_delta_with_the_same_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let mut node = node(tmp.path());
        let base = Gpt::init(GptConfig { layers: 1, heads: 2, width: 16, context: 16 }, 1).unwrap().to_state();
        let cycle = node.run_cycle(1, &base, base.content_hash(), |_, _| {}).unwrap();
        let delta = cycle.contribution.delta.state();
        assert!(delta.names().eq(base.names()));
        assert!(!cycle.contribution.delta.is_zero());
        let kept = cycle.artifact.load_weights().unwrap();
        assert!(kept.names().eq(base.names()));
        // base + (local − base) is local up to float rounding.
        let rebuilt = cycle.contribution.delta.applied_to(&base, 1.0).unwrap();
        for ((_, a), (_, b)) in rebuilt.iter().zip(kept.iter()) {
            assert!(a.data().iter().zip(b.data()).all(|(x, y)| (x - y).abs() <= 1e-6));
        }
        assert!(tmp.path().join("round-0001/manifest.json").is_file());
        assert_eq!(cycle.artifact.manifest.base_hash, base.content_hash());
        assert_eq!(cycle.contribution.token_count, 8 * 4 * 16);
        // The optimizer's state survives into the next round.
        let next = cycle.contribution.delta.applied_to(&base, 0.5).unwrap();
        node.run_cycle(2, &next, next.content_hash(), |_, _| {}).unwrap();
        assert_eq!(node.optimizer_steps(), 16);
    }

    #[test]
    fn refuses_a_base_that_does_not_match_its_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let mut node = node(tmp.path());
        let base = Gpt::init(GptConfig { layers: 1, heads: 2, width: 16, context: 16 }, 1).unwrap().to_state();
        let err = node.run_cycle(1, &base, ContentHash([0; 32]), |_, _| {}).err().unwrap();
        assert!(matches!(err, NodeError::BaseMismatch { .. }));
        assert!(!tmp.path().join("round-0001").exists());
    }
}
