//! `weft consortium init`, `weft coordinator serve`, `weft node join`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use weft_net::config::{
    read_text, read_toml, ConsortiumConfig, GovernanceConfig, KitFiles, PolicySettings, Roster, Training,
};
use weft_net::encoding::Encoding;
use weft_net::server::ServeOptions;
use weft_node::LocalCorpus;

use crate::consortium::RunSettings;
use crate::data;

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory to create (must not exist).
    pub dir: PathBuf,
    /// A member: `ID:LANG` (LANG = its language/jurisdiction; `ID` alone uses ID as language).
    /// Repeat for every node.
    #[arg(long = "node", required = true)]
    pub nodes: Vec<String>,
    #[arg(long, default_value = "weft")]
    pub name: String,
    /// Where the coordinator listens and nodes dial.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub address: String,
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// f32 (lossless), f16, bf16, int8.
    #[arg(long, default_value = "f32")]
    pub encoding: String,
    /// Seconds a round stays open for late nodes.
    #[arg(long, default_value_t = 600)]
    pub deadline_secs: u64,
    #[arg(long, default_value_t = 60)]
    pub local_steps: u64,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[command(flatten)]
    pub model: crate::demo::ModelArgs,
    /// Govern with canaries and reputation (the `[governance]` section, default settings).
    #[arg(long)]
    pub governance: bool,
}

/// The consortium config `weft consortium init` writes: the demo's defaults.
pub fn default_config(args: &InitArgs) -> anyhow::Result<ConsortiumConfig> {
    Ok(ConsortiumConfig {
        name: args.name.clone(),
        address: args.address.clone(),
        server_name: "weft-coordinator".into(),
        rounds: args.rounds,
        seed: args.seed,
        round_deadline_secs: args.deadline_secs,
        encoding: args.encoding.parse::<Encoding>().context("--encoding")?,
        storage: "coordinator".into(),
        model: args.model.config()?,
        training: Training { local_steps: args.local_steps, batch: args.batch, lr: 3e-3 },
        policy: PolicySettings {
            floor: 0.0,
            cap: 0.5,
            quorum: 0.5,
            weighting: "quality".into(),
            aggregator: "norm-bound:adaptive:1".into(),
            outer: "plain".into(),
            outer_lr: None,
            momentum: 0.9,
            probe_scale: None,
        },
        governance: args.governance.then(|| GovernanceConfig { canaries: None, settings: Default::default() }),
    })
}

pub fn init(args: InitArgs) -> anyhow::Result<()> {
    let config = default_config(&args)?;
    let nodes: Vec<(String, String)> = args
        .nodes
        .iter()
        .map(|spec| match spec.split_once(':') {
            Some((id, lang)) => (id.to_owned(), lang.to_owned()),
            None => (spec.clone(), spec.clone()),
        })
        .collect();
    let roster = weft_net::provision::init(&args.dir, &config, &nodes)?;
    println!("consortium '{}' created in {}", config.name, args.dir.display());
    for m in &roster.node {
        println!("  {:<14} {:<6} kit {}", m.id, m.language, args.dir.join("nodes").join(&m.id).display());
    }
    println!(
        "edit {} as needed, then: weft coordinator serve {}",
        args.dir.join("consortium.toml").display(),
        args.dir.display()
    );
    println!("send each node its kit (nodes/<id>/); keep ca.key offline");
    Ok(())
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The consortium directory (consortium.toml, roster.toml, ca.pem, coordinator/).
    pub dir: PathBuf,
    /// Data directory with the held-out texts (default: the repository's data/).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Write the rounds' records and bytes on the wire here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seconds to keep answering after the last round, so nodes learn it is over.
    #[arg(long, default_value_t = 3)]
    pub linger_secs: u64,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config: ConsortiumConfig = read_toml(&args.dir.join("consortium.toml"))?;
    let roster_path = args.dir.join("roster.toml");
    let roster: Roster = read_toml(&roster_path)?;
    roster.check(&roster_path)?;
    let members = roster.node.iter().map(|m| (m.id.clone(), m.language.clone())).collect();
    let run = RunSettings::from_config(&config, members)?;
    let storage = args.dir.join(&config.storage);
    let data_dir = data::data_dir(args.data.clone());
    let governance = match &config.governance {
        Some(g) => {
            let languages: Vec<String> = run.members.iter().map(|(_, l)| l.clone()).collect();
            let registry = crate::consortium::canary_registry(&data_dir, g.canaries.as_deref(), &languages)?;
            Some(weft_coordinator::Governance::new(g.settings, registry, run.model, 32)?)
        }
        None => None,
    };
    let coordinator =
        run.coordinator(&data_dir, &storage, governance, serde_json::json!({ "networked": config.name }))?;
    if coordinator.round() > 0 || coordinator.open_round_state().is_some() {
        println!("continuing after round {} from {}", coordinator.round(), storage.display());
    }
    let options = ServeOptions {
        certificate: read_text(&storage.join(KitFiles::CERTIFICATE))?,
        key: read_text(&storage.join(KitFiles::TLS_KEY))?,
        ca: read_text(&args.dir.join("ca.pem"))?,
        spool: storage.join("incoming"),
        linger: Duration::from_secs(args.linger_secs),
        config,
        roster,
    };
    println!("coordinator listening on {} for {} nodes", options.config.address, options.roster.node.len());
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let served = runtime.block_on(weft_net::server::serve(coordinator, options))?;
    for record in &served.rounds {
        let wire: u64 = served.wire_bytes.get(&record.round).map_or(0, |m| m.values().sum());
        let losses: Vec<String> = record.heldout_loss.iter().map(|(l, v)| format!("{l} {v:.4}")).collect();
        println!(
            "round {}: {} accepted · base {} · {:.2} MB of deltas on the wire · held-out {}",
            record.round,
            record.accepted,
            record.base_hash.short(),
            wire as f64 / 1e6,
            losses.join(" ")
        );
    }
    let final_base_hash = served.rounds.last().map(|r| r.base_hash.to_string()).unwrap_or_default();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&served)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("final base {final_base_hash}");
    Ok(())
}

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// The node's startup kit (node.toml, ca.pem, tls.pem, tls.key, signing.key).
    pub kit: PathBuf,
    /// Training text (default: the data directory's corpus for the node's language).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where the node keeps its sovereign artifacts (default: KIT/artifacts).
    #[arg(long)]
    pub artifacts: Option<PathBuf>,
    /// Give up if the coordinator cannot be reached for this long (seconds).
    #[arg(long, default_value_t = 120)]
    pub give_up_after: u64,
    /// Write what happened to each contribution here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn join(args: JoinArgs) -> anyhow::Result<()> {
    let kit = weft_net::client::Kit::read(&args.kit)?;
    let corpus = match &args.corpus {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => data::corpus(&data::data_dir(args.data.clone()), &kit.config.language)?,
    };
    if corpus.is_empty() {
        bail!("the corpus is empty");
    }
    let artifacts = args.artifacts.clone().unwrap_or_else(|| args.kit.join("artifacts"));
    let options =
        weft_net::client::JoinOptions { give_up_after: Duration::from_secs(args.give_up_after), ..Default::default() };
    let id = kit.config.id.clone();
    println!("{id}: joining {} at {}", kit.config.consortium, kit.config.address);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let done =
        runtime.block_on(weft_net::client::join(kit, LocalCorpus::from_bytes(corpus), artifacts.clone(), options))?;
    for r in &done.rounds {
        let outcome = if r.accepted {
            format!("measured, quality {:+.5}", r.quality)
        } else {
            format!("refused: {} ({})", r.code, r.detail)
        };
        println!("{id}: round {} · {} · {:.1} MB sent", r.round, outcome, r.wire_bytes as f64 / 1e6);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&done)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{id}: the consortium is finished; artifacts in {}", artifacts.display());
    Ok(())
}

