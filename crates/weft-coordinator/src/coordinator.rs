//! The round engine: open a round, take contributions one by one, close it.
//!
//! A round's life, as the methods below read:
//! * [`open_round`](Coordinator::open_round) announces the round and the base;
//! * [`submit`](Coordinator::submit) checks a contribution, measures it on the held-out sets,
//!   stores its delta and admits it (or refuses it, with a named reason);
//! * [`close_round`](Coordinator::close_round) decides (policy, governance, quorum), advances the
//!   model point with the aggregator and the outer optimizer, records and publishes.
//!
//! In durable mode (see [`durable`]) every step is committed to a [`Journal`] together with the
//! ledger entries that describe it, and a restarted coordinator continues where it stopped.

mod durable;

pub use durable::{roll_back, ConfigDifference, DurableCoordinator};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use weft_core::aggregate::OuterError;
use weft_core::contribution::{self, OpenRound};
use weft_core::gauntlet::{self, BreakerRules, GauntletRules, ItemLosses};
use weft_core::language_check::{helped_languages, regressions, LanguageSearch, Verdict};
use weft_core::policy::{Measured, Priorities};
use weft_core::quality::{mean, relative_gains, Gains, LossTable};
use weft_core::{
    AdapterFamily, AdapterPlan, AdapterRound, Aggregator, AggregatorError, ContentHash, Contribution, Decision, Delta,
    FullWeights, ModelState, NodeId, OuterOptimizer, Policy, PolicyError, Rejection, RuleChange, StateError,
    UpdateForm, VotingRules, Weighting,
};
use weft_ledger::{
    CheckAttempt, CheckOutcome, ContributionManifest, Event, LanguageCheck, PublicKey, Refusal, Signature, Voter,
    WitnessedHead,
};

use crate::aggregation::{self, Accepted, Influence, MoveError, StepRules};
use crate::governance::{Governance, GovernanceError};
use crate::head::{ModelHead, ModelPoint, ModelRefs};
use crate::journal::{BreakerWatch, Head, Journal, JournalError, Rows};
use crate::measure::{Measure, MeasureError};
use crate::privacy::PrivacyRules;
use crate::proposals::{equal_electorate, ProposalBook, ProposalError};
use crate::record::{
    unix_ms, ContributionRecord, ContributionTiming, CountedProposal, Judgment, ManifestEntry, NodeManifest,
    RoundRecord, RoundTiming,
};
use crate::store::{BlobStore, StoreError};

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
    Base(#[source] StateError),
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
    #[error("the journal has no signing key (it was opened read-only)")]
    NotDurable,
    #[error(
        "{dir} holds a consortium created with a different configuration ({}); \
         start it with the settings it was created with, or use a new directory",
        differences.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    ConfigMismatch { dir: std::path::PathBuf, differences: Vec<ConfigDifference> },
    #[error("cannot roll back to round {to}: the last closed round is {last}")]
    RollbackTarget { to: u64, last: u64 },
    #[error("cannot roll back while round {0} is open")]
    RollbackWhileOpen(u64),
    #[error("the journal has no state for round {0}")]
    MissingRound(u64),
    #[error("adapter rounds: {0}")]
    Adapter(String),
    #[error("differential privacy: {0}")]
    Privacy(String),
    #[error("gauntlet: {0}")]
    Gauntlet(String),
    #[error("voting: {0}")]
    Voting(String),
    #[error("circuit breaker: {0}")]
    Breaker(String),
}

