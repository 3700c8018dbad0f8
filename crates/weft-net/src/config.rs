//! The consortium's files: `consortium.toml` (what the consortium does), `roster.toml` (who is
//! in it, with their public keys) and each node's `node.toml` (how it reaches the coordinator).
//!
//! The sections that describe a run ([`Training`], [`PolicySettings`], [`GovernanceConfig`],
//! the model) are the same types `weft demo` builds from its flags, with their defaults here
//! once; [`ConsortiumConfig::validate`] checks what only a networked consortium has.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize, Serializer};
use weft_core::{Aggregator, Fairness, NodeId, OuterOptimizer, Weighting};
use weft_ledger::PublicKey;
use weft_model::GptConfig;

use crate::encoding::Encoding;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("{path}: {source}")]
    Setting { path: PathBuf, source: SettingError },
}

/// One setting out of its range: which (`policy.cap`, `training.lr`, …) and why. The binary
/// names it as the flag or the `consortium.toml` key the user wrote.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{key}: {detail}")]
pub struct SettingError {
    pub key: &'static str,
    pub detail: String,
}

fn setting(key: &'static str, detail: impl Into<String>) -> SettingError {
    SettingError { key, detail: detail.into() }
}

/// Longest a round may stay open: a year. Longer is a typo, and would overflow the clock.
pub const MAX_ROUND_DEADLINE_SECS: u64 = 365 * 24 * 3600;

/// `consortium.toml`. Every field is documented in the README; unknown keys are refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsortiumConfig {
    pub name: String,
    /// Where the coordinator listens and nodes dial, `host:port`.
    pub address: String,
    /// The name in the coordinator's TLS certificate that nodes check.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    pub rounds: u64,
    pub seed: u64,
    /// A round closes when every roster node has contributed or this many seconds after it
    /// opened, whichever comes first; a node that is late joins the next round. 1 s to a year.
    pub round_deadline_secs: u64,
    /// How deltas travel: f32 (lossless), f16, bf16, int8.
    pub encoding: Encoding,
    /// The coordinator's storage directory, relative to this file.
    #[serde(default = "default_storage")]
    pub storage: PathBuf,
    /// The built-in byte GPT, trained from scratch. Absent when the consortium adopts a
    /// pretrained `[base]`: exactly one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<GptConfig>,
    /// A pretrained open-weights base whose contributions are adapters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PretrainedBase>,
    pub training: Training,
    pub policy: PolicySettings,
    /// Canary scoring with a secret reserve and reputation-driven weights (as `weft demo
    /// --governance`); absent: the policy alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub governance: Option<GovernanceConfig>,
    /// Differential privacy (`[privacy.dp]`); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyConfig>,
    /// Champion–challenger adoption (`[gauntlet]`): a round's aggregate becomes the base only if
    /// it is significantly better on the held-out items; absent: every round's aggregate is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gauntlet: Option<weft_core::GauntletRules>,
    /// Class-3 changes by vote (`[voting]`): members propose and vote changes of the cap, floor
    /// and quorum; absent: the rules are those the consortium was created with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voting: Option<weft_core::VotingRules>,
    /// The circuit breaker (`[breaker]`): published bases watched against the base before them,
    /// rolled back on a regression beyond the threshold; absent: no watch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<weft_core::BreakerRules>,
}

/// `[privacy]`: what the consortium protects and how.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Record-level DP-SGD on every node, with a per-node budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<DpConfig>,
    /// Secure aggregation inside communities: the coordinator sees only community means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecureAggregationConfig>,
}

/// `[privacy] secure_aggregation = { community_size = k }`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationConfig {
    /// Members per community (at least 3); the last community takes the remainder.
    pub community_size: usize,
    /// Every value of an update is clipped to [-range, range] before fixed-point encoding.
    #[serde(default = "SecureAggregationConfig::default_range")]
    pub range: f32,
    /// Over the network: seconds each key stage (keys, shares, reveals) waits for members before
    /// it closes on those heard (masked updates wait until the round's deadline).
    #[serde(default = "SecureAggregationConfig::default_stage_secs")]
    pub stage_secs: u64,
}

impl SecureAggregationConfig {
    pub const DEFAULT_RANGE: f32 = 1.0;

