//! The Llama family behind weft's model interface: held-out scoring in nats per byte (through
//! the model's own tokenizer), and the shared-track LoRA form of a round's contributions.

use std::sync::Arc;

use weft_core::{AdapterFamily, AdapterRound, AdapterTrack, ModelState, StateError, Tensor, UpdateForm};
use weft_model::{Evaluator, FamilyError, ModelFamily};

use crate::config::LlamaConfig;
use crate::lora::{Adapters, LoraSpec, Projection};
use crate::model::Llama;
use crate::tokenizer::LlamaTokenizer;

/// A Llama-family model (config and tokenizer) scored in windows of `context` tokens.
#[derive(Clone)]
pub struct LlamaFamily {
    pub config: LlamaConfig,
    pub tokenizer: Arc<LlamaTokenizer>,
    pub context: usize,
}

impl std::fmt::Debug for LlamaFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaFamily").field("config", &self.config).field("context", &self.context).finish()
    }
}

impl ModelFamily for LlamaFamily {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn evaluator(&self) -> Result<Box<dyn Evaluator>, FamilyError> {
        Ok(Box::new(LlamaEvaluator { family: self.clone(), model: None }))
    }
}

struct LlamaEvaluator {
    family: LlamaFamily,
    model: Option<Llama>,
}

/// The loss of `model` (with `adapters`) on `text`: nats over the tokens predicted, per byte
/// those tokens decode to — so that a text cut short is measured by what was scored, and
/// figures compare across tokenizers.
pub fn nats_per_byte(
    model: &Llama,
    tokenizer: &LlamaTokenizer,
    adapters: Option<&Adapters>,
    text: &[u8],
    context: usize,
) -> Result<f64, FamilyError> {
    let text = std::str::from_utf8(text).map_err(|e| format!("the text is not UTF-8: {e}"))?;
    let tokens = tokenizer.encode(text)?;
    if tokens.len() < 2 {
        return Err("the text is shorter than two tokens".into());
    }
    let (nats, _) = model.score(&tokens, adapters, context)?;
    let bytes = tokenizer.decode(&tokens[1..])?.len().max(1);
    Ok(nats / bytes as f64)
}

impl Evaluator for LlamaEvaluator {
    fn load(&mut self, state: &ModelState) -> Result<(), FamilyError> {
        // Drop the previous model first: two 135M-parameter copies would double the peak.
        self.model = None;
        self.model = Some(Llama::from_state(self.family.config.clone(), state)?);
        Ok(())
    }

    fn nats_per_byte(&mut self, text: &[u8]) -> Result<f64, FamilyError> {
        let model = self.model.as_ref().ok_or("no state loaded")?;
        nats_per_byte(model, &self.family.tokenizer, None, text, self.family.context)
    }
}

/// The adapters of a Llama configuration: what the coordinator, the nodes and a ledger replay
/// need to rebuild a round's factors (the config alone: no weights, no tokenizer).
#[derive(Clone, Debug)]
pub struct LlamaAdapters {
    pub config: LlamaConfig,
}

impl AdapterFamily for LlamaAdapters {
    fn form(&self, round: &AdapterRound) -> Result<Arc<dyn UpdateForm>, StateError> {
        Ok(match round.track {
            AdapterTrack::Shared => Arc::new(SharedLora::new(&self.config, round)?),
            AdapterTrack::Full => Arc::new(FullLora::new(&self.config, round)?),
        })
    }
}

/// LoRA's shared track for one round: frozen `A` factors drawn from the round's seed; an update
/// is the `B` factors (`model.layers.L.<module>.lora_B.weight`, `[out, rank]`), and stands for
/// the weight change `s·B·A`. With `A`'s rows orthonormal, `‖s·B·A‖ = s·‖B‖` (the norm the
/// policy reads, see `norm`) and distances between updates are the weight changes' over `s`,
/// so caps and Krum's selection act on the weight changes; coordinate-wise rules (median,
/// trimmed mean) act in `B`'s coordinates.
#[derive(Clone, Debug)]
pub struct SharedLora {
    config: LlamaConfig,
    record: AdapterRound,
    /// `A` from the seed, `B = 0`.
    factors: Adapters,
    /// The update layout: zero `B`s.
    layout: ModelState,
}

/// The `B` factors of `adapters`, the part a node sends.
fn b_factors(adapters: &Adapters) -> ModelState {
    let mut state = adapters.to_state();
    let a_names: Vec<String> = state.names().filter(|n| n.ends_with(".lora_A.weight")).map(str::to_owned).collect();
    for name in a_names {
        state.remove(&name);
    }
    state
}

