//! Flags shared by the commands that describe a run — `weft demo` and `weft consortium init` —
//! one group per section of `consortium.toml`, with that section's defaults, so that a flag
//! means the same, and defaults the same, wherever it is given.

use std::path::PathBuf;

use anyhow::Context;
use clap::ValueEnum;
use weft_coordinator::GovernanceSettings;
use weft_core::{Aggregator, BreakerRules, Fairness, GauntletRules, VotingRules, Weighting};
use weft_model::GptConfig;
use weft_net::config::{
    DpConfig, GovernanceConfig, OuterKind, PolicySettings, PrivacyConfig, SecureAggregationConfig, Training,
};

use crate::run::RunSections;

/// Rounds of a run unless --rounds says otherwise.
pub const DEFAULT_ROUNDS: u64 = 3;

/// Everything that describes a run: what `consortium.toml` holds besides the network.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Number of rounds [default: 3; with --base: 2].
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Seed of the whole run: the same seed and inputs give bitwise-identical bases.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub training: TrainingArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[command(flatten)]
    pub governance: GovernanceArgs,
    #[command(flatten)]
    pub privacy: PrivacyArgs,
    #[command(flatten)]
    pub gauntlet: GauntletArgs,
    #[command(flatten)]
    pub voting: VotingArgs,
    #[command(flatten)]
    pub breaker: BreakerArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

impl RunArgs {
    /// The run's sections as the flags give them (checked by `RunSettings::new`).
    pub fn sections(&self) -> anyhow::Result<RunSections> {
        Ok(RunSections {
            seed: self.seed,
            rounds: self.rounds.unwrap_or(DEFAULT_ROUNDS),
            model: self.model.config(),
            training: self.training.settings(),
            policy: self.policy.settings(),
            governance: self.governance.config()?,
            privacy: self.privacy.config(),
            gauntlet: self.gauntlet.rules(),
            voting: self.voting.rules(),
            breaker: self.breaker.rules(),
        })
    }
}

/// The transformer's shape (`[model]`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct ModelArgs {
    /// Transformer blocks.
    #[arg(long, default_value_t = GptConfig::default().layers)]
    pub layers: usize,
    /// Attention heads per block.
    #[arg(long, default_value_t = GptConfig::default().heads)]
    pub heads: usize,
    /// Model width.
    #[arg(long, default_value_t = GptConfig::default().width)]
    pub width: usize,
    /// Context length in bytes.
    #[arg(long, default_value_t = GptConfig::default().context)]
    pub context: usize,
}

impl ModelArgs {
    pub fn config(&self) -> GptConfig {
        GptConfig { layers: self.layers, heads: self.heads, width: self.width, context: self.context }
    }
}

/// How every node trains each round (`[training]`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct TrainingArgs {
    /// Local AdamW steps per node per round (K).
    #[arg(long, default_value_t = Training::default().local_steps)]
    pub local_steps: u64,
    /// Sequences per local batch.
    #[arg(long, default_value_t = Training::default().batch)]
    pub batch: usize,
    /// Local AdamW learning rate.
    #[arg(long, default_value_t = Training::default().lr, allow_negative_numbers = true)]
    pub lr: f32,
}

