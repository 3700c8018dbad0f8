//! `weft demo --base smollm2-135m` (or `--base DIR`, any directory `weft model import` wrote):
//! a consortium that improves a real pretrained open-weights base with low-rank adapters.
//!
//! Each round the coordinator fixes the round's adapter (frozen A factors from a seed it records
//! in the ledger); every node trains only B on its own corpus and sends it; the coordinator
//! measures `base + s·BᵢA` on held-out text no node trains on, runs the consortium's policy on
//! B, and merges `s·(Σ wᵢBᵢ)·A` into the base. Each node keeps the adapters it sent and, at the
//! end, trains a private adapter on the published base that it keeps and never sends (its sovereign
//! artifact). The node-alone baseline trains the same number of steps on the node's own data
//! from the initial base with no consortium.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use weft_coordinator::{
    Coordinator, DurableCoordinator, FsBlobStore, Governance, HeldoutSet, Journal, Member, PrivacyRules, SqliteJournal,
    SubmitError,
};
use weft_core::quality::LossTable;
use weft_core::{
    AdapterPlan, AdapterTrack, Aggregator, ContentHash, Contribution, Delta, ModelState, NodeId, OuterOptimizer, Policy,
};
use weft_durable::write_atomic;
use weft_llama::{
    train_steps, Adapters, Llama, LlamaAdapters, LlamaConfig, LlamaFamily, LlamaTokenizer, LoraNodeTrainer, LoraSpec,
    LoraTraining, Projection, RoundAdapter, Windows,
};
use weft_model::{AdapterTraining, PrivateTraining, SplitMix64};

use weft_net::client::LocalTrainer;
use weft_net::config::ConsortiumConfig;

use crate::demo::DemoArgs;
use crate::run::{canary_registry, setting_error, Source};
use crate::{data, say, table};

/// The named base the project fetches and imports itself.
pub const SMOLLM2: &str = "smollm2-135m";
/// Languages of a real-base demo unless --languages says otherwise: the base is English-centric,
/// so the consortium is not.
pub const LANGUAGES: [&str; 8] = ["de", "fr", "es", "ja", "it", "pt", "zh-cn", "id"];
/// Tokens per scoring window.
const SCORE_CONTEXT: usize = 512;
/// Share of each corpus's lines (the tail) that is held out: never in any node's training text.
const HELDOUT_SHARE: usize = 10;

/// The adapter settings of a real-base run.
#[derive(clap::Args, Debug, Clone)]
pub struct AdapterArgs {
    /// Adapter rank r.
    #[arg(id = "adapter_rank", long = "adapter-rank", default_value_t = 8)]
    pub rank: usize,
    /// LoRA α (the weight change is α/r · B·A).
    #[arg(id = "adapter_alpha", long = "adapter-alpha", default_value_t = 16.0, allow_negative_numbers = true)]
    pub alpha: f32,
    /// Adapted projections of every layer, comma-separated: q, k, v, o, gate, up, down.
    #[arg(
        id = "adapter_targets",
        long = "adapter-targets",
        default_value = "q,k,v,o,gate,up,down",
        value_delimiter = ','
    )]
    pub targets: Vec<String>,
    /// Local steps per node per round.
    #[arg(id = "adapter_steps", long = "adapter-steps", default_value_t = 3)]
    pub steps: u64,
    /// Windows per step.
    #[arg(id = "adapter_batch", long = "adapter-batch", default_value_t = 2)]
    pub batch: usize,
    /// Tokens per training window.
    #[arg(id = "adapter_context", long = "adapter-context", default_value_t = 128)]
    pub context: usize,
    /// Local AdamW learning rate of the adapters.
    #[arg(id = "adapter_lr", long = "adapter-lr", default_value_t = 5e-3, allow_negative_numbers = true)]
    pub lr: f32,
    /// Bytes of held-out text per language the coordinator scores every candidate on.
    #[arg(long, default_value_t = 1200)]
    pub heldout_bytes: usize,
    /// Which factors nodes train and send: `shared` (A frozen from the round's seed, B sent) or
    /// `full` (both, aggregated as products in weight space; mean and norm-bound only).
    #[arg(id = "adapter_track", long = "adapter-track", value_enum, default_value_t = Track::Shared)]
    pub track: Track,
}

impl AdapterArgs {
    /// The run's adapter plan and the nodes' training, checked (rank and alpha against the
    /// model, by [`fits_model`]).
    pub fn checked(&self, seed: u64) -> anyhow::Result<(AdapterPlan, AdapterTraining)> {
        for target in &self.targets {
            target.parse::<Projection>().context("--adapter-targets")?;
        }
        if self.steps == 0 || self.batch == 0 || self.context < 2 {
            bail!("--adapter-steps and --adapter-batch must be at least 1, --adapter-context at least 2");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--adapter-lr must be a positive number, got {}", self.lr);
        }
        if self.heldout_bytes == 0 {
            bail!("--heldout-bytes must be at least 1");
        }
        let plan = AdapterPlan {
            seed,
            rank: self.rank,
            alpha: self.alpha,
            targets: self.targets.clone(),
            track: self.track.into(),
        };
        let training = AdapterTraining { steps: self.steps, batch: self.batch, context: self.context, lr: self.lr };
        Ok((plan, training))
    }
}

