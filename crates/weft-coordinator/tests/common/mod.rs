//! Helpers shared by the coordinator's integration tests.
#![allow(dead_code)]

use std::path::Path;

use std::collections::BTreeMap;

use weft_coordinator::{DurableCoordinator, Measure, MeasureError, RoundRecord};
use weft_core::quality::LossTable;
use weft_core::{ContentHash, Contribution, Delta, ItemLosses, ModelState, NodeId, Tensor};
use weft_ledger::{Entry, Event, SigningKey};

/// Rewrites ledger entry `seq` with `change` and re-signs it and every later entry with the
/// coordinator's own key: the chain then checks, and only the replay can object.
pub fn resign(dir: &Path, seq: u64, change: impl Fn(&mut Event)) {
    let key = SigningKey::from_hex(std::fs::read_to_string(dir.join("coordinator.key")).unwrap().trim()).unwrap();
    let conn = rusqlite::Connection::open(dir.join("state.sqlite")).unwrap();
    let lines: Vec<(i64, Vec<u8>)> = conn
        .prepare("SELECT seq, line FROM ledger ORDER BY seq")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut prev = ContentHash([0; 32]);
    for (s, line) in lines {
        let mut entry: Entry = serde_json::from_slice(&line).unwrap();
        if s as u64 == seq {
            change(&mut entry.event);
        }
        entry.prev = prev;
        entry.hash = Entry::compute_hash(entry.seq, &entry.prev, &entry.event);
        entry.signature = key.sign(&entry.hash.0);
        prev = entry.hash;
        conn.execute("UPDATE ledger SET line = ?1 WHERE seq = ?2", rusqlite::params![entry.to_line(), s]).unwrap();
    }
}

/// The sequence number of the first ledger entry in `dir` that `matches`.
pub fn entry_seq(dir: &Path, matches: impl Fn(&Event) -> bool) -> u64 {
    let journal = weft_coordinator::SqliteJournal::read(dir).unwrap();
    let mut chain = weft_ledger::Chain::new(None);
    weft_coordinator::Journal::ledger(&journal)
        .unwrap()
        .iter()
        .map(|l| chain.check(l).unwrap())
        .find(|e| matches(&e.event))
        .unwrap()
        .seq
}

/// A copy of a coordinator's storage (state, key, blobs) in a new temporary directory.
pub fn copy_storage(from: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for name in ["state.sqlite", "coordinator.key"] {
        std::fs::copy(from.join(name), copy.path().join(name)).unwrap();
    }
    std::fs::create_dir(copy.path().join("blobs")).unwrap();
    for blob in std::fs::read_dir(from.join("blobs")).unwrap() {
        let blob = blob.unwrap();
        std::fs::copy(blob.path(), copy.path().join("blobs").join(blob.file_name())).unwrap();
    }
    copy
}

pub const LANGUAGES: [&str; 2] = ["a", "b"];
pub const ITEMS: usize = 12;

/// Item i of language ℓ scores `0.5 + difficulty + (w − 1)²` on its own parameter: every item
/// improves as its parameter nears 1, and overshooting is as bad as falling short.
pub struct Items;

fn item_loss(w: f32, i: usize) -> f64 {
    0.5 + (i % 4) as f64 * 0.1 + f64::from(w - 1.0).powi(2)
}

impl Measure for Items {
    fn heldout_loss(&mut self, state: &ModelState) -> Result<LossTable, MeasureError> {
        Ok(self.item_losses(state)?.into_iter().map(|(l, v)| (l, v.iter().sum::<f64>() / v.len() as f64)).collect())
    }

    fn languages(&self) -> Vec<String> {
        LANGUAGES.iter().map(|l| l.to_string()).collect()
    }

    fn item_losses(&mut self, state: &ModelState) -> Result<ItemLosses, MeasureError> {
        let w = state.get("w").map(|t| t.data().to_vec()).unwrap_or_default();
        Ok(LANGUAGES
            .iter()
            .enumerate()
            .map(|(k, l)| (l.to_string(), (0..ITEMS).map(|i| item_loss(w[k * ITEMS + i], i)).collect()))
            .collect())
    }

    fn items_hash(&self) -> ContentHash {
        ContentHash([7; 32])
    }
}

/// Every node moves every parameter by `step · (1 − w)` (+ a little of its own, so deltas differ).
pub fn round(c: &mut DurableCoordinator<Items>, step: f32) -> RoundRecord {
    round_moving(c, |_, v, k| step * (1.0 - v) + 0.01 * k as f32)
}

/// A round in which node k (of 3) moves parameter i, now at v, by `moved(i, v, k)`.
pub fn round_moving(c: &mut DurableCoordinator<Items>, moved: impl Fn(usize, f32, usize) -> f32) -> RoundRecord {
    let announcement = c.open_round().unwrap();
    for k in 0..3 {
        let w = c.base().get("w").unwrap().data().to_vec();
        let data = w.iter().enumerate().map(|(i, v)| moved(i, *v, k)).collect();
        let mut delta = ModelState::new();
        delta.insert("w", Tensor::new(vec![w.len()], data).unwrap());
        let contribution = Contribution {
            node: NodeId::new(format!("node-{k}")).unwrap(),
            round: announcement.round,
            base_hash: announcement.base_hash,
            delta: Delta::from_state(delta),
            token_count: 1,
            declared: BTreeMap::new(),
        };
        c.submit(contribution).unwrap();
    }
    c.close_round().unwrap()
}