impl TrainingArgs {
    pub fn settings(&self) -> Training {
        Training { local_steps: self.local_steps, batch: self.batch, lr: self.lr }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WeightingArg {
    /// Proportional to the quality the coordinator measured.
    Quality,
    /// Equal for every accepted node.
    Equal,
    /// Tapestry's rule: proportional to the quality each node declares (unsafe; a baseline).
    Declared,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OuterArg {
    /// base += lr · Σ wᵢΔᵢ (lr 1 is Tapestry's rule).
    Plain,
    /// Nesterov momentum on the aggregated step (DiLoCo: lr 0.7, momentum 0.9).
    Nesterov,
}

/// The consortium's rules (`[policy]`).
#[derive(clap::Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Quality floor: minimum measured quality (nats/byte of mean held-out loss removed).
    #[arg(long, default_value_t = PolicySettings::default().floor, allow_negative_numbers = true)]
    pub floor: f64,
    /// Largest weight any one node may receive, in (0, 1]. Never exceeded.
    #[arg(long, default_value_t = PolicySettings::default().cap, allow_negative_numbers = true)]
    pub cap: f64,
    /// Share of the roster that must be accepted for the base to move, in [0, 1].
    #[arg(long, default_value_t = PolicySettings::default().quorum, allow_negative_numbers = true)]
    pub quorum: f64,
    /// How accepted contributions are weighted.
    #[arg(long, value_enum, default_value_t = WeightingArg::Quality)]
    pub weighting: WeightingArg,
    /// How languages are treated: every-language[:TOLERANCE] (no round raises any language's
    /// held-out loss by more than TOLERANCE, relative; default 0.005), mean (languages averaged),
    /// q-fedavg:Q (mean, weights × loss^Q of the node's language).
    #[arg(long, default_value_t = PolicySettings::default().fairness)]
    pub fairness: Fairness,
    /// Each delta's quality is measured on base + s·Δ (default 1/N, its share under equal weighting).
    #[arg(long, allow_negative_numbers = true)]
    pub probe_scale: Option<f32>,
    /// How accepted deltas are combined: mean, norm-bound:TAU, norm-bound:adaptive:K, median,
    /// trimmed-mean:BETA, multi-krum:F:M, centered-clipping:TAU:ITERATIONS.
    #[arg(long, default_value_t = PolicySettings::default().aggregator)]
    pub aggregator: Aggregator,
    /// Outer optimizer applied to the aggregated step.
    #[arg(long, value_enum, default_value_t = OuterArg::Plain)]
    pub outer: OuterArg,
    /// Outer learning rate (default: 1.0 for plain, 0.7 for nesterov).
    #[arg(long, allow_negative_numbers = true)]
    pub outer_lr: Option<f32>,
    /// Nesterov momentum.
    #[arg(long, default_value_t = PolicySettings::default().momentum, allow_negative_numbers = true)]
    pub momentum: f32,
}

impl PolicyArgs {
    pub fn settings(&self) -> PolicySettings {
        PolicySettings {
            floor: self.floor,
            cap: self.cap,
            quorum: self.quorum,
            weighting: match self.weighting {
                WeightingArg::Quality => Weighting::Quality,
                WeightingArg::Equal => Weighting::Equal,
                WeightingArg::Declared => Weighting::Declared,
            },
            fairness: self.fairness,
            aggregator: self.aggregator,
            outer: match self.outer {
                OuterArg::Plain => OuterKind::Plain,
                OuterArg::Nesterov => OuterKind::Nesterov,
            },
            outer_lr: self.outer_lr,
            momentum: self.momentum,
            probe_scale: self.probe_scale,
        }
    }
}

/// A privacy tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrivacyTier {
    /// Record-level DP-SGD on every node; the coordinator charges each node's ε and refuses a
    /// contribution past its budget.
    Dp,
}

/// Differential privacy (`[privacy.dp]`).
#[derive(clap::Args, Debug, Clone)]
pub struct PrivacyArgs {
    /// Privacy tier (dp: record-level DP-SGD on every node with a per-node ε budget).
    #[arg(long, value_enum)]
    pub privacy: Option<PrivacyTier>,
    /// Each node's ε budget over the run (with --privacy dp) [default: 8].
    #[arg(long, requires = "privacy", allow_negative_numbers = true)]
    pub epsilon: Option<f64>,
    /// The δ every ε is stated at [default: 1e-5].
    #[arg(long, requires = "privacy", allow_negative_numbers = true)]
    pub delta: Option<f64>,
    /// Per-record gradient clipping norm [default: 1].
    #[arg(long, requires = "privacy", allow_negative_numbers = true)]
    pub dp_clip_norm: Option<f64>,
    /// Probability that each record (context + 1 bytes) is in a step's batch [default: 0.005].
    #[arg(long, requires = "privacy", allow_negative_numbers = true)]
    pub dp_sample_rate: Option<f64>,
    /// Noise σ over the clip norm [default: the smallest that keeps the run within --epsilon].
    #[arg(long, requires = "privacy", allow_negative_numbers = true)]
    pub dp_noise_multiplier: Option<f64>,
    /// Secure aggregation in communities of K nodes (K ≥ 3), redrawn each round: the
    /// coordinator measures, weights and aggregates community means and never sees one node's
    /// update.
    #[arg(long, value_name = "K")]
    pub secure_aggregation: Option<usize>,
}

/// ε budget of `--privacy dp` unless --epsilon says otherwise.
pub const DEFAULT_EPSILON: f64 = 8.0;

impl PrivacyArgs {
    pub fn config(&self) -> Option<PrivacyConfig> {
        let secure_aggregation = self.secure_aggregation.map(|community_size| SecureAggregationConfig {
            community_size,
            range: SecureAggregationConfig::DEFAULT_RANGE,
            stage_secs: SecureAggregationConfig::DEFAULT_STAGE_SECS,
        });
        let Some(PrivacyTier::Dp) = self.privacy else {
            return secure_aggregation.map(|s| PrivacyConfig { dp: None, secure_aggregation: Some(s) });
        };
        Some(PrivacyConfig {
            secure_aggregation,
            dp: Some(DpConfig {
                epsilon: self.epsilon.unwrap_or(DEFAULT_EPSILON),
                delta: self.delta.unwrap_or(DpConfig::DEFAULT_DELTA),
                clip_norm: self.dp_clip_norm.unwrap_or(DpConfig::DEFAULT_CLIP_NORM),
                sample_rate: self.dp_sample_rate.unwrap_or(DpConfig::DEFAULT_SAMPLE_RATE),
                noise_multiplier: self.dp_noise_multiplier,
            }),
        })
    }
}

/// Champion–challenger adoption (`[gauntlet]`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct GauntletArgs {
    /// Gauntlet: a round's aggregate (the challenger) replaces the base (the champion) only if a
    /// paired bootstrap test on per-item held-out losses finds it significantly better in some
    /// language (Holm-corrected) and no language worse than --gauntlet-non-inferiority.
    #[arg(long)]
    pub gauntlet: bool,
    /// Family-wise error rate of the improvement test, and the level of the non-inferiority bounds.
    #[arg(long, requires = "gauntlet", default_value_t = GauntletRules::default().alpha)]
    pub gauntlet_alpha: f64,
    /// Relative gain a language must show significantly (0: any gain).
    #[arg(long, requires = "gauntlet", default_value_t = GauntletRules::default().margin, allow_negative_numbers = true)]
    pub gauntlet_margin: f64,
    /// Largest relative regression of any language the lower confidence bound may show.
    #[arg(long, requires = "gauntlet", default_value_t = GauntletRules::default().non_inferiority, allow_negative_numbers = true)]
    pub gauntlet_non_inferiority: f64,
    /// Bootstrap resamples per language.
    #[arg(long, requires = "gauntlet", default_value_t = GauntletRules::default().resamples)]
    pub gauntlet_resamples: u32,
}

