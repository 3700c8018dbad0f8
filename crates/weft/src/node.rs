//! `weft node join | keygen | export`: a node's side.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use weft_core::NodeId;
use weft_ledger::{ContributionProof, Event};
use weft_net::client::LocalTrainer;
use weft_net::config::{KitFiles, KitTrainer};
use weft_node::{ExternalCommand, LocalCorpus, SovereignArtifact};

use crate::ledger::checked_entries;
use crate::{data, say};

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Take part in a consortium from a startup kit: dial out, train each round, upload.
    Join(JoinArgs),
    /// Make this node's keys on site and the public request to send to the consortium.
    Keygen(KeygenArgs),
    /// Bundle a node's sovereign artifacts with ledger proofs of its contributions.
    Export(ExportArgs),
}

pub fn run(command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::Join(args) => join(args),
        NodeCommand::Keygen(args) => keygen(args),
        NodeCommand::Export(args) => export(args),
    }
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
    /// Train each round with this command instead of the built-in trainer (run with `sh -c` in
    /// this directory, `WEFT_JOB` naming the round's job.json; README: "Bring your own
    /// trainer"). Overrides `[trainer]` in the kit's node.toml.
    #[arg(long)]
    pub trainer: Option<String>,
    /// Seconds the external trainer has per round before it is stopped [default: 600].
    #[arg(long)]
    pub trainer_deadline_secs: Option<u64>,
    /// The largest L2 norm of the change accepted from the external trainer: of the weights in a
    /// full-weight consortium (the built-in trainer's rounds change the default demo model by
    /// 6.8–11.4), of the adapter's factors on a pretrained base [default: 100].
    #[arg(long)]
    pub trainer_max_change: Option<f64>,
}

/// The node's external trainer, from the command line over `[trainer]` in node.toml; `None`
/// for the built-in trainer.
fn external_trainer(args: &JoinArgs, kit: Option<&KitTrainer>) -> anyhow::Result<Option<ExternalCommand>> {
    let (source, command) = match (&args.trainer, kit) {
        (Some(command), _) => ("--trainer", command.clone()),
        (None, Some(kit)) => ("node.toml [trainer] command", kit.command.clone()),
        (None, None) => {
            if args.trainer_deadline_secs.is_some() || args.trainer_max_change.is_some() {
                bail!("--trainer-deadline-secs and --trainer-max-change need a trainer: --trainer or [trainer] in node.toml");
            }
            return Ok(None);
        }
    };
    if command.trim().is_empty() {
        bail!("{source}: the command is empty");
    }
    let deadline = args.trainer_deadline_secs.or(kit.and_then(|k| k.deadline_secs)).unwrap_or(600);
    if deadline == 0 {
        bail!(
            "the trainer's deadline (--trainer-deadline-secs or node.toml [trainer] deadline_secs) must be at least 1"
        );
    }
    let max_change = args.trainer_max_change.or(kit.and_then(|k| k.max_change)).unwrap_or(100.0);
    if !(max_change > 0.0 && max_change.is_finite()) {
        bail!("the trainer's bound (--trainer-max-change or node.toml [trainer] max_change) must be a positive number, got {max_change}");
    }
    Ok(Some(ExternalCommand { command, deadline: Duration::from_secs(deadline), max_change_norm: max_change }))
}

fn join(args: JoinArgs) -> anyhow::Result<()> {
    let kit = weft_net::client::Kit::read(&args.kit)?;
    let corpus = match &args.corpus {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => data::corpus(&data::data_dir(args.data.clone()), &kit.config.language)?,
    };
    if corpus.is_empty() {
        bail!("the corpus is empty");
    }
    let artifacts = args.artifacts.clone().unwrap_or_else(|| args.kit.join(KitFiles::ARTIFACTS));
    let external = external_trainer(&args, kit.config.trainer.as_ref())?;
    let trainer = match (&kit.config.base, external) {
        (None, None) => LocalTrainer::ByteGpt(LocalCorpus::from_bytes(corpus)),
        (None, Some(external)) => LocalTrainer::External(LocalCorpus::from_bytes(corpus), external),
        (Some(base), external) => {
            // The data directory's corpus is also where the coordinator's held-out text comes
            // from (its tail): the node trains on the head only. A --corpus is the node's own.
            let text = match &args.corpus {
                Some(path) => String::from_utf8(corpus).with_context(|| format!("{} is not UTF-8", path.display()))?,
                None => crate::realbase::training_head(&corpus)?,
            };
            match external {
                None => crate::realbase::node_trainer(&args.kit.join(base), &text)?,
                Some(external) => crate::realbase::external_node_trainer(
                    &args.kit.join(base),
                    text,
                    external,
                    &artifacts.join("jobs"),
                    kit.config.id.as_str(),
                )?,
            }
        }
    };
    let options =
        weft_net::client::JoinOptions { give_up_after: Duration::from_secs(args.give_up_after), ..Default::default() };
    let id = kit.config.id.clone();
    say!("{id}: joining {} at {}", kit.config.consortium, kit.config.address);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let done = runtime.block_on(weft_net::client::join(kit, trainer, artifacts.clone(), options))?;
    for r in &done.rounds {
        let outcome = if let (true, Some(community)) = (r.accepted, &r.community) {
            format!("masked into {community}'s sum, measured: quality {:+.2}%", 100.0 * r.quality)
        } else if r.accepted {
            format!("measured, quality {:+.2}%", 100.0 * r.quality)
        } else if r.code == weft_net::client::TRAINER_FAILED {
            format!("nothing sent: {}", r.detail)
        } else {
            format!("refused: {} ({})", r.code, r.detail)
        };
        say!("{id}: round {} · {} · {:.1} MB sent", r.round, outcome, r.wire_bytes as f64 / 1e6);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&done)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    say!("{id}: the consortium is finished; artifacts in {}", artifacts.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// The kit directory to create keys in (private keys never leave it).
    pub kit: PathBuf,
    #[arg(long)]
    pub id: NodeId,
    #[arg(long)]
    pub language: String,
}

fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let request = weft_net::provision::keygen(&args.kit, &args.id, &args.language)?;
    say!("{}: keys made in {} (tls.key, signing.key: keep them here)", request.id, args.kit.display());
    say!(
        "send {} to the consortium; put the tls.pem, ca.pem and node.toml it returns into this kit",
        args.kit.join("request.toml").display()
    );
    Ok(())
}

