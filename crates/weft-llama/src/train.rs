//! LoRA training on a frozen Llama: the loss's gradient with respect to the adapters only (the
//! base's weights get none, so none is stored), and AdamW over the adapters' flat parameters.
//!
//! Every product is a `gemm` with one summation order, and sequences and heads are summed in a
//! fixed order, so a step gives the same bits on any thread count.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use weft_model::gemm::{gemm, Lhs, Start};
use weft_model::SplitMix64;

use crate::lora::{Adapters, Projection};
use crate::model::{passes, rms_norm_backward, silu, ForwardCache, Llama, LlamaError, Rope, Stack, ROWS_PER_TASK};

impl Llama {
    /// Mean next-token loss (nats per predicted token) over `sequences`, and its gradient with
    /// respect to the adapters, in the adapters' layout. With `train_a` false the `A` gradients
    /// are left at zero (the shared track trains `B` only).
    ///
    /// Sequences run stacked, in passes of up to `ROWS_PER_PASS` (256) rows (memory holds one pass's
    /// cache, not the whole batch's). Every gradient sums its terms in sequence and position
    /// order whatever the passes, so a step gives the same bits on any thread count.
    pub fn lora_loss_and_grads(
        &self,
        adapters: &Adapters,
        sequences: &[&[u32]],
        train_a: bool,
    ) -> Result<(f64, Adapters), LlamaError> {
        let predicted: usize = sequences.iter().map(|s| s.len().saturating_sub(1)).sum();
        if predicted == 0 {
            return Err(LlamaError::Empty);
        }
        // On a thread of the pool, so that the products and row-wise steps inside start their
        // tasks there instead of each handing work over from outside (thousands per step).
        rayon::scope(|_| {
            let mut grads = adapters.zeros_like();
            let mut total = 0.0f64;
            for group in passes(sequences) {
                for loss in self.pass_backward(adapters, group, 1.0 / predicted as f32, train_a, &mut grads)? {
                    total += loss;
                }
            }
            Ok((total / predicted as f64, grads))
        })
    }

    /// One stacked pass's forward and backward; adds `weight ×` its loss gradient to `grads` and
    /// returns each sequence's summed loss in nats.
    fn pass_backward(
        &self,
        adapters: &Adapters,
        sequences: &[&[u32]],
        weight: f32,
        train_a: bool,
        grads: &mut Adapters,
    ) -> Result<Vec<f64>, LlamaError> {
        let stack = Stack::of(sequences);
        let c = self.config();
        let (t, d, f, v) = (stack.rows(), c.hidden_size, c.intermediate_size, c.vocab_size);
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.kv_heads(), c.head_size());
        let (q_width, kv_width) = (heads * hd, kv_heads * hd);
        let eps = c.rms_norm_eps as f32;
        let mut cache = ForwardCache::default();
        let hidden = self.forward(sequences, Some(adapters), Some(&mut cache))?;

        // The head: logits = hidden · headᵀ; dlogits = weight · (softmax − one-hot) on every
        // position that predicts a next token. The logits become their own gradient row by row
        // (a 25 MB buffer per 128 rows for SmolLM2's vocabulary, not allocated twice).
        let mut dlogits = self.head(&hidden);
        // Each row's next token; a sequence's last row predicts nothing.
        let next: Vec<Option<u32>> =
            sequences.iter().flat_map(|s| s.iter().skip(1).map(|&id| Some(id)).chain([None])).collect();
        // Rows in parallel (each on its own), their losses summed in order per sequence
        // afterwards: the same bits on any thread count. Each task keeps one row of
        // exponentials, computed once for the sum and the probabilities.
        let per_row: Vec<f64> = dlogits
            .par_chunks_exact_mut(v)
            .zip(&next)
            .map_init(Vec::new, |exps: &mut Vec<f64>, (row, next)| {
                let Some(next) = next.map(|id| id as usize) else {
                    row.fill(0.0);
                    return 0.0;
                };
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                exps.clear();
                exps.extend(row.iter().map(|&x| ((x - max) as f64).exp()));
                let sum: f64 = exps.iter().sum();
                let loss = sum.ln() - (row[next] - max) as f64;
                for (x, &e) in row.iter_mut().zip(exps.iter()) {
                    *x = (e / sum) as f32 * weight;
                }
                row[next] -= weight;
                loss
            })
            .collect();
        let losses: Vec<f64> =
            stack.spans().iter().map(|span| per_row[span.start..span.end - 1].iter().sum()).collect();
        let mut dhidden = vec![0.0f32; t * d];
        input_grad(&mut dhidden, &dlogits, self.head_weight(), d, v);
        drop(dlogits);
        let mut dx = vec![0.0f32; t * d];
        rms_norm_backward(&mut dx, &dhidden, &cache.x_out, self.final_norm(), eps);

