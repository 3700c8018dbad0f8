//! One consistent reading of a coordinator's committed state: what every page, the metrics and
//! the report are drawn from. Read-only: opening it creates nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use weft_coordinator::{ContributionRecord, Head, Journal, JournalError, ReputationRow, RoundRecord, SqliteJournal};
use weft_core::quality::LossTable;
use weft_core::ContentHash;
use weft_ledger::{Chain, Entry, Event, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{0}: the consortium was never created (its journal holds no configuration)")]
    NotCreated(PathBuf),
    #[error("{path}: the stored configuration is not JSON: {detail}")]
    Config { path: PathBuf, detail: String },
}

/// A closed round: its record and the state in force after it.
#[derive(Clone, Debug)]
pub struct ClosedRound {
    pub record: RoundRecord,
    pub head: Head,
}

impl ClosedRound {
    /// The base in force after the round: the published one, or the anchor a circuit-breaker
    /// trip restored, or the champion a refused challenger left.
    pub fn base_in_force(&self) -> ContentHash {
        self.head.model.base_hash
    }
}

/// The open round's contributions so far.
#[derive(Clone, Debug)]
pub struct OpenRound {
    pub round: u64,
    pub contributions: Vec<ContributionRecord>,
}

/// One node's privacy budget as its latest charge left it.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub node: String,
    pub epsilon_total: f64,
    pub budget: f64,
    pub delta: f64,
    pub rounds_charged: u64,
    /// The ledger entry of the latest charge.
    pub seq: u64,
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub dir: PathBuf,
    /// The consortium's stored configuration (canonical JSON; members know it by its hash).
    pub config: serde_json::Value,
    pub head: Head,
    /// Held-out loss of the genesis base.
    pub genesis_loss: LossTable,
    pub rounds: Vec<ClosedRound>,
    pub open: Option<OpenRound>,
    /// Every ledger entry that checks (chain, hashes, signatures), in order.
    pub entries: Vec<Entry>,
    /// Why the ledger stops checking after `entries`, when it does.
    pub ledger_error: Option<String>,
    /// Ledger rows stored (checked or not).
    pub ledger_rows: u64,
    /// node → language, from the genesis entry.
    pub roster: BTreeMap<String, String>,
    pub coordinator_key: Option<PublicKey>,
}

