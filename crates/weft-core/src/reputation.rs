//! Reputation per node per topic: the formulas of docs/reputation.md (the federation design's
//! "Reputation math"), exactly.
//!
//! For node i, topic t, at round τ, from audits a with round t_a, difficulty d_a ∈ (0, 1] and
//! outcome o_a ∈ [0, 1]:
//!
//! * decaying evidence mass   `N = Σ d_a · e^(−λ(τ − t_a))`, `λ = ln 2 / T½`
//! * decaying pass rate       `C = Σ d_a · e^(−λ(τ − t_a)) · o_a / N`
//! * shrunk competence        `Ĉ = (N·C + κ·C₀) / (N + κ)`
//! * raw reputation           `R = Ĉ · N^γ · S · g(stake)`, `g(s) = min(1 + β·ln(1 + s/s₀), g_max)`
//! * vote weight              `w = min(R, θ) / Σ_j min(R_j, θ)`, θ such that no `w` exceeds `w_max`
//!
//! `S` is the slashing factor: 1 normally, multiplied by `slash_factor` (0.1) when cheating is
//! detected, and recovering towards 1 with its own half-life, so trust leaves faster than it
//! arrives. The sums are kept as two decayed accumulators per (node, topic), so an update costs
//! O(1) and the state is two numbers, whatever the length of the history.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::contribution::NodeId;
use crate::policy::capped_weights;

/// Every parameter of the reputation math. Defaults: the seed's values where it gives them
/// (slashing ×0.1, g_max = 2, w_max in 10–20%: 0.2, γ ∈ (0, 1): 0.5), ours elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReputationParams {
    /// T½ of the evidence, in rounds.
    pub half_life: f64,
    /// κ: how many units of evidence the prior is worth.
    pub kappa: f64,
    /// C₀: the prior pass rate of a node with no evidence.
    pub prior: f64,
    /// γ ∈ (0, 1): sub-linearity in evidence volume.
    pub gamma: f64,
    /// Multiplier applied to S on detected cheating.
    pub slash_factor: f64,
    /// Half-life, in rounds, of the gap 1 − S.
    pub slash_recovery_half_life: f64,
    /// β, s₀ and g_max of the stake bonus g.
    pub stake_beta: f64,
    pub stake_unit: f64,
    pub stake_max_bonus: f64,
    /// Largest vote weight any node may hold in a topic.
    pub w_max: f64,
}

impl Default for ReputationParams {
    fn default() -> Self {
        ReputationParams {
            half_life: 10.0,
            kappa: 1.0,
            prior: 0.5,
            gamma: 0.5,
            slash_factor: 0.1,
            slash_recovery_half_life: 20.0,
            stake_beta: 0.5,
            stake_unit: 1.0,
            stake_max_bonus: 2.0,
            w_max: 0.2,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("reputation parameter {name} = {value}: {why}")]
pub struct ParamError {
    pub name: &'static str,
    pub value: f64,
    pub why: &'static str,
}

impl ReputationParams {
    pub fn validate(&self) -> Result<(), ParamError> {
        let checks: [(&'static str, f64, bool, &'static str); 10] = [
            ("half_life", self.half_life, self.half_life > 0.0, "must be > 0"),
            ("kappa", self.kappa, self.kappa >= 0.0, "must be ≥ 0"),
            ("prior", self.prior, (0.0..=1.0).contains(&self.prior), "must be in [0, 1]"),
            ("gamma", self.gamma, self.gamma > 0.0 && self.gamma < 1.0, "must be in (0, 1)"),
            ("slash_factor", self.slash_factor, (0.0..1.0).contains(&self.slash_factor), "must be in [0, 1)"),
            (
                "slash_recovery_half_life",
                self.slash_recovery_half_life,
                self.slash_recovery_half_life > 0.0,
                "must be > 0",
            ),
            ("stake_beta", self.stake_beta, self.stake_beta >= 0.0, "must be ≥ 0"),
            ("stake_unit", self.stake_unit, self.stake_unit > 0.0, "must be > 0"),
            ("stake_max_bonus", self.stake_max_bonus, self.stake_max_bonus >= 1.0, "must be ≥ 1"),
            ("w_max", self.w_max, self.w_max > 0.0 && self.w_max <= 1.0, "must be in (0, 1]"),
        ];
        for (name, value, ok, why) in checks {
            if !(ok && value.is_finite()) {
                return Err(ParamError { name, value, why });
            }
        }
        Ok(())
    }

    /// λ = ln 2 / T½.
    pub fn lambda(&self) -> f64 {
        std::f64::consts::LN_2 / self.half_life
    }

    /// g(stake) = min(1 + β·ln(1 + stake/s₀), g_max).
    pub fn stake_bonus(&self, stake: f64) -> f64 {
        (1.0 + self.stake_beta * (1.0 + stake.max(0.0) / self.stake_unit).ln()).min(self.stake_max_bonus)
    }
}

/// One audit: a scored piece of evidence about a node in a topic.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Audit {
    /// The round it happened in (t_a).
    pub round: u64,
    /// d_a ∈ (0, 1].
    pub difficulty: f64,
    /// o_a ∈ [0, 1].
    pub outcome: f64,
}

/// The decayed accumulators of one node in one topic, as of `round`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub round: u64,
    /// Σ d·decay.
    pub mass: f64,
    /// Σ d·decay·o.
    pub passed: f64,
}