        let rope = Rope::new(c.rope_theta, hd, stack.longest());
        let scale = adapters.spec().scale();
        for (layer, bc) in cache.blocks.iter().enumerate().rev() {
            let block = self.block(layer);
            let adapted = |p: Projection| adapters.factor(layer, p);

            // FFN: x_out = x_mid + act·Wdownᵀ.
            let mut dact = vec![0.0f32; t * f];
            input_grad(&mut dact, &dx, &block.down, f, d);
            if let Some((a, b)) = adapted(Projection::Down) {
                lora_backward(
                    grads,
                    layer,
                    Projection::Down,
                    &dx,
                    &bc.act,
                    bc.lora.get(Projection::Down),
                    a,
                    b,
                    scale,
                    train_a,
                    &mut dact,
                );
            }
            let mut dgate = vec![0.0f32; t * f];
            let mut dup = vec![0.0f32; t * f];
            let rows = dgate.par_chunks_exact_mut(f).zip(dup.par_chunks_exact_mut(f));
            let inputs = bc.gate.par_chunks_exact(f).zip(bc.up.par_chunks_exact(f)).zip(dact.par_chunks_exact(f));
            rows.zip(inputs).with_min_len(ROWS_PER_TASK).for_each(|((dgate, dup), ((gate, up), dact))| {
                for i in 0..f {
                    let (g, u, da) = (gate[i], up[i], dact[i]);
                    let sig = 1.0 / (1.0 + (-g).exp());
                    dup[i] = da * silu(g);
                    dgate[i] = da * u * sig * (1.0 + g * (1.0 - sig));
                }
            });
            let mut dh2 = vec![0.0f32; t * d];
            input_grad(&mut dh2, &dgate, &block.gate, d, f);
            input_grad(&mut dh2, &dup, &block.up, d, f);
            if let Some((a, b)) = adapted(Projection::Gate) {
                lora_backward(
                    grads,
                    layer,
                    Projection::Gate,
                    &dgate,
                    &bc.h2,
                    bc.lora.get(Projection::Gate),
                    a,
                    b,
                    scale,
                    train_a,
                    &mut dh2,
                );
            }
            if let Some((a, b)) = adapted(Projection::Up) {
                lora_backward(
                    grads,
                    layer,
                    Projection::Up,
                    &dup,
                    &bc.h2,
                    bc.lora.get(Projection::Up),
                    a,
                    b,
                    scale,
                    train_a,
                    &mut dh2,
                );
            }
            let mut dx_mid = dx.clone();
            rms_norm_backward(&mut dx_mid, &dh2, &bc.x_mid, &block.ffn_norm, eps);

            // Attention: x_mid = x_in + attended·Woᵀ.
            let mut dattended = vec![0.0f32; t * q_width];
            input_grad(&mut dattended, &dx_mid, &block.o, q_width, d);
            if let Some((a, b)) = adapted(Projection::O) {
                lora_backward(
                    grads,
                    layer,
                    Projection::O,
                    &dx_mid,
                    &bc.attended,
                    bc.lora.get(Projection::O),
                    a,
                    b,
                    scale,
                    train_a,
                    &mut dattended,
                );
            }
            // Sequences in parallel (and each one's heads), placed in order.
            let per_sequence: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = stack
                .spans()
                .par_iter()
                .zip(&bc.probs)
                .map(|(span, probs)| {
                    let (q_rows, kv_rows) =
                        (span.start * q_width..span.end * q_width, span.start * kv_width..span.end * kv_width);
                    let (mut dq, mut dk, dv) = attention_backward(
                        &dattended[q_rows.clone()],
                        &bc.q[q_rows],
                        &bc.k[kv_rows.clone()],
                        &bc.v[kv_rows],
                        probs,
                        span.len(),
                        heads,
                        kv_heads,
                        hd,
                    );
                    rope.apply_inverse(&mut dq, q_width, hd);
                    rope.apply_inverse(&mut dk, kv_width, hd);
                    (dq, dk, dv)
                })
                .collect();
            let (mut dq, mut dk, mut dv) =
                (Vec::with_capacity(t * q_width), Vec::with_capacity(t * kv_width), Vec::with_capacity(t * kv_width));
            for (dq_s, dk_s, dv_s) in per_sequence {
                dq.extend_from_slice(&dq_s);
                dk.extend_from_slice(&dk_s);
                dv.extend_from_slice(&dv_s);
            }
            let mut dh1 = vec![0.0f32; t * d];
            input_grad(&mut dh1, &dq, &block.q, d, q_width);
            input_grad(&mut dh1, &dk, &block.k, d, kv_width);
            input_grad(&mut dh1, &dv, &block.v, d, kv_width);
            for (p, dy) in [(Projection::Q, &dq), (Projection::K, &dk), (Projection::V, &dv)] {
                if let Some((a, b)) = adapted(p) {
                    lora_backward(grads, layer, p, dy, &bc.h1, bc.lora.get(p), a, b, scale, train_a, &mut dh1);
                }
            }
            let mut dx_in = dx_mid;
            rms_norm_backward(&mut dx_in, &dh1, &bc.x_in, &block.attn_norm, eps);
            dx = dx_in;
        }
        Ok(losses)
    }
}

