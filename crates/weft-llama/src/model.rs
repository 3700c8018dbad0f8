//! A Llama-family causal LM (RMSNorm, grouped-query attention with rotate-half RoPE, SwiGLU,
//! optional QKV biases, tied or separate output head) over a Hugging Face state.
//!
//! Like the byte GPT, every product goes through `weft_model::gemm`, whose summation order per
//! output is fixed: the same weights and tokens give the same bits on any thread count.

use rayon::prelude::*;
use weft_core::{ModelState, StateError};
use weft_model::gemm::{gemm_serial, gemm_transposed_rhs, Lhs, Start};

use crate::config::{LlamaConfig, LlamaConfigError};
use crate::lora::{Adapters, Projection};

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
    #[error("DP-SGD: {0}")]
    Privacy(String),
}

/// One transformer block. Projection weights are kept as Hugging Face stores them, `[out, in]`:
/// the forward pass reads them as a transposed right operand (`x·Wᵀ`), the input gradient as
/// they are (`dy·W`), so loading transposes nothing.
pub(crate) struct Block {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    pub o: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub down: Vec<f32>,
}

/// What the backward pass needs of one block's forward pass.
pub(crate) struct BlockCache {
    pub x_in: Vec<f32>,
    /// The attention norm's output (the projections' input).
    pub h1: Vec<f32>,
    /// Queries and keys after RoPE, values.
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Softmax probabilities per sequence and head, `[T, T]` each.
    pub probs: Vec<Vec<Vec<f32>>>,
    pub attended: Vec<f32>,
    pub x_mid: Vec<f32>,
    /// The FFN norm's output.
    pub h2: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub act: Vec<f32>,
    pub lora: LoraActivations,
}

/// `s·x·Aᵀ` of every adapted projection of a block.
#[derive(Default)]
pub(crate) struct LoraActivations([Option<Vec<f32>>; 7]);

impl LoraActivations {
    fn set(&mut self, projection: Projection, z: Option<Vec<f32>>) {
        self.0[projection as usize] = z;
    }

    pub(crate) fn get(&self, projection: Projection) -> Option<&[f32]> {
        self.0[projection as usize].as_deref()
    }
}

/// Sequences stacked row after row. The projections run on all rows at once (each weight is
/// read once per pass, and the products see more rows per packed panel); RoPE and attention run
/// per sequence on its own rows. Each row's arithmetic is the same as for its sequence alone.
pub(crate) struct Stack {
    spans: Vec<std::ops::Range<usize>>,
}

impl Stack {
    pub(crate) fn of(sequences: &[&[u32]]) -> Self {
        let mut start = 0;
        let spans = sequences
            .iter()
            .map(|s| {
                start += s.len();
                start - s.len()..start
            })
            .collect();
        Self { spans }
    }

    pub(crate) fn rows(&self) -> usize {
        self.spans.last().map_or(0, |span| span.end)
    }

    pub(crate) fn longest(&self) -> usize {
        self.spans.iter().map(|span| span.len()).max().unwrap_or(0)
    }

    /// Each sequence's rows.
    pub(crate) fn spans(&self) -> &[std::ops::Range<usize>] {
        &self.spans
    }
}

/// Sequences grouped so that one forward pass holds at most about this many rows (a group has at
/// least one sequence): the rows of the products, and the memory of the logits and of the
/// backward pass's cache, both grow with it.
pub(crate) const ROWS_PER_PASS: usize = 256;

/// Consecutive groups of `sequences` of at most [`ROWS_PER_PASS`] rows each (one sequence longer
/// than that is a group of its own).
pub(crate) fn passes<'a, 's>(sequences: &'a [&'s [u32]]) -> impl Iterator<Item = &'a [&'s [u32]]> {
    let mut rest = sequences;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut rows = rest[0].len();
        let mut count = 1;
        while count < rest.len() && rows + rest[count].len() <= ROWS_PER_PASS {
            rows += rest[count].len();
            count += 1;
        }
        let (group, tail) = rest.split_at(count);
        rest = tail;
        Some(group)
    })
}

