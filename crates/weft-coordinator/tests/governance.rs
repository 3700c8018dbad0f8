//! Governance end to end: canaries with a secret reserve, the Goodhart detector, reputation.

use std::collections::BTreeMap;
use std::path::Path;

use weft_coordinator::{
    CanaryRegistry, CanarySpec, Coordinator, FsBlobStore, Governance, GovernanceSettings, GovernanceState, HeldoutSet,
    Member, RoundRecord, Visibility,
};
use weft_core::{Delta, NodeId, OuterOptimizer, Policy, Weighting};
use weft_model::{AdamWSettings, ByteGpt, Gpt, GptConfig};
use weft_node::{LocalCorpus, Node, NodeSettings};

/// Small enough for speed; the Goodhart test needs a model that can memorise (`DEMO`).
const SMALL: GptConfig = GptConfig { layers: 1, heads: 2, width: 32, context: 32 };
const DEMO: GptConfig = GptConfig { layers: 2, heads: 4, width: 64, context: 64 };
const LANGUAGES: [&str; 3] = ["de", "en", "fr"];

fn lines(language: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/udhr").join(format!("{language}.txt"));
    std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

/// Training text: the first 60% of the UDHR; canaries: the rest, alternate blocks public/secret.
fn split(language: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let all = lines(language);
    let cut = all.len() * 6 / 10;
    let rest = &all[cut..];
    let pick = |parity: usize| {
        rest.iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == parity)
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes()
    };
    (all[..cut].join("\n").into_bytes(), pick(0), pick(1))
}

fn family(config: GptConfig) -> std::sync::Arc<dyn weft_model::ModelFamily> {
    std::sync::Arc::new(ByteGpt::new(config, 16).unwrap())
}

fn registry() -> CanaryRegistry {
    let mut sets = Vec::new();
    for lang in LANGUAGES {
        let (_, public, secret) = split(lang);
        for (visibility, text) in [(Visibility::Public, public), (Visibility::Secret, secret)] {
            let id = format!("{lang}-{visibility:?}");
            let spec = CanarySpec {
                id,
                topic: lang.into(),
                visibility,
                difficulty: 1.0,
                retire_after: 10,
                file: String::new(),
            };
            sets.push((spec, text));
        }
    }
    CanaryRegistry::from_sets(sets).unwrap()
}

struct Run {
    _tmp: tempfile::TempDir,
    nodes: Vec<Node>,
    coordinator: Coordinator<HeldoutSet>,
}

/// `overfit`: the last node also trains on every public canary (nodes may see public sets).
/// `free_ride`: the last node sends a zero delta.
fn run(overfit: bool, state: Option<GovernanceState>, config: GptConfig) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let settings = NodeSettings {
        steps: 60,
        batch_rows: 16,
        adamw: AdamWSettings { warmup_steps: 5, ..AdamWSettings::default() },
        seed: 3,
        privacy: None,
    };
    let mut nodes = Vec::new();
    let mut members = Vec::new();
    let mut heldout = BTreeMap::new();
    let public_all: Vec<u8> = LANGUAGES.iter().flat_map(|l| split(l).1).collect();
    for (i, lang) in LANGUAGES.iter().enumerate() {
        let (mut train, public, secret) = split(lang);
        heldout.insert(lang.to_string(), [public, secret].concat());
        if overfit && i == LANGUAGES.len() - 1 {
            train = public_all.clone();
        }
        let id = NodeId::new(format!("node-{lang}")).unwrap();
        nodes.push(
            Node::new(
                id.clone(),
                *lang,
                LocalCorpus::from_bytes(train),
                settings.byte_gpt_trainer(config, &[0; 32]).unwrap(),
                settings.seed,
                tmp.path().join(id.as_str()),
            )
            .unwrap(),
        );
        members.push(Member { node: id, language: lang.to_string() });
    }
    let mut governance = Governance::new(GovernanceSettings::default(), registry(), family(config)).unwrap();
    if let Some(state) = state {
        governance = governance.with_state(state);
    }
    let coordinator = Coordinator::new(
        Gpt::init(config, 3).unwrap().to_state(),
        members,
        Policy::new(0.0, 0.6, 0.0, Weighting::Quality).unwrap(),
        OuterOptimizer::TAPESTRY,
        HeldoutSet::new(family(config), heldout).unwrap(),
        std::sync::Arc::new(FsBlobStore::open(tmp.path().join("store")).unwrap()),
    )
    .unwrap()
    .with_governance(governance);
    Run { _tmp: tmp, nodes, coordinator }
}

