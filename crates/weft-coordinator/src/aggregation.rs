//! Turning the accepted deltas into one step, streaming them from the store.
//!
//! Linear rules (weighted mean, norm bound, the mean over Multi-Krum's selection) read one delta
//! at a time into one scratch buffer. Order statistics (median, trimmed mean) and pairwise
//! distances (Multi-Krum) read the same chunk of every delta at once: N chunks of [`CHUNK`]
//! values, so memory stays bounded by N × 256 KiB whatever the model size. Every pass recomputes
//! each delta's content hash and checks it before its result is used.

use std::collections::BTreeMap;

use rayon::prelude::*;
use weft_core::aggregate::{axpy, LengthError};
use weft_core::policy::capped_weights;
use weft_core::robust::{clip_factor, krum_select, median, reduce_sorted_columns, ColumnPick};
use weft_core::update::UpdateForm;
use weft_core::{Aggregator, ContentHash, ModelState, NodeId, NormBound, OuterOptimizer, StateError};

use crate::head::ModelPoint;
use crate::store::{BlobStore, StoreError};

/// Values per delta read at once by column-wise rules.
const CHUNK: usize = 64 * 1024;

/// An accepted delta as the aggregation sees it: its policy weight and its norm as measured by
/// the coordinator at submission.
#[derive(Clone, Debug)]
pub(crate) struct Accepted {
    pub node: NodeId,
    pub hash: ContentHash,
    pub weight: f64,
    pub norm: f64,
}

/// How accepted deltas become the next point: the aggregator, the cap (Multi-Krum re-applies it
/// to the deltas it selects), the factor the aggregated step is multiplied by (1, or ½, ¼, … when
/// the per-language check shrank it) and the outer optimizer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepRules {
    pub aggregator: Aggregator,
    pub cap: f64,
    pub scale: f64,
    pub outer: OuterOptimizer,
}

/// The coefficient each node's delta actually carried in the step (for column-wise rules, its
/// nominal share W/n).
pub(crate) type Influence = BTreeMap<NodeId, f64>;

/// The aggregator's output, before the outer optimizer.
struct Step {
    step: ModelState,
    influence: Influence,
    /// Centered clipping's final center, kept for the next round.
    center: Option<ModelState>,
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("aggregation: {0}")]
    Length(#[from] LengthError),
    #[error("aggregation produced a non-finite base ({0}); the base is left unchanged")]
    NonFinite(StateError),
    #[error("the aggregated update does not fit the base: {0}")]
    Form(StateError),
}

/// The point after one round: `rules`' step over `accepted` from `point`, through the outer
/// optimizer, expanded by the round's update `form`. Shared by the round engine and `weft ledger
/// verify`'s replay so that both compute the same bits. Works on copies: `point` is untouched.
pub(crate) fn advance(
    point: &ModelPoint,
    rules: &StepRules,
    accepted: &[Accepted],
    store: &dyn BlobStore,
    form: &dyn UpdateForm,
) -> Result<(ModelPoint, Influence), MoveError> {
    if !form.is_linear() {
        return advance_in_weight_space(point, rules, accepted, store, form);
    }
    let layout = form.layout(&point.base);
    let Step { mut step, mut influence, center } =
        aggregate(&rules.aggregator, accepted, rules.cap, store, layout, point.center.as_ref())?;
    if rules.scale != 1.0 {
        // A power of two: the scaled step and influences are exact.
        step = scaled(step, rules.scale);
        influence.values_mut().for_each(|c| *c *= rules.scale);
    }
    if !form.carries_state_across_rounds() {
        // Adapter factors differ every round: the step is expanded once, at the outer learning
        // rate (momentum and centers are refused for such rounds when the rules are set).
        let OuterOptimizer::Plain { lr } = rules.outer else {
            return Err(MoveError::Form(StateError::Format("adapter rounds take a plain outer optimizer".into())));
        };
        let base = form.apply(&point.base, &step, lr).map_err(MoveError::Form)?;
        base.check_finite().map_err(MoveError::NonFinite)?;
        return Ok((ModelPoint { base, momentum: Default::default(), center: None }, influence));
    }
    let mut base = point.base.clone();
    let mut momentum = point.momentum.clone();
    for ((name, tensor), (_, step)) in base.iter_mut().zip(step.iter()) {
        let state = momentum.entry(name.to_owned()).or_default();
        rules.outer.apply(tensor.data_mut(), step.data(), state)?;
    }
    base.check_finite().map_err(MoveError::NonFinite)?;
    if !rules.outer.keeps_state() {
        momentum.clear();
    }
    let center = center.or_else(|| point.center.clone());
    Ok((ModelPoint { base, momentum, center }, influence))
}

