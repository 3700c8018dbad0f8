//! Forward and backward kernels of the transformer, after Karpathy's llm.c.
//!
//! Shapes: `N = B·T` rows, `C` channels. Matrices are `[out, in]`. Every output element is
//! produced by one thread in a fixed order, so results do not depend on the thread count.
//! Backward kernels overwrite `dinp` unless they say they accumulate; weight gradients always
//! accumulate.

use rayon::prelude::*;

use crate::elementary::{exp, tanh};
use crate::gemm::{gemm, gemm_serial, Lhs, Start};
#[cfg(target_arch = "x86_64")]
use weft_core::cpu::wide_vectors;

const LN_EPS: f32 = 1e-5;

/// `Σ f(a[i], b[i])` in one fixed order: eight interleaved partial sums (lane k takes i ≡ k mod 8),
/// then a fixed tree, then the tail. A plain left-to-right sum is one long dependency chain the
/// compiler may not reorder; this order vectorises and is still the same on every machine.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += f(x[k], y[k]);
        }
    }
    let mut tail = 0.0;
    for (&x, &y) in ar.iter().zip(br) {
        tail += f(x, y);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// The largest value; NaN is skipped as `f32::max` does, so the order does not matter.
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] = acc[k].max(c[k]);
        }
    }
    acc.iter().chain(rest).copied().fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn axpy(out: &mut [f32], w: f32, x: &[f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += w * v;
    }
}

pub fn encoder_forward(out: &mut [f32], tokens: &[u8], wte: &[f32], wpe: &[f32], t_len: usize, c: usize) {
    for (i, (row, &tok)) in out.chunks_exact_mut(c).zip(tokens).enumerate() {
        let t = i % t_len;
        let e = &wte[tok as usize * c..][..c];
        let p = &wpe[t * c..][..c];
        for ((o, e), p) in row.iter_mut().zip(e).zip(p) {
            *o = e + p;
        }
    }
}

pub fn encoder_backward(dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], tokens: &[u8], t_len: usize, c: usize) {
    for (i, (d, &tok)) in dout.chunks_exact(c).zip(tokens).enumerate() {
        let t = i % t_len;
        axpy(&mut dwte[tok as usize * c..][..c], 1.0, d);
        axpy(&mut dwpe[t * c..][..c], 1.0, d);
    }
}

pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    b: &[f32],
    c: usize,
) {
    out.par_chunks_mut(c).zip(mean.par_iter_mut()).zip(rstd.par_iter_mut()).zip(inp.par_chunks(c)).for_each(
        |(((o, m), r), x)| {
            let mu = lane_sum(x, x, |v, _| v) / c as f32;
            let var = lane_sum(x, x, |v, _| (v - mu) * (v - mu)) / c as f32;
            let rs = 1.0 / (var + LN_EPS).sqrt();
            for i in 0..c {
                o[i] = (x[i] - mu) * rs * w[i] + b[i];
            }
            *m = mu;
            *r = rs;
        },
    );
}

/// Accumulates into `dinp` (it carries the residual stream's gradient), `dw` and `db`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    dinp.par_chunks_mut(c)
        .zip(dout.par_chunks(c))
        .zip(inp.par_chunks(c))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .for_each_init(
            || vec![0.0f32; c],
            |dnorm, (((di, d), x), (&mu, &rs))| {
                for ((g, &w), &d) in dnorm.iter_mut().zip(w).zip(d) {
                    *g = w * d;
                }
                let dnorm_mean = lane_sum(dnorm, dnorm, |g, _| g) / c as f32;
                let dnorm_norm_mean = lane_sum(dnorm, x, |g, x| g * ((x - mu) * rs)) / c as f32;
                for ((di, &g), &x) in di.iter_mut().zip(dnorm.iter()).zip(x) {
                    let norm = (x - mu) * rs;
                    *di += (g - dnorm_mean - norm * dnorm_norm_mean) * rs;
                }
            },
        );
    // Parameter gradients sum over rows: one serial pass keeps the order fixed.
    for ((d, x), (&mu, &rs)) in dout.chunks_exact(c).zip(inp.chunks_exact(c)).zip(mean.iter().zip(rstd)) {
        for i in 0..c {
            let norm = (x[i] - mu) * rs;
            db[i] += d[i];
            dw[i] += norm * d[i];
        }
    }
}