impl Run {
    fn round(&mut self, free_ride: bool) -> RoundRecord {
        let base = self.coordinator.base().clone();
        let hash = self.coordinator.base_hash();
        let announcement = self.coordinator.open_round().unwrap();
        let mut contributions: Vec<_> = self
            .nodes
            .iter_mut()
            .map(|n| n.run_cycle(announcement.round, &base, hash, |_, _| {}).unwrap().contribution)
            .collect();
        if free_ride {
            let last = contributions.last_mut().unwrap();
            last.delta = Delta::from_state(last.delta.state().zeros_like());
        }
        for c in contributions {
            let _ = self.coordinator.submit(c);
        }
        self.coordinator.close_round().unwrap()
    }
}

fn row<'a>(record: &'a RoundRecord, node: &str, topic: &str) -> &'a weft_coordinator::ReputationRow {
    let g = record.governance.as_ref().unwrap();
    g.reputation.iter().find(|r| r.node == node && r.topic == topic).unwrap()
}

#[test]
fn the_goodhart_detector_flags_a_node_that_trains_on_the_public_canaries() {
    let mut r = run(true, None, DEMO);
    let mut flagged_rounds = 0;
    for _ in 0..2 {
        let record = r.round(false);
        let g = record.governance.as_ref().unwrap();
        for score in &g.scores {
            eprintln!(
                "{} quality {:.4} gap {:.4} flagged {}",
                score.node, score.quality, score.goodhart_gap, score.flagged
            );
            if score.node != "node-fr" {
                assert!(!score.flagged, "honest {} flagged with gap {}", score.node, score.goodhart_gap);
            }
        }
        let cheat = record.contributions.iter().find(|c| c.node == "node-fr").unwrap();
        if cheat.reason == Some(weft_core::RejectionCode::CanaryOverfit) {
            flagged_rounds += 1;
            assert_eq!(cheat.weight, 0.0);
        }
        // Every canary set used is committed by hash in the record, the secret reserve included.
        assert_eq!(g.canaries.len(), 6);
        assert!(g.canaries.iter().any(|c| c.visibility == Visibility::Secret));
    }
    assert!(flagged_rounds >= 1);
    let last = r.coordinator.governance().unwrap().state();
    assert!(!last.flagged["node-fr"].is_empty());
    let topics = ["de".to_string(), "en".to_string(), "fr".to_string()];
    let table = r.coordinator.governance().unwrap().table(&topics);
    let rep = |node: &str| table.iter().filter(|row| row.node == node).map(|row| row.reputation).sum::<f64>();
    let slashing = table.iter().find(|row| row.node == "node-fr").unwrap().slashing;
    assert!(slashing < 0.2, "{slashing}");
    assert!(rep("node-fr") < 0.3 * rep("node-de"), "{} vs {}", rep("node-fr"), rep("node-de"));
}

#[test]
fn a_free_rider_loses_reputation_and_weight_while_honest_nodes_keep_theirs() {
    let mut r = run(false, None, SMALL);
    let mut records = Vec::new();
    for _ in 0..3 {
        records.push(r.round(true));
    }
    let last = records.last().unwrap();
    let rider = row(last, "node-fr", "fr");
    let honest = row(last, "node-de", "de");
    assert!(rider.competence < honest.competence, "{} vs {}", rider.competence, honest.competence);
    assert!(rider.reputation < 0.5 * honest.reputation);
    assert!(last.contributions.iter().find(|c| c.node == "node-fr").unwrap().weight == 0.0);
}

#[test]
fn governance_state_survives_a_restart() {
    let mut first = run(false, None, SMALL);
    first.round(false);
    let saved: GovernanceState =
        serde_json::from_str(&serde_json::to_string(first.coordinator.governance().unwrap().state()).unwrap()).unwrap();
    assert_eq!(&saved, first.coordinator.governance().unwrap().state());
    let restored = run(false, Some(saved.clone()), SMALL);
    let topics: Vec<String> = LANGUAGES.iter().map(|l| l.to_string()).collect();
    assert_eq!(
        restored.coordinator.governance().unwrap().table(&topics),
        first.coordinator.governance().unwrap().table(&topics)
    );
    assert_eq!(restored.coordinator.governance().unwrap().state().reveals, saved.reveals);
    assert!(saved.reveals.values().all(|&n| n == 1));
}