/// Why a proposal or vote was not recorded: the member's fault (with a stable code), or the
/// coordinator's.
#[derive(Debug, thiserror::Error)]
pub enum ProposalSubmitError {
    #[error(transparent)]
    Refused(#[from] ProposalError),
    #[error(transparent)]
    Internal(#[from] CoordinatorError),
}

/// Why `submit` did not return a receipt: the contribution's fault, or the coordinator's.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("rejected: {0}")]
    Rejected(Rejection),
    #[error(transparent)]
    Internal(#[from] CoordinatorError),
}

/// What the coordinator measured of an admitted contribution, kept until the round closes.
#[derive(Clone, Debug)]
struct Admitted {
    /// The mean over languages of `gains`.
    quality: f64,
    /// The probe's relative gain per language (empty when unmeasurable).
    gains: Gains,
    /// What the node declared as its quality; only the `declared` weighting baseline reads it.
    declared_quality: f64,
    delta_hash: ContentHash,
    delta_norm: f64,
}

/// A probe's measurement: its held-out losses and its relative gains over the base's.
struct Measurement {
    heldout: LossTable,
    gains: Option<Gains>,
}

impl Measurement {
    fn new(base: &LossTable, heldout: LossTable) -> Self {
        Measurement { gains: relative_gains(base, &heldout), heldout }
    }

    fn quality(&self) -> f64 {
        self.gains.as_ref().map_or(f64::NAN, mean)
    }
}

/// How a round closes: its decision, the deltas that entered the step, the next model point with
/// its held-out loss and the coefficients the deltas carried (`None`: the base stays), and the
/// per-language check.
struct Settled {
    decision: Decision,
    accepted: Vec<Accepted>,
    next: Option<(ModelPoint, LossTable, Influence)>,
    check: Option<LanguageCheck>,
}

/// A contribution being taken in: its record, and when taking it in started.
struct Intake {
    record: ContributionRecord,
    started: std::time::Instant,
}

impl Intake {
    /// The record, with the intake's duration up to now (just before it is committed).
    fn finished(mut self) -> ContributionRecord {
        if let Some(timing) = self.record.timing.as_mut() {
            timing.intake_ms = self.started.elapsed().as_secs_f64() * 1e3;
        }
        self.record
    }
}

/// The round being collected.
struct Pending {
    round: u64,
    /// What the round's updates stand for: full-weight deltas, or this round's adapter.
    form: Arc<dyn UpdateForm>,
    /// Every contribution received, in arrival order, refused ones included.
    records: Vec<ContributionRecord>,
    /// The contributions that passed the checks and were measured (one per node).
    admitted: BTreeMap<NodeId, Admitted>,
    /// Merkle leaves of this round's `contribution_received` ledger entries (durable mode).
    leaves: Vec<ContentHash>,
    /// When it opened (`None` when reopened after a restart: the time is not kept).
    opened: Option<std::time::SystemTime>,
}

impl Pending {
    fn new(round: u64, form: Arc<dyn UpdateForm>) -> Self {
        let opened = Some(std::time::SystemTime::now());
        Pending { round, form, records: Vec::new(), admitted: BTreeMap::new(), leaves: Vec::new(), opened }
    }

    /// Takes a measured contribution into the round: the one place a node becomes a candidate,
    /// whether it just arrived or is restored from the journal after a restart.
    fn admit(&mut self, record: ContributionRecord, admitted: Admitted) {
        self.admitted.insert(record.node.clone(), admitted);
        self.records.push(record);
    }

    /// What the policy weighs, for every admitted node: measured quality (the declared one for
    /// the baseline), gains per language, and the base's loss on the node's own language.
    fn measured(
        &self,
        weighting: Weighting,
        roster: &BTreeMap<NodeId, String>,
        base_loss: &LossTable,
    ) -> Vec<Measured> {
        self.admitted
            .iter()
            .map(|(node, a)| Measured {
                node: node.clone(),
                quality: if weighting == Weighting::Declared { a.declared_quality } else { a.quality },
                gains: a.gains.clone(),
                own_loss: roster.get(node).and_then(|l| base_loss.get(l)).copied().unwrap_or(f64::NAN),
            })
            .collect()
    }

    /// The decision's accepted deltas, in node-id order: arrival order never changes a bit.
    fn accepted(&self, decision: &Decision) -> Vec<Accepted> {
        decision
            .weights
            .iter()
            .filter_map(|(node, &weight)| {
                let a = self.admitted.get(node)?;
                Some(Accepted { node: node.clone(), hash: a.delta_hash, weight, norm: a.delta_norm })
            })
            .collect()
    }
}

/// The consortium's rules for a round, fixed when it was created.
#[derive(Clone, Copy, Debug)]
struct Rules {
    policy: Policy,
    aggregator: Aggregator,
    outer: OuterOptimizer,
    /// A delta is measured as `base + probe_scale · Δ`: by default 1/N (N = roster size), the
    /// share it would get under equal weighting, so that quality reflects the delta at the size
    /// it can enter the base rather than a whole local model that has drifted to its own data.
    probe_scale: f32,
    /// Champion–challenger adoption: a round's aggregate replaces the base only if it passes.
    gauntlet: Option<GauntletRules>,
    /// The circuit breaker: published bases watched against the base before them.
    breaker: Option<BreakerRules>,
}

impl Rules {
    fn step(&self) -> StepRules {
        StepRules { aggregator: self.aggregator, cap: self.policy.cap, scale: 1.0, outer: self.outer }
    }
}

/// Secure aggregation's state: the nodes, the community size, and the partition drawn for the
/// open round (community id → members).
struct Communities {
    nodes: Vec<String>,
    size: usize,
    drawn: Option<(u64, BTreeMap<String, Vec<String>>)>,
}

pub struct Coordinator<M: Measure> {
    /// node → language.
    roster: BTreeMap<NodeId, String>,
    roster_ids: BTreeSet<NodeId>,
    rules: Rules,
    governance: Option<Governance>,
    /// Differential privacy: the mechanism every contribution must state and each node's budget.
    privacy: Option<PrivacyRules>,
    /// Secure aggregation: the nodes behind the roster's communities.
    communities: Option<Communities>,
    head: ModelHead,
    /// The genesis base's held-out loss: what the per-language check measures each language's
    /// progress against.
    genesis_loss: LossTable,
    /// The last closed round (0 before the first).
    round: u64,
    measure: M,
    store: Arc<dyn BlobStore>,
    open: Option<Pending>,
    manifests: BTreeMap<NodeId, NodeManifest>,
    /// Durable mode: every step is committed here with its ledger entries.
    journal: Option<Box<dyn Journal>>,
    /// A journal write failed: memory may be ahead of disk, so nothing more is accepted.
    broken: bool,
    config_hash: ContentHash,
    roster_hash: ContentHash,
    /// Low-rank adapter rounds: the plan and the model family that builds each round's factors.
    adapters: Option<(AdapterPlan, Arc<dyn AdapterFamily>)>,
    /// The champion's per-item losses (gauntlet), by the base they were measured on.
    champion_items: Option<(ContentHash, ItemLosses)>,
    /// The ledger's last entry (durable mode): what nodes are handed to witness.
    ledger_head: Option<WitnessedHead>,
    /// Class-3 proposals and votes (`[voting]`), with the members who may make and vote them.
    proposals: Option<(ProposalBook, BTreeMap<String, Voter>)>,
    /// The circuit breaker's watch: the base before the watched publications (kept whole, to be
    /// restored at once) and the last round watched.
    watch: Option<Watch>,
}

/// What the circuit breaker guards and until when.
struct Watch {
    anchor_round: u64,
    anchor: ModelHead,
    until: u64,
}

impl<M: Measure> Coordinator<M> {
    pub fn new(
        base: ModelState,
        members: Vec<Member>,
        policy: Policy,
        outer: OuterOptimizer,
        mut measure: M,
        store: Arc<dyn BlobStore>,
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
        let refs = ModelRefs { base_hash: base.content_hash(), outer_state: None, center: None };
        let manifests = roster
            .iter()
            .map(|(node, language)| {
                let manifest =
                    NodeManifest { node: node.clone(), language: language.clone(), contributions: Vec::new() };
                (node.clone(), manifest)
            })
            .collect();
        let probe_scale = 1.0 / roster.len() as f32;
        Ok(Coordinator {
            roster_ids: roster.keys().cloned().collect(),
            roster,
            rules: Rules {
                policy,
                aggregator: Aggregator::WeightedMean,
                outer,
                probe_scale,
                gauntlet: None,
                breaker: None,
            },
            governance: None,
            privacy: None,
            communities: None,
            genesis_loss: base_loss.clone(),
            head: ModelHead { point: ModelPoint::new(base), refs, base_loss },
            round: 0,
            measure,
            store,
            open: None,
            manifests,
            journal: None,
            broken: false,
            config_hash: ContentHash([0; 32]),
            roster_hash: ContentHash([0; 32]),
            adapters: None,
            champion_items: None,
            ledger_head: None,
            proposals: None,
            watch: None,
        })
    }

    /// Contributions are low-rank adapters (LoRA's shared track): each round's frozen A factors
    /// come from `plan` through `family`, nodes send only B, and the coordinator measures and
    /// aggregates B and merges the weighted step into the base. A step of adapters from different
    /// rounds has no common coordinates, so an outer optimizer with momentum and centered
    /// clipping (which carry a vector from one round to the next) are refused.
    pub fn with_adapters(
        mut self,
        plan: AdapterPlan,
        family: Arc<dyn AdapterFamily>,
    ) -> Result<Self, CoordinatorError> {
        if !matches!(self.rules.outer, OuterOptimizer::Plain { .. }) {
            return Err(CoordinatorError::Adapter(format!(
                "the outer optimizer must be plain (no momentum), got {:?}",
                self.rules.outer
            )));
        }
        if let Some(why) = plan.refuses(&self.rules.aggregator) {
            return Err(CoordinatorError::Adapter(why));
        }
        // The first round's factors are built now, so that a plan the model cannot carry fails here.
        family.form(&plan.round(1)).map_err(|e| CoordinatorError::Adapter(e.to_string()))?;
        self.adapters = Some((plan, family));
        Ok(self)
    }

    /// The open round's adapter, when contributions are adapters.
    pub fn adapter_round(&self) -> Option<AdapterRound> {
        self.open.as_ref().and_then(|p| p.form.adapter().cloned())
    }

    /// Runs `f` on the layout an update to the open round must have (the base itself for full
    /// deltas, without a copy); `None` when no round is open.
    pub fn with_update_layout<R>(&self, f: impl FnOnce(&ModelState) -> R) -> Option<R> {
        let pending = self.open.as_ref()?;
        Some(f(pending.form.layout(self.head.base())))
    }

    /// The open round's form (full weights when no round is open: nothing is then admitted).
    fn open_form(&self) -> Arc<dyn UpdateForm> {
        self.open.as_ref().map_or_else(|| Arc::new(FullWeights) as Arc<dyn UpdateForm>, |p| p.form.clone())
    }

    /// The form of round `round`'s updates.
    fn form_of(&self, round: u64) -> Result<Arc<dyn UpdateForm>, CoordinatorError> {
        match &self.adapters {
            None => Ok(Arc::new(FullWeights)),
            Some((plan, family)) => {
                family.form(&plan.round(round)).map_err(|e| CoordinatorError::Adapter(e.to_string()))
            }
        }
    }

    /// Measures deltas at `scale · Δ` instead of the default 1/N; `scale` must be in (0, 1].
    pub fn with_probe_scale(mut self, scale: f32) -> Result<Self, CoordinatorError> {
        if !(scale > 0.0 && scale <= 1.0) {
            return Err(CoordinatorError::ProbeScale(scale));
        }
        self.rules.probe_scale = scale;
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
        if let Some(why) = self.adapters.as_ref().and_then(|(plan, _)| plan.refuses(&rule)) {
            return Err(CoordinatorError::Adapter(why));
        }
        self.rules.aggregator = rule;
        Ok(self)
    }

    /// Champion–challenger adoption: each round's aggregate is a challenger, published only if
    /// the gauntlet ([`weft_core::gauntlet`]) finds it significantly better than the base on the
    /// held-out items and no language worse beyond `rules.non_inferiority`. The measure must score
    /// items: that is checked here, on the base.
    pub fn with_gauntlet(mut self, rules: GauntletRules) -> Result<Self, CoordinatorError> {
        rules.validate().map_err(|e| CoordinatorError::Gauntlet(e.to_string()))?;
        let items = self.measure.item_losses(self.head.base())?;
        gauntlet::judge(&rules, &items, &items, 0).map_err(|e| CoordinatorError::Gauntlet(e.to_string()))?;
        self.champion_items = Some((self.base_hash(), items));
        self.rules.gauntlet = Some(rules);
        Ok(self)
    }

    /// Class-3 changes by vote: members (node → ed25519 key; one member, one vote) make
    /// proposals and vote on them; a change that passes `voting` applies after its time-lock.
    pub fn with_voting(
        mut self,
        voting: VotingRules,
        members: &BTreeMap<String, PublicKey>,
    ) -> Result<Self, CoordinatorError> {
        voting.validate().map_err(|e| CoordinatorError::Voting(e.to_string()))?;
        if members.is_empty() {
            return Err(CoordinatorError::Voting("no member may vote".into()));
        }
        self.proposals = Some((ProposalBook::new(voting, self.rules.policy), equal_electorate(members)));
        Ok(self)
    }

    /// The proposals, open and passed (`None` without `[voting]`).
    pub fn proposals(&self) -> Option<&ProposalBook> {
        self.proposals.as_ref().map(|(book, _)| book)
    }

    /// A member's signed class-3 proposal, made after round `after_round` closed (it is part of
    /// what the member signs), recorded (`proposal_made`) once every check passed; returns its
    /// id. Changes no rule: a passed vote and the time-lock do.
    pub fn propose(
        &mut self,
        after_round: u64,
        proposer: &str,
        rationale: &str,
        change: RuleChange,
        signature: Signature,
    ) -> Result<ContentHash, ProposalSubmitError> {
        self.usable()?;
        let (book, members) = self.proposals.as_ref().ok_or(ProposalError::NoVoting)?;
        if after_round != self.round {
            return Err(ProposalError::StaleRound { signed: after_round, last: self.round }.into());
        }
        let event = book.propose(self.round, proposer, rationale, change, signature, members)?;
        let Event::ProposalMade { proposal, .. } = &event else { return Err(ProposalError::NoVoting.into()) };
        let id = *proposal;
        self.record_proposal_event(event)?;
        tracing::info!(proposal = %id.short(), %proposer, "proposal made");
        Ok(id)
    }

    /// A member's signed vote on an open proposal, recorded (`vote_cast`).
    pub fn vote(
        &mut self,
        proposal: ContentHash,
        voter: &str,
        approve: bool,
        signature: Signature,
    ) -> Result<(), ProposalSubmitError> {
        self.usable()?;
        let (book, _) = self.proposals.as_ref().ok_or(ProposalError::NoVoting)?;
        let event = book.vote(self.round, proposal, voter, approve, signature)?;
        self.record_proposal_event(event)?;
        tracing::info!(proposal = %proposal.short(), %voter, approve, "vote cast");
        Ok(())
    }

    fn record_proposal_event(&mut self, event: Event) -> Result<(), CoordinatorError> {
        let open = self.open.as_ref().map(|p| p.round);
        self.commit(open, Rows::default(), vec![event.clone()])?;
        self.apply_proposal_events(std::slice::from_ref(&event))
    }

    /// Moves the book by committed events; the rules in force follow it.
    pub(crate) fn apply_proposal_events(&mut self, events: &[Event]) -> Result<(), CoordinatorError> {
        let Some((book, _)) = self.proposals.as_mut() else { return Ok(()) };
        for event in events {
            book.apply(event).map_err(CoordinatorError::Voting)?;
        }
        self.rules.policy = book.policy;
        Ok(())
    }

    /// The circuit breaker ([`BreakerRules`]): a published base is watched for `watch_rounds`
    /// rounds against the base before it, and a language that rises beyond `threshold` rolls
    /// the consortium back to that base at once.
    pub fn with_breaker(mut self, rules: BreakerRules) -> Result<Self, CoordinatorError> {
        rules.validate().map_err(|e| CoordinatorError::Breaker(e.to_string()))?;
        self.rules.breaker = Some(rules);
        Ok(self)
    }

    pub fn gauntlet(&self) -> Option<&GauntletRules> {
        self.rules.gauntlet.as_ref()
    }

    /// Scores contributions on canaries (public and secret) and weights them with reputation.
    pub fn with_governance(mut self, governance: Governance) -> Self {
        self.governance = Some(governance);
        self
    }

    /// Every contribution must state the consortium's DP-SGD mechanism, and each node is charged
    /// the composed ε of its rounds; one that would exceed its budget is refused
    /// (`privacy_budget_exhausted`).
    pub fn with_privacy(mut self, rules: PrivacyRules) -> Result<Self, CoordinatorError> {
        rules.rule.validate().map_err(|e| CoordinatorError::Privacy(e.to_string()))?;
        if rules.steps_per_round == 0 {
            return Err(CoordinatorError::Privacy("a round of DP-SGD needs at least one step".into()));
        }
        self.privacy = Some(rules);
        Ok(self)
    }

    /// Secure aggregation: the roster's members are communities of `size` of `nodes`, redrawn
    /// each round ([`draw_communities`](Self::draw_communities)); contributions are community
    /// means, never one node's update.
    pub fn with_secure_aggregation(mut self, nodes: Vec<NodeId>, size: usize) -> Result<Self, CoordinatorError> {
        let nodes: Vec<String> = nodes.iter().map(ToString::to_string).collect();
        let expected = nodes.len() / size.max(1);
        if size < 3 || expected == 0 || self.roster.len() != expected {
            return Err(CoordinatorError::Privacy(format!(
                "secure aggregation in communities of {size} needs at least 3 per community and a roster of {expected} communities for {} nodes, got {}",
                nodes.len(),
                self.roster.len()
            )));
        }
        self.communities = Some(Communities { nodes, size, drawn: None });
        Ok(self)
    }

    /// The open round's one partition into communities, drawn from the seed its opening fixed
    /// and recorded in the ledger the first time it is asked for. The same round always gives
    /// the same partition: there is no second one.
    pub fn draw_communities(&mut self) -> Result<BTreeMap<String, Vec<String>>, CoordinatorError> {
        self.usable()?;
        let Some(round) = self.open.as_ref().map(|p| p.round) else { return Err(CoordinatorError::NoOpenRound) };
        let seed = crate::privacy::community_seed(round, &self.base_hash(), &self.config_hash, &self.roster_hash);
        let Some(Communities { nodes, size, drawn }) = self.communities.as_ref() else {
            return Err(CoordinatorError::Privacy("this consortium runs without secure aggregation".into()));
        };
        if let Some((r, partition)) = drawn {
            if *r == round {
                return Ok(partition.clone());
            }
        }
        let size = *size;
        let partition = crate::privacy::draw_communities(&seed, nodes, size)
            .map_err(|e| CoordinatorError::Privacy(e.to_string()))?;
        let event =
            Event::CommunitiesDrawn { round, seed, community_size: size as u64, communities: partition.clone() };
        // After a restart the same partition is recorded again; verify accepts only identical ones.
        self.commit(Some(round), Rows::default(), vec![event])?;
        if let Some(communities) = self.communities.as_mut() {
            communities.drawn = Some((round, partition.clone()));
        }
        Ok(partition)
    }

    pub fn privacy(&self) -> Option<&PrivacyRules> {
        self.privacy.as_ref()
    }

    /// Rounds `node` has been charged for in closed rounds.
    fn rounds_charged(&self, node: &NodeId) -> u64 {
        self.manifests.get(node).map_or(0, |m| m.contributions.iter().filter(|e| e.privacy.is_some()).count() as u64)
    }

    pub fn governance(&self) -> Option<&Governance> {
        self.governance.as_ref()
    }

    pub fn aggregator(&self) -> &Aggregator {
        &self.rules.aggregator
    }

    pub fn probe_scale(&self) -> f32 {
        self.rules.probe_scale
    }

    pub fn base(&self) -> &ModelState {
        self.head.base()
    }

    pub fn base_hash(&self) -> ContentHash {
        self.head.base_hash()
    }

    /// Held-out loss per language of the current base.
    pub fn base_loss(&self) -> &LossTable {
        &self.head.base_loss
    }

    /// The last closed round.
    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn policy(&self) -> &Policy {
        &self.rules.policy
    }

    pub fn manifests(&self) -> &BTreeMap<NodeId, NodeManifest> {
        &self.manifests
    }

    /// The blob store: bases, deltas and optimizer state by content hash.
    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    /// Scores any state on the held-out sets (e.g. a node's sovereign model, for comparison).
    pub fn measure(&mut self, state: &ModelState) -> Result<LossTable, CoordinatorError> {
        Ok(self.measure.heldout_loss(state)?)
    }

    /// The open round, if any, and the nodes whose contribution it has taken for measurement
    /// (a node refused at the checks may still send a valid one).
    pub fn open_round_state(&self) -> Option<(Announcement, BTreeSet<NodeId>)> {
        let pending = self.open.as_ref()?;
        let nodes = pending.admitted.keys().cloned().collect();
        Some((Announcement { round: pending.round, base_hash: self.base_hash() }, nodes))
    }

    pub fn open_round(&mut self) -> Result<Announcement, CoordinatorError> {
        self.usable()?;
        if let Some(p) = &self.open {
            return Err(CoordinatorError::RoundOpen(p.round));
        }
        let round = self.round + 1;
        self.begin(round)?;
        let base_hash = self.base_hash();
        // Passed changes whose time-lock ends now: the round runs under them.
        let mut events = self.proposals.as_ref().map(|(book, _)| book.changes_due(round)).unwrap_or_default();
        let changes = events.clone();
        events.push(Event::RoundOpened {
            round,
            base_hash,
            config_hash: self.config_hash,
            roster_hash: self.roster_hash,
            adapter: self.adapter_round(),
        });
        if let Err(e) = self.commit(Some(round), Rows::default(), events) {
            self.open = None;
            return Err(e);
        }
        self.apply_proposal_events(&changes)?;
        for change in &changes {
            if let Event::RulesChanged { proposal, policy, .. } = change {
                tracing::info!(round, proposal = %proposal.short(), cap = policy.cap, floor = policy.floor, quorum = policy.quorum, "rules changed by vote");
            }
        }
        tracing::info!(round, base = %base_hash.short(), "round opened");
        Ok(Announcement { round, base_hash })
    }

    /// Starts round `round` in memory: governance scores the base on its canaries.
    fn begin(&mut self, round: u64) -> Result<(), CoordinatorError> {
        if let Some(g) = self.governance.as_mut() {
            g.open(round, self.head.base())?;
        }
        let form = self.form_of(round)?;
        self.open = Some(Pending::new(round, form));
        Ok(())
    }

    fn usable(&self) -> Result<(), CoordinatorError> {
        if self.broken {
            return Err(CoordinatorError::Broken);
        }
        Ok(())
    }

    /// The state a restart continues from.
    fn journal_head(&self, open: Option<u64>) -> Head {
        Head {
            round: self.round,
            open,
            model: self.head.refs,
            base_loss: self.head.base_loss.clone(),
            governance: self.governance.as_ref().map(|g| g.state().clone()),
            watch: self.watch.as_ref().map(|w| BreakerWatch {
                anchor_round: w.anchor_round,
                until: w.until,
                anchor: w.anchor.refs,
                anchor_loss: w.anchor.base_loss.clone(),
            }),
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
        let head = self.journal_head(open);
        let Some(journal) = self.journal.as_mut() else { return Ok(Vec::new()) };
        let entries = journal.commit(&head, rows, events).map_err(|e| {
            self.broken = true;
            tracing::error!("journal write failed: {e}");
            CoordinatorError::from(e)
        })?;
        if let Some(last) = entries.last() {
            self.ledger_head = Some(WitnessedHead::of(last));
        }
        Ok(entries)
    }

    /// The ledger's last entry as nodes witness it (`None` in memory-only mode).
    pub fn ledger_head(&self) -> Option<&WitnessedHead> {
        self.ledger_head.as_ref()
    }

    /// Checks a contribution, measures it on the held-out sets at the probe scale
    /// (`base + s·Δ`), and stores the delta by its content hash. The base is never touched here.
    /// Every outcome is recorded (and, in durable mode, committed with its ledger entries before
    /// this returns).
    pub fn submit(&mut self, contribution: Contribution) -> Result<Receipt, SubmitError> {
        self.submit_signed(contribution, None)
    }

    /// [`submit`](Self::submit) for a contribution whose manifest the node signed (networked
    /// mode): the signature goes into the ledger with it.
    pub fn submit_signed(
        &mut self,
        contribution: Contribution,
        signature: Option<Signature>,
    ) -> Result<Receipt, SubmitError> {
        self.submit_received(contribution, signature, None)
    }

    /// [`submit_signed`](Self::submit_signed) for an update that crossed the network in
    /// `wire_bytes` bytes (recorded for operators, as the intake's timing is).
    pub fn submit_received(
        &mut self,
        contribution: Contribution,
        signature: Option<Signature>,
        wire_bytes: Option<u64>,
    ) -> Result<Receipt, SubmitError> {
        self.usable()?;
        let Some(round) = self.open.as_ref().map(|p| p.round) else {
            return Err(SubmitError::Rejected(Rejection::NoOpenRound));
        };
        let started = std::time::Instant::now();
        let mut record = ContributionRecord::arrived(&contribution, self.roster.get(&contribution.node).cloned());
        record.wire_bytes = wire_bytes;
        record.timing =
            Some(ContributionTiming { received_unix_ms: unix_ms(std::time::SystemTime::now()), intake_ms: 0.0 });
        let mut record = Intake { record, started };
        if let Err(reason) = self.check(&contribution, round) {
            self.refuse(round, &contribution, record, signature, &reason)?;
            return Err(SubmitError::Rejected(reason));
        }
        if let Some(rules) = self.privacy {
            match rules.charge(&contribution, self.rounds_charged(&contribution.node)) {
                Ok(charge) => record.record.privacy = Some(charge),
                Err(reason) => {
                    self.refuse(round, &contribution, record, signature, &reason)?;
                    return Err(SubmitError::Rejected(reason));
                }
            }
        }
        // Measured at its fair share of the step (see `Rules::probe_scale`).
        let measurement = self.score(&contribution.node, &contribution.delta)?;
        weft_durable::crash::point("contribution-measured");
        let delta_hash = self.store.put(contribution.delta.state()).map_err(CoordinatorError::from)?;
        let quality = measurement.quality();
        let admitted = Admitted {
            quality,
            gains: measurement.gains.clone().unwrap_or_default(),
            declared_quality: record.record.declared_quality(),
            delta_hash,
            delta_norm: self.open_form().norm(contribution.delta.state()),
        };
        self.admit(round, &contribution, record, signature, admitted, measurement)?;
        tracing::info!(node = %contribution.node, quality, delta = %delta_hash.short(), "contribution measured");
        Ok(Receipt { node: contribution.node, quality, delta_hash })
    }

    /// The structural checks against the open round, cheapest first.
    fn check(&self, contribution: &Contribution, round: u64) -> Result<(), Rejection> {
        let received = self.open.as_ref().map(|p| p.admitted.keys().cloned().collect()).unwrap_or_default();
        let form = self.open_form();
        let open = OpenRound {
            round,
            layout: form.layout(self.head.base()),
            base_hash: self.base_hash(),
            roster: &self.roster_ids,
            received: &received,
        };
        contribution::check(contribution, &open)
    }

    /// Records a contribution refused at the checks (a failed audit for governance).
    fn refuse(
        &mut self,
        round: u64,
        contribution: &Contribution,
        intake: Intake,
        signature: Option<Signature>,
        reason: &Rejection,
    ) -> Result<(), CoordinatorError> {
        let mut record = intake.finished();
        if self.roster.contains_key(&contribution.node) && !matches!(reason, Rejection::DuplicateNode) {
            if let Some(g) = self.governance.as_mut() {
                g.failed(&contribution.node);
            }
        }
        tracing::warn!(node = %contribution.node, reason = reason.code().as_str(), "contribution rejected: {reason}");
        record.reject(reason);
        let received = Event::ContributionReceived {
            round,
            node: contribution.node.to_string(),
            manifest_hash: manifest_of(contribution, contribution.delta.content_hash()).hash(),
            node_signature: signature,
            delta_hash: None,
            refused: Some(Refusal { code: reason.code().to_string(), detail: reason.to_string() }),
        };
        let rows = Rows { contribution: Some((round, &record)), closed: None };
        let entries = self.commit(Some(round), rows, vec![received])?;
        if let Some(pending) = self.open.as_mut() {
            pending.leaves.extend(entries.iter().map(weft_ledger::Entry::leaf));
            pending.records.push(record);
        }
        Ok(())
    }

    /// Commits a measured contribution with its ledger entries, then admits it to the round.
    fn admit(
        &mut self,
        round: u64,
        contribution: &Contribution,
        intake: Intake,
        signature: Option<Signature>,
        admitted: Admitted,
        measurement: Measurement,
    ) -> Result<(), CoordinatorError> {
        let mut record = intake.finished();
        let heldout = measurement.heldout;
        record.quality = admitted.quality.is_finite().then_some(admitted.quality);
        record.delta_hash = Some(admitted.delta_hash);
        record.delta_norm = Some(admitted.delta_norm);
        // JSON (and so the journal) cannot carry an infinite loss: such a table is not kept.
        record.heldout_loss = heldout.values().all(|v| v.is_finite()).then(|| heldout.clone());
        record.gains = measurement.gains;
        let mut events = vec![Event::ContributionReceived {
            round,
            node: contribution.node.to_string(),
            manifest_hash: manifest_of(contribution, admitted.delta_hash).hash(),
            node_signature: signature,
            delta_hash: Some(admitted.delta_hash),
            refused: None,
        }];
        if let (Some(charge), Some(rules)) = (record.privacy, self.privacy) {
            let m = rules.rule.mechanism;
            events.push(Event::PrivacyCharged {
                round,
                node: contribution.node.to_string(),
                noise_multiplier: m.noise_multiplier,
                sample_rate: m.sample_rate,
                clip_norm: m.clip_norm,
                steps: rules.steps_per_round,
                delta: charge.delta,
                epsilon_round: charge.epsilon_round,
                epsilon_total: charge.epsilon_total,
                rounds_charged: charge.rounds_charged,
                budget: charge.budget,
            });
        }
        events.extend([Event::Evaluation {
            round,
            node: contribution.node.to_string(),
            quality: record.quality,
            heldout_loss: finite(&heldout),
            delta_norm: admitted.delta_norm,
            gains: record.gains.clone(),
        }]);
        let entries = self.commit(Some(round), Rows { contribution: Some((round, &record)), closed: None }, events)?;
        if let Some(pending) = self.open.as_mut() {
            pending.leaves.extend(entries.first().map(weft_ledger::Entry::leaf));
            pending.admit(record, admitted);
        }
        Ok(())
    }

    /// A delta's held-out losses at the probe scale and its gains over the base's (on the public
    /// canaries when governance runs).
    fn score(&mut self, node: &NodeId, delta: &Delta) -> Result<Measurement, CoordinatorError> {
        let base = self.head.base();
        let form = self.open_form();
        let candidate = form.apply(base, delta.state(), self.rules.probe_scale).map_err(CoordinatorError::Base)?;
        match self.governance.as_mut() {
            Some(g) => {
                let whole = form.apply(base, delta.state(), 1.0).map_err(CoordinatorError::Base)?;
                let (public, public_base) = g.score(node, &candidate, &whole)?;
                Ok(Measurement::new(&public_base, public))
            }
            None => {
                let heldout = self.measure.heldout_loss(&candidate)?;
                Ok(Measurement::new(&self.head.base_loss, heldout))
            }
        }
    }

    /// Decides, advances the model point with the accepted deltas (checking every language's
    /// held-out loss under every-language fairness), records and publishes the round. If nothing
    /// is accepted (or the quorum is missed, or no step passes the check) the base stays bitwise
    /// unchanged. On an error nothing has changed and the round can be closed again.
    pub fn close_round(&mut self) -> Result<RoundRecord, CoordinatorError> {
        self.usable()?;
        let Some(pending) = self.open.take() else { return Err(CoordinatorError::NoOpenRound) };
        let closing = std::time::Instant::now();
        let stored = self.settle(&pending).and_then(|settled| {
            let refs = self.store_next(&settled)?;
            Ok((settled, refs))
        });
        let judged = stored.and_then(|(settled, refs)| {
            let judgment = self.judge(pending.round, &settled)?;
            Ok((settled, refs, judgment))
        });
        let (settled, refs, judgment) = match judged {
            Ok(judged) => judged,
            Err(e) => {
                self.open = Some(pending);
                return Err(e);
            }
        };
        let refs_in = self.head.refs;
        // The decision records the state its step reached, promoted or not (verify replays it).
        let refs_out = refs.unwrap_or(refs_in);
        let promoted = judgment.as_ref().is_none_or(|(j, _)| j.verdict.outcome.promoted());
        let mut replaced = None;
        let influence = match (settled.next, refs) {
            (Some((point, base_loss, influence)), Some(refs)) => {
                if promoted {
                    replaced = Some(std::mem::replace(&mut self.head, ModelHead { point, refs, base_loss }));
                }
                influence
            }
            _ => Influence::new(),
        };
        let governance = self.governance.as_mut().and_then(Governance::commit);
        self.round = pending.round;
        let mut record =
            self.round_record(pending.records, &settled.decision, &influence, refs_in.base_hash, governance);
        record.language_check = settled.check;
        let (judgment, judged_event) = judgment.unzip();
        if let Some(j) = &judgment {
            tracing::info!(round = record.round, outcome = %j.verdict.outcome, "gauntlet");
        }
        record.gauntlet = judgment;
        record.timing = Some(RoundTiming {
            opened_unix_ms: pending.opened.map(unix_ms),
            closed_unix_ms: unix_ms(std::time::SystemTime::now()),
            aggregation_ms: closing.elapsed().as_secs_f64() * 1e3,
        });
        let mut events = self.round_events(&record, &settled.accepted, refs_in, refs_out, &pending.leaves);
        if let Some(event) = judged_event {
            // After the decision, before the publication it allows.
            events.insert(1, event);
        }
        if let Some((tripped, rolled_back)) = self.watch_after(&record, replaced) {
            events.push(tripped.clone());
            events.push(rolled_back);
            record.breaker = Some(tripped);
        }
        let tallies = self.proposals.as_ref().map(|(book, _)| book.tallies_due(record.round)).unwrap_or_default();
        events.extend(tallies.iter().cloned());
        if let Some((book, _)) = &self.proposals {
            record.proposals_counted = tallies
                .iter()
                .filter_map(|event| match event {
                    Event::ProposalTallied { proposal, tally, effective_round, .. } => Some(CountedProposal {
                        proposal: *proposal,
                        change: book.open.get(proposal).map(|p| p.change.clone()).unwrap_or_default(),
                        tally: *tally,
                        effective_round: *effective_round,
                    }),
                    _ => None,
                })
                .collect();
        }
        self.commit(None, Rows { contribution: None, closed: Some(&record) }, events)?;
        self.apply_proposal_events(&tallies)?;
        self.add_to_manifests(&record);
        tracing::info!(round = record.round, accepted = record.accepted, base = %record.base_hash.short(), "round closed");
        Ok(record)
    }

    /// The policy's weights (with the languages' priorities of the per-language check); then
    /// governance's (Goodhart detector, reputation) and the quorum on what is left; then the
    /// aggregator's minimum number of inputs. Changes nothing.
    fn decide(&self, pending: &Pending, priorities: &Priorities) -> Decision {
        let roster = self.roster.len();
        let policy = &self.rules.policy;
        let measured = pending.measured(policy.weighting, &self.roster, &self.head.base_loss);
        let mut decision = policy.decide_with(&measured, roster, priorities);
        if let Some(g) = self.governance.as_ref() {
            g.adjust(&mut decision, policy.cap);
            policy.check_quorum(&mut decision, roster);
        }
        if !decision.weights.is_empty() {
            if let Err(AggregatorError::TooFew { rule, needed, got }) =
                self.rules.aggregator.check_inputs(decision.weights.len())
            {
                decision.reject_all(|_| Rejection::TooFewForAggregator { rule: rule.clone(), accepted: got, needed });
            }
        }
        decision
    }

    /// Decides and computes the round's next model point. Under every-language fairness each
    /// candidate base is measured before it can be published, and the per-language check
    /// ([`LanguageSearch`]) decides the next candidate — other language priorities, or a smaller
    /// step — and which one to publish. Works on copies: nothing of the coordinator changes.
    fn settle(&mut self, pending: &Pending) -> Result<Settled, CoordinatorError> {
        let Some(tolerance) = self.rules.policy.fairness.tolerance() else {
            let decision = self.decide(pending, &Priorities::new());
            return self.candidate(pending, decision, 1.0).map(|(settled, _)| settled);
        };
        let measured = pending.measured(Weighting::Quality, &self.roster, &self.head.base_loss);
        let base = self.head.base_loss.clone();
        let mut search = LanguageSearch::new(tolerance, base, &self.genesis_loss, helped_languages(&measured));
        let mut check = LanguageCheck {
            tolerance,
            base_loss: finite(&self.head.base_loss),
            reference_loss: finite(&self.genesis_loss),
            attempts: Vec::new(),
            published: None,
        };
        // The best passing candidate so far: only it is kept in memory.
        let mut kept: Option<Settled> = None;
        loop {
            let (alpha, priorities, scale) = (search.alpha(), search.priorities(), search.scale());
            let decision = self.decide(pending, &priorities);
            let (mut settled, loss) = self.candidate(pending, decision, scale)?;
            let Some(loss) = loss else {
                // Nothing accepted: nothing to check.
                settled.check = Some(check);
                return Ok(settled);
            };
            let index = check.attempts.len();
            let verdict = search.judge(&loss);
            let risen = regressions(&self.head.base_loss, &loss, tolerance);
            let outcome = if risen.is_empty() {
                CheckOutcome::Passed
            } else {
                CheckOutcome::Risen { risen: risen.into_iter().collect() }
            };
            check.attempts.push(CheckAttempt { alpha, priorities, scale, heldout_loss: finite(&loss), outcome });
            match verdict {
                Verdict::Next { risen } => {
                    tracing::info!(
                        ?risen,
                        alpha = search.alpha(),
                        scale = search.scale(),
                        "per-language check: another candidate"
                    );
                    if search.best() == Some(index) {
                        kept = Some(settled);
                    }
                }
                Verdict::Publish { index: published } => {
                    let mut settled = match kept {
                        Some(kept) if published != index => kept,
                        _ => settled,
                    };
                    check.published = Some(published);
                    settled.check = Some(check);
                    return Ok(settled);
                }
                Verdict::GiveUp { language, rise } => {
                    tracing::warn!(%language, rise, "per-language check: no candidate passes; the base stays");
                    let mut decision = settled.decision;
                    decision.reject_all(|_| Rejection::LanguageRegression {
                        language: language.clone(),
                        rise,
                        tolerance,
                        smallest_scale: scale,
                    });
                    return Ok(Settled { decision, accepted: Vec::new(), next: None, check: Some(check) });
                }
            }
        }
    }

    /// One candidate: the decision's accepted deltas aggregated, the step scaled, the outer
    /// optimizer applied, and the result measured (the loss is `None` when nothing was accepted).
    fn candidate(
        &mut self,
        pending: &Pending,
        decision: Decision,
        scale: f64,
    ) -> Result<(Settled, Option<LossTable>), CoordinatorError> {
        let accepted = pending.accepted(&decision);
        if accepted.is_empty() {
            return Ok((Settled { decision, accepted, next: None, check: None }, None));
        }
        let rules = StepRules { scale, ..self.rules.step() };
        let (point, influence) =
            aggregation::advance(&self.head.point, &rules, &accepted, &*self.store, &*pending.form)?;
        weft_durable::crash::point("round-aggregated");
        let loss = self.measure.heldout_loss(&point.base)?;
        let next = Some((point, loss.clone(), influence));
        Ok((Settled { decision, accepted, next, check: None }, Some(loss)))
    }

    /// The circuit breaker at the close of a round whose publication (if any) replaced
    /// `replaced`: a publication with no watch running starts one, anchored at the base it
    /// replaced; a watched round whose base rose beyond the threshold in any language trips — the
    /// anchor becomes the base again and the events say why. A watch ends after its last round.
    fn watch_after(&mut self, record: &RoundRecord, replaced: Option<ModelHead>) -> Option<(Event, Event)> {
        let rules = self.rules.breaker?;
        if let (Some(anchor), None, true) = (replaced, &self.watch, record.base_changed) {
            let until = record.round + rules.watch_rounds - 1;
            self.watch = Some(Watch { anchor_round: record.round.saturating_sub(1), anchor, until });
        }
        let watch = self.watch.as_ref()?;
        let risen = regressions(&watch.anchor.base_loss, &self.head.base_loss, rules.threshold);
        if risen.is_empty() {
            if record.round >= watch.until {
                self.watch = None;
            }
            return None;
        }
        let watch = self.watch.take()?;
        tracing::warn!(
            round = record.round,
            anchor = watch.anchor_round,
            ?risen,
            "circuit breaker tripped: rolling back"
        );
        let tripped = Event::BreakerTripped {
            round: record.round,
            anchor_round: watch.anchor_round,
            rules,
            anchor_loss: finite(&watch.anchor.base_loss),
            heldout_loss: finite(&self.head.base_loss),
            risen: risen.into_iter().collect(),
        };
        let rolled_back = Event::RolledBack {
            to_round: watch.anchor_round,
            after_round: record.round,
            previous_base_hash: self.head.refs.base_hash,
            base_hash: watch.anchor.refs.base_hash,
            outer_state: watch.anchor.refs.outer_state,
            center: watch.anchor.refs.center,
        };
        self.head = watch.anchor;
        self.champion_items = None;
        Some((tripped, rolled_back))
    }

    /// The gauntlet on the round's challenger, when the consortium has one and the round moved the
    /// base: both models scored on the held-out items (the champion's scores are kept from the
    /// round it was published), judged with a seed nobody chooses. Changes nothing but the cache.
    fn judge(&mut self, round: u64, settled: &Settled) -> Result<Option<(Judgment, Event)>, CoordinatorError> {
        let (Some(rules), Some((point, loss, _))) = (self.rules.gauntlet, &settled.next) else { return Ok(None) };
        let champion_hash = self.base_hash();
        let challenger_hash = point.base.content_hash();
        if challenger_hash == champion_hash {
            return Ok(None);
        }
        let champion_loss = match self.champion_items.take() {
            Some((hash, items)) if hash == champion_hash => items,
            _ => self.measure.item_losses(self.head.base())?,
        };
        self.champion_items = Some((champion_hash, champion_loss.clone()));
        let challenger_loss = self.measure.item_losses(&point.base)?;
        let seed = gauntlet_seed(round, &champion_hash, &challenger_hash);
        let verdict = gauntlet::judge(&rules, &champion_loss, &challenger_loss, seed)
            .map_err(|e| CoordinatorError::Gauntlet(e.to_string()))?;
        if verdict.outcome.promoted() {
            self.champion_items = Some((challenger_hash, challenger_loss.clone()));
        }
        let event = Event::ChallengerJudged {
            round,
            champion_hash,
            challenger_hash,
            items_hash: self.measure.items_hash(),
            seed,
            rules,
            champion_loss,
            challenger_loss,
            verdict: verdict.clone(),
        };
        let judgment = Judgment { champion_hash, challenger_hash, challenger_loss: loss.clone(), seed, rules, verdict };
        Ok(Some((judgment, event)))
    }

    /// The next point's hashes. In durable mode its blobs are stored first (before anything
    /// refers to them); in memory-only mode the optimizer state and center are neither copied
    /// nor hashed (only the ledger names them).
    fn store_next(&self, settled: &Settled) -> Result<Option<ModelRefs>, CoordinatorError> {
        let Some((point, _, _)) = &settled.next else { return Ok(None) };
        let refs = if self.journal.is_some() {
            point.store(&*self.store)?
        } else {
            ModelRefs { base_hash: point.base.content_hash(), outer_state: None, center: None }
        };
        weft_durable::crash::point("round-blobs-stored");
        Ok(Some(refs))
    }

    /// The round's record: each contribution's decision, weight and influence, and what stayed
    /// with the base.
    fn round_record(
        &self,
        mut contributions: Vec<ContributionRecord>,
        decision: &Decision,
        influence: &Influence,
        previous_base_hash: ContentHash,
        governance: Option<crate::governance::GovernanceRecord>,
    ) -> RoundRecord {
        for record in contributions.iter_mut().filter(|r| r.delta_hash.is_some()) {
            if let Some(&w) = decision.weights.get(&record.node) {
                record.accepted = true;
                record.weight = w;
                record.influence = influence.get(&record.node).copied().unwrap_or(0.0);
                record.capped = decision.capped.contains(&record.node);
            } else if let Some(reason) = decision.rejected.get(&record.node) {
                record.reject(reason);
            }
        }
        let base_hash = self.base_hash();
        RoundRecord {
            round: self.round,
            previous_base_hash,
            base_hash,
            base_changed: base_hash != previous_base_hash,
            unassigned_share: if influence.is_empty() {
                decision.unassigned
            } else {
                aggregation::unassigned_share(influence)
            },
            quorum_required: self.rules.policy.required(self.roster.len()),
            probe_scale: self.rules.probe_scale,
            aggregator: self.rules.aggregator.to_string(),
            governance,
            accepted: decision.weights.len(),
            contributions,
            heldout_loss: self.head.base_loss.clone(),
            language_check: None,
            gauntlet: None,
            proposals_counted: Vec::new(),
            breaker: None,
            timing: None,
        }
    }

    /// The ledger entries of a closed round: the decision, and the new base if it moved.
    fn round_events(
        &self,
        record: &RoundRecord,
        accepted: &[Accepted],
        refs_in: ModelRefs,
        refs_out: ModelRefs,
        leaves: &[ContentHash],
    ) -> Vec<Event> {
        let decision = Event::Decision {
            round: record.round,
            accepted: accepted
                .iter()
                .filter_map(|a| {
                    let r = record.contributions.iter().find(|r| r.accepted && r.node == a.node)?;
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
                    node: r.node.to_string(),
                    code: r.reason.map(|c| c.to_string()).unwrap_or_default(),
                    detail: r.detail.clone().unwrap_or_default(),
                })
                .collect(),
            unassigned: record.unassigned_share,
            aggregator: record.aggregator.clone(),
            cap: self.rules.policy.cap,
            outer: self.rules.outer,
            outer_state_in: refs_in.outer_state,
            outer_state_out: refs_out.outer_state,
            center_in: refs_in.center,
            center_out: refs_out.center,
            contributions_root: weft_ledger::merkle_root(leaves),
            contributions: leaves.len(),
            governance_hash: record.governance.as_ref().map(json_hash),
            language_check: record.language_check.clone(),
        };
        let mut events = vec![decision];
        if record.base_changed {
            events.push(Event::BasePublished {
                round: record.round,
                previous_base_hash: record.previous_base_hash,
                base_hash: record.base_hash,
                heldout_loss: record
                    .heldout_loss
                    .iter()
                    .map(|(k, v)| (k.clone(), v.is_finite().then_some(*v)))
                    .collect(),
            });
        }
        events
    }

    /// Each node's manifest gains its entry of a closed round.
    fn add_to_manifests(&mut self, record: &RoundRecord) {
        for r in &record.contributions {
            if let Some(manifest) = self.manifests.get_mut(&r.node) {
                manifest.contributions.push(ManifestEntry {
                    round: record.round,
                    base_hash: record.previous_base_hash,
                    delta_hash: r.delta_hash,
                    token_count: r.token_count,
                    quality: r.quality,
                    accepted: r.accepted,
                    reason: r.reason,
                    weight: r.weight,
                    declared: r.declared.clone(),
                    privacy: r.privacy,
                });
            }
        }
    }
}

/// A loss table as JSON can carry it: a non-finite loss as `null`.
pub(crate) fn finite(table: &LossTable) -> std::collections::BTreeMap<String, Option<f64>> {
    table.iter().map(|(k, v)| (k.clone(), v.is_finite().then_some(*v))).collect()
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

/// The gauntlet's bootstrap seed for a round: fixed by what is judged, so the coordinator
/// cannot shop for a favourable draw.
pub fn gauntlet_seed(round: u64, champion: &ContentHash, challenger: &ContentHash) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"weft-gauntlet-seed/1\n");
    hasher.update(&round.to_le_bytes());
    hasher.update(&champion.0);
    hasher.update(&challenger.0);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// BLAKE3 of a value's JSON.
pub(crate) fn json_hash<T: serde::Serialize>(value: &T) -> ContentHash {
    ContentHash(*blake3::hash(&serde_json::to_vec(value).unwrap_or_default()).as_bytes())
}