/// `out[n, o] = bias[o] + Σ_c inp[n, c] · w[o, c]`.
pub fn matmul_forward(out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, c: usize, oc: usize) {
    // The micro-kernel wants the output columns contiguous: `wᵀ` is [c, oc]. Transposing costs
    // c·oc moves against n·c·oc multiply-adds.
    let mut wt = vec![0.0f32; c * oc];
    // In 16 × 16 blocks, so that neither side is walked a whole row apart per element.
    for o0 in (0..oc).step_by(16) {
        for i0 in (0..c).step_by(16) {
            for o in o0..(o0 + 16).min(oc) {
                for i in i0..(i0 + 16).min(c) {
                    wt[i * oc + o] = w[o * c + i];
                }
            }
        }
    }
    let start = bias.map_or(Start::Zero, Start::Bias);
    gemm(out, oc, Lhs { data: inp, row_stride: c, k_stride: 1 }, &wt, oc, c, start);
}

/// Overwrites `dinp`; accumulates `dw` and `dbias`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    c: usize,
    oc: usize,
) {
    // dinp[n, c] = Σ_o dout[n, o] · w[o, c]
    gemm(dinp, c, Lhs { data: dout, row_stride: oc, k_stride: 1 }, w, c, oc, Start::Zero);
    // dw[o, c] += Σ_n dout[n, o] · inp[n, c]  (doutᵀ is a strided view, not a copy)
    let n = dout.len() / oc;
    gemm(dw, c, Lhs { data: dout, row_stride: 1, k_stride: oc }, inp, c, n, Start::Accumulate);
    if let Some(db) = dbias {
        // Row by row, so the adds run along contiguous memory; each output still sums the rows
        // in order.
        for d in dout.chunks_exact(oc) {
            for (b, &g) in db.iter_mut().zip(d) {
                *b += g;
            }
        }
    }
}

/// Causal multi-head self-attention. `qkv` is `[B, T, 3C]` (queries, keys, values); `att` keeps
/// the softmax probabilities `[B, NH, T, T]` for the backward pass.
///
/// Per sequence and head, the scores `Q·Kᵀ` and the output `P·V` are matrix products over the
/// whole `T × T` square: the upper triangle is computed and then masked (its probabilities are
/// exactly 0), which costs twice the multiply-adds of the causal half but runs them in the
/// micro-kernel, several times faster than dot products of one head's width.
pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], t_len: usize, c: usize, nh: usize) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    out.par_chunks_mut(t_len * c)
        .zip(att.par_chunks_mut(nh * t_len * t_len))
        .zip(qkv.par_chunks(t_len * 3 * c))
        .for_each(|((out_b, att_b), qkv_b)| {
            let mut kt = vec![0.0f32; hs * t_len];
            for (h, p) in att_b.chunks_exact_mut(t_len * t_len).enumerate() {
                transpose_head(&mut kt, qkv_b, c + h * hs, 3 * c, t_len, hs);
                let q = Lhs { data: &qkv_b[h * hs..], row_stride: 3 * c, k_stride: 1 };
                gemm_serial(p, t_len, t_len, t_len, q, &kt, t_len, hs, Start::Zero);
                for (t, row) in p.chunks_exact_mut(t_len).enumerate() {
                    let live = &mut row[..=t];
                    for v in live.iter_mut() {
                        *v *= scale;
                    }
                    let max = lane_max(live);
                    for v in live.iter_mut() {
                        *v = exp(*v - max);
                    }
                    let inv = 1.0 / lane_sum(live, live, |v, _| v);
                    for v in row[..=t].iter_mut() {
                        *v *= inv;
                    }
                    row[t + 1..].fill(0.0);
                }
                let probs = Lhs { data: p, row_stride: t_len, k_stride: 1 };
                let v = &qkv_b[2 * c + h * hs..];
                gemm_serial(&mut out_b[h * hs..], c, t_len, hs, probs, v, 3 * c, t_len, Start::Zero);
            }
        });
}

/// `dst[i, t] = src[offset + t·stride + i]`: one head's keys or values, `[hs, T]`, so that a
/// product can run along `t`.
fn transpose_head(dst: &mut [f32], src: &[f32], offset: usize, stride: usize, t_len: usize, hs: usize) {
    for t in 0..t_len {
        for (i, &v) in src[offset + t * stride..][..hs].iter().enumerate() {
            dst[i * t_len + t] = v;
        }
    }
}

