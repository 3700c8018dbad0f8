//! Class-3 changes by vote: a cap change proposed and voted by members takes effect only after
//! its time-lock, survives a restart, and `verify` replays every signature and count; a vote or
//! proposal that is not a member's, forged, replayed or breaks an invariant is refused by name.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use weft_coordinator::{
    verify, AuditError, Coordinator, DurableCoordinator, FsBlobStore, Member, ProposalSubmitError, SqliteJournal,
};
use weft_core::proposal::{proposal_id, proposal_message, vote_message};
use weft_core::{Aggregator, ContentHash, ModelState, NodeId, OuterOptimizer, Policy, RuleChange, Tensor, VotingRules};
use weft_ledger::{Chain, Event, SigningKey};

mod common;
use common::{copy_storage, resign, round, Items, ITEMS, LANGUAGES};

fn key(k: usize) -> SigningKey {
    SigningKey::from_seed([k as u8 + 1; 32])
}

fn coordinator(dir: &Path) -> DurableCoordinator<Items> {
    let members = (0..3).map(|k| Member { node: NodeId::new(format!("node-{k}")).unwrap(), language: "a".into() });
    let keys: BTreeMap<String, _> = (0..3).map(|k| (format!("node-{k}"), key(k).public())).collect();
    let mut base = ModelState::new();
    base.insert("w", Tensor::zeros(vec![LANGUAGES.len() * ITEMS]));
    let policy = Policy::new(0.0, 1.0, 0.0, weft_core::Weighting::Equal).unwrap();
    let store = Arc::new(FsBlobStore::open(dir.join("blobs")).unwrap());
    Coordinator::new(base, members.collect(), policy, OuterOptimizer::TAPESTRY, Items, store)
        .unwrap()
        .with_aggregator(Aggregator::WeightedMean)
        .unwrap()
        .with_voting(VotingRules::default(), &keys)
        .unwrap()
        .durable(Box::new(SqliteJournal::open(dir).unwrap()), serde_json::json!({}))
        .unwrap()
}

