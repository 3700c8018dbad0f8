//! `weft ledger verify`: checks the chain, every signature and Merkle root, every referenced
//! blob, and replays every round's aggregation from the stored deltas and the recorded weights
//! to recompute each base hash. The first fault is reported at the entry it was found in.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use weft_core::gauntlet::{self, GauntletRules, ItemLosses};
use weft_core::language_check::{helped_languages, regressions, LanguageSearch, Verdict};
use weft_core::policy::Measured;
use weft_core::quality::LossTable;
use weft_core::{
    AdapterFamily, AdapterRound, Aggregator, BreakerRules, ContentHash, FullWeights, NodeId, Policy, UpdateForm,
    VotingRules,
};
use weft_ledger::{merkle_root, Chain, ChainError, CheckOutcome, Entry, Event, LanguageCheck, PublicKey};

use crate::aggregation::{self, Accepted, StepRules};
use crate::coordinator::finite;
use crate::head::{ModelPoint, ModelRefs};
use crate::journal::{Head, Journal, JournalError, SqliteJournal};
use crate::proposals::ProposalBook;
use crate::store::{BlobStore, FsBlobStore, StoreError};

/// What a successful verification covered.
#[derive(Clone, Debug, Serialize)]
pub struct AuditReport {
    pub coordinator_key: Option<PublicKey>,
    pub entries: u64,
    pub head: ContentHash,
    pub rounds: u64,
    /// Rounds whose base moved and was recomputed from the deltas.
    pub replayed: u64,
    pub rollbacks: u64,
    /// Stored blobs (deltas, bases, optimizer state) read and checked, and their size on disk.
    pub blobs: u64,
    pub blob_bytes: u64,
    pub final_base_hash: ContentHash,
    /// Challengers the gauntlet promoted and refused, each verdict recomputed.
    pub promoted: u64,
    pub refused: u64,
    /// Proposals, votes (each signature checked) and rule changes replayed, every count recomputed.
    pub proposals: u64,
    pub votes: u64,
    pub rule_changes: u64,
    /// Circuit-breaker trips, each recomputed from the recorded losses.
    pub breaker_trips: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("ledger entry {seq} ({kind}, round {round}): {detail}")]
    Entry { seq: u64, kind: &'static str, round: u64, detail: String },
    #[error("the ledger is empty")]
    Empty,
    #[error("state database disagrees with the ledger: {0}")]
    State(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct OpenRound {
    round: u64,
    /// The round's adapter, as its opening recorded it.
    adapter: Option<AdapterRound>,
    leaves: Vec<ContentHash>,
    /// node → delta hash of each contribution received for measurement.
    received: BTreeMap<String, ContentHash>,
    /// node → the relative gains per language its evaluation recorded.
    gains: BTreeMap<String, BTreeMap<String, f64>>,
}

/// Walks the ledger; see the module documentation.
struct Auditor<'a> {
    store: &'a dyn BlobStore,
    /// Builds an adapter round's factors from its record (needed once the ledger has one).
    adapters: Option<&'a dyn AdapterFamily>,
    chain: Chain,
    config_hash: ContentHash,
    roster_hash: ContentHash,
    /// The model-side state the ledger says is current.
    now: ModelRefs,
    /// The point `now` names, as verified (replayed or read from the store), for the next replay.
    point: Option<ModelPoint>,
    closed: BTreeMap<u64, ModelRefs>,
    last_closed: u64,
    open: Option<OpenRound>,
    /// A decision whose replay moved the base: the next entry must publish this hash (and, when
    /// the per-language check ran, these losses).
    publish: Option<(u64, u64, ContentHash)>,
    published_loss: Option<BTreeMap<String, Option<f64>>>,
    /// The held-out loss of the current base, as the last publication recorded it.
    base_loss: Option<BTreeMap<String, Option<f64>>>,
    /// The genesis base's held-out loss, as the first per-language check recorded it (every
    /// later one must record the same).
    reference_loss: Option<BTreeMap<String, Option<f64>>>,
    /// Rounds each node has been charged privacy for (never refunded, rollbacks included).
    charged: BTreeMap<String, u64>,
    /// The open round's partition into communities (secure aggregation).
    communities: Option<(u64, BTreeMap<String, Vec<String>>)>,
    /// The gauntlet's rules, as the stored configuration pins them: every decision that moves
    /// the base must then be judged under them before it is published.
    gauntlet: Option<GauntletRules>,
    /// A decision moved the base and the gauntlet has not judged it yet.
    challenger: Option<Challenger>,
    /// The items the gauntlet scores on (the first judgment's), and the champion's scores on
    /// them (the last promoted challenger's): a model scored again on the same items must score
    /// the same.
    items_hash: Option<ContentHash>,
    champion_items: Option<(ContentHash, ItemLosses)>,
    /// The rules in force: the stored configuration's policy, moved by the proposals that
    /// passed (`[voting]`); every decision must apply its cap.
    policy: Option<Policy>,
    proposals: Option<ProposalBook>,
    /// The circuit breaker as configured, the held-out loss of the current base (when the ledger
    /// or the genesis says it), the watch the coordinator must be running, and a trip whose
    /// rollback must follow.
    breaker: Option<BreakerRules>,
    loss_now: Option<BTreeMap<String, Option<f64>>>,
    watch: Option<AuditedWatch>,
    tripped: Option<AuditedWatch>,
    /// The state before the last decision's step (what a watch started by its publication guards).
    pre_step: ModelRefs,
    report: AuditReport,
}

#[derive(Clone)]
struct AuditedWatch {
    anchor_round: u64,
    anchor: ModelRefs,
    anchor_loss: Option<BTreeMap<String, Option<f64>>>,
    until: u64,
}

/// A decision's replayed step awaiting the gauntlet, with what a refusal restores.
struct Challenger {
    round: u64,
    hash: ContentHash,
    champion: ModelRefs,
    champion_point: Option<ModelPoint>,
}

/// Verifies the coordinator storage in `dir` (`state.sqlite` and `blobs/`) of a consortium
/// whose contributions are full-weight deltas.
pub fn verify(dir: &Path, trusted: Option<PublicKey>) -> Result<AuditReport, AuditError> {
    verify_with(dir, trusted, None)
}

/// [`verify`], with the model family that rebuilds adapter rounds' factors from their records.
pub fn verify_with(
    dir: &Path,
    trusted: Option<PublicKey>,
    adapters: Option<&dyn AdapterFamily>,
) -> Result<AuditReport, AuditError> {
    let journal = SqliteJournal::read(dir)?;
    // One read transaction: beside a running coordinator, the ledger, the head and the
    // configuration must be of the same committed step, or a step landing between the reads
    // looks like a disagreement.
    let (lines, stored, genesis) = journal.consistent(|j| Ok((j.ledger()?, j.load()?, j.head_after(0)?)))?;
    // The configuration is checked against the genesis's hash at the end (check_state).
    let (gauntlet, policy, proposals, breaker) = match &stored {
        Some((config, _)) => {
            let config: serde_json::Value =
                serde_json::from_slice(config).map_err(|e| AuditError::State(format!("stored configuration: {e}")))?;
            let policy = section::<Policy>(&config, "policy")?;
            let voting = section::<VotingRules>(&config, "voting")?;
            let proposals = voting.zip(policy).map(|(voting, policy)| ProposalBook::new(voting, policy));
            (section::<GauntletRules>(&config, "gauntlet")?, policy, proposals, section(&config, "breaker")?)
        }
        None => (None, None, None, None),
    };
    let genesis_loss = genesis.map(|genesis| finite(&genesis.base_loss));
    let store = FsBlobStore::open_existing(dir.join("blobs"))?;
    let mut auditor = Auditor {
        store: &store,
        adapters,
        chain: Chain::new(trusted),
        config_hash: ContentHash([0; 32]),
        roster_hash: ContentHash([0; 32]),
        now: ModelRefs { base_hash: ContentHash([0; 32]), outer_state: None, center: None },
        point: None,
        closed: BTreeMap::new(),
        last_closed: 0,
        open: None,
        publish: None,
        published_loss: None,
        base_loss: None,
        reference_loss: None,
        charged: BTreeMap::new(),
        communities: None,
        gauntlet,
        challenger: None,
        items_hash: None,
        champion_items: None,
        policy,
        proposals,
        breaker,
        loss_now: genesis_loss,
        watch: None,
        tripped: None,
        pre_step: ModelRefs { base_hash: ContentHash([0; 32]), outer_state: None, center: None },
        report: AuditReport {
            coordinator_key: None,
            entries: 0,
            head: ContentHash([0; 32]),
            rounds: 0,
            replayed: 0,
            rollbacks: 0,
            blobs: 0,
            blob_bytes: 0,
            final_base_hash: ContentHash([0; 32]),
            promoted: 0,
            refused: 0,
            proposals: 0,
            votes: 0,
            rule_changes: 0,
            breaker_trips: 0,
        },
    };
    if lines.is_empty() {
        return Err(AuditError::Empty);
    }
    for line in &lines {
        let entry = auditor.chain.check(line)?;
        auditor.entry(&entry)?;
    }
    if let Some((seq, round, _)) = auditor.publish {
        return Err(AuditError::Entry {
            seq,
            kind: "decision",
            round,
            detail: "the replayed base differs from the previous one, but no base_published follows".into(),
        });
    }
    // A watch over the last closed round must not have needed a trip either.
    if auditor.open.is_none() && auditor.last_closed > 0 {
        let round = auditor.last_closed + 1;
        auditor.watch_before(round).map_err(|detail| AuditError::Entry {
            seq: auditor.chain.len().saturating_sub(1),
            kind: "end of ledger",
            round: round - 1,
            detail,
        })?;
    }
    auditor.check_state(stored.as_ref())?;
    let mut report = auditor.report;
    report.entries = auditor.chain.len();
    report.head = auditor.chain.head();
    report.rounds = auditor.last_closed;
    report.final_base_hash = auditor.now.base_hash;
    Ok(report)
}

/// A section of the stored configuration, if present.
fn section<T: serde::de::DeserializeOwned>(config: &serde_json::Value, key: &str) -> Result<Option<T>, AuditError> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| AuditError::State(format!("stored configuration's {key}: {e}"))),
    }
}

