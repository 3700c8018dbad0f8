//! A Llama-family causal LM (RMSNorm, grouped-query attention with rotate-half RoPE, SwiGLU,
//! optional QKV biases, tied or separate output head) over a Hugging Face state.
//!
//! Like the byte GPT, every product goes through `weft_model::gemm`, whose summation order per
//! output is fixed: the same weights and tokens give the same bits on any thread count.

use rayon::prelude::*;
use weft_core::{ModelState, StateError};
use weft_model::gemm::{gemm, gemm_serial, Lhs, Start};

use crate::config::{LlamaConfig, LlamaConfigError};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LlamaError {
    #[error(transparent)]
    Config(#[from] LlamaConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("token id {id} at position {position} is outside the vocabulary of {vocab}")]
    Token { id: u32, position: usize, vocab: usize },
    #[error("{len} tokens exceed the model's {max} positions")]
    Context { len: usize, max: usize },
    #[error("no tokens to run the model on")]
    Empty,
}

/// One transformer block. Projection weights are kept transposed (`[in, out]`): the products'
/// right operands then have the output columns contiguous, as `gemm` wants.
struct Block {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    q_t: Vec<f32>,
    k_t: Vec<f32>,
    v_t: Vec<f32>,
    qkv_bias: Option<[Vec<f32>; 3]>,
    o_t: Vec<f32>,
    gate_t: Vec<f32>,
    up_t: Vec<f32>,
    down_t: Vec<f32>,
}

pub struct Llama {
    config: LlamaConfig,
    /// The token embedding transposed, `[hidden, vocab]`: with tied embeddings it is the output
    /// head's right operand as it stands, and a token's embedding is a strided column of it.
    embed_t: Vec<f32>,
    /// `[hidden, vocab]`, only when the head is not tied to the embedding.
    lm_head_t: Option<Vec<f32>>,
    norm: Vec<f32>,
    blocks: Vec<Block>,
}

impl Llama {
    /// Builds the model from a state holding exactly the config's tensors.
    pub fn from_state(config: LlamaConfig, state: &ModelState) -> Result<Self, LlamaError> {
        config.validate()?;
        let shapes = config.tensor_shapes();
        for (name, shape) in &shapes {
            let tensor = state.get(name).ok_or_else(|| StateError::MissingTensor { name: name.clone() })?;
            if tensor.shape() != shape.as_slice() {
                return Err(StateError::Shape {
                    name: name.clone(),
                    expected: shape.clone(),
                    got: tensor.shape().to_vec(),
                }
                .into());
            }
        }
        if let Some(extra) = state.names().find(|n| !shapes.iter().any(|(s, _)| s == n)) {
            return Err(StateError::UnexpectedTensor { name: extra.to_string() }.into());
        }
        state.check_finite()?;
        // Shapes were checked above, so every lookup below succeeds.
        let get = |name: &str| state.get(name).map(|t| t.data()).unwrap_or(&[]);
        let transposed = |name: &str| {
            let t = state.get(name).map(|t| (t.shape()[0], t.shape()[1], t.data()));
            t.map(|(rows, cols, data)| transpose(data, rows, cols)).unwrap_or_default()
        };
        let blocks = (0..config.num_hidden_layers)
            .into_par_iter()
            .map(|layer| {
                let p = format!("model.layers.{layer}.");
                let attn = |part: &str| format!("{p}self_attn.{part}");
                Block {
                    attn_norm: get(&format!("{p}input_layernorm.weight")).to_vec(),
                    ffn_norm: get(&format!("{p}post_attention_layernorm.weight")).to_vec(),
                    q_t: transposed(&attn("q_proj.weight")),
                    k_t: transposed(&attn("k_proj.weight")),
                    v_t: transposed(&attn("v_proj.weight")),
                    qkv_bias: config.attention_bias.then(|| {
                        [attn("q_proj.bias"), attn("k_proj.bias"), attn("v_proj.bias")].map(|n| get(&n).to_vec())
                    }),
                    o_t: transposed(&attn("o_proj.weight")),
                    gate_t: transposed(&format!("{p}mlp.gate_proj.weight")),
                    up_t: transposed(&format!("{p}mlp.up_proj.weight")),
                    down_t: transposed(&format!("{p}mlp.down_proj.weight")),
                }
            })
            .collect();
        Ok(Self {
            embed_t: transposed("model.embed_tokens.weight"),
            lm_head_t: (!config.tie_word_embeddings).then(|| transposed("lm_head.weight")),
            norm: get("model.norm.weight").to_vec(),
            blocks,
            config,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), LlamaError> {
        if tokens.is_empty() {
            return Err(LlamaError::Empty);
        }
        if tokens.len() > self.config.max_position_embeddings {
            return Err(LlamaError::Context { len: tokens.len(), max: self.config.max_position_embeddings });
        }
        let vocab = self.config.vocab_size;
        if let Some((position, &id)) = tokens.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(LlamaError::Token { id, position, vocab });
        }
        Ok(())
    }

    /// The final hidden states `[T, hidden]`, after the last norm.
    fn hidden(&self, tokens: &[u32]) -> Result<Vec<f32>, LlamaError> {
        self.check_tokens(tokens)?;
        let c = &self.config;
        let (t, d, f, v) = (tokens.len(), c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q_width, kv_width) = (c.num_attention_heads * c.head_size(), c.kv_heads() * c.head_size());
        let rope = Rope::new(c.rope_theta, c.head_size(), t);
        let mut x = vec![0.0f32; t * d];
        for (row, &id) in x.chunks_exact_mut(d).zip(tokens) {
            for (j, value) in row.iter_mut().enumerate() {
                *value = self.embed_t[j * v + id as usize];
            }
        }
        let eps = c.rms_norm_eps as f32;
        let mut h = vec![0.0f32; t * d];
        let mut q = vec![0.0f32; t * q_width];
        let mut k = vec![0.0f32; t * kv_width];
        let mut val = vec![0.0f32; t * kv_width];
        let mut gate = vec![0.0f32; t * f];
        let mut up = vec![0.0f32; t * f];
        for block in &self.blocks {
            rms_norm(&mut h, &x, &block.attn_norm, eps);
            let rows = Lhs { data: &h, row_stride: d, k_stride: 1 };
            let bias = |i: usize| block.qkv_bias.as_ref().map_or(Start::Zero, |b| Start::Bias(&b[i]));
            gemm(&mut q, q_width, rows, &block.q_t, q_width, d, bias(0));
            gemm(&mut k, kv_width, rows, &block.k_t, kv_width, d, bias(1));
            gemm(&mut val, kv_width, rows, &block.v_t, kv_width, d, bias(2));
            rope.apply(&mut q, c.head_size());
            rope.apply(&mut k, c.head_size());
            let attended = attention(&q, &k, &val, t, c.num_attention_heads, c.kv_heads(), c.head_size());
            gemm(
                &mut x,
                d,
                Lhs { data: &attended, row_stride: q_width, k_stride: 1 },
                &block.o_t,
                d,
                q_width,
                Start::Accumulate,
            );

            rms_norm(&mut h, &x, &block.ffn_norm, eps);
            let rows = Lhs { data: &h, row_stride: d, k_stride: 1 };
            gemm(&mut gate, f, rows, &block.gate_t, f, d, Start::Zero);
            gemm(&mut up, f, rows, &block.up_t, f, d, Start::Zero);
            for (g, &u) in gate.iter_mut().zip(&up) {
                *g = silu(*g) * u;
            }
            gemm(&mut x, d, Lhs { data: &gate, row_stride: f, k_stride: 1 }, &block.down_t, d, f, Start::Accumulate);
        }
        rms_norm(&mut h, &x, &self.norm, eps);
        Ok(h)
    }

    /// Next-token logits `[rows, vocab]` for hidden states `[rows, hidden]`.
    fn head(&self, hidden: &[f32]) -> Vec<f32> {
        let (d, v) = (self.config.hidden_size, self.config.vocab_size);
        let mut logits = vec![0.0f32; hidden.len() / d * v];
        let head = self.lm_head_t.as_deref().unwrap_or(&self.embed_t);
        gemm(&mut logits, v, Lhs { data: hidden, row_stride: d, k_stride: 1 }, head, v, d, Start::Zero);
        logits
    }

    /// Next-token logits at every position, `[T, vocab]` row-major.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>, LlamaError> {
        Ok(self.head(&self.hidden(tokens)?))
    }

    /// Σ −ln p(token[i+1] | token[..=i]) over the sequence, in nats, and how many tokens were
    /// predicted (`len − 1`).
    pub fn nll(&self, tokens: &[u32]) -> Result<(f64, usize), LlamaError> {
        let v = self.config.vocab_size;
        let logits = self.logits(tokens)?;
        let total =
            logits.chunks_exact(v).zip(&tokens[1..]).map(|(row, &next)| -log_softmax_at(row, next as usize)).sum();
        Ok((total, tokens.len() - 1))
    }

    /// The `count` most likely next tokens, one at a time (ties go to the lower id).
    pub fn greedy(&self, prompt: &[u32], count: usize) -> Result<Vec<u32>, LlamaError> {
        let d = self.config.hidden_size;
        let mut tokens = prompt.to_vec();
        for _ in 0..count {
            let hidden = self.hidden(&tokens)?;
            let last = self.head(&hidden[hidden.len() - d..]);
            let (best, _) =
                last.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) });
            tokens.push(best as u32);
        }
        Ok(tokens[prompt.len()..].to_vec())
    }
}

