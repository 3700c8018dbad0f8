//! Durable mode: a journaled run equals an in-memory one bit for bit, survives restarts at any
//! step, rolls back and forward, and `verify` catches any single-byte change to the ledger or a
//! blob. The model is replaced by a cheap deterministic measure so that many runs fit in a test.

use std::collections::BTreeMap;
use std::path::Path;

use std::sync::Arc;

use weft_coordinator::{
    verify, AuditError, BlobStore, Coordinator, DurableCoordinator, FsBlobStore, Measure, MeasureError, Member,
    MemoryBlobStore, SqliteJournal,
};
use weft_core::quality::LossTable;
use weft_core::{
    Aggregator, ContentHash, Contribution, Delta, ModelState, NodeId, OuterOptimizer, Policy, Tensor, Weighting,
};

const NODES: [&str; 4] = ["node-a", "node-b", "node-c", "node-d"];

/// Loss per "language" = mean squared distance of the state's tensors to a fixed target.
struct Distance;

impl Measure for Distance {
    fn heldout_loss(&mut self, state: &ModelState) -> Result<LossTable, MeasureError> {
        let mut table = LossTable::new();
        for (language, target) in [("x", 1.0f32), ("y", -0.5)] {
            let (mut sum, mut n) = (0.0f64, 0usize);
            for (_, t) in state.iter() {
                sum += t.data().iter().map(|v| f64::from(v - target).powi(2)).sum::<f64>();
                n += t.data().len();
            }
            table.insert(language.to_owned(), sum / n as f64);
        }
        Ok(table)
    }

    fn languages(&self) -> Vec<String> {
        vec!["x".into(), "y".into()]
    }
}

fn base() -> ModelState {
    let mut s = ModelState::new();
    s.insert("w", Tensor::new(vec![8, 16], (0..128).map(|i| (i as f32 * 0.37).sin()).collect()).unwrap());
    s.insert("b", Tensor::new(vec![16], vec![0.0; 16]).unwrap());
    s
}

/// Node `i`'s delta in `round`: a step toward 1.0 of a node-specific size, plus a wiggle.
fn contribution(c: &Coordinator<Distance>, i: usize, round: u64) -> Contribution {
    let mut delta = ModelState::new();
    for (name, t) in c.base().iter() {
        let data = t
            .data()
            .iter()
            .enumerate()
            .map(|(j, v)| (1.0 - v) * 0.1 * (i as f32 + 1.0) + ((j + i) as f32 * round as f32).cos() * 0.01)
            .collect();
        delta.insert(name, Tensor::new(t.shape().to_vec(), data).unwrap());
    }
    Contribution {
        node: NodeId::new(NODES[i]).unwrap(),
        round,
        base_hash: c.base_hash(),
        delta: Delta::from_state(delta),
        token_count: 100,
        declared: BTreeMap::from([("validation_gain".into(), 0.5)]),
    }
}

fn coordinator(dir: &Path, rule: Aggregator) -> Coordinator<Distance> {
    coordinator_on(Arc::new(FsBlobStore::open(dir.join("blobs")).unwrap()), rule)
}

fn coordinator_on(store: Arc<dyn BlobStore>, rule: Aggregator) -> Coordinator<Distance> {
    let members = NODES.iter().map(|n| Member { node: NodeId::new(*n).unwrap(), language: "x".into() }).collect();
    let policy = Policy::new(0.0, 0.4, 0.5, Weighting::Quality).unwrap();
    let outer = OuterOptimizer::Nesterov { lr: 0.7, momentum: 0.9 };
    Coordinator::new(base(), members, policy, outer, Distance, store).unwrap().with_aggregator(rule).unwrap()
}

fn durable(dir: &Path, rule: Aggregator) -> DurableCoordinator<Distance> {
    let journal = SqliteJournal::open(dir).unwrap();
    coordinator(dir, rule).durable(Box::new(journal), serde_json::json!({"test": 1})).unwrap()
}

/// Runs rounds until `rounds` are closed, continuing an open round if there is one.
fn run(c: &mut Coordinator<Distance>, rounds: u64) -> Vec<ContentHash> {
    let mut hashes = Vec::new();
    while c.round() < rounds {
        let (announcement, done) = match c.open_round_state() {
            Some(state) => state,
            None => (c.open_round().unwrap(), Default::default()),
        };
        for (i, node) in NODES.iter().enumerate() {
            if !done.contains(*node) {
                c.submit(contribution(c, i, announcement.round)).unwrap();
            }
        }
        hashes.push(c.close_round().unwrap().base_hash);
    }
    hashes
}

