//! `weft demo`: a whole consortium in one process, on embedded defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::ValueEnum;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;
use weft_coordinator::{
    CanaryRegistry, Coordinator, Governance, GovernanceSettings, GovernanceState, RoundRecord, SqliteJournal,
    SubmitError, Visibility,
};
use weft_core::quality::LossTable;
use weft_core::{Aggregator, ContentHash, NodeId, OuterOptimizer, Policy, Weighting};
use weft_model::{AdamWSettings, Gpt, GptConfig};
use weft_node::{write_atomic, LocalCorpus, Node, NodeSettings};

use crate::attack::{Attack, AttackKind};
use crate::consortium::RunSettings;
use crate::data;
use crate::table;

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

/// The transformer's shape: the same flags and defaults for `weft demo` and
/// `weft consortium init`.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct ModelArgs {
    /// Transformer blocks.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Attention heads per block.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Context length in bytes.
    #[arg(long, default_value_t = 64)]
    pub context: usize,
}

impl ModelArgs {
    /// The validated configuration; an error names the flags.
    pub fn config(&self) -> anyhow::Result<GptConfig> {
        let config = GptConfig { layers: self.layers, heads: self.heads, width: self.width, context: self.context };
        config.validate().context("--layers/--heads/--width/--context")?;
        Ok(config)
    }

    /// The same flags, to pass on to another `weft` command.
    fn flags(&self) -> [(&'static str, String); 4] {
        [
            ("--layers", self.layers.to_string()),
            ("--heads", self.heads.to_string()),
            ("--width", self.width.to_string()),
            ("--context", self.context.to_string()),
        ]
    }
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Number of rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// Number of sovereign nodes: one per language, the first N of --languages.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Languages, one node each (available: en, de, fr, es, it, pt, ja, zh-cn, id).
    #[arg(long, value_delimiter = ',', default_value = "en,de,fr,es,it,pt,ja,zh-cn,id")]
    pub languages: Vec<String>,
    /// Local optimizer steps per node per round (K).
    #[arg(long, default_value_t = 60)]
    pub local_steps: u64,
    /// Sequences per local batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Local AdamW learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f32,
    /// Seed of the whole run: the same seed and inputs give bitwise-identical bases.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Quality floor: minimum measured quality (nats/byte of mean held-out loss removed).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub floor: f64,
    /// Largest weight any one node may receive, in (0, 1]. Never exceeded.
    #[arg(long, default_value_t = 0.5)]
    pub cap: f64,
    /// Share of the roster that must be accepted for the base to move, in [0, 1].
    #[arg(long, default_value_t = 0.5)]
    pub quorum: f64,
    /// How accepted contributions are weighted.
    #[arg(long, value_enum, default_value_t = WeightingArg::Quality)]
    pub weighting: WeightingArg,
    /// Each delta's quality is measured on base + s·Δ (default 1/N, its share under equal weighting).
    #[arg(long)]
    pub probe_scale: Option<f32>,
    /// How accepted deltas are combined: mean, norm-bound:TAU, norm-bound:adaptive:K, median,
    /// trimmed-mean:BETA, multi-krum:F:M, centered-clipping:TAU:ITERATIONS.
    #[arg(long, default_value = "norm-bound:adaptive:1")]
    pub aggregator: String,
    /// Make the last --attackers nodes malicious with this attack.
    #[arg(long, value_enum)]
    pub attack: Option<AttackKind>,
    /// How many nodes attack (the last ones).
    #[arg(long, default_value_t = 1)]
    pub attackers: usize,
    /// The attack's factor λ (default depends on the attack: see `weft demo --help`).
    #[arg(long)]
    pub attack_scale: Option<f32>,
    /// Governance: score contributions on canaries (public + secret reserve, data/canaries),
    /// catch canary overfitting, and weight nodes by reputation earned over rounds.
    #[arg(long)]
    pub governance: bool,
    /// Canary registry manifest (default: data/canaries/canaries.json).
    #[arg(long)]
    pub canaries: Option<PathBuf>,
    /// Every governance parameter as JSON (see README); flags below override it.
    #[arg(long)]
    pub governance_config: Option<PathBuf>,
    /// Share of the weight reserved for newcomers (governance; default 0.1).
    #[arg(long)]
    pub exploration: Option<f64>,
    /// Largest tolerated public-minus-secret canary gain, nats/byte (governance; default 0.05).
    #[arg(long)]
    pub goodhart_margin: Option<f64>,
    /// Half-life of reputation evidence, in rounds (governance; default 10).
    #[arg(long)]
    pub half_life: Option<f64>,
    /// Largest reputation vote weight of any node in a topic (governance; default 0.2).
    #[arg(long)]
    pub w_max: Option<f64>,
    /// Outer optimizer applied to the aggregated step.
    #[arg(long, value_enum, default_value_t = OuterArg::Plain)]
    pub outer: OuterArg,
    /// Outer learning rate (default: 1.0 for plain, 0.7 for nesterov).
    #[arg(long)]
    pub outer_lr: Option<f32>,
    /// Nesterov momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Keep every artifact here (nodes' sovereign models, bases, deltas, manifests, records).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Data directory (udhr/ and corpora/); default: the repository's data/.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run as separate processes on this machine: `weft coordinator serve` and one `weft node
    /// join` per node, over mutual TLS on loopback (same bases as in one process).
    #[arg(long)]
    pub processes: bool,
    /// With --processes: how deltas travel (f32, f16, bf16, int8).
    #[arg(long, default_value = "f32")]
    pub encoding: String,
}

/// The JSON report. Its schema is documented in the README.
#[derive(Serialize)]
struct Report {
    seed: u64,
    model: GptConfig,
    parameters: usize,
    policy: Policy,
    aggregator: Aggregator,
    outer_optimizer: OuterOptimizer,
    local_steps: u64,
    nodes: Vec<NodeInfo>,
    initial_base_hash: ContentHash,
    initial_heldout_loss: LossTable,
    rounds: Vec<RoundRecord>,
    final_base_hash: ContentHash,
    final_heldout_loss: LossTable,
    sovereign_heldout_loss: BTreeMap<String, LossTable>,
    seconds: f64,
}

#[derive(Serialize)]
struct NodeInfo {
    node: String,
    language: String,
    corpus_bytes: usize,
    /// The attack this node runs (`null` for an honest node).
    attacker: Option<AttackKind>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.processes {
        return processes(&args);
    }
    let started = Instant::now();
    let config = args.model.config()?;
    let weighting = match args.weighting {
        WeightingArg::Quality => Weighting::Quality,
        WeightingArg::Equal => Weighting::Equal,
        WeightingArg::Declared => Weighting::Declared,
    };
    let aggregator: Aggregator = args.aggregator.parse().context("--aggregator")?;
    let policy = Policy::new(args.floor, args.cap, args.quorum, weighting).context("--floor/--cap/--quorum")?;
    let outer = match args.outer {
        OuterArg::Plain => OuterOptimizer::Plain { lr: args.outer_lr.unwrap_or(1.0) },
        OuterArg::Nesterov => OuterOptimizer::Nesterov { lr: args.outer_lr.unwrap_or(0.7), momentum: args.momentum },
    };
    outer.validate().context("--outer-lr/--momentum")?;
    let languages = choose_languages(&args.languages, args.nodes)?;
    if args.batch == 0 || args.local_steps == 0 || args.rounds == 0 {
        bail!("--batch, --local-steps and --rounds must be at least 1");
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr must be a positive number, got {}", args.lr);
    }