/// `dx += dy · W` for `dy` `[T, out]` and the frozen `w` `[out, in]`. The product is formed from
/// zero and then added, so `dx`'s earlier terms keep their own rounding.
fn input_grad(dx: &mut [f32], dy: &[f32], w: &[f32], inp: usize, out: usize) {
    let t = dy.len() / out;
    let mut product = vec![0.0f32; t * inp];
    gemm(&mut product, inp, Lhs { data: dy, row_stride: out, k_stride: 1 }, w, inp, out, Start::Zero);
    dx.iter_mut().zip(&product).for_each(|(x, g)| *x += g);
}

/// The adapter's part of a projection's backward pass, for `y += z·Bᵀ` with `z = s·x·Aᵀ`:
/// `dB += dyᵀ·z`, `dz = s·dy·B`, `dA += dzᵀ·x` (when trained), `dx += dz·A`.
#[allow(clippy::too_many_arguments)]
fn lora_backward(
    grads: &mut Adapters,
    layer: usize,
    projection: Projection,
    dy: &[f32],
    x: &[f32],
    z: Option<&[f32]>,
    a: &[f32],
    b: &[f32],
    scale: f32,
    train_a: bool,
    dx: &mut [f32],
) {
    let Some(z) = z else { return };
    let rank = grads.spec().rank;
    let inp = a.len() / rank;
    let out = b.len() / rank;
    let t = dy.len() / out;
    let Some((da, db)) = grads.factor_mut(layer, projection) else { return };
    gemm(db, rank, Lhs { data: dy, row_stride: 1, k_stride: out }, z, rank, t, Start::Accumulate);
    let mut dz = vec![0.0f32; t * rank];
    gemm(&mut dz, rank, Lhs { data: dy, row_stride: out, k_stride: 1 }, b, rank, out, Start::Zero);
    dz.iter_mut().for_each(|g| *g *= scale);
    if train_a {
        gemm(da, inp, Lhs { data: &dz, row_stride: 1, k_stride: rank }, x, inp, t, Start::Accumulate);
    }
    gemm(dx, inp, Lhs { data: &dz, row_stride: rank, k_stride: 1 }, a, inp, rank, Start::Accumulate);
}