/// The coefficients of the rules that are a weighted sum of whole deltas (`None` for the others).
fn linear_coefficients(rule: &Aggregator, accepted: &[Accepted]) -> Option<Vec<f64>> {
    match *rule {
        Aggregator::WeightedMean => Some(accepted.iter().map(|a| a.weight).collect()),
        Aggregator::NormBound { bound } => {
            let tau = match bound {
                NormBound::Fixed(t) => t,
                NormBound::Adaptive(k) => {
                    let mut norms: Vec<f32> = accepted.iter().map(|a| a.norm as f32).collect();
                    k * f64::from(median(&mut norms))
                }
            };
            Some(accepted.iter().map(|a| a.weight * clip_factor(a.norm, tau)).collect())
        }
        _ => None,
    }
}

/// A step for updates whose weight change is not linear in them (both LoRA factors trained):
/// `Σ cᵢ·W(uᵢ)` accumulated in the touched weights, one update at a time (O(model) memory,
/// whatever the number of nodes), in node order. Only rules that are weighted sums of whole
/// updates apply; the others are refused when the rules are set.
fn advance_in_weight_space(
    point: &ModelPoint,
    rules: &StepRules,
    accepted: &[Accepted],
    store: &dyn BlobStore,
    form: &dyn UpdateForm,
) -> Result<(ModelPoint, Influence), MoveError> {
    let not_linear = || {
        MoveError::Form(StateError::Format(format!("{} needs updates it can combine coordinate by coordinate; adapters with both factors trained take mean or norm-bound", rules.aggregator)))
    };
    let OuterOptimizer::Plain { lr } = rules.outer else {
        return Err(MoveError::Form(StateError::Format("adapter rounds take a plain outer optimizer".into())));
    };
    let coefficients = linear_coefficients(&rules.aggregator, accepted).ok_or_else(not_linear)?;
    let mut step = form.expanded_layout(&point.base);
    let mut influence = Influence::new();
    for (a, &c) in accepted.iter().zip(&coefficients) {
        let c = c * rules.scale;
        influence.insert(a.node.clone(), c);
        if c == 0.0 {
            continue;
        }
        // `state()` checks the blob against its hash before anything is used.
        let update = store.open(&a.hash)?.state()?;
        form.expand_into(&update, c as f32, &mut step).map_err(MoveError::Form)?;
    }
    let mut base = point.base.clone();
    for (name, change) in step.iter() {
        let tensor =
            base.get_mut(name).ok_or_else(|| MoveError::Form(StateError::MissingTensor { name: name.to_owned() }))?;
        axpy(tensor.data_mut(), lr, change.data())?;
    }
    base.check_finite().map_err(MoveError::NonFinite)?;
    Ok((ModelPoint { base, momentum: Default::default(), center: None }, influence))
}

/// What stays with the base: `1 − Σ influence` (in node order, so a replay gives the same bits),
/// the cap's unassigned share plus whatever the aggregator held back.
pub(crate) fn unassigned_share(influence: &Influence) -> f64 {
    (1.0 - influence.values().sum::<f64>()).max(0.0)
}