impl SharedLora {
    pub fn new(config: &LlamaConfig, record: &AdapterRound) -> Result<Self, StateError> {
        let spec = spec_of(record)?;
        let factors = Adapters::init(config, spec, record.seed).map_err(|e| StateError::Format(e.to_string()))?;
        let layout = b_factors(&factors);
        Ok(SharedLora { config: config.clone(), record: record.clone(), factors, layout })
    }

    /// The round's adapters as a node starts them: `A` frozen from the seed, `B = 0`.
    pub fn initial(&self) -> &Adapters {
        &self.factors
    }

    /// The update a node sends for trained `adapters`: their `B` factors. Fails if `adapters`
    /// do not carry this round's `A` (trained from other factors, the update would mean
    /// something else).
    pub fn update_of(&self, adapters: &Adapters) -> Result<ModelState, StateError> {
        if adapters.spec() != self.factors.spec() {
            return Err(StateError::Format("the adapters do not have the round's rank and targets".into()));
        }
        let is_b = adapters.is_b();
        let same_a = adapters
            .params()
            .iter()
            .zip(self.factors.params())
            .zip(&is_b)
            .all(|((x, y), &b)| b || x.to_bits() == y.to_bits());
        if !same_a {
            return Err(StateError::Format("the adapters' A factors are not the round's".into()));
        }
        Ok(b_factors(adapters))
    }

    /// The round's adapters with `update`'s `B` factors.
    pub fn adapters_with(&self, update: &ModelState) -> Result<Adapters, StateError> {
        update.check_layout(&self.layout)?;
        let mut full = self.factors.to_state();
        for (name, tensor) in update.iter() {
            full.insert(name, tensor.clone());
        }
        Adapters::from_state(&self.config, self.factors.spec().clone(), &full).map_err(|e| match e {
            crate::lora::LoraError::State(e) => e,
            other => StateError::Format(other.to_string()),
        })
    }
}

/// LoRA with both factors trained (`--adapter-track full`): an update is every `A` and `B`, and
/// stands for `s·B·A`. The weighted mean of such updates is taken of the products, in weight
/// space ([`UpdateForm::expand_into`]): averaging the `A`s and `B`s apart (FedIT) gives
/// `mean(B)·mean(A) ≠ mean(B·A)`.
#[derive(Clone, Debug)]
pub struct FullLora {
    config: LlamaConfig,
    record: AdapterRound,
    /// `A` from the seed (where nodes start), `B = 0`.
    factors: Adapters,
    /// The update layout: every factor.
    layout: ModelState,
}

impl FullLora {
    pub fn new(config: &LlamaConfig, record: &AdapterRound) -> Result<Self, StateError> {
        let factors =
            Adapters::init(config, spec_of(record)?, record.seed).map_err(|e| StateError::Format(e.to_string()))?;
        let layout = factors.to_state();
        Ok(FullLora { config: config.clone(), record: record.clone(), factors, layout })
    }

    /// Where a node starts: the round's `A`, `B = 0`.
    pub fn initial(&self) -> &Adapters {
        &self.factors
    }

    fn adapters(&self, update: &ModelState) -> Result<Adapters, StateError> {
        Adapters::from_state(&self.config, self.factors.spec().clone(), update).map_err(|e| match e {
            crate::lora::LoraError::State(e) => e,
            other => StateError::Format(other.to_string()),
        })
    }
}

impl UpdateForm for FullLora {
    fn layout<'a>(&'a self, _base: &'a ModelState) -> &'a ModelState {
        &self.layout
    }

    fn apply(&self, base: &ModelState, update: &ModelState, scale: f32) -> Result<ModelState, StateError> {
        let mut out = base.clone();
        self.expand_into(update, scale, &mut out)?;
        Ok(out)
    }

    fn adapter(&self) -> Option<&AdapterRound> {
        Some(&self.record)
    }

    fn is_linear(&self) -> bool {
        false
    }

    fn expand_into(&self, update: &ModelState, coefficient: f32, step: &mut ModelState) -> Result<(), StateError> {
        self.adapters(update)?.merge_into(step, coefficient).map_err(|e| match e {
            crate::lora::LoraError::State(e) => e,
            other => StateError::Format(other.to_string()),
        })
    }

    fn expanded_layout(&self, _base: &ModelState) -> ModelState {
        let mut step = ModelState::new();
        for (layer, projection) in self.factors.adapted() {
            let (out, inp) = projection.shape(&self.config);
            step.insert(format!("model.layers.{layer}.{}.weight", projection.module()), Tensor::zeros(vec![out, inp]));
        }
        step
    }