impl Evidence {
    /// Decays the accumulators forward to `round` (never backwards).
    pub fn advance(&mut self, round: u64, params: &ReputationParams) {
        if round > self.round {
            let decay = (-params.lambda() * (round - self.round) as f64).exp();
            self.mass *= decay;
            self.passed *= decay;
            self.round = round;
        }
    }

    /// Adds one audit (clamping d and o into their ranges).
    pub fn record(&mut self, audit: Audit, params: &ReputationParams) {
        self.advance(audit.round, params);
        let d = audit.difficulty.clamp(0.0, 1.0);
        let o = audit.outcome.clamp(0.0, 1.0);
        let decay =
            if audit.round < self.round { (-params.lambda() * (self.round - audit.round) as f64).exp() } else { 1.0 };
        self.mass += d * decay;
        self.passed += d * decay * o;
    }

    /// N.
    pub fn n(&self) -> f64 {
        self.mass
    }

    /// C (the prior when there is no evidence).
    pub fn pass_rate(&self, params: &ReputationParams) -> f64 {
        if self.mass > 0.0 {
            self.passed / self.mass
        } else {
            params.prior
        }
    }

    /// Ĉ = (N·C + κ·C₀) / (N + κ).
    pub fn competence(&self, params: &ReputationParams) -> f64 {
        let denominator = self.mass + params.kappa;
        if denominator > 0.0 {
            (self.passed + params.kappa * params.prior) / denominator
        } else {
            params.prior
        }
    }
}

/// A node's standing in one topic: evidence, slashing factor and stake.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Standing {
    pub evidence: Evidence,
    /// S ∈ [0, 1].
    pub slashing: f64,
    pub stake: f64,
}

impl Default for Standing {
    fn default() -> Self {
        Standing { evidence: Evidence::default(), slashing: 1.0, stake: 0.0 }
    }
}

impl Standing {
    /// R = Ĉ · N^γ · S · g(stake).
    pub fn reputation(&self, params: &ReputationParams) -> f64 {
        self.evidence.competence(params)
            * self.evidence.n().powf(params.gamma)
            * self.slashing
            * params.stake_bonus(self.stake)
    }

    /// Moves to `round`: evidence decays and the slashing gap 1 − S shrinks with its half-life.
    pub fn advance(&mut self, round: u64, params: &ReputationParams) {
        let elapsed = round.saturating_sub(self.evidence.round) as f64;
        if elapsed > 0.0 {
            let recover = (-std::f64::consts::LN_2 * elapsed / params.slash_recovery_half_life).exp();
            self.slashing = 1.0 - (1.0 - self.slashing) * recover;
        }
        self.evidence.advance(round, params);
    }

    /// Detected cheating: S ← S · slash_factor, and the stake is burned.
    pub fn slash(&mut self, params: &ReputationParams) {
        self.slashing *= params.slash_factor;
        self.stake = 0.0;
    }
}

/// Vote weights from reputations: `min(R, θ)/Σ min(R_j, θ)` with θ chosen so that no node exceeds
/// `w_max`. This is water-filling at cap `w_max`; when fewer than ⌈1/w_max⌉ nodes have any
/// reputation, each sits at `w_max` and the weights sum to less than one.
pub fn vote_weights(reputations: &BTreeMap<NodeId, f64>, w_max: f64) -> BTreeMap<NodeId, f64> {
    let scores: Vec<(f64, &NodeId)> =
        reputations.iter().filter(|(_, r)| r.is_finite() && **r > 0.0).map(|(n, r)| (*r, n)).collect();
    let (mut weights, _) = capped_weights(scores, w_max);
    for node in reputations.keys() {
        weights.entry(node.clone()).or_insert(0.0);
    }
    weights
}

