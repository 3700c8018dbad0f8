//! Forward and backward kernels of the transformer, after Karpathy's llm.c.
//!
//! Shapes: `N = B·T` rows, `C` channels. Matrices are `[out, in]`. Every output element is
//! produced by one thread in a fixed order, so results do not depend on the thread count.
//! Backward kernels overwrite `dinp` unless they say they accumulate; weight gradients always
//! accumulate.

use rayon::prelude::*;

use crate::elementary::{exp, tanh};
use crate::gemm::{gemm, wide_vectors, Lhs, Start};

const LN_EPS: f32 = 1e-5;

/// Dot product with eight independent accumulators, so that the compiler can vectorise it while
/// the summation order stays fixed.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
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
            let mu = x.iter().sum::<f32>() / c as f32;
            let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / c as f32;
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
        .for_each(|(((di, d), x), (&mu, &rs))| {
            let mut dnorm_mean = 0.0f32;
            let mut dnorm_norm_mean = 0.0f32;
            for i in 0..c {
                let norm = (x[i] - mu) * rs;
                let dnorm = w[i] * d[i];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * norm;
            }
            dnorm_mean /= c as f32;
            dnorm_norm_mean /= c as f32;
            for i in 0..c {
                let norm = (x[i] - mu) * rs;
                let dnorm = w[i] * d[i];
                di[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rs;
            }
        });
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
pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], t_len: usize, c: usize, nh: usize) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    out.par_chunks_mut(t_len * c)
        .zip(att.par_chunks_mut(nh * t_len * t_len))
        .zip(qkv.par_chunks(t_len * 3 * c))
        .for_each(|((out_b, att_b), qkv_b)| {
            for t in 0..t_len {
                for h in 0..nh {
                    let q = &qkv_b[t * 3 * c + h * hs..][..hs];
                    let row = &mut att_b[(h * t_len + t) * t_len..][..t_len];
                    let mut max = f32::NEG_INFINITY;
                    for t2 in 0..=t {
                        let k = &qkv_b[t2 * 3 * c + c + h * hs..][..hs];
                        row[t2] = dot(q, k) * scale;
                        max = max.max(row[t2]);
                    }
                    let mut sum = 0.0;
                    for v in row[..=t].iter_mut() {
                        *v = exp(*v - max);
                        sum += *v;
                    }
                    let inv = 1.0 / sum;
                    for v in row[..=t].iter_mut() {
                        *v *= inv;
                    }
                    row[t + 1..].fill(0.0);
                    let o = &mut out_b[t * c + h * hs..][..hs];
                    o.fill(0.0);
                    for (t2, &a) in row[..=t].iter().enumerate() {
                        axpy(o, a, &qkv_b[t2 * 3 * c + 2 * c + h * hs..][..hs]);
                    }
                }
            }
        });
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
            dqkv_b.fill(0.0);
            let mut datt = vec![0.0f32; t_len];
            let mut dq = vec![0.0f32; hs];
            for t in 0..t_len {
                for h in 0..nh {
                    let row = &att_b[(h * t_len + t) * t_len..][..t_len];
                    let d = &dout_b[t * c + h * hs..][..hs];
                    for t2 in 0..=t {
                        let v_off = t2 * 3 * c + 2 * c + h * hs;
                        datt[t2] = dot(d, &qkv_b[v_off..][..hs]);
                        axpy(&mut dqkv_b[v_off..][..hs], row[t2], d);
                    }
                    let weighted: f32 = row[..=t].iter().zip(&datt[..=t]).map(|(a, g)| a * g).sum();
                    let q_off = t * 3 * c + h * hs;
                    let q = &qkv_b[q_off..][..hs];
                    // dq gathers in its own buffer: written in place it would alias dk's rows and
                    // the compiler would not vectorise either.
                    dq.fill(0.0);
                    for t2 in 0..=t {
                        let dpre = row[t2] * (datt[t2] - weighted) * scale;
                        let k_off = t2 * 3 * c + c + h * hs;
                        axpy(&mut dq, dpre, &qkv_b[k_off..][..hs]);
                        axpy(&mut dqkv_b[k_off..][..hs], dpre, q);
                    }
                    dqkv_b[q_off..][..hs].copy_from_slice(&dq);
                }
            }
        });
}

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2/π)

pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    let wide = wide_vectors();
    out.par_chunks_mut(4096).zip(inp.par_chunks(4096)).for_each(|(o, x)| {
        #[cfg(target_arch = "x86_64")]
        if wide {
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
    let wide = wide_vectors();
    dinp.par_chunks_mut(4096).zip(inp.par_chunks(4096)).zip(dout.par_chunks(4096)).for_each(|((di, x), d)| {
        #[cfg(target_arch = "x86_64")]
        if wide {
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
    for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
        *o = a + b;
    }
}

/// Softmax over the vocabulary and the masked cross-entropy. Writes probabilities into `probs`
/// and returns `(Σ mask · loss, Σ mask)` in f64.
pub fn softmax_crossentropy(probs: &mut [f32], logits: &[f32], targets: &[u8], mask: &[f32], v: usize) -> (f64, f64) {
    probs.par_chunks_mut(v).zip(logits.par_chunks(v)).for_each(|(p, l)| {
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for (p, &l) in p.iter_mut().zip(l) {
            *p = exp(l - max);
            sum += *p;
        }
        let inv = 1.0 / sum;
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
    fn dot_matches_naive_sum_closely() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.1).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
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