#[test]
fn a_durable_run_equals_an_in_memory_run_and_verifies() {
    for rule in [Aggregator::WeightedMean, "centered-clipping:0.5:2".parse().unwrap(), Aggregator::Median] {
        let tmp = tempfile::tempdir().unwrap();
        let memory = run(&mut coordinator(&tmp.path().join("memory"), rule), 3);
        let dir = tmp.path().join("durable");
        let on_disk = run(&mut durable(&dir, rule), 3);
        assert_eq!(memory, on_disk, "{rule}");
        // The round engine needs no filesystem: any blob store gives the same bases.
        let in_memory_store = run(&mut coordinator_on(Arc::new(MemoryBlobStore::new()), rule), 3);
        assert_eq!(in_memory_store, on_disk, "{rule}");
        let report = verify(&dir, None).unwrap();
        // Round 3 overshoots (momentum): every delta then falls below the floor.
        let moved = on_disk.windows(2).filter(|w| w[0] != w[1]).count() as u64 + 1;
        assert!(moved >= 2, "{rule}");
        assert_eq!((report.rounds, report.replayed, report.final_base_hash), (3, moved, on_disk[2]), "{rule}");
        // 1 genesis + 3 × (opened + 4 × (received + evaluation) + decision) + one publication per move.
        assert_eq!(report.entries, 1 + 3 * 10 + moved);
    }
}

/// `verify` beside a coordinator that keeps committing (the dashboard, or an auditor running
/// `weft ledger verify` on a live consortium): each check sees one committed step, so every one
/// passes, whichever step lands while it reads.
#[test]
fn verification_beside_a_running_coordinator_sees_one_committed_step() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut live = durable(&dir, Aggregator::WeightedMean);
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let auditor = {
        let (dir, running) = (dir.clone(), running.clone());
        std::thread::spawn(move || {
            let (mut passed, mut failed) = (0u32, Vec::new());
            while running.load(std::sync::atomic::Ordering::SeqCst) {
                match verify(&dir, None) {
                    Ok(_) => passed += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (passed, failed)
        })
    };
    run(&mut live, 8);
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    let (passed, failed) = auditor.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} checks failed, e.g. {}",
        failed.len(),
        passed as usize + failed.len(),
        failed[0]
    );
    assert!(passed > 0);
}

#[test]
fn a_restart_after_any_step_continues_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let rule = Aggregator::WeightedMean;
    let reference = run(&mut coordinator(&tmp.path().join("reference"), rule), 3);
    // Stop after every step of round 2 in turn (open, each submission, close) and restart.
    for stop_after in 0..6 {
        let dir = tmp.path().join(format!("restart-{stop_after}"));
        let mut c = durable(&dir, rule);
        run(&mut c, 1);
        let round = c.open_round().unwrap().round;
        for i in 0..stop_after.min(NODES.len()) {
            let sent = contribution(&c, i, round);
            c.submit(sent).unwrap();
        }
        if stop_after == 5 {
            c.close_round().unwrap();
        }
        drop(c);
        let mut c = durable(&dir, rule);
        run(&mut c, 3);
        assert_eq!(c.base_hash(), reference[2], "stopped after step {stop_after}");
        verify(&dir, None).unwrap();
    }
}

#[test]
fn one_storage_serves_one_coordinator_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let first = SqliteJournal::open(tmp.path()).unwrap();
    let second = SqliteJournal::open(tmp.path());
    assert!(matches!(second, Err(weft_coordinator::JournalError::InUse(_))));
    // Reading (verify, show) is always allowed.
    assert!(SqliteJournal::read(tmp.path()).is_ok());
    drop(first);
    assert!(SqliteJournal::open(tmp.path()).is_ok());
}

#[test]
fn a_different_configuration_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    run(&mut durable(tmp.path(), Aggregator::WeightedMean), 1);
    let journal = SqliteJournal::open(tmp.path()).unwrap();
    let err = coordinator(tmp.path(), Aggregator::Median).durable(Box::new(journal), serde_json::json!({"test": 1}));
    let message = err.err().unwrap().to_string();
    assert!(message.contains("aggregator"), "{message}");
}

