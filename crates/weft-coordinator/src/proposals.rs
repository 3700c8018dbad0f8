//! Class-3 proposals as the coordinator keeps them: made and voted by members (each message
//! signed with the member's ed25519 key), counted when their vote closes, applied after the
//! time-lock. The book moves only by ledger events ([`ProposalBook::apply`]): the coordinator
//! applies what it commits, a restart re-applies the ledger, and `weft ledger verify` applies it
//! again with every check — signatures, electorate, one vote each, the tally recomputed.

use std::collections::BTreeMap;

use weft_core::proposal::{self, ChangeError};
use weft_core::{ContentHash, Policy, RuleChange, VotingRules};
use weft_ledger::{Event, PublicKey, Signature, Voter};

/// Why a proposal or a vote was refused, with a stable code.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ProposalError {
    #[error("no_voting: this consortium has no [voting] section; its rules change only by re-creation")]
    NoVoting,
    #[error("not_member: {0} is not a member of the consortium (or of this proposal's electorate)")]
    NotMember(String),
    #[error("bad_signature: the signature of {0} does not verify with its key")]
    BadSignature(String),
    #[error("already_voted: {0} has already voted on this proposal")]
    AlreadyVoted(String),
    #[error("unknown_proposal: no open proposal {0}")]
    UnknownProposal(ContentHash),
    #[error("duplicate_proposal: proposal {0} was already made")]
    Duplicate(ContentHash),
    #[error("invalid_change: {0}")]
    InvalidChange(#[from] ChangeError),
    #[error("invalid_rationale: a proposal needs a rationale (1 to 2000 characters)")]
    Rationale,
    #[error("wrong_voting_rules: {0}")]
    Voting(String),
    #[error("stale_round: the proposal was signed as made after round {signed}, the last closed round is {last}; sign it again")]
    StaleRound { signed: u64, last: u64 },
}

impl ProposalError {
    pub fn code(&self) -> &'static str {
        match self {
            ProposalError::NoVoting => "no_voting",
            ProposalError::NotMember(_) => "not_member",
            ProposalError::BadSignature(_) => "bad_signature",
            ProposalError::AlreadyVoted(_) => "already_voted",
            ProposalError::UnknownProposal(_) => "unknown_proposal",
            ProposalError::Duplicate(_) => "duplicate_proposal",
            ProposalError::InvalidChange(_) => "invalid_change",
            ProposalError::Rationale => "invalid_rationale",
            ProposalError::Voting(_) => "wrong_voting_rules",
            ProposalError::StaleRound { .. } => "stale_round",
        }
    }
}

/// A proposal whose vote is open.
#[derive(Clone, Debug)]
pub struct OpenProposal {
    pub proposer: String,
    pub rationale: String,
    pub change: RuleChange,
    pub electorate: BTreeMap<String, Voter>,
    pub tally_after_round: u64,
    pub votes: BTreeMap<String, bool>,
}

/// The consortium's proposals: open ones with their votes, and passed changes waiting for their
/// round.
#[derive(Clone, Debug)]
pub struct ProposalBook {
    pub voting: VotingRules,
    pub open: BTreeMap<ContentHash, OpenProposal>,
    /// proposal → (the round it applies from, the change).
    pub scheduled: BTreeMap<ContentHash, (u64, RuleChange)>,
    /// The rules in force (the genesis policy with every change applied).
    pub policy: Policy,
}

impl ProposalBook {
    pub fn new(voting: VotingRules, policy: Policy) -> Self {
        ProposalBook { voting, open: BTreeMap::new(), scheduled: BTreeMap::new(), policy }
    }

    /// The `proposal_made` event of a member's signed proposal, after every check (nothing
    /// changes until the event is applied).
    pub fn propose(
        &self,
        after_round: u64,
        proposer: &str,
        rationale: &str,
        change: RuleChange,
        signature: Signature,
        members: &BTreeMap<String, Voter>,
    ) -> Result<Event, ProposalError> {
        let event = Event::ProposalMade {
            proposal: proposal::proposal_id(after_round, proposer, rationale, &change),
            after_round,
            proposer: proposer.to_owned(),
            rationale: rationale.to_owned(),
            change,
            signature,
            voting: self.voting,
            electorate: members.clone(),
            tally_after_round: after_round + self.voting.voting_rounds,
        };
        self.check(&event)?;
        Ok(event)
    }

    /// The `vote_cast` event of a member's signed vote, after every check.
    pub fn vote(
        &self,
        after_round: u64,
        proposal: ContentHash,
        voter: &str,
        approve: bool,
        signature: Signature,
    ) -> Result<Event, ProposalError> {
        let event = Event::VoteCast { proposal, after_round, voter: voter.to_owned(), approve, signature };
        self.check(&event)?;
        Ok(event)
    }

    /// The counts due when round `round` closes.
    pub fn tallies_due(&self, round: u64) -> Vec<Event> {
        self.open
            .iter()
            .filter(|(_, p)| p.tally_after_round == round)
            .map(|(id, p)| {
                let (tally, effective_round) = self.count(p, round);
                Event::ProposalTallied { proposal: *id, round, tally, effective_round }
            })
            .collect()
    }

    /// The changes that take effect when round `round` opens, in proposal order, each with the
    /// policy it leaves. A change that no longer fits (another applied before it broke an
    /// invariant together with it) is skipped with a warning.
    pub fn changes_due(&self, round: u64) -> Vec<Event> {
        let mut policy = self.policy;
        let mut events = Vec::new();
        for (id, (at, change)) in &self.scheduled {
            if *at != round {
                continue;
            }
            match change.apply(&policy) {
                Ok(next) => {
                    policy = next;
                    events.push(Event::RulesChanged { proposal: *id, round, change: change.clone(), policy });
                }
                Err(e) => tracing::warn!(proposal = %id.short(), "a passed change no longer applies: {e}"),
            }
        }
        events
    }

