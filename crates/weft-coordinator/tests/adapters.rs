//! Adapter rounds (LoRA's shared track) through the real round engine, on a tiny random Llama:
//! the published base is exactly the base plus the merged weighted mean of the accepted B
//! factors, every round's A seed is in the ledger, `verify` replays the rounds bit for bit with
//! the model family and refuses to pretend it can without it, and a full-weight delta sent to an
//! adapter round is refused by name without touching the base.

use std::collections::BTreeMap;
use std::sync::Arc;

use weft_coordinator::{
    verify, verify_with, Coordinator, DurableCoordinator, FsBlobStore, Journal, Measure, MeasureError, Member,
    SqliteJournal, SubmitError,
};
use weft_core::aggregate::axpy;
use weft_core::quality::LossTable;
use weft_core::{
    AdapterFamily, AdapterPlan, AdapterTrack, Aggregator, Contribution, Delta, ModelState, NodeId, OuterOptimizer,
    Policy, RejectionCode, Tensor, Weighting,
};
use weft_ledger::Event;
use weft_llama::{Llama, LlamaAdapters, LlamaConfig, LoraTrainer, LoraTraining, SharedLora, Windows};
use weft_model::SplitMix64;

const NODES: [(&str, &str); 4] = [("node-a", "x"), ("node-b", "y"), ("node-c", "x"), ("node-d", "y")];

fn config() -> LlamaConfig {
    LlamaConfig::from_json(
        r#"{"vocab_size":37,"hidden_size":24,"intermediate_size":40,"num_hidden_layers":2,
            "num_attention_heads":6,"num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,
            "max_position_embeddings":64,"tie_word_embeddings":true}"#,
    )
    .unwrap()
}

fn base() -> ModelState {
    let mut rng = SplitMix64::new(4);
    let mut state = ModelState::new();
    for (name, shape) in config().tensor_shapes() {
        let n: usize = shape.iter().product();
        let scale = if name.ends_with("norm.weight") { 0.0 } else { 0.2 };
        let offset = if name.ends_with("norm.weight") { 1.0 } else { 0.0 };
        state.insert(name, Tensor::new(shape, (0..n).map(|_| offset + scale * rng.normal() as f32).collect()).unwrap());
    }
    state
}

/// Two "languages": two token patterns.
fn text(language: &str, len: usize) -> Vec<u32> {
    match language {
        "x" => (0..len).map(|i| ((i * i + 3 * i) % 37) as u32).collect(),
        _ => (0..len).map(|i| ((5 * i + 1) % 17 + 20) as u32).collect(),
    }
}

/// Held-out loss per language: the Llama's mean NLL per token on held-out sequences.
struct TokenLoss;

impl Measure for TokenLoss {
    fn heldout_loss(&mut self, state: &ModelState) -> Result<LossTable, MeasureError> {
        let model = Llama::from_state(config(), state)
            .map_err(|e| MeasureError::Model { family: "llama", source: Box::new(e) })?;
        let mut table = LossTable::new();
        for language in ["x", "y"] {
            let tokens = &text(language, 300)[200..260];
            let (nats, count) =
                model.nll(tokens).map_err(|e| MeasureError::Model { family: "llama", source: Box::new(e) })?;
            table.insert(language.to_owned(), nats / count as f64);
        }
        Ok(table)
    }

    fn languages(&self) -> Vec<String> {
        vec!["x".into(), "y".into()]
    }
}

fn plan() -> AdapterPlan {
    AdapterPlan {
        seed: 9,
        rank: 2,
        alpha: 4.0,
        targets: vec!["q".into(), "v".into(), "up".into(), "down".into()],
        track: AdapterTrack::Shared,
    }
}

fn coordinator(dir: &std::path::Path, outer: OuterOptimizer) -> DurableCoordinator<TokenLoss> {
    coordinator_with(dir, outer, plan())
}

fn coordinator_with(dir: &std::path::Path, outer: OuterOptimizer, plan: AdapterPlan) -> DurableCoordinator<TokenLoss> {
    let members =
        NODES.iter().map(|(n, l)| Member { node: NodeId::new(*n).unwrap(), language: (*l).to_owned() }).collect();
    let policy = Policy::new(0.0, 0.4, 0.5, Weighting::Quality).unwrap();
    let store = Arc::new(FsBlobStore::open(dir.join("blobs")).unwrap());
    Coordinator::new(base(), members, policy, outer, TokenLoss, store)
        .unwrap()
        .with_adapters(plan, Arc::new(LlamaAdapters { config: config() }))
        .unwrap()
        .durable(Box::new(SqliteJournal::open(dir).unwrap()), serde_json::json!({}))
        .unwrap()
}