/// The adapter of `plan` as `config` can carry it, and windows that fit its positions.
pub(crate) fn fits_model(
    plan: &AdapterPlan,
    training: &AdapterTraining,
    config: &LlamaConfig,
) -> anyhow::Result<LoraSpec> {
    let targets = plan
        .targets
        .iter()
        .map(|t| t.parse::<Projection>())
        .collect::<Result<Vec<_>, _>>()
        .context("adapter targets")?;
    let spec = LoraSpec { rank: plan.rank, alpha: plan.alpha, targets };
    spec.validate(config).context("adapter settings")?;
    if training.context > config.max_position_embeddings {
        bail!(
            "a training window of {} tokens exceeds the model's {} positions",
            training.context,
            config.max_position_embeddings
        );
    }
    Ok(spec)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Track {
    Shared,
    Full,
}

impl From<Track> for AdapterTrack {
    fn from(track: Track) -> Self {
        match track {
            Track::Shared => AdapterTrack::Shared,
            Track::Full => AdapterTrack::Full,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// Each node trains the same number of steps on its own data from the initial base.
    Alone,
    /// No baseline.
    None,
}

/// The JSON report of a real-base run.
#[derive(Serialize)]
struct RealBaseReport {
    base: BaseInfo,
    adapter: AdapterInfo,
    seed: u64,
    rounds: Vec<weft_coordinator::RoundRecord>,
    /// Per language, bits per byte of held-out text.
    languages: Vec<LanguageRow>,
    /// Held-out bits/byte beside the nodes' own training text under the initial base: held-out
    /// text the base had memorized would score far lower than text it has not seen.
    memorization_check: Vec<MemorizationRow>,
    nodes: Vec<NodeRow>,
    initial_base_hash: ContentHash,
    final_base_hash: ContentHash,
    seconds: f64,
    peak_rss_mb: Option<f64>,
}

#[derive(Serialize)]
struct BaseInfo {
    name: String,
    dir: PathBuf,
    config: LlamaConfig,
    parameters: usize,
}

#[derive(Serialize)]
struct AdapterInfo {
    track: AdapterTrack,
    rank: usize,
    alpha: f32,
    targets: Vec<String>,
    steps_per_round: u64,
    windows: Windows,
    lr: f32,
    /// Values in one update (the B factors).
    update_values: usize,
}

#[derive(Serialize)]
struct LanguageRow {
    language: String,
    node: NodeId,
    initial: f64,
    consortium: f64,
    /// The consortium base with the node's private adapter, trained on it for one round's steps
    /// and kept on the node, never aggregated.
    consortium_plus_sovereign: f64,
    alone: Option<f64>,
}

#[derive(Serialize)]
struct MemorizationRow {
    language: String,
    heldout: f64,
    own_training_text: f64,
}

#[derive(Serialize)]
struct NodeRow {
    node: NodeId,
    language: String,
    train_tokens: usize,
    bytes_sent: u64,
    /// The adapter the node sent in each round (kept under `round-NNNN/`), by round.
    artifacts: Vec<(u64, ContentHash)>,
    /// The private adapter it trained on the final base (kept under `sovereign/`).
    sovereign: Option<ContentHash>,
}

/// One node of a real-base run: its own tokenized text and the adapters it keeps.
struct RealNode {
    id: NodeId,
    language: String,
    /// Its tokenized text and local settings.
    trainer: LoraNodeTrainer,
    dir: PathBuf,
    /// The hash of the private adapter the node trained on the final base and keeps.
    sovereign: Option<ContentHash>,
    artifacts: Vec<(u64, ContentHash)>,
    bytes_sent: u64,
}

/// What the coordinator of a consortium on a pretrained base is built from: the same for
/// `weft demo --base` and `weft coordinator serve`, so that the same settings give the same
/// bases either way.
pub(crate) struct BaseCoordinator<'a> {
    pub name: &'a str,
    pub config: &'a LlamaConfig,
    pub family: Arc<LlamaFamily>,
    pub base: ModelState,
    pub members: &'a [(NodeId, String)],
    /// Language → held-out text.
    pub heldout: BTreeMap<String, Vec<u8>>,
    pub policy: Policy,
    pub outer: OuterOptimizer,
    pub aggregator: Aggregator,
    pub probe_scale: Option<f32>,
    pub plan: AdapterPlan,
    pub training: AdapterTraining,
    pub heldout_bytes: usize,
    /// The consortium's name, for a networked run.
    pub networked: Option<&'a str>,
    /// Canary governance: contributions scored on the public canaries through the same family,
    /// the whole update audited on the secret reserve.
    pub governance: Option<Governance>,
    /// Record-level DP-SGD on every node's adapter, with a budget per node.
    pub privacy: Option<PrivacyRules>,
    /// Champion–challenger adoption.
    pub gauntlet: Option<weft_core::GauntletRules>,
    pub breaker: Option<weft_core::BreakerRules>,
}

impl BaseCoordinator<'_> {
    /// The coordinator, durable in `storage` (continued if it holds this run).
    pub fn open(self, storage: &Path) -> anyhow::Result<DurableCoordinator<HeldoutSet>> {
        std::fs::create_dir_all(storage).with_context(|| format!("creating {}", storage.display()))?;
        let initial_hash = self.base.content_hash();
        let members =
            self.members.iter().map(|(node, language)| Member { node: node.clone(), language: language.clone() });
        let measure = HeldoutSet::new(self.family.clone(), self.heldout)?;
        let store = Arc::new(FsBlobStore::open(storage.join("blobs"))?);
        let adapters = Arc::new(LlamaAdapters { config: self.config.clone() });
        let mut coordinator = Coordinator::new(self.base, members.collect(), self.policy, self.outer, measure, store)?
            .with_aggregator(self.aggregator)?
            .with_adapters(self.plan.clone(), adapters)?;
        if let Some(scale) = self.probe_scale {
            coordinator = coordinator.with_probe_scale(scale)?;
        }
        // Pinned with the run only when present, so that runs without governance keep their
        // settings as they were.
        let governance_settings = self.governance.as_ref().map(|g| serde_json::to_value(g.settings())).transpose()?;
        if let Some(governance) = self.governance {
            coordinator = coordinator.with_governance(governance);
        }
        if let Some(rules) = self.privacy {
            coordinator = coordinator.with_privacy(rules)?;
        }
        if let Some(rules) = self.gauntlet {
            coordinator = coordinator.with_gauntlet(rules)?;
        }
        if let Some(rules) = self.breaker {
            coordinator = coordinator.with_breaker(rules)?;
        }
        // `ledger verify` rebuilds each round's factors from `base.config` and `adapters`.
        let mut settings = serde_json::json!({
            "base": { "family": "llama", "name": self.name, "config": self.config, "state_hash": initial_hash },
            "adapters": self.plan,
            "training": self.training,
            "heldout_bytes": self.heldout_bytes,
            "seed": self.plan.seed,
        });
        if let (Some(name), Some(map)) = (self.networked, settings.as_object_mut()) {
            map.insert("networked".into(), name.into());
        }
        if let (Some(governance), Some(map)) = (governance_settings, settings.as_object_mut()) {
            map.insert("governance".into(), governance);
        }
        // Pinned with the run (the calibrated σ too): continuing it under another rule is refused.
        if let (Some(rules), Some(map)) = (self.privacy, settings.as_object_mut()) {
            map.insert("privacy".into(), serde_json::to_value(rules)?);
        }
        let journal = SqliteJournal::open(storage)?;
        Ok(coordinator.durable(Box::new(journal), settings)?)
    }
}

/// The base directory `--base` names: `smollm2-135m` is fetched and imported on first use.
pub(crate) fn resolve_base(base: &str, data_dir: &Path) -> anyhow::Result<(String, PathBuf)> {
    if base != SMOLLM2 {
        let dir = PathBuf::from(base);
        if !dir.join("config.json").is_file() {
            bail!(
                "--base {base}: not '{SMOLLM2}' and not a directory written by `weft model import` (no config.json in it)"
            );
        }
        return Ok((base.to_owned(), dir));
    }
    let models = data_dir.join("models");
    let dir = models.join(SMOLLM2);
    if dir.join("weft-import.json").is_file() {
        return Ok((SMOLLM2.to_owned(), dir));
    }
    let gguf = models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-model");
        eprintln!("weft: no {} yet: fetching it with {} (one time, 93 MB)", gguf.display(), script.display());
        let status = std::process::Command::new("bash")
            .arg(&script)
            .env("WEFT_MODELS_DIR", &models)
            .stdout(std::process::Stdio::null())
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!("{} failed ({status}); see its message above", script.display());
        }
    }
    eprintln!("weft: importing {} into {}", gguf.display(), dir.display());
    // A half-written import (interrupted) is redone from scratch.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing the incomplete import {}", dir.display()))?;
    }
    crate::model::import_dir(&gguf, &dir)?;
    Ok((SMOLLM2.to_owned(), dir))
}

