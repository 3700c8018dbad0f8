//! A node of a consortium whose contributions are adapters: each round it trains the round's
//! adapter on its own text from the announced base (through [`AdapterTrainer`], whatever the
//! model family), keeps every factor on its own disk, and sends the round's update form.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_core::{AdapterRound, ContentHash, Contribution, Delta, ModelState, NodeId};
use weft_durable::write_atomic;
use weft_model::{AdapterTrainer, AdapterTraining, SplitMix64, TrainedAdapter};

use crate::node::NodeError;

/// `manifest.json` beside a round's kept adapter: written last, so a round is complete on disk
/// once its manifest is there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterManifest {
    pub node: NodeId,
    pub language: String,
    pub round: u64,
    /// The shared base the adapter was trained on.
    pub base_hash: ContentHash,
    /// The round's adapter as the coordinator announced it (seed of `A`, rank, targets, track).
    pub adapter: AdapterRound,
    /// Content hash of `adapter.safetensors`: every factor, kept on the node.
    pub adapter_hash: ContentHash,
    /// Content hash of `update.safetensors`: what the node sent.
    pub update_hash: ContentHash,
    pub steps: u64,
    pub tokens: u64,
    /// Mean training loss of the round, nats per token.
    pub train_loss: f64,
    /// Under DP-SGD: the mechanism and the round's (ε, δ); the contribution states these only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<weft_model::DpReport>,
}

/// `sovereign/round-NNNN/manifest.json`: the node's private adapter, trained on the base
/// published after round `round` and never sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivateAdapterManifest {
    pub node: NodeId,
    pub round: u64,
    /// The published base it was trained on.
    pub base_hash: ContentHash,
    /// Its factors (`A` from a seed of the node's own).
    pub adapter: AdapterRound,
    pub adapter_hash: ContentHash,
    pub steps: u64,
    pub train_loss: f64,
}

/// The factors of a node's private adapter: the consortium's rank, alpha and targets, `A` from
/// the node's own seed, trained on the shared track (`A` frozen).
pub fn private_adapter(consortium: &AdapterRound, seed: u64) -> AdapterRound {
    AdapterRound { seed: seed ^ PRIVATE_SEED, track: weft_core::AdapterTrack::Shared, ..consortium.clone() }
}

/// The stream a node's private adapter draws its training windows from.
pub fn private_stream(seed: u64, node: &NodeId) -> SplitMix64 {
    SplitMix64::derive(seed, &format!("sovereign/{node}"), 0)
}

/// Separates a private adapter's `A` seed from the rounds' (which are BLAKE3-derived).
const PRIVATE_SEED: u64 = 0x5e1f;

pub struct AdapterNode {
    id: NodeId,
    language: String,
    trainer: Box<dyn AdapterTrainer>,
    /// The run's seed: each node and round draws its own stream of training windows from it.
    seed: u64,
    dir: PathBuf,
}

impl AdapterNode {
    pub const ADAPTER_FILE: &'static str = "adapter.safetensors";
    pub const UPDATE_FILE: &'static str = "update.safetensors";
    pub const MANIFEST_FILE: &'static str = "manifest.json";

    /// A node that keeps its adapters under `dir` (one `round-NNNN/` per round).
    pub fn new(
        id: NodeId,
        language: impl Into<String>,
        trainer: Box<dyn AdapterTrainer>,
        seed: u64,
        dir: impl Into<PathBuf>,
    ) -> Self {
        AdapterNode { id, language: language.into(), trainer, seed, dir: dir.into() }
    }

    /// Trains every later round with record-level DP-SGD; refused by a trainer that cannot.
    pub fn with_privacy(&mut self, private: weft_model::PrivateTraining) -> Result<(), NodeError> {
        self.trainer
            .with_privacy(private)
            .map_err(|e| NodeError::Training { node: self.id.clone(), detail: e.to_string() })
    }

    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// The base must be the one announced: training on anything else would send a delta from
    /// the wrong point.
    fn check_base(&self, base: &ModelState, announced: ContentHash) -> Result<(), NodeError> {
        let actual = base.content_hash();
        if actual != announced {
            return Err(NodeError::BaseMismatch { node: self.id.clone(), announced, actual });
        }
        Ok(())
    }