impl GauntletArgs {
    pub fn rules(&self) -> Option<GauntletRules> {
        self.gauntlet.then_some(GauntletRules {
            alpha: self.gauntlet_alpha,
            margin: self.gauntlet_margin,
            non_inferiority: self.gauntlet_non_inferiority,
            resamples: self.gauntlet_resamples,
        })
    }
}

/// The circuit breaker (`[breaker]`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct BreakerArgs {
    /// Circuit breaker: watch each published base for --breaker-rounds rounds against the base
    /// before it; a language whose held-out loss rises beyond --breaker-threshold rolls it back.
    #[arg(long)]
    pub breaker: bool,
    #[arg(long, requires = "breaker", default_value_t = BreakerRules::default().watch_rounds)]
    pub breaker_rounds: u64,
    /// Relative rise of any language's held-out loss that trips the breaker.
    #[arg(long, requires = "breaker", default_value_t = BreakerRules::default().threshold, allow_negative_numbers = true)]
    pub breaker_threshold: f64,
}

impl BreakerArgs {
    pub fn rules(&self) -> Option<BreakerRules> {
        self.breaker.then_some(BreakerRules { watch_rounds: self.breaker_rounds, threshold: self.breaker_threshold })
    }
}

/// Class-3 changes by vote (`[voting]`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct VotingArgs {
    /// Voting: members change the cap, floor or quorum by signed proposals and votes (`weft
    /// proposal`), a supermajority of a quorum, applied after a time-lock.
    #[arg(long)]
    pub voting: bool,
    /// Share of the votes cast that must approve, in (0.5, 1].
    #[arg(long, requires = "voting", default_value_t = VotingRules::default().supermajority)]
    pub supermajority: f64,
    /// Share of the members who must vote, in (0, 1].
    #[arg(long, requires = "voting", default_value_t = VotingRules::default().quorum)]
    pub voting_quorum: f64,
    /// Rounds a proposal stays open for votes.
    #[arg(long, requires = "voting", default_value_t = VotingRules::default().voting_rounds)]
    pub voting_rounds: u64,
    /// Rounds between a passed count and the change.
    #[arg(long, requires = "voting", default_value_t = VotingRules::default().timelock_rounds)]
    pub timelock_rounds: u64,
}