impl Snapshot {
    /// Reads the storage directory `dir` of a coordinator (running or not) in one read
    /// transaction.
    pub fn read(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let journal = SqliteJournal::read(dir)?;
        let read = journal.consistent(|j| {
            let loaded = j.load()?;
            let rounds = j.rounds()?;
            let genesis = j.head_after(0)?;
            let open = match loaded.as_ref().and_then(|(_, head)| head.open) {
                Some(round) => Some(OpenRound { round, contributions: j.contributions(round)? }),
                None => None,
            };
            Ok((loaded, rounds, genesis, open, j.ledger()?))
        })?;
        let (loaded, rounds, genesis, open, lines) = read;
        let Some((config, head)) = loaded else { return Err(SnapshotError::NotCreated(dir.to_path_buf())) };
        let config = serde_json::from_slice(&config)
            .map_err(|e| SnapshotError::Config { path: dir.to_path_buf(), detail: e.to_string() })?;
        let mut chain = Chain::new(None);
        let mut entries = Vec::with_capacity(lines.len());
        let mut ledger_error = None;
        for line in &lines {
            match chain.check(line) {
                Ok(entry) => entries.push(entry),
                Err(e) => {
                    ledger_error = Some(e.to_string());
                    break;
                }
            }
        }
        let (roster, coordinator_key) = match entries.first().map(|e| &e.event) {
            Some(Event::ConsortiumCreated { roster, coordinator_key, .. }) => (roster.clone(), Some(*coordinator_key)),
            _ => (BTreeMap::new(), None),
        };
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            config,
            genesis_loss: genesis.map(|g| g.base_loss).unwrap_or_default(),
            rounds: rounds.into_iter().map(|(record, head)| ClosedRound { record, head }).collect(),
            open,
            head,
            ledger_rows: lines.len() as u64,
            entries,
            ledger_error,
            roster,
            coordinator_key,
        })
    }

    /// The consortium's name (networked consortia name themselves; a demo does not).
    pub fn name(&self) -> String {
        match &self.config["settings"]["extra"]["networked"] {
            serde_json::Value::String(name) => name.clone(),
            // A demo's storage is OUT/coordinator: the run is called after OUT.
            _ => {
                let dir = match self.dir.file_name() {
                    Some(n) if n == "coordinator" => self.dir.parent().and_then(Path::file_name),
                    other => other,
                };
                dir.map_or_else(|| "consortium".into(), |n| n.to_string_lossy().into_owned())
            }
        }
    }

    /// The held-out loss of the base in force, per language, over rounds: (round, losses) from
    /// the genesis (round 0) on.
    pub fn loss_series(&self) -> Vec<(u64, &LossTable)> {
        std::iter::once((0, &self.genesis_loss))
            .filter(|(_, l)| !l.is_empty())
            .chain(self.rounds.iter().map(|r| (r.record.round, &r.head.base_loss)))
            .collect()
    }

    /// Languages seen in any loss table, in order.
    pub fn languages(&self) -> Vec<String> {
        let mut languages: Vec<String> =
            self.loss_series().iter().flat_map(|(_, l)| l.keys().cloned()).collect::<Vec<_>>();
        languages.sort();
        languages.dedup();
        languages
    }

    pub fn round(&self, round: u64) -> Option<&ClosedRound> {
        self.rounds.iter().find(|r| r.record.round == round)
    }

    /// The reputation table after the last round that recorded one.
    pub fn reputation(&self) -> Option<(u64, &[ReputationRow])> {
        self.rounds
            .iter()
            .rev()
            .find_map(|r| r.record.governance.as_ref().map(|g| (r.record.round, g.reputation.as_slice())))
    }

    /// Each node's privacy budget after its latest charge, from the ledger.
    pub fn budgets(&self) -> Vec<Budget> {
        let mut budgets: BTreeMap<&str, Budget> = BTreeMap::new();
        for entry in &self.entries {
            if let Event::PrivacyCharged { node, epsilon_total, budget, delta, rounds_charged, .. } = &entry.event {
                budgets.insert(
                    node,
                    Budget {
                        node: node.clone(),
                        epsilon_total: *epsilon_total,
                        budget: *budget,
                        delta: *delta,
                        rounds_charged: *rounds_charged,
                        seq: entry.seq,
                    },
                );
            }
        }
        budgets.into_values().collect()
    }

    /// The ledger entries of `round` that concern `node` (its contribution, privacy charge and
    /// evaluation) and the round's decision.
    pub fn entries_of(&self, node: &str, round: u64) -> Vec<&Entry> {
        self.entries
            .iter()
            .filter(|e| match &e.event {
                Event::ContributionReceived { round: r, node: n, .. }
                | Event::Evaluation { round: r, node: n, .. }
                | Event::PrivacyCharged { round: r, node: n, .. } => *r == round && n == node,
                Event::Decision { round: r, .. } => *r == round,
                _ => false,
            })
            .collect()
    }

    /// Every contribution record of `node`, with its round (closed rounds, then the open one).
    pub fn contributions_of(&self, node: &str) -> Vec<(u64, &ContributionRecord)> {
        let closed = self.rounds.iter().flat_map(|r| r.record.contributions.iter().map(move |c| (r.record.round, c)));
        let open = self.open.iter().flat_map(|o| o.contributions.iter().map(move |c| (o.round, c)));
        closed.chain(open).filter(|(_, c)| c.node.as_str() == node).collect()
    }

    /// Nodes known: the roster, then any other node that contributed (refused outsiders).
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self.roster.keys().cloned().collect();
        for round in &self.rounds {
            for c in &round.record.contributions {
                if !nodes.iter().any(|n| n == c.node.as_str()) {
                    nodes.push(c.node.to_string());
                }
            }
        }
        nodes
    }
}
