//! What a run is, independent of how it is given or run: `weft demo`'s flags and
//! `consortium.toml` are the same [`RunSections`], checked in one place ([`RunSettings::new`]),
//! and `weft demo` (one process) and `weft coordinator serve` (over the network) build their
//! coordinator and nodes from the same [`RunSettings`], so that the same settings and seed give
//! the same bases either way.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use weft_coordinator::PrivacyRules;
use weft_coordinator::{
    CanaryRegistry, ConfigDifference, Coordinator, DurableCoordinator, FsBlobStore, Governance, HeldoutSet, Member,
    SqliteJournal, Visibility,
};
use weft_core::gauntlet::GauntletError;
use weft_core::proposal::VotingError;
use weft_core::{Aggregator, BreakerRules, GauntletRules, NodeId, OuterOptimizer, Policy, VotingRules};
use weft_ledger::PublicKey;
use weft_model::{AdamWSettings, ByteGpt, Gpt, GptConfig, ModelFamily};
use weft_net::config::{
    ConsortiumConfig, GovernanceConfig, PolicySettings, PrivacyConfig, SecureAggregationConfig, SettingError, Training,
};
use weft_node::NodeSettings;

use crate::data;

/// Rows of held-out text scored per batch.
const EVAL_ROWS: usize = 32;

/// The sections that describe a run, as `consortium.toml` holds them and `weft demo`'s flags
/// give them.
#[derive(Clone, Debug)]
pub struct RunSections {
    pub seed: u64,
    pub rounds: u64,
    pub model: GptConfig,
    pub training: Training,
    pub policy: PolicySettings,
    pub governance: Option<GovernanceConfig>,
    pub privacy: Option<PrivacyConfig>,
    pub gauntlet: Option<GauntletRules>,
    pub voting: Option<VotingRules>,
    pub breaker: Option<BreakerRules>,
}

impl RunSections {
    /// The sections of a consortium on the byte GPT (`[model]`); a `[base]` consortium's
    /// coordinator is built by `realbase`.
    pub fn of(config: &ConsortiumConfig) -> Result<Self, SettingError> {
        let model = config.model.ok_or_else(|| SettingError {
            key: "model",
            detail: "this consortium trains a pretrained [base], not the byte GPT".into(),
        })?;
        Ok(RunSections {
            seed: config.seed,
            rounds: config.rounds,
            model,
            training: config.training,
            policy: config.policy.clone(),
            governance: config.governance.clone(),
            privacy: config.privacy,
            gauntlet: config.gauntlet,
            voting: config.voting,
            breaker: config.breaker,
        })
    }
}

/// A checked run.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub sections: RunSections,
    /// node id → language, in roster order.
    pub members: Vec<(NodeId, String)>,
    pub policy: Policy,
    pub aggregator: Aggregator,
    pub outer: OuterOptimizer,
    pub node: NodeSettings,
    /// Differential privacy as the coordinator enforces it.
    pub privacy: Option<PrivacyRules>,
    /// Secure aggregation in communities.
    pub secure_aggregation: Option<SecureAggregationConfig>,
}

