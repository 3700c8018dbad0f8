//! The consortium's ledger: every decision as an append-only entry, hash-chained to the one
//! before it and signed by the coordinator, with a Merkle root over each round's contributions.
//!
//! The bytes of an entry are its canonical JSON line; [`Chain::check`] re-derives every field
//! of a line, so any change to any byte of the ledger is caught at the entry it touches.

mod chain;
mod entry;
mod manifest;
mod merkle;
mod proof;
mod signing;
mod witness;

pub use chain::{Chain, ChainError, Fault};
pub use entry::{Accepted, CheckAttempt, CheckOutcome, Entry, Event, LanguageCheck, Refusal, Rejected, Voter};
pub use manifest::ContributionManifest;
pub use merkle::{leaf_hash, merkle_root, InclusionProof, ProofError};
pub use proof::{ContributionProof, ProofCheckError, ProveError};
pub use signing::{KeyError, PublicKey, Signature, SigningKey};
pub use witness::{WitnessError, WitnessedHead};
