//! Durable mode: create a consortium in a journal, or continue one after a restart; rollback.
//!
//! A restart rebuilds exactly the in-memory state the coordinator had after its last committed
//! step: the model point from the blob store, governance state from the head, and, when a round
//! was open, its contributions from the journal (governance scores them again from the stored
//! deltas: the same bits, since evaluation is deterministic). Nodes whose contributions were
//! not committed send them again.

use std::fmt;
use std::ops::{Deref, DerefMut};

use weft_core::{Delta, Rejection};
use weft_ledger::{Entry, Event, PublicKey};

use super::{json_hash, Admitted, Coordinator, CoordinatorError, Measurement};
use crate::head::{ModelHead, ModelPoint};
use crate::journal::{Head, Journal, Rows};
use crate::measure::Measure;
use crate::record::{ContributionRecord, RoundRecord};
use crate::store::BlobStore;

/// A coordinator whose every step is committed to a [`Journal`] with its signed ledger entries:
/// what a served consortium needs (nodes reconnect after a restart, contributions are signed
/// into the ledger, `weft ledger verify` replays the run). Everything a [`Coordinator`] does, it
/// does (through `Deref`), plus what only a journal allows: its signing key, the recorded rounds
/// and rollback.
pub struct DurableCoordinator<M: Measure>(Coordinator<M>);

impl<M: Measure> Deref for DurableCoordinator<M> {
    type Target = Coordinator<M>;
    fn deref(&self) -> &Coordinator<M> {
        &self.0
    }
}

impl<M: Measure> DerefMut for DurableCoordinator<M> {
    fn deref_mut(&mut self) -> &mut Coordinator<M> {
        &mut self.0
    }
}

/// One setting that differs between a stored consortium and the coordinator started on it:
/// its path in the configuration (`policy.cap`, `settings.node.steps`) and both values.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigDifference {
    pub key: String,
    pub stored: serde_json::Value,
    pub now: serde_json::Value,
}

impl fmt::Display for ConfigDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: created with {}, now {}", self.key, self.stored, self.now)
    }
}

impl<M: Measure> Coordinator<M> {
    /// Makes the coordinator durable: the first time, the consortium is created in `journal`
    /// (configuration, roster, genesis base); after that the coordinator continues from what the
    /// journal holds, provided it is configured exactly as when the consortium was created.
    /// `settings` carries whatever else the caller's configuration holds (model, training).
    /// Call it after the other `with_…` builders.
    pub fn durable(
        mut self,
        mut journal: Box<dyn Journal>,
        settings: serde_json::Value,
    ) -> Result<DurableCoordinator<M>, CoordinatorError> {
        let config = self.config(settings);
        let config_bytes = serde_json::to_vec(&config).unwrap_or_default();
        self.config_hash = weft_core::ContentHash(*blake3::hash(&config_bytes).as_bytes());
        let roster: std::collections::BTreeMap<String, String> =
            self.roster.iter().map(|(n, l)| (n.to_string(), l.clone())).collect();
        self.roster_hash = json_hash(&roster);
        match journal.load()? {
            None => {
                let base_hash = self.store.put(self.head.base())?;
                let head = self.journal_head(None);
                let coordinator_key = journal.public_key().ok_or(CoordinatorError::NotDurable)?;
                let genesis = Event::ConsortiumCreated {
                    coordinator_key,
                    config_hash: self.config_hash,
                    roster_hash: self.roster_hash,
                    roster,
                    base_hash,
                };
                journal.create(&config_bytes, &head, genesis)?;
                tracing::info!(dir = %journal.location().display(), key = %coordinator_key, "consortium created");
            }
            Some((stored, head)) => {
                if stored != config_bytes {
                    let stored: serde_json::Value = serde_json::from_slice(&stored).unwrap_or_default();
                    let differences = config_differences(&stored, &config);
                    return Err(CoordinatorError::ConfigMismatch { dir: journal.location().to_owned(), differences });
                }
                self.restore(&*journal, head)?;
                tracing::info!(round = self.round, open = ?self.open.as_ref().map(|p| p.round), "continuing from the journal");
            }
        }
        let lines = journal.ledger()?;
        self.ledger_head = match lines.last() {
            Some(line) => serde_json::from_slice::<Entry>(line).ok().map(|e| weft_ledger::WitnessedHead::of(&e)),
            None => None,
        };
        // Proposals, votes, counts and changes are kept in the ledger alone: the book and the
        // rules in force are the genesis's with every recorded event re-applied.
        if self.proposals.is_some() {
            let events: Vec<Event> = lines
                .iter()
                .filter_map(|line| serde_json::from_slice::<Entry>(line).ok())
                .map(|entry| entry.event)
                .filter(|event| {
                    matches!(
                        event,
                        Event::ProposalMade { .. }
                            | Event::VoteCast { .. }
                            | Event::ProposalTallied { .. }
                            | Event::RulesChanged { .. }
                    )
                })
                .collect();
            self.apply_proposal_events(&events)?;
        }
        self.journal = Some(journal);
        Ok(DurableCoordinator(self))
    }

