//! The JSON report of a run (`weft demo --json`, `report.json` under `--out`). One schema,
//! built from the coordinator's storage and the nodes' artifacts after the run, whether the run
//! was one process or a coordinator and nodes over the network.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use weft_coordinator::{BlobStore, FsBlobStore, Journal, Measure, RoundRecord, SqliteJournal};
use weft_core::quality::LossTable;
use weft_core::{Aggregator, ContentHash, NodeId, OuterOptimizer, Policy};
use weft_model::GptConfig;
use weft_net::encoding::Encoding;
use weft_net::server::WireBytes;
use weft_node::SovereignArtifact;

use crate::attack::AttackKind;
use crate::run::RunSettings;

/// The report. Its schema is documented in the README.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub seed: u64,
    pub model: GptConfig,
    pub parameters: usize,
    pub policy: Policy,
    pub aggregator: Aggregator,
    pub outer_optimizer: OuterOptimizer,
    pub local_steps: u64,
    pub nodes: Vec<NodeInfo>,
    pub initial_base_hash: ContentHash,
    pub initial_heldout_loss: LossTable,
    pub rounds: Vec<RoundRecord>,
    pub final_base_hash: ContentHash,
    pub final_heldout_loss: LossTable,
    /// Each node's own model after its last round, on the consortium's held-out text.
    pub sovereign_heldout_loss: BTreeMap<NodeId, LossTable>,
    pub seconds: f64,
    /// How the run went over the network (`--processes`); absent for one process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    pub node: NodeId,
    pub language: String,
    pub corpus_bytes: usize,
    /// The attack this node runs (`null` for an honest node).
    pub attacker: Option<AttackKind>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkReport {
    pub encoding: Encoding,
    /// round → node → bytes of delta received.
    pub wire_bytes: WireBytes,
    /// round → seconds from opening to the closed record.
    pub round_seconds: BTreeMap<u64, f64>,
}

/// Where the run's pieces are, once it is over.
pub struct Finished<'a> {
    pub run: &'a RunSettings,
    /// The coordinator's storage directory.
    pub storage: &'a Path,
    pub nodes: Vec<NodeInfo>,
    /// Each node's artifact directory.
    pub artifacts: Vec<(NodeId, PathBuf)>,
    pub seconds: f64,
    pub network: Option<NetworkReport>,
}

impl Report {
    /// Reads what the run left: the rounds and heads from the coordinator's journal (read-only),
    /// and each node's last sovereign model, measured with `measure`.
    pub fn build(finished: Finished<'_>, measure: &mut dyn Measure) -> anyhow::Result<Report> {
        let storage = finished.storage;
        let journal = SqliteJournal::read(storage)?;
        let genesis = journal.head_after(0)?.with_context(|| format!("{}: no genesis", storage.display()))?;
        let (_, head) = journal.load()?.with_context(|| format!("{}: no consortium", storage.display()))?;
        let rounds: Vec<RoundRecord> = journal.rounds()?.into_iter().map(|(record, _)| record).collect();
        let store = FsBlobStore::open_existing(storage.join("blobs"))?;
        let parameters = store.open(&genesis.model.base_hash)?.state()?.num_values();
        let run = finished.run;
        Ok(Report {
            seed: run.seed(),
            model: run.model(),
            parameters,
            policy: run.policy,
            aggregator: run.aggregator,
            outer_optimizer: run.outer,
            local_steps: run.node.steps,
            nodes: finished.nodes,
            initial_base_hash: genesis.model.base_hash,
            initial_heldout_loss: genesis.base_loss,
            rounds,
            final_base_hash: head.model.base_hash,
            final_heldout_loss: head.base_loss,
            sovereign_heldout_loss: sovereign_losses(measure, &finished.artifacts)?,
            seconds: finished.seconds,
            network: finished.network,
        })
    }
}

/// Each node's last sovereign model, scored on the held-out sets.
fn sovereign_losses(
    measure: &mut dyn Measure,
    artifacts: &[(NodeId, PathBuf)],
) -> anyhow::Result<BTreeMap<NodeId, LossTable>> {
    let mut losses = BTreeMap::new();
    for (node, dir) in artifacts {
        let all = SovereignArtifact::all_in(dir).with_context(|| format!("reading {}", dir.display()))?;
        if let Some(artifact) = all.last() {
            let weights = artifact.load_weights().with_context(|| format!("{node}'s last artifact"))?;
            losses.insert(node.clone(), measure.heldout_loss(&weights)?);
        }
    }
    Ok(losses)
}