/// What node `i` sends in the open round: B trained a few steps on its language's text.
fn trained_update(c: &DurableCoordinator<TokenLoss>, i: usize, round: u64) -> Contribution {
    let record = c.adapter_round().unwrap();
    let full = record.track == AdapterTrack::Full;
    let form = SharedLora::new(&config(), &record).unwrap();
    let model = Llama::from_state(config(), c.base()).unwrap();
    let mut adapters = form.initial().clone();
    let settings = LoraTraining { lr: 2e-2, train_a: full, ..LoraTraining::default() };
    let mut trainer = LoraTrainer::new(settings, &adapters);
    let corpus = text(NODES[i].1, 200);
    let windows = Windows { rows: 2, context: 24 };
    trainer.train(&model, &mut adapters, &corpus, 6, windows, &mut SplitMix64::derive(1, NODES[i].0, round)).unwrap();
    Contribution {
        node: NodeId::new(NODES[i].0).unwrap(),
        round,
        base_hash: c.base_hash(),
        delta: Delta::from_state(if full { adapters.to_state() } else { form.update_of(&adapters).unwrap() }),
        token_count: 100,
        declared: BTreeMap::new(),
    }
}

#[test]
fn adapter_rounds_merge_the_weighted_mean_of_b_exactly_and_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = coordinator(dir, OuterOptimizer::TAPESTRY);
    let family = LlamaAdapters { config: config() };
    for round in 1..=2 {
        c.open_round().unwrap();
        assert_eq!(c.adapter_round(), Some(plan().round(round)));
        let before = c.base().clone();
        let updates: Vec<Contribution> = (0..NODES.len()).map(|i| trained_update(&c, i, round)).collect();
        for u in &updates {
            c.submit(u.clone()).unwrap();
        }
        let record = c.close_round().unwrap();
        assert!(record.accepted >= 2, "round {round}: {:?}", record.contributions);
        assert!(record.base_changed);
        // The published base, recomputed by hand: Σ influenceᵢ·Bᵢ in node order, merged once.
        let form = family.form(&plan().round(round)).unwrap();
        let mut step = form.layout(&before).zeros_like();
        for u in &updates {
            let r = record.contributions.iter().find(|r| r.node == u.node).unwrap();
            if r.influence != 0.0 {
                for (name, t) in step.iter_mut() {
                    axpy(t.data_mut(), r.influence as f32, u.delta.state().get(name).unwrap().data()).unwrap();
                }
            }
        }
        let expected = form.apply(&before, &step, 1.0).unwrap();
        assert_eq!(expected.content_hash(), c.base_hash(), "round {round}");
        // Only the adapted projections moved.
        for (name, t) in c.base().iter() {
            let adapted = ["q_proj", "v_proj", "up_proj", "down_proj"].iter().any(|p| name.contains(p));
            assert_eq!(adapted, t != before.get(name).unwrap(), "{name}");
        }
    }
    let final_hash = c.base_hash();
    drop(c);
    let mut chain = weft_ledger::Chain::new(None);
    let seeds: Vec<u64> = SqliteJournal::read(dir)
        .unwrap()
        .ledger()
        .unwrap()
        .iter()
        .filter_map(|line| match chain.check(line).ok()?.event {
            Event::RoundOpened { adapter, .. } => adapter.map(|a| a.seed),
            _ => None,
        })
        .collect();
    assert_eq!(seeds, vec![plan().round(1).seed, plan().round(2).seed]);
    let report = verify_with(dir, None, Some(&family)).unwrap();
    assert_eq!((report.rounds, report.replayed, report.final_base_hash), (2, 2, final_hash));
    let without = verify(dir, None).unwrap_err().to_string();
    assert!(without.contains("adapters"), "{without}");
}

