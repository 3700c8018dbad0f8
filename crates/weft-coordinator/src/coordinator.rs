//! The round engine: open a round, take contributions one by one, close it.

use std::collections::{BTreeMap, BTreeSet};

use weft_core::aggregate::{LengthError, OuterError};
use weft_core::contribution::{self, OpenRound};
use weft_core::quality::{measured_quality, LossTable};
use weft_core::{
    Aggregator, AggregatorError, ContentHash, Contribution, ModelState, NodeId, OuterOptimizer, OuterState, Policy,
    PolicyError, Rejection, StateError, Weighting,
};

use crate::aggregation::{self, Accepted};
use crate::governance::{Governance, GovernanceError};

use crate::measure::{Measure, MeasureError};
use crate::record::{ContributionRecord, ManifestEntry, NodeManifest, RoundRecord};
use crate::store::{DeltaStore, StoreError};

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
    #[error("aggregation: {0}")]
    Aggregate(#[from] LengthError),
    #[error("aggregation produced a non-finite base ({0}); the base is left unchanged")]
    NonFiniteResult(StateError),
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
    store: DeltaStore,
    open: Option<Pending>,
    manifests: BTreeMap<NodeId, NodeManifest>,
}

impl<M: Measure> Coordinator<M> {
    pub fn new(
        base: ModelState,
        members: Vec<Member>,
        policy: Policy,
        outer: OuterOptimizer,
        mut measure: M,
        store: DeltaStore,
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

    pub fn store(&self) -> &DeltaStore {
        &self.store
    }

    /// Scores any state on the held-out sets (e.g. a node's sovereign model, for comparison).
    pub fn measure(&mut self, state: &ModelState) -> Result<LossTable, CoordinatorError> {
        Ok(self.measure.heldout_loss(state)?)
    }

    pub fn open_round(&mut self) -> Result<Announcement, CoordinatorError> {
        if let Some(p) = &self.open {
            return Err(CoordinatorError::RoundOpen(p.round));
        }
        let round = self.round + 1;
        if let Some(g) = self.governance.as_mut() {
            g.open(round, &self.base)?;
        }
        self.open = Some(Pending {
            round,
            received: BTreeSet::new(),
            records: Vec::new(),
            measured: Vec::new(),
            declared: Vec::new(),
            deltas: BTreeMap::new(),
        });
        tracing::info!(round, base = %self.base_hash.short(), "round opened");
        Ok(Announcement { round, base_hash: self.base_hash })
    }

    /// Checks a contribution, measures `base + Δ` on the held-out sets, and stores the delta by
    /// its content hash. The base is never touched here. Every outcome is recorded.
    pub fn submit(&mut self, contribution: Contribution) -> Result<Receipt, SubmitError> {
        let Some(pending) = self.open.as_mut() else {
            return Err(SubmitError::Rejected(Rejection::NoOpenRound));
        };
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
            declared: contribution.declared.clone(),
            token_count: contribution.token_count,
            delta_hash: None,
            delta_norm: None,
            heldout_loss: None,
        };
        let open = OpenRound {
            round: pending.round,
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
            pending.records.push(record);
            return Err(SubmitError::Rejected(reason));
        }
        pending.received.insert(contribution.node.clone());
        // Measured at its fair share of the step (see `probe_scale`). Checked above: same layout
        // as the base and finite, so this cannot fail.
        let candidate = contribution
            .delta
            .applied_to(&self.base, self.probe_scale)
            .map_err(|e| SubmitError::Internal(CoordinatorError::Base(e)))?;
        let (quality, heldout) = match self.governance.as_mut() {
            // With governance, quality is measured on the public canaries.
            Some(g) => {
                let whole = contribution
                    .delta
                    .applied_to(&self.base, 1.0)
                    .map_err(|e| SubmitError::Internal(CoordinatorError::Base(e)))?;
                g.score(&contribution.node, &candidate, &whole).map_err(CoordinatorError::from)?
            }
            None => {
                let heldout = self.measure.heldout_loss(&candidate).map_err(CoordinatorError::from)?;
                (measured_quality(&self.base_loss, &heldout), heldout)
            }
        };
        drop(candidate);
        let delta_hash = self.store.put(&contribution.delta).map_err(CoordinatorError::from)?;
        record.quality = quality.is_finite().then_some(quality);
        record.delta_hash = Some(delta_hash);
        let norm = contribution.delta.norm();
        record.delta_norm = Some(norm);
        record.heldout_loss = Some(heldout);
        pending.records.push(record);
        pending.measured.push((contribution.node.clone(), quality));
        let claim = contribution.declared.get("quality").or(contribution.declared.get("validation_gain"));
        pending.declared.push((contribution.node.clone(), claim.copied().unwrap_or(f64::NAN)));
        pending.deltas.insert(contribution.node.clone(), (delta_hash, norm));
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
        let mut influence = BTreeMap::new();
        if !decision.weights.is_empty() {
            match self.aggregate(&accepted) {
                Ok((next, outer_state, outcome)) => {
                    self.base_hash = next.content_hash();
                    self.base = next;
                    self.outer_state = outer_state;
                    if outcome.center.is_some() {
                        self.center = outcome.center;
                    }
                    influence = outcome.influence;
                    self.base_loss = self.measure.heldout_loss(&self.base)?;
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
        for record in &pending.records {
            let Ok(node) = NodeId::new(record.node.clone()) else { continue };
            if let Some(manifest) = self.manifests.get_mut(&node) {
                manifest.contributions.push(ManifestEntry {
                    round: pending.round,
                    base_hash: previous_base_hash,
                    delta_hash: record.delta_hash,
                    token_count: record.token_count,
                    quality: record.quality,
                    accepted: record.accepted,
                    reason: record.reason.clone(),
                    weight: record.weight,
                    declared: record.declared.clone(),
                });
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
        tracing::info!(round = record.round, accepted = record.accepted, base = %self.base_hash.short(), "round closed");
        Ok(record)
    }

    /// `next = base + outer(step)`, with the step computed by the aggregator from the store
    /// (see [`aggregation`]). Works on copies: an error leaves the coordinator untouched.
    fn aggregate(
        &self,
        accepted: &[Accepted],
    ) -> Result<(ModelState, BTreeMap<String, OuterState>, aggregation::Outcome), CoordinatorError> {
        let outcome = aggregation::aggregate(
            &self.aggregator,
            accepted,
            self.policy.cap,
            &self.store,
            &self.base,
            self.center.as_ref(),
        )?;
        let mut next = self.base.clone();
        let mut outer_state = self.outer_state.clone();
        for ((name, tensor), (_, step)) in next.iter_mut().zip(outcome.step.iter()) {
            let state = outer_state.entry(name.to_owned()).or_default();
            self.outer.apply(tensor.data_mut(), step.data(), state)?;
        }
        next.check_finite().map_err(CoordinatorError::NonFiniteResult)?;
        if !self.outer.keeps_state() {
            outer_state.clear();
        }
        Ok((next, outer_state, outcome))
    }
}