#[derive(Default)]
pub(crate) struct ForwardCache {
    pub blocks: Vec<BlockCache>,
    /// The residual stream before the final norm.
    pub x_out: Vec<f32>,
}

pub struct Llama {
    config: LlamaConfig,
    /// The token embedding, `[vocab, hidden]`; with tied embeddings also the output head. Read
    /// transposed by the head, each packed panel of it is whole rows: memory read in order.
    embed: Vec<f32>,
    /// `[vocab, hidden]`, only when the head is not tied to the embedding.
    lm_head: Option<Vec<f32>>,
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
        let weight = |name: &str| get(name).to_vec();
        let blocks = (0..config.num_hidden_layers)
            .into_par_iter()
            .map(|layer| {
                let p = format!("model.layers.{layer}.");
                let attn = |part: &str| format!("{p}self_attn.{part}");
                Block {
                    attn_norm: get(&format!("{p}input_layernorm.weight")).to_vec(),
                    ffn_norm: get(&format!("{p}post_attention_layernorm.weight")).to_vec(),
                    q: weight(&attn("q_proj.weight")),
                    k: weight(&attn("k_proj.weight")),
                    v: weight(&attn("v_proj.weight")),
                    qkv_bias: config.attention_bias.then(|| {
                        [attn("q_proj.bias"), attn("k_proj.bias"), attn("v_proj.bias")].map(|n| get(&n).to_vec())
                    }),
                    o: weight(&attn("o_proj.weight")),
                    gate: weight(&format!("{p}mlp.gate_proj.weight")),
                    up: weight(&format!("{p}mlp.up_proj.weight")),
                    down: weight(&format!("{p}mlp.down_proj.weight")),
                }
            })
            .collect();
        Ok(Self {
            embed: weight("model.embed_tokens.weight"),
            lm_head: (!config.tie_word_embeddings).then(|| weight("lm_head.weight")),
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
        self.forward(&[tokens], None, None)
    }

    /// The forward pass of `sequences` stacked row after row ([`Stack`]), with adapters when
    /// given, keeping what the backward pass needs in `cache` when given. One code path for
    /// evaluation and training. Returns the final hidden states `[rows, hidden]`.
    pub(crate) fn forward(
        &self,
        sequences: &[&[u32]],
        adapters: Option<&Adapters>,
        mut cache: Option<&mut ForwardCache>,
    ) -> Result<Vec<f32>, LlamaError> {
        if sequences.is_empty() {
            return Err(LlamaError::Empty);
        }
        for tokens in sequences {
            self.check_tokens(tokens)?;
        }
        let stack = Stack::of(sequences);
        let c = &self.config;
        let (t, d, f) = (stack.rows(), c.hidden_size, c.intermediate_size);
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.kv_heads(), c.head_size());
        let (q_width, kv_width) = (heads * hd, kv_heads * hd);
        let rope = Rope::new(c.rope_theta, hd, stack.longest());
        let mut x = vec![0.0f32; t * d];
        for (row, &id) in x.chunks_exact_mut(d).zip(sequences.iter().flat_map(|s| s.iter())) {
            row.copy_from_slice(&self.embed[id as usize * d..][..d]);
        }
        let eps = c.rms_norm_eps as f32;
        let mut h = vec![0.0f32; t * d];
        let mut q = vec![0.0f32; t * q_width];
        let mut k = vec![0.0f32; t * kv_width];
        let mut val = vec![0.0f32; t * kv_width];
        let mut gate = vec![0.0f32; t * f];
        let mut up = vec![0.0f32; t * f];
        let mut act = vec![0.0f32; t * f];
        if let Some(cache) = cache.as_deref_mut() {
            cache.blocks.clear();
        }
        for (layer, block) in self.blocks.iter().enumerate() {
            let adapter = |p: Projection| {
                adapters.and_then(|ad| ad.factor(layer, p).map(|(a, b)| AdapterView { a, b, scale: ad.spec().scale() }))
            };
            let mut lora = LoraActivations::default();
            let x_in = cache.is_some().then(|| x.clone());
            rms_norm(&mut h, &x, &block.attn_norm, eps);
            let bias = |i: usize| block.qkv_bias.as_ref().map(|b| b[i].as_slice());
            lora.set(Projection::Q, project(&mut q, q_width, &h, d, &block.q, bias(0), adapter(Projection::Q)));
            lora.set(Projection::K, project(&mut k, kv_width, &h, d, &block.k, bias(1), adapter(Projection::K)));
            lora.set(Projection::V, project(&mut val, kv_width, &h, d, &block.v, bias(2), adapter(Projection::V)));
            for span in stack.spans() {
                rope.apply(&mut q[span.start * q_width..span.end * q_width], q_width, hd);
                rope.apply(&mut k[span.start * kv_width..span.end * kv_width], kv_width, hd);
            }
            // Sequences in parallel (and each one's heads), placed in order.
            let per_sequence: Vec<(Vec<f32>, Vec<Vec<f32>>)> = stack
                .spans()
                .par_iter()
                .map(|span| {
                    let (q_rows, kv_rows) =
                        (span.start * q_width..span.end * q_width, span.start * kv_width..span.end * kv_width);
                    attention(&q[q_rows], &k[kv_rows.clone()], &val[kv_rows], span.len(), heads, kv_heads, hd)
                })
                .collect();
            let mut attended = Vec::with_capacity(t * q_width);
            let mut probs = Vec::with_capacity(stack.spans().len());
            for (out, p) in per_sequence {
                attended.extend_from_slice(&out);
                probs.push(p);
            }
            let mut attn_out = vec![0.0f32; t * d];
            lora.set(
                Projection::O,
                project(&mut attn_out, d, &attended, q_width, &block.o, None, adapter(Projection::O)),
            );
            let h1 = cache.is_some().then(|| h.clone());
            x.iter_mut().zip(&attn_out).for_each(|(x, a)| *x += a);
            let x_mid = cache.is_some().then(|| x.clone());

            rms_norm(&mut h, &x, &block.ffn_norm, eps);
            lora.set(Projection::Gate, project(&mut gate, f, &h, d, &block.gate, None, adapter(Projection::Gate)));
            lora.set(Projection::Up, project(&mut up, f, &h, d, &block.up, None, adapter(Projection::Up)));
            let rows = act.par_chunks_exact_mut(f).zip(gate.par_chunks_exact(f)).zip(up.par_chunks_exact(f));
            rows.with_min_len(ROWS_PER_TASK).for_each(|((act, gate), up)| {
                for ((a, &g), &u) in act.iter_mut().zip(gate).zip(up) {
                    *a = silu(g) * u;
                }
            });
            let mut ffn_out = vec![0.0f32; t * d];
            lora.set(Projection::Down, project(&mut ffn_out, d, &act, f, &block.down, None, adapter(Projection::Down)));
            x.iter_mut().zip(&ffn_out).for_each(|(x, a)| *x += a);
            if let Some(cache) = cache.as_deref_mut() {
                cache.blocks.push(BlockCache {
                    x_in: x_in.unwrap_or_default(),
                    h1: h1.unwrap_or_default(),
                    q: q.clone(),
                    k: k.clone(),
                    v: val.clone(),
                    probs,
                    attended,
                    x_mid: x_mid.unwrap_or_default(),
                    h2: h.clone(),
                    gate: gate.clone(),
                    up: up.clone(),
                    act: act.clone(),
                    lora,
                });
            }
        }
        if let Some(cache) = cache {
            cache.x_out = x.clone();
        }
        rms_norm(&mut h, &x, &self.norm, eps);
        Ok(h)
    }