    /// The configuration a consortium is created with, as canonical JSON (sorted keys).
    fn config(&self, settings: serde_json::Value) -> serde_json::Value {
        let roster: std::collections::BTreeMap<String, String> =
            self.roster.iter().map(|(n, l)| (n.to_string(), l.clone())).collect();
        let mut config = serde_json::json!({
            "format": "weft-consortium/1",
            "roster": roster,
            "policy": self.rules.policy,
            "aggregator": self.rules.aggregator.to_string(),
            "outer": self.rules.outer,
            "probe_scale": self.rules.probe_scale,
            "governance": self.governance.as_ref().map(|g| *g.settings()),
            "initial_base_hash": self.base_hash(),
            "settings": settings,
        });
        // Only adapter runs name their plan, so that full-weight runs keep their configuration.
        if let (Some((plan, _)), Some(map)) = (&self.adapters, config.as_object_mut()) {
            map.insert("adapters".into(), serde_json::json!(plan));
        }
        // Likewise the gauntlet: only consortia that adopt through it name its rules.
        if let (Some(rules), Some(map)) = (&self.rules.gauntlet, config.as_object_mut()) {
            map.insert("gauntlet".into(), serde_json::json!(rules));
        }
        if let (Some(rules), Some(map)) = (&self.rules.breaker, config.as_object_mut()) {
            map.insert("breaker".into(), serde_json::json!(rules));
        }
        if let (Some((book, _)), Some(map)) = (&self.proposals, config.as_object_mut()) {
            map.insert("voting".into(), serde_json::json!(book.voting));
        }
        config
    }

    fn restore(&mut self, journal: &dyn Journal, head: Head) -> Result<(), CoordinatorError> {
        self.head = load_head(&*self.store, &head)?;
        if let Some(watch) = &head.watch {
            let point = ModelPoint::load(&*self.store, &watch.anchor)?;
            let anchor = ModelHead { point, refs: watch.anchor, base_loss: watch.anchor_loss.clone() };
            self.watch = Some(super::Watch { anchor_round: watch.anchor_round, anchor, until: watch.until });
        }
        if let Some(genesis) = journal.head_after(0)? {
            self.genesis_loss = genesis.base_loss;
        }
        self.round = head.round;
        if let (Some(g), Some(state)) = (self.governance.take(), head.governance.clone()) {
            self.governance = Some(g.with_state(state));
        }
        for (record, _) in journal.rounds()? {
            self.add_to_manifests(&record);
        }
        if let Some(round) = head.open {
            self.begin(round)?;
            let leaves: Vec<_> = journal
                .ledger()?
                .iter()
                .filter_map(|line| serde_json::from_slice::<Entry>(line).ok())
                .filter(|e| matches!(e.event, Event::ContributionReceived { round: r, .. } if r == round))
                .map(|e| e.leaf())
                .collect();
            for record in journal.contributions(round)? {
                self.readmit(record)?;
            }
            if let Some(pending) = self.open.as_mut() {
                pending.leaves = leaves;
                pending.opened = None;
            }
        }
        Ok(())
    }

    /// Puts a committed contribution of the open round back in memory.
    fn readmit(&mut self, record: ContributionRecord) -> Result<(), CoordinatorError> {
        match record.delta_hash {
            Some(delta_hash) => {
                // The same measurement as when it arrived: scored again with governance (the
                // same bits), else from its recorded losses.
                let measurement = if self.governance.is_some() {
                    let delta = Delta::from_state(self.store.open(&delta_hash)?.state()?);
                    self.score(&record.node, &delta)?
                } else {
                    let heldout = record.heldout_loss.clone().unwrap_or_default();
                    Measurement::new(&self.head.base_loss, heldout)
                };
                let admitted = Admitted {
                    quality: measurement.quality(),
                    gains: measurement.gains.unwrap_or_default(),
                    declared_quality: record.declared_quality(),
                    delta_hash,
                    delta_norm: record.delta_norm.unwrap_or(0.0),
                };
                if let Some(pending) = self.open.as_mut() {
                    pending.admit(record, admitted);
                }
            }
            None => {
                // Refused at the checks: a failed audit for a roster node, as when it arrived.
                let duplicate = record.reason == Some(Rejection::DuplicateNode.code());
                if self.roster.contains_key(&record.node) && !duplicate {
                    if let Some(g) = self.governance.as_mut() {
                        g.failed(&record.node);
                    }
                }
                if let Some(pending) = self.open.as_mut() {
                    pending.records.push(record);
                }
            }
        }
        Ok(())
    }
}

