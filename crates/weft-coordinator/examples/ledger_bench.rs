//! `weft ledger verify` throughput, for `bench/run`: builds a durable consortium of N nodes
//! sending deltas of LEN f32 for R rounds (synthetic deltas, [`SampledDistance`] as the measure: the
//! coordinator's own evaluation is not what is timed), then times `verify` against the baseline of reading
//! every stored blob once and hashing its bytes with BLAKE3 on every core (the least any integrity check of
//! the same blobs must do). Prints one JSON line.
//!
//!   cargo run --release -p weft-coordinator --example ledger_bench -- NODES LEN ROUNDS DIR

use std::collections::BTreeMap;
use std::time::Instant;

use weft_coordinator::{verify, Coordinator, FsBlobStore, Member, SampledDistance, SqliteJournal};
use weft_core::{Aggregator, Contribution, Delta, ModelState, NodeId, OuterOptimizer, Policy, Tensor, Weighting};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: ledger_bench NODES LEN ROUNDS DIR";
    let num = |i: usize| args.get(i).and_then(|a| a.parse::<usize>().ok()).ok_or(usage);
    let (nodes, len, rounds) = (num(0)?, num(1)?, num(2)? as u64);
    let dir = std::path::PathBuf::from(args.get(3).ok_or(usage)?);
    let ids: Vec<NodeId> = (0..nodes).map(|i| NodeId::new(format!("node-{i:03}"))).collect::<Result<_, _>>()?;
    let members = ids.iter().map(|n| Member { node: n.clone(), language: "x".into() }).collect();
    // Four tensors, as a model has many.
    let mut base = ModelState::new();
    for t in 0..4 {
        base.insert(format!("t{t}"), Tensor::new(vec![len / 4], vec![0.0; len / 4])?);
    }
    let policy = Policy::new(-1e9, 1.0, 0.0, Weighting::Equal)?;
    let store = std::sync::Arc::new(FsBlobStore::open(dir.join("blobs"))?);
    let mut coordinator =
        Coordinator::new(base, members, policy, OuterOptimizer::DILOCO, SampledDistance { sample: 4096 }, store)?
            .with_aggregator(Aggregator::WeightedMean)?
            .durable(Box::new(SqliteJournal::open(&dir)?), serde_json::json!({"bench": "ledger"}))?;
    let built = Instant::now();
    for round in 1..=rounds {
        coordinator.open_round()?;
        for (i, node) in ids.iter().enumerate() {
            let mut delta = ModelState::new();
            for (name, t) in coordinator.base().iter() {
                let step = 0.01 * (1.0 + i as f32 / nodes as f32);
                let data = t.data().iter().enumerate().map(|(j, v)| (1.0 - v) * step + (j % 7) as f32 * 1e-4).collect();
                delta.insert(name, Tensor::new(t.shape().to_vec(), data)?);
            }
            let contribution = Contribution {
                node: node.clone(),
                round,
                base_hash: coordinator.base_hash(),
                delta: Delta::from_state(delta),
                token_count: 1,
                declared: BTreeMap::new(),
            };
            coordinator.submit(contribution).map_err(|e| e.to_string())?;
        }
        coordinator.close_round()?;
    }
    let build_seconds = built.elapsed().as_secs_f64();
    drop(coordinator);

    let started = Instant::now();
    let report = verify(&dir, None)?;
    let verify_seconds = started.elapsed().as_secs_f64();

    // Baseline: read every blob once and BLAKE3 its bytes.
    let started = Instant::now();
    let mut bytes = 0u64;
    for entry in std::fs::read_dir(dir.join("blobs"))? {
        let data = std::fs::read(entry?.path())?;
        bytes += data.len() as u64;
        std::hint::black_box(blake3::Hasher::new().update_rayon(&data).finalize());
    }
    let baseline_seconds = started.elapsed().as_secs_f64();
    let delta_bytes = (nodes * len * 4) as u64 * rounds;
    println!(
        "{}",
        serde_json::json!({
            "bench": "ledger_verify",
            "nodes": nodes,
            "values": len,
            "rounds": rounds,
            "entries": report.entries,
            "delta_bytes": delta_bytes,
            "blob_bytes_checked": report.blob_bytes,
            "blob_bytes_on_disk": bytes,
            "verify_seconds": verify_seconds,
            "seconds_per_round": verify_seconds / rounds as f64,
            "seconds_per_gb_of_deltas": verify_seconds / (delta_bytes as f64 / 1e9),
            "baseline_read_and_hash_seconds": baseline_seconds,
            "verify_over_baseline": verify_seconds / baseline_seconds,
            "build_seconds": build_seconds,
        })
    );
    Ok(())
}