/// Gradients of causal grouped-query attention with respect to (post-RoPE) queries, keys and
/// values. Heads run in parallel; the heads sharing a key/value head are summed in head order.
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[Vec<f32>],
    t: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (q_width, kv_width) = (heads * hd, kv_heads * hd);
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_head: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let p = &probs[h];
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; t * hd], vec![0.0f32; t * hd], vec![0.0f32; t * hd]);
            let mut dp = vec![0.0f32; t];
            for r in 0..t {
                let dout_r = &dout[r * q_width + h * hd..][..hd];
                // dP[r, s] = dO[r]·V[s]; dV[s] += P[r, s]·dO[r].
                for s in 0..=r {
                    let v_s = &v[s * kv_width + g * hd..][..hd];
                    dp[s] = dout_r.iter().zip(v_s).map(|(a, b)| a * b).sum();
                    let weight = p[r * t + s];
                    for (dv, &o) in dv[s * hd..][..hd].iter_mut().zip(dout_r) {
                        *dv += weight * o;
                    }
                }
                // dS = P ⊙ (dP − Σ P·dP), then through the 1/√hd scale.
                let inner: f32 = (0..=r).map(|s| p[r * t + s] * dp[s]).sum();
                for s in 0..=r {
                    let ds = p[r * t + s] * (dp[s] - inner) * scale;
                    let k_s = &k[s * kv_width + g * hd..][..hd];
                    let q_r = &q[r * q_width + h * hd..][..hd];
                    for j in 0..hd {
                        dq[r * hd + j] += ds * k_s[j];
                        dk[s * hd + j] += ds * q_r[j];
                    }
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0.0f32; t * q_width];
    let mut dk = vec![0.0f32; t * kv_width];
    let mut dv = vec![0.0f32; t * kv_width];
    for (h, (dq_h, dk_h, dv_h)) in per_head.into_iter().enumerate() {
        let g = h / group;
        for s in 0..t {
            dq[s * q_width + h * hd..][..hd].copy_from_slice(&dq_h[s * hd..][..hd]);
            for j in 0..hd {
                dk[s * kv_width + g * hd + j] += dk_h[s * hd + j];
                dv[s * kv_width + g * hd + j] += dv_h[s * hd + j];
            }
        }
    }
    (dq, dk, dv)
}

/// AdamW settings for adapter training.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraTraining {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global gradient-norm clip; 0 disables clipping.
    pub clip_norm: f32,
    /// Train `A` as well as `B` (the `--adapter full` track); the shared track keeps `A` frozen.
    pub train_a: bool,
}

impl Default for LoraTraining {
    fn default() -> Self {
        Self { lr: 2e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, clip_norm: 1.0, train_a: false }
    }
}

/// AdamW over the adapters' flat parameters; its moments stay with the node.
pub struct LoraTrainer {
    settings: LoraTraining,
    m: Vec<f32>,
    v: Vec<f32>,
    trainable: Vec<bool>,
    step: u64,
}

/// The training windows of one step: `rows` sequences of `context` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Windows {
    pub rows: usize,
    pub context: usize,
}

/// What one stretch of adapter training did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoraReport {
    pub steps: u64,
    pub tokens: u64,
    /// Mean training loss over the stretch, nats per token.
    pub mean_loss: f64,
    pub last_loss: f64,
}