    pub const DEFAULT_STAGE_SECS: u64 = 30;

    fn default_range() -> f32 {
        Self::DEFAULT_RANGE
    }

    fn default_stage_secs() -> u64 {
        Self::DEFAULT_STAGE_SECS
    }

    /// Checks the section against a roster of `nodes`.
    pub fn validate(&self, nodes: usize) -> Result<(), SettingError> {
        if self.community_size < 3 {
            return Err(setting(
                "privacy.secure_aggregation.community_size",
                format!("must be at least 3 (a sum of two reveals each to the other), got {}", self.community_size),
            ));
        }
        if nodes < self.community_size {
            return Err(setting(
                "privacy.secure_aggregation.community_size",
                format!("{} is more than the roster's {nodes} nodes", self.community_size),
            ));
        }
        if !(self.range.is_finite() && self.range > 0.0) {
            return Err(setting(
                "privacy.secure_aggregation.range",
                format!("must be a positive number, got {}", self.range),
            ));
        }
        if !(1..=3600).contains(&self.stage_secs) {
            return Err(setting(
                "privacy.secure_aggregation.stage_secs",
                format!("must be between 1 and 3600 seconds, got {}", self.stage_secs),
            ));
        }
        Ok(())
    }

    /// Members whose masked updates must arrive (and who must reveal) for a community's sum:
    /// a majority.
    pub fn threshold(members: usize) -> usize {
        members / 2 + 1
    }
}

/// `[privacy.dp]`: every node trains with DP-SGD; the coordinator charges each node the composed
/// ε of its rounds and refuses one that would exceed `epsilon`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// Each node's privacy budget over the consortium's life.
    pub epsilon: f64,
    /// The δ every ε is stated at.
    #[serde(default = "DpConfig::default_delta")]
    pub delta: f64,
    /// Per-record gradient clipping norm C.
    #[serde(default = "DpConfig::default_clip_norm")]
    pub clip_norm: f64,
    /// Probability that each record (a window of context + 1 bytes) is in a step's batch.
    #[serde(default = "DpConfig::default_sample_rate")]
    pub sample_rate: f64,
    /// Noise σ over C. Absent: the smallest σ with which `rounds` rounds of `local_steps` steps
    /// spend at most `epsilon`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
}

impl DpConfig {
    pub const DEFAULT_DELTA: f64 = 1e-5;
    pub const DEFAULT_CLIP_NORM: f64 = 1.0;
    pub const DEFAULT_SAMPLE_RATE: f64 = 0.005;

    fn default_delta() -> f64 {
        Self::DEFAULT_DELTA
    }
    fn default_clip_norm() -> f64 {
        Self::DEFAULT_CLIP_NORM
    }
    fn default_sample_rate() -> f64 {
        Self::DEFAULT_SAMPLE_RATE
    }

    /// The rule for a run of `rounds` rounds of `steps` local steps: the noise multiplier as
    /// given, or calibrated to the budget. Errors name the key.
    pub fn rule(&self, rounds: u64, steps: u64) -> Result<weft_privacy::DpRule, SettingError> {
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(setting("privacy.dp.epsilon", format!("must be a positive number, got {}", self.epsilon)));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(setting("privacy.dp.delta", format!("must be in (0, 1), got {}", self.delta)));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(setting("privacy.dp.clip_norm", format!("must be a positive number, got {}", self.clip_norm)));
        }
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err(setting("privacy.dp.sample_rate", format!("must be in (0, 1], got {}", self.sample_rate)));
        }
        let noise_multiplier = match self.noise_multiplier {
            Some(sigma) if sigma.is_finite() && sigma > 0.0 => sigma,
            Some(sigma) => {
                return Err(setting("privacy.dp.noise_multiplier", format!("must be a positive number, got {sigma}")))
            }
            None => {
                weft_privacy::calibrate_noise(self.epsilon, self.delta, self.sample_rate, rounds.saturating_mul(steps))
                    .map_err(|e| setting("privacy.dp.epsilon", e.to_string()))?
            }
        };
        let rule = weft_privacy::DpRule {
            mechanism: weft_privacy::DpSgd {
                clip_norm: self.clip_norm,
                noise_multiplier,
                sample_rate: self.sample_rate,
            },
            delta: self.delta,
            epsilon_budget: self.epsilon,
        };
        rule.validate().map_err(|e| setting("privacy.dp", e.to_string()))?;
        Ok(rule)
    }
}

