//! The byte-level GPT: parameters, forward, backward, evaluation.

use weft_core::ModelState;

use crate::config::{GptConfig, VOCAB};
use crate::kernels::*;
use crate::layout::{self, Entry, ModelError};
use crate::profile::span;
use crate::rng::SplitMix64;
use crate::train::Batch;

/// A byte-level causal transformer: token and position embeddings, pre-norm blocks of causal
/// self-attention and a GELU MLP, a final LayerNorm, and an output layer tied to the embedding.
pub struct Gpt {
    config: GptConfig,
    entries: Vec<Entry>,
    params: Vec<f32>,
    grads: Vec<f32>,
    acts: Option<Activations>,
}

struct LayerActs {
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    att: Vec<f32>,
    attproj: Vec<f32>,
    res2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    fcproj: Vec<f32>,
    res3: Vec<f32>,
}

/// Activations of the last forward pass (kept for backward) and the backward pass's scratch.
struct Activations {
    b: usize,
    t: usize,
    encoded: Vec<f32>,
    layers: Vec<LayerActs>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    logits: Vec<f32>,
    probs: Vec<f32>,
    tokens: Vec<u8>,
    targets: Vec<u8>,
    mask: Vec<f32>,
    count: f64,
    d_res: Vec<f32>,
    d_c: Vec<f32>,
    d_3c: Vec<f32>,
    d_4c: Vec<f32>,
    d_4c_gelu: Vec<f32>,
    d_logits: Vec<f32>,
}

impl Activations {
    fn new(config: &GptConfig, b: usize, t: usize) -> Self {
        let (n, c, nh) = (b * t, config.width, config.heads);
        let z = |len: usize| vec![0.0f32; len];
        let layers = (0..config.layers)
            .map(|_| LayerActs {
                ln1: z(n * c),
                ln1_mean: z(n),
                ln1_rstd: z(n),
                qkv: z(n * 3 * c),
                atty: z(n * c),
                att: z(b * nh * t * t),
                attproj: z(n * c),
                res2: z(n * c),
                ln2: z(n * c),
                ln2_mean: z(n),
                ln2_rstd: z(n),
                fch: z(n * 4 * c),
                fch_gelu: z(n * 4 * c),
                fcproj: z(n * c),
                res3: z(n * c),
            })
            .collect();
        Activations {
            b,
            t,
            encoded: z(n * c),
            layers,
            lnf: z(n * c),
            lnf_mean: z(n),
            lnf_rstd: z(n),
            logits: z(n * VOCAB),
            probs: z(n * VOCAB),
            tokens: vec![0; n],
            targets: vec![0; n],
            mask: z(n),
            count: 0.0,
            d_res: z(n * c),
            d_c: z(n * c),
            d_3c: z(n * 3 * c),
            d_4c: z(n * 4 * c),
            d_4c_gelu: z(n * 4 * c),
            d_logits: z(n * VOCAB),
        }
    }
}

impl Gpt {
    /// A freshly initialised model (GPT-2 initialisation), reproducible from `seed`.
    pub fn init(config: GptConfig, seed: u64) -> Result<Self, ModelError> {
        config.validate()?;
        let entries = layout::entries(&config);
        let mut params = vec![0.0f32; layout::total_len(&entries)];
        let mut rng = SplitMix64::derive(seed, "weft-model/init", 0);
        let residual_std = 0.02 / ((2 * config.layers) as f64).sqrt();
        for e in &entries {
            let slice = &mut params[e.offset..e.offset + e.len];
            if e.name.ends_with("ln_1.weight") || e.name.ends_with("ln_2.weight") || e.name == "ln_f.weight" {
                slice.fill(1.0);
            } else if e.shape.len() == 2 {
                let std = if e.name.ends_with("proj.weight") { residual_std } else { 0.02 };
                slice.iter_mut().for_each(|v| *v = (rng.normal() * std) as f32);
            }
        }
        let grads = vec![0.0; params.len()];
        Ok(Gpt { config, entries, params, grads, acts: None })
    }

    /// Loads a model state, checking names, shapes and that every value is finite.
    pub fn from_state(config: GptConfig, state: &ModelState) -> Result<Self, ModelError> {
        config.validate()?;
        let entries = layout::entries(&config);
        let len = layout::total_len(&entries);
        let mut model = Gpt { config, entries, params: vec![0.0; len], grads: vec![0.0; len], acts: None };
        model.load_state(state)?;
        Ok(model)
    }

    /// Replaces the parameters with `state` (same checks as [`from_state`](Self::from_state)).
    pub fn load_state(&mut self, state: &ModelState) -> Result<(), ModelError> {
        layout::from_state(&self.entries, state, &mut self.params)
    }

