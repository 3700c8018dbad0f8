//! A node's witness of the coordinator's ledger: the latest head it was handed (with every
//! heartbeat and receipt), kept in the node's artifacts, so that `weft ledger verify --witness`
//! can later show a ledger cut short or rewritten after the node saw it.

use std::path::{Path, PathBuf};

use weft_core::ContentHash;
use weft_ledger::{PublicKey, Signature, WitnessedHead};

use crate::proto;

/// The file, in a node's artifacts directory, that holds the latest head it witnessed.
pub const WITNESS_FILE: &str = "witnessed-head.json";

pub struct Witness {
    path: PathBuf,
    /// The coordinator's ledger key, as it named it when the node joined.
    key: Option<PublicKey>,
    latest: Option<WitnessedHead>,
}

impl Witness {
    /// The witness kept in `artifacts` (a previous run's head is kept and only replaced by a later one).
    pub fn open(artifacts: &Path) -> Self {
        if let Err(e) = std::fs::create_dir_all(artifacts) {
            tracing::warn!("creating {}: {e}", artifacts.display());
        }
        let path = artifacts.join(WITNESS_FILE);
        let latest = std::fs::read(&path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok());
        Witness { path, key: None, latest }
    }

    pub fn with_key(&mut self, key: Option<PublicKey>) {
        if key.is_some() {
            self.key = key;
        }
    }

    pub fn latest(&self) -> Option<&WitnessedHead> {
        self.latest.as_ref()
    }

    /// Takes a head the coordinator handed over. A head that does not parse or is not signed by
    /// the coordinator's key is no evidence and is dropped; one that goes back (a smaller
    /// sequence number, or the same one with another hash) is reported and the earlier head
    /// kept: it is what shows the ledger changed.
    pub fn observe(&mut self, head: Option<&proto::LedgerHead>) {
        let Some(head) = head else { return };
        let parsed = head.hash.parse::<ContentHash>().ok().zip(head.signature.parse::<Signature>().ok());
        let Some((hash, signature)) = parsed else {
            tracing::warn!(seq = head.seq, "the coordinator sent a ledger head that does not parse; ignored");
            return;
        };
        let head = WitnessedHead { seq: head.seq, hash, signature };
        if let Some(key) = &self.key {
            if !head.signed_by(key) {
                tracing::error!(seq = head.seq, "a ledger head not signed by the coordinator's key {key}; ignored");
                return;
            }
        }
        match &self.latest {
            Some(kept) if kept == &head => return,
            Some(kept) if head.seq < kept.seq || (head.seq == kept.seq && head.hash != kept.hash) => {
                tracing::error!(
                    kept = kept.seq,
                    now = head.seq,
                    "the coordinator's ledger head went back: keeping entry #{} as evidence (weft ledger verify --witness {})",
                    kept.seq,
                    self.path.display()
                );
                return;
            }
            _ => {}
        }
        match serde_json::to_vec_pretty(&head) {
            Ok(bytes) => {
                if let Err(e) = weft_durable::write_atomic(&self.path, &bytes) {
                    tracing::warn!("keeping the witnessed ledger head in {}: {e}", self.path.display());
                }
            }
            Err(e) => tracing::warn!("encoding the witnessed ledger head: {e}"),
        }
        self.latest = Some(head);
    }
}