impl ConsortiumConfig {
    /// What only a networked consortium has: a name, an address, a round deadline in range. The
    /// run's own sections are checked where every run's are (the binary's `RunSettings`).
    pub fn validate(&self) -> Result<(), SettingError> {
        if self.name.trim().is_empty() {
            return Err(setting("name", "must not be empty"));
        }
        if !self.address.contains(':') {
            return Err(setting("address", format!("{:?} is not host:port", self.address)));
        }
        if !(1..=MAX_ROUND_DEADLINE_SECS).contains(&self.round_deadline_secs) {
            return Err(setting(
                "round_deadline_secs",
                format!("must be between 1 and {MAX_ROUND_DEADLINE_SECS} (a year), got {}", self.round_deadline_secs),
            ));
        }
        if self.rounds == 0 {
            return Err(setting("rounds", "must be at least 1"));
        }
        if self.encoding != Encoding::F32 && self.privacy.is_some_and(|p| p.secure_aggregation.is_some()) {
            return Err(setting(
                "encoding",
                format!(
                    "{} cannot apply under secure aggregation: updates travel masked, as 32-bit words modulo 2^32 (use f32)",
                    format!("{:?}", self.encoding).to_lowercase()
                ),
            ));
        }
        match (&self.model, &self.base) {
            (Some(_), Some(_)) => Err(setting("base", "give either [model] (the byte GPT) or [base], not both")),
            (None, None) => Err(setting("model", "give [model] (the byte GPT) or [base] (a pretrained base)")),
            (None, Some(base)) => base.validate(),
            (Some(_), None) => Ok(()),
        }
    }

    /// Tokens per training window: the byte GPT's context, or the base's `context`.
    pub fn context(&self) -> usize {
        match (&self.model, &self.base) {
            (Some(model), _) => model.context,
            (None, Some(base)) => base.context,
            (None, None) => 0,
        }
    }
}

/// `[base]`: a pretrained model in `weft model import`'s layout (`model.safetensors`,
/// `config.json`, `tokenizer.json`), improved with adapters: each round nodes train a LoRA
/// adapter whose frozen factors the ledger's round record fixes, and send only its update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainedBase {
    /// A name for reports and logs (`smollm2-135m`).
    pub name: String,
    /// The imported model's directory; relative paths are from `consortium.toml`.
    pub dir: PathBuf,
    /// weft's content hash of the imported state (its `weft-import.json`): the coordinator
    /// refuses to start from anything else.
    pub state_hash: weft_core::ContentHash,
    /// Tokens per training window.
    pub context: usize,
    /// Bytes of each language's held-out text: the first lines of the last tenth of its corpus,
    /// which no node trains on.
    pub heldout_bytes: usize,
    pub adapter: AdapterSettings,
}

/// `[base.adapter]`: the LoRA every round's contributions take.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSettings {
    pub rank: usize,
    pub alpha: f32,
    /// Projections adapted: `q`, `k`, `v`, `o`, `gate`, `up`, `down`, or `all`.
    pub targets: Vec<String>,
    /// `shared` (frozen `A` from the round's seed, nodes send `B`) or `full` (nodes send both
    /// factors; aggregated in weight space).
    #[serde(default)]
    pub track: weft_core::AdapterTrack,
}

impl PretrainedBase {
    pub fn validate(&self) -> Result<(), SettingError> {
        if self.name.trim().is_empty() {
            return Err(setting("base.name", "must not be empty"));
        }
        if self.context < 2 {
            return Err(setting("base.context", format!("must be at least 2 tokens, got {}", self.context)));
        }
        if self.heldout_bytes == 0 {
            return Err(setting("base.heldout_bytes", "must be at least 1"));
        }
        let adapter = &self.adapter;
        if adapter.rank == 0 {
            return Err(setting("base.adapter.rank", "must be at least 1"));
        }
        if !(adapter.alpha.is_finite() && adapter.alpha > 0.0) {
            return Err(setting("base.adapter.alpha", format!("must be a positive number, got {}", adapter.alpha)));
        }
        if adapter.targets.is_empty() {
            return Err(setting("base.adapter.targets", "must name at least one projection"));
        }
        Ok(())
    }