/// The part of a corpus a node trains on: every line before the held-out tail (whatever
/// share of that tail the coordinator scores).
pub(crate) fn training_head(bytes: &[u8]) -> anyhow::Result<String> {
    let text = std::str::from_utf8(bytes).context("the corpus is not UTF-8")?;
    let lines: Vec<&str> = text.lines().collect();
    let train = lines[..head_lines(lines.len())].join("\n");
    if train.len() < 2 {
        bail!("the corpus is too short to hold text out ({} lines)", lines.len());
    }
    Ok(train)
}

/// How many of a corpus's `lines` are training text: all but the last tenth.
fn head_lines(lines: usize) -> usize {
    lines - lines / HELDOUT_SHARE
}

/// Splits a corpus into the node's training text (the head) and held-out text (the first
/// `heldout_bytes` of the tail's lines), at line boundaries.
fn split_corpus(bytes: &[u8], heldout_bytes: usize) -> anyhow::Result<(String, String)> {
    let text = std::str::from_utf8(bytes).context("the corpus is not UTF-8")?;
    let lines: Vec<&str> = text.lines().collect();
    let cut = head_lines(lines.len());
    let train = lines[..cut].join("\n");
    let mut heldout = String::new();
    for line in &lines[cut..] {
        if heldout.len() >= heldout_bytes {
            break;
        }
        heldout.push_str(line);
        heldout.push('\n');
    }
    if heldout.len() < 2 || train.len() < 2 {
        bail!("the corpus is too short to hold text out ({} lines)", lines.len());
    }
    Ok((train, heldout))
}