/// Computes the step of `rule` over `accepted` (sorted by node id), for tensors laid out as `base`.
fn aggregate(
    rule: &Aggregator,
    accepted: &[Accepted],
    cap: f64,
    store: &dyn BlobStore,
    base: &ModelState,
    previous_center: Option<&ModelState>,
) -> Result<Step, StoreError> {
    let total: f64 = accepted.iter().map(|a| a.weight).sum();
    let n = accepted.len();
    let nominal = || accepted.iter().map(|a| (a.node.clone(), total / n as f64)).collect();
    match *rule {
        Aggregator::WeightedMean | Aggregator::NormBound { .. } => {
            let coefficients = linear_coefficients(rule, accepted).unwrap_or_default();
            linear(accepted, coefficients, store, base)
        }
        Aggregator::Median => {
            let step = columns(accepted, store, base, ColumnPick::Median)?;
            Ok(Step { step: scaled(step, total), influence: nominal(), center: None })
        }
        Aggregator::TrimmedMean { beta } => {
            let k = Aggregator::trimmed(beta, n);
            let step = columns(accepted, store, base, ColumnPick::Trimmed(k))?;
            Ok(Step { step: scaled(step, total), influence: nominal(), center: None })
        }
        Aggregator::MultiKrum { f, m } => {
            let dist2 = pairwise_distances(accepted, store, base)?;
            let (chosen, _) = krum_select(&dist2, n, f, m);
            let scores: Vec<(f64, &NodeId)> = chosen.iter().map(|&i| (accepted[i].weight, &accepted[i].node)).collect();
            let (weights, _) = capped_weights(scores, cap);
            let coefficients = accepted.iter().map(|a| weights.get(&a.node).copied().unwrap_or(0.0)).collect();
            linear(accepted, coefficients, store, base)
        }
        Aggregator::CenteredClipping { tau, iterations } => {
            centered_clipping(accepted, total, tau, iterations, store, base, previous_center)
        }
    }
}

/// `Σ cᵢ Δᵢ`, one delta at a time into the step (summation order: node id).
fn linear(
    accepted: &[Accepted],
    coefficients: Vec<f64>,
    store: &dyn BlobStore,
    base: &ModelState,
) -> Result<Step, StoreError> {
    let mut step = base.zeros_like();
    let mut scratch = Vec::new();
    for (a, &c) in accepted.iter().zip(&coefficients) {
        if c == 0.0 {
            continue;
        }
        let blob = store.open(&a.hash)?;
        let mut reader = blob.reader()?;
        for (name, tensor) in step.iter_mut() {
            reader.read(name, &mut scratch)?;
            axpy(tensor.data_mut(), c as f32, &scratch).map_err(|e| reader.fault(name, e))?;
        }
        reader.verify()?;
    }
    let influence = accepted.iter().zip(coefficients).map(|(a, c)| (a.node.clone(), c)).collect();
    Ok(Step { step, influence, center: None })
}

/// Calls `visit(name, offset, chunks)` for every chunk of every tensor, with the same range of
/// every delta, then checks every delta's hash.
fn for_each_chunk(
    accepted: &[Accepted],
    store: &dyn BlobStore,
    base: &ModelState,
    mut visit: impl FnMut(&str, usize, &[Vec<f32>]),
) -> Result<(), StoreError> {
    let blobs = accepted.iter().map(|a| store.open(&a.hash)).collect::<Result<Vec<_>, _>>()?;
    let mut readers = blobs.iter().map(|b| b.reader()).collect::<Result<Vec<_>, _>>()?;
    let mut chunks = vec![Vec::new(); accepted.len()];
    for (name, tensor) in base.iter() {
        let len = tensor.len();
        let mut start = 0;
        while start < len || (len == 0 && start == 0) {
            let take = CHUNK.min(len - start);
            for (reader, chunk) in readers.iter_mut().zip(chunks.iter_mut()) {
                reader.read_range(name, start, take, chunk)?;
            }
            visit(name, start, &chunks);
            start += take;
            if take == 0 {
                break;
            }
        }
    }
    for reader in readers {
        reader.verify()?;
    }
    Ok(())
}

