//! `weft ledger verify | show | prove | check-proof`: the coordinator's tamper-evident ledger.
//! All of them only read: none creates or changes anything.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::Serialize;
use weft_coordinator::{Journal, SqliteJournal};
use weft_core::NodeId;
use weft_ledger::{Chain, ContributionProof, Entry, Event, PublicKey, WitnessedHead};

use crate::say;

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
    /// A ledger head a member witnessed (a node's `witnessed-head.json`): the ledger must hold
    /// it at its place, or it was cut short or rewritten after the member saw it. Repeatable.
    #[arg(long, num_args = 1..)]
    witness: Vec<PathBuf>,
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
    node: NodeId,
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

/// The adapters of a run on a real base (`weft demo --base`), from the configuration its
/// journal stores: the Llama config is all a replay needs to rebuild each round's factors.
pub fn adapter_family(dir: &Path) -> anyhow::Result<Option<weft_llama::LlamaAdapters>> {
    let Ok(journal) = SqliteJournal::read(dir) else { return Ok(None) };
    let Some((config, _)) = journal.load()? else { return Ok(None) };
    let config: serde_json::Value = serde_json::from_slice(&config).context("the journal's configuration")?;
    let base = &config["settings"]["base"];
    if base["family"] != "llama" {
        return Ok(None);
    }
    let llama = weft_llama::LlamaConfig::from_json(&base["config"].to_string())
        .context("the journal's configuration names a Llama base with an unreadable config")?;
    Ok(Some(weft_llama::LlamaAdapters { config: llama }))
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let adapters = adapter_family(&args.dir)?;
    let report = weft_coordinator::verify_with(&args.dir, args.key, adapters.as_ref().map(|a| a as _))
        .with_context(|| format!("{}: verification FAILED", args.dir.display()))?;
    let witnessed = check_witnesses(&args.dir, &args.witness, report.coordinator_key)
        .with_context(|| format!("{}: verification FAILED", args.dir.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            report: &'a weft_coordinator::AuditReport,
            /// The witnessed heads found in the ledger, by file.
            witnessed: &'a [(PathBuf, u64)],
            seconds: f64,
        }
        say!("{}", serde_json::to_string_pretty(&Out { report: &report, witnessed: &witnessed, seconds })?);
        return Ok(());
    }
    let key = report.coordinator_key.map(|k| k.to_string()).unwrap_or_default();
    say!("ledger OK: {} entries, head {}", report.entries, report.head);
    say!(
        "coordinator key {key}{}",
        if args.key.is_some() { " (as trusted)" } else { " (compare it out of band, or pass --key)" }
    );
    say!(
        "{} rounds, {} replayed bit for bit, {} rollbacks; {} blobs ({:.1} MB) checked; final base {}",
        report.rounds,
        report.replayed,
        report.rollbacks,
        report.blobs,
        report.blob_bytes as f64 / 1e6,
        report.final_base_hash
    );
    if report.breaker_trips > 0 {
        say!("circuit breaker: {} trips, each recomputed from the recorded losses", report.breaker_trips);
    }
    if report.proposals > 0 {
        say!(
            "proposals: {} made, {} signed votes checked, {} rule changes applied; every count recomputed",
            report.proposals,
            report.votes,
            report.rule_changes
        );
    }
    if report.promoted + report.refused > 0 {
        say!(
            "gauntlet: {} challengers promoted, {} refused; every verdict recomputed from its per-item losses",
            report.promoted,
            report.refused
        );
    }
    for (file, seq) in &witnessed {
        say!("witness {}: entry #{seq} is in the ledger, as the coordinator signed it", file.display());
    }
    say!("{seconds:.2} s");
    Ok(())
}

/// Reads a witnessed head (a node's `witnessed-head.json`).
pub fn read_witness(path: &Path) -> anyhow::Result<WitnessedHead> {
    let bytes = std::fs::read(path).with_context(|| format!("reading the witnessed head {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a witnessed ledger head", path.display()))
}

