//! The round engine: open a round, take contributions one by one, close it.
//!
//! In durable mode (see [`durable`]) every step is committed to a [`Journal`] together with the
//! ledger entries that describe it, and a restarted coordinator continues where it stopped.

mod durable;

pub use durable::roll_back;

use std::collections::{BTreeMap, BTreeSet};

use weft_core::aggregate::OuterError;
use weft_core::contribution::{self, OpenRound};
use weft_core::quality::{measured_quality, LossTable};
use weft_core::{
    Aggregator, AggregatorError, ContentHash, Contribution, ModelState, NodeId, OuterOptimizer, OuterState, Policy,
    PolicyError, Rejection, StateError, Weighting,
};

use weft_ledger::{ContributionManifest, Event, Refusal};

use crate::aggregation::{self, Accepted, MoveError};
use crate::governance::{Governance, GovernanceError};
use crate::journal::{Head, Journal, JournalError, Rows};

use crate::blobs::{BlobStore, StoreError};
use crate::measure::{Measure, MeasureError};
use crate::record::{ContributionRecord, ManifestEntry, NodeManifest, RoundRecord};

/// A member of the consortium: a node id and the language (jurisdiction) it speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node: NodeId,
    pub language: String,
}

/// What nodes are told when a round opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub round: u64,
    pub base_hash: ContentHash,
}

