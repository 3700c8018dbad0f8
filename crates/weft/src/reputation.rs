//! `weft reputation FILE`: the reputation table a consortium saved (node × topic: N, Ĉ, S, R, w).

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use weft_coordinator::{reputation_table, GovernanceSettings, GovernanceState};

use crate::say;

/// `coordinator/governance.json`, written by `weft demo --governance --out DIR` after every
/// round: the governance state with what is needed to recompute its table.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReputationFile {
    pub settings: GovernanceSettings,
    pub topics: Vec<String>,
    pub state: GovernanceState,
}

#[derive(clap::Args)]
pub struct ReputationArgs {
    /// A governance state file (`coordinator/governance.json` under a demo's --out).
    pub file: PathBuf,
    /// Print the rows as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ReputationArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let saved: ReputationFile = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a weft governance state file", args.file.display()))?;
    let params = saved.settings.reputation;
    params.validate().with_context(|| format!("{}: reputation parameters", args.file.display()))?;
    let rows = reputation_table(&saved.state, &saved.topics, &params);
    if args.json {
        say!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    say!(
        "reputation (half-life {} rounds, κ {}, C₀ {}, γ {}, w_max {})",
        params.half_life,
        params.kappa,
        params.prior,
        params.gamma,
        params.w_max
    );
    say!("{:<16} {:<6} {:>9} {:>7} {:>6} {:>9} {:>7}", "node", "topic", "N", "Ĉ", "S", "R", "w");
    for r in &rows {
        say!(
            "{:<16} {:<6} {:>9.3} {:>7.4} {:>6.3} {:>9.4} {:>7.4}",
            r.node.as_str(),
            r.topic,
            r.n,
            r.competence,
            r.slashing,
            r.reputation,
            r.vote_weight
        );
    }
    for (node, rounds) in &saved.state.flagged {
        say!("{node}: caught overfitting the public canaries in round(s) {rounds:?}");
    }
    Ok(())
}