/// `ln softmax(row)[index]`, accumulated in f64 in index order.
fn log_softmax_at(row: &[f32], index: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[index] as f64 - max - sum.ln()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `out = x / sqrt(mean(x²) + eps) · weight`, row by row.
fn rms_norm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for (o, row) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let mean_square = row.iter().map(|&v| v * v).sum::<f32>() / d as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = w * (v * scale);
        }
    }
}

/// Rotate-half rotary embeddings (Hugging Face's layout): dimension `i < hd/2` of a head pairs
/// with `i + hd/2`, at angle `position · θ^(−2i/hd)`, computed in f32 as `transformers` does.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    fn new(theta: f64, head: usize, positions: usize) -> Self {
        let half = head / 2;
        let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head as f32)).collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &freq in &inv_freq {
                let angle = p as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { cos, sin, half }
    }

    /// Rotates every head of `x` (`[T, heads·hd]`) in place.
    fn apply(&self, x: &mut [f32], head: usize) {
        let width = x.len() / (self.cos.len() / self.half);
        for (p, row) in x.chunks_exact_mut(width).enumerate() {
            let (cos, sin) = (&self.cos[p * self.half..][..self.half], &self.sin[p * self.half..][..self.half]);
            for h in row.chunks_exact_mut(head) {
                let (a, b) = h.split_at_mut(self.half);
                for i in 0..self.half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * cos[i] - x1 * sin[i];
                    b[i] = x1 * cos[i] + x0 * sin[i];
                }
            }
        }
    }
}