    pub(crate) fn block(&self, layer: usize) -> &Block {
        &self.blocks[layer]
    }

    pub(crate) fn final_norm(&self) -> &[f32] {
        &self.norm
    }

    /// The output head, `[vocab, hidden]`.
    pub(crate) fn head_weight(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    /// Next-token logits `[rows, vocab]` for hidden states `[rows, hidden]`.
    pub(crate) fn head(&self, hidden: &[f32]) -> Vec<f32> {
        let (d, v) = (self.config.hidden_size, self.config.vocab_size);
        let mut logits = vec![0.0f32; hidden.len() / d * v];
        let rows = Lhs { data: hidden, row_stride: d, k_stride: 1 };
        gemm_transposed_rhs(&mut logits, v, rows, self.head_weight(), d, d, Start::Zero);
        logits
    }

    /// Next-token logits at every position, `[T, vocab]` row-major.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>, LlamaError> {
        Ok(self.head(&self.hidden(tokens)?))
    }

    /// Σ −ln p(token[i+1] | token[..=i]) over the sequence, in nats, and how many tokens were
    /// predicted (`len − 1`).
    pub fn nll(&self, tokens: &[u32]) -> Result<(f64, usize), LlamaError> {
        self.nll_adapted(tokens, None)
    }

    /// [`nll`](Self::nll) of the base with `adapters` applied.
    pub fn nll_adapted(&self, tokens: &[u32], adapters: Option<&Adapters>) -> Result<(f64, usize), LlamaError> {
        let mut per_sequence = self.nll_pass(&[tokens], adapters)?;
        Ok(per_sequence.pop().unwrap_or((0.0, 0)))
    }

