//! `weft`: governed consortium training of language models.

mod attack;
mod consortium;
mod data;
mod demo;
mod inspect;
mod ledger;
mod net;
mod reputation;
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
    Consortium(ConsortiumCommand),
    /// The coordinator: serve a consortium over the network, operate its storage.
    #[command(subcommand)]
    Coordinator(CoordinatorCommand),
    /// A node's side.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Print the reputation table (node × topic: N, Ĉ, S, R, w) from a saved governance state.
    Reputation(reputation::ReputationArgs),
}

#[derive(Subcommand)]
enum ConsortiumCommand {
    /// Create a consortium: CA, coordinator identity, one startup kit per node, roster, config.
    Init(net::InitArgs),
    /// Admit a node that made its own keys (`weft node keygen`): certify it, add it to the roster.
    AddNode(net::AddNodeArgs),
}

#[derive(Subcommand)]
enum CoordinatorCommand {
    /// Run the consortium's rounds over gRPC with mutual TLS until they are all done.
    Serve(net::ServeArgs),
    /// Make the base of an earlier round current again (a ledger entry; nothing is deleted).
    Rollback(ledger::RollbackArgs),
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Take part in a consortium from a startup kit: dial out, train each round, upload.
    Join(net::JoinArgs),
    /// Make this node's keys on site and the public request to send to the consortium.
    Keygen(net::KeygenArgs),
    /// Bundle a node's sovereign artifacts with ledger proofs of its contributions.
    Export(ledger::ExportArgs),
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
        Command::Simulate(args) => simulate::run(args),
        Command::Ledger(command) => ledger::run(command),
        Command::Consortium(ConsortiumCommand::Init(args)) => net::init(args),
        Command::Coordinator(CoordinatorCommand::Serve(args)) => net::serve(args),
        Command::Coordinator(CoordinatorCommand::Rollback(args)) => ledger::rollback(args),
        Command::Node(NodeCommand::Join(args)) => net::join(args),
        Command::Node(NodeCommand::Keygen(args)) => net::keygen(args),
        Command::Consortium(ConsortiumCommand::AddNode(args)) => net::add_node(args),
        Command::Node(NodeCommand::Export(args)) => ledger::export(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