/// Median or trimmed mean of every coordinate's column of n values.
fn columns(
    accepted: &[Accepted],
    store: &dyn BlobStore,
    base: &ModelState,
    pick: ColumnPick,
) -> Result<ModelState, StoreError> {
    let mut step = base.zeros_like();
    for_each_chunk(accepted, store, base, |name, start, chunks| {
        let Some(tensor) = step.get_mut(name) else { return };
        let take = chunks.first().map_or(0, Vec::len);
        let inputs: Vec<&[f32]> = chunks.iter().map(Vec::as_slice).collect();
        reduce_sorted_columns(&inputs, &mut tensor.data_mut()[start..start + take], pick);
    })?;
    Ok(step)
}

/// Squared L2 distances between every pair of deltas, `dist2[i·n + j]`.
fn pairwise_distances(accepted: &[Accepted], store: &dyn BlobStore, base: &ModelState) -> Result<Vec<f64>, StoreError> {
    let n = accepted.len();
    let mut dist2 = vec![0.0f64; n * n];
    for_each_chunk(accepted, store, base, |_, _, chunks| {
        let pairs: Vec<(usize, usize)> = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).collect();
        let partial: Vec<f64> = pairs
            .par_iter()
            .map(|&(i, j)| chunks[i].iter().zip(&chunks[j]).map(|(a, b)| f64::from(a - b) * f64::from(a - b)).sum())
            .collect();
        for (&(i, j), d) in pairs.iter().zip(partial) {
            dist2[i * n + j] += d;
            dist2[j * n + i] += d;
        }
    })?;
    Ok(dist2)
}

fn scaled(mut step: ModelState, factor: f64) -> ModelState {
    let f = factor as f32;
    for (_, tensor) in step.iter_mut() {
        tensor.data_mut().iter_mut().for_each(|v| *v *= f);
    }
    step
}