/// `weft demo --processes`: the demo as one coordinator process and one process per node on
/// this machine, over mutual TLS on loopback.
pub fn demo_processes(
    nodes: &[(String, String)],
    rounds: u64,
    extra_init: &[String],
    data: Option<&Path>,
    json: Option<&Path>,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the weft binary")?;
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let consortium = dir.path().join("consortium");
    let port = free_port()?;
    let mut init = std::process::Command::new(&exe);
    init.args(["consortium", "init"]).arg(&consortium).args(["--address", &format!("127.0.0.1:{port}")]);
    init.args(["--rounds", &rounds.to_string()]).args(extra_init);
    for (id, language) in nodes {
        init.args(["--node", &format!("{id}:{language}")]);
    }
    let status = init.status().context("running weft consortium init")?;
    if !status.success() {
        bail!("weft consortium init failed");
    }
    let mut serve = std::process::Command::new(&exe);
    serve.args(["coordinator", "serve"]).arg(&consortium).args(["--linger-secs", "1"]);
    if let Some(data) = data {
        serve.arg("--data").arg(data);
    }
    if let Some(json) = json {
        serve.arg("--json").arg(json);
    }
    let mut coordinator = serve.spawn().context("starting the coordinator")?;
    let mut children = Vec::new();
    for (id, _) in nodes {
        let mut join = std::process::Command::new(&exe);
        join.args(["node", "join"]).arg(consortium.join("nodes").join(id));
        if let Some(data) = data {
            join.arg("--data").arg(data);
        }
        children.push((id.clone(), join.spawn().with_context(|| format!("starting node {id}"))?));
    }
    let mut failed = Vec::new();
    for (id, mut child) in children {
        if !child.wait().map(|s| s.success()).unwrap_or(false) {
            failed.push(id);
        }
    }
    let served = coordinator.wait().context("waiting for the coordinator")?;
    if !served.success() || !failed.is_empty() {
        bail!("the networked demo failed (coordinator: {served}; failed nodes: {failed:?})");
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// The kit directory to create keys in (private keys never leave it).
    pub kit: PathBuf,
    #[arg(long)]
    pub id: String,
    #[arg(long)]
    pub language: String,
}

pub fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let request = weft_net::provision::keygen(&args.kit, &args.id, &args.language)?;
    println!("{}: keys made in {} (tls.key, signing.key: keep them here)", request.id, args.kit.display());
    println!(
        "send {} to the consortium; put the tls.pem, ca.pem and node.toml it returns into this kit",
        args.kit.join("request.toml").display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct AddNodeArgs {
    /// The consortium directory.
    pub dir: PathBuf,
    /// The site's request.toml (from `weft node keygen`).
    #[arg(long)]
    pub request: PathBuf,
}

pub fn add_node(args: AddNodeArgs) -> anyhow::Result<()> {
    let request: weft_net::provision::MembershipRequest = read_toml(&args.request)?;
    let kit = weft_net::provision::add_node(&args.dir, &request)?;
    println!("{} added to the roster; send back {} (tls.pem, ca.pem, node.toml)", request.id, kit.display());
    println!("the coordinator admits it when it first serves this consortium");
    Ok(())
}