/// Checks each witnessed head against the ledger in `dir`, signed by `key`: the sequence
/// number of each head found.
pub fn check_witnesses(dir: &Path, files: &[PathBuf], key: Option<PublicKey>) -> anyhow::Result<Vec<(PathBuf, u64)>> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let entries = checked_entries(dir)?;
    let key = key.context("the ledger names no coordinator key")?;
    let mut found = Vec::new();
    for file in files {
        let head = read_witness(file)?;
        head.check(&key, &entries).with_context(|| format!("witness {}", file.display()))?;
        found.push((file.clone(), head.seq));
    }
    Ok(found)
}

/// Reads and checks every entry (`show` and `prove` never present an unchecked ledger).
pub fn checked_entries(dir: &Path) -> anyhow::Result<Vec<Entry>> {
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
        say!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    for entry in &entries {
        let seq = entry.seq;
        match &entry.event {
            Event::ConsortiumCreated { coordinator_key, roster, base_hash, config_hash, .. } => {
                say!("#{seq} consortium created · key {coordinator_key} · config {}", config_hash.short());
                let members: Vec<String> = roster.iter().map(|(n, l)| format!("{n} ({l})")).collect();
                say!("     roster: {} · base {}", members.join(", "), base_hash.short());
            }
            Event::RoundOpened { round, base_hash, adapter, .. } => match adapter {
                Some(adapter) => say!("\n#{seq} round {round} opened on base {} · {adapter}", base_hash.short()),
                None => say!("\n#{seq} round {round} opened on base {}", base_hash.short()),
            },
            Event::ContributionReceived { node, delta_hash, refused, .. } => match (delta_hash, refused) {
                (_, Some(r)) => say!("#{seq}   {node:<14} refused   {}: {}", r.code, r.detail),
                (Some(h), None) => say!("#{seq}   {node:<14} received  delta {}", h.short()),
                (None, None) => say!("#{seq}   {node:<14} received"),
            },
            Event::PrivacyCharged {
                node,
                epsilon_round,
                epsilon_total,
                delta,
                budget,
                rounds_charged,
                noise_multiplier,
                sample_rate,
                ..
            } => {
                say!(
                    "#{seq}   {node:<14} charged   ε {epsilon_round:.3} this round · ε {epsilon_total:.3} of {budget} over {rounds_charged} round(s) (δ {delta:e}; σ {noise_multiplier:.4}, q {sample_rate})"
                );
            }
            Event::CommunitiesDrawn { communities, seed, .. } => {
                say!("#{seq}   communities drawn from seed {} (secure aggregation):", seed.short());
                for (community, members) in communities {
                    say!("       {community:<14} {}", members.join(", "));
                }
            }
            Event::Evaluation { node, quality, heldout_loss, .. } => {
                let losses: Vec<String> = heldout_loss
                    .iter()
                    .map(|(l, v)| format!("{l} {}", v.map_or("—".into(), |v| format!("{v:.4}"))))
                    .collect();
                let q = quality.map_or("unmeasurable".into(), |q| format!("{:+.2}%", 100.0 * q));
                say!("#{seq}   {node:<14} measured  quality {q} · held-out {}", losses.join(" "));
            }
            Event::Decision {
                accepted, rejected, unassigned, aggregator, contributions_root, language_check, ..
            } => {
                say!(
                    "#{seq}   decision ({aggregator}; unassigned {unassigned:.3}; contributions root {})",
                    contributions_root.short()
                );
                for a in accepted {
                    let capped = if a.capped { " (capped)" } else { "" };
                    say!(
                        "       {:<14} accepted  weight {:.4}{capped} · influence {:.4}",
                        a.node,
                        a.weight,
                        a.influence
                    );
                }
                for r in rejected {
                    say!("       {:<14} rejected  {}: {}", r.node, r.code, r.detail);
                }
                if let Some(check) = language_check {
                    for line in crate::table::language_check(check) {
                        say!("       {line}");
                    }
                }
            }
            Event::ChallengerJudged {
                round, champion_hash, challenger_hash, seed, rules, verdict, items_hash, ..
            } => {
                let word = if verdict.outcome.promoted() { "PROMOTED" } else { "REFUSED" };
                say!(
                    "#{seq} round {round} challenger {} {word} against champion {} (items {}, seed {seed})",
                    challenger_hash.short(),
                    champion_hash.short(),
                    items_hash.short()
                );
                for line in crate::table::gauntlet(rules, verdict) {
                    say!("       {line}");
                }
            }
            Event::BreakerTripped { round, anchor_round, rules, risen, .. } => {
                let rises: Vec<String> = risen.iter().map(|(l, r)| format!("{l} +{:.2}%", 100.0 * r)).collect();
                say!(
                    "\n#{seq} CIRCUIT BREAKER at the close of round {round}: {} over round {anchor_round}'s base (threshold {:.1}%, watched {} rounds) — rolling back",
                    rises.join(", "),
                    100.0 * rules.threshold,
                    rules.watch_rounds
                );
            }
            Event::ProposalMade {
                proposal,
                proposer,
                rationale,
                change,
                electorate,
                tally_after_round,
                voting,
                ..
            } => {
                say!(
                    "\n#{seq} PROPOSAL {} by {proposer}: {} — \"{rationale}\"",
                    proposal.short(),
                    serde_json::to_string(change)?
                );
                say!(
                    "       {} members may vote until round {tally_after_round} closes; passes with {:.0}% of the votes and {:.0}% turnout, applies {} round(s) after",
                    electorate.len(),
                    100.0 * voting.supermajority,
                    100.0 * voting.quorum,
                    voting.timelock_rounds
                );
            }
            Event::VoteCast { proposal, voter, approve, .. } => {
                let side = if *approve { "yes" } else { "no" };
                say!("#{seq}   {voter:<14} voted {side:<3} on proposal {} (signed)", proposal.short());
            }
            Event::ProposalTallied { proposal, round, tally, effective_round } => {
                let outcome = match effective_round {
                    Some(at) => format!("PASSED: takes effect when round {at} opens"),
                    None if !tally.quorum_met => "FAILED: no quorum".to_owned(),
                    None => "FAILED: no supermajority".to_owned(),
                };
                say!(
                    "#{seq} round {round} proposal {} counted: yes {} · no {} · turnout {:.0}% · approval {:.0}% → {outcome}",
                    proposal.short(),
                    tally.yes,
                    tally.no,
                    100.0 * tally.turnout,
                    100.0 * tally.approval
                );
            }
            Event::RulesChanged { proposal, round, policy, .. } => {
                say!(
                    "\n#{seq} RULES CHANGED by proposal {} from round {round}: cap {} · floor {} · quorum {}",
                    proposal.short(),
                    policy.cap,
                    policy.floor,
                    policy.quorum
                );
            }
            Event::BasePublished { round, base_hash, heldout_loss, .. } => {
                let losses: Vec<String> = heldout_loss
                    .iter()
                    .map(|(l, v)| format!("{l} {}", v.map_or("—".into(), |v| format!("{v:.4}"))))
                    .collect();
                say!("#{seq} round {round} published base {} · held-out {}", base_hash.short(), losses.join(" "));
            }
            Event::RolledBack { to_round, after_round, base_hash, .. } => {
                say!(
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
    let proof = ContributionProof::build(&entries, args.node.as_str(), args.round)?;
    proof.check(None).context("the proof built does not check")?;
    let json = serde_json::to_string_pretty(&proof)?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
            say!("proof of {}'s contribution to round {} written to {}", args.node, args.round, path.display());
        }
        None => say!("{json}"),
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
            say!(
                "proof OK: {node}'s contribution to round {round} (delta {delta}) is entry {} of the ledger",
                proof.received.seq
            );
        }
    }
    if let Some(proof) = proofs.first() {
        say!("signed by {}{}", proof.coordinator_key, if args.key.is_some() { " (as trusted)" } else { "" });
    }
    Ok(())
}
