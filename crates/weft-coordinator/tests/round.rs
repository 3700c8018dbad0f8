//! The round engine end to end in one process: real nodes training a real (tiny) causal LM on
//! real text (UDHR articles, split so that no node trains on the held-out part).

use std::collections::BTreeMap;
use std::path::Path;

use std::sync::Arc;

use weft_coordinator::{Coordinator, FsBlobStore, HeldoutSet, Member, RoundRecord, SubmitError};
use weft_core::{
    Aggregator, Contribution, Delta, ModelState, NodeId, OuterOptimizer, Policy, RejectionCode, Tensor, Weighting,
};
use weft_model::{AdamWSettings, ByteGpt, Gpt, GptConfig};
use weft_node::{LocalCorpus, Node, NodeSettings};

const CONFIG: GptConfig = GptConfig { layers: 1, heads: 2, width: 32, context: 32 };
const LANGUAGES: [&str; 3] = ["de", "en", "fr"];

fn udhr(language: &str) -> (Vec<u8>, Vec<u8>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/udhr").join(format!("{language}.txt"));
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut = lines.len() * 3 / 4;
    (lines[..cut].join("\n").into_bytes(), lines[cut..].join("\n").into_bytes())
}

struct Consortium {
    tmp: tempfile::TempDir,
    nodes: Vec<Node>,
    coordinator: Coordinator<HeldoutSet>,
}

fn consortium(languages: &[&str], policy: Policy, outer: OuterOptimizer, seed: u64) -> Consortium {
    consortium_with(languages, policy, outer, seed, Aggregator::WeightedMean)
}

fn consortium_with(
    languages: &[&str],
    policy: Policy,
    outer: OuterOptimizer,
    seed: u64,
    rule: Aggregator,
) -> Consortium {
    let tmp = tempfile::tempdir().unwrap();
    let settings = NodeSettings {
        steps: 25,
        batch_rows: 8,
        adamw: AdamWSettings { lr: 3e-3, warmup_steps: 5, ..AdamWSettings::default() },
        seed,
        privacy: None,
    };
    let mut heldout = BTreeMap::new();
    let mut nodes = Vec::new();
    let mut members = Vec::new();
    for lang in languages {
        let (train, test) = udhr(lang);
        heldout.insert(lang.to_string(), test);
        let id = NodeId::new(format!("node-{lang}")).unwrap();
        let dir = tmp.path().join("nodes").join(id.as_str());
        let trainer = settings.byte_gpt_trainer(CONFIG, &[0; 32]).unwrap();
        nodes.push(Node::new(id.clone(), *lang, LocalCorpus::from_bytes(train), trainer, seed, dir).unwrap());
        members.push(Member { node: id, language: lang.to_string() });
    }
    let base = Gpt::init(CONFIG, seed).unwrap().to_state();
    let measure = HeldoutSet::new(Arc::new(ByteGpt::new(CONFIG, 16).unwrap()), heldout).unwrap();
    let store = Arc::new(FsBlobStore::open(tmp.path().join("store")).unwrap());
    let coordinator =
        Coordinator::new(base, members, policy, outer, measure, store).unwrap().with_aggregator(rule).unwrap();
    Consortium { tmp, nodes, coordinator }
}

fn open_policy() -> Policy {
    Policy::new(0.0, 1.0, 0.0, Weighting::Quality).unwrap()
}

impl Consortium {
    /// Every node trains on the current base; the contributions are returned, not submitted.
    fn train(&mut self) -> Vec<Contribution> {
        let base = self.coordinator.base().clone();
        let hash = self.coordinator.base_hash();
        let round = self.coordinator.round() + 1;
        self.nodes.iter_mut().map(|n| n.run_cycle(round, &base, hash, |_, _| {}).unwrap().contribution).collect()
    }

    fn round(&mut self) -> RoundRecord {
        let contributions = self.train();
        self.close_with(contributions)
    }

    /// Opens a round, submits `contributions` (each must pass the checks) and closes it.
    fn close_with(&mut self, contributions: Vec<Contribution>) -> RoundRecord {
        self.coordinator.open_round().unwrap();
        for c in contributions {
            self.coordinator.submit(c).unwrap();
        }
        self.coordinator.close_round().unwrap()
    }
}

