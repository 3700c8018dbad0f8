//! Witnessed heads: what a member keeps so that the ledger cannot lose its tail unseen.
//!
//! A hash chain proves that nothing inside it changed, never that nothing was cut off its end:
//! dropping the last round consistently (its entries, its state) leaves a shorter chain that still
//! checks. So every receipt and heartbeat a node gets carries the coordinator's last entry at that
//! moment — its sequence number, hash and the coordinator's signature over that hash (the one the
//! entry itself carries; the hash commits to the sequence number) — and the node keeps the latest.
//! Checked against a ledger, a head the coordinator signed must be there, at its place: otherwise
//! the ledger was truncated or rewritten after the member saw it (as Certificate Transparency's
//! signed tree heads catch a log that forks or shrinks).

use serde::{Deserialize, Serialize};
use weft_core::ContentHash;

use crate::entry::Entry;
use crate::signing::{PublicKey, Signature};

/// The coordinator's last ledger entry at one moment, as a member saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessedHead {
    pub seq: u64,
    pub hash: ContentHash,
    /// The coordinator's signature over `hash` (the entry's own).
    pub signature: Signature,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum WitnessError {
    #[error("head #{seq} is not signed by the coordinator's key {key}")]
    Signature { seq: u64, key: PublicKey },
    #[error(
        "the coordinator signed entry #{seq} ({hash}), but the ledger ends at entry #{last}: its tail was cut off"
    )]
    Truncated { seq: u64, hash: ContentHash, last: u64 },
    #[error("the coordinator signed entry #{seq} as {signed}, the ledger's entry #{seq} is {found}: the ledger was rewritten")]
    Diverged { seq: u64, signed: ContentHash, found: ContentHash },
    #[error(
        "the head names entry #{claimed}, but its hash is entry #{actual}'s (the head was misstated, not the ledger)"
    )]
    Misstated { claimed: u64, actual: u64 },
}

impl WitnessedHead {
    /// The head a ledger shows after `entry`.
    pub fn of(entry: &Entry) -> Self {
        WitnessedHead { seq: entry.seq, hash: entry.hash, signature: entry.signature }
    }

    pub fn signed_by(&self, key: &PublicKey) -> bool {
        key.verify(&self.hash.0, &self.signature)
    }

    /// Whether `entries` (a whole ledger, already chain-checked, signed by `key`) contains this
    /// head at its place. A head with a bad signature is no evidence of anything and is refused.
    pub fn check(&self, key: &PublicKey, entries: &[Entry]) -> Result<(), WitnessError> {
        if !self.signed_by(key) {
            return Err(WitnessError::Signature { seq: self.seq, key: *key });
        }
        let at = usize::try_from(self.seq).ok().and_then(|i| entries.get(i));
        if at.is_some_and(|e| e.seq == self.seq && e.hash == self.hash) {
            return Ok(());
        }
        if let Some(e) = entries.iter().find(|e| e.hash == self.hash) {
            return Err(WitnessError::Misstated { claimed: self.seq, actual: e.seq });
        }
        match at {
            Some(e) => Err(WitnessError::Diverged { seq: self.seq, signed: self.hash, found: e.hash }),
            None => Err(WitnessError::Truncated {
                seq: self.seq,
                hash: self.hash,
                last: entries.last().map_or(0, |e| e.seq),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Chain, Event, SigningKey};

    fn ledger(key: &SigningKey, n: u64) -> Vec<Entry> {
        let mut chain = Chain::new(None);
        let genesis = Event::ConsortiumCreated {
            coordinator_key: key.public(),
            config_hash: ContentHash([0; 32]),
            roster_hash: ContentHash([0; 32]),
            roster: Default::default(),
            base_hash: ContentHash([0; 32]),
        };
        let mut entries = vec![chain.seal(key, genesis).unwrap().0];
        for round in 1..n {
            let event = Event::RoundOpened {
                round,
                base_hash: ContentHash([round as u8; 32]),
                config_hash: ContentHash([0; 32]),
                roster_hash: ContentHash([0; 32]),
                adapter: None,
            };
            entries.push(chain.seal(key, event).unwrap().0);
        }
        entries
    }

    #[test]
    fn a_head_is_found_in_its_ledger_and_missed_in_a_cut_or_rewritten_one() {
        let key = SigningKey::from_seed([1; 32]);
        let entries = ledger(&key, 5);
        let head = WitnessedHead::of(&entries[4]);
        assert_eq!(head.check(&key.public(), &entries), Ok(()));
        assert!(matches!(
            head.check(&key.public(), &entries[..3]),
            Err(WitnessError::Truncated { seq: 4, last: 2, .. })
        ));
        let other = ledger(&SigningKey::from_seed([1; 32]), 3);
        let mut rewritten = entries[..3].to_vec();
        rewritten.extend(ledger(&key, 2).into_iter().map(|mut e| {
            e.seq += 3;
            e.hash = ContentHash([9; 32]);
            e
        }));
        assert!(matches!(head.check(&key.public(), &rewritten), Err(WitnessError::Diverged { seq: 4, .. })));
        let misstated = WitnessedHead { seq: 4, ..WitnessedHead::of(&other[1]) };
        assert!(matches!(
            misstated.check(&key.public(), &entries),
            Err(WitnessError::Misstated { claimed: 4, actual: 1 })
        ));
        let impostor = SigningKey::from_seed([2; 32]);
        let forged = WitnessedHead { signature: impostor.sign(&head.hash.0), ..head.clone() };
        assert!(matches!(forged.check(&key.public(), &entries), Err(WitnessError::Signature { seq: 4, .. })));
    }
}
