//! `weft proposal create | vote | show | tally`: class-3 changes of a consortium's rules.
//! `create` and `vote` speak to the coordinator with a node's kit (mutual TLS; each message signed
//! with the member's key); `show` and `tally` only read a coordinator's ledger.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::Serialize;
use weft_coordinator::{Journal, ProposalBook, SqliteJournal};
use weft_core::{ContentHash, Policy, RuleChange, Tally, VotingRules};
use weft_ledger::Event;

use crate::ledger::checked_entries;
use crate::say;

#[derive(Subcommand)]
pub enum ProposalCommand {
    /// Propose a change of the cap, floor or quorum, as the member whose kit this is.
    Create(CreateArgs),
    /// Vote on an open proposal, as the member whose kit this is.
    Vote(VoteArgs),
    /// Every proposal in a coordinator's ledger: its change, rationale, votes and outcome.
    Show(ReadArgs),
    /// Count every proposal again from the ledger's signed votes (open ones: the count so far).
    Tally(ReadArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// The node's kit directory (node.toml, keys).
    kit: PathBuf,
    #[arg(long, allow_negative_numbers = true)]
    cap: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    floor: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    quorum: Option<f64>,
    /// Why: recorded in the ledger with the change.
    #[arg(long)]
    rationale: String,
}

#[derive(Args)]
pub struct VoteArgs {
    kit: PathBuf,
    /// The proposal's id (64 hex digits; `weft proposal show` lists them).
    #[arg(long)]
    proposal: ContentHash,
    #[arg(long, conflicts_with = "no", required_unless_present = "no")]
    yes: bool,
    #[arg(long)]
    no: bool,
}

#[derive(Args)]
pub struct ReadArgs {
    /// A coordinator's storage directory.
    dir: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn run(command: ProposalCommand) -> anyhow::Result<()> {
    match command {
        ProposalCommand::Create(args) => create(args),
        ProposalCommand::Vote(args) => vote(args),
        ProposalCommand::Show(args) => show(&args.dir, args.json, false),
        ProposalCommand::Tally(args) => show(&args.dir, args.json, true),
    }
}

fn answered(outcome: weft_net::client::ProposalOutcome, what: &str) -> anyhow::Result<()> {
    if !outcome.accepted {
        bail!("{what} refused: {} ({})", outcome.code, outcome.detail);
    }
    say!("{what} recorded: proposal {}", outcome.proposal);
    Ok(())
}

fn create(args: CreateArgs) -> anyhow::Result<()> {
    let change = RuleChange { cap: args.cap, floor: args.floor, quorum: args.quorum };
    if change.is_empty() {
        bail!("give the change: --cap, --floor and/or --quorum");
    }
    let kit = weft_net::client::Kit::read(&args.kit)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let outcome = runtime.block_on(weft_net::client::propose(&kit, &change, &args.rationale))?;
    answered(outcome, "proposal")
}

fn vote(args: VoteArgs) -> anyhow::Result<()> {
    let kit = weft_net::client::Kit::read(&args.kit)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let outcome = runtime.block_on(weft_net::client::vote(&kit, args.proposal, args.yes && !args.no))?;
    answered(outcome, if args.yes { "vote yes" } else { "vote no" })
}

/// One proposal as the ledger tells it.
#[derive(Serialize)]
struct Shown {
    proposal: ContentHash,
    proposer: String,
    rationale: String,
    change: RuleChange,
    after_round: u64,
    tally_after_round: u64,
    electorate: usize,
    votes: std::collections::BTreeMap<String, bool>,
    /// The recorded count (closed) or the count so far (open), recomputed from the votes.
    tally: Tally,
    status: String,
}

/// The consortium's voting rules and genesis policy, from its stored configuration.
fn book(dir: &Path) -> anyhow::Result<ProposalBook> {
    let journal = SqliteJournal::read(dir)?;
    let (config, _) = journal.load()?.with_context(|| format!("{}: no consortium here", dir.display()))?;
    let config: serde_json::Value = serde_json::from_slice(&config).context("the stored configuration")?;
    let voting: VotingRules = match config.get("voting") {
        Some(v) if !v.is_null() => serde_json::from_value(v.clone()).context("the stored voting rules")?,
        _ => bail!("{}: this consortium has no [voting]: its rules change only by re-creation", dir.display()),
    };
    let policy: Policy =
        serde_json::from_value(config.get("policy").cloned().unwrap_or_default()).context("the stored policy")?;
    Ok(ProposalBook::new(voting, policy))
}

fn show(dir: &Path, json: bool, tally: bool) -> anyhow::Result<()> {
    let entries = checked_entries(dir)?;
    let mut book = book(dir)?;
    let mut shown: Vec<Shown> = Vec::new();
    for entry in &entries {
        // The same replay as the coordinator's and `ledger verify`'s: a vote that does not
        // check stops here, named.
        book.apply(&entry.event).map_err(|e| anyhow::anyhow!("ledger entry {}: {e}", entry.seq))?;
        match &entry.event {
            Event::ProposalMade {
                proposal,
                proposer,
                rationale,
                change,
                after_round,
                tally_after_round,
                electorate,
                ..
            } => {
                shown.push(Shown {
                    proposal: *proposal,
                    proposer: proposer.clone(),
                    rationale: rationale.clone(),
                    change: change.clone(),
                    after_round: *after_round,
                    tally_after_round: *tally_after_round,
                    electorate: electorate.len(),
                    votes: Default::default(),
                    tally: Tally { yes: 0.0, no: 0.0, turnout: 0.0, approval: 0.0, quorum_met: false, passed: false },
                    status: "open".into(),
                });
            }
            Event::VoteCast { proposal, voter, approve, .. } => {
                if let Some(s) = shown.iter_mut().find(|s| s.proposal == *proposal) {
                    s.votes.insert(voter.clone(), *approve);
                }
            }
            Event::ProposalTallied { proposal, tally, effective_round, .. } => {
                if let Some(s) = shown.iter_mut().find(|s| s.proposal == *proposal) {
                    s.tally = *tally;
                    s.status = match effective_round {
                        Some(at) => format!("passed: applies from round {at}"),
                        None if !tally.quorum_met => "failed: no quorum".into(),
                        None => "failed: short of the supermajority".into(),
                    };
                }
            }
            Event::RulesChanged { proposal, round, .. } => {
                if let Some(s) = shown.iter_mut().find(|s| s.proposal == *proposal) {
                    s.status = format!("in force since round {round}");
                }
            }
            _ => {}
        }
    }
    // Open proposals: the count so far.
    for s in shown.iter_mut().filter(|s| s.status == "open") {
        if let Some(open) = book.open.get(&s.proposal) {
            let weights = open.electorate.iter().map(|(m, v)| (m.clone(), v.weight)).collect();
            s.tally = weft_core::proposal::tally(&book.voting, &weights, &open.votes)?;
        }
    }
    if json {
        say!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    if shown.is_empty() {
        say!("no proposal in {}", dir.display());
    }
    for s in &shown {
        say!(
            "proposal {} by {} after round {}: {}",
            s.proposal,
            s.proposer,
            s.after_round,
            serde_json::to_string(&s.change)?
        );
        say!("  rationale: {}", s.rationale);
        if tally {
            say!(
                "  count{}: yes {} · no {} · turnout {:.0}% of {} members · approval {:.0}% (needs {:.0}% of the votes, {:.0}% turnout)",
                if s.status == "open" { " so far" } else { "" },
                s.tally.yes,
                s.tally.no,
                100.0 * s.tally.turnout,
                s.electorate,
                100.0 * s.tally.approval,
                100.0 * book.voting.supermajority,
                100.0 * book.voting.quorum
            );
        } else {
            let votes: Vec<String> =
                s.votes.iter().map(|(m, a)| format!("{m} {}", if *a { "yes" } else { "no" })).collect();
            say!("  votes (signed): {}", if votes.is_empty() { "none yet".into() } else { votes.join(" · ") });
        }
        let status = if s.status == "open" {
            format!("open: counted when round {} closes", s.tally_after_round)
        } else {
            s.status.clone()
        };
        say!("  {status}");
    }
    say!("rules in force: cap {} · floor {} · quorum {}", book.policy.cap, book.policy.floor, book.policy.quorum);
    Ok(())
}
