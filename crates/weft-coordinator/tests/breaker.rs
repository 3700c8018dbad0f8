//! The circuit breaker: rounds that each pass the gauntlet (one language a little worse, within
//! the non-inferiority bound, another much better) add up to a regression the breaker catches —
//! the consortium rolls back to the base before them, in the same step, and `verify` recomputes
//! the trip.

use std::path::Path;
use std::sync::Arc;

use weft_coordinator::{verify, AuditError, Coordinator, DurableCoordinator, FsBlobStore, Member, SqliteJournal};
use weft_core::{
    Aggregator, BreakerRules, GauntletRules, ModelState, NodeId, OuterOptimizer, Policy, Tensor, Weighting,
};
use weft_ledger::Event;

mod common;
use common::{copy_storage, entry_seq, resign, round_moving, Items, ITEMS, LANGUAGES};

const BREAKER: BreakerRules = BreakerRules { watch_rounds: 3, threshold: 0.05 };

fn coordinator(dir: &Path) -> DurableCoordinator<Items> {
    let members = (0..3).map(|k| Member { node: NodeId::new(format!("node-{k}")).unwrap(), language: "a".into() });
    let mut base = ModelState::new();
    base.insert("w", Tensor::zeros(vec![LANGUAGES.len() * ITEMS]));
    let policy = Policy::new(0.0, 1.0, 0.0, Weighting::Equal).unwrap();
    let store = Arc::new(FsBlobStore::open(dir.join("blobs")).unwrap());
    // A lenient gauntlet: a language may lose up to 4% in a round if another gains.
    let gauntlet = GauntletRules { non_inferiority: 0.04, ..GauntletRules::default() };
    Coordinator::new(base, members.collect(), policy, OuterOptimizer::TAPESTRY, Items, store)
        .unwrap()
        .with_aggregator(Aggregator::WeightedMean)
        .unwrap()
        .with_gauntlet(gauntlet)
        .unwrap()
        .with_breaker(BREAKER)
        .unwrap()
        .durable(Box::new(SqliteJournal::open(dir).unwrap()), serde_json::json!({}))
        .unwrap()
}

/// Language a's parameters move half way to 1; language b's drift by `drift` (about 3% more
/// loss per round at −0.025).
fn salami_round(c: &mut DurableCoordinator<Items>, drift: f32) -> weft_coordinator::RoundRecord {
    round_moving(c, |i, v, _| if i < ITEMS { 0.5 * (1.0 - v) } else { drift })
}

#[test]
fn small_regressions_that_add_up_trip_the_breaker_and_roll_back_to_the_base_before_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = coordinator(tmp.path());
    let genesis = c.base_hash();
    let first = salami_round(&mut c, -0.025);
    assert!(first.gauntlet.as_ref().unwrap().verdict.outcome.promoted());
    assert!(first.breaker.is_none(), "b is ~3% worse: under the 5% threshold");
    assert_ne!(c.base_hash(), genesis);
    let second = salami_round(&mut c, -0.025);
    assert!(second.gauntlet.as_ref().unwrap().verdict.outcome.promoted(), "each step alone passes the gauntlet");
    let Some(Event::BreakerTripped { anchor_round, risen, .. }) = &second.breaker else {
        panic!("the breaker should trip: {:?}", second.breaker)
    };
    assert_eq!(*anchor_round, 0);
    assert_eq!(risen.keys().collect::<Vec<_>>(), vec!["b"]);
    assert!(risen["b"] > 0.05);
    assert_eq!(c.base_hash(), genesis, "rolled back to the base before the watched publications");
    // The next round trains from the anchor; a restart continues from it.
    drop(c);
    let mut c = coordinator(tmp.path());
    assert_eq!(c.base_hash(), genesis);
    let third = c.open_round().unwrap();
    assert_eq!(third.base_hash, genesis);
    drop(c);
    let report = verify(tmp.path(), None).unwrap();
    assert_eq!((report.breaker_trips, report.rollbacks, report.promoted), (1, 1, 2));

    // A trip recorded under another threshold than the configuration's does not replay.
    let tripped = entry_seq(tmp.path(), |e| matches!(e, Event::BreakerTripped { .. }));
    let copy = copy_storage(tmp.path());
    resign(copy.path(), tripped, |e| {
        if let Event::BreakerTripped { rules, .. } = e {
            rules.threshold = 0.5;
        }
    });
    match verify(copy.path(), None) {
        Err(AuditError::Entry { seq, kind: "breaker_tripped", detail, .. }) => {
            assert_eq!(seq, tripped);
            assert!(detail.contains("the configuration pins"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
}