fn bits(state: &ModelState) -> Vec<u32> {
    state.iter().flat_map(|(_, t)| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>()).collect()
}

/// Tapestry invariant 3: one governed base plus N sovereign artifacts after a round.
#[test]
fn a_round_leaves_one_base_and_n_sovereign_artifacts() {
    let mut c = consortium(&LANGUAGES, open_policy(), OuterOptimizer::TAPESTRY, 1);
    let before = c.coordinator.base_hash();
    let record = c.round();
    assert!(record.base_changed);
    assert_ne!(c.coordinator.base_hash(), before);
    assert_eq!(record.accepted, 3);
    for node in &c.nodes {
        let artifact = node.latest_artifact().unwrap();
        assert_eq!(artifact.manifest.base_hash, before);
        let weights = artifact.load_weights().unwrap();
        assert_ne!(weights.content_hash(), c.coordinator.base_hash());
    }
    // The coordinator keeps one manifest per node (hashes and metrics), not the weights.
    let manifests = c.coordinator.manifests();
    assert_eq!(manifests.len(), 3);
    assert!(manifests.values().all(|m| m.contributions.len() == 1 && m.contributions[0].delta_hash.is_some()));
}

/// Tapestry invariant 4: when every contribution is rejected the base is bitwise unchanged.
#[test]
fn total_rejection_leaves_the_base_bitwise_unchanged() {
    let policy = Policy::new(10.0, 1.0, 0.0, Weighting::Quality).unwrap();
    let mut c = consortium(&LANGUAGES, policy, OuterOptimizer::DILOCO, 2);
    let before = bits(c.coordinator.base());
    let hash = c.coordinator.base_hash();
    let record = c.round();
    assert!(!record.base_changed);
    assert_eq!(record.accepted, 0);
    assert_eq!(record.unassigned_share, 1.0);
    assert!(record.contributions.iter().all(|r| r.reason == Some(RejectionCode::BelowFloor)));
    assert_eq!(c.coordinator.base_hash(), hash);
    assert_eq!(bits(c.coordinator.base()), before);
}

/// Tapestry invariant 2 on a real round, with a cap that cannot be met: it is never exceeded.
#[test]
fn an_infeasible_cap_holds_and_the_rest_stays_with_the_base() {
    let policy = Policy::new(0.0, 0.4, 0.0, Weighting::Quality).unwrap();
    let mut c = consortium(&["de", "en"], policy, OuterOptimizer::TAPESTRY, 3);
    let record = c.round();
    assert_eq!(record.accepted, 2);
    for r in &record.contributions {
        assert_eq!(r.weight, 0.4);
        assert!(r.capped);
    }
    assert!((record.unassigned_share - 0.2).abs() < 1e-12);
}

#[test]
fn quorum_missed_leaves_the_base_unchanged() {
    let policy = Policy::new(0.0, 1.0, 1.0, Weighting::Equal).unwrap();
    let mut c = consortium(&LANGUAGES, policy, OuterOptimizer::TAPESTRY, 4);
    let hash = c.coordinator.base_hash();
    let mut contributions = c.train();
    contributions.pop();
    let record = c.close_with(contributions);
    assert_eq!(c.coordinator.base_hash(), hash);
    assert_eq!(record.quorum_required, 3);
    assert!(record.contributions.iter().all(|r| r.reason == Some(RejectionCode::QuorumNotMet)));
}