    /// The base's directory, with a relative `dir` read from the consortium directory.
    pub fn dir_in(&self, consortium: &Path) -> PathBuf {
        consortium.join(&self.dir)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GovernanceConfig {
    /// Canary registry manifest (default: the data directory's `canaries/canaries.json`).
    pub canaries: Option<PathBuf>,
    /// Every governance parameter (defaults as documented).
    #[serde(default)]
    pub settings: weft_coordinator::GovernanceSettings,
}

/// How each node trains every round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    /// Local AdamW steps per round (K).
    pub local_steps: u64,
    /// Sequences per local batch.
    pub batch: usize,
    /// Local AdamW learning rate.
    pub lr: f32,
}

impl Default for Training {
    fn default() -> Self {
        Training { local_steps: 60, batch: 16, lr: 3e-3 }
    }
}

impl Training {
    pub fn validate(&self) -> Result<(), SettingError> {
        if self.local_steps == 0 {
            return Err(setting("training.local_steps", "must be at least 1"));
        }
        if self.batch == 0 {
            return Err(setting("training.batch", "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(setting("training.lr", format!("must be a positive number, got {}", self.lr)));
        }
        Ok(())
    }
}

/// The outer optimizer by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OuterKind {
    /// base += lr · step (lr 1 is Tapestry's rule).
    Plain,
    /// Nesterov momentum on the aggregated step (DiLoCo).
    Nesterov,
}

/// The consortium's rules: who is accepted, with which weight, and how the base moves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    pub floor: f64,
    pub cap: f64,
    pub quorum: f64,
    pub weighting: Weighting,
    /// How languages are treated: `every-language[:TOLERANCE]` (default; 0.005), `mean`,
    /// `q-fedavg:Q`.
    #[serde(default, serialize_with = "as_text", deserialize_with = "from_text")]
    pub fairness: Fairness,
    /// As `weft demo --aggregator` (`norm-bound:adaptive:1`, `median`, …).
    #[serde(serialize_with = "as_text", deserialize_with = "from_text")]
    pub aggregator: Aggregator,
    pub outer: OuterKind,
    /// Default: 1.0 for plain, 0.7 for nesterov.
    pub outer_lr: Option<f32>,
    #[serde(default = "default_momentum")]
    pub momentum: f32,
    /// Quality is measured on `base + probe_scale·Δ`; default 1/N.
    pub probe_scale: Option<f32>,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            floor: 0.0,
            cap: 0.5,
            quorum: 0.5,
            weighting: Weighting::Quality,
            fairness: Fairness::DEFAULT,
            aggregator: Aggregator::NormBound { bound: weft_core::NormBound::Adaptive(1.0) },
            outer: OuterKind::Plain,
            outer_lr: None,
            momentum: default_momentum(),
            probe_scale: None,
        }
    }
}

impl PolicySettings {
    /// The policy, checked.
    pub fn policy(&self) -> Result<weft_core::Policy, SettingError> {
        use weft_core::PolicyError;
        weft_core::Policy::new(self.floor, self.cap, self.quorum, self.weighting)
            .and_then(|p| p.with_fairness(self.fairness))
            .map_err(|e| {
                let key = match e {
                    PolicyError::Cap(_) => "policy.cap",
                    PolicyError::Floor(_) => "policy.floor",
                    PolicyError::Quorum(_) => "policy.quorum",
                    PolicyError::Fairness(_) => "policy.fairness",
                };
                setting(key, e.to_string())
            })
    }

    /// The outer optimizer with its defaults filled in, checked.
    pub fn outer_optimizer(&self) -> Result<OuterOptimizer, SettingError> {
        use weft_core::aggregate::OuterError;
        let outer = match self.outer {
            OuterKind::Plain => OuterOptimizer::Plain { lr: self.outer_lr.unwrap_or(1.0) },
            OuterKind::Nesterov => {
                OuterOptimizer::Nesterov { lr: self.outer_lr.unwrap_or(0.7), momentum: self.momentum }
            }
        };
        outer.validate().map_err(|e| match e {
            OuterError::LearningRate(_) => setting("policy.outer_lr", e.to_string()),
            OuterError::Momentum(_) => setting("policy.momentum", e.to_string()),
        })?;
        Ok(outer)
    }

