//! Transport benchmarks for `bench/run`, as separate processes on loopback over mutual TLS:
//!
//! * `net_bench init DIR NODES ADDRESS` — a consortium of NODES nodes (one round).
//! * `net_bench serve DIR VALUES` — the real coordinator server over a synthetic base of VALUES
//!   f32 ([`SampledDistance`] as the measure: what is timed is the wire, the spool, decoding,
//!   hashing and storing, not a model's evaluation); prints its peak RSS when the round is done.
//! * `net_bench upload DIR VALUES NODES` — NODES nodes upload a VALUES-value f32 delta at once;
//!   prints each upload's time and the aggregate throughput.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weft_coordinator::{Coordinator, FsBlobStore, Member, SampledDistance, SqliteJournal};
use weft_core::{ModelState, NodeId, OuterOptimizer, Policy, Tensor, Weighting};
use weft_ledger::{ContributionManifest, SigningKey};
use weft_model::GptConfig;
use weft_net::client::{connect, upload, Kit};
use weft_net::config::{read_text, read_toml, ConsortiumConfig, PolicySettings, Roster, Training};
use weft_net::encoding::{self, Encoding};
use weft_net::proto;
use weft_net::server::{serve, ServeOptions};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn synthetic(values: usize, fill: impl Fn(usize) -> f32) -> Result<ModelState, Error> {
    let mut state = ModelState::new();
    for t in 0..4 {
        let data = (0..values / 4).map(|i| fill(t * values / 4 + i)).collect();
        state.insert(format!("t{t}"), Tensor::new(vec![values / 4], data)?);
    }
    Ok(state)
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn init(dir: &Path, nodes: usize, address: &str) -> Result<(), Error> {
    let config = ConsortiumConfig {
        name: "bench".into(),
        address: address.into(),
        server_name: "weft-coordinator".into(),
        rounds: 1,
        seed: 0,
        round_deadline_secs: 3600,
        encoding: Encoding::F32,
        storage: "coordinator".into(),
        model: Some(GptConfig { layers: 1, heads: 1, width: 8, context: 8 }),
        privacy: None,
        gauntlet: None,
        voting: None,
        breaker: None,
        base: None,
        training: Training { local_steps: 1, batch: 1, lr: 1e-3 },
        policy: PolicySettings {
            floor: -1e9,
            cap: 1.0,
            quorum: 0.0,
            weighting: Weighting::Equal,
            fairness: weft_core::Fairness::Mean,
            aggregator: weft_core::Aggregator::WeightedMean,
            outer: weft_net::config::OuterKind::Plain,
            outer_lr: None,
            momentum: 0.9,
            probe_scale: None,
        },
        governance: None,
    };
    let members: Vec<(NodeId, String)> =
        (0..nodes).map(|i| Ok((NodeId::new(format!("node-{i:02}"))?, "x".to_owned()))).collect::<Result<_, Error>>()?;
    weft_net::provision::init(dir, &config, &members)?;
    Ok(())
}

async fn serve_round(dir: &Path, values: usize) -> Result<(), Error> {
    let config: ConsortiumConfig = read_toml(&dir.join("consortium.toml"))?;
    let roster: Roster = read_toml(&dir.join("roster.toml"))?;
    let storage = dir.join("coordinator");
    let members = roster
        .node
        .iter()
        .map(|m| Ok(Member { node: m.id.clone(), language: m.language.clone() }))
        .collect::<Result<Vec<_>, Error>>()?;
    let policy = Policy::new(-1e9, 1.0, 0.0, Weighting::Equal)?;
    let coordinator = Coordinator::new(
        synthetic(values, |_| 0.0)?,
        members,
        policy,
        OuterOptimizer::TAPESTRY,
        SampledDistance { sample: 4096 },
        std::sync::Arc::new(FsBlobStore::open(storage.join("blobs"))?),
    )?
    .durable(Box::new(SqliteJournal::open(&storage)?), serde_json::json!({"bench": "net"}))?;
    let options = ServeOptions {
        certificate: read_text(&storage.join("tls.pem"))?,
        key: read_text(&storage.join("tls.key"))?,
        ca: read_text(&dir.join("ca.pem"))?,
        spool: storage.join("incoming"),
        dp: None,
        linger: Duration::from_millis(500),
        config,
        roster,
    };
    let started = Instant::now();
    let served = serve(coordinator, options).await?;
    let bytes: u64 = served.wire_bytes.values().flat_map(|m| m.values()).sum();
    println!(
        "{}",
        serde_json::json!({
            "role": "coordinator",
            "values": values,
            "nodes": served.rounds.first().map_or(0, |r| r.contributions.len()),
            "bytes_received": bytes,
            "seconds": started.elapsed().as_secs_f64(),
            "peak_rss": peak_rss(),
        })
    );
    Ok(())
}

async fn upload_all(dir: &Path, values: usize, nodes: usize) -> Result<(), Error> {
    let mut tasks = Vec::new();
    let started = Instant::now();
    for i in 0..nodes {
        let kit_dir: PathBuf = dir.join("nodes").join(format!("node-{i:02}"));
        tasks.push(tokio::spawn(async move {
            let kit = Kit::read(&kit_dir)?;
            let key = SigningKey::from_hex(&read_text(&kit_dir.join("signing.key"))?)?;
            let mut client = loop {
                match connect(&kit).await {
                    Ok(client) => break client,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            let state = loop {
                let state = client.heartbeat(proto::HeartbeatRequest {}).await?.into_inner();
                if state.phase == proto::Phase::Open as i32 {
                    break state;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let delta = synthetic(values, |j| ((j + i) % 1000) as f32 * 1e-6)?;
            let bytes = encoding::encode(&delta, Encoding::F32)?;
            let manifest = ContributionManifest {
                node: kit.config.id.to_string(),
                round: state.round,
                base_hash: state.base_hash.parse().map_err(|_| "bad base hash")?,
                delta_hash: delta.content_hash(),
                token_count: 1,
                declared: Default::default(),
            };
            drop(delta);
            let manifest = serde_json::to_vec(&manifest)?;
            let header = proto::UploadHeader {
                signature: key.sign(&manifest).0.to_vec(),
                manifest,
                encoding: proto::Encoding::F32 as i32,
                encoded_bytes: bytes.len() as u64,
            };
            let size = bytes.len() as u64;
            let sent = Instant::now();
            let receipt = upload(&mut client, header, bytes).await?;
            if !receipt.accepted {
                return Err(format!("refused: {} {}", receipt.code, receipt.detail).into());
            }
            Ok::<_, Error>((size, sent.elapsed().as_secs_f64(), receipt.wire_seconds, receipt.process_seconds))
        }));
    }
    let mut uploads = Vec::new();
    for task in tasks {
        uploads.push(task.await??);
    }
    let total: u64 = uploads.iter().map(|u| u.0).sum();
    let wall = started.elapsed().as_secs_f64();
    let slowest = uploads.iter().map(|u| u.1).fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({
            "role": "nodes",
            "nodes": nodes,
            "bytes_per_node": uploads.first().map_or(0, |u| u.0),
            "upload_seconds": uploads.iter().map(|u| u.1).collect::<Vec<_>>(),
            "wire_seconds": uploads.iter().map(|u| u.2).collect::<Vec<_>>(),
            "process_seconds": uploads.iter().map(|u| u.3).collect::<Vec<_>>(),
            "wire_gbs": total as f64 / uploads.iter().map(|u| u.2).fold(0.0, f64::max) / 1e9,
            "aggregate_gbs": total as f64 / slowest / 1e9,
            "single_gbs": if nodes == 1 { total as f64 / slowest / 1e9 } else { 0.0 },
            "wall_seconds": wall,
            "peak_rss": peak_rss(),
        })
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: net_bench init DIR NODES ADDRESS | serve DIR VALUES | upload DIR VALUES NODES";
    let arg = |i: usize| args.get(i).cloned().ok_or(usage);
    let num = |i: usize| -> Result<usize, Error> { Ok(arg(i)?.parse()?) };
    match arg(0)?.as_str() {
        "init" => init(Path::new(&arg(1)?), num(2)?, &arg(3)?),
        "serve" => serve_round(Path::new(&arg(1)?), num(2)?).await,
        "upload" => upload_all(Path::new(&arg(1)?), num(2)?, num(3)?).await,
        _ => Err(usage.into()),
    }
}