    /// `‖s·B·A‖_F` from `r × r` Gram matrices: `‖BA‖² = Σᵢⱼ (BᵀB)ᵢⱼ (AAᵀ)ⱼᵢ`, in f64, without
    /// forming the product.
    fn norm(&self, update: &ModelState) -> f64 {
        let Ok(adapters) = self.adapters(update) else { return f64::NAN };
        let r = self.factors.spec().rank;
        let s = f64::from(self.factors.spec().scale());
        let mut total = 0.0;
        for (layer, projection) in self.factors.adapted() {
            let Some((a, b)) = adapters.factor(layer, projection) else { continue };
            let (out, inp) = projection.shape(&self.config);
            let gram = |m: &[f32], rows: usize, cols: usize, by_rows: bool| {
                let mut g = vec![0.0f64; r * r];
                for i in 0..r {
                    for j in 0..r {
                        g[i * r + j] = if by_rows {
                            (0..cols).map(|c| f64::from(m[i * cols + c]) * f64::from(m[j * cols + c])).sum()
                        } else {
                            (0..rows).map(|o| f64::from(m[o * cols + i]) * f64::from(m[o * cols + j])).sum()
                        };
                    }
                }
                g
            };
            let aat = gram(a, r, inp, true);
            let btb = gram(b, out, r, false);
            total += (0..r * r).map(|k| btb[k] * aat[(k % r) * r + k / r]).sum::<f64>();
        }
        s * total.max(0.0).sqrt()
    }
}

fn spec_of(record: &AdapterRound) -> Result<LoraSpec, StateError> {
    let targets = record
        .targets
        .iter()
        .map(|t| t.parse::<Projection>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StateError::Format(e.to_string()))?;
    Ok(LoraSpec { rank: record.rank, alpha: record.alpha, targets })
}

impl UpdateForm for SharedLora {
    fn layout<'a>(&'a self, _base: &'a ModelState) -> &'a ModelState {
        &self.layout
    }

    /// `‖s·B·A‖ = s·‖B‖`: `A`'s rows are orthonormal.
    fn norm(&self, update: &ModelState) -> f64 {
        let b = update.iter().map(|(_, t)| t.squared_norm()).sum::<f64>().sqrt();
        f64::from(self.factors.spec().scale()) * b
    }

    fn apply(&self, base: &ModelState, update: &ModelState, scale: f32) -> Result<ModelState, StateError> {
        let adapters = self.adapters_with(update)?;
        let mut out = base.clone();
        adapters.merge_into(&mut out, scale).map_err(|e| match e {
            crate::lora::LoraError::State(e) => e,
            other => StateError::Format(other.to_string()),
        })?;
        Ok(out)
    }