fn refusal(result: Result<impl std::fmt::Debug, ProposalSubmitError>) -> &'static str {
    match result {
        Err(ProposalSubmitError::Refused(e)) => e.code(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn vote(
    c: &mut DurableCoordinator<Items>,
    id: ContentHash,
    k: usize,
    approve: bool,
) -> Result<(), ProposalSubmitError> {
    c.vote(id, &format!("node-{k}"), approve, key(k).sign(&vote_message(&id, approve)))
}

#[test]
fn a_voted_cap_change_takes_effect_after_its_time_lock_and_verify_replays_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = coordinator(tmp.path());
    round(&mut c, 0.5);
    let change = RuleChange { cap: Some(0.4), ..RuleChange::default() };
    let rationale = "no member should carry more than 40% of a step";
    let id = proposal_id(1, "node-0", rationale, &change);
    let signed = key(0).sign(&proposal_message(&id));

    // Refused by name: a non-member, a signature by another key, a change that breaks an invariant.
    assert_eq!(refusal(c.propose(1, "node-9", rationale, change.clone(), signed)), "not_member");
    assert_eq!(
        refusal(c.propose(1, "node-0", rationale, change.clone(), key(1).sign(&proposal_message(&id)))),
        "bad_signature"
    );
    let too_big = RuleChange { cap: Some(1.5), ..RuleChange::default() };
    let big_id = proposal_id(1, "node-0", rationale, &too_big);
    assert_eq!(
        refusal(c.propose(1, "node-0", rationale, too_big, key(0).sign(&proposal_message(&big_id)))),
        "invalid_change"
    );
    // Signed as made after another round than the last closed one.
    assert_eq!(refusal(c.propose(0, "node-0", rationale, change.clone(), signed)), "stale_round");
    assert_eq!(c.propose(1, "node-0", rationale, change.clone(), signed).unwrap(), id);
    assert_eq!(refusal(c.propose(1, "node-0", rationale, change.clone(), signed)), "duplicate_proposal");

    vote(&mut c, id, 0, true).unwrap();
    // The same vote again, or the other side: one member, one vote.
    assert_eq!(refusal(vote(&mut c, id, 0, true)), "already_voted");
    assert_eq!(refusal(vote(&mut c, id, 0, false)), "already_voted");
    // A vote signed for "no" presented as "yes" (forged), and a vote from outside.
    assert_eq!(refusal(c.vote(id, "node-1", true, key(1).sign(&vote_message(&id, false)))), "bad_signature");
    assert_eq!(refusal(c.vote(id, "node-9", true, key(1).sign(&vote_message(&id, true)))), "not_member");
    assert_eq!(refusal(vote(&mut c, ContentHash([3; 32]), 1, true)), "unknown_proposal");
    vote(&mut c, id, 1, true).unwrap();
    vote(&mut c, id, 2, true).unwrap();

    // Round 2 closes the vote; round 3 still runs under the old cap (the time-lock).
    round(&mut c, 0.5);
    assert_eq!(c.policy().cap, 1.0);
    let scheduled = c.proposals().unwrap().scheduled.get(&id).cloned();
    assert_eq!(scheduled, Some((4, change.clone())));
    round(&mut c, 0.5);
    assert_eq!(c.policy().cap, 1.0);
    // A restart keeps the book: the change is still due at round 4.
    drop(c);
    let mut c = coordinator(tmp.path());
    assert_eq!(c.proposals().unwrap().scheduled.get(&id).map(|(at, _)| *at), Some(4));
    round(&mut c, 0.5);
    assert_eq!(c.policy().cap, 0.4, "round 4 runs under the voted cap");
    drop(c);
    let c = coordinator(tmp.path());
    assert_eq!(c.policy().cap, 0.4, "a restart keeps the rules in force");
    drop(c);

    let report = verify(tmp.path(), None).unwrap();
    assert_eq!((report.proposals, report.votes, report.rule_changes), (1, 3, 1));
    let entries = ledger(tmp.path());
    let caps: Vec<(u64, f64)> = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::Decision { round, cap, .. } => Some((*round, *cap)),
            _ => None,
        })
        .collect();
    assert_eq!(caps, vec![(1, 1.0), (2, 1.0), (3, 1.0), (4, 0.4)]);

    // A forged vote (its side flipped, the ledger re-signed by the coordinator) does not replay.
    let forged =
        entries.iter().find(|e| matches!(&e.event, Event::VoteCast { voter, .. } if voter == "node-2")).unwrap();
    let copy = copy_storage(tmp.path());
    resign(copy.path(), forged.seq, |e| {
        if let Event::VoteCast { approve, .. } = e {
            *approve = false;
        }
    });
    match verify(copy.path(), None) {
        Err(AuditError::Entry { seq, kind: "vote_cast", detail, .. }) => {
            assert_eq!(seq, forged.seq);
            assert!(detail.contains("bad_signature: the signature of node-2"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    // A decision that applies another cap than the rules in force is named.
    let decision = entries.iter().rfind(|e| matches!(e.event, Event::Decision { .. })).unwrap();
    let copy = copy_storage(tmp.path());
    resign(copy.path(), decision.seq, |e| {
        if let Event::Decision { cap, .. } = e {
            *cap = 1.0;
        }
    });
    match verify(copy.path(), None) {
        Err(AuditError::Entry { kind: "decision", detail, .. }) => {
            assert!(detail.contains("applies cap 1; the rules in force give 0.4"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_proposal_short_of_the_supermajority_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = coordinator(tmp.path());
    let change = RuleChange { floor: Some(0.01), ..RuleChange::default() };
    let id = proposal_id(0, "node-1", "raise the floor", &change);
    c.propose(0, "node-1", "raise the floor", change, key(1).sign(&proposal_message(&id))).unwrap();
    vote(&mut c, id, 0, true).unwrap();
    vote(&mut c, id, 1, true).unwrap();
    vote(&mut c, id, 2, false).unwrap();
    for _ in 0..3 {
        round(&mut c, 0.5);
    }
    assert_eq!(c.policy().floor, 0.0, "2 of 3 is 67%, short of 70%");
    assert!(c.proposals().unwrap().open.is_empty() && c.proposals().unwrap().scheduled.is_empty());
    drop(c);
    assert_eq!(verify(tmp.path(), None).unwrap().rule_changes, 0);
}

fn ledger(dir: &Path) -> Vec<weft_ledger::Entry> {
    let journal = SqliteJournal::read(dir).unwrap();
    let mut chain = Chain::new(None);
    weft_coordinator::Journal::ledger(&journal).unwrap().iter().map(|l| chain.check(l).unwrap()).collect()
}