impl LoraTrainer {
    pub fn new(settings: LoraTraining, adapters: &Adapters) -> Self {
        let n = adapters.params().len();
        let trainable = if settings.train_a { vec![true; n] } else { adapters.is_b() };
        Self { settings, m: vec![0.0; n], v: vec![0.0; n], trainable, step: 0 }
    }

    /// One update from the gradient of the mean loss over `sequences`; returns that loss.
    pub fn step(&mut self, model: &Llama, adapters: &mut Adapters, sequences: &[&[u32]]) -> Result<f64, LlamaError> {
        let (loss, grads) = model.lora_loss_and_grads(adapters, sequences, self.settings.train_a)?;
        self.apply(adapters, grads.params(), self.settings.clip_norm);
        Ok(loss)
    }

    /// One AdamW update of the trainable parameters from `grads`, their global norm clipped to
    /// `clip_norm` first (0: no clipping).
    fn apply(&mut self, adapters: &mut Adapters, grads: &[f32], clip_norm: f32) {
        let s = self.settings;
        let norm = grads.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>().sqrt();
        let clip =
            if clip_norm > 0.0 && norm > f64::from(clip_norm) { (f64::from(clip_norm) / norm) as f32 } else { 1.0 };
        self.step += 1;
        let bc1 = 1.0 - s.beta1.powi(self.step.min(i32::MAX as u64) as i32);
        let bc2 = 1.0 - s.beta2.powi(self.step.min(i32::MAX as u64) as i32);
        let moments = self.m.iter_mut().zip(self.v.iter_mut());
        let slots = adapters.params_mut().iter_mut().zip(grads).zip(moments).zip(&self.trainable);
        for (((param, &grad), (m, v)), &trainable) in slots {
            if !trainable {
                continue;
            }
            let g = grad * clip;
            *m = s.beta1 * *m + (1.0 - s.beta1) * g;
            *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
            let update = (*m / bc1) / ((*v / bc2).sqrt() + s.eps) + s.weight_decay * *param;
            *param -= s.lr * update;
        }
    }

    /// `steps` steps of record-level DP-SGD: the node's tokens cut into disjoint records of
    /// `context` tokens, each step a Poisson sample of them (rate `q`) drawn from the node's
    /// private stream, each record's adapter gradient clipped to the mechanism's norm, Gaussian
    /// noise added to the sum, divided by the expected batch. AdamW then only post-processes the
    /// noised gradient (its own clipping off). `on_step(step, loss)` reports each step's mean
    /// loss over the sampled records (the node's own view; it is not released).
    #[allow(clippy::too_many_arguments)]
    pub fn train_private(
        &mut self,
        model: &Llama,
        adapters: &mut Adapters,
        corpus: &[u32],
        steps: u64,
        context: usize,
        private: &weft_model::PrivateTraining,
        round: u64,
        on_step: &mut dyn FnMut(u64, f64),
    ) -> Result<(LoraReport, weft_model::DpReport), LlamaError> {
        let (dp, delta) = (&private.dp, private.delta);
        let accounting = |e: weft_privacy::AccountingError| LlamaError::Privacy(e.to_string());
        let epsilon = weft_privacy::RdpCurve::of_steps(dp.mechanism(), steps)
            .and_then(|curve| curve.epsilon(delta))
            .map_err(accounting)?
            .epsilon;
        if context < 2 {
            return Err(LlamaError::Empty);
        }
        let records = weft_privacy::records(corpus.len(), context);
        if records.is_empty() {
            return Err(LlamaError::Empty);
        }
        let stream = &mut weft_privacy::PrivateStream::new(&private.secret, round);
        let expected_batch = dp.sample_rate * records.len() as f64;
        let mut report = LoraReport { steps, ..LoraReport::default() };
        let mut dp_report = weft_model::DpReport {
            mechanism: *dp,
            delta,
            epsilon,
            records: records.len() as u64,
            sampled: 0,
            clipped: 0,
        };
        let mut total = 0.0;
        for step in 0..steps {
            let picked = stream.sample(records.len(), dp.sample_rate);
            let mut clipped = weft_privacy::ClippedSum::new(adapters.params().len(), dp.clip_norm);
            let mut loss_sum = 0.0;
            for &i in &picked {
                let record = &corpus[records[i].clone()];
                let (loss, grads) = model.lora_loss_and_grads(adapters, &[record], self.settings.train_a)?;
                clipped.add(grads.params());
                loss_sum += loss;
                report.tokens += (record.len() - 1) as u64;
            }
            dp_report.sampled += clipped.records() as u64;
            dp_report.clipped += clipped.clipped() as u64;
            let noised = clipped.noised_mean(dp.noise_multiplier, expected_batch, stream);
            self.apply(adapters, &noised, 0.0);
            let loss = if picked.is_empty() { 0.0 } else { loss_sum / picked.len() as f64 };
            total += loss;
            report.last_loss = loss;
            on_step(step + 1, loss);
        }
        report.mean_loss = if steps > 0 { total / steps as f64 } else { 0.0 };
        Ok((report, dp_report))
    }