    if args.attack.is_some() && !(1..=languages.len()).contains(&args.attackers) {
        bail!("--attackers must be between 1 and the number of nodes ({})", languages.len());
    }
    let mut attack = args.attack.map(|kind| {
        let scale = args.attack_scale.unwrap_or_else(|| kind.default_scale(languages.len()));
        Attack::new(kind, scale, args.seed, args.attackers)
    });
    let first_attacker = languages.len() - if attack.is_some() { args.attackers } else { 0 };
    let data_dir = data::data_dir(args.data.clone());
    let registry = if args.governance {
        Some(crate::consortium::canary_registry(&data_dir, args.canaries.as_deref(), &languages)?)
    } else {
        None
    };
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let out = args.out.clone().unwrap_or_else(|| scratch.path().to_owned());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let settings = NodeSettings {
        steps: args.local_steps,
        batch_rows: args.batch,
        adamw: AdamWSettings { lr: args.lr, ..AdamWSettings::default() },
        seed: args.seed,
    };
    let mut nodes = Vec::new();
    let mut members = Vec::new();
    let mut infos = Vec::new();
    for (index, language) in languages.iter().enumerate() {
        let id = NodeId::new(format!("node-{language}"))?;
        // The held-out text ships with the project; check it before fetching anything.
        data::heldout(&data_dir, language)?;
        let mut bytes = data::corpus(&data_dir, language)?;
        let attacker = index >= first_attacker;
        match attack.as_ref().map(|a| a.kind) {
            Some(AttackKind::Poison) if attacker => Attack::poison(&mut bytes, args.seed ^ index as u64),
            Some(AttackKind::CanaryOverfit) if attacker => {
                let registry = registry.as_ref().context("--attack canary-overfit needs --governance")?;
                bytes = public_canaries(registry, &languages)?;
            }
            _ => {}
        }
        infos.push(NodeInfo {
            node: id.to_string(),
            language: language.clone(),
            corpus_bytes: bytes.len(),
            attacker: attacker.then_some(args.attack).flatten(),
        });
        let corpus = LocalCorpus::from_bytes(bytes);
        let dir = out.join("nodes").join(id.as_str());
        nodes.push(Node::new(id.clone(), language.clone(), corpus, config, settings, dir)?);
        members.push((id.to_string(), language.clone()));
    }