impl VotingArgs {
    pub fn rules(&self) -> Option<VotingRules> {
        self.voting.then_some(VotingRules {
            supermajority: self.supermajority,
            quorum: self.voting_quorum,
            voting_rounds: self.voting_rounds,
            timelock_rounds: self.timelock_rounds,
        })
    }
}

/// Canary governance and reputation (`[governance]`).
#[derive(clap::Args, Debug, Clone)]
pub struct GovernanceArgs {
    /// Governance: score contributions on canaries (public + secret reserve, data/canaries),
    /// catch canary overfitting, and weight nodes by reputation earned over rounds.
    #[arg(long)]
    pub governance: bool,
    /// Canary registry manifest (default: data/canaries/canaries.json).
    #[arg(long, requires = "governance")]
    pub canaries: Option<PathBuf>,
    /// Every governance parameter as JSON (see README); flags below override it.
    #[arg(long, requires = "governance")]
    pub governance_config: Option<PathBuf>,
    /// Share of the weight reserved for newcomers (governance; default 0.1).
    #[arg(long, requires = "governance")]
    pub exploration: Option<f64>,
    /// Largest tolerated public-minus-secret canary gain, nats/byte (governance; default 0.05).
    #[arg(long, requires = "governance")]
    pub goodhart_margin: Option<f64>,
    /// Half-life of reputation evidence, in rounds (governance; default 10).
    #[arg(long, requires = "governance")]
    pub half_life: Option<f64>,
    /// Largest reputation vote weight of any node in a topic (governance; default 0.2).
    #[arg(long, requires = "governance")]
    pub w_max: Option<f64>,
}

impl GovernanceArgs {
    /// The `[governance]` section: `--governance-config` (every parameter, JSON) with the single
    /// flags on top; `None` without `--governance`. A relative canary path is made absolute, so
    /// that the section means the same from any working directory.
    pub fn config(&self) -> anyhow::Result<Option<GovernanceConfig>> {
        if !self.governance {
            return Ok(None);
        }
        let mut settings = match &self.governance_config {
            Some(path) => {
                let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_slice::<GovernanceSettings>(&bytes)
                    .with_context(|| format!("{}: not valid governance settings", path.display()))?
            }
            None => GovernanceSettings::default(),
        };
        settings.exploration = self.exploration.unwrap_or(settings.exploration);
        settings.goodhart_margin = self.goodhart_margin.unwrap_or(settings.goodhart_margin);
        settings.reputation.half_life = self.half_life.unwrap_or(settings.reputation.half_life);
        settings.reputation.w_max = self.w_max.unwrap_or(settings.reputation.w_max);
        let canaries = match &self.canaries {
            Some(path) => Some(std::path::absolute(path).with_context(|| format!("--canaries {}", path.display()))?),
            None => None,
        };
        Ok(Some(GovernanceConfig { canaries, settings }))
    }
}