    /// `steps` steps of `windows.rows` windows of `windows.context` tokens drawn from `corpus`
    /// with `rng`.
    pub fn train(
        &mut self,
        model: &Llama,
        adapters: &mut Adapters,
        corpus: &[u32],
        steps: u64,
        windows: Windows,
        rng: &mut SplitMix64,
    ) -> Result<LoraReport, LlamaError> {
        let Windows { rows, context } = windows;
        if corpus.len() < 2 || context < 2 || rows == 0 {
            return Err(LlamaError::Empty);
        }
        let window = context.min(corpus.len());
        let mut report = LoraReport::default();
        let mut total = 0.0;
        for _ in 0..steps {
            let starts: Vec<usize> =
                (0..rows).map(|_| rng.below((corpus.len() - window + 1) as u64) as usize).collect();
            let sequences: Vec<&[u32]> = starts.iter().map(|&s| &corpus[s..s + window]).collect();
            let loss = self.step(model, adapters, &sequences)?;
            total += loss;
            report.steps += 1;
            report.tokens += (rows * (window - 1)) as u64;
            report.last_loss = loss;
        }
        report.mean_loss = if report.steps > 0 { total / report.steps as f64 } else { 0.0 };
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraSpec;
    use crate::model::tests::{random_state, tiny_config};

    fn spec(targets: Vec<Projection>) -> LoraSpec {
        LoraSpec { rank: 2, alpha: 4.0, targets }
    }

    /// Adapters with non-zero B, so that every path of the backward pass carries signal.
    fn trained_looking(config: &crate::LlamaConfig, spec: LoraSpec) -> Adapters {
        let mut adapters = Adapters::init(config, spec, 3).unwrap();
        let mut rng = SplitMix64::new(9);
        adapters.params_mut().iter_mut().for_each(|p| *p += 0.2 * rng.normal() as f32);
        adapters
    }

    /// Each parameter's analytic gradient against a central difference of the loss, in f64
    /// where the model allows: a sample of parameters from every projection.
    #[test]
    fn adapter_gradients_match_finite_differences() {
        for (tied, bias) in [(true, false), (false, true)] {
            let config = tiny_config(tied, bias);
            let model = Llama::from_state(config.clone(), &random_state(&config, 4)).unwrap();
            let adapters = trained_looking(&config, spec(Projection::ALL.to_vec()));
            let sequences: Vec<Vec<u32>> =
                vec![(0..11).map(|i| (i * 5 + 2) % 37).collect(), (0..7).map(|i| (i * 3 + 1) % 37).collect()];
            let refs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
            let (_, grads) = model.lora_loss_and_grads(&adapters, &refs, true).unwrap();
            let loss_at = |adapters: &Adapters| model.lora_loss_and_grads(adapters, &refs, false).unwrap().0;
            let n = adapters.params().len();
            for i in (0..n).step_by(n / 97 + 1) {
                let difference = |h: f32| {
                    let mut plus = adapters.clone();
                    plus.params_mut()[i] += h;
                    let mut minus = adapters.clone();
                    minus.params_mut()[i] -= h;
                    (loss_at(&plus) - loss_at(&minus)) / (2.0 * h as f64)
                };
                // Richardson extrapolation cancels the central difference's O(h²) term, which
                // the f32 forward pass would not let a smaller h do.
                let numeric = (4.0 * difference(1e-2) - difference(2e-2)) / 3.0;
                let analytic = grads.params()[i] as f64;
                let error = (numeric - analytic).abs() / (numeric.abs() + analytic.abs()).max(1e-3);
                assert!(error < 1e-2, "tied={tied} bias={bias} param {i}: numeric {numeric}, analytic {analytic}");
            }
        }
    }

    #[test]
    fn b_only_training_leaves_a_and_lowers_the_loss() {
        let config = tiny_config(true, false);
        let model = Llama::from_state(config.clone(), &random_state(&config, 4)).unwrap();
        let mut adapters =
            Adapters::init(&config, spec(vec![Projection::Q, Projection::V, Projection::Up, Projection::Down]), 1)
                .unwrap();
        let start = adapters.clone();
        let corpus: Vec<u32> = (0..400).map(|i| ((i * i + 3 * i) % 37) as u32).collect();
        let settings = LoraTraining { lr: 1e-2, ..LoraTraining::default() };
        let mut trainer = LoraTrainer::new(settings, &adapters);
        let before = model.lora_loss_and_grads(&adapters, &[&corpus[..32]], false).unwrap().0;
        let report = trainer
            .train(&model, &mut adapters, &corpus, 30, Windows { rows: 2, context: 16 }, &mut SplitMix64::new(5))
            .unwrap();
        let after = model.lora_loss_and_grads(&adapters, &[&corpus[..32]], false).unwrap().0;
        assert!(after < before - 0.05, "loss {before} → {after} ({report:?})");
        let is_b = adapters.is_b();
        for (i, (&p, &p0)) in adapters.params().iter().zip(start.params()).enumerate() {
            if !is_b[i] {
                assert_eq!(p.to_bits(), p0.to_bits(), "A changed at {i}");
            }
        }
        // The merged base computes what base + adapters compute.
        let mut merged = random_state(&config, 4);
        adapters.merge_into(&mut merged, 1.0).unwrap();
        let merged = Llama::from_state(config.clone(), &merged).unwrap();
        let tokens = &corpus[..20];
        let with = model.forward(&[tokens], Some(&adapters), None).unwrap();
        let folded = merged.forward(&[tokens], None, None).unwrap();
        let worst = with.iter().zip(&folded).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "max |Δ| {worst}");
    }