    // The coordinator's durable state: journal, ledger and blobs. Running the same command
    // again with the same --out continues the run (after a crash, too).
    let storage = out.join("coordinator");
    let resuming = storage.join(SqliteJournal::DATABASE).is_file();
    if resuming && attack.is_some() {
        bail!(
            "{} holds a run to continue, but --attack cannot be resumed (the attack harness keeps its state in memory); use a new --out",
            out.display()
        );
    }
    let run = RunSettings {
        model: config,
        seed: args.seed,
        members,
        policy,
        aggregator,
        outer,
        probe_scale: args.probe_scale,
        node: settings,
    };
    let governance = match registry {
        Some(registry) => Some(Governance::new(governance_settings(&args)?, registry, config, 32)?),
        None => None,
    };
    let attack_settings = args.attack.map(|kind| (kind, args.attackers, args.attack_scale));
    let mut coordinator =
        run.coordinator(&data_dir, &storage, governance, serde_json::json!({ "attack": attack_settings }))?;
    let parameters = coordinator.base().num_values();
    let genesis = Gpt::init(config, args.seed)?.to_state();
    let initial_hash = genesis.content_hash();
    let initial_loss = if coordinator.base_hash() == initial_hash {
        coordinator.base_loss().clone()
    } else {
        coordinator.measure(&genesis)?
    };
    drop(genesis);
    if resuming {
        println!("continuing the run in {} after round {}", out.display(), coordinator.round());
    } else {
        save_base(&out, 0, &coordinator)?;
    }

    println!(
        "weft demo: {} nodes ({}), {} rounds of {} local steps, model {} layers × {} heads × width {} × context {} ({} parameters), seed {}",
        nodes.len(),
        languages.join(", "),
        args.rounds,
        args.local_steps,
        config.layers,
        config.heads,
        config.width,
        config.context,
        parameters,
        args.seed
    );
    println!(
        "policy: floor {} · cap {} · quorum {} ({} of {}) · weighting {} · aggregator {} · outer {} · quality probed at {:.3}·Δ",
        policy.floor,
        policy.cap,
        policy.quorum,
        policy.required(nodes.len()),
        nodes.len(),
        match weighting {
            Weighting::Quality => "by measured quality",
            Weighting::Equal => "equal",
            Weighting::Declared => "by DECLARED quality (Tapestry baseline)",
        },
        aggregator,
        describe_outer(&outer),
        coordinator.probe_scale()
    );
    let attackers: Vec<String> = languages[first_attacker..].iter().map(|l| format!("node-{l}")).collect();
    if let Some(attack) = &attack {
        println!("attack: {:?} (λ = {}) by {}", attack.kind, attack.scale, attackers.join(", "));
    }
    println!("round 0 base {}  held-out loss {}", initial_hash.short(), table::losses(&initial_loss));

