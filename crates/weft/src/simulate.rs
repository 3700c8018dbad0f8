//! `weft simulate`: cross-device scale in one process — many short-lived nodes with a tiny
//! model, to measure round time and coordinator memory as the number of nodes grows.
//!
//! Every round, each simulated device is created, trains on its own shard, contributes and is
//! dropped (devices keep no optimizer state between rounds, as in cross-device federated
//! learning). The coordinator streams every delta to its store as it arrives, so its memory
//! holds one model-sized probe and one record per contribution, not the deltas.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use weft_coordinator::{Coordinator, FsBlobStore, HeldoutSet, Member, SubmitError};
use weft_core::{NodeId, OuterOptimizer, Policy, Weighting};
use weft_model::{AdamWSettings, ByteGpt, Gpt, GptConfig};
use weft_node::{LocalCorpus, Node, NodeSettings};

use crate::{data, say};

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    pub nodes: usize,
    #[arg(long, default_value_t = 2)]
    pub rounds: u64,
    /// Local steps per device per round.
    #[arg(long, default_value_t = 2)]
    pub local_steps: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the measurements as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Data directory (udhr/); default: the repository's data/.
    #[arg(long)]
    pub data: Option<PathBuf>,
}

#[derive(Serialize)]
struct RoundTiming {
    round: u64,
    seconds: f64,
    accepted: usize,
    /// Peak resident memory of the process so far (VmHWM), bytes.
    peak_rss: Option<u64>,
}

#[derive(Serialize)]
struct Report {
    nodes: usize,
    parameters: usize,
    rounds: Vec<RoundTiming>,
}

/// A tiny model: cross-device clients are small.
const TINY: GptConfig = GptConfig { layers: 1, heads: 2, width: 16, context: 32 };

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.rounds == 0 {
        anyhow::bail!("--nodes and --rounds must be at least 1");
    }
    let data_dir = data::data_dir(args.data.clone());
    let languages = ["en", "de", "fr", "es"];
    let mut texts = BTreeMap::new();
    for l in languages {
        texts.insert(l.to_owned(), data::heldout(&data_dir, l)?);
    }
    // Devices train on the first half of each language's text, the coordinator measures on
    // the second: no device trains on held-out text.
    let (shards, heldout): (BTreeMap<_, _>, BTreeMap<_, _>) = texts
        .iter()
        .map(|(l, t)| {
            let cut = t.len() / 2;
            ((l.clone(), t[..cut].to_vec()), (l.clone(), t[cut..].to_vec()))
        })
        .unzip();
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let ids: Vec<(NodeId, &str)> = (0..args.nodes)
        .map(|i| Ok((NodeId::new(format!("device-{i:05}"))?, languages[i % languages.len()])))
        .collect::<anyhow::Result<_>>()?;
    let members = ids.iter().map(|(id, l)| Member { node: id.clone(), language: l.to_string() }).collect();
    let base = Gpt::init(TINY, args.seed)?.to_state();
    let parameters = base.num_values();
    let mut coordinator = Coordinator::new(
        base,
        members,
        Policy::new(f64::MIN / 2.0, 1.0, 0.0, Weighting::Equal)?,
        OuterOptimizer::TAPESTRY,
        HeldoutSet::new(Arc::new(ByteGpt::new(TINY, 32)?), heldout)?,
        std::sync::Arc::new(FsBlobStore::open(scratch.path().join("deltas"))?),
    )?;
    let settings = NodeSettings {
        steps: args.local_steps,
        batch_rows: 4,
        adamw: AdamWSettings { warmup_steps: 0, ..AdamWSettings::default() },
        seed: args.seed,
        privacy: None,
    };
    say!("weft simulate: {} devices, tiny model ({parameters} parameters), {} rounds", args.nodes, args.rounds);
    let mut rounds = Vec::new();
    for _ in 0..args.rounds {
        let started = Instant::now();
        let announcement = coordinator.open_round()?;
        let base = coordinator.base().clone();
        for (i, (id, language)) in ids.iter().enumerate() {
            let text = &shards[*language];
            // Each device holds a different window of its language's text.
            let start = (i * 97) % text.len().saturating_sub(256).max(1);
            let shard = text[start..(start + 512).min(text.len())].to_vec();
            let dir = scratch.path().join("devices").join(id.as_str());
            let trainer = settings.byte_gpt_trainer(TINY, &crate::demo::demo_node_secret(args.seed, id))?;
            let mut node =
                Node::new(id.clone(), *language, LocalCorpus::from_bytes(shard), trainer, settings.seed, dir)?;
            let cycle = node.run_cycle(announcement.round, &base, announcement.base_hash, |_, _| {})?;
            match coordinator.submit(cycle.contribution) {
                Ok(_) | Err(SubmitError::Rejected(_)) => {}
                Err(SubmitError::Internal(e)) => return Err(e.into()),
            }
        }
        let record = coordinator.close_round()?;
        let timing = RoundTiming {
            round: record.round,
            seconds: started.elapsed().as_secs_f64(),
            accepted: record.accepted,
            peak_rss: peak_rss(),
        };
        say!(
            "round {}: {:.2} s, {} accepted, peak RSS {}",
            timing.round,
            timing.seconds,
            timing.accepted,
            timing.peak_rss.map_or("?".into(), |b| format!("{:.1} MB", b as f64 / 1e6))
        );
        rounds.push(timing);
    }
    if let Some(path) = &args.json {
        let report = Report { nodes: args.nodes, parameters, rounds };
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Peak resident set size from /proc (Linux); `None` elsewhere.
pub(crate) fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