    pub fn to_state(&self) -> ModelState {
        layout::to_state(&self.entries, &self.params)
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub(crate) fn params_and_grads(&mut self) -> (&mut [f32], &[f32]) {
        (&mut self.params, &self.grads)
    }

    #[cfg(test)]
    pub(crate) fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    /// The gradient buffer of the last [`backward`](Self::backward), in parameter order.
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    /// Replaces the gradient buffer (DP-SGD's noised mean of clipped per-record gradients).
    /// `None` if `grads` does not have one value per parameter.
    pub fn set_grads(&mut self, grads: &[f32]) -> Option<()> {
        (grads.len() == self.grads.len()).then(|| self.grads.copy_from_slice(grads))
    }

    /// Runs the model on a batch and returns `(Σ masked loss in nats, number of masked targets)`.
    pub fn forward(&mut self, batch: &Batch) -> (f64, f64) {
        let (b, t) = (batch.rows, batch.len);
        let c = self.config.width;
        if !matches!(&self.acts, Some(a) if a.b == b && a.t == t) {
            self.acts = Some(Activations::new(&self.config, b, t));
        }
        let Some(acts) = self.acts.as_mut() else { unreachable!("activations were just allocated") };
        acts.tokens.copy_from_slice(&batch.inputs);
        acts.targets.copy_from_slice(&batch.targets);
        acts.mask.copy_from_slice(&batch.mask);
        let p = layout::split(&self.entries, &self.params);
        span("encoder.forward", || encoder_forward(&mut acts.encoded, &acts.tokens, p.wte, p.wpe, t, c));
        for l in 0..self.config.layers {
            let (done, rest) = acts.layers.split_at_mut(l);
            let residual = if l == 0 { &acts.encoded } else { &done[l - 1].res3 };
            let a = &mut rest[0];
            let w = &p.blocks[l];
            span("layernorm.forward", || {
                layernorm_forward(&mut a.ln1, &mut a.ln1_mean, &mut a.ln1_rstd, residual, w[0], w[1], c)
            });
            span("matmul.forward", || matmul_forward(&mut a.qkv, &a.ln1, w[2], Some(w[3]), c, 3 * c));
            span("attention.forward", || attention_forward(&mut a.atty, &mut a.att, &a.qkv, t, c, self.config.heads));
            span("matmul.forward", || matmul_forward(&mut a.attproj, &a.atty, w[4], Some(w[5]), c, c));
            span("residual.forward", || residual_forward(&mut a.res2, residual, &a.attproj));
            span("layernorm.forward", || {
                layernorm_forward(&mut a.ln2, &mut a.ln2_mean, &mut a.ln2_rstd, &a.res2, w[6], w[7], c)
            });
            span("matmul.forward", || matmul_forward(&mut a.fch, &a.ln2, w[8], Some(w[9]), c, 4 * c));
            span("gelu.forward", || gelu_forward(&mut a.fch_gelu, &a.fch));
            span("matmul.forward", || matmul_forward(&mut a.fcproj, &a.fch_gelu, w[10], Some(w[11]), 4 * c, c));
            span("residual.forward", || residual_forward(&mut a.res3, &a.res2, &a.fcproj));
        }
        let last = acts.layers.last().map_or(&acts.encoded, |a| &a.res3);
        span("layernorm.forward", || {
            layernorm_forward(&mut acts.lnf, &mut acts.lnf_mean, &mut acts.lnf_rstd, last, p.lnf_w, p.lnf_b, c)
        });
        span("matmul.forward", || matmul_forward(&mut acts.logits, &acts.lnf, p.wte, None, c, VOCAB));
        let (loss, count) = span("softmax_crossentropy.forward", || {
            softmax_crossentropy(&mut acts.probs, &acts.logits, &acts.targets, &acts.mask, VOCAB)
        });
        acts.count = count;
        (loss, count)
    }

    /// Gradients of the mean masked loss of the last [`forward`](Self::forward) into the
    /// gradient buffer (overwritten).
    pub fn backward(&mut self) {
        let Some(acts) = self.acts.as_mut() else { return };
        let (t, c, nh) = (acts.t, self.config.width, self.config.heads);
        self.grads.fill(0.0);
        let p = layout::split(&self.entries, &self.params);
        let g = layout::split_mut(&self.entries, &mut self.grads);
        let (gwte, gwpe, mut gblocks, glnf_w, glnf_b) = (g.wte, g.wpe, g.blocks, g.lnf_w, g.lnf_b);

        span("softmax_crossentropy.backward", || {
            crossentropy_backward(&mut acts.d_logits, &acts.probs, &acts.targets, &acts.mask, acts.count, VOCAB)
        });
        span("matmul.backward", || {
            matmul_backward(&mut acts.d_c, gwte, None, &acts.d_logits, &acts.lnf, p.wte, c, VOCAB)
        });
        let last = acts.layers.last().map_or(&acts.encoded, |a| &a.res3);
        acts.d_res.fill(0.0);
        span("layernorm.backward", || {
            layernorm_backward(
                &mut acts.d_res,
                glnf_w,
                glnf_b,
                &acts.d_c,
                last,
                p.lnf_w,
                &acts.lnf_mean,
                &acts.lnf_rstd,
                c,
            )
        });

        for l in (0..self.config.layers).rev() {
            let residual = if l == 0 { &acts.encoded } else { &acts.layers[l - 1].res3 };
            let a = &acts.layers[l];
            let w = &p.blocks[l];
            let gw = &mut gblocks[l];
            let [g_ln1w, g_ln1b, g_qkvw, g_qkvb, g_projw, g_projb, g_ln2w, g_ln2b, g_fcw, g_fcb, g_fcprojw, g_fcprojb] =
                gw;
            // d_res holds dL/d(res3); res3 = res2 + fcproj.
            span("matmul.backward", || {
                matmul_backward(
                    &mut acts.d_4c_gelu,
                    g_fcprojw,
                    Some(g_fcprojb),
                    &acts.d_res,
                    &a.fch_gelu,
                    w[10],
                    4 * c,
                    c,
                )
            });
            span("gelu.backward", || gelu_backward(&mut acts.d_4c, &a.fch, &acts.d_4c_gelu));
            span("matmul.backward", || {
                matmul_backward(&mut acts.d_c, g_fcw, Some(g_fcb), &acts.d_4c, &a.ln2, w[8], c, 4 * c)
            });
            span("layernorm.backward", || {
                layernorm_backward(
                    &mut acts.d_res,
                    g_ln2w,
                    g_ln2b,
                    &acts.d_c,
                    &a.res2,
                    w[6],
                    &a.ln2_mean,
                    &a.ln2_rstd,
                    c,
                )
            });
            // d_res now holds dL/d(res2); res2 = residual + attproj.
            span("matmul.backward", || {
                matmul_backward(&mut acts.d_c, g_projw, Some(g_projb), &acts.d_res, &a.atty, w[4], c, c)
            });
            span("attention.backward", || attention_backward(&mut acts.d_3c, &acts.d_c, &a.qkv, &a.att, t, c, nh));
            span("matmul.backward", || {
                matmul_backward(&mut acts.d_c, g_qkvw, Some(g_qkvb), &acts.d_3c, &a.ln1, w[2], c, 3 * c)
            });
            span("layernorm.backward", || {
                layernorm_backward(
                    &mut acts.d_res,
                    g_ln1w,
                    g_ln1b,
                    &acts.d_c,
                    residual,
                    w[0],
                    &a.ln1_mean,
                    &a.ln1_rstd,
                    c,
                )
            });
        }
        span("encoder.backward", || encoder_backward(gwte, gwpe, &acts.d_res, &acts.tokens, t, c));
    }

    /// Runs the model on a batch and returns each row's Σ masked loss in nats (what the secret
    /// sharer's exposure ranks candidates by).
    pub fn row_losses(&mut self, batch: &Batch) -> Vec<f64> {
        self.forward(batch);
        let Some(acts) = self.acts.as_ref() else { return Vec::new() };
        let per_position = acts.probs.chunks_exact(VOCAB).zip(&acts.targets).zip(&acts.mask).map(|((p, &t), &m)| {
            if m != 0.0 {
                f64::from(m) * -f64::from(p[t as usize].max(f32::MIN_POSITIVE)).ln()
            } else {
                0.0
            }
        });
        let losses: Vec<f64> = per_position.collect();
        losses.chunks(batch.len.max(1)).map(|row| row.iter().sum()).collect()
    }

    /// Mean next-byte loss in nats per byte over `text`, predicting every byte after the first.
    /// Windows of `context` bytes are scored in batches of `batch_rows`; the last, shorter window
    /// is padded and the padding masked out.
    pub fn loss_per_byte(&mut self, text: &[u8], batch_rows: usize) -> f64 {
        let (sum, count) = self.loss_sum(text, batch_rows);
        if count > 0.0 {
            sum / count
        } else {
            f64::NAN
        }
    }

    /// `(Σ loss, number of predicted bytes)` over `text`.
    pub fn loss_sum(&mut self, text: &[u8], batch_rows: usize) -> (f64, f64) {
        let t = self.config.context;
        // Window k predicts bytes k·t+1 ..= k·t+t from the t bytes before each of them.
        let starts: Vec<usize> = (0..text.len().saturating_sub(1)).step_by(t).collect();
        let (mut sum, mut count) = (0.0, 0.0);
        // Every batch has the same number of rows (the last one padded with masked rows, which
        // change no sum): a batch of another size would reallocate every activation buffer,
        // twice per text.
        let rows = batch_rows.max(1).min(starts.len());
        for group in starts.chunks(rows) {
            let mut batch = Batch::empty(rows, t);
            for (row, &start) in group.iter().enumerate() {
                batch.set_row(row, &text[start..(start + t + 1).min(text.len())]);
            }
            let (s, c) = self.forward(&batch);
            sum += s;
            count += c;
        }
        (sum, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> GptConfig {
        GptConfig { layers: 2, heads: 2, width: 8, context: 6 }
    }

    fn batch() -> Batch {
        let mut b = Batch::empty(2, 6);
        b.set_row(0, b"hello, w");
        b.set_row(1, b"abc"); // short row: padded and masked
        b
    }

    /// Every analytic gradient agrees with a central finite difference of the loss.
    #[test]
    fn gradients_match_finite_differences() {
        let mut model = Gpt::init(tiny(), 3).unwrap();
        // Give LayerNorm and biases non-trivial values so that their gradients are exercised.
        let mut rng = SplitMix64::new(11);
        for v in model.params_mut().iter_mut() {
            *v += (rng.normal() * 0.05) as f32;
        }
        let batch = batch();
        let loss = |m: &mut Gpt| {
            let (s, c) = m.forward(&batch);
            s / c
        };
        loss(&mut model);
        model.backward();
        let analytic = model.grads().to_vec();
        let entries = model.entries().to_vec();
        let mut checked = 0;
        for e in &entries {
            for k in [0, e.len / 4, e.len / 2, 3 * e.len / 4, e.len - 1] {
                let i = e.offset + k;
                let eps = 1e-2f32;
                let orig = model.params_mut()[i];
                model.params_mut()[i] = orig + eps;
                let up = loss(&mut model);
                model.params_mut()[i] = orig - eps;
                let down = loss(&mut model);
                model.params_mut()[i] = orig;
                let numeric = (up - down) / (2.0 * f64::from(eps));
                let got = f64::from(analytic[i]);
                let tol = 2e-3 + 0.03 * numeric.abs().max(got.abs());
                assert!((numeric - got).abs() < tol, "{}[{k}]: numeric {numeric} analytic {got}", e.name);
                checked += 1;
            }
        }
        assert_eq!(checked, entries.len() * 5);
    }

    #[test]
    fn padding_does_not_change_the_loss() {
        let mut model = Gpt::init(tiny(), 1).unwrap();
        let mut a = Batch::empty(1, 6);
        a.set_row(0, b"abc");
        let mut b = a.clone();
        // Change only padded inputs: the loss of the real positions must not move.
        for i in 3..6 {
            b.inputs[i] = b'z';
            b.targets[i] = b'q';
        }
        assert_eq!(model.forward(&a), model.forward(&b));
        assert_eq!(model.forward(&a).1, 2.0);
    }

    /// `loss_sum` pads its last batch with empty rows; they must not change a bit.
    #[test]
    fn empty_rows_change_no_sum() {
        let mut model = Gpt::init(tiny(), 2).unwrap();
        let mut rows = [b"hello, w".as_slice(), b"abc".as_slice()].into_iter();
        let mut two = Batch::empty(2, 6);
        let mut five = Batch::empty(5, 6);
        for row in 0..2 {
            let window = rows.next().unwrap();
            two.set_row(row, window);
            five.set_row(row, window);
        }
        let (a, b) = (model.forward(&two), model.forward(&five));
        assert_eq!((a.0.to_bits(), a.1), (b.0.to_bits(), b.1));
    }

    #[test]
    fn untrained_model_is_near_uniform_and_state_round_trips() {
        let mut model = Gpt::init(tiny(), 5).unwrap();
        let loss = model.loss_per_byte(b"The quick brown fox jumps over the lazy dog.", 4);
        assert!((loss - (256f64).ln()).abs() < 0.1, "{loss}");
        let state = model.to_state();
        let mut again = Gpt::from_state(tiny(), &state).unwrap();
        assert_eq!(again.to_state().content_hash(), state.content_hash());
        assert_eq!(
            again.loss_per_byte(b"The quick brown fox", 4),
            Gpt::from_state(tiny(), &state).unwrap().loss_per_byte(b"The quick brown fox", 4)
        );
    }

    #[test]
    fn refuses_a_state_of_another_shape_or_with_nan() {
        let state = Gpt::init(tiny(), 5).unwrap().to_state();
        let wider = GptConfig { width: 12, ..tiny() };
        assert!(Gpt::from_state(wider, &state).is_err());
        let mut bad = state.clone();
        bad.get_mut("wpe").unwrap().data_mut()[0] = f32::NAN;
        assert!(Gpt::from_state(tiny(), &bad).is_err());
    }
}
