//! `weft privacy DIR`: each node's differential-privacy budget as the ledger records it. Reads
//! only.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use weft_ledger::Event;

use crate::say;

#[derive(Args)]
pub struct PrivacyArgs {
    /// Coordinator storage directory (state.sqlite, blobs/), e.g. OUT/coordinator of a demo.
    dir: PathBuf,
    /// Print the table as JSON.
    #[arg(long)]
    json: bool,
}

/// One node's line of the budget table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BudgetRow {
    pub node: String,
    /// Rounds the node has been charged for.
    pub rounds_charged: u64,
    /// The last round it was charged in, and that round's ε alone.
    pub last_round: Option<u64>,
    pub epsilon_last_round: Option<f64>,
    /// Composed ε of all its charged rounds.
    pub epsilon_spent: f64,
    pub budget: Option<f64>,
    pub remaining: Option<f64>,
    /// Contributions refused with `privacy_budget_exhausted`.
    pub refused_over_budget: u64,
}

/// The mechanism the ledger's charges were computed for.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Mechanism {
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    pub clip_norm: f64,
    pub steps_per_round: u64,
    pub delta: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BudgetTable {
    pub mechanism: Option<Mechanism>,
    pub nodes: Vec<BudgetRow>,
}

/// The row of `node`, empty until something is charged or refused.
fn row<'a>(rows: &'a mut BTreeMap<String, BudgetRow>, node: &str) -> &'a mut BudgetRow {
    rows.entry(node.to_owned()).or_insert_with(|| BudgetRow {
        node: node.to_owned(),
        rounds_charged: 0,
        last_round: None,
        epsilon_last_round: None,
        epsilon_spent: 0.0,
        budget: None,
        remaining: None,
        refused_over_budget: 0,
    })
}

pub fn table(entries: &[weft_ledger::Entry]) -> BudgetTable {
    let mut rows: BTreeMap<String, BudgetRow> = BTreeMap::new();
    let mut mechanism = None;
    for entry in entries {
        match &entry.event {
            Event::ConsortiumCreated { roster, .. } => {
                for node in roster.keys() {
                    row(&mut rows, node);
                }
            }
            Event::PrivacyCharged {
                round,
                node,
                noise_multiplier,
                sample_rate,
                clip_norm,
                steps,
                delta,
                epsilon_round,
                epsilon_total,
                rounds_charged,
                budget,
            } => {
                mechanism = Some(Mechanism {
                    noise_multiplier: *noise_multiplier,
                    sample_rate: *sample_rate,
                    clip_norm: *clip_norm,
                    steps_per_round: *steps,
                    delta: *delta,
                });
                let r = row(&mut rows, node);
                r.rounds_charged = *rounds_charged;
                r.last_round = Some(*round);
                r.epsilon_last_round = Some(*epsilon_round);
                r.epsilon_spent = *epsilon_total;
                r.budget = Some(*budget);
                r.remaining = Some(budget - epsilon_total);
            }
            Event::ContributionReceived { node, refused: Some(refusal), .. }
                if refusal.code == weft_core::RejectionCode::PrivacyBudgetExhausted.as_str() =>
            {
                row(&mut rows, node).refused_over_budget += 1;
            }
            _ => {}
        }
    }
    BudgetTable { mechanism, nodes: rows.into_values().collect() }
}

pub fn run(args: PrivacyArgs) -> anyhow::Result<()> {
    let entries = crate::ledger::checked_entries(&args.dir)?;
    let table = table(&entries);
    if args.json {
        say!("{}", serde_json::to_string_pretty(&table)?);
        return Ok(());
    }
    let Some(m) = table.mechanism else {
        say!("{}: no privacy charges in the ledger (the consortium runs without [privacy.dp], or no round was charged yet)", args.dir.display());
        return Ok(());
    };
    say!(
        "record-level DP-SGD: σ {:.4} · sampling rate {} · clip norm {} · {} steps per round · ε at δ {:e}",
        m.noise_multiplier,
        m.sample_rate,
        m.clip_norm,
        m.steps_per_round,
        m.delta
    );
    say!(
        "  {:<14} {:>7} {:>11} {:>9} {:>8} {:>8} {:>16}",
        "node",
        "rounds",
        "ε (last)",
        "ε spent",
        "budget",
        "left",
        "refused (budget)"
    );
    let number = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.3}"));
    for r in &table.nodes {
        say!(
            "  {:<14} {:>7} {:>11} {:>9.3} {:>8} {:>8} {:>16}",
            r.node,
            r.rounds_charged,
            number(r.epsilon_last_round),
            r.epsilon_spent,
            number(r.budget),
            number(r.remaining),
            r.refused_over_budget
        );
    }
    say!("(ε composes through Rényi DP across rounds: the total is less than the sum of the rounds')");
    Ok(())
}
