//! `weft ledger …`: verify, show, prove, check-proof.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::Serialize;
use weft_coordinator::{Journal, SqliteJournal};
use weft_ledger::{Chain, ContributionProof, Entry, Event, PublicKey};

#[derive(Subcommand)]
pub enum LedgerCommand {
    /// Check the hash chain, every signature and Merkle root and every stored blob, and replay
    /// every round's aggregation to recompute each base hash. Names the first broken entry.
    Verify(VerifyArgs),
    /// The round-by-round history: who contributed, what was accepted and why, which base came out.
    Show(ShowArgs),
    /// Write a proof that a node's contribution to a round is in the ledger.
    Prove(ProveArgs),
    /// Check a proof written by `weft ledger prove` (no access to the ledger needed).
    CheckProof(CheckProofArgs),
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Coordinator storage directory (state.sqlite, blobs/), e.g. OUT/coordinator of a demo.
    dir: PathBuf,
    /// The coordinator's public key (64 hex digits); without it the key in the first entry is
    /// used and printed, to be compared out of band.
    #[arg(long)]
    key: Option<PublicKey>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ShowArgs {
    dir: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ProveArgs {
    dir: PathBuf,
    #[arg(long)]
    node: String,
    #[arg(long)]
    round: u64,
    /// Write the proof here (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub struct CheckProofArgs {
    file: PathBuf,
    /// The coordinator's public key the proof must be signed with.
    #[arg(long)]
    key: Option<PublicKey>,
}

pub fn run(command: LedgerCommand) -> anyhow::Result<()> {
    match command {
        LedgerCommand::Verify(args) => verify(args),
        LedgerCommand::Show(args) => show(args),
        LedgerCommand::Prove(args) => prove(args),
        LedgerCommand::CheckProof(args) => check_proof(args),
    }
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let report = weft_coordinator::verify(&args.dir, args.key)
        .with_context(|| format!("{}: verification FAILED", args.dir.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            report: &'a weft_coordinator::AuditReport,
            seconds: f64,
        }
        println!("{}", serde_json::to_string_pretty(&Out { report: &report, seconds })?);
        return Ok(());
    }
    let key = report.coordinator_key.map(|k| k.to_string()).unwrap_or_default();
    println!("ledger OK: {} entries, head {}", report.entries, report.head);
    println!(
        "coordinator key {key}{}",
        if args.key.is_some() { " (as trusted)" } else { " (compare it out of band, or pass --key)" }
    );
    println!(
        "{} rounds, {} replayed bit for bit, {} rollbacks; {} blobs ({:.1} MB) checked; final base {}",
        report.rounds,
        report.replayed,
        report.rollbacks,
        report.blobs,
        report.blob_bytes as f64 / 1e6,
        report.final_base_hash
    );
    println!("{seconds:.2} s");
    Ok(())
}

/// Reads and checks every entry (`show` and `prove` never present an unchecked ledger).
fn checked_entries(dir: &Path) -> anyhow::Result<Vec<Entry>> {
    let journal = SqliteJournal::read(dir)?;
    let mut chain = Chain::new(None);
    let mut entries = Vec::new();
    for line in journal.ledger()? {
        entries.push(chain.check(&line).context("the ledger is broken; run `weft ledger verify` for details")?);
    }
    if entries.is_empty() {
        bail!("{}: the ledger is empty", dir.display());
    }
    Ok(entries)
}

fn show(args: ShowArgs) -> anyhow::Result<()> {
    let entries = checked_entries(&args.dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    for entry in &entries {
        let seq = entry.seq;
        match &entry.event {
            Event::ConsortiumCreated { coordinator_key, roster, base_hash, config_hash, .. } => {
                println!("#{seq} consortium created · key {coordinator_key} · config {}", config_hash.short());
                let members: Vec<String> = roster.iter().map(|(n, l)| format!("{n} ({l})")).collect();
                println!("     roster: {} · base {}", members.join(", "), base_hash.short());
            }
            Event::RoundOpened { round, base_hash, .. } => {
                println!("\n#{seq} round {round} opened on base {}", base_hash.short())
            }
            Event::ContributionReceived { node, delta_hash, refused, .. } => match (delta_hash, refused) {
                (_, Some(r)) => println!("#{seq}   {node:<14} refused   {}: {}", r.code, r.detail),
                (Some(h), None) => println!("#{seq}   {node:<14} received  delta {}", h.short()),
                (None, None) => println!("#{seq}   {node:<14} received"),
            },
            Event::Evaluation { node, quality, heldout_loss, .. } => {
                let losses: Vec<String> = heldout_loss
                    .iter()
                    .map(|(l, v)| format!("{l} {}", v.map_or("—".into(), |v| format!("{v:.4}"))))
                    .collect();
                let q = quality.map_or("unmeasurable".into(), |q| format!("{q:+.5}"));
                println!("#{seq}   {node:<14} measured  quality {q} · held-out {}", losses.join(" "));
            }
            Event::Decision { accepted, rejected, unassigned, aggregator, contributions_root, .. } => {
                println!(
                    "#{seq}   decision ({aggregator}; unassigned {unassigned:.3}; contributions root {})",
                    contributions_root.short()
                );
                for a in accepted {
                    let capped = if a.capped { " (capped)" } else { "" };
                    println!(
                        "       {:<14} accepted  weight {:.4}{capped} · influence {:.4}",
                        a.node, a.weight, a.influence
                    );
                }
                for r in rejected {
                    println!("       {:<14} rejected  {}: {}", r.node, r.code, r.detail);
                }
            }
            Event::BasePublished { round, base_hash, heldout_loss, .. } => {
                let losses: Vec<String> = heldout_loss
                    .iter()
                    .map(|(l, v)| format!("{l} {}", v.map_or("—".into(), |v| format!("{v:.4}"))))
                    .collect();
                println!("#{seq} round {round} published base {} · held-out {}", base_hash.short(), losses.join(" "));
            }
            Event::RolledBack { to_round, after_round, base_hash, .. } => {
                println!(
                    "\n#{seq} ROLLED BACK after round {after_round} to the base of round {to_round} ({})",
                    base_hash.short()
                );
            }
        }
    }
    Ok(())
}

fn prove(args: ProveArgs) -> anyhow::Result<()> {
    let entries = checked_entries(&args.dir)?;
    let proof = ContributionProof::build(&entries, &args.node, args.round)?;
    proof.check(None).context("the proof built does not check")?;
    let json = serde_json::to_string_pretty(&proof)?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
            println!("proof of {}'s contribution to round {} written to {}", args.node, args.round, path.display());
        }
        None => println!("{json}"),
    }
    Ok(())
}

fn check_proof(args: CheckProofArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    // One proof (`weft ledger prove`) or a list of them (`proofs.json` of `weft node export`).
    let proofs: Vec<ContributionProof> = serde_json::from_slice::<ContributionProof>(&bytes)
        .map(|p| vec![p])
        .or_else(|_| serde_json::from_slice(&bytes))
        .with_context(|| format!("{}: not a contribution proof or a list of them", args.file.display()))?;
    for (i, proof) in proofs.iter().enumerate() {
        proof.check(args.key).with_context(|| format!("{}: proof {} REJECTED", args.file.display(), i + 1))?;
        if let Event::ContributionReceived { node, round, delta_hash, .. } = &proof.received.event {
            let delta = delta_hash.map_or("refused".into(), |h| h.to_string());
            println!(
                "proof OK: {node}'s contribution to round {round} (delta {delta}) is entry {} of the ledger",
                proof.received.seq
            );
        }
    }
    if let Some(proof) = proofs.first() {
        println!("signed by {}{}", proof.coordinator_key, if args.key.is_some() { " (as trusted)" } else { "" });
    }
    Ok(())
}

/// `weft coordinator rollback DIR --to-round K`.
#[derive(Args)]
pub struct RollbackArgs {
    /// Coordinator storage directory.
    dir: PathBuf,
    /// The round whose base becomes current again (0: the initial base).
    #[arg(long)]
    to_round: u64,
}

pub fn rollback(args: RollbackArgs) -> anyhow::Result<()> {
    let mut journal = SqliteJournal::open(&args.dir)?;
    let store = weft_coordinator::BlobStore::open(args.dir.join("blobs"))?;
    let (head, entry) = weft_coordinator::roll_back(&mut journal, &store, args.to_round)?;
    println!(
        "rolled back to the base of round {} ({}); ledger entry {}. Nothing was deleted: roll forward with --to-round {}",
        args.to_round, head.base_hash, entry.seq, head.round
    );
    Ok(())
}

/// `weft node export NODE_DIR --coordinator DIR --node ID --out BUNDLE`.
#[derive(Args)]
pub struct ExportArgs {
    /// The node's artifact directory (its round-NNNN/ folders).
    node_dir: PathBuf,
    /// The coordinator's storage directory, for the ledger proofs.
    #[arg(long)]
    coordinator: PathBuf,
    #[arg(long)]
    node: String,
    /// The bundle directory to write (must not exist).
    #[arg(long)]
    out: PathBuf,
}

/// The node's right to exit with its work: its sovereign artifacts with a ledger proof for
/// every contribution it made.
pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    if args.out.exists() {
        bail!("{} exists; choose a new bundle directory", args.out.display());
    }
    let entries = checked_entries(&args.coordinator)?;
    let mut rounds: Vec<u64> = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::ContributionReceived { node, round, .. } if *node == args.node => Some(*round),
            _ => None,
        })
        .collect();
    rounds.dedup();
    let mut proofs = Vec::new();
    for round in &rounds {
        match ContributionProof::build(&entries, &args.node, *round) {
            Ok(proof) => proofs.push(proof),
            Err(weft_ledger::ProveError::Undecided(_)) => {} // the open round: nothing to prove yet
            Err(e) => return Err(e.into()),
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let mut copied = 0;
    let mut dirs: Vec<_> = std::fs::read_dir(&args.node_dir)
        .with_context(|| format!("reading {}", args.node_dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("round-") && e.path().join("manifest.json").is_file())
        .collect();
    dirs.sort_by_key(|e| e.file_name());
    for dir in dirs {
        let target = args.out.join(dir.file_name());
        std::fs::create_dir_all(&target)?;
        for file in std::fs::read_dir(dir.path())?.filter_map(Result::ok) {
            if !file.file_name().to_string_lossy().contains(".tmp.") {
                std::fs::copy(file.path(), target.join(file.file_name()))?;
            }
        }
        copied += 1;
    }
    std::fs::write(args.out.join("proofs.json"), serde_json::to_vec_pretty(&proofs)?)?;
    println!(
        "{}: {copied} rounds of artifacts and {} ledger proofs (check each with `weft ledger check-proof`) in {}",
        args.node,
        proofs.len(),
        args.out.display()
    );
    Ok(())
}