    /// (nats, tokens predicted) of each sequence, from one stacked forward pass.
    fn nll_pass(&self, sequences: &[&[u32]], adapters: Option<&Adapters>) -> Result<Vec<(f64, usize)>, LlamaError> {
        let v = self.config.vocab_size;
        let logits = self.head(&self.forward(sequences, adapters, None)?);
        // Each row's next token; a sequence's last row predicts nothing.
        let next: Vec<Option<u32>> =
            sequences.iter().flat_map(|s| s.iter().skip(1).map(|&id| Some(id)).chain([None])).collect();
        // Rows in parallel, summed in order per sequence: the same bits on any thread count.
        let per_row: Vec<f64> = logits
            .par_chunks_exact(v)
            .zip(&next)
            .map(|(row, next)| next.map_or(0.0, |id| -log_softmax_at(row, id as usize)))
            .collect();
        Ok(Stack::of(sequences)
            .spans()
            .iter()
            .map(|span| (per_row[span.start..span.end - 1].iter().sum(), span.len() - 1))
            .collect())
    }

    /// The loss of a long text in windows of `context` tokens that share one token, so that every
    /// token but the first is predicted exactly once: (nats, tokens predicted).
    pub fn score(
        &self,
        tokens: &[u32],
        adapters: Option<&Adapters>,
        context: usize,
    ) -> Result<(f64, usize), LlamaError> {
        let context = context.clamp(2, self.config.max_position_embeddings);
        let windows: Vec<&[u32]> = (0..tokens.len().saturating_sub(1))
            .step_by(context - 1)
            .map(|start| &tokens[start..(start + context).min(tokens.len())])
            .collect();
        let (mut nats, mut predicted) = (0.0, 0);
        for (sum, count) in self.nll_sequences(&windows, adapters)? {
            nats += sum;
            predicted += count;
        }
        Ok((nats, predicted))
    }

