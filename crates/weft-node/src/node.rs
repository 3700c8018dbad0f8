//! One sovereign node and its training cycle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_core::{ContentHash, Contribution, Delta, ModelState, NodeId, StateError};
use weft_model::{
    AdamWSettings, ByteGptTrainer, DpReport, FamilyError, GptConfig, ModelError, PrivateTraining, SplitMix64,
    WeightTrainer,
};
use weft_privacy::DpRule;

use crate::artifact::{ArtifactManifest, LocalMetrics, SovereignArtifact};
use crate::corpus::LocalCorpus;

/// How the built-in byte GPT's nodes train each round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeSettings {
    /// Local optimizer steps per round (K).
    pub steps: u64,
    /// Sequences per batch.
    pub batch_rows: usize,
    pub adamw: AdamWSettings,
    /// The run's seed; each node and round draws its own stream from it.
    pub seed: u64,
    /// Record-level DP-SGD, when the consortium requires it.
    #[serde(default)]
    pub privacy: Option<DpRule>,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings { steps: 60, batch_rows: 16, adamw: AdamWSettings::default(), seed: 0, privacy: None }
    }
}

impl NodeSettings {
    /// The byte GPT's trainer for a node with these settings (fails on a configuration out of
    /// range). `secret` keys the node's DP sampling and noise when privacy is on; it must be
    /// the node's alone (see [`node_secret`]).
    pub fn byte_gpt_trainer(&self, config: GptConfig, secret: &[u8; 32]) -> Result<Box<dyn WeightTrainer>, ModelError> {
        let trainer = ByteGptTrainer::new(config, self.steps, self.batch_rows, self.adamw)?;
        Ok(Box::new(match self.privacy {
            Some(rule) => {
                trainer.with_privacy(PrivateTraining { dp: rule.mechanism, delta: rule.delta, secret: *secret })
            }
            None => trainer,
        }))
    }
}

/// A node's private 32 bytes for its DP stream, derived from secret key material only it holds
/// (its signing key over the network). Never sent: whoever knows it can subtract the noise.
pub fn node_secret(key_material: &[u8], node: &NodeId) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("weft node dp secret v1");
    hasher.update(key_material).update(node.as_str().as_bytes());
    *hasher.finalize().as_bytes()
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "node {node}: the base received does not match its announced hash (announced {announced}, content {actual})"
    )]
    BaseMismatch { node: NodeId, announced: ContentHash, actual: ContentHash },
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

/// A node of a full-weight consortium. It trains through a [`WeightTrainer`] and never sees
/// which model family is behind it.
pub struct Node {
    id: NodeId,
    language: String,
    corpus: LocalCorpus,
    /// Lives across rounds with its optimizer's state (AdamW's moments for the byte GPT), which
    /// is the node's and never sent.
    trainer: Box<dyn WeightTrainer>,
    /// The run's seed; each round draws its own stream from it.
    seed: u64,
    dir: PathBuf,
    latest: Option<SovereignArtifact>,
}