impl RunSettings {
    /// Checks every section; an error names the setting (`policy.cap`, `training.lr`, …).
    pub fn new(sections: RunSections, members: Vec<(NodeId, String)>) -> Result<Self, SettingError> {
        let invalid = |key: &'static str, detail: String| SettingError { key, detail };
        if sections.rounds == 0 {
            return Err(invalid("rounds", "must be at least 1".into()));
        }
        sections.model.validate().map_err(|e| invalid("model", e.to_string()))?;
        sections.training.validate()?;
        sections.policy.validate()?;
        if let Some(rules) = &sections.gauntlet {
            rules.validate().map_err(|e| match e {
                GauntletError::Rule { key, detail } => invalid(key, detail),
                other => invalid("gauntlet", other.to_string()),
            })?;
        }
        if let Some(rules) = &sections.breaker {
            rules.validate().map_err(|e| match e {
                GauntletError::Rule { key, detail } => invalid(key, detail),
                other => invalid("breaker", other.to_string()),
            })?;
        }
        if let Some(rules) = &sections.voting {
            rules.validate().map_err(|e| match e {
                VotingError::Rule { key, detail } => invalid(key, detail),
                other => invalid("voting", other.to_string()),
            })?;
        }
        if members.is_empty() {
            return Err(invalid("roster", "lists no node".into()));
        }
        let aggregator = sections.policy.aggregator;
        let secure_aggregation = sections.privacy.and_then(|p| p.secure_aggregation);
        // What the coordinator aggregates: nodes, or under secure aggregation communities.
        let inputs = match secure_aggregation {
            Some(s) => {
                s.validate(members.len())?;
                if sections.privacy.is_some_and(|p| p.dp.is_some()) {
                    return Err(invalid(
                        "privacy",
                        "DP-SGD and secure aggregation together are not built yet: the coordinator charges ε per node, and under secure aggregation it sees no node".into(),
                    ));
                }
                members.len() / s.community_size
            }
            None => members.len(),
        };
        if inputs < aggregator.min_inputs() {
            let detail = match secure_aggregation {
                Some(_) => format!(
                    "{aggregator} needs at least {} inputs, secure aggregation gives it {inputs} communities",
                    aggregator.min_inputs()
                ),
                None => {
                    format!("{aggregator} needs at least {} nodes, the roster has {inputs}", aggregator.min_inputs())
                }
            };
            return Err(invalid("policy.aggregator", detail));
        }
        let training = sections.training;
        let dp = match sections.privacy.and_then(|p| p.dp) {
            Some(dp) => Some(dp.rule(sections.rounds, training.local_steps)?),
            None => None,
        };
        Ok(RunSettings {
            policy: sections.policy.policy()?,
            outer: sections.policy.outer_optimizer()?,
            aggregator,
            node: NodeSettings {
                steps: training.local_steps,
                batch_rows: training.batch,
                adamw: AdamWSettings { lr: training.lr, ..AdamWSettings::default() },
                seed: sections.seed,
                privacy: dp,
            },
            privacy: dp.map(|rule| PrivacyRules { rule, steps_per_round: training.local_steps }),
            secure_aggregation,
            members,
            sections,
        })
    }

    /// The settings of a networked consortium, from its config and roster.
    pub fn from_config(config: &ConsortiumConfig, members: Vec<(NodeId, String)>) -> Result<Self, SettingError> {
        config.validate()?;
        Self::new(RunSections::of(config)?, members)
    }

    pub fn model(&self) -> GptConfig {
        self.sections.model
    }

    /// The run's model family, as measurement and governance see it.
    pub fn family(&self) -> anyhow::Result<Arc<dyn ModelFamily>> {
        Ok(Arc::new(ByteGpt::new(self.model(), EVAL_ROWS)?))
    }

    pub fn seed(&self) -> u64 {
        self.sections.seed
    }

    pub fn languages(&self) -> Vec<String> {
        self.members.iter().map(|(_, l)| l.clone()).collect()
    }

    /// The held-out sets of the run's languages, scored with the run's model.
    pub fn heldout(&self, data_dir: &Path) -> anyhow::Result<HeldoutSet> {
        let mut texts = BTreeMap::new();
        for (_, language) in &self.members {
            texts.insert(language.clone(), data::heldout(data_dir, language)?);
        }
        Ok(HeldoutSet::new(self.family()?, texts)?)
    }

    /// Governance with its canary registry, when the run has a `[governance]` section.
    fn governance(&self, data_dir: &Path) -> anyhow::Result<Option<Governance>> {
        let Some(g) = &self.sections.governance else { return Ok(None) };
        let registry = canary_registry(data_dir, g.canaries.as_deref(), &self.languages())?;
        Ok(Some(Governance::new(g.settings, registry, self.family()?)?))
    }