    let mut rounds = coordinator.recorded_rounds()?;
    while coordinator.round() < args.rounds {
        // A round left open by a crash continues; nodes it already heard from are not asked again.
        let (announcement, done) = match coordinator.open_round_state() {
            Some(state) => state,
            None => (coordinator.open_round()?, Default::default()),
        };
        let pending: Vec<&mut Node> = nodes.iter_mut().filter(|n| !done.contains(n.id().as_str())).collect();
        let mut contributions =
            train_all(pending, announcement.round, args.local_steps, coordinator.base(), announcement.base_hash)?;
        if let Some(attack) = attack.as_mut() {
            attack.apply(announcement.round, &mut contributions[first_attacker..]);
        }
        let mut local_losses = BTreeMap::new();
        for contribution in contributions {
            local_losses.insert(contribution.node.to_string(), contribution.declared.get("final_train_loss").copied());
            match coordinator.submit(contribution) {
                Ok(_) | Err(SubmitError::Rejected(_)) => {}
                Err(SubmitError::Internal(e)) => return Err(e.into()),
            }
        }
        let record = coordinator.close_round()?;
        save_base(&out, record.round, &coordinator)?;
        let json = serde_json::to_vec_pretty(&record)?;
        let rounds_dir = out.join("coordinator").join("rounds");
        std::fs::create_dir_all(&rounds_dir)?;
        write_atomic(&rounds_dir.join(format!("round-{:04}.json", record.round)), &json)?;
        table::round(&record, &local_losses, &attackers);
        if let Some(governance) = coordinator.governance() {
            table::reputation(&record, &languages);
            let saved = SavedGovernance {
                settings: *governance.settings(),
                topics: languages.clone(),
                state: governance.state().clone(),
            };
            write_atomic(&out.join("coordinator").join("governance.json"), &serde_json::to_vec_pretty(&saved)?)?;
        }
        rounds.push(record);
    }

    let manifests_dir = out.join("coordinator").join("nodes");
    std::fs::create_dir_all(&manifests_dir)?;
    for (node, manifest) in coordinator.manifests() {
        write_atomic(&manifests_dir.join(format!("{node}.json")), &serde_json::to_vec_pretty(manifest)?)?;
    }
    let mut sovereign = BTreeMap::new();
    for node in &nodes {
        if let Some(artifact) = node.latest_artifact() {
            let weights = artifact.load_weights()?;
            sovereign.insert(node.id().to_string(), coordinator.measure(&weights)?);
        }
    }
    let final_loss = coordinator.base_loss().clone();
    table::summary(&initial_loss, &final_loss, &sovereign, &languages);
    let report = Report {
        seed: args.seed,
        model: config,
        parameters,
        policy,
        aggregator,
        outer_optimizer: outer,
        local_steps: args.local_steps,
        nodes: infos,
        initial_base_hash: initial_hash,
        initial_heldout_loss: initial_loss,
        rounds,
        final_base_hash: coordinator.base_hash(),
        final_heldout_loss: final_loss,
        sovereign_heldout_loss: sovereign,
        seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_vec_pretty(&report)?;
    if args.out.is_some() {
        write_atomic(&out.join("report.json"), &json)?;
        println!("artifacts kept in {}", out.display());
    }
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    println!("final base {}  ({:.1} s)", report.final_base_hash, report.seconds);
    Ok(())
}

/// `--processes`: the same consortium as separate processes. Only the settings a consortium
/// config carries are passed on; the in-process harnesses (attacks, governance) are refused.
fn processes(args: &DemoArgs) -> anyhow::Result<()> {
    if args.attack.is_some() || args.out.is_some() || args.canaries.is_some() || args.governance_config.is_some() {
        bail!("--processes runs the honest consortium; --attack, --out, --canaries and --governance-config are for the in-process demo");
    }
    // The consortium config `weft consortium init` writes carries the demo's default policy.
    let defaults = [
        ("--lr", args.lr == 3e-3),
        ("--floor", args.floor == 0.0),
        ("--cap", args.cap == 0.5),
        ("--quorum", args.quorum == 0.5),
        ("--weighting", matches!(args.weighting, WeightingArg::Quality)),
        ("--aggregator", args.aggregator == "norm-bound:adaptive:1"),
        ("--outer", matches!(args.outer, OuterArg::Plain) && args.outer_lr.is_none()),
        ("--probe-scale", args.probe_scale.is_none()),
        (
            "--exploration/--goodhart-margin/--half-life/--w-max",
            args.exploration.is_none()
                && args.goodhart_margin.is_none()
                && args.half_life.is_none()
                && args.w_max.is_none(),
        ),
    ];
    let changed: Vec<&str> = defaults.iter().filter(|(_, default)| !default).map(|(flag, _)| *flag).collect();
    if !changed.is_empty() {
        bail!(
            "--processes runs `weft consortium init`'s default policy; {} would be ignored (run `weft consortium init`, edit consortium.toml, then serve and join)",
            changed.join(", ")
        );
    }
    let languages = choose_languages(&args.languages, args.nodes)?;
    let nodes: Vec<(String, String)> = languages.iter().map(|l| (format!("node-{l}"), l.clone())).collect();
    let extra: Vec<String> = [
        ("--seed", args.seed.to_string()),
        ("--local-steps", args.local_steps.to_string()),
        ("--batch", args.batch.to_string()),
        ("--encoding", args.encoding.clone()),
    ]
    .into_iter()
    .chain(args.model.flags())
    .flat_map(|(flag, value)| [flag.to_owned(), value])
    .chain(args.governance.then(|| "--governance".to_owned()))
    .collect();
    crate::net::demo_processes(&nodes, args.rounds, &extra, args.data.as_deref(), args.json.as_deref())
}

/// Governance parameters: `--governance-config` (every parameter, JSON) with single flags on top.
fn governance_settings(args: &DemoArgs) -> anyhow::Result<GovernanceSettings> {
    let mut settings = match &args.governance_config {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_slice::<GovernanceSettings>(&bytes)
                .with_context(|| format!("{}: not valid governance settings", path.display()))?
        }
        None => GovernanceSettings::default(),
    };
    settings.exploration = args.exploration.unwrap_or(settings.exploration);
    settings.goodhart_margin = args.goodhart_margin.unwrap_or(settings.goodhart_margin);
    settings.reputation.half_life = args.half_life.unwrap_or(settings.reputation.half_life);
    settings.reputation.w_max = args.w_max.unwrap_or(settings.reputation.w_max);
    Ok(settings)
}

/// What `weft reputation` reads: the governance state with what is needed to recompute its table.
#[derive(Serialize, serde::Deserialize)]
pub struct SavedGovernance {
    pub settings: GovernanceSettings,
    pub topics: Vec<String>,
    pub state: GovernanceState,
}

/// The public canaries now scoring each of the consortium's languages: what a node that
/// teaches to the test trains on.
fn public_canaries(registry: &CanaryRegistry, languages: &[String]) -> anyhow::Result<Vec<u8>> {
    let mut text = Vec::new();
    for language in languages {
        text.extend_from_slice(&registry.active(language, Visibility::Public)?.text);
    }
    Ok(text)
}

fn choose_languages(requested: &[String], nodes: usize) -> anyhow::Result<Vec<String>> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let mut chosen: Vec<String> = Vec::new();
    for language in requested {
        if !data::LANGUAGES.contains(&language.as_str()) {
            bail!("unknown language '{language}' in --languages (available: {})", data::LANGUAGES.join(", "));
        }
        if chosen.contains(language) {
            bail!("language '{language}' is listed twice in --languages: one node per language");
        }
        chosen.push(language.clone());
    }
    if chosen.len() < nodes {
        bail!("--nodes {nodes} needs {nodes} languages but --languages lists {}", chosen.len());
    }
    chosen.truncate(nodes);
    Ok(chosen)
}