    pub fn validate(&self) -> Result<(), SettingError> {
        self.policy()?;
        self.outer_optimizer()?;
        self.aggregator.validate().map_err(|e| setting("policy.aggregator", e.to_string()))?;
        if let Some(scale) = self.probe_scale {
            if !(scale > 0.0 && scale <= 1.0) {
                return Err(setting("policy.probe_scale", format!("must be in (0, 1], got {scale}")));
            }
        }
        Ok(())
    }
}

fn default_server_name() -> String {
    "weft-coordinator".into()
}

fn default_storage() -> PathBuf {
    "coordinator".into()
}

fn default_momentum() -> f32 {
    0.9
}

fn as_text<T: fmt::Display, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn from_text<'de, T, D>(deserializer: D) -> Result<T, D::Error>
where
    T: FromStr,
    T::Err: fmt::Display,
    D: Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// BLAKE3 of a TLS certificate (DER): how the coordinator knows who dialled. 64 lowercase hex
/// digits in `roster.toml`; anything else is refused when the roster is read.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The fingerprint of a certificate's DER bytes.
    pub fn of(der: &[u8]) -> Self {
        Fingerprint(blake3::hash(der).to_hex().to_string())
    }
}

impl TryFrom<String> for Fingerprint {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        if text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Fingerprint(text))
        } else {
            Err(format!(
                "certificate fingerprint {text:?} is not 64 lowercase hex digits (BLAKE3 of the DER certificate)"
            ))
        }
    }
}

impl From<Fingerprint> for String {
    fn from(f: Fingerprint) -> String {
        f.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `roster.toml`: one `[[node]]` per member.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roster {
    #[serde(default)]
    pub node: Vec<Member>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: NodeId,
    pub language: String,
    /// BLAKE3 of the node's TLS certificate (DER), hex: how the coordinator knows who dialled.
    pub certificate: Fingerprint,
    /// The node's ed25519 key: it signs every contribution manifest.
    pub signing_key: PublicKey,
}

impl Roster {
    pub fn by_certificate(&self, fingerprint: &Fingerprint) -> Option<&Member> {
        self.node.iter().find(|m| &m.certificate == fingerprint)
    }

    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |detail: String| ConfigError::Invalid { path: path.to_owned(), detail };
        if self.node.is_empty() {
            return Err(invalid("the roster lists no node".into()));
        }
        for (i, m) in self.node.iter().enumerate() {
            if m.language.trim().is_empty() {
                return Err(invalid(format!("node {} has no language", m.id)));
            }
            if self.node[..i].iter().any(|o| o.id == m.id) {
                return Err(invalid(format!("node {} is listed twice", m.id)));
            }
            if self.node[..i].iter().any(|o| o.certificate == m.certificate) {
                return Err(invalid(format!("node {} has the certificate of another node", m.id)));
            }
        }
        Ok(())
    }

    /// Reads and checks `roster.toml`.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let roster: Roster = read_toml(path)?;
        roster.check(path)?;
        Ok(roster)
    }
}

/// `node.toml` in a node's startup kit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeKit {
    pub id: NodeId,
    pub language: String,
    pub consortium: String,
    /// The coordinator's `host:port`.
    pub address: String,
    pub server_name: String,
    /// For a consortium on a pretrained base: the directory (relative to the kit) holding the
    /// base's `config.json` and `tokenizer.json`; its weights come from the coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
    /// The node's own trainer, run per round under the job contract (`weft node join
    /// --trainer` overrides it). The operator adds it; provisioning never writes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer: Option<KitTrainer>,
}

/// `[trainer]` in `node.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KitTrainer {
    /// Run with `sh -c` in the directory `weft node join` runs in, `WEFT_JOB` naming the
    /// round's job.json.
    pub command: String,
    /// Seconds the trainer has per round before it is stopped.
    #[serde(default)]
    pub deadline_secs: Option<u64>,
    /// The largest L2 norm of the change (of the weights, or of the adapter's factors) accepted
    /// from the trainer.
    #[serde(default)]
    pub max_change: Option<f64>,
}

/// The files of a node's startup kit.
pub struct KitFiles;