/// A node the policy accepted this round, as governance weighs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub node: NodeId,
    /// This round's measured quality (> 0 for an accepted node).
    pub quality: f64,
    /// Its reputation R from earlier rounds (mean over topics).
    pub reputation: f64,
    /// Too little evidence yet to be judged by reputation.
    pub newcomer: bool,
    /// Its slashing factor S (mean over topics), ∈ [0, 1].
    pub trust: f64,
}

/// Reputation shares `ρ`: the clipped vote weights `min(R, θ)/Σ min(R_j, θ)` when `w_max` can
/// hold (at least ⌈1/w_max⌉ nodes); with fewer nodes no clip can hold and the shares are simply
/// proportional to R.
pub fn reputation_shares(reputations: &BTreeMap<NodeId, f64>, w_max: f64) -> BTreeMap<NodeId, f64> {
    let positive = reputations.values().filter(|r| r.is_finite() && **r > 0.0).count();
    if positive as f64 * w_max >= 1.0 {
        return vote_weights(reputations, w_max);
    }
    let total: f64 = reputations.values().filter(|r| r.is_finite() && **r > 0.0).sum();
    reputations
        .iter()
        .map(|(n, r)| (n.clone(), if total > 0.0 && r.is_finite() && *r > 0.0 { r / total } else { 0.0 }))
        .collect()
}