/// Centered clipping around the previous round's center.
fn centered_clipping(
    accepted: &[Accepted],
    total: f64,
    tau: f64,
    iterations: usize,
    store: &dyn BlobStore,
    base: &ModelState,
    previous_center: Option<&ModelState>,
) -> Result<Step, StoreError> {
    let mut center = match previous_center {
        Some(c) if c.check_layout(base).is_ok() => c.clone(),
        _ => base.zeros_like(),
    };
    let shares: Vec<f64> = accepted.iter().map(|a| if total > 0.0 { a.weight / total } else { 0.0 }).collect();
    let mut last = vec![0.0; accepted.len()];
    let mut scratch = Vec::new();
    for _ in 0..iterations {
        // ‖Δᵢ − v‖ for every delta: one streaming pass each.
        let mut factors = Vec::with_capacity(accepted.len());
        for a in accepted {
            let blob = store.open(&a.hash)?;
            let mut reader = blob.reader()?;
            let mut sq = 0.0f64;
            for (name, v) in center.iter() {
                reader.read(name, &mut scratch)?;
                sq += scratch.iter().zip(v.data()).map(|(d, c)| f64::from(d - c) * f64::from(d - c)).sum::<f64>();
            }
            reader.verify()?;
            factors.push(clip_factor(sq.sqrt(), tau));
        }
        // v ← v + Σ aᵢ(Δᵢ − v) = (1 − Σ aᵢ)·v + Σ aᵢΔᵢ, with aᵢ = w̃ᵢ·clipᵢ.
        let coefficients: Vec<f64> = shares.iter().zip(&factors).map(|(s, f)| s * f).collect();
        let keep = 1.0 - coefficients.iter().sum::<f64>();
        let moved = linear(accepted, coefficients.clone(), store, base)?.step;
        for ((_, v), (_, m)) in center.iter_mut().zip(moved.iter()) {
            for (v, m) in v.data_mut().iter_mut().zip(m.data()) {
                *v = keep as f32 * *v + m;
            }
        }
        last = coefficients;
    }
    let influence = accepted.iter().zip(&last).map(|(a, c)| (a.node.clone(), c * total)).collect();
    let step = scaled(center.clone(), total);
    Ok(Step { step, influence, center: Some(center) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryBlobStore;
    use weft_core::{Delta, Tensor};

    fn setup(values: &[[f32; 3]]) -> (MemoryBlobStore, ModelState, Vec<Accepted>) {
        let store = MemoryBlobStore::new();
        let mut base = ModelState::new();
        base.insert("w", Tensor::zeros(vec![3]));
        let n = values.len();
        let accepted = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let mut s = ModelState::new();
                s.insert("w", Tensor::new(vec![3], v.to_vec()).unwrap());
                let delta = Delta::from_state(s);
                Accepted {
                    node: NodeId::new(format!("n{i}")).unwrap(),
                    hash: store.put(delta.state()).unwrap(),
                    weight: 1.0 / n as f64,
                    norm: delta.norm(),
                }
            })
            .collect();
        (store, base, accepted)
    }

    fn step(rule: Aggregator, values: &[[f32; 3]]) -> Vec<f32> {
        let (store, base, accepted) = setup(values);
        aggregate(&rule, &accepted, 1.0, &store, &base, None).unwrap().step.get("w").unwrap().data().to_vec()
    }

    const HONEST_AND_ONE_ATTACKER: [[f32; 3]; 5] =
        [[1.0, 1.0, 1.0], [1.2, 0.8, 1.0], [0.8, 1.2, 1.0], [1.0, 1.0, 1.2], [-100.0, 100.0, -100.0]];

    #[test]
    fn the_mean_is_captured_by_one_attacker_and_robust_rules_are_not() {
        let mean = step(Aggregator::WeightedMean, &HONEST_AND_ONE_ATTACKER);
        assert!(mean[0] < -15.0);
        for rule in [
            Aggregator::Median,
            Aggregator::TrimmedMean { beta: 0.2 },
            Aggregator::MultiKrum { f: 1, m: 3 },
            Aggregator::NormBound { bound: NormBound::Adaptive(1.0) },
            Aggregator::CenteredClipping { tau: 1.0, iterations: 3 },
        ] {
            let s = step(rule, &HONEST_AND_ONE_ATTACKER);
            assert!(s.iter().all(|v| v.abs() < 2.0), "{rule}: {s:?}");
        }
        assert_eq!(step(Aggregator::Median, &HONEST_AND_ONE_ATTACKER), [1.0, 1.0, 1.0]);
    }

    #[test]
    fn krum_keeps_the_cap_and_reports_who_it_dropped() {
        let (store, base, accepted) = setup(&HONEST_AND_ONE_ATTACKER);
        let out = aggregate(&Aggregator::MultiKrum { f: 1, m: 2 }, &accepted, 0.4, &store, &base, None).unwrap();
        assert_eq!(out.influence[&NodeId::new("n4").unwrap()], 0.0);
        assert!(out.influence.values().all(|&w| w <= 0.4));
        assert!((out.influence.values().sum::<f64>() - 0.8).abs() < 1e-12);
    }

    #[test]
    fn column_rules_stream_tensors_longer_than_a_chunk() {
        let store = MemoryBlobStore::new();
        let len = CHUNK * 2 + 5;
        let mut base = ModelState::new();
        base.insert("big", Tensor::zeros(vec![len]));
        let accepted: Vec<Accepted> = (0..3)
            .map(|i| {
                let mut s = ModelState::new();
                s.insert("big", Tensor::new(vec![len], (0..len).map(|j| (j % 7) as f32 + i as f32).collect()).unwrap());
                let delta = Delta::from_state(s);
                Accepted {
                    node: NodeId::new(format!("n{i}")).unwrap(),
                    hash: store.put(delta.state()).unwrap(),
                    weight: 1.0 / 3.0,
                    norm: delta.norm(),
                }
            })
            .collect();
        let out = aggregate(&Aggregator::Median, &accepted, 1.0, &store, &base, None).unwrap();
        let data = out.step.get("big").unwrap().data();
        for j in [0, CHUNK - 1, CHUNK, len - 1] {
            let expected = ((j % 7) as f32 + 1.0) * (3.0 * (1.0 / 3.0f64)) as f32;
            assert!((data[j] - expected).abs() < 1e-5, "{j}: {} vs {expected}", data[j]);
        }
    }
}