/// The last `bytes` of `text`, starting at a line.
fn tail_lines(text: &str, bytes: usize) -> String {
    let start = text.len().saturating_sub(bytes);
    // Byte positions: `start` may fall inside a multi-byte character; the byte after a newline
    // never does.
    let start = match text.as_bytes()[start..].iter().position(|&b| b == b'\n') {
        Some(i) => start + i + 1,
        None => (start..=text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len()),
    };
    text.get(start..).unwrap_or_default().to_owned()
}

/// The coordinator of a networked consortium on a pretrained base (`[base]` in
/// `consortium.toml`): the base must be the one the consortium was made with.
pub(crate) fn serve_coordinator(
    consortium: &ConsortiumConfig,
    consortium_dir: &Path,
    members: &[(NodeId, String)],
    data_dir: &Path,
    storage: &Path,
) -> anyhow::Result<(DurableCoordinator<HeldoutSet>, Option<weft_privacy::DpRule>)> {
    let base = consortium.base.as_ref().context("consortium.toml has no [base]")?;
    if consortium.privacy.is_some_and(|p| p.secure_aggregation.is_some()) {
        bail!("[privacy] secure_aggregation runs on the built-in byte model only for now: on a pretrained base it is not built yet");
    }
    if consortium.voting.is_some() {
        bail!("[voting] runs on the built-in byte model only for now: on a pretrained base it is not built yet");
    }
    let policy = consortium.policy.policy().map_err(|e| setting_error(e, Source::ConsortiumToml))?;
    let outer = consortium.policy.outer_optimizer().map_err(|e| setting_error(e, Source::ConsortiumToml))?;
    consortium.policy.validate().map_err(|e| setting_error(e, Source::ConsortiumToml))?;
    consortium.training.validate().map_err(|e| setting_error(e, Source::ConsortiumToml))?;
    let plan = AdapterPlan {
        seed: consortium.seed,
        rank: base.adapter.rank,
        alpha: base.adapter.alpha,
        targets: base.adapter.targets.clone(),
        track: base.adapter.track,
    };
    let aggregator = consortium.policy.aggregator;
    if let Some(why) = plan.refuses(&aggregator) {
        bail!("[policy] aggregator: {why}");
    }
    if !matches!(outer, OuterOptimizer::Plain { .. }) {
        bail!("[policy] outer: adapter rounds take the plain outer optimizer (adapters of different rounds share no coordinates)");
    }
    let training = AdapterTraining {
        steps: consortium.training.local_steps,
        batch: consortium.training.batch,
        context: base.context,
        lr: consortium.training.lr,
    };
    let dir = base.dir_in(consortium_dir);
    let (config, tokenizer, state) = crate::model::read_imported(&dir)?;
    let hash = state.content_hash();
    if hash != base.state_hash {
        bail!(
            "[base] {}: the model there hashes to {hash}, the consortium was made with {} (state_hash)",
            dir.display(),
            base.state_hash
        );
    }
    fits_model(&plan, &training, &config)?;
    // The accountant's steps are the adapter steps every round trains.
    let privacy = match consortium.privacy.and_then(|p| p.dp) {
        Some(dp) => Some(PrivacyRules {
            rule: dp.rule(consortium.rounds, training.steps).map_err(|e| setting_error(e, Source::ConsortiumToml))?,
            steps_per_round: training.steps,
        }),
        None => None,
    };
    let mut heldout = BTreeMap::new();
    for (_, language) in members {
        let bytes = data::corpus(data_dir, language)?;
        let (_, held) = split_corpus(&bytes, base.heldout_bytes).with_context(|| format!("the {language} corpus"))?;
        heldout.insert(language.clone(), held.into_bytes());
    }
    let family =
        Arc::new(LlamaFamily { config: config.clone(), tokenizer: Arc::new(tokenizer), context: SCORE_CONTEXT });
    let languages: Vec<String> = members.iter().map(|(_, language)| language.clone()).collect();
    let governance = consortium
        .governance
        .as_ref()
        .map(|g| -> anyhow::Result<Governance> {
            let registry = canary_registry(data_dir, g.canaries.as_deref(), &languages)?;
            Ok(Governance::new(g.settings, registry, family.clone())?)
        })
        .transpose()?;
    BaseCoordinator {
        name: &base.name,
        config: &config,
        family,
        base: state,
        members,
        heldout,
        policy,
        outer,
        aggregator,
        probe_scale: consortium.policy.probe_scale,
        plan,
        training,
        heldout_bytes: base.heldout_bytes,
        networked: Some(&consortium.name),
        governance,
        privacy,
        gauntlet: consortium.gauntlet,
        breaker: consortium.breaker,
    }
    .open(storage)
    .map(|coordinator| (coordinator, privacy.map(|p| p.rule)))
}

/// A networked node's trainer on a pretrained base: the base's config and tokenizer from its
/// kit, its text tokenized once.
pub(crate) fn node_trainer(kit_base: &Path, text: &str) -> anyhow::Result<LocalTrainer> {
    let (config, tokenizer) = crate::model::read_config_and_tokenizer(kit_base)?;
    let tokens = tokenizer.encode(text)?;
    Ok(LocalTrainer::Adapter(Box::new(LoraNodeTrainer { config, tokens, privacy: None })))
}