/// A contribution that passed every check and was measured; the policy decides at close.
#[derive(Clone, Debug, PartialEq)]
pub struct Receipt {
    pub node: NodeId,
    pub quality: f64,
    pub delta_hash: ContentHash,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("outer optimizer: {0}")]
    Outer(#[from] OuterError),
    #[error("measuring: {0}")]
    Measure(#[from] MeasureError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("aggregator: {0}")]
    Aggregator(#[from] AggregatorError),
    #[error("governance: {0}")]
    Governance(#[from] GovernanceError),
    #[error("aggregator {rule} needs at least {needed} accepted deltas but the roster has only {roster} nodes")]
    RosterTooSmall { rule: String, needed: usize, roster: usize },
    #[error("probe scale must be in (0, 1], got {0}")]
    ProbeScale(f32),
    #[error("the roster is empty")]
    EmptyRoster,
    #[error("node {0} is listed twice in the roster")]
    DuplicateMember(NodeId),
    #[error("the initial base is unusable: {0}")]
    Base(StateError),
    #[error("round {0} is already open")]
    RoundOpen(u64),
    #[error("no round is open")]
    NoOpenRound,
    #[error(transparent)]
    Move(#[from] MoveError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("an earlier write to the journal failed; restart the coordinator from its journal")]
    Broken,
    #[error("this coordinator keeps no journal (durable mode is off)")]
    NotDurable,
    #[error(
        "{dir} holds a consortium created with a different configuration ({keys} differ); \
         start it with the settings it was created with, or use a new directory"
    )]
    ConfigMismatch { dir: std::path::PathBuf, keys: String },
    #[error("cannot roll back to round {to}: the last closed round is {last}")]
    RollbackTarget { to: u64, last: u64 },
    #[error("cannot roll back while round {0} is open")]
    RollbackWhileOpen(u64),
    #[error("the journal has no state for round {0}")]
    MissingRound(u64),
}

/// Why `submit` did not return a receipt: the contribution's fault, or the coordinator's.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("rejected: {0}")]
    Rejected(Rejection),
    #[error(transparent)]
    Internal(#[from] CoordinatorError),
}

struct Pending {
    round: u64,
    /// Nodes whose contribution passed the checks this round (one each).
    received: BTreeSet<NodeId>,
    records: Vec<ContributionRecord>,
    measured: Vec<(NodeId, f64)>,
    /// What each measured node declared as its quality (`quality`, else `validation_gain`);
    /// used only by the [`Weighting::Declared`] baseline.
    declared: Vec<(NodeId, f64)>,
    /// Content hash and L2 norm of each measured delta.
    deltas: BTreeMap<NodeId, (ContentHash, f64)>,
    /// Merkle leaves of this round's `contribution_received` ledger entries (durable mode).
    leaves: Vec<ContentHash>,
}

impl Pending {
    fn new(round: u64) -> Self {
        Pending {
            round,
            received: BTreeSet::new(),
            records: Vec::new(),
            measured: Vec::new(),
            declared: Vec::new(),
            deltas: BTreeMap::new(),
            leaves: Vec::new(),
        }
    }
}

pub struct Coordinator<M: Measure> {
    roster: BTreeMap<NodeId, String>,
    roster_ids: BTreeSet<NodeId>,
    policy: Policy,
    outer: OuterOptimizer,
    outer_state: BTreeMap<String, OuterState>,
    aggregator: Aggregator,
    governance: Option<Governance>,
    /// Centered clipping's center from the last round that moved the base.
    center: Option<ModelState>,
    base: ModelState,
    base_hash: ContentHash,
    base_loss: LossTable,
    /// The last closed round (0 before the first).
    round: u64,
    measure: M,
    /// A delta is measured as `base + probe_scale · Δ`: by default 1/N (N = roster size), the
    /// share it would get under equal weighting, so that quality reflects the delta at the size
    /// it can enter the base rather than a whole local model that has drifted to its own data.
    probe_scale: f32,
    store: BlobStore,
    open: Option<Pending>,
    manifests: BTreeMap<NodeId, NodeManifest>,
    /// Durable mode: every step is committed here with its ledger entries.
    journal: Option<Box<dyn Journal>>,
    /// A journal write failed: memory may be ahead of disk, so nothing more is accepted.
    broken: bool,
    /// Blob hashes of the outer optimizer's state and of the center (durable mode).
    outer_hash: Option<ContentHash>,
    center_hash: Option<ContentHash>,
    config_hash: ContentHash,
    roster_hash: ContentHash,
}

impl<M: Measure> Coordinator<M> {
    pub fn new(
        base: ModelState,
        members: Vec<Member>,
        policy: Policy,
        outer: OuterOptimizer,
        mut measure: M,
        store: BlobStore,
    ) -> Result<Self, CoordinatorError> {
        policy.validate()?;
        outer.validate()?;
        if members.is_empty() {
            return Err(CoordinatorError::EmptyRoster);
        }
        let mut roster = BTreeMap::new();
        for m in members {
            if roster.insert(m.node.clone(), m.language).is_some() {
                return Err(CoordinatorError::DuplicateMember(m.node));
            }
        }
        if base.is_empty() {
            return Err(CoordinatorError::Base(StateError::Format("the base has no tensors".into())));
        }
        base.check_finite().map_err(CoordinatorError::Base)?;
        let base_loss = measure.heldout_loss(&base)?;
        let manifests = roster
            .iter()
            .map(|(node, language)| {
                let manifest =
                    NodeManifest { node: node.to_string(), language: language.clone(), contributions: Vec::new() };
                (node.clone(), manifest)
            })
            .collect();
        let probe_scale = 1.0 / roster.len() as f32;
        Ok(Coordinator {
            probe_scale,
            roster_ids: roster.keys().cloned().collect(),
            roster,
            policy,
            outer,
            outer_state: BTreeMap::new(),
            aggregator: Aggregator::WeightedMean,
            governance: None,
            center: None,
            base_hash: base.content_hash(),
            base,
            base_loss,
            round: 0,
            measure,
            store,
            open: None,
            manifests,
            journal: None,
            broken: false,
            outer_hash: None,
            center_hash: None,
            config_hash: ContentHash([0; 32]),
            roster_hash: ContentHash([0; 32]),
        })
    }

    /// Measures deltas at `scale · Δ` instead of the default 1/N; `scale` must be in (0, 1].
    pub fn with_probe_scale(mut self, scale: f32) -> Result<Self, CoordinatorError> {
        if !(scale > 0.0 && scale <= 1.0) {
            return Err(CoordinatorError::ProbeScale(scale));
        }
        self.probe_scale = scale;
        Ok(self)
    }

    /// Combines accepted deltas with `rule` instead of the weighted mean. Refused if the roster
    /// could never supply the inputs the rule needs.
    pub fn with_aggregator(mut self, rule: Aggregator) -> Result<Self, CoordinatorError> {
        rule.validate()?;
        let needed = rule.min_inputs();
        if self.roster.len() < needed {
            return Err(CoordinatorError::RosterTooSmall { rule: rule.to_string(), needed, roster: self.roster.len() });
        }
        self.aggregator = rule;
        Ok(self)
    }

    /// Scores contributions on canaries (public and secret) and weights them with reputation.
    pub fn with_governance(mut self, governance: Governance) -> Self {
        self.governance = Some(governance);
        self
    }

    pub fn governance(&self) -> Option<&Governance> {
        self.governance.as_ref()
    }

    pub fn aggregator(&self) -> &Aggregator {
        &self.aggregator
    }

    pub fn probe_scale(&self) -> f32 {
        self.probe_scale
    }

    pub fn base(&self) -> &ModelState {
        &self.base
    }

    pub fn base_hash(&self) -> ContentHash {
        self.base_hash
    }

    /// Held-out loss per language of the current base.
    pub fn base_loss(&self) -> &LossTable {
        &self.base_loss
    }

    /// The last closed round.
    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn manifests(&self) -> &BTreeMap<NodeId, NodeManifest> {
        &self.manifests
    }

    /// The key that signs the ledger (durable mode).
    pub fn public_key(&self) -> Option<weft_ledger::PublicKey> {
        self.journal.as_ref().and_then(|j| j.public_key())
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// Scores any state on the held-out sets (e.g. a node's sovereign model, for comparison).
    pub fn measure(&mut self, state: &ModelState) -> Result<LossTable, CoordinatorError> {
        Ok(self.measure.heldout_loss(state)?)
    }

    /// The open round, if any, and the nodes whose contribution it has taken for measurement
    /// (a node refused at the checks may still send a valid one).
    pub fn open_round_state(&self) -> Option<(Announcement, BTreeSet<String>)> {
        let pending = self.open.as_ref()?;
        let nodes = pending.records.iter().filter(|r| r.delta_hash.is_some()).map(|r| r.node.clone()).collect();
        Some((Announcement { round: pending.round, base_hash: self.base_hash }, nodes))
    }

    pub fn open_round(&mut self) -> Result<Announcement, CoordinatorError> {
        self.usable()?;
        if let Some(p) = &self.open {
            return Err(CoordinatorError::RoundOpen(p.round));
        }
        let round = self.round + 1;
        self.begin(round)?;
        let event = Event::RoundOpened {
            round,
            base_hash: self.base_hash,
            config_hash: self.config_hash,
            roster_hash: self.roster_hash,
        };
        if let Err(e) = self.commit(Some(round), Rows::default(), vec![event]) {
            self.open = None;
            return Err(e);
        }
        tracing::info!(round, base = %self.base_hash.short(), "round opened");
        Ok(Announcement { round, base_hash: self.base_hash })
    }

    /// Starts round `round` in memory: governance scores the base on its canaries.
    fn begin(&mut self, round: u64) -> Result<(), CoordinatorError> {
        if let Some(g) = self.governance.as_mut() {
            g.open(round, &self.base)?;
        }
        self.open = Some(Pending::new(round));
        Ok(())
    }

    fn usable(&self) -> Result<(), CoordinatorError> {
        if self.broken {
            return Err(CoordinatorError::Broken);
        }
        Ok(())
    }

    /// The state a restart continues from.
    fn head(&self, open: Option<u64>) -> Head {
        Head {
            round: self.round,
            open,
            base_hash: self.base_hash,
            outer_state: self.outer_hash,
            center: self.center_hash,
            base_loss: self.base_loss.clone(),
            governance: self.governance.as_ref().map(|g| g.state().clone()),
        }
    }

    /// Commits one step to the journal (a no-op in memory-only mode). A failure marks the
    /// coordinator broken: it must be restarted from what the journal holds.
    fn commit(
        &mut self,
        open: Option<u64>,
        rows: Rows<'_>,
        events: Vec<Event>,
    ) -> Result<Vec<weft_ledger::Entry>, CoordinatorError> {
        let head = self.head(open);
        let Some(journal) = self.journal.as_mut() else { return Ok(Vec::new()) };
        journal.commit(&head, rows, events).map_err(|e| {
            self.broken = true;
            tracing::error!("journal write failed: {e}");
            CoordinatorError::from(e)
        })
    }

    /// Quality and held-out losses of a delta at the probe scale (on the public canaries when
    /// governance runs).
    fn score(&mut self, node: &NodeId, delta: &weft_core::Delta) -> Result<(f64, LossTable), CoordinatorError> {
        let candidate = delta.applied_to(&self.base, self.probe_scale).map_err(CoordinatorError::Base)?;
        match self.governance.as_mut() {
            Some(g) => {
                let whole = delta.applied_to(&self.base, 1.0).map_err(CoordinatorError::Base)?;
                Ok(g.score(node, &candidate, &whole)?)
            }
            None => {
                let heldout = self.measure.heldout_loss(&candidate)?;
                Ok((measured_quality(&self.base_loss, &heldout), heldout))
            }
        }
    }

    /// Checks a contribution, measures `base + Δ` on the held-out sets, and stores the delta by
    /// its content hash. The base is never touched here. Every outcome is recorded (and, in
    /// durable mode, committed with its ledger entries before this returns).
    pub fn submit(&mut self, contribution: Contribution) -> Result<Receipt, SubmitError> {
        self.submit_signed(contribution, None)
    }

    /// [`submit`](Self::submit) for a contribution whose manifest the node signed (networked
    /// mode): the signature goes into the ledger with it.
    pub fn submit_signed(
        &mut self,
        contribution: Contribution,
        signature: Option<weft_ledger::Signature>,
    ) -> Result<Receipt, SubmitError> {
        self.usable()?;
        let Some(pending) = self.open.as_ref() else {
            return Err(SubmitError::Rejected(Rejection::NoOpenRound));
        };
        let round = pending.round;
        let language = self.roster.get(&contribution.node).cloned();
        let mut record = ContributionRecord {
            node: contribution.node.to_string(),
            language,
            accepted: false,
            reason: None,
            detail: None,
            quality: None,
            weight: 0.0,
            capped: false,
            influence: 0.0,
            // Recorded as sent, less what JSON (and so the journal and ledger) cannot carry.
            declared: contribution
                .declared
                .iter()
                .filter(|(_, v)| v.is_finite())
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            token_count: contribution.token_count,
            delta_hash: None,
            delta_norm: None,
            heldout_loss: None,
        };
        let open = OpenRound {
            round,
            base: &self.base,
            base_hash: self.base_hash,
            roster: &self.roster_ids,
            received: &pending.received,
        };
        if let Err(reason) = contribution::check(&contribution, &open) {
            if let (Some(g), true) = (self.governance.as_mut(), self.roster.contains_key(&contribution.node)) {
                if !matches!(reason, Rejection::DuplicateNode) {
                    g.failed(&contribution.node);
                }
            }
            tracing::warn!(node = %contribution.node, reason = reason.code(), "contribution rejected: {reason}");
            record.reason = Some(reason.code().to_owned());
            record.detail = Some(reason.to_string());
            let received = Event::ContributionReceived {
                round,
                node: record.node.clone(),
                manifest_hash: manifest_of(&contribution, contribution.delta.content_hash()).hash(),
                node_signature: signature,
                delta_hash: None,
                refused: Some(Refusal { code: reason.code().to_owned(), detail: reason.to_string() }),
            };
            let entries =
                self.commit(Some(round), Rows { contribution: Some((round, &record)), closed: None }, vec![received])?;
            if let Some(pending) = self.open.as_mut() {
                pending.leaves.extend(entries.iter().map(weft_ledger::Entry::leaf));
                pending.records.push(record);
            }
            return Err(SubmitError::Rejected(reason));
        }
        // Measured at its fair share of the step (see `probe_scale`).
        let (quality, heldout) = self.score(&contribution.node, &contribution.delta)?;
        weft_core::crash::point("contribution-measured");
        let delta_hash = self.store.put(&contribution.delta).map_err(CoordinatorError::from)?;
        let norm = contribution.delta.norm();
        record.quality = quality.is_finite().then_some(quality);
        record.delta_hash = Some(delta_hash);
        record.delta_norm = Some(norm);
        // JSON (and so the journal) cannot carry an infinite loss: such a table is not kept.
        record.heldout_loss = heldout.values().all(|v| v.is_finite()).then(|| heldout.clone());
        let events = vec![
            Event::ContributionReceived {
                round,
                node: record.node.clone(),
                manifest_hash: manifest_of(&contribution, delta_hash).hash(),
                node_signature: signature,
                delta_hash: Some(delta_hash),
                refused: None,
            },
            Event::Evaluation {
                round,
                node: record.node.clone(),
                quality: record.quality,
                heldout_loss: heldout.iter().map(|(k, v)| (k.clone(), v.is_finite().then_some(*v))).collect(),
                delta_norm: norm,
            },
        ];
        let entries = self.commit(Some(round), Rows { contribution: Some((round, &record)), closed: None }, events)?;
        let claim = contribution.declared.get("quality").or(contribution.declared.get("validation_gain"));
        if let Some(pending) = self.open.as_mut() {
            pending.leaves.extend(entries.first().map(weft_ledger::Entry::leaf));
            pending.received.insert(contribution.node.clone());
            pending.records.push(record);
            pending.measured.push((contribution.node.clone(), quality));
            pending.declared.push((contribution.node.clone(), claim.copied().unwrap_or(f64::NAN)));
            pending.deltas.insert(contribution.node.clone(), (delta_hash, norm));
        }
        tracing::info!(node = %contribution.node, quality, delta = %delta_hash.short(), "contribution measured");
        Ok(Receipt { node: contribution.node, quality, delta_hash })
    }

    /// Applies the policy, aggregates the accepted deltas tensor by tensor from the store, moves
    /// the base with the outer optimizer, and returns the round's record. If nothing is accepted
    /// (or the quorum is missed) the base stays bitwise unchanged.
    pub fn close_round(&mut self) -> Result<RoundRecord, CoordinatorError> {
        let Some(mut pending) = self.open.take() else { return Err(CoordinatorError::NoOpenRound) };
        let scores = if self.policy.weighting == Weighting::Declared { &pending.declared } else { &pending.measured };
        let mut decision = self.policy.decide(scores, self.roster.len());
        if let Some(g) = self.governance.as_ref() {
            g.adjust(&mut decision, self.policy.cap);
        }
        let required = self.policy.required(self.roster.len());
        if decision.weights.len() < required && !decision.weights.is_empty() {
            // Governance removed some: the quorum is judged on what is left.
            let accepted = decision.weights.len();
            for node in std::mem::take(&mut decision.weights).into_keys() {
                decision.rejected.insert(node, Rejection::QuorumNotMet { accepted, required });
            }
            decision.capped.clear();
            decision.unassigned = 1.0;
        }
        // Accepted deltas in node-id order: arrival order never changes a bit of the result.
        let accepted: Vec<Accepted> = decision
            .weights
            .iter()
            .filter_map(|(node, &weight)| {
                pending.deltas.get(node).map(|&(hash, norm)| Accepted { node: node.clone(), hash, weight, norm })
            })
            .collect();
        if !accepted.is_empty() {
            if let Err(AggregatorError::TooFew { rule, needed, got }) = self.aggregator.check_inputs(accepted.len()) {
                for a in &accepted {
                    let reason = Rejection::TooFewForAggregator { rule: rule.clone(), accepted: got, needed };
                    decision.rejected.insert(a.node.clone(), reason);
                }
                decision.weights.clear();
                decision.capped.clear();
                decision.unassigned = 1.0;
            }
        }
        let previous_base_hash = self.base_hash;
        let (outer_in, center_in) = (self.outer_hash, self.center_hash);
        let mut influence = BTreeMap::new();
        if !decision.weights.is_empty() {
            match self.move_base(&accepted) {
                Ok(moved) => {
                    self.base_hash = moved.base_hash;
                    self.base = moved.base;
                    self.outer_state = moved.outer_state;
                    self.outer_hash = moved.outer_hash;
                    if moved.center.is_some() {
                        self.center = moved.center;
                        self.center_hash = moved.center_hash;
                    }
                    influence = moved.influence;
                    self.base_loss = moved.base_loss;
                }
                Err(e) => {
                    // Leave the round closable again: nothing was changed.
                    self.open = Some(pending);
                    return Err(e);
                }
            }
        }
        let governance = self.governance.as_mut().and_then(Governance::commit);
        for record in &mut pending.records {
            let Ok(node) = NodeId::new(record.node.clone()) else { continue };
            if record.delta_hash.is_none() {
                continue; // rejected by the checks; reason already set
            }
            if let Some(&w) = decision.weights.get(&node) {
                record.accepted = true;
                record.weight = w;
                record.influence = influence.get(&node).copied().unwrap_or(0.0);
                record.capped = decision.capped.contains(&node);
            } else if let Some(reason) = decision.rejected.get(&node) {
                record.reason = Some(reason.code().to_owned());
                record.detail = Some(reason.to_string());
            }
        }
        self.round = pending.round;
        let record = RoundRecord {
            round: pending.round,
            previous_base_hash,
            base_hash: self.base_hash,
            base_changed: self.base_hash != previous_base_hash,
            unassigned_share: decision.unassigned,
            quorum_required: self.policy.required(self.roster.len()),
            probe_scale: self.probe_scale,
            aggregator: self.aggregator.to_string(),
            governance,
            accepted: decision.weights.len(),
            contributions: pending.records,
            heldout_loss: self.base_loss.clone(),
        };
        let decision_event = Event::Decision {
            round: record.round,
            accepted: accepted
                .iter()
                .filter_map(|a| {
                    let r = record.contributions.iter().find(|r| r.accepted && r.node == a.node.as_str())?;
                    Some(weft_ledger::Accepted {
                        node: a.node.to_string(),
                        delta_hash: a.hash,
                        weight: a.weight,
                        influence: r.influence,
                        norm: a.norm,
                        capped: r.capped,
                    })
                })
                .collect(),
            rejected: record
                .contributions
                .iter()
                .filter(|r| !r.accepted)
                .map(|r| weft_ledger::Rejected {
                    node: r.node.clone(),
                    code: r.reason.clone().unwrap_or_default(),
                    detail: r.detail.clone().unwrap_or_default(),
                })
                .collect(),
            unassigned: record.unassigned_share,
            aggregator: record.aggregator.clone(),
            cap: self.policy.cap,
            outer: self.outer,
            outer_state_in: outer_in,
            outer_state_out: self.outer_hash,
            center_in,
            center_out: self.center_hash,
            contributions_root: weft_ledger::merkle_root(&pending.leaves),
            contributions: pending.leaves.len(),
            governance_hash: record.governance.as_ref().map(json_hash),
        };
        let mut events = vec![decision_event];
        if record.base_changed {
            events.push(Event::BasePublished {
                round: record.round,
                previous_base_hash,
                base_hash: self.base_hash,
                heldout_loss: self.base_loss.iter().map(|(k, v)| (k.clone(), v.is_finite().then_some(*v))).collect(),
            });
        }
        self.commit(None, Rows { contribution: None, closed: Some(&record) }, events)?;
        self.add_to_manifests(&record);
        tracing::info!(round = record.round, accepted = record.accepted, base = %self.base_hash.short(), "round closed");
        Ok(record)
    }

    /// Each node's manifest gains its entry of a closed round.
    fn add_to_manifests(&mut self, record: &RoundRecord) {
        for r in &record.contributions {
            let Ok(node) = NodeId::new(r.node.clone()) else { continue };
            if let Some(manifest) = self.manifests.get_mut(&node) {
                manifest.contributions.push(ManifestEntry {
                    round: record.round,
                    base_hash: record.previous_base_hash,
                    delta_hash: r.delta_hash,
                    token_count: r.token_count,
                    quality: r.quality,
                    accepted: r.accepted,
                    reason: r.reason.clone(),
                    weight: r.weight,
                    declared: r.declared.clone(),
                });
            }
        }
    }

    /// `next = base + outer(step)`, with the step computed by the aggregator from the store
    /// (see [`aggregation`]), measured, and (in durable mode) stored as blobs before anything
    /// refers to it. Works on copies: an error leaves the coordinator untouched.
    fn move_base(&mut self, accepted: &[Accepted]) -> Result<NextBase, CoordinatorError> {
        let moved = aggregation::move_base(
            &self.aggregator,
            accepted,
            self.policy.cap,
            &self.store,
            &self.base,
            self.center.as_ref(),
            &self.outer,
            &self.outer_state,
        )?;
        weft_core::crash::point("round-aggregated");
        let base_loss = self.measure.heldout_loss(&moved.base)?;
        let durable = self.journal.is_some();
        let base_hash = if durable { self.store.put_state(&moved.base)? } else { moved.base.content_hash() };
        // The optimizer state and center are named only for the ledger: in memory-only mode
        // they are neither copied nor hashed.
        let (mut outer_hash, mut center_hash) = (None, None);
        if durable {
            if let Some(state) =
                aggregation::outer_to_state(&moved.outer_state, &moved.base).map_err(CoordinatorError::Base)?
            {
                outer_hash = Some(self.store.put_state(&state)?);
            }
            if let Some(center) = &moved.outcome.center {
                center_hash = Some(self.store.put_state(center)?);
            }
        }
        weft_core::crash::point("round-blobs-stored");
        Ok(NextBase {
            base: moved.base,
            base_hash,
            base_loss,
            outer_state: moved.outer_state,
            outer_hash,
            center: moved.outcome.center,
            center_hash,
            influence: moved.outcome.influence,
        })
    }
}

/// A round's new base and everything that moves with it.
struct NextBase {
    base: ModelState,
    base_hash: ContentHash,
    base_loss: LossTable,
    outer_state: BTreeMap<String, OuterState>,
    outer_hash: Option<ContentHash>,
    center: Option<ModelState>,
    center_hash: Option<ContentHash>,
    influence: BTreeMap<NodeId, f64>,
}

/// What a node states about its contribution (signed by the node in networked mode).
fn manifest_of(contribution: &Contribution, delta_hash: ContentHash) -> ContributionManifest {
    ContributionManifest {
        node: contribution.node.to_string(),
        round: contribution.round,
        base_hash: contribution.base_hash,
        delta_hash,
        token_count: contribution.token_count,
        declared: contribution.declared.clone(),
    }
}

/// BLAKE3 of a value's JSON.
pub(crate) fn json_hash<T: serde::Serialize>(value: &T) -> ContentHash {
    ContentHash(*blake3::hash(&serde_json::to_vec(value).unwrap_or_default()).as_bytes())
}
