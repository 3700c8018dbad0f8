//! Every language gains: under the every-language rule no published round raises any held-out
//! language's loss beyond the tolerance, whatever the nodes send, and a node whose delta helps only
//! its own language cannot push the others down. The model is replaced by a cheap measure with
//! one parameter block per language, so that many rounds fit in a property test.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use weft_coordinator::{Coordinator, Measure, MeasureError, Member, MemoryBlobStore, RoundRecord};
use weft_core::quality::LossTable;
use weft_core::{
    Aggregator, Contribution, Delta, Fairness, ModelState, NodeId, OuterOptimizer, Policy, Tensor, Weighting,
};

const LANGUAGES: [&str; 3] = ["a", "b", "c"];
const BLOCK: usize = 4;
const TOLERANCE: f64 = 0.005;

/// Language ℓ's loss: its own block's squared distance to 1, plus a shared term — how far the
/// other blocks stray from 0 — so that a delta for one language can hurt the others.
struct Blocks;

impl Measure for Blocks {
    fn heldout_loss(&mut self, state: &ModelState) -> Result<LossTable, MeasureError> {
        let w = state.get("w").map(|t| t.data().to_vec()).unwrap_or_default();
        let mut table = LossTable::new();
        for (k, language) in LANGUAGES.iter().enumerate() {
            let own: f64 = w[k * BLOCK..(k + 1) * BLOCK].iter().map(|v| f64::from(v - 1.0).powi(2)).sum();
            let others: f64 =
                w.iter().enumerate().filter(|(j, _)| j / BLOCK != k).map(|(_, v)| f64::from(*v).powi(2)).sum();
            table.insert(language.to_string(), 0.5 + own + 0.5 * others);
        }
        Ok(table)
    }

    fn languages(&self) -> Vec<String> {
        LANGUAGES.iter().map(|l| l.to_string()).collect()
    }
}

fn coordinator(fairness: Fairness) -> Coordinator<Blocks> {
    let members =
        LANGUAGES.iter().map(|l| Member { node: NodeId::new(format!("node-{l}")).unwrap(), language: l.to_string() });
    let mut base = ModelState::new();
    base.insert("w", Tensor::zeros(vec![LANGUAGES.len() * BLOCK]));
    let policy = Policy::new(0.0, 1.0, 0.0, Weighting::Quality).unwrap().with_fairness(fairness).unwrap();
    Coordinator::new(
        base,
        members.collect(),
        policy,
        OuterOptimizer::TAPESTRY,
        Blocks,
        Arc::new(MemoryBlobStore::new()),
    )
    .unwrap()
    .with_aggregator(Aggregator::WeightedMean)
    .unwrap()
}

/// Node k's delta: `toward` of the way to 1 on its own block, `spill` on every other block.
fn delta(c: &Coordinator<Blocks>, k: usize, toward: f32, spill: f32) -> Delta {
    let w = c.base().get("w").unwrap().data();
    let data = w.iter().enumerate().map(|(j, v)| if j / BLOCK == k { toward * (1.0 - v) } else { spill }).collect();
    let mut state = ModelState::new();
    state.insert("w", Tensor::new(vec![w.len()], data).unwrap());
    Delta::from_state(state)
}

fn round(c: &mut Coordinator<Blocks>, moves: &[(f32, f32)]) -> RoundRecord {
    let announcement = c.open_round().unwrap();
    for (k, (toward, spill)) in moves.iter().enumerate() {
        let contribution = Contribution {
            node: NodeId::new(format!("node-{}", LANGUAGES[k])).unwrap(),
            round: announcement.round,
            base_hash: announcement.base_hash,
            delta: delta(c, k, *toward, *spill),
            token_count: 1,
            declared: BTreeMap::new(),
        };
        let _ = c.submit(contribution);
    }
    c.close_round().unwrap()
}

/// The largest relative rise of any language from `before` to `after`.
fn worst_rise(before: &LossTable, after: &LossTable) -> f64 {
    before.iter().map(|(l, b)| (after[l] - b) / b).fold(f64::NEG_INFINITY, f64::max)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever the three nodes send — progress on their own block and any spill onto the others,
    /// helpful or harmful — a round that publishes a base never raises a language beyond the
    /// tolerance, and a round that cannot keeps the base bitwise.
    #[test]
    fn a_published_round_never_raises_a_language_beyond_the_tolerance(
        rounds in prop::collection::vec(prop::collection::vec((0.0f32..1.0, -0.6f32..0.6), 3), 1..4),
    ) {
        let mut c = coordinator(Fairness::EveryLanguage { tolerance: TOLERANCE });
        for moves in rounds {
            let before = c.base_loss().clone();
            let base = c.base_hash();
            let record = round(&mut c, &moves);
            if record.base_changed {
                prop_assert!(worst_rise(&before, &record.heldout_loss) <= TOLERANCE, "{:?} → {:?}", before, record.heldout_loss);
            } else {
                prop_assert_eq!(c.base_hash(), base);
            }
            let check = record.language_check.as_ref().unwrap();
            prop_assert_eq!(check.tolerance, TOLERANCE);
        }
    }
}

/// Node c trains hard on its own language and spills onto the others (its "help" to them is
/// harm). Under the mean rule its large own gain buys it weight and drags a and b up; under
/// every-language it gets no more than its language's share, and no round raises a or b beyond
/// the tolerance.
#[test]
fn a_node_that_helps_only_itself_cannot_push_the_others_down() {
    let moves = [(0.3, 0.0), (0.3, 0.0), (0.9, -0.35)];
    let mut mean = coordinator(Fairness::Mean);
    let mut fair = coordinator(Fairness::EveryLanguage { tolerance: TOLERANCE });
    let mut mean_worst = f64::NEG_INFINITY;
    for _ in 0..3 {
        let before = mean.base_loss().clone();
        let record = round(&mut mean, &moves);
        mean_worst = mean_worst.max(worst_rise(&before, &record.heldout_loss));
        let before = fair.base_loss().clone();
        let record = round(&mut fair, &moves);
        assert!(record.base_changed, "the consortium keeps moving");
        for language in ["a", "b"] {
            let rise = (record.heldout_loss[language] - before[language]) / before[language];
            assert!(rise <= TOLERANCE, "{language} rose {rise}");
        }
        let selfish = record.contributions.iter().find(|c| c.node == "node-c").unwrap();
        assert!(selfish.weight <= 1.0 / 3.0 + 1e-9, "{}", selfish.weight);
    }
    assert!(mean_worst > TOLERANCE, "the mean rule lets the selfish node push a or b up (worst rise {mean_worst})");
}