impl KitFiles {
    pub const CONFIG: &'static str = "node.toml";
    pub const CA: &'static str = "ca.pem";
    pub const CERTIFICATE: &'static str = "tls.pem";
    pub const TLS_KEY: &'static str = "tls.key";
    pub const SIGNING_KEY: &'static str = "signing.key";
    /// Where `weft node join` keeps the node's sovereign artifacts unless told otherwise.
    pub const ARTIFACTS: &'static str = "artifacts";
}

pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_owned(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Invalid { path: path.to_owned(), detail: e.to_string() })
}

pub fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<(), ConfigError> {
    let text = toml::to_string_pretty(value)
        .map_err(|e| ConfigError::Invalid { path: path.to_owned(), detail: e.to_string() })?;
    std::fs::write(path, text).map_err(|source| ConfigError::Io { path: path.to_owned(), source })
}

pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ConsortiumConfig {
        ConsortiumConfig {
            name: "test".into(),
            address: "127.0.0.1:7443".into(),
            server_name: default_server_name(),
            rounds: 3,
            seed: 0,
            round_deadline_secs: 600,
            encoding: Encoding::F32,
            storage: default_storage(),
            model: Some(GptConfig { layers: 1, heads: 2, width: 16, context: 16 }),
            base: None,
            training: Training::default(),
            policy: PolicySettings::default(),
            governance: None,
            privacy: None,
            gauntlet: None,
            voting: None,
            breaker: None,
        }
    }

    #[test]
    fn a_config_reads_back_as_written() {
        let text = toml::to_string_pretty(&config()).unwrap();
        assert!(text.contains("aggregator = \"norm-bound:adaptive:1\""), "{text}");
        assert_eq!(toml::from_str::<ConsortiumConfig>(&text).unwrap(), config());
    }

    #[test]
    fn settings_out_of_range_are_named() {
        let key = |c: ConsortiumConfig| c.validate().unwrap_err().key;
        assert_eq!(key(ConsortiumConfig { round_deadline_secs: 0, ..config() }), "round_deadline_secs");
        assert_eq!(key(ConsortiumConfig { round_deadline_secs: u64::MAX, ..config() }), "round_deadline_secs");
        assert_eq!(key(ConsortiumConfig { rounds: 0, ..config() }), "rounds");
        assert!(config().validate().is_ok());
        let policy = |p: PolicySettings| p.validate().unwrap_err().key;
        assert_eq!(policy(PolicySettings { cap: 1.5, ..Default::default() }), "policy.cap");
        assert_eq!(policy(PolicySettings { quorum: -0.1, ..Default::default() }), "policy.quorum");
        assert_eq!(policy(PolicySettings { probe_scale: Some(0.0), ..Default::default() }), "policy.probe_scale");
        assert_eq!(
            policy(PolicySettings { outer: OuterKind::Nesterov, momentum: 1.0, ..Default::default() }),
            "policy.momentum"
        );
        assert_eq!(Training { lr: f32::NAN, ..Default::default() }.validate().unwrap_err().key, "training.lr");
        let text = toml::to_string_pretty(&config()).unwrap().replace("norm-bound:adaptive:1", "krum");
        assert!(toml::from_str::<ConsortiumConfig>(&text).unwrap_err().to_string().contains("unknown aggregator"));
    }

    #[test]
    fn roster_fingerprints_must_be_blake3_hex() {
        assert!(Fingerprint::try_from("xyz".to_owned()).is_err());
        assert!(Fingerprint::try_from("A".repeat(64)).is_err(), "uppercase is not what weft writes");
        assert!(Fingerprint::try_from("a".repeat(64)).is_ok());
        let key = weft_ledger::SigningKey::generate().unwrap().public();
        let text =
            format!("[[node]]\nid = \"n1\"\nlanguage = \"en\"\ncertificate = \"xyz\"\nsigning_key = \"{key}\"\n");
        let err = toml::from_str::<Roster>(&text).unwrap_err().to_string();
        assert!(err.contains("not 64 lowercase hex digits"), "{err}");
        let text = text.replace("\"xyz\"", &format!("\"{}\"", "ab".repeat(32))).replace("\"n1\"", "\"../n1\"");
        assert!(toml::from_str::<Roster>(&text).unwrap_err().to_string().contains("invalid node id"));
    }
}