fn describe_outer(outer: &OuterOptimizer) -> String {
    match outer {
        OuterOptimizer::Plain { lr } => format!("plain (lr {lr})"),
        OuterOptimizer::Nesterov { lr, momentum } => format!("nesterov (lr {lr}, momentum {momentum})"),
    }
}

/// Trains every node on the announced base, in parallel, with one progress bar each.
fn train_all(
    nodes: Vec<&mut Node>,
    round: u64,
    steps: u64,
    base: &weft_core::ModelState,
    base_hash: ContentHash,
) -> anyhow::Result<Vec<weft_core::Contribution>> {
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("  {prefix:<14} {bar:30} {pos:>4}/{len} steps  loss {msg}")
        .map_err(|e| anyhow::anyhow!("progress bar template: {e}"))?;
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = nodes
            .into_iter()
            .map(|node| {
                let bar = bars.add(ProgressBar::new(steps));
                bar.set_style(style.clone());
                bar.set_prefix(node.id().to_string());
                scope.spawn(move || {
                    let result = node.run_cycle(round, base, base_hash, |step, loss| {
                        bar.set_position(step);
                        bar.set_message(format!("{loss:.3}"));
                    });
                    bar.finish_and_clear();
                    result
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect::<Vec<_>>()
    });
    let mut contributions = Vec::new();
    for result in results {
        match result {
            Ok(cycle) => contributions.push(cycle?.contribution),
            Err(_) => bail!("a node's training thread panicked"),
        }
    }
    Ok(contributions)
}

fn save_base<M: weft_coordinator::Measure>(out: &Path, round: u64, coordinator: &Coordinator<M>) -> anyhow::Result<()> {
    let dir = out.join("coordinator").join("bases");
    std::fs::create_dir_all(&dir)?;
    let bytes = coordinator.base().to_safetensors(None)?;
    write_atomic(&dir.join(format!("round-{round:04}.safetensors")), &bytes)?;
    Ok(())
}