    /// [`nll_adapted`](Self::nll_adapted) of each sequence, in stacked passes of up to
    /// 256 rows (memory holds one pass's logits, not all).
    pub fn nll_sequences(
        &self,
        sequences: &[&[u32]],
        adapters: Option<&Adapters>,
    ) -> Result<Vec<(f64, usize)>, LlamaError> {
        // On a thread of the pool, as training does (`lora_loss_and_grads`).
        rayon::scope(|_| {
            let mut out = Vec::with_capacity(sequences.len());
            for group in passes(sequences) {
                out.extend(self.nll_pass(group, adapters)?);
            }
            Ok(out)
        })
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

pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `out = x / sqrt(mean(x²) + eps) · weight`, row by row.
fn rms_norm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    // Rows in parallel: each row's arithmetic is its own, so threads change no bit.
    out.par_chunks_exact_mut(d).zip(x.par_chunks_exact(d)).with_min_len(ROWS_PER_TASK).for_each(|(o, row)| {
        let mean_square = row.iter().map(|&v| v * v).sum::<f32>() / d as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = w * (v * scale);
        }
    });
}

/// Fewest rows per parallel task of the row-wise steps (norms, activations).
pub(crate) const ROWS_PER_TASK: usize = 16;

/// `dx += ∂/∂x` of `rms_norm` given `dy`: with `r = 1/√(mean(x²) + ε)` and `g = w·dy`,
/// `dx = r·g − x·r³·(g·x)/d`.
pub(crate) fn rms_norm_backward(dx: &mut [f32], dy: &[f32], x: &[f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    let rows = dx.par_chunks_exact_mut(d).zip(dy.par_chunks_exact(d)).zip(x.par_chunks_exact(d));
    rows.with_min_len(ROWS_PER_TASK).for_each(|((dx, dy), x)| {
        let mean_square = x.iter().map(|&v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (mean_square + eps).sqrt();
        let gx: f32 = dy.iter().zip(weight).zip(x).map(|((&g, &w), &v)| g * w * v).sum();
        let coefficient = r * r * r * gx / d as f32;
        for (((dx, &g), &w), &v) in dx.iter_mut().zip(dy).zip(weight).zip(x) {
            *dx += r * w * g - v * coefficient;
        }
    });
}

/// Rotate-half rotary embeddings (Hugging Face's layout): dimension `i < hd/2` of a head pairs
/// with `i + hd/2`, at angle `position · θ^(−2i/hd)`, computed in f32 as `transformers` does.
pub(crate) struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    pub(crate) fn new(theta: f64, head: usize, positions: usize) -> Self {
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

    /// Rotates every head of `x` (one sequence's rows, `width = heads·hd` apart; row `p` at
    /// position `p`) in place.
    pub(crate) fn apply(&self, x: &mut [f32], width: usize, head: usize) {
        self.rotate(x, width, head, 1.0);
    }

    /// The inverse (and transpose) rotation: carries a gradient back through [`apply`](Self::apply).
    pub(crate) fn apply_inverse(&self, x: &mut [f32], width: usize, head: usize) {
        self.rotate(x, width, head, -1.0);
    }

    fn rotate(&self, x: &mut [f32], width: usize, head: usize, direction: f32) {
        for (p, row) in x.chunks_exact_mut(width).enumerate() {
            let (cos, sin) = (&self.cos[p * self.half..][..self.half], &self.sin[p * self.half..][..self.half]);
            for h in row.chunks_exact_mut(head) {
                let (a, b) = h.split_at_mut(self.half);
                for i in 0..self.half {
                    let (x0, x1) = (a[i], b[i]);
                    let sin = direction * sin[i];
                    a[i] = x0 * cos[i] - x1 * sin;
                    b[i] = x1 * cos[i] + x0 * sin;
                }
            }
        }
    }
}

/// Causal grouped-query attention: query head `h` reads key/value head `h / (heads / kv_heads)`.
/// Returns `[T, heads·hd]`.
fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
) -> (Vec<f32>, Vec<Vec<f32>>) {
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
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..heads)
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
            (out, scores)
        })
        .collect();
    let mut attended = vec![0.0f32; t * q_width];
    let mut probs = Vec::with_capacity(heads);
    for (h, (out, p)) in per_head.into_iter().enumerate() {
        for (s, row) in out.chunks_exact(hd).enumerate() {
            attended[s * q_width + h * hd..][..hd].copy_from_slice(row);
        }
        probs.push(p);
    }
    (attended, probs)
}

