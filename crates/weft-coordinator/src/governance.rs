//! Governance: canary evaluation with a secret reserve, and reputation that drives the weights.
//!
//! Per round:
//! 1. **open** — the active public and secret canary set of every topic score the base.
//! 2. **score** — every contribution's probe `base + s·Δ` is scored on the public sets: its
//!    *quality* is the mean public gain over topics (the round engine's formula, on public
//!    canaries). The whole update `base + Δ` is scored on both: its *Goodhart gap* is mean public
//!    gain − mean secret gain. A delta that learned the public canaries rather than the topic
//!    gains far more on them than on the secret reserve; at full scale memorisation shows most.
//! 3. **close** — `adjust` (before aggregation, no state change) and `commit` (once the round
//!    is final). One *audit* per contribution and topic enters the reputation math: difficulty
//!    `d` = the public set's difficulty, outcome `o = clamp(gain_t / outcome_margin, 0, 1)` (1 for
//!    a clear improvement of that topic, 0 for none or harm). A contribution that failed the
//!    structural checks is an audit with `o = 0` in every topic. A contribution whose gap exceeds
//!    `goodhart_margin` is rejected (`canary_overfit`), its audits count as failed (`o = 0`) and
//!    its node is slashed. The weights of the
//!    accepted nodes are then recomputed from quality and *earlier* reputation
//!    ([`weft_core::reputation::governed_weights`]), and each public set counts one reveal.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use weft_core::quality::{measured_quality, LossTable};
use weft_core::reputation::{governed_weights, vote_weights, Audit, Candidate, ReputationParams, Standing};
use weft_core::{ContentHash, Decision, ModelState, NodeId, Rejection};
use weft_model::ModelFamily;

use crate::canary::{CanaryError, CanaryRegistry, Visibility};
use crate::measure::{HeldoutSet, Measure, MeasureError};

/// Every governance parameter, with documented defaults.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GovernanceSettings {
    pub reputation: ReputationParams,
    /// Share of the weight reserved for newcomers when established nodes are also accepted.
    pub exploration: f64,
    /// A node whose evidence mass N is below this in every topic is a newcomer.
    pub newcomer_evidence: f64,
    /// Gain (nats/byte, at the probe scale) that counts as a full pass of an audit.
    pub outcome_margin: f64,
    /// Largest tolerated public-minus-secret gain (nats/byte, at the probe scale).
    pub goodhart_margin: f64,
}

