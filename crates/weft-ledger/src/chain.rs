//! Writing and checking the hash chain.

use weft_core::ContentHash;

use crate::entry::{Entry, Event};
use crate::signing::{PublicKey, SigningKey};

/// What is wrong with one entry.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Fault {
    #[error("not a ledger entry: {0}")]
    Unparsable(String),
    #[error("bytes differ from the entry's canonical form (edited by hand?)")]
    NonCanonical,
    #[error("sequence number {found}, expected {expected}")]
    Sequence { expected: u64, found: u64 },
    #[error("links to {found}, but the previous entry's hash is {expected}")]
    Link { expected: ContentHash, found: ContentHash },
    #[error("records hash {recorded}, its contents hash to {computed}")]
    Hash { recorded: ContentHash, computed: ContentHash },
    #[error("the coordinator's signature does not verify")]
    Signature,
    #[error("the first entry must be consortium_created, found {0}")]
    NoGenesis(&'static str),
    #[error("a second consortium_created entry")]
    SecondGenesis,
    #[error("signed by key {recorded}, but the trusted coordinator key is {trusted}")]
    UntrustedKey { trusted: PublicKey, recorded: PublicKey },
    #[error("contains a number that JSON cannot carry (NaN or infinity)")]
    NonFinite,
}

/// A fault located at the entry it was found in.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("ledger entry {seq}: {fault}")]
pub struct ChainError {
    pub seq: u64,
    pub fault: Fault,
}

/// The head of a chain: checks entries one after another, or seals new ones.
#[derive(Clone, Debug)]
pub struct Chain {
    trusted: Option<PublicKey>,
    key: Option<PublicKey>,
    next_seq: u64,
    head: ContentHash,
}

impl Chain {
    /// An empty chain. With `trusted`, the genesis entry must carry exactly that key; without,
    /// the key in the genesis entry is taken (compare its fingerprint out of band).
    pub fn new(trusted: Option<PublicKey>) -> Self {
        Chain { trusted, key: None, next_seq: 0, head: ContentHash([0; 32]) }
    }

    /// Continues a chain whose entries were checked before: the next entry is `next_seq`, linked
    /// to `head`, signed by `key`.
    pub fn continue_from(key: PublicKey, next_seq: u64, head: ContentHash) -> Self {
        Chain { trusted: Some(key), key: Some(key), next_seq, head }
    }

    /// The coordinator key the chain is checked against (after its genesis).
    pub fn key(&self) -> Option<PublicKey> {
        self.key
    }

    pub fn len(&self) -> u64 {
        self.next_seq
    }

    pub fn is_empty(&self) -> bool {
        self.next_seq == 0
    }

    /// Hash of the last entry (zeros when empty).
    pub fn head(&self) -> ContentHash {
        self.head
    }

    /// Parses and checks the next line; on success the chain advances past it.
    pub fn check(&mut self, line: &[u8]) -> Result<Entry, ChainError> {
        let at = |fault| ChainError { seq: self.next_seq, fault };
        let entry: Entry = serde_json::from_slice(line).map_err(|e| at(Fault::Unparsable(e.to_string())))?;
        if entry.to_line() != line {
            return Err(at(Fault::NonCanonical));
        }
        self.accept(entry)
    }

    /// Checks an already parsed entry (see [`check`](Self::check) for lines).
    pub fn accept(&mut self, entry: Entry) -> Result<Entry, ChainError> {
        let at = |fault| ChainError { seq: self.next_seq, fault };
        if entry.seq != self.next_seq {
            return Err(at(Fault::Sequence { expected: self.next_seq, found: entry.seq }));
        }
        if entry.prev != self.head {
            return Err(at(Fault::Link { expected: self.head, found: entry.prev }));
        }
        let computed = Entry::compute_hash(entry.seq, &entry.prev, &entry.event);
        if computed != entry.hash {
            return Err(at(Fault::Hash { recorded: entry.hash, computed }));
        }
        let key = match (&entry.event, self.key) {
            (Event::ConsortiumCreated { coordinator_key, .. }, None) => {
                if let Some(trusted) = self.trusted.filter(|t| t != coordinator_key) {
                    return Err(at(Fault::UntrustedKey { trusted, recorded: *coordinator_key }));
                }
                *coordinator_key
            }
            (Event::ConsortiumCreated { .. }, Some(_)) => return Err(at(Fault::SecondGenesis)),
            (event, None) => return Err(at(Fault::NoGenesis(event.kind()))),
            (_, Some(key)) => key,
        };
        if !key.verify(&entry.hash.0, &entry.signature) {
            return Err(at(Fault::Signature));
        }
        self.key = Some(key);
        self.next_seq += 1;
        self.head = entry.hash;
        Ok(entry)
    }