/// How this round's measured quality and the accumulated reputation make the weights.
///
/// Among the nodes the policy accepted, split by evidence into *newcomers* and *established*:
///
/// * established node i: score `qᵢ · ρᵢ`, with `qᵢ` its measured quality and `ρᵢ` its
///   [`reputation_shares`] among the established nodes;
/// * newcomer j: score `q_j` (no track record to multiply by).
///
/// If both groups are present, the newcomers share `exploration` of the mass and the
/// established nodes `1 − exploration`; each group is water-filled within its share so that no
/// node exceeds `cap`; a lone group gets the whole mass. Finally each weight is multiplied by the
/// node's trust `S`: what a slashed node loses stays with the base, even when it is the only one
/// accepted. The result never exceeds the cap and sums to at most 1.
pub fn governed_weights(
    candidates: &[Candidate],
    cap: f64,
    exploration: f64,
    w_max: f64,
) -> (BTreeMap<NodeId, f64>, std::collections::BTreeSet<NodeId>) {
    let (newcomers, established): (Vec<&Candidate>, Vec<&Candidate>) = candidates.iter().partition(|c| c.newcomer);
    let reputations: BTreeMap<NodeId, f64> = established.iter().map(|c| (c.node.clone(), c.reputation)).collect();
    let shares = reputation_shares(&reputations, w_max);
    let usable = |s: &f64| *s > 0.0 && s.is_finite();
    let established_scores: Vec<(f64, &NodeId)> = established
        .iter()
        .map(|c| (c.quality * shares.get(&c.node).copied().unwrap_or(0.0), &c.node))
        .filter(|(s, _)| usable(s))
        .collect();
    let newcomer_scores: Vec<(f64, &NodeId)> =
        newcomers.iter().map(|c| (c.quality, &c.node)).filter(|(s, _)| usable(s)).collect();
    let share = match (established_scores.is_empty(), newcomer_scores.is_empty()) {
        (false, false) => exploration.clamp(0.0, 1.0),
        (true, _) => 1.0,
        (false, true) => 0.0,
    };
    let mut weights = BTreeMap::new();
    let mut capped = std::collections::BTreeSet::new();
    for (scores, mass) in [(established_scores, 1.0 - share), (newcomer_scores, share)] {
        if scores.is_empty() || mass <= 0.0 {
            continue;
        }
        // Water-fill within the group's mass: a cap of cap/mass inside is `cap` outside.
        let (group, group_capped) = capped_weights(scores, (cap / mass).min(1.0));
        for (node, w) in group {
            weights.insert(node, (w * mass).min(cap));
        }
        capped.extend(group_capped);
    }
    for c in candidates {
        let w = weights.entry(c.node.clone()).or_insert(0.0);
        *w *= c.trust.clamp(0.0, 1.0);
    }
    (weights, capped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    /// `count` audits of difficulty `d`, a share `pass` of them passed, spread evenly over
    /// rounds `from..=to`.
    fn history(count: usize, d: f64, pass: f64, from: u64, to: u64, params: &ReputationParams) -> Standing {
        let mut s = Standing::default();
        let passed = (count as f64 * pass).round() as usize;
        for k in 0..count {
            let round = from + (k as u64 * (to - from + 1)) / count as u64;
            s.evidence.record(Audit { round, difficulty: d, outcome: if k < passed { 1.0 } else { 0.0 } }, params);
        }
        s
    }

    /// The source's table (docs/reputation.md) as executable scenarios, evaluated at round 100.
    #[test]
    fn the_seed_table_a_b_c_d() {
        let p = ReputationParams::default();
        let now = 100;
        let at_now = |mut s: Standing| {
            s.advance(now, &p);
            s
        };
        // A: 200 hard audits (d 0.9), 96% passed, in the last 10 rounds.
        let a = at_now(history(200, 0.9, 0.96, 90, 100, &p));
        // B: the same history, three half-lives earlier.
        let shift = (3.0 * p.half_life) as u64;
        let b = at_now(history(200, 0.9, 0.96, 90 - shift, 100 - shift, &p));
        // C: 1000 trivial audits (d 0.05), all passed, recent.
        let c = at_now(history(1000, 0.05, 1.0, 90, 100, &p));
        // D: was the top (400 hard audits, 99%), then caught colluding this round.
        let mut d = history(400, 0.9, 0.99, 90, 100, &p);
        d.stake = 10.0;
        d.advance(now, &p);
        let top_before = d.reputation(&p);
        d.slash(&p);
        let d = d;

        let (ra, rb, rc, rd) = (a.reputation(&p), b.reputation(&p), c.reputation(&p), d.reputation(&p));
        // B's evidence mass is about ⅛ of A's and its competence is pulled towards the prior.
        assert!((b.evidence.n() / a.evidence.n() - 0.125).abs() < 0.01, "{}", b.evidence.n() / a.evidence.n());
        assert!(b.evidence.competence(&p) < a.evidence.competence(&p));
        assert!(ra > 2.5 * rb, "A {ra} vs B {rb}");
        // C farmed volume on trivial audits and still cannot outweigh A.
        assert!(ra > 1.5 * rc, "A {ra} vs C {rc}");
        // D falls to a tenth or less of its former standing, below everyone recent.
        assert!(rd <= 0.1 * top_before / p.stake_bonus(10.0) + 1e-12, "D {rd} vs before {top_before}");
        assert!(rd < rc && rd < ra);
        let weights = vote_weights(&BTreeMap::from([(id("a"), ra), (id("b"), rb), (id("c"), rc), (id("d"), rd)]), 1.0);
        assert!(weights[&id("a")] > weights[&id("c")] && weights[&id("c")] > weights[&id("d")]);
        assert!(weights[&id("d")] < 0.1);
    }

    #[test]
    fn slashing_recovers_slowly() {
        let p = ReputationParams::default();
        let mut s = history(50, 1.0, 1.0, 0, 10, &p);
        s.slash(&p);
        assert!((s.slashing - 0.1).abs() < 1e-12);
        s.advance(10 + p.slash_recovery_half_life as u64, &p);
        assert!((s.slashing - 0.55).abs() < 1e-9, "{}", s.slashing);
    }

    #[test]
    fn stake_bonus_is_concave_and_capped() {
        let p = ReputationParams::default();
        assert_eq!(p.stake_bonus(0.0), 1.0);
        assert!(p.stake_bonus(1.0) > 1.0);
        assert_eq!(p.stake_bonus(1e12), p.stake_max_bonus);
        assert!(p.stake_bonus(2.0) - p.stake_bonus(1.0) < p.stake_bonus(1.0) - p.stake_bonus(0.0));
    }

    #[test]
    fn parameters_are_validated() {
        assert!(ReputationParams::default().validate().is_ok());
        let bad = ReputationParams { gamma: 1.0, ..ReputationParams::default() };
        assert_eq!(bad.validate().unwrap_err().name, "gamma");
        let bad = ReputationParams { w_max: 0.0, ..ReputationParams::default() };
        assert_eq!(bad.validate().unwrap_err().name, "w_max");
    }

    #[test]
    fn a_newcomer_receives_its_exploration_share() {
        let c = |name: &str, quality: f64, reputation: f64, newcomer: bool| Candidate {
            node: id(name),
            quality,
            reputation,
            newcomer,
            trust: 1.0,
        };
        let mut all: Vec<Candidate> = (0..4).map(|i| c(&format!("v{i}"), 0.1, 10.0 + i as f64, false)).collect();
        all.push(c("new", 0.1, 0.0, true));
        let (weights, _) = governed_weights(&all, 0.5, 0.1, 0.3);
        assert!((weights[&id("new")] - 0.1).abs() < 1e-12, "{weights:?}");
        let total: f64 = weights.values().sum();
        assert!((total - 1.0).abs() < 1e-9);
        // Without the budget the newcomer (no reputation) would get nothing.
        let (weights, _) = governed_weights(&all, 0.5, 0.0, 0.3);
        assert_eq!(weights[&id("new")], 0.0);
        // Alone, newcomers get everything (under the cap).
        let (weights, _) = governed_weights(&[c("a", 0.2, 0.0, true), c("b", 0.1, 0.0, true)], 1.0, 0.1, 0.3);
        assert!((weights.values().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn reputation_moves_weight_and_a_slashed_node_keeps_little_even_alone() {
        let c = |name: &str, reputation: f64, trust: f64| Candidate {
            node: id(name),
            quality: 0.1,
            reputation,
            newcomer: false,
            trust,
        };
        let (weights, _) = governed_weights(&[c("good", 9.0, 1.0), c("weak", 1.0, 1.0)], 1.0, 0.1, 0.2);
        assert!((weights[&id("good")] - 0.9).abs() < 1e-12, "{weights:?}");
        let (weights, _) = governed_weights(&[c("caught", 1.0, 0.1)], 0.5, 0.1, 0.2);
        assert!((weights[&id("caught")] - 0.05).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn governed_weights_never_exceed_the_cap(
            nodes in prop::collection::vec((0.0..2.0f64, 0.0..100.0f64, any::<bool>()), 1..30),
            cap in 0.05..=1.0f64, exploration in 0.0..=1.0f64, w_max in 0.05..=1.0f64,
        ) {
            let candidates: Vec<Candidate> = nodes
                .iter()
                .enumerate()
                .map(|(i, (q, r, new))| Candidate { node: id(&format!("n{i}")), quality: *q, reputation: *r, newcomer: *new, trust: 1.0 })
                .collect();
            let (weights, _) = governed_weights(&candidates, cap, exploration, w_max);
            prop_assert!(weights.values().all(|w| *w >= 0.0 && *w <= cap));
            prop_assert!(weights.values().sum::<f64>() <= 1.0 + 1e-9);
        }

        /// No vote weight ever exceeds w_max, whatever the population.
        #[test]
        fn no_vote_weight_exceeds_w_max(
            reps in prop::collection::vec(prop_oneof![0.0..1e-6f64, 0.0..10.0f64, 1e3..1e9f64, Just(0.0)], 1..60),
            w_max in 0.01..=1.0f64,
        ) {
            let reputations: BTreeMap<NodeId, f64> = reps.iter().enumerate().map(|(i, r)| (id(&format!("n{i}")), *r)).collect();
            let weights = vote_weights(&reputations, w_max);
            prop_assert_eq!(weights.len(), reputations.len());
            let sum: f64 = weights.values().sum();
            prop_assert!(sum <= 1.0 + 1e-9);
            for w in weights.values() {
                prop_assert!(*w >= 0.0 && *w <= w_max);
            }
        }

        /// Evidence decays exactly as the closed form says, however it is split into updates.
        #[test]
        fn incremental_decay_matches_the_closed_form(audits in prop::collection::vec((0u64..50, 0.01..1.0f64, 0.0..1.0f64), 1..40), now in 50u64..80) {
            let p = ReputationParams::default();
            let mut sorted = audits.clone();
            sorted.sort_by_key(|a| a.0);
            let mut e = Evidence::default();
            for (round, d, o) in &sorted {
                e.record(Audit { round: *round, difficulty: *d, outcome: *o }, &p);
            }
            e.advance(now, &p);
            let n: f64 = sorted.iter().map(|(r, d, _)| d * (-p.lambda() * (now - r) as f64).exp()).sum();
            let passed: f64 = sorted.iter().map(|(r, d, o)| d * o * (-p.lambda() * (now - r) as f64).exp()).sum();
            prop_assert!((e.n() - n).abs() < 1e-9 * n.max(1.0));
            prop_assert!((e.pass_rate(&p) - passed / n).abs() < 1e-9);
        }
    }
}