    fn adapter(&self) -> Option<&AdapterRound> {
        Some(&self.record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{random_state, tiny_config};
    use weft_core::Tensor;

    fn record(seed: u64) -> AdapterRound {
        AdapterRound {
            seed,
            rank: 2,
            alpha: 4.0,
            targets: vec!["q".into(), "v".into(), "down".into()],
            track: AdapterTrack::Shared,
        }
    }

    /// Random values (standard deviation `std`) in an update `layout`.
    fn random_update(layout: &ModelState, std: f32, seed: u64) -> ModelState {
        let mut rng = weft_model::SplitMix64::new(seed);
        let mut update = ModelState::new();
        for (name, t) in layout.iter() {
            let data = (0..t.len()).map(|_| std * rng.normal() as f32).collect();
            update.insert(name, Tensor::new(t.shape().to_vec(), data).unwrap());
        }
        update
    }

    /// The Frobenius norm of `changed − base`, over every tensor, in f64.
    fn change_norm(base: &ModelState, changed: &ModelState) -> f64 {
        changed
            .iter()
            .map(|(name, t)| {
                let b = base.get(name).unwrap().data();
                t.data().iter().zip(b).map(|(x, b)| f64::from(x - b).powi(2)).sum::<f64>()
            })
            .sum::<f64>()
            .sqrt()
    }

    /// The weighted mean of updates in B, merged, is the weighted mean of each update's weight
    /// change (to float rounding): exact aggregation, not FedIT's mean of A times mean of B.
    #[test]
    fn merging_the_mean_of_b_is_the_mean_of_the_weight_changes() {
        let config = tiny_config(true, false);
        let form = SharedLora::new(&config, &record(11)).unwrap();
        let base = random_state(&config, 1);
        let (u1, u2) = (random_update(&form.layout, 0.05, 1), random_update(&form.layout, 0.05, 2));
        let (w1, w2) = (0.3f32, 0.7f32);
        let mut mean = form.layout(&base).zeros_like();
        for (name, t) in mean.iter_mut() {
            let (a, b) = (u1.get(name).unwrap().data(), u2.get(name).unwrap().data());
            t.data_mut().iter_mut().zip(a.iter().zip(b)).for_each(|(m, (a, b))| *m = w1 * a + w2 * b);
        }
        let merged = form.apply(&base, &mean, 1.0).unwrap();
        let one = form.apply(&base, &u1, 1.0).unwrap();
        let two = form.apply(&base, &u2, 1.0).unwrap();
        let mut worst = 0.0f32;
        for (name, t) in merged.iter() {
            let (b, x, y) =
                (base.get(name).unwrap().data(), one.get(name).unwrap().data(), two.get(name).unwrap().data());
            for i in 0..t.len() {
                let expected = b[i] + w1 * (x[i] - b[i]) + w2 * (y[i] - b[i]);
                worst = worst.max((t.data()[i] - expected).abs());
            }
        }
        assert!(worst < 1e-6, "max |Δ| {worst}");
        // ‖s·B·A‖ = s·‖B‖ with orthonormal rows of A.
        let name = "model.layers.0.self_attn.q_proj.weight";
        let change: f64 = one
            .get(name)
            .unwrap()
            .data()
            .iter()
            .zip(base.get(name).unwrap().data())
            .map(|(x, b)| f64::from(x - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let b_norm = u1.get("model.layers.0.self_attn.q_proj.lora_B.weight").unwrap().squared_norm().sqrt();
        assert!((change - 2.0 * b_norm).abs() < 1e-4 * change.max(1e-3), "{change} vs {}", 2.0 * b_norm);
        // The norm the policy reads is the whole weight change's.
        let whole = change_norm(&base, &one);
        assert!((form.norm(&u1) - whole).abs() < 1e-4 * whole, "{} vs {whole}", form.norm(&u1));
    }

    /// With both factors trained, the weighted mean is taken of the products — exact to float
    /// rounding — while FedIT's mean(B)·mean(A) is far off; and the norm read from r×r Gram
    /// matrices is the weight change's Frobenius norm.
    #[test]
    fn both_factors_aggregate_in_product_space_not_factor_by_factor() {
        let config = tiny_config(true, false);
        let form = FullLora::new(&config, &AdapterRound { track: AdapterTrack::Full, ..record(11) }).unwrap();
        assert!(!form.is_linear());
        let base = random_state(&config, 1);
        let (u1, u2) = (random_update(&form.layout, 0.3, 1), random_update(&form.layout, 0.3, 2));
        let (w1, w2) = (0.4f32, 0.6f32);
        let mut step = form.expanded_layout(&base);
        form.expand_into(&u1, w1, &mut step).unwrap();
        form.expand_into(&u2, w2, &mut step).unwrap();
        let (one, two) = (form.apply(&base, &u1, 1.0).unwrap(), form.apply(&base, &u2, 1.0).unwrap());
        let mut fedit = ModelState::new();
        for (name, t) in u1.iter() {
            let other = u2.get(name).unwrap().data();
            let mean = t.data().iter().zip(other).map(|(a, b)| w1 * a + w2 * b).collect();
            fedit.insert(name, Tensor::new(t.shape().to_vec(), mean).unwrap());
        }
        let fedit = form.apply(&base, &fedit, 1.0).unwrap();
        let (mut worst, mut off, mut size) = (0.0f32, 0.0f64, 0.0f64);
        for (name, change) in step.iter() {
            let (b, x, y, f) = (
                base.get(name).unwrap().data(),
                one.get(name).unwrap().data(),
                two.get(name).unwrap().data(),
                fedit.get(name).unwrap().data(),
            );
            for i in 0..change.len() {
                let truth = w1 * (x[i] - b[i]) + w2 * (y[i] - b[i]);
                worst = worst.max((change.data()[i] - truth).abs());
                off += f64::from(f[i] - b[i] - truth).powi(2);
                size += f64::from(truth).powi(2);
            }
        }
        assert!(worst < 1e-5, "product-space mean off by {worst}");
        let relative = (off / size).sqrt();
        assert!(relative > 0.2, "FedIT is off the true mean update by only {relative}");
        // ‖s·B·A‖ from Gram matrices = the Frobenius norm of the whole weight change.
        let direct = change_norm(&base, &one);
        assert!((form.norm(&u1) - direct).abs() < 1e-4 * direct, "{} vs {direct}", form.norm(&u1));
    }

    #[test]
    fn an_update_of_the_wrong_layout_or_round_is_refused() {
        let config = tiny_config(true, false);
        let form = SharedLora::new(&config, &record(11)).unwrap();
        let base = random_state(&config, 1);
        let mut update = random_update(&form.layout, 0.05, 1);
        update.remove("model.layers.0.self_attn.q_proj.lora_B.weight");
        assert!(matches!(form.apply(&base, &update, 1.0), Err(StateError::MissingTensor { .. })));
        let other = SharedLora::new(&config, &record(12)).unwrap();
        assert!(form.update_of(other.initial()).is_err());
        assert_eq!(form.update_of(form.initial()).unwrap(), form.layout);
        assert!(SharedLora::new(&config, &AdapterRound { targets: vec!["w9".into()], ..record(1) }).is_err());
    }
}