#[test]
fn malformed_contributions_are_rejected_by_name_and_never_touch_the_base() {
    let mut c = consortium(&LANGUAGES, open_policy(), OuterOptimizer::TAPESTRY, 5);
    let hash = c.coordinator.base_hash();
    let before = bits(c.coordinator.base());
    let good = c.train().remove(0);
    let with_delta = |f: &dyn Fn(&mut ModelState)| {
        let mut state = good.delta.state().clone();
        f(&mut state);
        Contribution { delta: Delta::from_state(state), ..good.clone() }
    };
    let cases = vec![
        (with_delta(&|s| s.get_mut("wte").unwrap().data_mut()[7] = f32::NAN), RejectionCode::NonFinite),
        (with_delta(&|s| s.get_mut("ln_f.bias").unwrap().data_mut()[0] = f32::NEG_INFINITY), RejectionCode::NonFinite),
        (with_delta(&|s| drop(s.insert("wpe", Tensor::zeros(vec![16, 32])))), RejectionCode::WrongShape),
        (with_delta(&|s| drop(s.remove("h.0.mlp.fc.bias"))), RejectionCode::MissingTensor),
        (with_delta(&|s| drop(s.insert("lm_head.weight", Tensor::zeros(vec![2])))), RejectionCode::UnexpectedTensor),
        (Contribution { base_hash: weft_core::ContentHash([1; 32]), ..good.clone() }, RejectionCode::StaleBase),
        (Contribution { round: 7, ..good.clone() }, RejectionCode::WrongRound),
        (Contribution { node: NodeId::new("mallory").unwrap(), ..good.clone() }, RejectionCode::UnknownNode),
    ];
    assert!(
        matches!(c.coordinator.submit(good.clone()), Err(SubmitError::Rejected(r)) if r == weft_core::Rejection::NoOpenRound)
    );
    c.coordinator.open_round().unwrap();
    for (contribution, code) in cases {
        match c.coordinator.submit(contribution) {
            Err(SubmitError::Rejected(reason)) => assert_eq!(reason.code(), code),
            other => panic!("expected {code}, got {other:?}"),
        }
        assert_eq!(bits(c.coordinator.base()), before);
    }
    c.coordinator.submit(good.clone()).unwrap();
    match c.coordinator.submit(good) {
        Err(SubmitError::Rejected(reason)) => assert_eq!(reason, weft_core::Rejection::DuplicateNode),
        other => panic!("expected duplicate_node, got {other:?}"),
    }
    assert_eq!(c.coordinator.base_hash(), hash);
    let record = c.coordinator.close_round().unwrap();
    assert_eq!(record.accepted, 1);
    assert_eq!(record.contributions.len(), 10);
    assert_eq!(record.contributions.iter().filter(|r| r.accepted).count(), 1);
}

#[test]
fn a_huge_declared_quality_gains_nothing() {
    let run = |boast: bool| {
        let mut c = consortium(
            &LANGUAGES,
            Policy::new(0.0, 0.6, 0.0, Weighting::Quality).unwrap(),
            OuterOptimizer::TAPESTRY,
            6,
        );
        let mut contributions = c.train();
        if boast {
            contributions[0].declared.insert("quality".into(), 1e12);
            contributions[0].declared.insert("validation_gain".into(), 1e12);
        }
        let record = c.close_with(contributions);
        let weights: Vec<u64> = record.contributions.iter().map(|r| r.weight.to_bits()).collect();
        (weights, record.base_hash)
    };
    assert_eq!(run(true), run(false));
}

#[test]
fn same_seed_same_bases_and_arrival_order_does_not_matter() {
    let hashes = |seed: u64, reverse: bool| {
        let mut c = consortium(&LANGUAGES, open_policy(), OuterOptimizer::DILOCO, seed);
        (0..2)
            .map(|_| {
                let mut contributions = c.train();
                if reverse {
                    contributions.reverse();
                }
                c.close_with(contributions).base_hash
            })
            .collect::<Vec<_>>()
    };
    let a = hashes(7, false);
    assert_eq!(a, hashes(7, false));
    assert_eq!(a, hashes(7, true));
    assert_ne!(a, hashes(8, false));
}

#[test]
fn two_rounds_lower_heldout_loss_for_every_language() {
    let mut c = consortium(&LANGUAGES, open_policy(), OuterOptimizer::TAPESTRY, 9);
    let initial = c.coordinator.base_loss().clone();
    c.round();
    let record = c.round();
    for (lang, before) in &initial {
        let after = record.heldout_loss[lang];
        assert!(after < before - 0.05, "{lang}: {before} -> {after}");
    }
}