/// Causal grouped-query attention: query head `h` reads key/value head `h / (heads / kv_heads)`.
/// Returns `[T, heads·hd]`.
fn attention(q: &[f32], k: &[f32], v: &[f32], t: usize, heads: usize, kv_heads: usize, hd: usize) -> Vec<f32> {
    let (q_width, kv_width) = (heads * hd, kv_heads * hd);
    let group = heads / kv_heads;
    // Kᵀ per key/value head, `[hd, T]`, the scores' right operand.
    let keys_t: Vec<Vec<f32>> = (0..kv_heads)
        .map(|g| {
            let mut kt = vec![0.0f32; hd * t];
            for s in 0..t {
                for j in 0..hd {
                    kt[j * t + s] = k[s * kv_width + g * hd + j];
                }
            }
            kt
        })
        .collect();
    let scale = 1.0 / (hd as f32).sqrt();
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let mut scores = vec![0.0f32; t * t];
            gemm_serial(
                &mut scores,
                t,
                t,
                t,
                Lhs { data: &q[h * hd..], row_stride: q_width, k_stride: 1 },
                &keys_t[g],
                t,
                hd,
                Start::Zero,
            );
            for (r, row) in scores.chunks_exact_mut(t).enumerate() {
                let (visible, future) = row.split_at_mut(r + 1);
                let max = visible.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
                let mut sum = 0.0f32;
                for s in visible.iter_mut() {
                    *s = (*s * scale - max).exp();
                    sum += *s;
                }
                for s in visible.iter_mut() {
                    *s /= sum;
                }
                future.fill(0.0);
            }
            let mut out = vec![0.0f32; t * hd];
            gemm_serial(
                &mut out,
                hd,
                t,
                hd,
                Lhs { data: &scores, row_stride: t, k_stride: 1 },
                &v[g * hd..],
                kv_width,
                t,
                Start::Zero,
            );
            out
        })
        .collect();
    let mut attended = vec![0.0f32; t * q_width];
    for (h, out) in per_head.iter().enumerate() {
        for (s, row) in out.chunks_exact(hd).enumerate() {
            attended[s * q_width + h * hd..][..hd].copy_from_slice(row);
        }
    }
    attended
}

