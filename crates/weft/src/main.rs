//! `weft`: governed consortium training of language models.

mod attack;
mod data;
mod demo;
mod inspect;
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
    /// Print the reputation table (node × topic: N, Ĉ, S, R, w) from a saved governance state.
    Reputation(reputation::ReputationArgs),
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
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