/// A networked node's external trainer on a pretrained base: each round's job carries the
/// base's config and tokenizer from the kit, the round's factors and the node's text.
pub(crate) fn external_node_trainer(
    kit_base: &Path,
    text: String,
    external: weft_node::ExternalCommand,
    jobs: &Path,
    node: &str,
) -> anyhow::Result<LocalTrainer> {
    // Read and checked here, so that a broken kit fails before the node connects.
    let (config, _) = crate::model::read_config_and_tokenizer(kit_base)?;
    let path = kit_base.join("tokenizer.json");
    let tokenizer = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let form = weft_llama::LlamaAdapterJobs::new(config, tokenizer);
    let trainer = weft_node::ExternalAdapterTrainer::new(external, jobs, node, Box::new(form), text.into_bytes())
        .map_err(|e| anyhow::anyhow!("--trainer: {e}"))?;
    Ok(LocalTrainer::Adapter(Box::new(trainer)))
}

fn bits(nats_per_byte: f64) -> f64 {
    nats_per_byte / std::f64::consts::LN_2
}

pub fn run(args: &DemoArgs, base: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let adapter = &args.adapter;
    let data_dir = data::data_dir(args.data.clone());
    let requested: Vec<String> = match &args.languages {
        Some(languages) => languages.clone(),
        None => LANGUAGES.iter().map(|l| (*l).to_owned()).collect(),
    };
    let languages = crate::demo::choose_languages(&requested, args.nodes)?;
    if args.processes || args.attack.is_some() {
        bail!("--base runs in one process, without attacks, for now: drop --processes and --attack");
    }
    let run = args.run_settings(&languages)?;
    if run.sections.voting.is_some() {
        bail!("--voting runs on the built-in byte model only for now: on a pretrained base it is not built yet");
    }
    if run.secure_aggregation.is_some() {
        bail!("--secure-aggregation runs on the built-in byte model only for now: on a pretrained base it is not built yet");
    }
    if !matches!(run.outer, OuterOptimizer::Plain { .. }) {
        bail!("--outer: adapter rounds take the plain outer optimizer (adapters of different rounds share no coordinates)");
    }
    let rounds = args.run.rounds.unwrap_or(2);
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let seed = run.seed();
    let (plan, node_training) = adapter.checked(seed)?;
    // DP-SGD on the adapters: the accountant counts the adapter steps of every round.
    let privacy = match run.sections.privacy.and_then(|p| p.dp) {
        Some(dp) => Some(PrivacyRules {
            rule: dp.rule(rounds, node_training.steps).map_err(|e| setting_error(e, Source::Flags))?,
            steps_per_round: node_training.steps,
        }),
        None => None,
    };
    if let Some(why) = plan.refuses(&run.aggregator) {
        bail!("--aggregator: {why}");
    }

    let (name, dir) = resolve_base(base, &data_dir)?;
    let (config, tokenizer, base_state) = crate::model::read_imported(&dir)?;
    let spec = fits_model(&plan, &node_training, &config)?;
    let tokenizer = Arc::new(tokenizer);
    let family = Arc::new(LlamaFamily { config: config.clone(), tokenizer: tokenizer.clone(), context: SCORE_CONTEXT });

    let training = LoraTraining { lr: adapter.lr, ..LoraTraining::default() };
    let windows = Windows { rows: adapter.batch, context: adapter.context };
    // Each language's text: the node trains on the head, the coordinator holds out the tail.
    let mut heldout = BTreeMap::new();
    let mut own_text = BTreeMap::new();
    let mut nodes = Vec::new();
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let out = args.out.clone().unwrap_or_else(|| scratch.path().to_owned());
    for (id, language) in &run.members {
        let bytes = data::corpus(&data_dir, language)?;
        let (train, held) =
            split_corpus(&bytes, adapter.heldout_bytes).with_context(|| format!("the {language} corpus"))?;
        own_text.insert(language.clone(), tail_lines(&train, adapter.heldout_bytes).into_bytes());
        heldout.insert(language.clone(), held.into_bytes());
        let tokens = tokenizer.encode(&train)?;
        if tokens.len() < adapter.context {
            bail!("the {language} training text has {} tokens, fewer than --adapter-context", tokens.len());
        }
        nodes.push(RealNode {
            id: id.clone(),
            language: language.clone(),
            trainer: LoraNodeTrainer {
                config: config.clone(),
                tokens,
                privacy: privacy.map(|p| PrivateTraining {
                    dp: p.rule.mechanism,
                    delta: p.rule.delta,
                    secret: crate::demo::demo_node_secret(seed, id),
                }),
            },
            dir: out.join("nodes").join(id.as_str()),
            sovereign: None,
            artifacts: Vec::new(),
            bytes_sent: 0,
        });
    }

    let storage = out.join("coordinator");
    std::fs::create_dir_all(&storage).with_context(|| format!("creating {}", storage.display()))?;
    let parameters = base_state.num_values();
    let initial_hash = base_state.content_hash();
    say!(
        "weft demo --base {name}: {} nodes ({}), {rounds} rounds, {} parameters, base {}",
        nodes.len(),
        languages.join(", "),
        parameters,
        initial_hash.short()
    );
    say!(
        "  adapters ({} track): rank {} alpha {} on {} · {} steps of {}×{} tokens per round · lr {}",
        if plan.track == AdapterTrack::Full { "full" } else { "shared" },
        adapter.rank,
        adapter.alpha,
        adapter.targets.join(","),
        adapter.steps,
        adapter.batch,
        adapter.context,
        adapter.lr
    );
    if let Some(p) = &privacy {
        let m = p.rule.mechanism;
        say!(
            "  privacy: DP-SGD on every node's adapter, ε ≤ {} per node over the run at δ = {} · σ {:.4} · q {} of disjoint {}-token records · clip {}",
            p.rule.epsilon_budget,
            p.rule.delta,
            m.noise_multiplier,
            m.sample_rate,
            adapter.context,
            m.clip_norm
        );
    }
    say!("  measuring the initial base on held-out text ({} bytes per language)…", adapter.heldout_bytes);
    let governance = match &run.sections.governance {
        Some(g) => {
            let registry = canary_registry(&data_dir, g.canaries.as_deref(), &run.languages())?;
            Some(Governance::new(g.settings, registry, family.clone())?)
        }
        None => None,
    };
    let mut coordinator = BaseCoordinator {
        name: &name,
        config: &config,
        family: family.clone(),
        base: base_state,
        members: &run.members,
        heldout: heldout.clone(),
        policy: run.policy,
        outer: run.outer,
        aggregator: run.aggregator,
        probe_scale: run.sections.policy.probe_scale,
        plan: plan.clone(),
        training: node_training,
        heldout_bytes: adapter.heldout_bytes,
        networked: None,
        governance,
        privacy,
        gauntlet: run.sections.gauntlet,
        breaker: run.sections.breaker,
    }
    .open(&storage)?;
    // The genesis as the journal holds it: a run continued in the same --out starts mid-way.
    let genesis = SqliteJournal::read(&storage)?.head_after(0)?.context("the coordinator's journal has no genesis")?;
    let initial_loss = genesis.base_loss;
    if coordinator.round() > 0 {
        say!("continuing the run in {} after round {}", out.display(), coordinator.round());
    }
    say!("round 0 base {}  held-out bits/byte {}", initial_hash.short(), bits_table(&initial_loss));

    while coordinator.round() < rounds {
        let (announcement, done) = match coordinator.open_round_state() {
            Some(state) => state,
            None => (coordinator.open_round()?, Default::default()),
        };
        let round = announcement.round;
        let record = coordinator.adapter_round().context("an adapter round without its adapter")?;
        say!();
        say!("round {round}: {record}");
        // One copy of the frozen base serves every node of this process in turn.
        let model = Llama::from_state(config.clone(), coordinator.base())?;
        let mut contributions = Vec::new();
        for node in nodes.iter_mut().filter(|n| !done.contains(&n.id)) {
            let mut rng = SplitMix64::derive(seed, node.id.as_str(), round);
            let bar = step_bar(&node.id, adapter.steps)?;
            let mut on_step = |step, loss: f64| {
                bar.set_position(step);
                bar.set_message(format!("{loss:.3}"));
            };
            let trained = node
                .trainer
                .train_on(&model, round, &record, &node_training, &mut rng, &mut on_step)
                .map_err(|e| anyhow::anyhow!(e))?;
            bar.finish_and_clear();
            say!(
                "  {:<14} trained {} steps, loss {:.3} → {:.3} nats/token{}",
                node.id,
                trained.steps,
                trained.mean_loss,
                trained.last_loss,
                trained.dp.as_ref().map_or(String::new(), |dp| format!(
                    " · DP-SGD: {} of {} records sampled, {} clipped, ε {:.3} this round",
                    dp.sampled, dp.records, dp.clipped, dp.epsilon
                ))
            );
            let kept_hash = keep_adapter(&node.dir, round, &trained.adapter)?;
            node.artifacts.push((round, kept_hash));
            node.bytes_sent += (trained.update.num_values() * 4) as u64;
            // Under DP only the mechanism and its (ε, δ) are released, as on the byte model.
            let (declared, token_count) = match &trained.dp {
                Some(dp) => (weft_node::declared_privacy(dp, trained.steps), 0),
                None => (BTreeMap::from([("train_loss".to_owned(), trained.mean_loss)]), trained.tokens),
            };
            contributions.push(Contribution {
                node: node.id.clone(),
                round,
                base_hash: announcement.base_hash,
                delta: Delta::from_state(trained.update),
                token_count,
                declared,
            });
        }
        drop(model);
        let measuring = spinner(format!("coordinator: measuring {} contributions", contributions.len()))?;
        for contribution in contributions {
            match coordinator.submit(contribution) {
                Ok(_) | Err(SubmitError::Rejected(_)) => {}
                Err(SubmitError::Internal(e)) => return Err(e.into()),
            }
        }
        measuring.set_message("coordinator: deciding and checking every language".to_owned());
        let closed = coordinator.close_round()?;
        measuring.finish_and_clear();
        let rounds_dir = storage.join("rounds");
        std::fs::create_dir_all(&rounds_dir)?;
        write_atomic(&rounds_dir.join(format!("round-{round:04}.json")), &serde_json::to_vec_pretty(&closed)?)?;
        table::round(&closed, &BTreeMap::new(), &[])?;
        if closed.governance.is_some() {
            table::reputation(&closed, &run.languages())?;
        }
        say!("  held-out bits/byte: {}", bits_table(&closed.heldout_loss));
    }

    // The side-by-side: each language under the consortium base, with its node's own private
    // adapter on top, and under what the node would have had alone.
    let final_model = Llama::from_state(config.clone(), coordinator.base())?;
    let final_hash = coordinator.base_hash();
    let final_loss = coordinator.base_loss().clone();
    drop(coordinator);
    let records: Vec<weft_coordinator::RoundRecord> =
        SqliteJournal::read(&storage)?.rounds()?.into_iter().map(|(record, _)| record).collect();
    let mut rows = Vec::new();
    let mut memorization = Vec::new();
    say!();
    say!("sovereign adapters: every node trains its own, {} steps on the published base, and keeps it", adapter.steps);
    let mut sovereign = BTreeMap::new();
    let private = PrivateAdapter { config: &config, spec: &spec, training, windows, tokenizer: &tokenizer };
    for node in &mut nodes {
        let text = &heldout[&node.language];
        // As a networked node keeps it (`weft node join`): same factors, same stream.
        let a_seed = weft_node::private_adapter(&plan.round(rounds), seed).seed;
        let stream = weft_node::private_stream(seed, &node.id);
        let (adapters, nats) = private.train(&final_model, node, adapter.steps, (a_seed, stream), text)?;
        node.sovereign = Some(keep_adapter(&node.dir.join("sovereign"), rounds, &adapters.to_state())?);
        sovereign.insert(node.language.clone(), nats);
    }
    drop(final_model);
    let mut alone = BTreeMap::new();
    // Read again rather than kept: a copy held through the rounds would cost another 540 MB.
    let (_, _, initial_state) = crate::model::read_imported(&dir)?;
    let model = Llama::from_state(config.clone(), &initial_state)?;
    drop(initial_state);
    for node in &nodes {
        let own = weft_llama::family::nats_per_byte(&model, &tokenizer, None, &own_text[&node.language], SCORE_CONTEXT)
            .map_err(|e| anyhow::anyhow!(e))?;
        memorization.push(MemorizationRow {
            language: node.language.clone(),
            heldout: bits(initial_loss[&node.language]),
            own_training_text: bits(own),
        });
    }
    if args.baseline == Baseline::Alone {
        say!();
        say!("baseline: every node alone, {} steps from the initial base", rounds * adapter.steps);
        for node in &nodes {
            let text = &heldout[&node.language];
            let stream = SplitMix64::derive(seed, &format!("alone/{}", node.id), 0);
            let (_, nats) = private.train(&model, node, rounds * adapter.steps, (seed ^ 0xa10e, stream), text)?;
            alone.insert(node.language.clone(), nats);
        }
    }
    drop(model);
    for node in &nodes {
        let language = &node.language;
        rows.push(LanguageRow {
            language: language.clone(),
            node: node.id.clone(),
            initial: bits(initial_loss[language]),
            consortium: bits(final_loss[language]),
            consortium_plus_sovereign: bits(sovereign.get(language).copied().unwrap_or(f64::NAN)),
            alone: alone.get(language).copied().map(bits),
        });
    }

    say!();
    say!("held-out bits/byte per language (text no node trained on)");
    say!("  {:<6} {:>9} {:>20} {:>22} {:>18}", "lang", "initial", "consortium", "+ own adapter", "node alone");
    let change = |v: f64, from: f64| format!("{v:.4} ({:+.1}%)", 100.0 * (v - from) / from);
    for row in &rows {
        say!(
            "  {:<6} {:>9.4} {:>20} {:>22} {:>18}",
            row.language,
            row.initial,
            change(row.consortium, row.initial),
            change(row.consortium_plus_sovereign, row.initial),
            row.alone.map_or_else(|| "-".to_owned(), |a| change(a, row.initial))
        );
    }
    if !memorization.is_empty() {
        let cells: Vec<String> = memorization
            .iter()
            .map(|m| format!("{} {:.3} vs {:.3}", m.language, m.heldout, m.own_training_text))
            .collect();
        say!("memorization check (initial base, held-out vs own training text, bits/byte): {}", cells.join(" · "));
    }
    let seconds = started.elapsed().as_secs_f64();
    say!("final base {}  ({seconds:.0} s)", final_hash.short());
    if let Some(kept) = &args.out {
        say!("artifacts in {}; check the ledger with: weft ledger verify {}", kept.display(), storage.display());
        let page = crate::dashboard::write_report(&storage, kept)?;
        say!("report with charts: {} (browse the run: weft dashboard {})", page.display(), storage.display());
    }
    let update_values = RoundAdapter::new(&config, &plan.round(1))?.update_values();
    let report = RealBaseReport {
        base: BaseInfo { name, dir, config, parameters },
        adapter: AdapterInfo {
            track: plan.track,
            rank: adapter.rank,
            alpha: adapter.alpha,
            targets: adapter.targets.clone(),
            steps_per_round: adapter.steps,
            windows,
            lr: adapter.lr,
            update_values,
        },
        seed,
        rounds: records,
        languages: rows,
        memorization_check: memorization,
        nodes: nodes
            .iter()
            .map(|n| NodeRow {
                node: n.id.clone(),
                language: n.language.clone(),
                train_tokens: n.trainer.tokens.len(),
                bytes_sent: n.bytes_sent,
                artifacts: n.artifacts.clone(),
                sovereign: n.sovereign,
            })
            .collect(),
        initial_base_hash: initial_hash,
        final_base_hash: final_hash,
        seconds,
        peak_rss_mb: crate::simulate::peak_rss().map(|b| b as f64 / 1e6),
    };
    if let Some(path) = &args.json {
        write_atomic(path, &(serde_json::to_string_pretty(&report)? + "\n").into_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// How a node trains an adapter for itself (its sovereign adapter, or the node-alone baseline).
struct PrivateAdapter<'a> {
    config: &'a LlamaConfig,
    spec: &'a LoraSpec,
    training: LoraTraining,
    windows: Windows,
    tokenizer: &'a LlamaTokenizer,
}

impl PrivateAdapter<'_> {
    /// Trains a fresh adapter (`A` from `a_seed`) `steps` steps on `node`'s text from `model`,
    /// drawing windows from `rng`, and scores it on `heldout`: the adapter and its nats per byte.
    fn train(
        &self,
        model: &Llama,
        node: &RealNode,
        steps: u64,
        (a_seed, mut rng): (u64, SplitMix64),
        heldout: &[u8],
    ) -> anyhow::Result<(Adapters, f64)> {
        let mut adapters = Adapters::init(self.config, self.spec.clone(), a_seed)?;
        train_with_bar(model, &mut adapters, self.training, node, steps, self.windows, &mut rng)?;
        let nats = weft_llama::family::nats_per_byte(model, self.tokenizer, Some(&adapters), heldout, SCORE_CONTEXT)
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok((adapters, nats))
    }
}

fn bits_table(table: &LossTable) -> String {
    table.iter().map(|(l, v)| format!("{l} {:.4}", bits(*v))).collect::<Vec<_>>().join("  ")
}

fn spinner(message: String) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("  {spinner} {msg} ({elapsed})").map_err(|e| anyhow::anyhow!("{e}"))?);
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    Ok(bar)
}