impl Node {
    /// A node that keeps its artifacts under `dir` (one sub-directory per round).
    pub fn new(
        id: NodeId,
        language: impl Into<String>,
        corpus: LocalCorpus,
        trainer: Box<dyn WeightTrainer>,
        seed: u64,
        dir: impl Into<PathBuf>,
    ) -> Result<Self, NodeError> {
        if corpus.train_len() == 0 {
            return Err(NodeError::EmptyCorpus { node: id });
        }
        Ok(Node { id, language: language.into(), corpus, trainer, seed, dir: dir.into(), latest: None })
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

    /// Optimizer steps over the node's whole life (the optimizer's state persists across rounds).
    pub fn optimizer_steps(&self) -> u64 {
        self.trainer.optimizer_steps()
    }

    /// One cycle: check the base, train K steps, keep the sovereign artifact, return the
    /// contribution. `on_step(step, loss)` reports progress.
    pub fn run_cycle(
        &mut self,
        round: u64,
        base: &ModelState,
        base_hash: ContentHash,
        mut on_step: impl FnMut(u64, f64),
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
        if !self.trainer.has_optimizer() {
            self.restore_saved_optimizer(round, base)?;
        }
        let training = |e: FamilyError| NodeError::Training { node: self.id.clone(), detail: e.to_string() };
        let mut rng = SplitMix64::derive(self.seed, self.id.as_str(), round);
        let trained =
            self.trainer.train_round(round, base, self.corpus.text(), &mut rng, &mut on_step).map_err(training)?;
        let moments = self.trainer.optimizer_state().map_err(training)?;
        let report = &trained.report;
        let metrics = LocalMetrics {
            steps: report.steps,
            tokens: report.tokens,
            train_loss: report.mean_loss,
            final_train_loss: report.final_loss,
            validation_loss_before: trained.validation_loss_before,
            validation_loss_after: trained.validation_loss_after,
            grad_norm: report.last_grad_norm,
            dp: trained.dp,
        };
        let manifest = ArtifactManifest {
            node: self.id.clone(),
            language: self.language.clone(),
            round,
            base_hash,
            artifact_hash: trained.weights.content_hash(),
            model: self.trainer.configuration(),
            metrics,
            file: SovereignArtifact::MODEL_FILE.to_owned(),
            optimizer_steps: self.trainer.optimizer_steps(),
        };
        weft_durable::crash::point("node-trained");
        let artifact = SovereignArtifact::write(&dir, manifest, &trained.weights, &moments)
            .map_err(|source| NodeError::Artifact { node: self.id.clone(), dir: dir.clone(), source })?;
        self.contribution_of(artifact, base, &trained.weights)
    }

    /// The contribution of a cycle already kept on disk; the optimizer continues from its state.
    fn resume_cycle(&mut self, artifact: SovereignArtifact, base: &ModelState) -> Result<Cycle, NodeError> {
        let io = |source| NodeError::Artifact { node: self.id.clone(), dir: artifact.dir.clone(), source };
        let local = artifact.load_weights().map_err(io)?;
        self.restore_optimizer(&artifact, &local)?;
        tracing::info!(node = %self.id, round = artifact.manifest.round, "cycle already on disk: sending it again");
        self.contribution_of(artifact, base, &local)
    }

    /// The optimizer as saved by the latest complete cycle before `round`, if there is one.
    fn restore_saved_optimizer(&mut self, round: u64, layout: &ModelState) -> Result<(), NodeError> {
        let latest =
            (1..round).rev().find_map(|r| SovereignArtifact::read(&SovereignArtifact::round_dir(&self.dir, r)).ok());
        match latest {
            Some(artifact) => self.restore_optimizer(&artifact, layout),
            None => Ok(()),
        }
    }

    fn restore_optimizer(&mut self, artifact: &SovereignArtifact, layout: &ModelState) -> Result<(), NodeError> {
        let io = |source| NodeError::Artifact { node: self.id.clone(), dir: artifact.dir.clone(), source };
        let saved = artifact.load_optimizer().map_err(io)?;
        self.trainer
            .restore_optimizer(layout, &saved, artifact.manifest.optimizer_steps)
            .map_err(|e| io(std::io::Error::other(e.to_string())))
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
        let (declared, token_count) = match metrics.dp {
            // Under DP the node releases the noised delta and its mechanism only: its losses and
            // how many tokens its Poisson samples held are data-dependent and not covered by the
            // guarantee, so they stay in its own manifest.
            Some(dp) => (declared_privacy(&dp, metrics.steps), 0),
            None => (
                BTreeMap::from([
                    ("train_loss".to_owned(), metrics.train_loss),
                    ("final_train_loss".to_owned(), metrics.final_train_loss),
                    ("validation_loss".to_owned(), metrics.validation_loss_after),
                    ("validation_gain".to_owned(), metrics.validation_loss_before - metrics.validation_loss_after),
                ]),
                metrics.tokens,
            ),
        };
        let contribution = Contribution { node: self.id.clone(), round, base_hash, delta, token_count, declared };
        Ok(Cycle { artifact, contribution })
    }
}

/// What a DP-trained contribution states, signed with it: the mechanism and the (ε, δ) of this
/// round alone. The coordinator checks the mechanism against the consortium's and computes the
/// composed ε itself.
pub fn declared_privacy(dp: &DpReport, steps: u64) -> BTreeMap<String, f64> {
    BTreeMap::from([
        (DP_NOISE_MULTIPLIER.to_owned(), dp.mechanism.noise_multiplier),
        (DP_SAMPLE_RATE.to_owned(), dp.mechanism.sample_rate),
        (DP_CLIP_NORM.to_owned(), dp.mechanism.clip_norm),
        (DP_STEPS.to_owned(), steps as f64),
        (DP_EPSILON.to_owned(), dp.epsilon),
        (DP_DELTA.to_owned(), dp.delta),
    ])
}

/// The names of a DP contribution's statements in its signed manifest.
pub const DP_NOISE_MULTIPLIER: &str = "dp_noise_multiplier";
pub const DP_SAMPLE_RATE: &str = "dp_sample_rate";
pub const DP_CLIP_NORM: &str = "dp_clip_norm";
pub const DP_STEPS: &str = "dp_steps";
pub const DP_EPSILON: &str = "dp_epsilon";
pub const DP_DELTA: &str = "dp_delta";

#[cfg(test)]
mod tests {
    use super::*;
    use weft_model::Gpt;