impl<M: Measure> DurableCoordinator<M> {
    /// The key that signs the ledger.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.0.journal.as_ref().and_then(|j| j.public_key())
    }

    /// Every closed round's record, from the journal.
    pub fn recorded_rounds(&self) -> Result<Vec<RoundRecord>, CoordinatorError> {
        match &self.0.journal {
            Some(journal) => Ok(journal.rounds()?.into_iter().map(|(record, _)| record).collect()),
            None => Ok(Vec::new()),
        }
    }

    /// Makes the base of `to_round` (0: the genesis base) current again; see [`roll_back`].
    pub fn rollback(&mut self, to_round: u64) -> Result<Entry, CoordinatorError> {
        let c = &mut self.0;
        c.usable()?;
        if let Some(pending) = &c.open {
            return Err(CoordinatorError::RollbackWhileOpen(pending.round));
        }
        let journal = c.journal.as_mut().ok_or(CoordinatorError::NotDurable)?;
        let (head, entry) = roll_back(journal.as_mut(), &*c.store, to_round)?;
        c.head = load_head(&*c.store, &head)?;
        c.watch = None;
        c.champion_items = None;
        Ok(entry)
    }
}

/// The model head a journal head names, read from the store (every blob checked).
fn load_head(store: &dyn BlobStore, head: &Head) -> Result<ModelHead, CoordinatorError> {
    let point = ModelPoint::load(store, &head.model)?;
    Ok(ModelHead { point, refs: head.model, base_loss: head.base_loss.clone() })
}

/// Makes the base of `to_round` (0: the genesis base) current again in a journal, with the
/// outer optimizer's state and center it had then. Nothing is deleted; the rollback is a ledger
/// entry, and rolling forward again is another rollback. Reputation is not rolled back: what
/// nodes did stays on their record. The next round continues the numbering. Works on the
/// journal alone, so an operator can run it with the coordinator stopped.
pub fn roll_back(
    journal: &mut dyn Journal,
    store: &dyn BlobStore,
    to_round: u64,
) -> Result<(Head, Entry), CoordinatorError> {
    let (_, head) = journal.load()?.ok_or(CoordinatorError::MissingRound(0))?;
    if let Some(open) = head.open {
        return Err(CoordinatorError::RollbackWhileOpen(open));
    }
    if to_round > head.round {
        return Err(CoordinatorError::RollbackTarget { to: to_round, last: head.round });
    }
    let target = journal.head_after(to_round)?.ok_or(CoordinatorError::MissingRound(to_round))?;
    // Every blob the restored state needs must be there and intact before anything changes.
    ModelPoint::load(store, &target.model)?;
    let restored = Head {
        round: head.round,
        open: None,
        model: target.model,
        base_loss: target.base_loss,
        governance: head.governance,
        // An operator's rollback ends any watch: the base it restores is the one trusted.
        watch: None,
    };
    let event = Event::RolledBack {
        to_round,
        after_round: head.round,
        previous_base_hash: head.model.base_hash,
        base_hash: restored.model.base_hash,
        outer_state: restored.model.outer_state,
        center: restored.model.center,
    };
    let mut entries = journal.commit(&restored, Rows::default(), vec![event])?;
    let entry = entries.pop().ok_or(CoordinatorError::Broken)?;
    tracing::warn!(to_round, base = %restored.model.base_hash.short(), "rolled back");
    Ok((restored, entry))
}

/// Every setting whose value differs, by its dotted path (`policy.cap`), each once.
fn config_differences(stored: &serde_json::Value, now: &serde_json::Value) -> Vec<ConfigDifference> {
    let mut differences = Vec::new();
    collect_differences("", stored, now, &mut differences);
    differences
}

fn collect_differences(
    path: &str,
    stored: &serde_json::Value,
    now: &serde_json::Value,
    out: &mut Vec<ConfigDifference>,
) {
    if stored == now {
        return;
    }
    match (stored.as_object(), now.as_object()) {
        (Some(a), Some(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                let null = serde_json::Value::Null;
                collect_differences(&child, a.get(key).unwrap_or(&null), b.get(key).unwrap_or(&null), out);
            }
        }
        _ => out.push(ConfigDifference { key: path.to_owned(), stored: stored.clone(), now: now.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_differing_setting_is_named_once_with_both_values() {
        let stored = json!({"policy": {"cap": 0.5, "floor": 0.0}, "seed": 0, "roster": {"a": "en"}});
        let now = json!({"policy": {"cap": 0.3, "floor": 0.0}, "seed": 1, "roster": {"a": "en"}});
        let differences = config_differences(&stored, &now);
        assert_eq!(
            differences,
            [
                ConfigDifference { key: "policy.cap".into(), stored: json!(0.5), now: json!(0.3) },
                ConfigDifference { key: "seed".into(), stored: json!(0), now: json!(1) },
            ]
        );
        // A key present on one side only, and encodings that differ but values that do not.
        let differences = config_differences(&json!({"a": 1}), &json!({"a": 1, "b": true}));
        assert_eq!(differences, [ConfigDifference { key: "b".into(), stored: json!(null), now: json!(true) }]);
        assert!(config_differences(&json!({"a": 1}), &json!({"a": 1})).is_empty());
    }
}
