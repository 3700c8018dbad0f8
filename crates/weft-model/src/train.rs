//! Local training: batches drawn from a node's own bytes, AdamW with global-norm clipping.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::Gpt;
use crate::profile::span;
use crate::rng::SplitMix64;

/// `rows` sequences of `len` positions: `inputs[i]` predicts `targets[i]` where `mask[i]` is 1.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub len: usize,
    pub inputs: Vec<u8>,
    pub targets: Vec<u8>,
    pub mask: Vec<f32>,
}

impl Batch {
    /// All padding: nothing is scored until rows are set.
    pub fn empty(rows: usize, len: usize) -> Self {
        Batch { rows, len, inputs: vec![0; rows * len], targets: vec![0; rows * len], mask: vec![0.0; rows * len] }
    }

    /// Fills row `row` from up to `len + 1` bytes; positions past the window are padding.
    pub fn set_row(&mut self, row: usize, window: &[u8]) {
        let n = window.len().saturating_sub(1).min(self.len);
        let base = row * self.len;
        for i in 0..self.len {
            let real = i < n;
            self.inputs[base + i] = if real { window[i] } else { 0 };
            self.targets[base + i] = if real { window[i + 1] } else { 0 };
            self.mask[base + i] = if real { 1.0 } else { 0.0 };
        }
    }

    /// `rows` windows at uniformly random offsets of `corpus`. A corpus shorter than a window
    /// gives padded rows rather than an error.
    pub fn sample(corpus: &[u8], rows: usize, len: usize, rng: &mut SplitMix64) -> Self {
        let mut batch = Batch::empty(rows, len);
        let span = corpus.len().saturating_sub(len + 1) as u64 + 1;
        for row in 0..rows {
            let start = rng.below(span) as usize;
            batch.set_row(row, &corpus[start..(start + len + 1).min(corpus.len())]);
        }
        batch
    }

    /// Number of scored positions.
    pub fn tokens(&self) -> u64 {
        self.mask.iter().filter(|&&m| m != 0.0).count() as u64
    }
}

/// Parameters per parallel block of the update (and of the gradient norm's partial sums).
const UPDATE_BLOCK: usize = 1 << 14;

/// AdamW hyper-parameters. Weight decay applies to matrices and embeddings only.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWSettings {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Linear warm-up over the optimizer's first steps (counted over its whole life, not per round).
    pub warmup_steps: u64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub clip_norm: f32,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        AdamWSettings {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            warmup_steps: 20,
            clip_norm: 1.0,
        }
    }
}

/// AdamW whose moments live with the node across rounds and are never sent anywhere.
pub struct AdamW {
    settings: AdamWSettings,
    m: Vec<f32>,
    v: Vec<f32>,
    decay: Vec<bool>,
    step: u64,
}

/// What one stretch of local training did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    pub steps: u64,
    pub tokens: u64,
    /// Mean training loss over the stretch, nats per byte.
    pub mean_loss: f64,
    /// Mean training loss over the last quarter of the stretch.
    pub final_loss: f64,
    /// Global gradient norm of the last step, before clipping.
    pub last_grad_norm: f64,
}

impl AdamW {
    pub fn new(settings: AdamWSettings, model: &Gpt) -> Self {
        let n = model.num_params();
        let mut decay = vec![false; n];
        for e in model.entries() {
            if e.shape.len() >= 2 {
                decay[e.offset..e.offset + e.len].fill(true);
            }
        }
        AdamW { settings, m: vec![0.0; n], v: vec![0.0; n], decay, step: 0 }
    }

    pub fn settings(&self) -> &AdamWSettings {
        &self.settings
    }

