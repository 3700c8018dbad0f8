//! Durable mode: create a consortium in a journal, or continue one after a restart; rollback.
//!
//! A restart rebuilds exactly the in-memory state the coordinator had after its last committed
//! step: the base, outer-optimizer state and center from the blob store, governance state from
//! the head, and, when a round was open, its contributions from the journal (governance scores
//! them again from the stored deltas: the same bits, since evaluation is deterministic). Nodes
//! whose contributions were not committed send them again.

use weft_core::{Delta, NodeId};
use weft_ledger::{Entry, Event};

use super::{json_hash, Coordinator, CoordinatorError};
use crate::aggregation::outer_from_state;
use crate::journal::{Head, Journal, Rows};
use crate::measure::Measure;
use crate::record::ContributionRecord;

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
    ) -> Result<Self, CoordinatorError> {
        let config = self.config(settings);
        let config_bytes = serde_json::to_vec(&config).unwrap_or_default();
        self.config_hash = weft_core::ContentHash(*blake3::hash(&config_bytes).as_bytes());
        let roster: std::collections::BTreeMap<String, String> =
            self.roster.iter().map(|(n, l)| (n.to_string(), l.clone())).collect();
        self.roster_hash = json_hash(&roster);
        match journal.load()? {
            None => {
                let base_hash = self.store.put_state(&self.base)?;
                let head = self.head(None);
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
                    let keys = differing_keys(&stored, &config);
                    return Err(CoordinatorError::ConfigMismatch { dir: journal.location().to_owned(), keys });
                }
                self.restore(&*journal, head)?;
                tracing::info!(round = self.round, open = ?self.open.as_ref().map(|p| p.round), "continuing from the journal");
            }
        }
        self.journal = Some(journal);
        Ok(self)
    }

    /// The configuration a consortium is created with, as canonical JSON (sorted keys).
    fn config(&self, settings: serde_json::Value) -> serde_json::Value {
        let roster: std::collections::BTreeMap<String, String> =
            self.roster.iter().map(|(n, l)| (n.to_string(), l.clone())).collect();
        serde_json::json!({
            "format": "weft-consortium/1",
            "roster": roster,
            "policy": self.policy,
            "aggregator": self.aggregator.to_string(),
            "outer": self.outer,
            "probe_scale": self.probe_scale,
            "governance": self.governance.as_ref().map(|g| *g.settings()),
            "initial_base_hash": self.base_hash,
            "settings": settings,
        })
    }

    fn restore(&mut self, journal: &dyn Journal, head: Head) -> Result<(), CoordinatorError> {
        self.set_model_state(&head)?;
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
            }
        }
        Ok(())
    }

    /// Base, outer-optimizer state, center and base loss from a head, read from the blob store
    /// (each blob checked against its hash).
    fn set_model_state(&mut self, head: &Head) -> Result<(), CoordinatorError> {
        self.base = self.store.get_state(&head.base_hash)?;
        self.base_hash = head.base_hash;
        self.outer_state = match &head.outer_state {
            Some(hash) => outer_from_state(self.store.get_state(hash)?),
            None => Default::default(),
        };
        self.outer_hash = head.outer_state;
        self.center = head.center.as_ref().map(|hash| self.store.get_state(hash)).transpose()?;
        self.center_hash = head.center;
        self.base_loss = head.base_loss.clone();
        Ok(())
    }

    /// Puts a committed contribution of the open round back in memory.
    fn readmit(&mut self, record: ContributionRecord) -> Result<(), CoordinatorError> {
        let node = NodeId::new(record.node.clone()).ok();
        let in_roster = node.as_ref().is_some_and(|n| self.roster.contains_key(n));
        match (node, record.delta_hash) {
            (Some(node), Some(hash)) => {
                let quality = if self.governance.is_some() {
                    let delta = Delta::from_state(self.store.get_state(&hash)?);
                    self.score(&node, &delta)?.0
                } else {
                    record.quality.unwrap_or(f64::NAN)
                };
                let claim = record.declared.get("quality").or(record.declared.get("validation_gain")).copied();
                let norm = record.delta_norm.unwrap_or(0.0);
                if let Some(pending) = self.open.as_mut() {
                    pending.received.insert(node.clone());
                    pending.measured.push((node.clone(), quality));
                    pending.declared.push((node.clone(), claim.unwrap_or(f64::NAN)));
                    pending.deltas.insert(node, (hash, norm));
                }
            }
            (node, _) => {
                let duplicate = record.reason.as_deref() == Some("duplicate_node");
                if let (Some(g), Some(node), true, false) = (self.governance.as_mut(), node, in_roster, duplicate) {
                    g.failed(&node);
                }
            }
        }
        if let Some(pending) = self.open.as_mut() {
            pending.records.push(record);
        }
        Ok(())
    }

    /// Every closed round's record, from the journal (empty in memory-only mode).
    pub fn recorded_rounds(&self) -> Result<Vec<crate::RoundRecord>, CoordinatorError> {
        match &self.journal {
            Some(journal) => Ok(journal.rounds()?.into_iter().map(|(record, _)| record).collect()),
            None => Ok(Vec::new()),
        }
    }

    /// Makes the base of `to_round` (0: the genesis base) current again; see [`roll_back`].
    pub fn rollback(&mut self, to_round: u64) -> Result<Entry, CoordinatorError> {
        self.usable()?;
        if let Some(pending) = &self.open {
            return Err(CoordinatorError::RollbackWhileOpen(pending.round));
        }
        let journal = self.journal.as_mut().ok_or(CoordinatorError::NotDurable)?;
        let (head, entry) = roll_back(journal.as_mut(), &self.store, to_round)?;
        self.set_model_state(&head)?;
        Ok(entry)
    }
}

/// Makes the base of `to_round` (0: the genesis base) current again in a journal, with the
/// outer optimizer's state and center it had then. Nothing is deleted; the rollback is a ledger
/// entry, and rolling forward again is another rollback. Reputation is not rolled back: what
/// nodes did stays on their record. The next round continues the numbering. Works on the
/// journal alone, so an operator can run it with the coordinator stopped.
pub fn roll_back(
    journal: &mut dyn Journal,
    store: &crate::BlobStore,
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
    for hash in [Some(target.base_hash), target.outer_state, target.center].into_iter().flatten() {
        store.get_state(&hash)?;
    }
    let restored = Head {
        round: head.round,
        open: None,
        base_hash: target.base_hash,
        outer_state: target.outer_state,
        center: target.center,
        base_loss: target.base_loss,
        governance: head.governance,
    };
    let event = Event::RolledBack {
        to_round,
        after_round: head.round,
        previous_base_hash: head.base_hash,
        base_hash: restored.base_hash,
        outer_state: restored.outer_state,
        center: restored.center,
    };
    let mut entries = journal.commit(&restored, Rows::default(), vec![event])?;
    let entry = entries.pop().ok_or(CoordinatorError::Broken)?;
    tracing::warn!(to_round, base = %restored.base_hash.short(), "rolled back");
    Ok((restored, entry))
}

/// Top-level keys whose values differ, for the mismatch message.
fn differing_keys(stored: &serde_json::Value, now: &serde_json::Value) -> String {
    let (Some(a), Some(b)) = (stored.as_object(), now.as_object()) else { return "all".into() };
    let mut keys: Vec<String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
    keys.dedup();
    if keys.is_empty() {
        "none of the keys, only their encoding,".into()
    } else {
        keys.join(", ")
    }
}
