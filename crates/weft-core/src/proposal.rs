//! Class-3 changes: the consortium's power-bearing rules change only by a proposal that members
//! vote on — a supermajority of a quorum — and a time-lock before it takes effect.
//!
//! This module is the arithmetic: what a change may touch and whether the rules it leaves keep
//! every invariant ([`RuleChange::apply`]), the voting rules, and the tally — a pure function of
//! the electorate's weights and one vote per member, so that anyone holding the ledger gets the
//! same outcome in any order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hash::ContentHash;
use crate::policy::{Policy, PolicyError};

/// What a proposal changes; a field left out stays as it is. Machine-readable: the ledger
/// records exactly this, and `apply` is the only way it reaches the rules.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleChange {
    /// The per-node weight cap, in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<f64>,
    /// The quality floor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<f64>,
    /// Share of the roster that must be accepted for the base to move, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ChangeError {
    #[error("the proposal changes nothing")]
    Empty,
    #[error("the proposal would break the policy's invariants: {0}")]
    Invariant(#[from] PolicyError),
}

impl RuleChange {
    pub fn is_empty(&self) -> bool {
        self.cap.is_none() && self.floor.is_none() && self.quorum.is_none()
    }

    /// The policy with the change applied; refused by name when it changes nothing or the result
    /// breaks an invariant (a cap above 1, a quorum out of range, …).
    pub fn apply(&self, policy: &Policy) -> Result<Policy, ChangeError> {
        if self.is_empty() {
            return Err(ChangeError::Empty);
        }
        let mut changed = *policy;
        if let Some(cap) = self.cap {
            changed.cap = cap;
        }
        if let Some(floor) = self.floor {
            changed.floor = floor;
        }
        if let Some(quorum) = self.quorum {
            changed.quorum = quorum;
        }
        changed.validate()?;
        Ok(changed)
    }

    /// `cap 0.5 → 0.4, quorum 0.5 → 0.75` against `policy`.
    pub fn describe(&self, policy: &Policy) -> String {
        let mut parts = Vec::new();
        if let Some(cap) = self.cap {
            parts.push(format!("cap {} → {cap}", policy.cap));
        }
        if let Some(floor) = self.floor {
            parts.push(format!("floor {} → {floor}", policy.floor));
        }
        if let Some(quorum) = self.quorum {
            parts.push(format!("quorum {} → {quorum}", policy.quorum));
        }
        parts.join(", ")
    }
}

/// How the consortium votes on class-3 proposals (`[voting]`; a key left out takes its default).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VotingRules {
    /// Share of the weight of the votes cast that must approve, in (0.5, 1].
    pub supermajority: f64,
    /// Share of the electorate's weight that must vote for the tally to count, in (0, 1].
    pub quorum: f64,
    /// Rounds a proposal stays open for votes: it is tallied when the round it was made in plus
    /// this many have closed.
    pub voting_rounds: u64,
    /// Rounds between the tally and the change: a passed change applies from the opening of the
    /// round after the next `timelock_rounds` rounds, so members can see it coming.
    pub timelock_rounds: u64,
}