    fn private(noise_multiplier: f64, secret: u8) -> weft_model::PrivateTraining {
        weft_model::PrivateTraining {
            dp: weft_privacy::DpSgd { clip_norm: 1.0, noise_multiplier, sample_rate: 0.4 },
            delta: 1e-5,
            secret: [secret; 32],
        }
    }

    /// DP-SGD on the adapters from the same start: the adapters, the loss after, the report.
    fn private_run(noise_multiplier: f64, secret: u8) -> (Adapters, f64, f64, weft_model::DpReport) {
        let config = tiny_config(true, false);
        let model = Llama::from_state(config.clone(), &random_state(&config, 4)).unwrap();
        let mut adapters =
            Adapters::init(&config, spec(vec![Projection::Q, Projection::V, Projection::Down]), 1).unwrap();
        let corpus: Vec<u32> = (0..400).map(|i| ((i * i + 3 * i) % 37) as u32).collect();
        let before = model.lora_loss_and_grads(&adapters, &[&corpus[..64]], false).unwrap().0;
        let mut trainer = LoraTrainer::new(LoraTraining { lr: 1e-2, ..LoraTraining::default() }, &adapters);
        let (report, dp) = trainer
            .train_private(
                &model,
                &mut adapters,
                &corpus,
                30,
                16,
                &private(noise_multiplier, secret),
                3,
                &mut |_, _| {},
            )
            .unwrap();
        assert_eq!(report.steps, 30);
        let after = model.lora_loss_and_grads(&adapters, &[&corpus[..64]], false).unwrap().0;
        (adapters, before, after, dp)
    }

