//! Low-rank adapters (LoRA) on a frozen Llama: `W' = W + s·B·A` per adapted projection, with
//! `A` `[rank, in]`, `B` `[out, rank]` and `s = alpha / rank`.
//!
//! All factors live in one flat parameter vector (one optimizer, one gradient norm), in a fixed
//! order: layer by layer, projections in [`Projection::ALL`] order, `A` before `B`.

use std::fmt;
use std::str::FromStr;

use weft_core::{ModelState, StateError, Tensor};
use weft_model::gemm::{gemm, Lhs, Start};
use weft_model::SplitMix64;

use crate::config::LlamaConfig;

/// A linear projection of a Llama block that can carry an adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The module's Hugging Face name inside a layer.
    pub fn module(self) -> &'static str {
        match self {
            Projection::Q => "self_attn.q_proj",
            Projection::K => "self_attn.k_proj",
            Projection::V => "self_attn.v_proj",
            Projection::O => "self_attn.o_proj",
            Projection::Gate => "mlp.gate_proj",
            Projection::Up => "mlp.up_proj",
            Projection::Down => "mlp.down_proj",
        }
    }

    /// `(out, in)` of the projection's weight.
    pub fn shape(self, config: &LlamaConfig) -> (usize, usize) {
        let (d, f) = (config.hidden_size, config.intermediate_size);
        let (q, kv) = (config.num_attention_heads * config.head_size(), config.kv_heads() * config.head_size());
        match self {
            Projection::Q => (q, d),
            Projection::K | Projection::V => (kv, d),
            Projection::O => (d, q),
            Projection::Gate | Projection::Up => (f, d),
            Projection::Down => (d, f),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Projection::Q => "q",
            Projection::K => "k",
            Projection::V => "v",
            Projection::O => "o",
            Projection::Gate => "gate",
            Projection::Up => "up",
            Projection::Down => "down",
        }
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for Projection {
    type Err = LoraError;
    fn from_str(s: &str) -> Result<Self, LoraError> {
        Projection::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| LoraError::Spec(format!("'{s}' is not a projection (q, k, v, o, gate, up, down)")))
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LoraError {
    #[error("adapter settings: {0}")]
    Spec(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Which projections carry adapters, their rank and their scale.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<Projection>,
}

impl LoraSpec {
    /// `s` in `W + s·B·A`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    pub fn validate(&self, config: &LlamaConfig) -> Result<(), LoraError> {
        if self.targets.is_empty() {
            return Err(LoraError::Spec("no projection to adapt".into()));
        }
        let mut sorted = self.targets.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.targets.len() {
            return Err(LoraError::Spec("a projection is listed twice".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(LoraError::Spec(format!("alpha {} must be positive", self.alpha)));
        }
        for &p in &self.targets {
            let (out, inp) = p.shape(config);
            if self.rank == 0 || self.rank > out.min(inp) {
                return Err(LoraError::Spec(format!("rank {} must be 1..={} for {p}", self.rank, out.min(inp))));
            }
        }
        Ok(())
    }
}

/// Where one adapter's factors sit in the flat parameter vector.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    layer: usize,
    projection: Projection,
    out: usize,
    inp: usize,
    a: usize,
    b: usize,
}

/// The adapters of every layer, or (same layout) their gradients.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapters {
    spec: LoraSpec,
    entries: Vec<Entry>,
    /// `lookup[layer * 7 + projection]`: index into `entries`.
    lookup: Vec<Option<usize>>,
    params: Vec<f32>,
}

impl Adapters {
    /// Zero factors for `config` and `spec`.
    pub fn zeros(config: &LlamaConfig, spec: LoraSpec) -> Result<Self, LoraError> {
        spec.validate(config)?;
        let mut targets = spec.targets.clone();
        targets.sort();
        let mut entries = Vec::new();
        let mut lookup = vec![None; config.num_hidden_layers * 7];
        let mut offset = 0;
        for layer in 0..config.num_hidden_layers {
            for &projection in &targets {
                let (out, inp) = projection.shape(config);
                lookup[layer * 7 + projection as usize] = Some(entries.len());
                entries.push(Entry { layer, projection, out, inp, a: offset, b: offset + spec.rank * inp });
                offset += spec.rank * (inp + out);
            }
        }
        Ok(Self { spec, entries, lookup, params: vec![0.0; offset] })
    }

    /// `A` with orthonormal rows drawn from `seed` (so that `‖B·A‖ = ‖B‖`), `B = 0`: the base
    /// is unchanged until `B` is trained.
    pub fn init(config: &LlamaConfig, spec: LoraSpec, seed: u64) -> Result<Self, LoraError> {
        let mut adapters = Self::zeros(config, spec)?;
        let rank = adapters.spec.rank;
        for i in 0..adapters.entries.len() {
            let e = adapters.entries[i].clone();
            let mut rng = SplitMix64::derive(seed, "lora-a", (e.layer * 7 + e.projection as usize) as u64);
            let a = orthonormal_rows(rank, e.inp, &mut rng);
            adapters.params[e.a..e.a + rank * e.inp].copy_from_slice(&a);
        }
        Ok(adapters)
    }

    pub fn spec(&self) -> &LoraSpec {
        &self.spec
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    pub fn zeros_like(&self) -> Self {
        Self { params: vec![0.0; self.params.len()], ..self.clone() }
    }

    /// The factors `(A [rank, in], B [out, rank])` of one projection, if it is adapted.
    pub fn factor(&self, layer: usize, projection: Projection) -> Option<(&[f32], &[f32])> {
        let e = &self.entries[(*self.lookup.get(layer * 7 + projection as usize)?)?];
        let r = self.spec.rank;
        Some((&self.params[e.a..e.a + r * e.inp], &self.params[e.b..e.b + e.out * r]))
    }

    pub(crate) fn factor_mut(&mut self, layer: usize, projection: Projection) -> Option<(&mut [f32], &mut [f32])> {
        let e = self.entries[(*self.lookup.get(layer * 7 + projection as usize)?)?].clone();
        let r = self.spec.rank;
        let (head, tail) = self.params.split_at_mut(e.b);
        Some((&mut head[e.a..e.a + r * e.inp], &mut tail[..e.out * r]))
    }

    /// The adapted `(layer, projection)` pairs, in parameter order.
    pub fn adapted(&self) -> impl Iterator<Item = (usize, Projection)> + '_ {
        self.entries.iter().map(|e| (e.layer, e.projection))
    }

    /// Which parameters are `B` factors (the rest are `A`), in parameter order.
    pub fn is_b(&self) -> Vec<bool> {
        let mut mask = vec![false; self.params.len()];
        for e in &self.entries {
            mask[e.b..e.b + e.out * self.spec.rank].fill(true);
        }
        mask
    }

    /// The factors as named tensors, PEFT's names without its `base_model.model.` prefix:
    /// `model.layers.L.self_attn.q_proj.lora_A.weight` `[rank, in]` and `…lora_B.weight` `[out, rank]`.
    pub fn to_state(&self) -> ModelState {
        let mut state = ModelState::new();
        let r = self.spec.rank;
        for e in &self.entries {
            let base = format!("model.layers.{}.{}", e.layer, e.projection.module());
            let a = self.params[e.a..e.a + r * e.inp].to_vec();
            let b = self.params[e.b..e.b + e.out * r].to_vec();
            // Shapes match their lengths by construction.
            if let (Ok(a), Ok(b)) = (Tensor::new(vec![r, e.inp], a), Tensor::new(vec![e.out, r], b)) {
                state.insert(format!("{base}.lora_A.weight"), a);
                state.insert(format!("{base}.lora_B.weight"), b);
            }
        }
        state
    }

    /// Adapters from named tensors laid out as [`to_state`](Self::to_state) writes them; every
    /// tensor must be there with its shape and finite values, and nothing else.
    pub fn from_state(config: &LlamaConfig, spec: LoraSpec, state: &ModelState) -> Result<Self, LoraError> {
        let mut adapters = Self::zeros(config, spec)?;
        let expected = adapters.to_state();
        state.check_layout(&expected)?;
        state.check_finite()?;
        let r = adapters.spec.rank;
        for i in 0..adapters.entries.len() {
            let e = adapters.entries[i].clone();
            let base = format!("model.layers.{}.{}", e.layer, e.projection.module());
            if let (Some(a), Some(b)) =
                (state.get(&format!("{base}.lora_A.weight")), state.get(&format!("{base}.lora_B.weight")))
            {
                adapters.params[e.a..e.a + r * e.inp].copy_from_slice(a.data());
                adapters.params[e.b..e.b + e.out * r].copy_from_slice(b.data());
            }
        }
        Ok(adapters)
    }

    /// Adds `weight · s · B·A` to each adapted projection of a Hugging Face state: merging an
    /// adapter into the base, in a fixed summation order.
    pub fn merge_into(&self, state: &mut ModelState, weight: f32) -> Result<(), LoraError> {
        let r = self.spec.rank;
        let scale = weight * self.spec.scale();
        for e in &self.entries {
            let name = format!("model.layers.{}.{}.weight", e.layer, e.projection.module());
            let w = state.get_mut(&name).ok_or(StateError::MissingTensor { name: name.clone() })?;
            if w.shape() != [e.out, e.inp] {
                return Err(StateError::Shape { name, expected: vec![e.out, e.inp], got: w.shape().to_vec() }.into());
            }
            let b: Vec<f32> = self.params[e.b..e.b + e.out * r].iter().map(|&v| v * scale).collect();
            let a = &self.params[e.a..e.a + r * e.inp];
            gemm(w.data_mut(), e.inp, Lhs { data: &b, row_stride: r, k_stride: 1 }, a, e.inp, r, Start::Accumulate);
        }
        Ok(())
    }
}

/// `rows` orthonormal rows of length `cols` (rows ≤ cols): Gaussian rows, orthonormalised by
/// modified Gram–Schmidt in f64.
fn orthonormal_rows(rows: usize, cols: usize, rng: &mut SplitMix64) -> Vec<f32> {
    let mut basis: Vec<Vec<f64>> = Vec::with_capacity(rows);
    while basis.len() < rows {
        let mut v: Vec<f64> = (0..cols).map(|_| rng.normal()).collect();
        for u in &basis {
            let dot: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(u).for_each(|(a, b)| *a -= dot * b);
        }
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        // A draw (numerically) inside the span so far is drawn again.
        if norm > 1e-6 {
            basis.push(v.into_iter().map(|a| a / norm).collect());
        }
    }
    basis.into_iter().flatten().map(|a| a as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{random_state, tiny_config};

    fn spec() -> LoraSpec {
        LoraSpec { rank: 3, alpha: 6.0, targets: vec![Projection::Q, Projection::V, Projection::Down] }
    }

    #[test]
    fn a_has_orthonormal_rows_and_the_state_round_trips() {
        let config = tiny_config(true, false);
        let adapters = Adapters::init(&config, spec(), 5).unwrap();
        let (a, b) = adapters.factor(1, Projection::Down).unwrap();
        assert!(b.iter().all(|&v| v == 0.0));
        let inp = config.intermediate_size;
        for i in 0..3 {
            for j in 0..3 {
                let dot: f64 = (0..inp).map(|c| a[i * inp + c] as f64 * a[j * inp + c] as f64).sum();
                assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-6, "A·Aᵀ[{i},{j}] = {dot}");
            }
        }
        assert!(adapters.factor(0, Projection::K).is_none());
        let state = adapters.to_state();
        assert_eq!(state.len(), 2 * 3 * config.num_hidden_layers);
        assert_eq!(Adapters::from_state(&config, spec(), &state).unwrap(), adapters);
        // The same seed draws the same A; another seed another.
        assert_eq!(Adapters::init(&config, spec(), 5).unwrap(), adapters);
        assert_ne!(Adapters::init(&config, spec(), 6).unwrap(), adapters);
    }

    #[test]
    fn merge_adds_scaled_b_times_a() {
        let config = tiny_config(true, false);
        let mut adapters = Adapters::init(&config, spec(), 5).unwrap();
        adapters.params_mut().iter_mut().enumerate().for_each(|(i, p)| *p += (i % 7) as f32 * 0.01);
        let base = random_state(&config, 2);
        let mut merged = base.clone();
        adapters.merge_into(&mut merged, 0.5).unwrap();
        let (a, b) = adapters.factor(0, Projection::Q).unwrap();
        let name = "model.layers.0.self_attn.q_proj.weight";
        let (w0, w1) = (base.get(name).unwrap().data(), merged.get(name).unwrap().data());
        let d = config.hidden_size;
        for (o, i) in [(0, 0), (5, 17), (23, 3)] {
            let ba: f64 = (0..3).map(|r| b[o * 3 + r] as f64 * a[r * d + i] as f64).sum();
            let expected = w0[o * d + i] as f64 + 0.5 * 2.0 * ba;
            assert!((w1[o * d + i] as f64 - expected).abs() < 1e-5);
        }
        let untouched = "model.layers.0.self_attn.k_proj.weight";
        assert_eq!(base.get(untouched), merged.get(untouched));
    }

    #[test]
    fn refuses_bad_specs() {
        let config = tiny_config(true, false);
        let bad = |spec: LoraSpec| Adapters::zeros(&config, spec).unwrap_err();
        assert!(matches!(bad(LoraSpec { rank: 0, ..spec() }), LoraError::Spec(_)));
        assert!(matches!(bad(LoraSpec { rank: 25, ..spec() }), LoraError::Spec(_)));
        assert!(matches!(bad(LoraSpec { targets: vec![], ..spec() }), LoraError::Spec(_)));
        assert!(matches!(bad(LoraSpec { targets: vec![Projection::Q, Projection::Q], ..spec() }), LoraError::Spec(_)));
        assert_eq!("gate".parse::<Projection>(), Ok(Projection::Gate));
        assert!("w1".parse::<Projection>().is_err());
    }
}