    /// Seals the next entry with the coordinator's key and returns it with its line. The chain
    /// advances only if the line reads back as the same entry (no NaN slips into the ledger).
    pub fn seal(&mut self, key: &SigningKey, event: Event) -> Result<(Entry, Vec<u8>), ChainError> {
        let seq = self.next_seq;
        let hash = Entry::compute_hash(seq, &self.head, &event);
        let entry = Entry { seq, prev: self.head, event, hash, signature: key.sign(&hash.0) };
        let line = entry.to_line();
        let mut probe = self.clone();
        let read_back = probe.check(&line).map_err(|e| match e.fault {
            Fault::Unparsable(_) | Fault::NonCanonical => ChainError { seq, fault: Fault::NonFinite },
            _ => e,
        })?;
        // JSON writes NaN as null: the entry would read back as something else.
        if read_back != entry {
            return Err(ChainError { seq, fault: Fault::NonFinite });
        }
        *self = probe;
        Ok((entry, line))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use proptest::prelude::*;

    fn genesis(key: &SigningKey) -> Event {
        Event::ConsortiumCreated {
            coordinator_key: key.public(),
            config_hash: ContentHash([1; 32]),
            roster_hash: ContentHash([2; 32]),
            roster: BTreeMap::from([("node-en".into(), "en".into())]),
            base_hash: ContentHash([3; 32]),
        }
    }

    fn ledger(key: &SigningKey, rounds: u64) -> Vec<Vec<u8>> {
        let mut chain = Chain::new(None);
        let mut lines = vec![chain.seal(key, genesis(key)).unwrap().1];
        for round in 1..=rounds {
            let event = Event::Evaluation {
                round,
                node: "node-en".into(),
                quality: Some(0.1 * round as f64 + 1e-17),
                heldout_loss: BTreeMap::from([("en".into(), Some(2.0 / 3.0)), ("de".into(), None)]),
                delta_norm: 1.0 / 7.0,
                gains: Some(BTreeMap::from([("en".into(), 0.25)])),
            };
            lines.push(chain.seal(key, event).unwrap().1);
        }
        lines
    }

    fn check_all(lines: &[Vec<u8>], trusted: Option<PublicKey>) -> Result<u64, ChainError> {
        let mut chain = Chain::new(trusted);
        for line in lines {
            chain.check(line)?;
        }
        Ok(chain.len())
    }

    #[test]
    fn a_sealed_ledger_checks_with_and_without_a_trusted_key() {
        let key = SigningKey::from_seed([9; 32]);
        let lines = ledger(&key, 5);
        assert_eq!(check_all(&lines, None), Ok(6));
        assert_eq!(check_all(&lines, Some(key.public())), Ok(6));
        let other = SigningKey::from_seed([10; 32]).public();
        assert!(matches!(
            check_all(&lines, Some(other)),
            Err(ChainError { seq: 0, fault: Fault::UntrustedKey { .. } })
        ));
    }

    #[test]
    fn removal_reordering_and_resigning_by_another_key_are_caught() {
        let key = SigningKey::from_seed([9; 32]);
        let lines = ledger(&key, 4);
        let mut dropped = lines.clone();
        dropped.remove(2);
        assert!(matches!(check_all(&dropped, None), Err(ChainError { seq: 2, fault: Fault::Sequence { .. } })));
        // An impostor re-seals an entry with its own key: the hash matches, the signature not.
        let impostor = SigningKey::from_seed([11; 32]);
        let mut entry: Entry = serde_json::from_slice(&lines[3]).unwrap();
        entry.signature = impostor.sign(&entry.hash.0);
        let mut forged = lines.clone();
        forged[3] = entry.to_line();
        assert_eq!(check_all(&forged, None).unwrap_err(), ChainError { seq: 3, fault: Fault::Signature });
        // A genesis that is not first.
        assert!(matches!(check_all(&lines[1..], None), Err(ChainError { seq: 0, .. })));
    }

    #[test]
    fn nan_cannot_be_sealed() {
        let key = SigningKey::from_seed([9; 32]);
        let mut chain = Chain::new(None);
        chain.seal(&key, genesis(&key)).unwrap();
        let bad = Event::Evaluation {
            round: 1,
            node: "n".into(),
            quality: Some(f64::NAN),
            heldout_loss: BTreeMap::new(),
            delta_norm: 0.0,
            gains: None,
        };
        assert_eq!(chain.seal(&key, bad).unwrap_err().fault, Fault::NonFinite);
        assert_eq!(chain.len(), 1, "the chain did not advance");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Any single-byte change anywhere in the ledger is reported at the entry it touched.
        #[test]
        fn any_single_byte_change_is_caught_at_its_entry(
            which in any::<prop::sample::Index>(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let key = SigningKey::from_seed([9; 32]);
            let mut lines = ledger(&key, 4);
            let which = which.index(lines.len());
            let at = at.index(lines[which].len());
            lines[which][at] ^= flip;
            let err = check_all(&lines, None).unwrap_err();
            prop_assert_eq!(err.seq, which as u64);
        }
    }
}
