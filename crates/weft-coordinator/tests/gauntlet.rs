//! Champion–challenger adoption: a round whose aggregate overshoots (each delta looks helpful at
//! the probe's scale, the whole step does harm) is refused by the gauntlet and the champion stays;
//! the honest round after it is promoted; `verify` recomputes every verdict and names a forged one.
//! The model is a cheap measure whose items are single parameters, so that rounds are instant.

use std::path::Path;
use std::sync::Arc;

use weft_coordinator::{verify, AuditError, Coordinator, DurableCoordinator, FsBlobStore, Member, SqliteJournal};
use weft_core::{
    Aggregator, GauntletOutcome, GauntletRules, ModelState, NodeId, OuterOptimizer, Policy, Tensor, Weighting,
};
use weft_ledger::Event;

mod common;
use common::{copy_storage, entry_seq, resign, round, Items, ITEMS, LANGUAGES};

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

#[test]
fn verify_recomputes_each_verdict_and_names_the_judgment_that_does_not_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = coordinator(tmp.path());
    round(&mut c, 2.6);
    drop(c);
    verify(tmp.path(), None).unwrap();
    let judged = entry_seq(tmp.path(), |e| matches!(e, Event::ChallengerJudged { .. }));
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
        let copy = copy_storage(tmp.path());
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