#[test]
fn a_full_weight_delta_in_an_adapter_round_is_refused_and_the_base_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = coordinator(tmp.path(), OuterOptimizer::TAPESTRY);
    c.open_round().unwrap();
    let before = c.base_hash();
    let full = Contribution {
        node: NodeId::new("node-a").unwrap(),
        round: 1,
        base_hash: before,
        delta: Delta::from_state(c.base().zeros_like()),
        token_count: 1,
        declared: BTreeMap::new(),
    };
    match c.submit(full) {
        Err(SubmitError::Rejected(rejection)) => assert_eq!(rejection.code(), RejectionCode::MissingTensor),
        other => panic!("expected a rejection, got {other:?}"),
    }
    c.close_round().unwrap();
    assert_eq!(c.base_hash(), before);
}

#[test]
fn adapter_rounds_refuse_rules_that_carry_state_across_rounds() {
    let members = vec![Member { node: NodeId::new("n").unwrap(), language: "x".into() }];
    let make = |outer| {
        let store = Arc::new(weft_coordinator::MemoryBlobStore::new());
        Coordinator::new(
            base(),
            members.clone(),
            Policy::new(0.0, 0.4, 0.0, Weighting::Quality).unwrap(),
            outer,
            TokenLoss,
            store,
        )
        .unwrap()
    };
    let family = || Arc::new(LlamaAdapters { config: config() });
    assert!(make(OuterOptimizer::DILOCO).with_adapters(plan(), family()).is_err());
    let clipping = Aggregator::CenteredClipping { tau: 1.0, iterations: 1 };
    let adapted = make(OuterOptimizer::TAPESTRY).with_adapters(plan(), family()).unwrap();
    assert!(adapted.with_aggregator(clipping).is_err());
    let bad_rank = AdapterPlan { rank: 99, ..plan() };
    assert!(make(OuterOptimizer::TAPESTRY).with_adapters(bad_rank, family()).is_err());
}

/// Both factors trained: the published base is the base plus `Σ influenceᵢ · s·BᵢAᵢ`, summed in
/// weight space in node order, bit for bit; the ledger replays it; rules that combine updates
/// coordinate by coordinate are refused by name.
#[test]
fn with_both_factors_trained_the_mean_is_taken_of_the_products() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let full = AdapterPlan { track: AdapterTrack::Full, ..plan() };
    let mut c = coordinator_with(dir, OuterOptimizer::TAPESTRY, full.clone());
    let family = LlamaAdapters { config: config() };
    c.open_round().unwrap();
    assert_eq!(c.adapter_round().map(|r| r.track), Some(AdapterTrack::Full));
    let before = c.base().clone();
    let updates: Vec<Contribution> = (0..NODES.len()).map(|i| trained_update(&c, i, 1)).collect();
    for u in &updates {
        c.submit(u.clone()).unwrap();
    }
    let record = c.close_round().unwrap();
    assert!(record.accepted >= 2 && record.base_changed, "{:?}", record.contributions);
    let form = family.form(&full.round(1)).unwrap();
    let mut step = form.expanded_layout(&before);
    for u in &updates {
        let r = record.contributions.iter().find(|r| r.node == u.node).unwrap();
        if r.influence != 0.0 {
            form.expand_into(u.delta.state(), r.influence as f32, &mut step).unwrap();
        }
        // The norm the policy saw is the weight change's, not the factors'.
        assert_eq!(r.delta_norm.map(f64::to_bits), Some(form.norm(u.delta.state()).to_bits()));
    }
    let mut expected = before.clone();
    for (name, change) in step.iter() {
        axpy(expected.get_mut(name).unwrap().data_mut(), 1.0, change.data()).unwrap();
    }
    assert_eq!(expected.content_hash(), c.base_hash());
    let final_hash = c.base_hash();
    drop(c);
    let report = verify_with(dir, None, Some(&family)).unwrap();
    assert_eq!((report.replayed, report.final_base_hash), (1, final_hash));

    let members = vec![Member { node: NodeId::new("n").unwrap(), language: "x".into() }];
    let store = Arc::new(weft_coordinator::MemoryBlobStore::new());
    let policy = Policy::new(0.0, 0.4, 0.0, Weighting::Quality).unwrap();
    let adapted = Coordinator::new(base(), members, policy, OuterOptimizer::TAPESTRY, TokenLoss, store)
        .unwrap()
        .with_adapters(full, Arc::new(family))
        .unwrap();
    let refused = adapted.with_aggregator(Aggregator::Median).err().unwrap().to_string();
    assert!(refused.contains("only mean and norm-bound apply"), "{refused}");
}