    /// The coordinator of this run, durable in `storage`: the same function for the demo and
    /// for `weft coordinator serve`. `extra` is what else the caller's configuration pins
    /// (it must be the same to continue a run).
    /// `voters` are the members' ed25519 keys, who may propose and vote under `[voting]`.
    pub fn coordinator(
        &self,
        data_dir: &Path,
        storage: &Path,
        extra: serde_json::Value,
        voters: &BTreeMap<String, PublicKey>,
    ) -> anyhow::Result<DurableCoordinator<HeldoutSet>> {
        let members: Vec<Member> = match self.secure_aggregation {
            // The roster the coordinator weighs is the communities; which nodes are in which is
            // drawn each round.
            Some(s) => (1..=self.members.len() / s.community_size)
                .map(|i| {
                    Ok(Member { node: NodeId::new(weft_coordinator::community_id(i))?, language: "community".into() })
                })
                .collect::<anyhow::Result<_>>()?,
            None => self
                .members
                .iter()
                .map(|(node, language)| Member { node: node.clone(), language: language.clone() })
                .collect(),
        };
        let base = Gpt::init(self.model(), self.seed())?.to_state();
        let store = Arc::new(FsBlobStore::open(storage.join("blobs"))?);
        let mut coordinator = Coordinator::new(base, members, self.policy, self.outer, self.heldout(data_dir)?, store)?
            .with_aggregator(self.aggregator)?;
        if let Some(s) = self.secure_aggregation {
            let nodes = self.members.iter().map(|(node, _)| node.clone()).collect();
            coordinator = coordinator.with_secure_aggregation(nodes, s.community_size)?;
        }
        if let Some(governance) = self.governance(data_dir)? {
            coordinator = coordinator.with_governance(governance);
        }
        if let Some(scale) = self.sections.policy.probe_scale {
            coordinator = coordinator.with_probe_scale(scale)?;
        }
        if let Some(rules) = self.privacy {
            coordinator = coordinator.with_privacy(rules)?;
        }
        if let Some(rules) = self.sections.gauntlet {
            coordinator = coordinator.with_gauntlet(rules)?;
        }
        if let Some(rules) = self.sections.voting {
            coordinator = coordinator.with_voting(rules, voters)?;
        }
        if let Some(rules) = self.sections.breaker {
            coordinator = coordinator.with_breaker(rules)?;
        }
        let settings = serde_json::json!({
            "model": self.model(),
            "seed": self.seed(),
            "node": self.node,
            "extra": extra,
        });
        let journal = SqliteJournal::open(storage)?;
        coordinator.durable(Box::new(journal), settings).map_err(|e| match e {
            weft_coordinator::CoordinatorError::ConfigMismatch { dir, differences } => mismatch(&dir, &differences),
            other => other.into(),
        })
    }
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

/// Where a setting is given: as `weft demo`'s flag, and as `consortium.toml`'s key.
pub enum Source {
    Flags,
    ConsortiumToml,
}

/// The flag (or `consortium.toml` key) that sets `key`, a setting's dotted path as
/// [`SettingError`] and the coordinator's stored configuration name it.
pub fn setting_name(key: &str, source: Source) -> String {
    const FLAGS: &[(&str, &str)] = &[
        ("rounds", "--rounds"),
        ("model", "--layers/--heads/--width/--context"),
        ("settings.model.layers", "--layers"),
        ("settings.model.heads", "--heads"),
        ("settings.model.width", "--width"),
        ("settings.model.context", "--context"),
        ("settings.seed", "--seed"),
        ("settings.node.seed", "--seed"),
        ("training.local_steps", "--local-steps"),
        ("settings.node.steps", "--local-steps"),
        ("training.batch", "--batch"),
        ("settings.node.batch_rows", "--batch"),
        ("training.lr", "--lr"),
        ("settings.node.adamw", "--lr"),
        ("policy.floor", "--floor"),
        ("policy.cap", "--cap"),
        ("policy.quorum", "--quorum"),
        ("policy.weighting", "--weighting"),
        ("policy.fairness", "--fairness"),
        ("policy.aggregator", "--aggregator"),
        ("aggregator", "--aggregator"),
        ("policy.outer_lr", "--outer-lr"),
        ("outer.lr", "--outer-lr"),
        ("policy.momentum", "--momentum"),
        ("outer.momentum", "--momentum"),
        ("outer", "--outer"),
        ("policy.probe_scale", "--probe-scale"),
        ("probe_scale", "--probe-scale"),
        ("governance", "--governance (and its settings)"),
        ("privacy.dp.epsilon", "--epsilon"),
        ("privacy.dp.delta", "--delta"),
        ("privacy.dp.clip_norm", "--dp-clip-norm"),
        ("privacy.dp.sample_rate", "--dp-sample-rate"),
        ("privacy.dp.noise_multiplier", "--dp-noise-multiplier"),
        ("privacy.secure_aggregation", "--secure-aggregation"),
        ("privacy", "--privacy (and its settings)"),
        ("gauntlet.alpha", "--gauntlet-alpha"),
        ("gauntlet.margin", "--gauntlet-margin"),
        ("gauntlet.non_inferiority", "--gauntlet-non-inferiority"),
        ("gauntlet.resamples", "--gauntlet-resamples"),
        ("gauntlet", "--gauntlet (and its settings)"),
        ("voting.supermajority", "--supermajority"),
        ("voting.quorum", "--voting-quorum"),
        ("voting.voting_rounds", "--voting-rounds"),
        ("voting.timelock_rounds", "--timelock-rounds"),
        ("voting", "--voting (and its settings)"),
        ("breaker.watch_rounds", "--breaker-rounds"),
        ("breaker.threshold", "--breaker-threshold"),
        ("breaker", "--breaker (and its settings)"),
        ("settings.node.privacy", "--privacy (and its settings)"),
        ("roster", "--nodes/--languages"),
        ("settings.extra.attack", "--attack/--attackers/--attack-scale"),
        ("initial_base_hash", "--seed and the model flags"),
    ];
    match source {
        Source::Flags => FLAGS
            .iter()
            .find(|(prefix, _)| key == *prefix || key.starts_with(&format!("{prefix}.")))
            .map_or_else(|| key.to_owned(), |(_, flag)| (*flag).to_owned()),
        // The last dot separates the key from its table: `base.adapter.rank` is `[base.adapter] rank`.
        Source::ConsortiumToml => match key.rsplit_once('.') {
            Some((section, field)) => format!("[{section}] {field}"),
            None => key.to_owned(),
        },
    }
}

/// A setting out of range, named as the user wrote it.
pub fn setting_error(error: SettingError, source: Source) -> anyhow::Error {
    let name = setting_name(error.key, source);
    anyhow::anyhow!("{name}: {}", error.detail)
}

/// A stored run whose configuration differs from this command's: every difference by the flag
/// that sets it, with both values. (The genesis base follows from the seed and the model: it is
/// named only when nothing else explains it.)
fn mismatch(dir: &Path, differences: &[ConfigDifference]) -> anyhow::Error {
    let explained =
        differences.iter().any(|d| d.key.starts_with("settings.model") || d.key.starts_with("settings.seed"));
    let mut named: Vec<String> = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    for d in differences {
        let flag = setting_name(&d.key, Source::Flags);
        if (d.key == "initial_base_hash" && explained) || named.contains(&flag) {
            continue;
        }
        lines.push(format!("  {flag}: the run was started with {}, this command gives {}", d.stored, d.now));
        named.push(flag);
    }
    anyhow::anyhow!(
        "{} holds a run started with other settings; use the settings it was started with, or a new directory:\n{}",
        dir.display(),
        lines.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_named_as_the_user_wrote_them() {
        assert_eq!(setting_name("policy.cap", Source::Flags), "--cap");
        assert_eq!(setting_name("settings.node.adamw.lr", Source::Flags), "--lr");
        assert_eq!(setting_name("outer.kind", Source::Flags), "--outer");
        assert_eq!(setting_name("policy.cap", Source::ConsortiumToml), "[policy] cap");
        assert_eq!(setting_name("round_deadline_secs", Source::ConsortiumToml), "round_deadline_secs");
        assert_eq!(setting_name("base.adapter.rank", Source::ConsortiumToml), "[base.adapter] rank");
    }
}