    fn round_dir(&self, round: u64) -> PathBuf {
        self.dir.join(format!("round-{round:04}"))
    }

    /// One round: check the base against its announced hash, train `adapter` on it, keep the
    /// adapter, return the contribution (its delta is the update). A round already complete on
    /// disk for the same base and adapter is sent again, not trained again.
    pub fn run_cycle(
        &mut self,
        round: u64,
        base: &ModelState,
        base_hash: ContentHash,
        adapter: &AdapterRound,
        settings: &AdapterTraining,
        mut on_step: impl FnMut(u64, f64),
    ) -> Result<Contribution, NodeError> {
        self.check_base(base, base_hash)?;
        let dir = self.round_dir(round);
        if let Some((manifest, update)) = read_kept(&dir) {
            if manifest.round == round && manifest.base_hash == base_hash && &manifest.adapter == adapter {
                tracing::info!(node = %self.id, round, "adapter already on disk: sending it again");
                return Ok(self.contribution(&manifest, update));
            }
        }
        let mut rng = SplitMix64::derive(self.seed, self.id.as_str(), round);
        let trained = self.train(round, base, adapter, settings, &mut rng, &mut on_step)?;
        let manifest = AdapterManifest {
            node: self.id.clone(),
            language: self.language.clone(),
            round,
            base_hash,
            adapter: adapter.clone(),
            adapter_hash: trained.adapter.content_hash(),
            update_hash: trained.update.content_hash(),
            steps: trained.steps,
            tokens: trained.tokens,
            train_loss: trained.mean_loss,
            dp: trained.dp,
        };
        let io = |source| NodeError::Artifact { node: self.id.clone(), dir: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let delta = |source| NodeError::Delta { node: self.id.clone(), source };
        write_atomic(&dir.join(Self::ADAPTER_FILE), &trained.adapter.to_safetensors(None).map_err(delta)?)
            .map_err(io)?;
        write_atomic(&dir.join(Self::UPDATE_FILE), &trained.update.to_safetensors(None).map_err(delta)?).map_err(io)?;
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| io(std::io::Error::other(e)))?;
        weft_durable::crash::point("node-trained");
        write_atomic(&dir.join(Self::MANIFEST_FILE), &text).map_err(io)?;
        Ok(self.contribution(&manifest, trained.update))
    }

    /// After the last round: trains the node's private adapter on the published `base` (shaped
    /// like the consortium's `adapter`, see [`private_adapter`]) and keeps it under
    /// `sovereign/round-NNNN/`. Never sent. Kept already for this base: not trained again.
    pub fn keep_private(
        &mut self,
        round: u64,
        base: &ModelState,
        base_hash: ContentHash,
        adapter: &AdapterRound,
        settings: &AdapterTraining,
    ) -> Result<PrivateAdapterManifest, NodeError> {
        self.check_base(base, base_hash)?;
        let dir = self.dir.join("sovereign").join(format!("round-{round:04}"));
        let manifest_path = dir.join(Self::MANIFEST_FILE);
        if let Some(kept) = std::fs::read(&manifest_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<PrivateAdapterManifest>(&bytes).ok())
            .filter(|kept| kept.base_hash == base_hash && kept.round == round)
        {
            return Ok(kept);
        }
        let record = private_adapter(adapter, self.seed);
        let mut rng = private_stream(self.seed, &self.id);
        let trained = self.train(round, base, &record, settings, &mut rng, &mut |_, _| {})?;
        let manifest = PrivateAdapterManifest {
            node: self.id.clone(),
            round,
            base_hash,
            adapter: record,
            adapter_hash: trained.adapter.content_hash(),
            steps: trained.steps,
            train_loss: trained.mean_loss,
        };
        let io = |source| NodeError::Artifact { node: self.id.clone(), dir: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let bytes = trained
            .adapter
            .to_safetensors(None)
            .map_err(|source| NodeError::Delta { node: self.id.clone(), source })?;
        write_atomic(&dir.join(Self::ADAPTER_FILE), &bytes).map_err(io)?;
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| io(std::io::Error::other(e)))?;
        write_atomic(&manifest_path, &text).map_err(io)?;
        Ok(manifest)
    }