/// A loss table as the ledger records it, read back (`null`: not finite).
fn as_table(losses: &BTreeMap<String, Option<f64>>) -> LossTable {
    losses.iter().map(|(k, v)| (k.clone(), v.unwrap_or(f64::INFINITY))).collect()
}

impl Auditor<'_> {
    fn entry(&mut self, entry: &Entry) -> Result<(), AuditError> {
        let fault = |detail: String| AuditError::Entry {
            seq: entry.seq,
            kind: entry.event.kind(),
            round: entry.event.round(),
            detail,
        };
        if let Some((seq, round, hash)) = self.publish {
            match &entry.event {
                Event::BasePublished { .. } | Event::ChallengerJudged { .. } => {}
                _ => {
                    return Err(AuditError::Entry {
                        seq,
                        kind: "decision",
                        round,
                        detail: format!("the replay moved the base to {hash}, but no base_published follows"),
                    })
                }
            }
        }
        match &entry.event {
            Event::ConsortiumCreated { coordinator_key, config_hash, roster_hash, base_hash, .. } => {
                self.report.coordinator_key = Some(*coordinator_key);
                self.config_hash = *config_hash;
                self.roster_hash = *roster_hash;
                self.now = ModelRefs { base_hash: *base_hash, outer_state: None, center: None };
                let point = ModelPoint::load(self.store, &self.now).map_err(|e| fault(format!("genesis base: {e}")))?;
                self.point = Some(point);
                self.closed.insert(0, self.now);
            }
            Event::RoundOpened { round, base_hash, config_hash, roster_hash, adapter } => {
                if let Some(open) = &self.open {
                    return Err(fault(format!("round {} is still open", open.round)));
                }
                self.watch_before(*round).map_err(fault)?;
                if *round != self.last_closed + 1 {
                    return Err(fault(format!("opens round {round} after round {}", self.last_closed)));
                }
                if *base_hash != self.now.base_hash {
                    return Err(fault(format!(
                        "announces base {base_hash}, the current base is {}",
                        self.now.base_hash
                    )));
                }
                if *config_hash != self.config_hash || *roster_hash != self.roster_hash {
                    return Err(fault("configuration or roster hash differs from the genesis".into()));
                }
                self.open = Some(OpenRound {
                    round: *round,
                    adapter: adapter.clone(),
                    leaves: Vec::new(),
                    received: BTreeMap::new(),
                    gains: BTreeMap::new(),
                });
            }
            Event::ContributionReceived { round, node, delta_hash, refused, .. } => {
                let open = self.open_round(*round).map_err(fault)?;
                open.leaves.push(entry.leaf());
                match (delta_hash, refused) {
                    (Some(hash), None) => {
                        if open.received.insert(node.clone(), *hash).is_some() {
                            return Err(fault(format!("a second measured contribution from {node}")));
                        }
                    }
                    (None, Some(_)) => {}
                    _ => return Err(fault("must carry either a delta hash or a refusal".into())),
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
                let open = self.open_round(*round).map_err(fault)?;
                if !open.received.contains_key(node) {
                    return Err(fault(format!("charges {node}, whose contribution was not received")));
                }
                let charged = self.charged.entry(node.clone()).or_insert(0);
                *charged += 1;
                if *rounds_charged != *charged {
                    return Err(fault(format!(
                        "says {node} has been charged {rounds_charged} rounds, the ledger holds {charged}"
                    )));
                }
                let rule = weft_privacy::DpRule {
                    mechanism: weft_privacy::DpSgd {
                        clip_norm: *clip_norm,
                        noise_multiplier: *noise_multiplier,
                        sample_rate: *sample_rate,
                    },
                    delta: *delta,
                    epsilon_budget: *budget,
                };
                rule.validate().map_err(|e| fault(e.to_string()))?;
                let replay = |rounds| rule.spent(rounds, *steps).map(|s| s.epsilon).map_err(|e| fault(e.to_string()));
                let (round_eps, total_eps) = (replay(1)?, replay(*rounds_charged)?);
                if round_eps.to_bits() != epsilon_round.to_bits() || total_eps.to_bits() != epsilon_total.to_bits() {
                    return Err(fault(format!(
                        "records epsilon {epsilon_round} (round) and {epsilon_total} (total); the accountant gives {round_eps} and {total_eps}"
                    )));
                }
                if total_eps > *budget {
                    return Err(fault(format!("charges {node} epsilon {total_eps}, over its budget {budget}")));
                }
            }
            Event::CommunitiesDrawn { round, seed, community_size, communities } => {
                self.open_round(*round).map_err(fault)?;
                let expected =
                    crate::privacy::community_seed(*round, &self.now.base_hash, &self.config_hash, &self.roster_hash);
                if *seed != expected {
                    return Err(fault(format!("draws from seed {seed}, the round's opening fixes {expected}")));
                }
                let nodes: Vec<String> = communities.values().flatten().cloned().collect();
                let redrawn = crate::privacy::draw_communities(seed, &nodes, *community_size as usize)
                    .map_err(|e| fault(e.to_string()))?;
                if redrawn != *communities {
                    return Err(fault("the partition is not the one its seed draws".into()));
                }
                if let Some((r, earlier)) = &self.communities {
                    if *r == *round && earlier != communities {
                        return Err(fault(format!("a second, different partition of round {round}")));
                    }
                }
                self.communities = Some((*round, communities.clone()));
            }
            Event::Evaluation { round, node, gains, .. } => {
                let open = self.open_round(*round).map_err(fault)?;
                if let Some(gains) = gains {
                    open.gains.insert(node.clone(), gains.clone());
                }
                if !open.received.contains_key(node) {
                    return Err(fault(format!("evaluates {node}, whose contribution was not received")));
                }
            }
            Event::Decision { .. } => self.decision(entry).map_err(fault)?,
            Event::ChallengerJudged { .. } => self.judged(&entry.event).map_err(fault)?,
            Event::BreakerTripped { .. } => self.breaker_tripped(&entry.event).map_err(fault)?,
            Event::ProposalMade { .. }
            | Event::VoteCast { .. }
            | Event::ProposalTallied { .. }
            | Event::RulesChanged { .. } => {
                if let Event::ProposalMade { after_round, .. } | Event::VoteCast { after_round, .. } = &entry.event {
                    if *after_round != self.last_closed {
                        return Err(fault(format!(
                            "says it came after round {after_round}, the last closed round is {}",
                            self.last_closed
                        )));
                    }
                }
                let book = self.proposals.as_mut().ok_or_else(|| fault("the consortium votes on nothing".into()))?;
                book.apply(&entry.event).map_err(fault)?;
                match &entry.event {
                    Event::ProposalMade { .. } => self.report.proposals += 1,
                    Event::VoteCast { .. } => self.report.votes += 1,
                    Event::RulesChanged { round, .. } => {
                        if self.open.is_some() || *round != self.last_closed + 1 {
                            return Err(fault(format!(
                                "changes the rules of round {round}, not at the opening of round {}",
                                self.last_closed + 1
                            )));
                        }
                        self.policy = Some(book.policy);
                        self.report.rule_changes += 1;
                    }
                    _ => {}
                }
            }
            Event::BasePublished { round, previous_base_hash, base_hash, heldout_loss } => {
                if self.challenger.take().is_some() && self.gauntlet.is_some() {
                    return Err(fault("publishes a base the gauntlet has not judged".into()));
                }
                let Some((_, decided, expected)) = self.publish.take() else {
                    return Err(fault("no decision moved the base".into()));
                };
                if let Some(checked) = self.published_loss.take() {
                    if checked != *heldout_loss {
                        return Err(fault(
                            "publishes other held-out losses than the per-language check measured".into(),
                        ));
                    }
                }
                self.base_loss = Some(heldout_loss.clone());
                if *round != decided || *base_hash != expected {
                    return Err(fault(format!(
                        "publishes {base_hash}, the replay of round {decided} gives {expected}"
                    )));
                }
                if *previous_base_hash != self.now.base_hash {
                    return Err(fault(format!(
                        "previous base {previous_base_hash}, the current base is {}",
                        self.now.base_hash
                    )));
                }
                // A publication with no watch running starts one, anchored at the base it replaces.
                if let (Some(rules), None) = (self.breaker, &self.watch) {
                    self.watch = Some(AuditedWatch {
                        anchor_round: round.saturating_sub(1),
                        anchor: self.pre_step,
                        anchor_loss: self.loss_now.clone(),
                        until: round + rules.watch_rounds - 1,
                    });
                }
                self.loss_now = Some(heldout_loss.clone());
                self.now.base_hash = *base_hash;
                self.closed.insert(*round, self.now);
            }
            Event::RolledBack { to_round, after_round, previous_base_hash, base_hash, outer_state, center } => {
                if self.open.is_some() || *after_round != self.last_closed {
                    return Err(fault("a rollback must follow a closed round".into()));
                }
                let restored = ModelRefs { base_hash: *base_hash, outer_state: *outer_state, center: *center };
                match self.tripped.take() {
                    // The breaker's rollback restores its anchor, and is the round's closing state.
                    Some(watch) => {
                        if watch.anchor_round != *to_round || watch.anchor != restored {
                            return Err(fault(format!(
                                "the breaker's rollback restores round {to_round}'s {base_hash}; its anchor is round {}'s {}",
                                watch.anchor_round, watch.anchor.base_hash
                            )));
                        }
                        self.closed.insert(*after_round, restored);
                        self.loss_now = watch.anchor_loss;
                        self.base_loss = self.loss_now.clone();
                    }
                    None => {
                        let Some(target) = self.closed.get(to_round) else {
                            return Err(fault(format!("round {to_round} never closed")));
                        };
                        if *target != restored {
                            return Err(fault(format!("does not restore the state recorded after round {to_round}")));
                        }
                        self.loss_now = None;
                    }
                }
                if *previous_base_hash != self.now.base_hash {
                    return Err(fault(format!("does not restore the state recorded after round {to_round}")));
                }
                self.watch = None;
                self.point = Some(ModelPoint::load(self.store, &restored).map_err(|e| fault(e.to_string()))?);
                // The restored base's losses are not in the rollback entry.
                self.base_loss = None;
                self.now = restored;
                self.report.rollbacks += 1;
            }
        }
        Ok(())
    }

    fn open_round(&mut self, round: u64) -> Result<&mut OpenRound, String> {
        match self.open.as_mut() {
            Some(open) if open.round == round => Ok(open),
            Some(open) => Err(format!("belongs to round {round}, but round {} is open", open.round)),
            None => Err(format!("belongs to round {round}, which is not open")),
        }
    }

    /// Checks a decision against the round's contributions and replays its aggregation.
    fn decision(&mut self, entry: &Entry) -> Result<(), String> {
        let Event::Decision {
            round,
            accepted,
            unassigned,
            aggregator,
            cap,
            outer,
            outer_state_in,
            outer_state_out,
            center_in,
            center_out,
            contributions_root,
            contributions,
            language_check,
            ..
        } = &entry.event
        else {
            return Ok(());
        };
        let open = self.open.take().ok_or_else(|| format!("round {round} is not open"))?;
        if open.round != *round {
            return Err(format!("decides round {round}, but round {} is open", open.round));
        }
        if let Some(policy) = &self.policy {
            if cap.to_bits() != policy.cap.to_bits() {
                return Err(format!("applies cap {cap}; the rules in force give {}", policy.cap));
            }
        }
        let root = merkle_root(&open.leaves);
        if root != *contributions_root || open.leaves.len() != *contributions {
            return Err(format!(
                "Merkle root over the {} contributions received is {root}, the decision records {contributions_root} over {contributions}",
                open.leaves.len()
            ));
        }
        if *outer_state_in != self.now.outer_state || *center_in != self.now.center {
            return Err("outer-optimizer state or center in differs from the state after the last round".into());
        }
        let champion = self.now;
        self.pre_step = champion;
        // Every referenced delta is checked byte for byte, once: those not accepted here,
        // accepted ones as the replay streams them (below, for any the replay skips).
        for (node, hash) in &open.received {
            if !accepted.iter().any(|a| &a.node == node) {
                self.check_blob(hash).map_err(|e| format!("delta of {node}: {e}"))?;
            }
        }
        let mut inputs = Vec::new();
        for a in accepted {
            if open.received.get(&a.node) != Some(&a.delta_hash) {
                return Err(format!("accepts a delta from {} that the round did not receive", a.node));
            }
            let node = NodeId::new(a.node.clone()).map_err(|e| e.to_string())?;
            inputs.push(Accepted { node, hash: a.delta_hash, weight: a.weight, norm: a.norm });
        }
        self.last_closed = *round;
        let scale = match language_check {
            Some(check) => self.replay_check(check, &open, &inputs)?,
            None => 1.0,
        };
        if inputs.is_empty() {
            if *outer_state_out != *outer_state_in || *center_out != *center_in {
                return Err("nothing was accepted, yet the optimizer state or center changed".into());
            }
            if *unassigned != 1.0 {
                return Err(format!("nothing was accepted, yet the unassigned share is {unassigned}, not 1"));
            }
            self.closed.insert(*round, self.now);
            return Ok(());
        }
        let aggregator: Aggregator = aggregator.parse().map_err(|e| format!("aggregator {aggregator:?}: {e}"))?;
        let rules = StepRules { aggregator, cap: *cap, scale, outer: *outer };
        let point = self.point.as_ref().ok_or("no verified base to replay from")?;
        let form: std::sync::Arc<dyn UpdateForm> = match (&open.adapter, self.adapters) {
            (None, _) => std::sync::Arc::new(FullWeights),
            (Some(round), Some(family)) => family.form(round).map_err(|e| format!("adapter {round}: {e}"))?,
            (Some(round), None) => {
                return Err(format!("the round's contributions are adapters ({round}): verify needs the model"))
            }
        };
        let (next, influence) = aggregation::advance(point, &rules, &inputs, self.store, &*form)
            .map_err(|e| format!("replay failed: {e}"))?;
        for (a, input) in accepted.iter().zip(&inputs) {
            let replayed = influence.get(&input.node).copied().unwrap_or(0.0);
            if replayed.to_bits() != a.influence.to_bits() {
                return Err(format!("influence of {} replays as {replayed}, recorded {}", a.node, a.influence));
            }
            if replayed == 0.0 {
                // A linear rule skips a zero coefficient without reading the delta.
                self.check_blob(&a.delta_hash).map_err(|e| format!("delta of {}: {e}", a.node))?;
            } else {
                self.report.blobs += 1;
                self.report.blob_bytes += self.blob_len(&a.delta_hash);
            }
        }
        let replayed_unassigned = aggregation::unassigned_share(&influence);
        if replayed_unassigned.to_bits() != unassigned.to_bits() {
            return Err(format!("the unassigned share replays as {replayed_unassigned}, recorded {unassigned}"));
        }
        let refs = next.refs().map_err(|e| e.to_string())?;
        if refs.outer_state != *outer_state_out {
            return Err("the replayed outer-optimizer state differs from the recorded one".into());
        }
        if refs.center != *center_out {
            return Err("the replayed center differs from the recorded one".into());
        }
        self.report.replayed += 1;
        // The blobs the next state refers to must be stored and intact.
        for hash in [Some(&refs.base_hash), refs.outer_state.as_ref(), refs.center.as_ref()].into_iter().flatten() {
            self.check_blob(hash).map_err(|e| format!("state blob: {e}"))?;
        }
        self.now.outer_state = refs.outer_state;
        self.now.center = refs.center;
        let champion_point = self.point.replace(next);
        if refs.base_hash != self.now.base_hash {
            self.publish = Some((entry.seq, *round, refs.base_hash));
            self.published_loss = language_check
                .as_ref()
                .and_then(|c| c.published.and_then(|i| c.attempts.get(i)))
                .map(|a| a.heldout_loss.clone());
            self.challenger = Some(Challenger { round: *round, hash: refs.base_hash, champion, champion_point });
        } else {
            self.closed.insert(*round, self.now);
        }
        Ok(())
    }

    /// Before round `round` opens: the watch over the round just closed must not have needed a
    /// trip (a missing `breaker_tripped` is named), and a watch past its last round ends.
    fn watch_before(&mut self, round: u64) -> Result<(), String> {
        let (Some(rules), Some(watch)) = (self.breaker, &self.watch) else { return Ok(()) };
        let closed = round - 1;
        if let (Some(anchor), Some(now)) = (&watch.anchor_loss, &self.loss_now) {
            let risen = regressions(&as_table(anchor), &as_table(now), rules.threshold);
            if closed <= watch.until && !risen.is_empty() {
                return Err(format!(
                    "the circuit breaker should have tripped when round {closed} closed: {risen:?} over round {}'s base",
                    watch.anchor_round
                ));
            }
        }
        if closed >= watch.until {
            self.watch = None;
        }
        Ok(())
    }

    /// A breaker trip: under the configured rules, during the watch, against its anchor, with
    /// the rises its losses give.
    fn breaker_tripped(&mut self, event: &Event) -> Result<(), String> {
        let Event::BreakerTripped { round, anchor_round, rules, anchor_loss, heldout_loss, risen } = event else {
            return Ok(());
        };
        if self.breaker != Some(*rules) {
            return Err(format!("trips under {rules:?}, the configuration pins {:?}", self.breaker));
        }
        let watch = self.watch.take().ok_or("no publication is being watched")?;
        if *round != self.last_closed || *round > watch.until || *anchor_round != watch.anchor_round {
            return Err(format!(
                "trips at round {round} against round {anchor_round}; the watch guards round {}'s base until round {}",
                watch.anchor_round, watch.until
            ));
        }
        if watch.anchor_loss.as_ref().is_some_and(|known| known != anchor_loss) {
            return Err("records other losses for the anchor than the ledger holds".into());
        }
        if self.loss_now.as_ref().is_some_and(|known| known != heldout_loss) {
            return Err("records other losses for the current base than its publication".into());
        }
        let recomputed: BTreeMap<String, f64> =
            regressions(&as_table(anchor_loss), &as_table(heldout_loss), rules.threshold).into_iter().collect();
        if recomputed.is_empty() || recomputed != *risen {
            return Err(format!("records rises {risen:?}; the losses give {recomputed:?}"));
        }
        self.report.breaker_trips += 1;
        self.tripped = Some(watch);
        Ok(())
    }

    /// Recomputes a gauntlet judgment: the seed from what is judged, the verdict from the
    /// recorded per-item losses, under the configured rules and on the same items as before. A
    /// refusal puts the champion back as the current state.
    fn judged(&mut self, event: &Event) -> Result<(), String> {
        let Event::ChallengerJudged {
            round,
            champion_hash,
            challenger_hash,
            items_hash,
            seed,
            rules,
            champion_loss,
            challenger_loss,
            verdict,
        } = event
        else {
            return Ok(());
        };
        let Some(configured) = self.gauntlet else {
            return Err("the consortium's configuration has no gauntlet".into());
        };
        let challenger = self.challenger.take().ok_or("no decision moved the base to be judged")?;
        if challenger.round != *round || challenger.hash != *challenger_hash {
            return Err(format!(
                "judges {challenger_hash} of round {round}; the replay of round {} gives {}",
                challenger.round, challenger.hash
            ));
        }
        if *champion_hash != challenger.champion.base_hash {
            return Err(format!("judges against {champion_hash}, the champion is {}", challenger.champion.base_hash));
        }
        if *rules != configured {
            return Err(format!("judges under {rules:?}, the configuration pins {configured:?}"));
        }
        let expected_seed = crate::coordinator::gauntlet_seed(*round, champion_hash, challenger_hash);
        if *seed != expected_seed {
            return Err(format!("resamples from seed {seed}, what is judged fixes {expected_seed}"));
        }
        match self.items_hash {
            Some(known) if known != *items_hash => {
                return Err(format!("scores on items {items_hash}, earlier judgments on {known}"))
            }
            _ => self.items_hash = Some(*items_hash),
        }
        if let Some((hash, scores)) = &self.champion_items {
            if hash == champion_hash && scores != champion_loss {
                return Err("the champion's item losses differ from those it was promoted with".into());
            }
        }
        let replayed = gauntlet::judge(rules, champion_loss, challenger_loss, *seed).map_err(|e| e.to_string())?;
        if replayed != *verdict {
            let differing = replayed.tests.iter().find(|(l, t)| verdict.tests.get(*l) != Some(t)).map(|(l, _)| l);
            return Err(match differing {
                Some(language) => format!("the verdict's test of {language} does not replay"),
                None => format!("records {}, the replay gives {}", verdict.outcome, replayed.outcome),
            });
        }
        if verdict.outcome.promoted() {
            self.report.promoted += 1;
            self.champion_items = Some((*challenger_hash, challenger_loss.clone()));
        } else {
            self.report.refused += 1;
            self.publish = None;
            self.published_loss = None;
            self.now = challenger.champion;
            self.point = challenger.champion_point;
            self.closed.insert(*round, self.now);
        }
        Ok(())
    }

    /// Replays the per-language check: the same search ([`LanguageSearch`]) run again on the
    /// recorded losses, from the recorded gains, must reach every recorded candidate (its α,
    /// priorities and step) and every conclusion. Returns the published step's scale.
    fn replay_check(&mut self, check: &LanguageCheck, open: &OpenRound, inputs: &[Accepted]) -> Result<f64, String> {
        if let Some(known) = &self.base_loss {
            if *known != check.base_loss {
                return Err("the per-language check starts from other losses than the base's recorded ones".into());
            }
        }
        match &self.reference_loss {
            Some(reference) if *reference != check.reference_loss => {
                return Err("the per-language check measures progress against another genesis than before".into());
            }
            Some(_) => {}
            // The first round starts from the genesis: its base is the reference.
            None if open.round == 1 && check.reference_loss != check.base_loss => {
                return Err("the first round's reference losses are not its base's".into());
            }
            None => self.reference_loss = Some(check.reference_loss.clone()),
        }
        let measured: Vec<Measured> = open
            .gains
            .iter()
            .filter_map(|(node, gains)| {
                let node = NodeId::new(node.clone()).ok()?;
                Some(Measured { node, quality: f64::NAN, gains: gains.clone(), own_loss: f64::NAN })
            })
            .collect();
        let reference = as_table(&check.reference_loss);
        let base = as_table(&check.base_loss);
        let mut search = LanguageSearch::new(check.tolerance, base.clone(), &reference, helped_languages(&measured));
        let last = check.attempts.len().saturating_sub(1);
        let mut concluded = None;
        for (k, attempt) in check.attempts.iter().enumerate() {
            let fault = |why: String| format!("per-language check, candidate {}: {why}", k + 1);
            let same = |a: f64, b: f64| a.to_bits() == b.to_bits();
            if concluded.is_some() {
                return Err(fault("follows the search's conclusion".into()));
            }
            if !same(attempt.alpha, search.alpha())
                || !same(attempt.scale, search.scale())
                || attempt.priorities != search.priorities()
            {
                return Err(fault(format!(
                    "records α {} and step {}, the search gives α {} and step {}",
                    attempt.alpha,
                    attempt.scale,
                    search.alpha(),
                    search.scale()
                )));
            }
            let loss = as_table(&attempt.heldout_loss);
            let risen: BTreeMap<String, f64> = regressions(&base, &loss, check.tolerance).into_iter().collect();
            let recorded = match &attempt.outcome {
                CheckOutcome::Passed => BTreeMap::new(),
                CheckOutcome::Risen { risen } => risen.clone(),
            };
            if recorded != risen || (risen.is_empty() != matches!(attempt.outcome, CheckOutcome::Passed)) {
                return Err(fault(format!("records {:?}, its losses give {risen:?}", attempt.outcome)));
            }
            match search.judge(&loss) {
                Verdict::Next { .. } if k != last => {}
                Verdict::Next { .. } => return Err(fault("the search goes on, the record stops".into())),
                verdict => concluded = Some(verdict),
            }
        }
        let published = match concluded {
            Some(Verdict::Publish { index }) if check.published == Some(index) => check.attempts.get(index),
            Some(Verdict::GiveUp { .. }) if check.published.is_none() && inputs.is_empty() => None,
            None if check.attempts.is_empty() && inputs.is_empty() => None,
            other => {
                return Err(format!(
                    "the per-language check records publishing {:?}; the search concludes {other:?}",
                    check.published
                ))
            }
        };
        match published {
            Some(attempt) => Ok(attempt.scale),
            None => Ok(1.0),
        }
    }

    /// Reads a blob whole and checks it against its name.
    fn check_blob(&mut self, hash: &ContentHash) -> Result<(), String> {
        let bytes = self.store.open(hash).and_then(|blob| blob.check()).map_err(|e| e.to_string())?;
        self.report.blobs += 1;
        self.report.blob_bytes += bytes;
        Ok(())
    }

    fn blob_len(&self, hash: &ContentHash) -> u64 {
        self.store.open(hash).map(|blob| blob.bytes().len() as u64).unwrap_or(0)
    }

    /// The state database's head must be what the ledger says.
    /// `stored`: the configuration and head read with the ledger.
    fn check_state(&self, stored: Option<&(Vec<u8>, Head)>) -> Result<(), AuditError> {
        let Some((config, head)) = stored else {
            return Err(AuditError::State("no consortium in the state database".into()));
        };
        let config_hash = ContentHash(*blake3::hash(config).as_bytes());
        if config_hash != self.config_hash {
            return Err(AuditError::State(format!(
                "stored configuration hashes to {config_hash}, the genesis records {}",
                self.config_hash
            )));
        }
        if head.model != self.now {
            return Err(AuditError::State(format!(
                "current base {}, the ledger ends at {}",
                head.model.base_hash, self.now.base_hash
            )));
        }
        let open = self.open.as_ref().map(|o| o.round);
        if head.round != self.last_closed || head.open != open {
            return Err(AuditError::State(format!(
                "head says round {} closed and {:?} open, the ledger {} and {open:?}",
                head.round, head.open, self.last_closed
            )));
        }
        Ok(())
    }
}