    const TEXT: &str = "Everyone has the right to life, liberty and security of person. \
        No one shall be held in slavery or servitude; slavery and the slave trade shall be prohibited in all their forms. ";

    fn node(dir: &Path) -> Node {
        let config = GptConfig { layers: 1, heads: 2, width: 16, context: 16 };
        let settings = NodeSettings { steps: 8, batch_rows: 4, ..NodeSettings::default() };
        let corpus = LocalCorpus::from_bytes(TEXT.repeat(4).into_bytes());
        Node::new(
            NodeId::new("n1").unwrap(),
            "en",
            corpus,
            settings.byte_gpt_trainer(config, &[0; 32]).unwrap(),
            settings.seed,
            dir,
        )
        .unwrap()
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

    /// A node restarted between rounds continues from the optimizer state it kept: its next
    /// round is the same bits as a node that never stopped.
    #[test]
    fn a_restarted_node_continues_its_optimizer_from_its_artifacts() {
        let base = Gpt::init(GptConfig { layers: 1, heads: 2, width: 16, context: 16 }, 1).unwrap().to_state();
        let (kept, restarted) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut rounds = Vec::new();
        for dir in [kept.path(), restarted.path()] {
            let mut node = node(dir);
            let first = node.run_cycle(1, &base, base.content_hash(), |_, _| {}).unwrap();
            let next = first.contribution.delta.applied_to(&base, 0.5).unwrap();
            if dir == restarted.path() {
                node = self::node(dir);
                assert_eq!(node.optimizer_steps(), 0);
            }
            let second = node.run_cycle(2, &next, next.content_hash(), |_, _| {}).unwrap();
            assert_eq!(node.optimizer_steps(), 16);
            rounds.push(second.artifact.manifest.artifact_hash);
        }
        assert_eq!(rounds[0], rounds[1]);
        // The manifest names the trained model's configuration.
        let manifest = SovereignArtifact::read(&kept.path().join("round-0002")).unwrap().manifest;
        assert_eq!(manifest.model["width"], 16);
    }

    #[test]
    fn refuses_a_base_the_trainer_cannot_train_by_name_and_keeps_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let mut node = node(tmp.path());
        let other = Gpt::init(GptConfig { layers: 1, heads: 2, width: 32, context: 16 }, 1).unwrap().to_state();
        let err = node.run_cycle(1, &other, other.content_hash(), |_, _| {}).err().unwrap();
        assert!(matches!(err, NodeError::Training { .. }), "{err}");
        assert!(!tmp.path().join("round-0001").exists());
    }
}