    /// The trainer's round, its failure named as this node's.
    fn train(
        &mut self,
        round: u64,
        base: &ModelState,
        adapter: &AdapterRound,
        settings: &AdapterTraining,
        rng: &mut SplitMix64,
        on_step: &mut dyn FnMut(u64, f64),
    ) -> Result<TrainedAdapter, NodeError> {
        self.trainer
            .train_round(round, base, adapter, settings, rng, on_step)
            .map_err(|e| NodeError::Training { node: self.id.clone(), detail: e.to_string() })
    }

    fn contribution(&self, manifest: &AdapterManifest, update: ModelState) -> Contribution {
        let (declared, token_count) = match &manifest.dp {
            // As for the byte model: under DP only the mechanism and its (ε, δ) are released.
            Some(dp) => (crate::declared_privacy(dp, manifest.steps), 0),
            None => (BTreeMap::from([("train_loss".to_owned(), manifest.train_loss)]), manifest.tokens),
        };
        Contribution {
            node: self.id.clone(),
            round: manifest.round,
            base_hash: manifest.base_hash,
            delta: Delta::from_state(update),
            token_count,
            declared,
        }
    }
}

/// A round kept on disk, if it is complete and its update is the one its manifest names.
fn read_kept(dir: &Path) -> Option<(AdapterManifest, ModelState)> {
    let manifest: AdapterManifest =
        serde_json::from_slice(&std::fs::read(dir.join(AdapterNode::MANIFEST_FILE)).ok()?).ok()?;
    let update = ModelState::from_safetensors(&std::fs::read(dir.join(AdapterNode::UPDATE_FILE)).ok()?).ok()?;
    (update.content_hash() == manifest.update_hash).then_some((manifest, update))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::{AdapterTrack, Tensor};
    use weft_model::{FamilyError, TrainedAdapter};

    /// A trainer that counts its calls and returns values drawn from `rng`, so that a second
    /// call with the same stream would give the same update.
    struct Counting {
        calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AdapterTrainer for Counting {
        fn train_round(
            &mut self,
            _round: u64,
            base: &ModelState,
            _adapter: &AdapterRound,
            _settings: &AdapterTraining,
            rng: &mut SplitMix64,
            on_step: &mut dyn FnMut(u64, f64),
        ) -> Result<TrainedAdapter, FamilyError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if base.is_empty() {
                return Err("an empty base".into());
            }
            on_step(1, 0.5);
            let mut update = ModelState::new();
            update.insert("b", Tensor::new(vec![2], vec![rng.normal() as f32, rng.normal() as f32])?);
            let mut adapter = update.clone();
            adapter.insert("a", Tensor::new(vec![1], vec![1.0])?);
            Ok(TrainedAdapter { update, adapter, steps: 1, tokens: 7, mean_loss: 0.5, last_loss: 0.5, dp: None })
        }
    }

    const SETTINGS: AdapterTraining = AdapterTraining { steps: 1, batch: 1, context: 2, lr: 1e-3 };

    fn record() -> AdapterRound {
        AdapterRound { seed: 3, rank: 1, alpha: 1.0, targets: vec!["q".into()], track: AdapterTrack::Shared }
    }

    fn base() -> ModelState {
        let mut base = ModelState::new();
        base.insert("w", Tensor::new(vec![2], vec![1.0, 2.0]).unwrap());
        base
    }

    #[test]
    fn a_round_is_kept_and_sent_again_without_training_again() {
        let dir = tempfile::tempdir().unwrap();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let id = NodeId::new("n1").unwrap();
        let node = |calls| AdapterNode::new(id.clone(), "de", Box::new(Counting { calls }), 9, dir.path());
        let base = base();
        let first =
            node(calls.clone()).run_cycle(1, &base, base.content_hash(), &record(), &SETTINGS, |_, _| {}).unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(first.token_count, 7);
        // A restarted node sends the same update for the same round, base and adapter…
        let again =
            node(calls.clone()).run_cycle(1, &base, base.content_hash(), &record(), &SETTINGS, |_, _| {}).unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(again.delta.content_hash(), first.delta.content_hash());
        // …and trains again when the coordinator announces another adapter for it.
        let other = AdapterRound { seed: 4, ..record() };
        node(calls.clone()).run_cycle(1, &base, base.content_hash(), &other, &SETTINGS, |_, _| {}).unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        let kept: AdapterManifest =
            serde_json::from_slice(&std::fs::read(dir.path().join("round-0001/manifest.json")).unwrap()).unwrap();
        assert_eq!(kept.adapter, other);
        let adapter = std::fs::read(dir.path().join("round-0001/adapter.safetensors")).unwrap();
        assert_eq!(ModelState::from_safetensors(&adapter).unwrap().content_hash(), kept.adapter_hash);
    }

    #[test]
    fn a_base_that_is_not_the_announced_one_is_refused_before_training() {
        let dir = tempfile::tempdir().unwrap();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut node = AdapterNode::new(
            NodeId::new("n1").unwrap(),
            "de",
            Box::new(Counting { calls: calls.clone() }),
            9,
            dir.path(),
        );
        let err =
            node.run_cycle(1, &base(), ModelState::new().content_hash(), &record(), &SETTINGS, |_, _| {}).unwrap_err();
        assert!(matches!(err, NodeError::BaseMismatch { .. }), "{err}");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
        let err =
            node.run_cycle(1, &ModelState::new(), ModelState::new().content_hash(), &record(), &SETTINGS, |_, _| {});
        assert!(matches!(err, Err(NodeError::Training { .. })));
        assert!(!dir.path().join("round-0001/manifest.json").exists(), "a failed round keeps nothing");
    }

    /// Counting's update, stated as trained with DP-SGD once privacy is set.
    struct Private {
        inner: Counting,
        private: Option<weft_model::PrivateTraining>,
    }

    impl AdapterTrainer for Private {
        fn train_round(
            &mut self,
            round: u64,
            base: &ModelState,
            adapter: &AdapterRound,
            settings: &AdapterTraining,
            rng: &mut SplitMix64,
            on_step: &mut dyn FnMut(u64, f64),
        ) -> Result<TrainedAdapter, FamilyError> {
            let mut trained = self.inner.train_round(round, base, adapter, settings, rng, on_step)?;
            trained.dp = self.private.as_ref().map(|p| weft_model::DpReport {
                mechanism: p.dp,
                delta: p.delta,
                epsilon: 0.75,
                records: 10,
                sampled: 4,
                clipped: 1,
            });
            Ok(trained)
        }

        fn with_privacy(&mut self, private: weft_model::PrivateTraining) -> Result<(), FamilyError> {
            self.private = Some(private);
            Ok(())
        }
    }

    #[test]
    fn under_dp_an_adapter_states_its_mechanism_only_and_a_trainer_that_cannot_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let private = weft_model::PrivateTraining {
            dp: weft_privacy::DpSgd { clip_norm: 1.0, noise_multiplier: 0.9, sample_rate: 0.4 },
            delta: 1e-5,
            secret: [1; 32],
        };
        let id = NodeId::new("n1").unwrap();
        let mut plain = AdapterNode::new(id.clone(), "de", Box::new(Counting { calls: calls.clone() }), 9, dir.path());
        assert!(matches!(plain.with_privacy(private.clone()), Err(NodeError::Training { .. })));
        let trainer = Private { inner: Counting { calls }, private: None };
        let mut node = AdapterNode::new(id, "de", Box::new(trainer), 9, dir.path().join("private"));
        node.with_privacy(private).unwrap();
        let base = base();
        let sent = node.run_cycle(1, &base, base.content_hash(), &record(), &SETTINGS, |_, _| {}).unwrap();
        assert_eq!(sent.token_count, 0, "how many tokens a Poisson sample held is not released");
        assert_eq!(sent.declared.get(crate::DP_EPSILON), Some(&0.75));
        assert_eq!(sent.declared.get(crate::DP_NOISE_MULTIPLIER), Some(&0.9));
        assert!(!sent.declared.contains_key("train_loss"));
        // Sent again from disk after a restart: the same statement.
        let again = node.run_cycle(1, &base, base.content_hash(), &record(), &SETTINGS, |_, _| {}).unwrap();
        assert_eq!(again.declared, sent.declared);
    }
}