impl Default for GovernanceSettings {
    fn default() -> Self {
        GovernanceSettings {
            reputation: ReputationParams::default(),
            exploration: 0.1,
            newcomer_evidence: 1.0,
            outcome_margin: 0.02,
            goodhart_margin: 0.05,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GovernanceError {
    #[error(transparent)]
    Canary(#[from] CanaryError),
    #[error(transparent)]
    Measure(#[from] MeasureError),
    #[error("governance settings: {0}")]
    Settings(String),
}

/// Everything governance must keep across restarts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GovernanceState {
    /// node → topic → standing.
    pub standings: BTreeMap<NodeId, BTreeMap<String, Standing>>,
    /// Scored reveals per canary set id.
    pub reveals: BTreeMap<String, u64>,
    /// Rounds in which each node was caught overfitting the public canaries.
    pub flagged: BTreeMap<NodeId, Vec<u64>>,
}

/// What governance measured about one contribution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CanaryScore {
    pub node: NodeId,
    /// Public-canary gain per topic of the probe `base + s·Δ`, nats/byte.
    pub public_gain: LossTable,
    /// Secret-reserve gain per topic of the whole update `base + Δ`.
    pub secret_gain: LossTable,
    /// Mean relative public gain of the probe over topics: the quality the policy sees.
    pub quality: f64,
    /// Mean public gain − mean secret gain, both of the whole update `base + Δ`.
    pub goodhart_gap: f64,
    pub flagged: bool,
}

/// One row of the reputation table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReputationRow {
    pub node: NodeId,
    pub topic: String,
    /// Evidence mass N.
    pub n: f64,
    /// Shrunk competence Ĉ.
    pub competence: f64,
    /// Slashing factor S.
    pub slashing: f64,
    /// Raw reputation R.
    pub reputation: f64,
    /// Vote weight w in the topic (≤ w_max).
    pub vote_weight: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CanaryUse {
    pub id: String,
    pub topic: String,
    pub visibility: Visibility,
    /// BLAKE3 of the set's text: commits to the secret reserve without revealing it.
    pub hash: ContentHash,
    pub reveals: u64,
}

/// Governance's part of a round record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GovernanceRecord {
    pub canaries: Vec<CanaryUse>,
    pub scores: Vec<CanaryScore>,
    /// After this round's audits and slashing.
    pub reputation: Vec<ReputationRow>,
}

pub struct Governance {
    settings: GovernanceSettings,
    registry: CanaryRegistry,
    state: GovernanceState,
    family: Arc<dyn ModelFamily>,
    open: Option<OpenCanaries>,
}

struct OpenCanaries {
    round: u64,
    public: HeldoutSet,
    secret: Option<HeldoutSet>,
    public_base: LossTable,
    secret_base: LossTable,
    used: Vec<CanaryUse>,
    difficulty: BTreeMap<String, f64>,
    scores: BTreeMap<NodeId, CanaryScore>,
    failed: BTreeSet<NodeId>,
}

impl Governance {
    pub fn new(
        settings: GovernanceSettings,
        registry: CanaryRegistry,
        family: Arc<dyn ModelFamily>,
    ) -> Result<Self, GovernanceError> {
        settings.reputation.validate().map_err(|e| GovernanceError::Settings(e.to_string()))?;
        let in_range = |v: f64, lo: f64, hi: f64| v.is_finite() && v >= lo && v <= hi;
        if !in_range(settings.exploration, 0.0, 1.0) {
            return Err(GovernanceError::Settings(format!(
                "exploration must be in [0, 1], got {}",
                settings.exploration
            )));
        }
        if !(settings.outcome_margin > 0.0 && settings.goodhart_margin > 0.0 && settings.newcomer_evidence >= 0.0) {
            return Err(GovernanceError::Settings("margins must be > 0 and newcomer_evidence ≥ 0".into()));
        }
        Ok(Governance { settings, registry, state: GovernanceState::default(), family, open: None })
    }

    /// Continues from a saved state (reputation, reveals, flags).
    pub fn with_state(mut self, state: GovernanceState) -> Self {
        self.registry.restore_reveals(state.reveals.clone());
        self.state = state;
        self
    }

    pub fn state(&self) -> &GovernanceState {
        &self.state
    }

    pub fn settings(&self) -> &GovernanceSettings {
        &self.settings
    }

    /// Scores the base on the active sets of every topic.
    pub(crate) fn open(&mut self, round: u64, base: &ModelState) -> Result<(), GovernanceError> {
        let mut public_texts = BTreeMap::new();
        let mut secret_texts = BTreeMap::new();
        let mut used = Vec::new();
        let mut difficulty = BTreeMap::new();
        for topic in self.registry.topics() {
            let public = self.registry.active(&topic, Visibility::Public)?;
            public_texts.insert(topic.clone(), public.text.clone());
            difficulty.insert(topic.clone(), public.spec.difficulty);
            used.push(use_of(public, self.registry.reveals(&public.spec.id) + 1));
            if let Ok(secret) = self.registry.active(&topic, Visibility::Secret) {
                secret_texts.insert(topic.clone(), secret.text.clone());
                used.push(use_of(secret, 0));
            }
        }
        let mut public = HeldoutSet::new(self.family.clone(), public_texts)?;
        let public_base = public.heldout_loss(base)?;
        let (secret, secret_base) = if secret_texts.is_empty() {
            (None, LossTable::new())
        } else {
            let mut secret = HeldoutSet::new(self.family.clone(), secret_texts)?;
            let loss = secret.heldout_loss(base)?;
            (Some(secret), loss)
        };
        self.open = Some(OpenCanaries {
            round,
            public,
            secret,
            public_base,
            secret_base,
            used,
            difficulty,
            scores: BTreeMap::new(),
            failed: BTreeSet::new(),
        });
        Ok(())
    }

    /// Scores one contribution: `probe = base + s·Δ` gives its quality (mean public gain) and
    /// `whole = base + Δ` (the whole local update) its Goodhart gap (mean public gain − mean secret gain of the whole
    /// local update, where memorised canaries show most). Returns the probe's public losses and
    /// the base's they are measured against.
    pub(crate) fn score(
        &mut self,
        node: &NodeId,
        probe: &ModelState,
        whole: &ModelState,
    ) -> Result<(LossTable, LossTable), GovernanceError> {
        let Some(open) = self.open.as_mut() else { return Ok((LossTable::new(), LossTable::new())) };
        let public = open.public.heldout_loss(probe)?;
        let public_gain = gains(&open.public_base, &public);
        let quality = measured_quality(&open.public_base, &public);
        let (whole_public_gain, secret_gain) = match open.secret.as_mut() {
            Some(secret) => {
                let whole_public = open.public.heldout_loss(whole)?;
                let whole_secret = secret.heldout_loss(whole)?;
                (gains(&open.public_base, &whole_public), gains(&open.secret_base, &whole_secret))
            }
            None => (LossTable::new(), LossTable::new()),
        };
        let goodhart_gap = if secret_gain.is_empty() { 0.0 } else { mean(&whole_public_gain) - mean(&secret_gain) };
        let flagged = goodhart_gap > self.settings.goodhart_margin;
        open.scores.insert(
            node.clone(),
            CanaryScore { node: node.clone(), public_gain, secret_gain, quality, goodhart_gap, flagged },
        );
        Ok((public, open.public_base.clone()))
    }

    /// A roster node whose contribution failed the structural checks: a failed audit.
    pub(crate) fn failed(&mut self, node: &NodeId) {
        if let Some(open) = self.open.as_mut() {
            open.failed.insert(node.clone());
        }
    }

    /// Applies the Goodhart detector and reputation to the policy's decision. Changes nothing in
    /// governance's own state, so that a round whose aggregation fails can be closed again.
    pub(crate) fn adjust(&self, decision: &mut Decision, cap: f64) {
        let Some(open) = self.open.as_ref() else { return };
        let params = self.settings.reputation;
        let topics: Vec<String> = open.difficulty.keys().cloned().collect();
        for (node, score) in &open.scores {
            if score.flagged && decision.weights.remove(node).is_some() {
                decision.capped.remove(node);
                let reason =
                    Rejection::CanaryOverfit { gap: score.goodhart_gap, margin: self.settings.goodhart_margin };
                decision.rejected.insert(node.clone(), reason);
            }
        }
        // Weights from quality and the reputation earned before this round.
        // The policy's weight is each node's quality here: what the policy made of its measured
        // gains (under every-language fairness, its languages' shares with their priorities).
        let candidates: Vec<Candidate> = decision
            .weights
            .iter()
            .filter(|(node, _)| open.scores.contains_key(*node))
            .map(|(node, &weight)| {
                let (reputation, newcomer, trust) = self.standing_summary(node, open.round, &topics);
                Candidate { node: node.clone(), quality: weight, reputation, newcomer, trust }
            })
            .collect();
        let (weights, capped) = governed_weights(&candidates, cap, self.settings.exploration, params.w_max);
        decision.weights = weights;
        decision.capped = capped;
        decision.unassigned = (1.0 - decision.weights.values().sum::<f64>()).max(0.0);
    }

    /// Records the round's audits and slashing and counts the reveals: call once the round's
    /// outcome is final.
    pub(crate) fn commit(&mut self) -> Option<GovernanceRecord> {
        let open = self.open.take()?;
        let params = self.settings.reputation;
        let topics: Vec<String> = open.difficulty.keys().cloned().collect();
        // This round's evidence.
        let round = open.round;
        for (node, score) in &open.scores {
            let standings = self.state.standings.entry(node.clone()).or_default();
            for topic in &topics {
                let s = standings.entry(topic.clone()).or_default();
                s.advance(round, &params);
                let gain = score.public_gain.get(topic).copied().unwrap_or(0.0);
                // A delta caught teaching to the test failed its blind audit, whatever it scored.
                let outcome = if gain.is_finite() && !score.flagged {
                    (gain / self.settings.outcome_margin).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                s.evidence.record(Audit { round, difficulty: open.difficulty[topic], outcome }, &params);
                if score.flagged {
                    s.slash(&params);
                }
            }
            if score.flagged {
                self.state.flagged.entry(node.clone()).or_default().push(round);
            }
        }
        for node in &open.failed {
            let standings = self.state.standings.entry(node.clone()).or_default();
            for topic in &topics {
                let s = standings.entry(topic.clone()).or_default();
                s.advance(round, &params);
                s.evidence.record(Audit { round, difficulty: open.difficulty[topic], outcome: 0.0 }, &params);
            }
        }
        for standings in self.state.standings.values_mut() {
            for s in standings.values_mut() {
                s.advance(round, &params);
            }
        }
        for u in open.used.iter().filter(|u| u.visibility == Visibility::Public) {
            self.registry.reveal(&u.id);
        }
        self.state.reveals = self.registry.reveal_counts().clone();
        Some(GovernanceRecord {
            canaries: open.used,
            scores: open.scores.into_values().collect(),
            reputation: self.table(&topics),
        })
    }

    /// A node's mean reputation and mean slashing factor over topics as of `round`, and whether
    /// it is still a newcomer.
    fn standing_summary(&self, node: &NodeId, round: u64, topics: &[String]) -> (f64, bool, f64) {
        let params = self.settings.reputation;
        let Some(standings) = self.state.standings.get(node) else { return (0.0, true, 1.0) };
        let (mut reputation, mut trust) = (0.0, 0.0);
        let mut newcomer = true;
        for topic in topics {
            let mut s = standings.get(topic).copied().unwrap_or_default();
            s.advance(round, &params);
            reputation += s.reputation(&params);
            trust += s.slashing;
            newcomer &= s.evidence.n() < self.settings.newcomer_evidence;
        }
        let count = topics.len().max(1) as f64;
        (reputation / count, newcomer, trust / count)
    }

    /// The reputation table (node × topic), with vote weights per topic.
    pub fn table(&self, topics: &[String]) -> Vec<ReputationRow> {
        reputation_table(&self.state, topics, &self.settings.reputation)
    }
}

/// Node × topic rows of N, Ĉ, S, R and the vote weight in each topic.
pub fn reputation_table(state: &GovernanceState, topics: &[String], params: &ReputationParams) -> Vec<ReputationRow> {
    let mut rows = Vec::new();
    for topic in topics {
        let reputations: BTreeMap<NodeId, f64> = state
            .standings
            .iter()
            .filter_map(|(node, s)| Some((node.clone(), s.get(topic)?.reputation(params))))
            .collect();
        let votes = vote_weights(&reputations, params.w_max);
        for (node, standings) in &state.standings {
            let Some(s) = standings.get(topic) else { continue };
            let vote_weight = votes.get(node).copied().unwrap_or(0.0);
            rows.push(ReputationRow {
                node: node.clone(),
                topic: topic.clone(),
                n: s.evidence.n(),
                competence: s.evidence.competence(params),
                slashing: s.slashing,
                reputation: s.reputation(params),
                vote_weight,
            });
        }
    }
    rows
}

fn gains(base: &LossTable, probe: &LossTable) -> LossTable {
    base.iter().filter_map(|(t, b)| probe.get(t).map(|p| (t.clone(), b - p))).collect()
}

fn mean(table: &LossTable) -> f64 {
    if table.is_empty() {
        0.0
    } else {
        table.values().sum::<f64>() / table.len() as f64
    }
}

fn use_of(set: &crate::canary::CanarySet, reveals: u64) -> CanaryUse {
    CanaryUse {
        id: set.spec.id.clone(),
        topic: set.spec.topic.clone(),
        visibility: set.spec.visibility,
        hash: set.hash,
        reveals,
    }
}