    /// Optimizer steps taken over the node's whole life.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The first and second moments, in the model's parameter order (for saving).
    pub fn moments(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.v)
    }

    /// An optimizer continuing from saved moments and step count. `None` if the moments do
    /// not fit the model.
    pub fn restore(settings: AdamWSettings, model: &Gpt, m: Vec<f32>, v: Vec<f32>, step: u64) -> Option<Self> {
        let mut adamw = Self::new(settings, model);
        if m.len() != adamw.m.len() || v.len() != adamw.v.len() {
            return None;
        }
        adamw.m = m;
        adamw.v = v;
        adamw.step = step;
        Some(adamw)
    }

    /// One update from the model's current gradients; returns the gradient norm before clipping.
    pub fn update(&mut self, model: &mut Gpt) -> f64 {
        self.update_clipped(model, self.settings.clip_norm)
    }

    /// [`update`](Self::update) with this global clip norm (0: none).
    fn update_clipped(&mut self, model: &mut Gpt, clip_norm: f32) -> f64 {
        let s = AdamWSettings { clip_norm, ..self.settings };
        let (params, grads) = model.params_and_grads();
        // Σ g² in fixed blocks, each summed in order, then the block sums in order: the same
        // bits for any thread count.
        let norm = grads
            .par_chunks(UPDATE_BLOCK)
            .map(|block| block.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>())
            .collect::<Vec<f64>>()
            .iter()
            .sum::<f64>()
            .sqrt();
        let clip = if s.clip_norm > 0.0 && norm > f64::from(s.clip_norm) {
            (f64::from(s.clip_norm) / norm) as f32
        } else {
            1.0
        };
        self.step += 1;
        let warm = if s.warmup_steps == 0 { 1.0 } else { (self.step as f32 / s.warmup_steps as f32).min(1.0) };
        let lr = s.lr * warm;
        let bc1 = 1.0 - s.beta1.powi(self.step.min(i32::MAX as u64) as i32);
        let bc2 = 1.0 - s.beta2.powi(self.step.min(i32::MAX as u64) as i32);
        params
            .par_chunks_mut(UPDATE_BLOCK)
            .zip(grads.par_chunks(UPDATE_BLOCK))
            .zip(self.m.par_chunks_mut(UPDATE_BLOCK).zip(self.v.par_chunks_mut(UPDATE_BLOCK)))
            .zip(self.decay.par_chunks(UPDATE_BLOCK))
            .for_each(|(((params, grads), (m, v)), decay)| {
                // Settings as locals, so that the compiler keeps them in registers.
                let (beta1, beta2, eps, weight_decay) = (s.beta1, s.beta2, s.eps, s.weight_decay);
                for i in 0..params.len() {
                    let g = grads[i] * clip;
                    m[i] = beta1 * m[i] + (1.0 - beta1) * g;
                    v[i] = beta2 * v[i] + (1.0 - beta2) * g * g;
                    let m_hat = m[i] / bc1;
                    let v_hat = v[i] / bc2;
                    let wd = if decay[i] { weight_decay * params[i] } else { 0.0 };
                    params[i] -= lr * (m_hat / (v_hat.sqrt() + eps) + wd);
                }
            });
        norm
    }

    /// `steps` steps of `rows × context` windows drawn from `corpus` with `rng`.
    /// `on_step(step, loss)` is called after every step (for progress bars).
    pub fn train(
        &mut self,
        model: &mut Gpt,
        corpus: &[u8],
        steps: u64,
        rows: usize,
        rng: &mut SplitMix64,
        mut on_step: impl FnMut(u64, f64),
    ) -> TrainReport {
        let len = model.config().context;
        let mut report = TrainReport { steps, ..TrainReport::default() };
        let mut losses = LossTally::new(steps);
        for step in 0..steps {
            let batch = span("batch", || Batch::sample(corpus, rows, len, rng));
            let (loss_sum, count) = model.forward(&batch);
            let loss = if count > 0.0 { loss_sum / count } else { 0.0 };
            model.backward();
            report.last_grad_norm = span("adamw", || self.update(model));
            report.tokens += batch.tokens();
            losses.add(step, loss);
            on_step(step + 1, loss);
        }
        (report.mean_loss, report.final_loss) = losses.means();
        report
    }
}

/// A stretch's mean loss and the mean over its last quarter (what `TrainReport` states).
struct LossTally {
    steps: u64,
    tail_from: u64,
    sum: f64,
    tail_sum: f64,
    tail_n: u64,
}

impl LossTally {
    fn new(steps: u64) -> Self {
        LossTally { steps, tail_from: steps - steps / 4, sum: 0.0, tail_sum: 0.0, tail_n: 0 }
    }

    fn add(&mut self, step: u64, loss: f64) {
        self.sum += loss;
        if step >= self.tail_from {
            self.tail_sum += loss;
            self.tail_n += 1;
        }
    }