/// `[rows, cols]` → `[cols, rows]`, in 16 × 16 tiles so neither side is walked a row apart per
/// element.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * cols];
    for r0 in (0..rows).step_by(16) {
        for c0 in (0..cols).step_by(16) {
            for r in r0..(r0 + 16).min(rows) {
                for c in c0..(c0 + 16).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use weft_core::Tensor;
    use weft_model::SplitMix64;

    pub(crate) fn tiny_config(tied: bool, bias: bool) -> LlamaConfig {
        LlamaConfig::from_json(&format!(
            r#"{{"vocab_size":37,"hidden_size":24,"intermediate_size":40,"num_hidden_layers":2,
                "num_attention_heads":6,"num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,
                "max_position_embeddings":64,"tie_word_embeddings":{tied},"attention_bias":{bias}}}"#
        ))
        .unwrap()
    }

    pub(crate) fn random_state(config: &LlamaConfig, seed: u64) -> ModelState {
        let mut rng = SplitMix64::new(seed);
        let mut state = ModelState::new();
        for (name, shape) in config.tensor_shapes() {
            let n: usize = shape.iter().product();
            let values = if name.ends_with("norm.weight") {
                (0..n).map(|_| 1.0 + 0.1 * rng.normal() as f32).collect()
            } else {
                (0..n).map(|_| 0.2 * rng.normal() as f32).collect()
            };
            state.insert(name, Tensor::new(shape, values).unwrap());
        }
        state
    }

    /// The definition, written plainly (f64, no blocking): what the fast path must agree with.
    fn reference_logits(config: &LlamaConfig, state: &ModelState, tokens: &[u32]) -> Vec<f64> {
        let w = |n: &str| state.get(n).unwrap().data().iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let (t, d, f, v) = (tokens.len(), config.hidden_size, config.intermediate_size, config.vocab_size);
        let (heads, kvh, hd) = (config.num_attention_heads, config.kv_heads(), config.head_size());
        let linear = |x: &[f64], w: &[f64], b: Option<&[f64]>, out: usize, inp: usize| {
            let mut y = vec![0.0; t * out];
            for s in 0..t {
                for o in 0..out {
                    y[s * out + o] =
                        b.map_or(0.0, |b| b[o]) + (0..inp).map(|i| x[s * inp + i] * w[o * inp + i]).sum::<f64>();
                }
            }
            y
        };
        let norm = |x: &[f64], w: &[f64]| {
            let mut y = x.to_vec();
            for s in 0..t {
                let ms = (0..d).map(|i| x[s * d + i] * x[s * d + i]).sum::<f64>() / d as f64;
                for i in 0..d {
                    y[s * d + i] = x[s * d + i] / (ms + config.rms_norm_eps).sqrt() * w[i];
                }
            }
            y
        };
        let rope = |x: &mut [f64], nh: usize| {
            for s in 0..t {
                for h in 0..nh {
                    for i in 0..hd / 2 {
                        let angle = s as f64 * config.rope_theta.powf(-((2 * i) as f64) / hd as f64);
                        let base = s * nh * hd + h * hd;
                        let (x0, x1) = (x[base + i], x[base + i + hd / 2]);
                        x[base + i] = x0 * angle.cos() - x1 * angle.sin();
                        x[base + i + hd / 2] = x1 * angle.cos() + x0 * angle.sin();
                    }
                }
            }
        };
        let embed = w("model.embed_tokens.weight");
        let mut x: Vec<f64> = tokens.iter().flat_map(|&id| embed[id as usize * d..][..d].to_vec()).collect();
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            let h = norm(&x, &w(&format!("{p}input_layernorm.weight")));
            let bias = |n: &str| config.attention_bias.then(|| w(&format!("{p}self_attn.{n}_proj.bias")));
            let mut q = linear(&h, &w(&format!("{p}self_attn.q_proj.weight")), bias("q").as_deref(), heads * hd, d);
            let mut k = linear(&h, &w(&format!("{p}self_attn.k_proj.weight")), bias("k").as_deref(), kvh * hd, d);
            let vv = linear(&h, &w(&format!("{p}self_attn.v_proj.weight")), bias("v").as_deref(), kvh * hd, d);
            rope(&mut q, heads);
            rope(&mut k, kvh);
            let mut att = vec![0.0; t * heads * hd];
            for hh in 0..heads {
                let g = hh / (heads / kvh);
                for s in 0..t {
                    let scores: Vec<f64> = (0..=s)
                        .map(|r| {
                            (0..hd).map(|j| q[s * heads * hd + hh * hd + j] * k[r * kvh * hd + g * hd + j]).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    for j in 0..hd {
                        att[s * heads * hd + hh * hd + j] =
                            (0..=s).map(|r| (scores[r] - max).exp() / z * vv[r * kvh * hd + g * hd + j]).sum::<f64>();
                    }
                }
            }
            let o = linear(&att, &w(&format!("{p}self_attn.o_proj.weight")), None, d, heads * hd);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h = norm(&x, &w(&format!("{p}post_attention_layernorm.weight")));
            let g = linear(&h, &w(&format!("{p}mlp.gate_proj.weight")), None, f, d);
            let u = linear(&h, &w(&format!("{p}mlp.up_proj.weight")), None, f, d);
            let a: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let down = linear(&a, &w(&format!("{p}mlp.down_proj.weight")), None, d, f);
            x.iter_mut().zip(&down).for_each(|(x, o)| *x += o);
        }
        let h = norm(&x, &w("model.norm.weight"));
        let head = if config.tie_word_embeddings { embed } else { w("lm_head.weight") };
        linear(&h, &head, None, v, d)
    }

    #[test]
    fn forward_matches_the_definition() {
        for (tied, bias) in [(true, false), (false, true)] {
            let config = tiny_config(tied, bias);
            let state = random_state(&config, 7);
            let model = Llama::from_state(config.clone(), &state).unwrap();
            let tokens: Vec<u32> = (0..19).map(|i| (i * 7 + 3) % 37).collect();
            let fast = model.logits(&tokens).unwrap();
            let reference = reference_logits(&config, &state, &tokens);
            let worst = fast.iter().zip(&reference).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-4, "tied={tied} bias={bias}: max |Δlogit| = {worst}");
        }
    }

    #[test]
    fn forward_is_bitwise_reproducible_across_thread_counts() {
        let config = tiny_config(true, false);
        let state = random_state(&config, 3);
        let model = Llama::from_state(config, &state).unwrap();
        let tokens: Vec<u32> = (0..50).map(|i| (i * 11 + 1) % 37).collect();
        let one =
            rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| model.logits(&tokens).unwrap());
        let three =
            rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(|| model.logits(&tokens).unwrap());
        assert!(one.iter().zip(&three).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn refuses_bad_tokens_and_states() {
        let config = tiny_config(true, false);
        let state = random_state(&config, 1);
        let model = Llama::from_state(config.clone(), &state).unwrap();
        assert_eq!(model.logits(&[1, 37]).unwrap_err(), LlamaError::Token { id: 37, position: 1, vocab: 37 });
        assert_eq!(model.logits(&[]).unwrap_err(), LlamaError::Empty);
        assert_eq!(model.logits(&[0; 65]).unwrap_err(), LlamaError::Context { len: 65, max: 64 });
        let mut missing = state.clone();
        missing.remove("model.norm.weight");
        assert!(matches!(
            Llama::from_state(config.clone(), &missing),
            Err(LlamaError::State(StateError::MissingTensor { .. }))
        ));
        let mut extra = state.clone();
        extra.insert("lm_head.weight", Tensor::zeros(vec![37, 24]));
        assert!(matches!(
            Llama::from_state(config.clone(), &extra),
            Err(LlamaError::State(StateError::UnexpectedTensor { .. }))
        ));
        let mut nan = state;
        nan.get_mut("model.norm.weight").unwrap().data_mut()[3] = f32::NAN;
        assert!(matches!(Llama::from_state(config, &nan), Err(LlamaError::State(StateError::NonFinite { .. }))));
    }
}
