//! `weft`: governed consortium training of language models.
//!
//! One file per command group: `demo`, `consortium`, `coordinator`, `node`, `ledger`, and the
//! single commands `inspect`, `simulate`, `reputation`. What they share: `args` (the flags that
//! describe a run), `run` (the run those flags or `consortium.toml` describe, checked once),
//! `report`, `table` and `output` (everything printed goes through `say!`).

mod args;
mod attack;
mod consortium;
mod coordinator;
mod dashboard;
mod data;
mod demo;
mod inspect;
mod ledger;
mod model;
mod node;
mod output;
mod privacy;
mod proposal;
mod realbase;
mod report;
mod reputation;
mod run;
mod secure;
mod simulate;
mod table;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "weft", version, about = "Governed consortium training of language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole consortium in one process: N sovereign nodes, each on its own language, and a
    /// coordinator that measures, governs and integrates their deltas round by round.
    Demo(Box<demo::DemoArgs>),
    /// Show the tensors and the canonical content hash of a safetensors file.
    Inspect(inspect::InspectArgs),
    /// Many simulated devices with a tiny model in one process: round time and peak memory.
    Simulate(simulate::SimulateArgs),
    /// The tamper-evident ledger of a coordinator: verify, show, prove, check-proof.
    #[command(subcommand)]
    Ledger(ledger::LedgerCommand),
    /// Provision a networked consortium.
    #[command(subcommand)]
    Consortium(consortium::ConsortiumCommand),
    /// The coordinator: serve a consortium over the network, operate its storage.
    #[command(subcommand)]
    Coordinator(coordinator::CoordinatorCommand),
    /// A node's side.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Pretrained open-weights bases: import a GGUF, score a text, generate.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Each node's differential-privacy budget: rounds charged, ε spent (composed), what is left.
    Privacy(privacy::PrivacyArgs),
    /// Print the reputation table (node × topic: N, Ĉ, S, R, w) from a saved governance state.
    Reputation(reputation::ReputationArgs),
    /// Class-3 changes of the rules (cap, floor, quorum) by signed proposals and votes.
    #[command(subcommand)]
    Proposal(proposal::ProposalCommand),
    /// A read-only web dashboard over a coordinator's storage (live while it runs): rounds,
    /// contributions and why each was refused, loss per language, reputation, privacy budgets,
    /// the ledger entry by entry, and Prometheus metrics at /metrics.
    Dashboard(dashboard::DashboardArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(*args),
        Command::Inspect(args) => inspect::run(args),
        Command::Reputation(args) => reputation::run(args),
        Command::Privacy(args) => privacy::run(args),
        Command::Proposal(command) => proposal::run(command),
        Command::Simulate(args) => simulate::run(args),
        Command::Ledger(command) => ledger::run(command),
        Command::Consortium(command) => consortium::run(command),
        Command::Coordinator(command) => coordinator::run(command),
        Command::Node(command) => node::run(command),
        Command::Model(command) => model::run(command),
        Command::Dashboard(args) => dashboard::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of our output went away (`| head`): stop quietly, as Unix tools do.
        Err(e) if output::is_closed(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: many errors already print their
/// source (`{path}: {source}`), which `{:#}` would print a second time.
fn describe(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}