/// One projection's adapter factors and scale, as the forward pass reads them.
#[derive(Clone, Copy)]
struct AdapterView<'a> {
    a: &'a [f32],
    b: &'a [f32],
    scale: f32,
}

/// `y = x·Wᵀ (+ bias)` for `x` `[T, in]`, `y` `[T, out]` and `w` `[out, in]`, plus
/// `s·(x·Aᵀ)·Bᵀ` when the projection carries an adapter; returns `s·x·Aᵀ` `[T, rank]` for the
/// backward pass.
fn project(
    y: &mut [f32],
    out: usize,
    x: &[f32],
    inp: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    adapter: Option<AdapterView<'_>>,
) -> Option<Vec<f32>> {
    let rows = Lhs { data: x, row_stride: inp, k_stride: 1 };
    gemm_transposed_rhs(y, out, rows, w, inp, inp, bias.map_or(Start::Zero, Start::Bias));
    let AdapterView { a, b, scale } = adapter?;
    let rank = a.len() / inp;
    let t = x.len() / inp;
    // z = s·x·Aᵀ: the right operand is Aᵀ, `a` [rank, in] read transposed.
    let mut z = vec![0.0f32; t * rank];
    gemm_transposed_rhs(&mut z, rank, rows, a, inp, inp, Start::Zero);
    z.iter_mut().for_each(|v| *v *= scale);
    // y += z·Bᵀ, `b` [out, rank] read transposed.
    gemm_transposed_rhs(y, out, Lhs { data: &z, row_stride: rank, k_stride: 1 }, b, rank, rank, Start::Accumulate);
    Some(z)
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
    fn stacked_evaluation_gives_each_sequence_its_own_bits() {
        let config = tiny_config(false, true);
        let model = Llama::from_state(config.clone(), &random_state(&config, 6)).unwrap();
        // Lengths from 1 (nothing to predict) to the model's 64 positions, more rows than a pass.
        let batch: Vec<Vec<u32>> = [1usize, 64, 17, 2, 64, 64, 64, 33]
            .iter()
            .map(|&n| (0..n).map(|i| ((i * 13 + n) % 37) as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        assert!(passes(&refs).count() > 1);
        let stacked = model.nll_sequences(&refs, None).unwrap();
        let alone: Vec<(f64, usize)> = refs.iter().map(|s| model.nll(s).unwrap()).collect();
        let bits = |v: &[(f64, usize)]| v.iter().map(|&(n, c)| (n.to_bits(), c)).collect::<Vec<_>>();
        assert_eq!(bits(&stacked), bits(&alone));
        assert_eq!(stacked[0], (0.0, 0));
        // The hidden states of a sequence alone are the same bits as its rows in a stack.
        let hidden = model.forward(&refs[1..3], None, None).unwrap();
        let d = config.hidden_size;
        let second_alone = model.forward(&refs[2..3], None, None).unwrap();
        assert_eq!(
            hidden[64 * d..].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            second_alone.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn passes_hold_whole_sequences_in_order() {
        let lengths = [100usize, 100, 100, 300, 10, 256, 1];
        let batch: Vec<Vec<u32>> = lengths.iter().map(|&n| vec![0; n]).collect();
        let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        let groups: Vec<Vec<usize>> = passes(&refs).map(|g| g.iter().map(|s| s.len()).collect()).collect();
        assert_eq!(groups, vec![vec![100, 100], vec![100], vec![300], vec![10], vec![256], vec![1]]);
        assert_eq!(passes(&[]).count(), 0);
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