/// A progress bar for `steps` steps of `node`'s training; `on_step` moves it.
fn step_bar(node: &NodeId, steps: u64) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("  {prefix:<14} {bar:30} {pos:>3}/{len} steps  loss {msg}")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    bar.set_prefix(node.to_string());
    Ok(bar)
}

/// Trains `adapters` on the node's tokens with a progress bar; returns the training report.
fn train_with_bar(
    model: &Llama,
    adapters: &mut Adapters,
    training: LoraTraining,
    node: &RealNode,
    steps: u64,
    windows: Windows,
    rng: &mut SplitMix64,
) -> anyhow::Result<weft_llama::LoraReport> {
    let bar = step_bar(&node.id, steps)?;
    let mut on_step = |step, loss: f64| {
        bar.set_position(step);
        bar.set_message(format!("{loss:.3}"));
    };
    let total = train_steps(model, adapters, training, &node.trainer.tokens, steps, windows, rng, &mut on_step)?;
    bar.finish_and_clear();
    say!("  {:<14} trained {} steps, loss {:.3} → {:.3} nats/token", node.id, steps, total.mean_loss, total.last_loss);
    Ok(total)
}

/// Writes the node's adapter of `round` (A and B, PEFT-style names) under its directory and
/// returns its content hash (the node's manifest names it).
fn keep_adapter(dir: &Path, round: u64, state: &ModelState) -> anyhow::Result<ContentHash> {
    let round_dir = dir.join(format!("round-{round:04}"));
    std::fs::create_dir_all(&round_dir).with_context(|| format!("creating {}", round_dir.display()))?;
    let hash = state.content_hash();
    write_atomic(&round_dir.join("adapter.safetensors"), &state.to_safetensors(None)?)?;
    let manifest = serde_json::json!({ "round": round, "adapter_hash": hash, "file": "adapter.safetensors" });
    write_atomic(&round_dir.join("manifest.json"), &serde_json::to_vec_pretty(&manifest)?)?;
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heldout_tail_is_never_in_the_training_head() {
        let corpus: String = (0..100).map(|i| format!("line number {i}\n")).collect();
        let (train, heldout) = split_corpus(corpus.as_bytes(), 40).unwrap();
        assert!(train.ends_with("line number 89"));
        assert!(heldout.starts_with("line number 90\n"));
        assert!(heldout.len() >= 40 && heldout.lines().all(|l| !train.contains(&format!("{l}\n"))));
        // A networked node cuts its training text where the coordinator does.
        assert_eq!(training_head(corpus.as_bytes()).unwrap(), train);
        assert_eq!(tail_lines("a\nbb\nccc\n", 5), "ccc\n");
        // Multi-byte scripts: a cut inside a character moves to the next line.
        let japanese = "リファレンス\n製作著作\nシステム\n";
        for bytes in 0..=japanese.len() {
            let tail = tail_lines(japanese, bytes);
            assert!(japanese.ends_with(&tail) && tail.len() <= bytes.max(1) + 3 * 6, "{bytes}: {tail:?}");
        }
        assert_eq!(tail_lines("製作著作", 4), "作");
        assert!(split_corpus(b"one line", 10).is_err());
    }
}
