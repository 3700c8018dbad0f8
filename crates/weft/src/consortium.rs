//! `weft consortium init | add-node`: provision a networked consortium.

use std::path::PathBuf;

use anyhow::bail;
use anyhow::Context;
use clap::{Args, Subcommand};
use weft_core::NodeId;
use weft_net::config::{read_toml, AdapterSettings, ConsortiumConfig, PretrainedBase, Training};
use weft_net::encoding::Encoding;

use crate::args::RunArgs;
use crate::run::{setting_error, RunSettings, Source};
use crate::{data, say};

#[derive(Subcommand)]
pub enum ConsortiumCommand {
    /// Create a consortium: CA, coordinator identity, one startup kit per node, roster, config.
    Init(Box<InitArgs>),
    /// Admit a node that made its own keys (`weft node keygen`): certify it, add it to the roster.
    AddNode(AddNodeArgs),
}

pub fn run(command: ConsortiumCommand) -> anyhow::Result<()> {
    match command {
        ConsortiumCommand::Init(args) => init(*args),
        ConsortiumCommand::AddNode(args) => add_node(args),
    }
}

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
    /// f32 (lossless), f16, bf16, int8.
    #[arg(long, default_value = "f32")]
    pub encoding: Encoding,
    /// Seconds a round stays open for late nodes.
    #[arg(long, default_value_t = 600)]
    pub deadline_secs: u64,
    #[command(flatten)]
    pub run: RunArgs,
    /// Adopt a pretrained base instead of training the byte model: `smollm2-135m` (fetched and
    /// imported on first use) or a directory written by `weft model import`. Contributions are
    /// then adapters (the --adapter-* flags; --rounds defaults to 2); each kit gets the base's
    /// config.json and tokenizer.json, and nodes fetch its weights from the coordinator.
    #[arg(long)]
    pub base: Option<String>,
    #[command(flatten)]
    pub adapter: crate::realbase::AdapterArgs,
    /// Data directory where `smollm2-135m` is fetched and imported (default: the repository's data/).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let nodes: Vec<(NodeId, String)> = args
        .nodes
        .iter()
        .map(|spec| {
            let (id, language) = spec.split_once(':').unwrap_or((spec, spec));
            Ok((NodeId::new(id).with_context(|| format!("--node {spec}"))?, language.to_owned()))
        })
        .collect::<anyhow::Result<_>>()?;
    // The coordinator measures each member's language on held-out text it must be able to find;
    // a language it has none for is refused here, before anything is written, not at `serve`.
    let data_dir = data::data_dir(args.data.clone());
    for (id, language) in &nodes {
        data::check_heldout_source(&data_dir, language, args.base.is_some())
            .with_context(|| format!("--node {id}:{language}"))?;
    }
    let mut sections = args.run.sections()?;
    // Checked as a run before anything is written.
    let run = RunSettings::new(sections.clone(), nodes.clone()).map_err(|e| setting_error(e, Source::Flags))?;
    let mut model = Some(sections.model);
    let mut base = None;
    if let Some(name) = &args.base {
        let (pretrained, training) = pretrained_base(&args, name, &run)?;
        sections.rounds = args.run.rounds.unwrap_or(2);
        sections.training = training;
        model = None;
        base = Some(pretrained);
    }
    let config = ConsortiumConfig {
        name: args.name.clone(),
        address: args.address.clone(),
        server_name: "weft-coordinator".into(),
        rounds: sections.rounds,
        seed: sections.seed,
        round_deadline_secs: args.deadline_secs,
        encoding: args.encoding,
        storage: "coordinator".into(),
        model,
        base,
        training: sections.training,
        policy: sections.policy,
        governance: sections.governance,
        privacy: sections.privacy,
        gauntlet: sections.gauntlet,
        voting: sections.voting,
        breaker: sections.breaker,
    };
    config.validate().map_err(|e| setting_error(e, Source::Flags))?;
    let roster = weft_net::provision::init(&args.dir, &config, &nodes)?;
    say!("consortium '{}' created in {}", config.name, args.dir.display());
    for m in &roster.node {
        say!("  {:<14} {:<6} kit {}", m.id.as_str(), m.language, args.dir.join("nodes").join(m.id.as_str()).display());
    }
    say!(
        "edit {} as needed, then: weft coordinator serve {}",
        args.dir.join("consortium.toml").display(),
        args.dir.display()
    );
    say!("send each node its kit (nodes/<id>/); keep ca.key offline");
    Ok(())
}

/// `[base]` and `[training]` of a consortium on a pretrained base, checked against the model.
fn pretrained_base(args: &InitArgs, name: &str, run: &RunSettings) -> anyhow::Result<(PretrainedBase, Training)> {
    if !matches!(run.outer, weft_core::OuterOptimizer::Plain { .. }) {
        bail!("--outer: adapter rounds take the plain outer optimizer (adapters of different rounds share no coordinates)");
    }
    let (plan, training) = args.adapter.checked(run.seed())?;
    if let Some(why) = plan.refuses(&run.aggregator) {
        bail!("--aggregator: {why}");
    }
    let data_dir = data::data_dir(args.data.clone());
    let (name, dir) = crate::realbase::resolve_base(name, &data_dir)?;
    let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
    let (config, _, state) = crate::model::read_imported(&dir)?;
    crate::realbase::fits_model(&plan, &training, &config)?;
    let base = PretrainedBase {
        name,
        dir,
        state_hash: state.content_hash(),
        context: training.context,
        heldout_bytes: args.adapter.heldout_bytes,
        adapter: AdapterSettings { rank: plan.rank, alpha: plan.alpha, targets: plan.targets, track: plan.track },
    };
    Ok((base, Training { local_steps: training.steps, batch: training.batch, lr: training.lr }))
}

#[derive(Args, Debug)]
pub struct AddNodeArgs {
    /// The consortium directory.
    pub dir: PathBuf,
    /// The site's request.toml (from `weft node keygen`).
    #[arg(long)]
    pub request: PathBuf,
}

fn add_node(args: AddNodeArgs) -> anyhow::Result<()> {
    let request: weft_net::provision::MembershipRequest = read_toml(&args.request)?;
    let kit = weft_net::provision::add_node(&args.dir, &request)?;
    say!("{} added to the roster; send back {} (tls.pem, ca.pem, node.toml)", request.id, kit.display());
    say!("the coordinator admits it when it first serves this consortium");
    Ok(())
}
