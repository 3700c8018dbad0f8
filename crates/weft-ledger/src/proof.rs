//! A self-contained proof that a contribution is in the ledger: the signed entry that received
//! it, the signed decision of its round, and the Merkle path between them.

use serde::{Deserialize, Serialize};

use crate::entry::{Entry, Event};
use crate::merkle::{InclusionProof, ProofError};
use crate::signing::PublicKey;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContributionProof {
    pub coordinator_key: PublicKey,
    /// The `contribution_received` entry.
    pub received: Entry,
    /// The coordinator's evaluation of it (absent when it was refused at the door).
    pub evaluation: Option<Entry>,
    /// The round's `decision` entry, which carries the Merkle root.
    pub decision: Entry,
    pub inclusion: InclusionProof,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProofCheckError {
    #[error("signed by {found}, not by the trusted coordinator key {trusted}")]
    UntrustedKey { trusted: PublicKey, found: PublicKey },
    #[error("{0} entry: its hash does not match its contents")]
    Hash(&'static str),
    #[error("{0} entry: the coordinator's signature does not verify")]
    Signature(&'static str),
    #[error("the entries are not a contribution_received, an evaluation and a decision of one round")]
    Shape,
    #[error("the decision covers {recorded} contributions, the proof claims a tree of {claimed}")]
    Size { recorded: usize, claimed: usize },
    #[error("inclusion: {0}")]
    Inclusion(#[from] ProofError),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProveError {
    #[error("the ledger has no consortium_created entry")]
    NoGenesis,
    #[error("no contribution from {node} was received in round {round}")]
    NotReceived { node: String, round: u64 },
    #[error("round {0} has not been decided yet")]
    Undecided(u64),
    #[error(transparent)]
    Proof(#[from] ProofError),
}

impl ContributionProof {
    /// Builds the proof for `node`'s contribution to `round` from a checked ledger. When a node
    /// sent more than once, the contribution that was measured is proven (else the last one).
    pub fn build(entries: &[Entry], node: &str, round: u64) -> Result<Self, ProveError> {
        let coordinator_key = entries
            .iter()
            .find_map(|e| match &e.event {
                Event::ConsortiumCreated { coordinator_key, .. } => Some(*coordinator_key),
                _ => None,
            })
            .ok_or(ProveError::NoGenesis)?;
        let received: Vec<&Entry> = entries
            .iter()
            .filter(|e| matches!(&e.event, Event::ContributionReceived { round: r, .. } if *r == round))
            .collect();
        let mine = |e: &&Entry| matches!(&e.event, Event::ContributionReceived { node: n, .. } if n == node);
        let measured = |e: &&Entry| matches!(&e.event, Event::ContributionReceived { delta_hash: Some(_), .. });
        let index = received
            .iter()
            .position(|e| mine(e) && measured(e))
            .or_else(|| received.iter().rposition(mine))
            .ok_or_else(|| ProveError::NotReceived { node: node.to_owned(), round })?;
        let evaluation = entries
            .iter()
            .find(|e| matches!(&e.event, Event::Evaluation { round: r, node: n, .. } if *r == round && n == node))
            .filter(|_| measured(&received[index]))
            .cloned();
        let decision = entries
            .iter()
            .find(|e| matches!(&e.event, Event::Decision { round: r, .. } if *r == round))
            .cloned()
            .ok_or(ProveError::Undecided(round))?;
        let leaves: Vec<_> = received.iter().map(|e| e.leaf()).collect();
        Ok(ContributionProof {
            coordinator_key,
            received: received[index].clone(),
            evaluation,
            decision,
            inclusion: InclusionProof::new(&leaves, index)?,
        })
    }

    /// Checks every signature and hash and the inclusion. With `trusted`, the proof must be
    /// signed by that key (otherwise compare `coordinator_key` with the consortium's).
    pub fn check(&self, trusted: Option<PublicKey>) -> Result<(), ProofCheckError> {
        if let Some(trusted) = trusted.filter(|t| *t != self.coordinator_key) {
            return Err(ProofCheckError::UntrustedKey { trusted, found: self.coordinator_key });
        }
        let entries = [
            ("received", Some(&self.received)),
            ("evaluation", self.evaluation.as_ref()),
            ("decision", Some(&self.decision)),
        ];
        for (what, entry) in entries {
            let Some(entry) = entry else { continue };
            if Entry::compute_hash(entry.seq, &entry.prev, &entry.event) != entry.hash {
                return Err(ProofCheckError::Hash(what));
            }
            if !self.coordinator_key.verify(&entry.hash.0, &entry.signature) {
                return Err(ProofCheckError::Signature(what));
            }
        }
        let Event::ContributionReceived { round, node, .. } = &self.received.event else {
            return Err(ProofCheckError::Shape);
        };
        if let Some(evaluation) = &self.evaluation {
            match &evaluation.event {
                Event::Evaluation { round: r, node: n, .. } if r == round && n == node => {}
                _ => return Err(ProofCheckError::Shape),
            }
        }
        let Event::Decision { round: decided, contributions_root, contributions, .. } = &self.decision.event else {
            return Err(ProofCheckError::Shape);
        };
        if decided != round || self.decision.seq <= self.received.seq {
            return Err(ProofCheckError::Shape);
        }
        if *contributions != self.inclusion.size {
            return Err(ProofCheckError::Size { recorded: *contributions, claimed: self.inclusion.size });
        }
        self.inclusion.verify(self.received.leaf(), *contributions_root)?;
        Ok(())
    }
}