#[test]
fn a_corrupted_stored_delta_is_caught_before_it_reaches_the_base() {
    let mut c = consortium(&LANGUAGES, open_policy(), OuterOptimizer::TAPESTRY, 10);
    let hash = c.coordinator.base_hash();
    let contributions = c.train();
    c.coordinator.open_round().unwrap();
    let mut receipts = Vec::new();
    for contribution in contributions {
        receipts.push(c.coordinator.submit(contribution).unwrap());
    }
    let path = c.tmp.path().join("store").join(format!("{}.safetensors", receipts[0].delta_hash));
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 9;
    bytes[at] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    assert!(c.coordinator.close_round().is_err());
    assert_eq!(c.coordinator.base_hash(), hash);
}

fn scaled(delta: &Delta, factor: f32) -> Delta {
    let mut state = delta.state().clone();
    for (_, t) in state.iter_mut() {
        t.data_mut().iter_mut().for_each(|v| *v *= factor);
    }
    Delta::from_state(state)
}

fn mean_loss(record: &RoundRecord) -> f64 {
    record.heldout_loss.values().sum::<f64>() / record.heldout_loss.len() as f64
}

/// Model replacement: one node scales its delta ×8. The plain mean (no floor, equal weights) is
/// captured; an adaptive norm bound clips the attacker to the median norm and is not.
#[test]
fn a_scaled_delta_captures_the_mean_but_not_the_norm_bound() {
    let run = |rule: Aggregator| {
        let policy = Policy::new(-1e9, 1.0, 0.0, Weighting::Equal).unwrap();
        let mut c = consortium_with(&["de", "en", "es", "fr"], policy, OuterOptimizer::TAPESTRY, 11, rule);
        let mut last = None;
        for _ in 0..2 {
            let mut contributions = c.train();
            contributions[3].delta = scaled(&contributions[3].delta, 8.0);
            last = Some(c.close_with(contributions));
        }
        last.unwrap()
    };
    let captured = run(Aggregator::WeightedMean);
    let defended = run("norm-bound:adaptive:1".parse().unwrap());
    assert!(mean_loss(&defended) < mean_loss(&captured) - 0.2, "{} vs {}", mean_loss(&defended), mean_loss(&captured));
    let attacker = defended.contributions.iter().find(|r| r.node == "node-fr").unwrap();
    assert!(attacker.influence < attacker.weight / 4.0, "{} vs {}", attacker.influence, attacker.weight);
    let median = run(Aggregator::Median);
    assert!(mean_loss(&median) < mean_loss(&captured) - 0.2);
}

#[test]
fn an_aggregator_the_roster_cannot_feed_is_refused_and_a_short_round_leaves_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let members: Vec<Member> =
        ["a", "b", "c"].iter().map(|n| Member { node: NodeId::new(*n).unwrap(), language: "en".into() }).collect();
    let base = Gpt::init(CONFIG, 0).unwrap().to_state();
    let heldout = BTreeMap::from([("en".to_string(), udhr("en").1)]);
    let coordinator = Coordinator::new(
        base,
        members,
        open_policy(),
        OuterOptimizer::TAPESTRY,
        HeldoutSet::new(Arc::new(ByteGpt::new(CONFIG, 16).unwrap()), heldout).unwrap(),
        Arc::new(FsBlobStore::open(tmp.path()).unwrap()),
    )
    .unwrap();
    let err = coordinator.with_aggregator("multi-krum:1:2".parse().unwrap()).err().unwrap();
    assert!(err.to_string().contains("needs at least 5 accepted deltas but the roster has only 3"), "{err}");

    let policy = Policy::new(-1e9, 1.0, 0.0, Weighting::Equal).unwrap();
    let rule: Aggregator = "multi-krum:1:2".parse().unwrap();
    let mut c = consortium_with(&["de", "en", "es", "fr", "it"], policy, OuterOptimizer::TAPESTRY, 12, rule);
    let hash = c.coordinator.base_hash();
    let mut contributions = c.train();
    contributions.pop();
    let record = c.close_with(contributions);
    assert_eq!(c.coordinator.base_hash(), hash);
    assert!(record.contributions.iter().all(|r| r.reason == Some(RejectionCode::TooFewForAggregator)));
}