#[test]
fn rollback_restores_an_earlier_base_and_is_itself_reversible() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = durable(tmp.path(), Aggregator::WeightedMean);
    let hashes = run(&mut c, 3);
    c.rollback(1).unwrap();
    assert_eq!(c.base_hash(), hashes[0]);
    assert!(c.rollback(4).is_err());
    drop(c);
    // The rollback survives a restart; the next round continues the numbering from base 1.
    let mut c = durable(tmp.path(), Aggregator::WeightedMean);
    assert_eq!(c.base_hash(), hashes[0]);
    let announcement = c.open_round().unwrap();
    assert_eq!((announcement.round, announcement.base_hash), (4, hashes[0]));
    for i in 0..NODES.len() {
        let sent = contribution(&c, i, 4);
        c.submit(sent).unwrap();
    }
    c.close_round().unwrap();
    c.rollback(3).unwrap();
    assert_eq!(c.base_hash(), hashes[2]);
    let report = verify(tmp.path(), None).unwrap();
    assert_eq!((report.rollbacks, report.rounds), (2, 4));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A small deterministic generator for positions (no extra dependency).
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn any_single_byte_change_to_the_ledger_is_named_at_its_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("original");
    run(&mut durable(&original, Aggregator::WeightedMean), 2);
    let mut rng = 7u64;
    for trial in 0..40 {
        let dir = tmp.path().join(format!("tampered-{trial}"));
        copy_dir(&original, &dir);
        let db = rusqlite::Connection::open(dir.join(SqliteJournal::DATABASE)).unwrap();
        let count: i64 = db.query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0)).unwrap();
        let seq = (next(&mut rng) % count as u64) as i64;
        let mut line: Vec<u8> = db.query_row("SELECT line FROM ledger WHERE seq = ?1", [seq], |r| r.get(0)).unwrap();
        let at = (next(&mut rng) % line.len() as u64) as usize;
        line[at] ^= (next(&mut rng) % 255 + 1) as u8;
        db.execute("UPDATE ledger SET line = ?1 WHERE seq = ?2", rusqlite::params![line, seq]).unwrap();
        drop(db);
        match verify(&dir, None) {
            Err(AuditError::Chain(e)) => assert_eq!(e.seq, seq as u64, "trial {trial}: {e}"),
            other => panic!("trial {trial}: byte {at} of entry {seq} changed, verify said {other:?}"),
        }
    }
}

#[test]
fn any_single_byte_change_to_a_stored_blob_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("original");
    run(&mut durable(&original, "centered-clipping:0.5:2".parse().unwrap()), 2);
    let mut blobs: Vec<_> =
        std::fs::read_dir(original.join("blobs")).unwrap().map(|e| e.unwrap().file_name()).collect();
    blobs.sort();
    let mut rng = 11u64;
    for trial in 0..40 {
        let dir = tmp.path().join(format!("tampered-{trial}"));
        copy_dir(&original, &dir);
        let name = &blobs[(next(&mut rng) % blobs.len() as u64) as usize];
        let path = dir.join("blobs").join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = (next(&mut rng) % bytes.len() as u64) as usize;
        bytes[at] ^= (next(&mut rng) % 255 + 1) as u8;
        std::fs::write(&path, bytes).unwrap();
        let err = verify(&dir, None).err();
        assert!(err.is_some(), "trial {trial}: byte {at} of {name:?} changed unnoticed");
    }
    // The state database's head must agree with the ledger.
    let dir = tmp.path().join("head");
    copy_dir(&original, &dir);
    let db = rusqlite::Connection::open(dir.join(SqliteJournal::DATABASE)).unwrap();
    db.execute("UPDATE head SET state = (SELECT value FROM meta WHERE key = 'genesis')", []).unwrap();
    drop(db);
    let err = verify(&dir, None);
    assert!(matches!(err, Err(AuditError::State(_))), "{err:?}");
}

#[test]
fn a_non_finite_declared_metric_is_not_kept_and_breaks_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = durable(tmp.path(), Aggregator::WeightedMean);
    let round = c.open_round().unwrap().round;
    for i in 0..NODES.len() {
        let mut contribution = contribution(&c, i, round);
        contribution.declared.insert("train_loss".into(), f64::NAN);
        contribution.declared.insert("grad_norm".into(), f64::INFINITY);
        c.submit(contribution).unwrap();
    }
    let record = c.close_round().unwrap();
    assert!(record.contributions.iter().all(|r| r.declared.keys().eq(["validation_gain"])));
    verify(tmp.path(), None).unwrap();
}