impl Default for VotingRules {
    fn default() -> Self {
        VotingRules { supermajority: 0.7, quorum: 0.5, voting_rounds: 1, timelock_rounds: 1 }
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum VotingError {
    #[error("{key}: {detail}")]
    Rule { key: &'static str, detail: String },
    #[error("{0} is not in the proposal's electorate")]
    NotMember(String),
    #[error("{0} has already voted on this proposal")]
    AlreadyVoted(String),
    #[error("the electorate's weights must be finite, non-negative and not all zero")]
    Weights,
}

impl VotingRules {
    pub fn validate(&self) -> Result<(), VotingError> {
        let rule = |key, detail: String| Err(VotingError::Rule { key, detail });
        if !(self.supermajority > 0.5 && self.supermajority <= 1.0) {
            return rule("voting.supermajority", format!("must be in (0.5, 1], got {}", self.supermajority));
        }
        if !(self.quorum > 0.0 && self.quorum <= 1.0) {
            return rule("voting.quorum", format!("must be in (0, 1], got {}", self.quorum));
        }
        if !(1..=1000).contains(&self.voting_rounds) {
            return rule("voting.voting_rounds", format!("must be in 1..=1000, got {}", self.voting_rounds));
        }
        if !(1..=1000).contains(&self.timelock_rounds) {
            return rule("voting.timelock_rounds", format!("must be in 1..=1000, got {}", self.timelock_rounds));
        }
        Ok(())
    }
}

/// A proposal's count.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tally {
    /// Weight of the approving and rejecting votes.
    pub yes: f64,
    pub no: f64,
    /// Weight voted over the electorate's weight.
    pub turnout: f64,
    /// `yes / (yes + no)` (0 when nobody voted).
    pub approval: f64,
    pub quorum_met: bool,
    pub passed: bool,
}

/// Counts `votes` (member → approve) of an `electorate` (member → weight) under `rules`.
/// Summed in member order, so the count does not depend on the order votes arrived in; a vote
/// from outside the electorate is refused.
pub fn tally(
    rules: &VotingRules,
    electorate: &BTreeMap<String, f64>,
    votes: &BTreeMap<String, bool>,
) -> Result<Tally, VotingError> {
    rules.validate()?;
    if electorate.values().any(|w| !(w.is_finite() && *w >= 0.0)) {
        return Err(VotingError::Weights);
    }
    let total: f64 = electorate.values().sum();
    if total <= 0.0 {
        return Err(VotingError::Weights);
    }
    let (mut yes, mut no) = (0.0, 0.0);
    for (voter, approve) in votes {
        let weight = *electorate.get(voter).ok_or_else(|| VotingError::NotMember(voter.clone()))?;
        if *approve {
            yes += weight;
        } else {
            no += weight;
        }
    }
    let turnout = (yes + no) / total;
    let approval = if yes + no > 0.0 { yes / (yes + no) } else { 0.0 };
    let quorum_met = turnout >= rules.quorum;
    Ok(Tally { yes, no, turnout, approval, quorum_met, passed: quorum_met && approval >= rules.supermajority })
}

/// Records one vote; a member votes once (a replayed or second vote is refused).
pub fn cast(
    electorate: &BTreeMap<String, f64>,
    votes: &mut BTreeMap<String, bool>,
    voter: &str,
    approve: bool,
) -> Result<(), VotingError> {
    if !electorate.contains_key(voter) {
        return Err(VotingError::NotMember(voter.to_owned()));
    }
    if votes.contains_key(voter) {
        return Err(VotingError::AlreadyVoted(voter.to_owned()));
    }
    votes.insert(voter.to_owned(), approve);
    Ok(())
}

/// A proposal's identity: BLAKE3 of the round it was made after, its proposer, its rationale
/// and its change (canonical JSON). Votes sign it, so a vote cannot be moved to another proposal.
pub fn proposal_id(after_round: u64, proposer: &str, rationale: &str, change: &RuleChange) -> ContentHash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"weft-proposal/1\n");
    hasher.update(&after_round.to_le_bytes());
    hasher.update(proposer.as_bytes());
    hasher.update(&[0]);
    hasher.update(rationale.as_bytes());
    hasher.update(&[0]);
    hasher.update(&serde_json::to_vec(change).unwrap_or_default());
    ContentHash(*hasher.finalize().as_bytes())
}

/// The bytes a member signs to make a proposal.
pub fn proposal_message(id: &ContentHash) -> Vec<u8> {
    [&b"weft-propose/1\n"[..], &id.0].concat()
}