/// Copies a kept directory (and its sub-directories: `sovereign/round-NNNN/`), leaving out
/// files a crash left half-written.
fn copy_kept(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for file in std::fs::read_dir(from)?.filter_map(Result::ok) {
        let path = file.path();
        if path.is_dir() {
            copy_kept(&path, &to.join(file.file_name()))?;
        } else if !file.file_name().to_string_lossy().contains(".tmp.") {
            std::fs::copy(&path, to.join(file.file_name())).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// `weft node export NODE_DIR --coordinator DIR --node ID --out BUNDLE`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The node's artifact directory (its round-NNNN/ folders).
    node_dir: PathBuf,
    /// The coordinator's storage directory, for the ledger proofs.
    #[arg(long)]
    coordinator: PathBuf,
    #[arg(long)]
    node: NodeId,
    /// The bundle directory to write (must not exist).
    #[arg(long)]
    out: PathBuf,
}

/// The node's right to exit with its work: its sovereign artifacts with a ledger proof for
/// every contribution it made.
fn export(args: ExportArgs) -> anyhow::Result<()> {
    if args.out.exists() {
        bail!("{} exists; choose a new bundle directory", args.out.display());
    }
    if !args.node_dir.is_dir() {
        bail!("{} is not a node's artifact directory", args.node_dir.display());
    }
    // Every round the node kept (a byte-model artifact or an adapter, each with its manifest),
    // and its private adapter on a pretrained base.
    let mut kept = Vec::new();
    for entry in std::fs::read_dir(&args.node_dir).with_context(|| format!("reading {}", args.node_dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with("round-") && path.join(SovereignArtifact::MANIFEST_FILE).is_file() {
            kept.push(path);
        }
    }
    kept.sort();
    let rounds_kept = kept.len();
    let sovereign = args.node_dir.join("sovereign");
    if sovereign.is_dir() {
        kept.push(sovereign);
    }
    let entries = checked_entries(&args.coordinator)?;
    // The last head the node witnessed must still be in the ledger: proofs from a ledger cut
    // short after the node saw it would leave rounds out without a word.
    let witness = args.node_dir.join(weft_net::witness::WITNESS_FILE);
    let witnessed = if witness.is_file() {
        let key = match entries.first().map(|e| &e.event) {
            Some(Event::ConsortiumCreated { coordinator_key, .. }) => *coordinator_key,
            _ => bail!("{}: the ledger has no genesis", args.coordinator.display()),
        };
        let head = crate::ledger::read_witness(&witness)?;
        head.check(&key, &entries).with_context(|| {
            format!("{}: the coordinator's ledger does not hold the head this node witnessed", witness.display())
        })?;
        Some(witness)
    } else {
        None
    };
    let mut rounds: Vec<u64> = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::ContributionReceived { node, round, .. } if args.node == node.as_str() => Some(*round),
            _ => None,
        })
        .collect();
    rounds.dedup();
    let mut proofs = Vec::new();
    for round in &rounds {
        match ContributionProof::build(&entries, args.node.as_str(), *round) {
            Ok(proof) => proofs.push(proof),
            Err(weft_ledger::ProveError::Undecided(_)) => {} // the open round: nothing to prove yet
            Err(e) => return Err(e.into()),
        }
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    for dir in &kept {
        let Some(name) = dir.file_name() else { continue };
        copy_kept(dir, &args.out.join(name))?;
    }
    std::fs::write(args.out.join("proofs.json"), serde_json::to_vec_pretty(&proofs)?)?;
    if let Some(witness) = &witnessed {
        std::fs::copy(witness, args.out.join(weft_net::witness::WITNESS_FILE))
            .with_context(|| format!("copying {}", witness.display()))?;
    }
    say!(
        "{}: {} rounds of artifacts and {} ledger proofs (check each with `weft ledger check-proof`) in {}",
        args.node,
        rounds_kept,
        proofs.len(),
        args.out.display()
    );
    Ok(())
}
