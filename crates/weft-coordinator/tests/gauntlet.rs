//! Champion–challenger adoption: a round whose aggregate overshoots (each delta looks helpful at
//! the probe's scale, the whole step does harm) is refused by the gauntlet and the champion stays;
//! the honest round after it is promoted; `verify` recomputes every verdict and names a forged one.
//! The model is a cheap measure whose items are single parameters, so that rounds are instant.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use weft_coordinator::{
    verify, AuditError, Coordinator, DurableCoordinator, FsBlobStore, Measure, MeasureError, Member, RoundRecord,
    SqliteJournal,
};
use weft_core::quality::LossTable;
use weft_core::{
    Aggregator, ContentHash, Contribution, Delta, GauntletOutcome, GauntletRules, ItemLosses, ModelState, NodeId,
    OuterOptimizer, Policy, Tensor, Weighting,
};
use weft_ledger::{Chain, Entry, Event, SigningKey};

const LANGUAGES: [&str; 2] = ["a", "b"];
const ITEMS: usize = 12;

/// Item i of language ℓ scores `0.5 + difficulty + (w − 1)²` on its own parameter: every item
/// improves as its parameter nears 1, and overshooting is as bad as falling short.
struct Items;

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

fn coordinator(dir: &Path) -> DurableCoordinator<Items> {
    let members = (0..3).map(|k| Member { node: NodeId::new(format!("node-{k}")).unwrap(), language: "a".into() });
    let mut base = ModelState::new();
    base.insert("w", Tensor::zeros(vec![LANGUAGES.len() * ITEMS]));
    let policy = Policy::new(0.0, 1.0, 0.0, Weighting::Equal).unwrap();
    let store = Arc::new(FsBlobStore::open(dir.join("blobs")).unwrap());
    Coordinator::new(base, members.collect(), policy, OuterOptimizer::TAPESTRY, Items, store)
        .unwrap()
        .with_aggregator(Aggregator::WeightedMean)
        .unwrap()
        .with_gauntlet(GauntletRules::default())
        .unwrap()
        .durable(Box::new(SqliteJournal::open(dir).unwrap()), serde_json::json!({}))
        .unwrap()
}

/// Every node moves every parameter by `step · (1 − w)` (+ a little of its own, so deltas differ).
fn round(c: &mut DurableCoordinator<Items>, step: f32) -> RoundRecord {
    let announcement = c.open_round().unwrap();
    for k in 0..3 {
        let w = c.base().get("w").unwrap().data().to_vec();
        let data = w.iter().map(|v| step * (1.0 - v) + 0.01 * k as f32).collect();
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

#[test]
fn an_overshooting_round_is_refused_and_the_honest_round_after_it_is_promoted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = coordinator(tmp.path());
    let genesis = c.base_hash();
    // Each delta moves 2.6 of the way: at the probe's 1/3 it looks like progress (every node is
    // accepted), the whole step lands at 2.6 — further from 1 than the base.
    let poisoned = round(&mut c, 2.6);
    assert_eq!(poisoned.accepted, 3);
    let judgment = poisoned.gauntlet.as_ref().expect("the gauntlet judged the round");
    assert!(matches!(judgment.verdict.outcome, GauntletOutcome::Regressed { .. }), "{:?}", judgment.verdict.outcome);
    assert!(!poisoned.base_changed);
    assert_eq!(c.base_hash(), genesis, "the champion stays, bit for bit");
    // Nodes train from the champion.
    let honest = round(&mut c, 0.5);
    let judgment = honest.gauntlet.as_ref().unwrap();
    assert_eq!(judgment.verdict.outcome, GauntletOutcome::Promoted { improved: vec!["a".into(), "b".into()] });
    assert!(honest.base_changed);
    assert_eq!(honest.previous_base_hash, genesis);
    assert!(judgment.verdict.tests.values().all(|t| t.p_holm <= 0.05 && t.gain > 0.0));
    drop(c);
    let report = verify(tmp.path(), None).unwrap();
    assert_eq!((report.promoted, report.refused, report.rounds), (1, 1, 2));
    assert_eq!(report.final_base_hash, honest.base_hash);
}

/// Rewrites ledger entry `seq` with `change` and re-signs it and every later entry with the
/// coordinator's own key: the chain then checks, and only the replay can object.
fn resign(dir: &Path, seq: u64, change: impl Fn(&mut Event)) {
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

#[test]
fn verify_recomputes_each_verdict_and_names_the_judgment_that_does_not_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = coordinator(tmp.path());
    round(&mut c, 2.6);
    drop(c);
    verify(tmp.path(), None).unwrap();
    let lines = SqliteJournal::read(tmp.path()).unwrap();
    let mut chain = Chain::new(None);
    let judged = weft_coordinator::Journal::ledger(&lines)
        .unwrap()
        .iter()
        .map(|l| chain.check(l).unwrap())
        .find(|e| matches!(e.event, Event::ChallengerJudged { .. }))
        .unwrap()
        .seq;
    drop(lines);
    type Forgery = Box<dyn Fn(&mut Event)>;
    let cases: Vec<(&str, Forgery)> = vec![
        (
            "the verdict's test of a does not replay",
            Box::new(|e| {
                if let Event::ChallengerJudged { challenger_loss, .. } = e {
                    challenger_loss.get_mut("a").unwrap()[0] = 0.1;
                }
            }),
        ),
        (
            "resamples from seed 1",
            Box::new(|e| {
                if let Event::ChallengerJudged { seed, .. } = e {
                    *seed = 1;
                }
            }),
        ),
        (
            "the configuration pins",
            Box::new(|e| {
                if let Event::ChallengerJudged { rules, .. } = e {
                    rules.margin = 0.5;
                }
            }),
        ),
        (
            "records promoted",
            Box::new(|e| {
                if let Event::ChallengerJudged { verdict, .. } = e {
                    verdict.outcome = GauntletOutcome::Promoted { improved: vec!["a".into()] };
                }
            }),
        ),
    ];
    for (expected, change) in cases {
        let copy = tempfile::tempdir().unwrap();
        for name in ["state.sqlite", "coordinator.key"] {
            std::fs::copy(tmp.path().join(name), copy.path().join(name)).unwrap();
        }
        std::fs::create_dir(copy.path().join("blobs")).unwrap();
        for blob in std::fs::read_dir(tmp.path().join("blobs")).unwrap() {
            let blob = blob.unwrap();
            std::fs::copy(blob.path(), copy.path().join("blobs").join(blob.file_name())).unwrap();
        }
        resign(copy.path(), judged, change);
        match verify(copy.path(), None) {
            Err(AuditError::Entry { seq, kind: "challenger_judged", detail, .. }) => {
                assert_eq!(seq, judged);
                assert!(detail.contains(expected), "{detail}");
            }
            other => panic!("expected the judgment to be named ({expected}), got {other:?}"),
        }
    }
}
