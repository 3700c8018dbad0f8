//! Forward and backward kernels of the transformer, after Karpathy's llm.c.
//!
//! Shapes: `N = B·T` rows, `C` channels. Matrices are `[out, in]`. Every output element is
//! produced by one thread in a fixed order, so results do not depend on the thread count.
//! Backward kernels overwrite `dinp` unless they say they accumulate; weight gradients always
//! accumulate.

use rayon::prelude::*;

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
    let wide = wide_vectors();
    #[cfg(not(target_arch = "x86_64"))]
    let _ = wide;
    out.par_chunks_mut(oc).zip(inp.par_chunks(c)).for_each(|(o_row, x)| {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: `wide_vectors` checked that this CPU has AVX2.
            return unsafe { avx2::forward_row(o_row, x, w, bias, c) };
        }
        forward_row(o_row, x, w, bias, c);
    });
}

#[inline(always)]
fn forward_row(o_row: &mut [f32], x: &[f32], w: &[f32], bias: Option<&[f32]>, c: usize) {
    for (o, (out_v, w_row)) in o_row.iter_mut().zip(w.chunks_exact(c)).enumerate() {
        *out_v = bias.map_or(0.0, |b| b[o]) + dot(x, w_row);
    }
}

#[inline(always)]
fn input_grad_row(di: &mut [f32], d: &[f32], w: &[f32], c: usize) {
    di.fill(0.0);
    for (&g, w_row) in d.iter().zip(w.chunks_exact(c)) {
        axpy(di, g, w_row);
    }
}

#[inline(always)]
fn weight_grad_row(dw_row: &mut [f32], o: usize, dout: &[f32], inp: &[f32], n: usize, c: usize, oc: usize) {
    for row in 0..n {
        axpy(dw_row, dout[row * oc + o], &inp[row * c..][..c]);
    }
}

/// Whether the matmul rows may run the AVX2 build of the same loops. The loops have the same
/// operations in the same order either way (AVX2 only widens the eight accumulators into one
/// register; Rust never fuses a multiply and an add), so the results are bitwise identical on
/// any x86-64 CPU — tested against the portable build below.
fn wide_vectors() -> bool {
    // Decided once per process (`WEFT_NO_AVX2` forces the portable build, for comparison).
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WIDE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var_os("WEFT_NO_AVX2").is_none() && std::arch::is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// The matmul rows compiled for AVX2 (runtime-selected by [`wide_vectors`]).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub unsafe fn forward_row(o_row: &mut [f32], x: &[f32], w: &[f32], bias: Option<&[f32]>, c: usize) {
        super::forward_row(o_row, x, w, bias, c)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn input_grad_row(di: &mut [f32], d: &[f32], w: &[f32], c: usize) {
        super::input_grad_row(di, d, w, c)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn weight_grad_row(
        dw_row: &mut [f32],
        o: usize,
        dout: &[f32],
        inp: &[f32],
        n: usize,
        c: usize,
        oc: usize,
    ) {
        super::weight_grad_row(dw_row, o, dout, inp, n, c, oc)
    }
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
    let wide = wide_vectors();
    #[cfg(not(target_arch = "x86_64"))]
    let _ = wide;
    dinp.par_chunks_mut(c).zip(dout.par_chunks(oc)).for_each(|(di, d)| {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: `wide_vectors` checked that this CPU has AVX2.
            return unsafe { avx2::input_grad_row(di, d, w, c) };
        }
        input_grad_row(di, d, w, c);
    });
    let n = dout.len() / oc;
    dw.par_chunks_mut(c).enumerate().for_each(|(o, dw_row)| {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: as above.
            return unsafe { avx2::weight_grad_row(dw_row, o, dout, inp, n, c, oc) };
        }
        weight_grad_row(dw_row, o, dout, inp, n, c, oc);
    });
    if let Some(db) = dbias {
        db.par_iter_mut().enumerate().for_each(|(o, b)| {
            for row in 0..n {
                *b += dout[row * oc + o];
            }
        });
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
                        *v = (*v - max).exp();
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
                    for t2 in 0..=t {
                        let dpre = row[t2] * (datt[t2] - weighted) * scale;
                        let k_off = t2 * 3 * c + c + h * hs;
                        // dq += dpre · k ; dk += dpre · q  (q and k live in disjoint ranges)
                        for i in 0..hs {
                            dqkv_b[q_off + i] += dpre * qkv_b[k_off + i];
                            dqkv_b[k_off + i] += dpre * qkv_b[q_off + i];
                        }
                    }
                }
            }
        });
}

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2/π)

pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    out.par_chunks_mut(4096).zip(inp.par_chunks(4096)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            let cube = 0.044715 * x * x * x;
            *o = 0.5 * x * (1.0 + (GELU_SCALE * (x + cube)).tanh());
        }
    });
}

/// Overwrites `dinp`.
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    dinp.par_chunks_mut(4096).zip(inp.par_chunks(4096)).zip(dout.par_chunks(4096)).for_each(|((di, x), d)| {
        for ((di, &x), &d) in di.iter_mut().zip(x).zip(d) {
            let cube = 0.044715 * x * x * x;
            let arg = GELU_SCALE * (x + cube);
            let th = arg.tanh();
            let sech2 = 1.0 - th * th;
            let local = 0.5 * (1.0 + th) + x * 0.5 * sech2 * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x);
            *di = local * d;
        }
    });
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
            *p = (l - max).exp();
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
    fn avx2_rows_match_the_portable_rows_bit_for_bit() {
        assert!(std::arch::is_x86_feature_detected!("avx2"), "this test needs an AVX2 machine");
        let (c, oc, n) = (37, 11, 5);
        let values = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0)
                .collect()
        };
        let (x, w, bias, dout) = (values(c, 1), values(oc * c, 2), values(oc, 3), values(n * oc, 4));
        let inp = values(n * c, 5);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let (mut a, mut b) = (vec![0.0; oc], vec![0.0; oc]);
        forward_row(&mut a, &x, &w, Some(&bias), c);
        // SAFETY: AVX2 asserted above.
        unsafe { avx2::forward_row(&mut b, &x, &w, Some(&bias), c) };
        assert_eq!(bits(&a), bits(&b));
        let (mut a, mut b) = (vec![0.0; c], vec![0.0; c]);
        input_grad_row(&mut a, &dout[..oc], &w, c);
        unsafe { avx2::input_grad_row(&mut b, &dout[..oc], &w, c) };
        assert_eq!(bits(&a), bits(&b));
        let (mut a, mut b) = (values(c, 6), values(c, 6));
        weight_grad_row(&mut a, 3, &dout, &inp, n, c, oc);
        unsafe { avx2::weight_grad_row(&mut b, 3, &dout, &inp, n, c, oc) };
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
