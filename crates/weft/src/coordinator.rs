//! `weft coordinator serve | rollback`: run a consortium over the network; operate its storage.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use weft_coordinator::{FsBlobStore, SqliteJournal};
use weft_net::config::{read_text, read_toml, ConsortiumConfig, KitFiles, Roster};
use weft_net::server::ServeOptions;

use crate::run::{setting_error, RunSettings, Source};
use crate::{data, say};

#[derive(Subcommand)]
pub enum CoordinatorCommand {
    /// Run the consortium's rounds over gRPC with mutual TLS until they are all done.
    Serve(ServeArgs),
    /// Make the base of an earlier round current again (a ledger entry; nothing is deleted).
    Rollback(RollbackArgs),
}

pub fn run(command: CoordinatorCommand) -> anyhow::Result<()> {
    match command {
        CoordinatorCommand::Serve(args) => serve(args),
        CoordinatorCommand::Rollback(args) => rollback(args),
    }
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
    /// Also serve the read-only web dashboard (and /metrics) on this address [default when
    /// given without one: 127.0.0.1:8750]. Anything but loopback needs --dashboard-token.
    #[arg(long, num_args = 0..=1, default_missing_value = crate::dashboard::DEFAULT_ADDRESS)]
    pub dashboard: Option<String>,
    /// The dashboard's access token (at least 16 characters); default: $WEFT_DASHBOARD_TOKEN.
    #[arg(long, requires = "dashboard")]
    pub dashboard_token: Option<String>,
}

/// The roster's members and the keys they sign with: who may propose and vote.
fn options_voters(roster: &Roster) -> std::collections::BTreeMap<String, weft_ledger::PublicKey> {
    roster.node.iter().map(|m| (m.id.to_string(), m.signing_key)).collect()
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config_path = args.dir.join("consortium.toml");
    let config: ConsortiumConfig = read_toml(&config_path)?;
    let roster = Roster::read(&args.dir.join("roster.toml"))?;
    let members: Vec<_> = roster.node.iter().map(|m| (m.id.clone(), m.language.clone())).collect();
    config
        .validate()
        .map_err(|e| setting_error(e, Source::ConsortiumToml))
        .with_context(|| config_path.display().to_string())?;
    let storage = args.dir.join(&config.storage);
    let data_dir = data::data_dir(args.data.clone());
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    // The dashboard's address and token are checked before the coordinator's storage is
    // touched. It reads committed state on its own threads, never through the engine's lock.
    let dashboard = match &args.dashboard {
        Some(address) => {
            let token = crate::dashboard::token(args.dashboard_token.clone());
            let listener = runtime.block_on(weft_dashboard::bind(address, token.as_deref()))?;
            Some((listener, crate::dashboard::options(&storage, token, true)))
        }
        None => None,
    };
    let (coordinator, dp) = if config.base.is_some() {
        crate::realbase::serve_coordinator(&config, &args.dir, &members, &data_dir, &storage)
            .with_context(|| config_path.display().to_string())?
    } else {
        let run = RunSettings::from_config(&config, members)
            .map_err(|e| setting_error(e, Source::ConsortiumToml))
            .with_context(|| config_path.display().to_string())?;
        let voters = options_voters(&roster);
        let coordinator =
            run.coordinator(&data_dir, &storage, serde_json::json!({ "networked": config.name }), &voters)?;
        (coordinator, run.privacy.map(|p| p.rule))
    };
    if coordinator.round() > 0 || coordinator.open_round_state().is_some() {
        say!("continuing after round {} from {}", coordinator.round(), storage.display());
    }
    let options = ServeOptions {
        certificate: read_text(&storage.join(KitFiles::CERTIFICATE))?,
        key: read_text(&storage.join(KitFiles::TLS_KEY))?,
        ca: read_text(&args.dir.join("ca.pem"))?,
        spool: storage.join("incoming"),
        linger: Duration::from_secs(args.linger_secs),
        dp,
        config,
        roster,
    };
    say!("coordinator listening on {} for {} nodes", options.config.address, options.roster.node.len());
    if let Some((listener, options)) = dashboard {
        let bound = listener.local_addr().context("the dashboard's address")?;
        say!("dashboard on http://{bound}/");
        runtime.spawn(async move {
            if let Err(e) = weft_dashboard::serve(listener, options).await {
                tracing::error!("the dashboard stopped: {e}");
            }
        });
    }
    let served = runtime.block_on(weft_net::server::serve(coordinator, options))?;
    for record in &served.rounds {
        let wire: u64 = served.wire_bytes.get(&record.round).map_or(0, |m| m.values().sum());
        let losses: Vec<String> = record.heldout_loss.iter().map(|(l, v)| format!("{l} {v:.4}")).collect();
        say!(
            "round {}: {} accepted · base {} · {:.2} MB of deltas on the wire · held-out {}",
            record.round,
            record.accepted,
            record.base_hash.short(),
            wire as f64 / 1e6,
            losses.join(" ")
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&served)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    match served.rounds.last() {
        Some(last) => say!("final base {}", last.base_hash),
        None => say!("no round left to run: the consortium had already finished"),
    }
    Ok(())
}

/// `weft coordinator rollback DIR --to-round K`.
#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// Coordinator storage directory.
    dir: PathBuf,
    /// The round whose base becomes current again (0: the initial base).
    #[arg(long)]
    to_round: u64,
}

fn rollback(args: RollbackArgs) -> anyhow::Result<()> {
    // An operator command on an existing consortium: nothing is created where none is.
    let mut journal = SqliteJournal::open_existing(&args.dir)?;
    let store = FsBlobStore::open_existing(args.dir.join("blobs"))?;
    let (head, entry) = weft_coordinator::roll_back(&mut journal, &store, args.to_round)?;
    say!(
        "rolled back to the base of round {} ({}); ledger entry {}. Nothing was deleted: roll forward with --to-round {}",
        args.to_round,
        head.model.base_hash,
        entry.seq,
        head.round
    );
    Ok(())
}