    #[test]
    fn dp_sgd_on_adapters_learns_reproduces_and_states_the_accountants_epsilon() {
        let (adapters, before, after, dp) = private_run(0.5, 1);
        assert!(after < before - 0.05, "loss {before} → {after}");
        // 400 tokens in disjoint records of 16: 25; about 0.4 of them a step.
        assert_eq!(dp.records, 25);
        assert!((200..400).contains(&dp.sampled), "{dp:?}");
        let expected = weft_privacy::RdpCurve::of_steps(private(0.5, 1).dp.mechanism(), 30)
            .unwrap()
            .epsilon(1e-5)
            .unwrap()
            .epsilon;
        assert_eq!(dp.epsilon.to_bits(), expected.to_bits());
        // Bit for bit again from the same secret; another node's secret draws other samples and noise.
        let (again, ..) = private_run(0.5, 1);
        assert_eq!(adapters.params(), again.params());
        let (other, ..) = private_run(0.5, 2);
        assert_ne!(adapters.params(), other.params());
    }

    #[test]
    fn dp_sgd_with_overwhelming_noise_learns_nothing_of_the_text() {
        let (_, before, after, dp) = private_run(1e4, 1);
        assert!(after > before - 0.05, "loss {before} → {after} under σ = 10⁴");
        assert!(dp.epsilon < 0.01, "{dp:?}");
    }

    /// Sequences of several lengths, more rows in all than one stacked pass holds.
    fn uneven_batch() -> Vec<Vec<u32>> {
        (0..7).map(|s| (0..40 + 3 * s).map(|i| ((i * 7 + s * 5 + 1) % 37) as u32).collect()).collect()
    }

    #[test]
    fn a_training_step_is_bitwise_reproducible_across_thread_counts() {
        let config = tiny_config(false, true);
        let model = Llama::from_state(config.clone(), &random_state(&config, 4)).unwrap();
        let adapters = trained_looking(&config, spec(Projection::ALL.to_vec()));
        let batch = uneven_batch();
        let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
                let (loss, grads) = model.lora_loss_and_grads(&adapters, &refs, true).unwrap();
                (loss.to_bits(), grads.params().iter().map(|g| g.to_bits()).collect::<Vec<_>>())
            })
        };
        assert_eq!(run(1), run(3));
    }

    /// Stacking sequences into passes changes which rows a product sees, never a bit of the
    /// result: the step equals one sequence per pass, accumulated in order.
    #[test]
    fn stacked_passes_give_the_bits_of_one_sequence_at_a_time() {
        let config = tiny_config(true, false);
        let model = Llama::from_state(config.clone(), &random_state(&config, 5)).unwrap();
        let adapters = trained_looking(&config, spec(Projection::ALL.to_vec()));
        let batch = uneven_batch();
        let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        assert!(crate::model::passes(&refs).count() > 1, "the batch spans more than one pass");
        let (loss, grads) = model.lora_loss_and_grads(&adapters, &refs, true).unwrap();

        let predicted: usize = refs.iter().map(|s| s.len() - 1).sum();
        let mut alone = adapters.zeros_like();
        let mut total = 0.0f64;
        for sequence in &refs {
            let losses = model.pass_backward(&adapters, &[sequence], 1.0 / predicted as f32, true, &mut alone).unwrap();
            total += losses[0];
        }
        assert_eq!(loss.to_bits(), (total / predicted as f64).to_bits());
        let bits = |a: &Adapters| a.params().iter().map(|g| g.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&grads), bits(&alone));
    }
}