    /// (mean, mean of the last quarter); zeros for an empty stretch.
    fn means(&self) -> (f64, f64) {
        if self.steps == 0 {
            return (0.0, 0.0);
        }
        (self.sum / self.steps as f64, self.tail_sum / self.tail_n.max(1) as f64)
    }
}

/// What DP-SGD did over one stretch of local training. Stays with the node: how many records
/// were sampled is itself information about its data.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpReport {
    /// The mechanism applied.
    pub mechanism: weft_privacy::DpSgd,
    /// The δ this node's ε is stated at.
    pub delta: f64,
    /// The privacy loss of this stretch alone, at `delta` (the accountant's tight conversion).
    pub epsilon: f64,
    /// Records of the node's corpus (disjoint windows of `context + 1` bytes).
    pub records: u64,
    /// Records drawn over all steps (Poisson sampling: the batch size varies).
    pub sampled: u64,
    /// Of those, records whose gradient was scaled down to the clip norm.
    pub clipped: u64,
}

impl AdamW {
    /// `steps` steps of DP-SGD: each step Poisson-samples the corpus's records at `dp`'s rate,
    /// clips every sampled record's gradient to `dp.clip_norm`, adds Gaussian noise of standard
    /// deviation `noise_multiplier · clip_norm` to the sum, divides by the expected batch size
    /// and takes an AdamW step on that (AdamW's own clipping is off: the noised mean is the
    /// estimator the accountant covers, and AdamW is post-processing). Records are disjoint
    /// windows of `context + 1` bytes, so one record is one unit of the guarantee. Sampling and
    /// noise come from round `round`'s stream of the node's secret.
    pub fn train_private(
        &mut self,
        model: &mut Gpt,
        corpus: &[u8],
        steps: u64,
        private: &crate::PrivateTraining,
        round: u64,
        mut on_step: impl FnMut(u64, f64),
    ) -> Result<(TrainReport, DpReport), weft_privacy::AccountingError> {
        let (dp, delta) = (&private.dp, private.delta);
        // The round's stream, keyed by the node's secret: see `weft_privacy::PrivateStream`.
        let stream = &mut weft_privacy::PrivateStream::new(&private.secret, round);
        let epsilon = weft_privacy::RdpCurve::of_steps(dp.mechanism(), steps)?.epsilon(delta)?.epsilon;
        let len = model.config().context;
        let records = weft_privacy::records(corpus.len(), len + 1);
        let expected_batch = dp.sample_rate * records.len() as f64;
        let mut report = TrainReport { steps, ..TrainReport::default() };
        let mut dp_report =
            DpReport { mechanism: *dp, delta, epsilon, records: records.len() as u64, sampled: 0, clipped: 0 };
        let mut losses = LossTally::new(steps);
        let mut one = Batch::empty(1, len);
        for step in 0..steps {
            let picked = stream.sample(records.len(), dp.sample_rate);
            let mut clipped = weft_privacy::ClippedSum::new(model.num_params(), dp.clip_norm);
            let (mut loss_sum, mut count) = (0.0, 0.0);
            for &i in &picked {
                one.set_row(0, &corpus[records[i].clone()]);
                let (l, c) = model.forward(&one);
                model.backward();
                clipped.add(model.grads());
                loss_sum += l;
                count += c;
                report.tokens += one.tokens();
            }
            dp_report.sampled += clipped.records() as u64;
            dp_report.clipped += clipped.clipped() as u64;
            let noised = clipped.noised_mean(dp.noise_multiplier, expected_batch, stream);
            if model.set_grads(&noised).is_none() {
                unreachable!("the clipped sum has one value per parameter");
            }
            report.last_grad_norm = span("adamw", || self.update_clipped(model, 0.0));
            let loss = if count > 0.0 { loss_sum / count } else { 0.0 };
            losses.add(step, loss);
            on_step(step + 1, loss);
        }
        (report.mean_loss, report.final_loss) = losses.means();
        Ok((report, dp_report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GptConfig;

    const TEXT: &[u8] = b"All human beings are born free and equal in dignity and rights. \
        They are endowed with reason and conscience and should act towards one another in a spirit of brotherhood.";

    #[test]
    fn training_lowers_the_loss_and_is_bitwise_reproducible() {
        let config = GptConfig { layers: 1, heads: 2, width: 16, context: 16 };
        let run = || {
            let mut model = Gpt::init(config, 42).unwrap();
            let before = model.loss_per_byte(TEXT, 8);
            let mut opt = AdamW::new(AdamWSettings { warmup_steps: 5, ..AdamWSettings::default() }, &model);
            let mut rng = SplitMix64::new(9);
            let report = opt.train(&mut model, TEXT, 60, 8, &mut rng, |_, _| {});
            (before, model.loss_per_byte(TEXT, 8), report, model.to_state().content_hash())
        };
        let (before, after, report, hash) = run();
        assert!(after < before - 1.0, "{before} -> {after}");
        assert_eq!(report.steps, 60);
        assert_eq!(report.tokens, 60 * 8 * 16);
        let (_, after2, _, hash2) = run();
        assert_eq!(hash, hash2);
        assert_eq!(after.to_bits(), after2.to_bits());
    }

    #[test]
    fn result_does_not_depend_on_the_thread_count() {
        let config = GptConfig { layers: 1, heads: 2, width: 16, context: 16 };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut model = Gpt::init(config, 1).unwrap();
                let mut opt = AdamW::new(AdamWSettings::default(), &model);
                opt.train(&mut model, TEXT, 10, 4, &mut SplitMix64::new(2), |_, _| {});
                model.to_state().content_hash()
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn dp_sgd_learns_reproducibly_and_depends_on_the_private_stream() {
        let config = GptConfig { layers: 1, heads: 2, width: 16, context: 16 };
        let text = TEXT.repeat(8);
        let dp = weft_privacy::DpSgd { clip_norm: 1.0, noise_multiplier: 0.5, sample_rate: 0.25 };
        let run = |secret: [u8; 32]| {
            let mut model = Gpt::init(config, 42).unwrap();
            let before = model.loss_per_byte(&text, 8);
            let mut opt = AdamW::new(AdamWSettings { warmup_steps: 5, ..AdamWSettings::default() }, &model);
            let private = crate::PrivateTraining { dp, delta: 1e-5, secret };
            let (report, dp_report) = opt.train_private(&mut model, &text, 40, &private, 1, |_, _| {}).unwrap();
            (before, model.loss_per_byte(&text, 8), report, dp_report, model.to_state().content_hash())
        };
        let (before, after, report, dp_report, hash) = run([3; 32]);
        assert!(after < before - 0.5, "{before} -> {after}");
        assert_eq!(report.steps, 40);
        assert_eq!(dp_report.records, text.len().div_ceil(17) as u64);
        // Poisson sampling: about a quarter of the records each step, not a fixed count.
        let expected = 40.0 * 0.25 * dp_report.records as f64;
        assert!((dp_report.sampled as f64 - expected).abs() < 0.2 * expected, "{dp_report:?}");
        assert_eq!(run([3; 32]).4, hash);
        assert_ne!(run([4; 32]).4, hash);
    }

    #[test]
    fn dp_sgd_with_huge_noise_learns_nothing_useful() {
        // The noise is real: at σ = 1000 the same training does not lower the loss the way the
        // noiseless one does.
        let config = GptConfig { layers: 1, heads: 2, width: 16, context: 16 };
        let text = TEXT.repeat(8);
        let after = |sigma: f64| {
            let mut model = Gpt::init(config, 42).unwrap();
            let dp = weft_privacy::DpSgd { clip_norm: 1.0, noise_multiplier: sigma, sample_rate: 0.25 };
            let mut opt = AdamW::new(AdamWSettings { warmup_steps: 5, ..AdamWSettings::default() }, &model);
            let private = crate::PrivateTraining { dp, delta: 1e-5, secret: [9; 32] };
            opt.train_private(&mut model, &text, 40, &private, 1, |_, _| {}).unwrap();
            model.loss_per_byte(&text, 8)
        };
        let (quiet, loud) = (after(1e-6), after(1000.0));
        assert!(quiet + 0.5 < loud, "noiseless {quiet}, σ 1000 {loud}");
    }

    #[test]
    fn short_corpus_gives_padded_rows() {
        let mut rng = SplitMix64::new(1);
        let batch = Batch::sample(b"abc", 2, 8, &mut rng);
        assert_eq!(batch.tokens(), 4);
        assert_eq!(&batch.inputs[..3], b"ab\0");
        assert_eq!(Batch::sample(b"", 2, 8, &mut rng).tokens(), 0);
    }
}