/// Overwrites `dqkv`.
pub fn attention_backward(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], att: &[f32], t_len: usize, c: usize, nh: usize) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    dqkv.par_chunks_mut(t_len * 3 * c)
        .zip(dout.par_chunks(t_len * c))
        .zip(qkv.par_chunks(t_len * 3 * c))
        .zip(att.par_chunks(nh * t_len * t_len))
        .for_each(|(((dqkv_b, dout_b), qkv_b), att_b)| {
            let mut vt = vec![0.0f32; hs * t_len];
            let mut ds = vec![0.0f32; t_len * t_len];
            for (h, p) in att_b.chunks_exact(t_len * t_len).enumerate() {
                let d_out = Lhs { data: &dout_b[h * hs..], row_stride: c, k_stride: 1 };
                // dP = dO·Vᵀ
                transpose_head(&mut vt, qkv_b, 2 * c + h * hs, 3 * c, t_len, hs);
                gemm_serial(&mut ds, t_len, t_len, t_len, d_out, &vt, t_len, hs, Start::Zero);
                // dV = Pᵀ·dO
                let p_t = Lhs { data: p, row_stride: 1, k_stride: t_len };
                let dv = &mut dqkv_b[2 * c + h * hs..];
                gemm_serial(dv, 3 * c, t_len, hs, p_t, &dout_b[h * hs..], c, t_len, Start::Zero);
                // dS = P ∘ (dP − Σ P∘dP) · scale, in place over dP; 0 above the diagonal.
                for (t, (dp, p)) in ds.chunks_exact_mut(t_len).zip(p.chunks_exact(t_len)).enumerate() {
                    let weighted = lane_sum(&p[..=t], &dp[..=t], |a, g| a * g);
                    for (g, &a) in dp[..=t].iter_mut().zip(&p[..=t]) {
                        *g = a * (*g - weighted) * scale;
                    }
                    dp[t + 1..].fill(0.0);
                }
                // dQ = dS·K, dK = dSᵀ·Q
                let d_s = Lhs { data: &ds, row_stride: t_len, k_stride: 1 };
                let k = &qkv_b[c + h * hs..];
                gemm_serial(&mut dqkv_b[h * hs..], 3 * c, t_len, hs, d_s, k, 3 * c, t_len, Start::Zero);
                let d_s_t = Lhs { data: &ds, row_stride: 1, k_stride: t_len };
                let q = &qkv_b[h * hs..];
                gemm_serial(&mut dqkv_b[c + h * hs..], 3 * c, t_len, hs, d_s_t, q, 3 * c, t_len, Start::Zero);
            }
        });
}

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2/π)

pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    out.par_chunks_mut(4096).zip(inp.par_chunks(4096)).for_each(|(o, x)| {
        #[cfg(target_arch = "x86_64")]
        if wide_vectors() {
            // SAFETY: `wide_vectors` checked that this CPU has AVX2.
            return unsafe { avx2::gelu_forward_chunk(o, x) };
        }
        gelu_forward_chunk(o, x)
    });
}

#[inline(always)]
fn gelu_forward_chunk(out: &mut [f32], inp: &[f32]) {
    for (o, &x) in out.iter_mut().zip(inp) {
        let cube = 0.044715 * x * x * x;
        *o = 0.5 * x * (1.0 + tanh(GELU_SCALE * (x + cube)));
    }
}

/// Overwrites `dinp`.
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    dinp.par_chunks_mut(4096).zip(inp.par_chunks(4096)).zip(dout.par_chunks(4096)).for_each(|((di, x), d)| {
        #[cfg(target_arch = "x86_64")]
        if wide_vectors() {
            // SAFETY: as above.
            return unsafe { avx2::gelu_backward_chunk(di, x, d) };
        }
        gelu_backward_chunk(di, x, d)
    });
}

#[inline(always)]
fn gelu_backward_chunk(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    for ((di, &x), &d) in dinp.iter_mut().zip(inp).zip(dout) {
        let cube = 0.044715 * x * x * x;
        let arg = GELU_SCALE * (x + cube);
        let th = tanh(arg);
        let sech2 = 1.0 - th * th;
        let local = 0.5 * (1.0 + th) + x * 0.5 * sech2 * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x);
        *di = local * d;
    }
}

