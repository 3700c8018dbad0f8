//! What a run is, independent of how it is run: `weft demo` (one process) and `weft coordinator
//! serve` (over the network) build their coordinator and nodes from the same [`RunSettings`],
//! so that the same settings and seed give the same bases either way.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use weft_coordinator::{
    BlobStore, CanaryRegistry, Coordinator, Governance, HeldoutSet, Member, SqliteJournal, Visibility,
};
use weft_core::{Aggregator, NodeId, OuterOptimizer, Policy, Weighting};
use weft_model::{AdamWSettings, Gpt, GptConfig};
use weft_net::config::ConsortiumConfig;
use weft_node::NodeSettings;

use crate::data;

#[derive(Clone, Debug)]
pub struct RunSettings {
    pub model: GptConfig,
    pub seed: u64,
    /// node id → language, in roster order.
    pub members: Vec<(String, String)>,
    pub policy: Policy,
    pub aggregator: Aggregator,
    pub outer: OuterOptimizer,
    pub probe_scale: Option<f32>,
    pub node: NodeSettings,
}

/// The canary registry for `languages` (default manifest: the data directory's
/// `canaries/canaries.json`), checked to have an active public set for each.
pub fn canary_registry(
    data_dir: &Path,
    manifest: Option<&Path>,
    languages: &[String],
) -> anyhow::Result<CanaryRegistry> {
    let manifest = manifest.map(Path::to_owned).unwrap_or_else(|| data_dir.join("canaries").join("canaries.json"));
    let mut registry = CanaryRegistry::load(&manifest)?;
    registry.retain_topics(languages);
    for language in languages {
        registry.active(language, Visibility::Public)?;
    }
    Ok(registry)
}

pub fn weighting(name: &str) -> anyhow::Result<Weighting> {
    match name {
        "quality" => Ok(Weighting::Quality),
        "equal" => Ok(Weighting::Equal),
        "declared" => Ok(Weighting::Declared),
        other => bail!("unknown weighting '{other}' (quality, equal, declared)"),
    }
}

pub fn outer(name: &str, lr: Option<f32>, momentum: f32) -> anyhow::Result<OuterOptimizer> {
    let outer = match name {
        "plain" => OuterOptimizer::Plain { lr: lr.unwrap_or(1.0) },
        "nesterov" => OuterOptimizer::Nesterov { lr: lr.unwrap_or(0.7), momentum },
        other => bail!("unknown outer optimizer '{other}' (plain, nesterov)"),
    };
    outer.validate()?;
    Ok(outer)
}

impl RunSettings {
    /// The settings of a networked consortium, from its config and roster.
    pub fn from_config(config: &ConsortiumConfig, members: Vec<(String, String)>) -> anyhow::Result<Self> {
        config.model.validate().context("[model]")?;
        let p = &config.policy;
        let policy = Policy::new(p.floor, p.cap, p.quorum, weighting(&p.weighting)?).context("[policy]")?;
        let lr_ok = config.training.lr.is_finite() && config.training.lr > 0.0;
        if config.training.batch == 0 || config.training.local_steps == 0 || !lr_ok {
            bail!("[training]: batch, local_steps and lr must be positive");
        }
        Ok(RunSettings {
            model: config.model,
            seed: config.seed,
            members,
            policy,
            aggregator: p.aggregator.parse().context("[policy] aggregator")?,
            outer: outer(&p.outer, p.outer_lr, p.momentum).context("[policy] outer")?,
            probe_scale: p.probe_scale,
            node: NodeSettings {
                steps: config.training.local_steps,
                batch_rows: config.training.batch,
                adamw: AdamWSettings { lr: config.training.lr, ..AdamWSettings::default() },
                seed: config.seed,
            },
        })
    }

    /// The coordinator of this run, durable in `storage`: the same function for the demo and
    /// for `weft coordinator serve`.
    pub fn coordinator(
        &self,
        data_dir: &Path,
        storage: &Path,
        governance: Option<Governance>,
        extra: serde_json::Value,
    ) -> anyhow::Result<Coordinator<HeldoutSet>> {
        let mut heldout = BTreeMap::new();
        let mut members = Vec::new();
        for (id, language) in &self.members {
            heldout.insert(language.clone(), data::heldout(data_dir, language)?);
            members.push(Member { node: NodeId::new(id.clone())?, language: language.clone() });
        }
        let base = Gpt::init(self.model, self.seed)?.to_state();
        let measure = HeldoutSet::new(self.model, heldout, 32)?;
        let store = BlobStore::open(storage.join("blobs"))?;
        let mut coordinator = Coordinator::new(base, members, self.policy, self.outer, measure, store)?
            .with_aggregator(self.aggregator)?;
        if let Some(governance) = governance {
            coordinator = coordinator.with_governance(governance);
        }
        if let Some(scale) = self.probe_scale {
            coordinator = coordinator.with_probe_scale(scale)?;
        }
        let settings = serde_json::json!({
            "model": self.model,
            "seed": self.seed,
            "node": self.node,
            "extra": extra,
        });
        let journal = SqliteJournal::open(storage)?;
        Ok(coordinator.durable(Box::new(journal), settings)?)
    }
}