/// The bytes a member signs to vote.
pub fn vote_message(id: &ContentHash, approve: bool) -> Vec<u8> {
    [&b"weft-vote/1\n"[..], &id.0, &[u8::from(approve)]].concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Weighting;
    use proptest::prelude::*;

    fn electorate(n: usize) -> BTreeMap<String, f64> {
        (0..n).map(|i| (format!("node-{i}"), 1.0)).collect()
    }

    #[test]
    fn a_supermajority_of_a_quorum_passes_and_less_does_not() {
        let rules = VotingRules::default();
        let e = electorate(5);
        let votes = |v: &[(usize, bool)]| v.iter().map(|(i, a)| (format!("node-{i}"), *a)).collect();
        // 3 of 5 vote (quorum met), all yes.
        assert!(tally(&rules, &e, &votes(&[(0, true), (1, true), (2, true)])).unwrap().passed);
        // 4 vote, 3 yes: 75 % ≥ 70 %.
        assert!(tally(&rules, &e, &votes(&[(0, true), (1, true), (2, true), (3, false)])).unwrap().passed);
        // 5 vote, 3 yes: 60 %.
        let t = tally(&rules, &e, &votes(&[(0, true), (1, true), (2, true), (3, false), (4, false)])).unwrap();
        assert!(!t.passed && t.quorum_met && (t.approval - 0.6).abs() < 1e-12);
        // 2 of 5 vote: no quorum, however unanimous.
        let t = tally(&rules, &e, &votes(&[(0, true), (1, true)])).unwrap();
        assert!(!t.quorum_met && !t.passed);
        assert_eq!(tally(&rules, &e, &votes(&[(9, true)])), Err(VotingError::NotMember("node-9".into())));
    }

    #[test]
    fn a_member_votes_once() {
        let e = electorate(3);
        let mut votes = BTreeMap::new();
        cast(&e, &mut votes, "node-1", true).unwrap();
        assert_eq!(cast(&e, &mut votes, "node-1", false), Err(VotingError::AlreadyVoted("node-1".into())));
        assert_eq!(cast(&e, &mut votes, "node-7", true), Err(VotingError::NotMember("node-7".into())));
        assert_eq!(votes.len(), 1);
    }

    #[test]
    fn a_change_that_breaks_an_invariant_is_refused_by_name() {
        let policy = Policy::new(0.0, 0.5, 0.5, Weighting::Quality).unwrap();
        let cap = RuleChange { cap: Some(1.5), ..RuleChange::default() };
        assert_eq!(cap.apply(&policy), Err(ChangeError::Invariant(PolicyError::Cap(1.5))));
        let quorum = RuleChange { quorum: Some(-0.1), ..RuleChange::default() };
        assert_eq!(quorum.apply(&policy), Err(ChangeError::Invariant(PolicyError::Quorum(-0.1))));
        assert_eq!(RuleChange::default().apply(&policy), Err(ChangeError::Empty));
        let fine = RuleChange { cap: Some(0.4), ..RuleChange::default() };
        assert_eq!(fine.apply(&policy).unwrap().cap, 0.4);
        assert_eq!(fine.describe(&policy), "cap 0.5 → 0.4");
        for bad in [
            VotingRules { supermajority: 0.5, ..VotingRules::default() },
            VotingRules { quorum: 0.0, ..VotingRules::default() },
            VotingRules { timelock_rounds: 0, ..VotingRules::default() },
        ] {
            assert!(matches!(bad.validate(), Err(VotingError::Rule { .. })), "{bad:?}");
        }
    }

    #[test]
    fn votes_sign_their_proposal_and_side() {
        let change = RuleChange { cap: Some(0.4), ..RuleChange::default() };
        let a = proposal_id(2, "node-1", "fewer eggs in one basket", &change);
        assert_ne!(a, proposal_id(3, "node-1", "fewer eggs in one basket", &change));
        assert_ne!(a, proposal_id(2, "node-2", "fewer eggs in one basket", &change));
        assert_ne!(vote_message(&a, true), vote_message(&a, false));
        assert_ne!(proposal_message(&a), vote_message(&a, true));
    }

    proptest! {
        /// The count is a function of who voted what: any arrival order gives the same tally,
        /// bit for bit; a second vote by a member is refused whatever its side; and passing
        /// needs both the quorum and the supermajority.
        #[test]
        fn the_tally_is_order_independent_and_one_member_one_vote(
            weights in proptest::collection::vec(0.0f64..10.0, 1..12),
            sides in proptest::collection::vec(proptest::option::of(any::<bool>()), 12),
            order_seed in any::<u64>(),
        ) {
            let electorate: BTreeMap<String, f64> =
                weights.iter().enumerate().map(|(i, w)| (format!("m{i:02}"), *w)).collect();
            prop_assume!(electorate.values().sum::<f64>() > 0.0);
            let mut ballots: Vec<(String, bool)> = electorate
                .keys()
                .zip(&sides)
                .filter_map(|(m, side)| side.map(|s| (m.clone(), s)))
                .collect();
            let rules = VotingRules::default();
            let mut forward = BTreeMap::new();
            for (m, s) in &ballots {
                cast(&electorate, &mut forward, m, *s).unwrap();
            }
            // Another arrival order.
            let mut state = order_seed;
            for i in (1..ballots.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ballots.swap(i, (state >> 33) as usize % (i + 1));
            }
            let mut shuffled = BTreeMap::new();
            for (m, s) in &ballots {
                cast(&electorate, &mut shuffled, m, *s).unwrap();
                prop_assert!(cast(&electorate, &mut shuffled, m, !*s).is_err());
            }
            let a = tally(&rules, &electorate, &forward).unwrap();
            let b = tally(&rules, &electorate, &shuffled).unwrap();
            prop_assert_eq!(a.yes.to_bits(), b.yes.to_bits());
            prop_assert_eq!(a.no.to_bits(), b.no.to_bits());
            prop_assert_eq!(a.passed, b.passed);
            prop_assert_eq!(a.passed, a.turnout >= rules.quorum && a.approval >= rules.supermajority);
            prop_assert!(a.turnout <= 1.0 + 1e-12);
        }
    }
}