    fn count(&self, p: &OpenProposal, round: u64) -> (weft_core::Tally, Option<u64>) {
        let weights: BTreeMap<String, f64> = p.electorate.iter().map(|(m, v)| (m.clone(), v.weight)).collect();
        let tally = proposal::tally(&self.voting, &weights, &p.votes).unwrap_or(weft_core::Tally {
            yes: 0.0,
            no: 0.0,
            turnout: 0.0,
            approval: 0.0,
            quorum_met: false,
            passed: false,
        });
        let effective = tally.passed.then_some(round + 1 + self.voting.timelock_rounds);
        (tally, effective)
    }

    /// Whether `event` may be applied to the book as it stands: a proposal or vote checked as
    /// when it arrived, a count or change recomputed. `Ok` for events the book does not follow.
    pub fn check(&self, event: &Event) -> Result<(), ProposalError> {
        match event {
            Event::ProposalMade {
                proposal,
                after_round,
                proposer,
                rationale,
                change,
                signature,
                voting,
                electorate,
                tally_after_round,
            } => {
                if *voting != self.voting || *tally_after_round != after_round + self.voting.voting_rounds {
                    return Err(ProposalError::Voting(format!(
                        "made under {voting:?} to be counted after round {tally_after_round}; the consortium votes under {:?}",
                        self.voting
                    )));
                }
                if rationale.trim().is_empty() || rationale.chars().count() > 2000 {
                    return Err(ProposalError::Rationale);
                }
                let id = proposal::proposal_id(*after_round, proposer, rationale, change);
                if id != *proposal {
                    return Err(ProposalError::BadSignature(format!(
                        "{proposer} (the proposal's id is not its content's)"
                    )));
                }
                if self.open.contains_key(&id) || self.scheduled.contains_key(&id) {
                    return Err(ProposalError::Duplicate(id));
                }
                let voter = electorate.get(proposer).ok_or_else(|| ProposalError::NotMember(proposer.clone()))?;
                if !voter.key.verify(&proposal::proposal_message(&id), signature) {
                    return Err(ProposalError::BadSignature(proposer.clone()));
                }
                change.apply(&self.policy)?;
                Ok(())
            }
            Event::VoteCast { proposal, voter, approve, signature, .. } => {
                let open = self.open.get(proposal).ok_or(ProposalError::UnknownProposal(*proposal))?;
                let member = open.electorate.get(voter).ok_or_else(|| ProposalError::NotMember(voter.clone()))?;
                if !member.key.verify(&proposal::vote_message(proposal, *approve), signature) {
                    return Err(ProposalError::BadSignature(voter.clone()));
                }
                if open.votes.contains_key(voter) {
                    return Err(ProposalError::AlreadyVoted(voter.clone()));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Applies a ledger event (checked by [`check`](Self::check) when it is a proposal or vote;
    /// a count or change must be exactly what the book computes). The error says what does not
    /// replay.
    pub fn apply(&mut self, event: &Event) -> Result<(), String> {
        self.check(event).map_err(|e| e.to_string())?;
        match event {
            Event::ProposalMade { proposal, proposer, rationale, change, electorate, tally_after_round, .. } => {
                self.open.insert(
                    *proposal,
                    OpenProposal {
                        proposer: proposer.clone(),
                        rationale: rationale.clone(),
                        change: change.clone(),
                        electorate: electorate.clone(),
                        tally_after_round: *tally_after_round,
                        votes: BTreeMap::new(),
                    },
                );
            }
            Event::VoteCast { proposal, voter, approve, .. } => {
                if let Some(open) = self.open.get_mut(proposal) {
                    open.votes.insert(voter.clone(), *approve);
                }
            }
            Event::ProposalTallied { proposal, round, tally, effective_round } => {
                let open = self.open.get(proposal).ok_or_else(|| format!("counts {proposal}, which is not open"))?;
                if open.tally_after_round != *round {
                    return Err(format!(
                        "counts at round {round}, the vote closes at round {}",
                        open.tally_after_round
                    ));
                }
                let (recount, effective) = self.count(open, *round);
                if recount != *tally || effective != *effective_round {
                    return Err(format!(
                        "records {tally:?} (effective {effective_round:?}); the votes count {recount:?} (effective {effective:?})"
                    ));
                }
                if let Some(open) = self.open.remove(proposal) {
                    if let Some(at) = effective {
                        self.scheduled.insert(*proposal, (at, open.change));
                    }
                }
            }
            Event::RulesChanged { proposal, round, change, policy } => {
                let (at, scheduled) =
                    self.scheduled.get(proposal).ok_or_else(|| format!("applies {proposal}, which did not pass"))?;
                if at != round || scheduled != change {
                    return Err(format!("applies {proposal} at round {round}; it passed for round {at}"));
                }
                let next = change.apply(&self.policy).map_err(|e| e.to_string())?;
                if next != *policy {
                    return Err(format!("records the policy {policy:?}; the change gives {next:?}"));
                }
                self.policy = next;
                self.scheduled.remove(proposal);
            }
            _ => {}
        }
        Ok(())
    }
}

/// A member's key as an electorate entry of weight 1 (one member, one vote).
pub fn equal_electorate(keys: &BTreeMap<String, PublicKey>) -> BTreeMap<String, Voter> {
    keys.iter().map(|(m, key)| (m.clone(), Voter { key: *key, weight: 1.0 })).collect()
}