/// GELU compiled for AVX2: the same operations in the same order (Rust never fuses a multiply
/// and an add), eight lanes at a time instead of four, so the same bits (tested).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub unsafe fn gelu_forward_chunk(out: &mut [f32], inp: &[f32]) {
        super::gelu_forward_chunk(out, inp)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn gelu_backward_chunk(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        super::gelu_backward_chunk(dinp, inp, dout)
    }
}

pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    out.par_chunks_mut(4096).zip(a.par_chunks(4096)).zip(b.par_chunks(4096)).for_each(|((o, a), b)| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    });
}

/// Softmax over the vocabulary and the masked cross-entropy. Writes probabilities into `probs`
/// and returns `(Σ mask · loss, Σ mask)` in f64.
pub fn softmax_crossentropy(probs: &mut [f32], logits: &[f32], targets: &[u8], mask: &[f32], v: usize) -> (f64, f64) {
    probs.par_chunks_mut(v).zip(logits.par_chunks(v)).for_each(|(p, l)| {
        let max = lane_max(l);
        for (p, &l) in p.iter_mut().zip(l) {
            *p = exp(l - max);
        }
        let inv = 1.0 / lane_sum(p, p, |p, _| p);
        p.iter_mut().for_each(|p| *p *= inv);
    });
    let mut loss = 0.0f64;
    let mut count = 0.0f64;
    for ((p, &t), &m) in probs.chunks_exact(v).zip(targets).zip(mask) {
        if m != 0.0 {
            loss += f64::from(m) * -f64::from(p[t as usize].max(f32::MIN_POSITIVE)).ln();
            count += f64::from(m);
        }
    }
    (loss, count)
}

/// Gradient of the mean masked loss with respect to the logits; overwrites `dlogits`.
pub fn crossentropy_backward(dlogits: &mut [f32], probs: &[f32], targets: &[u8], mask: &[f32], count: f64, v: usize) {
    let inv = if count > 0.0 { (1.0 / count) as f32 } else { 0.0 };
    dlogits.par_chunks_mut(v).zip(probs.par_chunks(v)).zip(targets.par_iter().zip(mask.par_iter())).for_each(
        |((d, p), (&t, &m))| {
            let s = m * inv;
            for (d, &p) in d.iter_mut().zip(p) {
                *d = p * s;
            }
            d[t as usize] -= s;
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn gelu_in_avx2_gives_the_portable_bits() {
        assert!(std::arch::is_x86_feature_detected!("avx2"), "this test needs an AVX2 machine");
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013).collect();
        let d: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let (mut a, mut b) = (vec![0.0; 1000], vec![0.0; 1000]);
        gelu_forward_chunk(&mut a, &x);
        // SAFETY: AVX2 asserted above.
        unsafe { avx2::gelu_forward_chunk(&mut b, &x) };
        assert_eq!(bits(&a), bits(&b));
        gelu_backward_chunk(&mut a, &x, &d);
        // SAFETY: as above.
        unsafe { avx2::gelu_backward_chunk(&mut b, &x, &d) };
        assert_eq!(bits(&a), bits(&b));
    }

    #[test]
    fn matmul_forward_is_x_times_w_transposed() {
        // x = [[1, 2]], w = [[1, 0], [0, 1], [1, 1]], bias = [0, 1, 2]
        let mut out = [0.0; 3];
        matmul_forward(&mut out, &[1.0, 2.0], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], Some(&[0.0, 1.0, 2.0]), 2, 3);
        assert_eq!(out, [1.0, 3.0, 5.0]);
    }

    #[test]
    fn masked_positions_carry_no_loss_and_no_gradient() {
        let v = 4;
        let logits = [0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0];
        let mut probs = [0.0; 8];
        let (loss, count) = softmax_crossentropy(&mut probs, &logits, &[3, 0], &[1.0, 0.0], v);
        assert_eq!(count, 1.0);
        let (loss_one, _) = softmax_crossentropy(&mut [0.0; 4], &logits[..4], &[3], &[1.0], v);
        assert_eq!(loss, loss_one);
        let mut d = [9.0; 8];
        crossentropy_backward(&mut d, &probs, &[3, 0], &[1.0, 0.0], count, v);
        assert!(d[4..].iter().all(|&g| g == 0.0));
        assert!(d[..4].iter().sum::<f32>().abs() < 1e-6);
    }
}
