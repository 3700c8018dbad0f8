//! In-process measurements for `bench/run`; each prints one JSON line.
//!
//! * `perf bandwidth LEN` — STREAM-style copy and triad over LEN f32 (the roofline).
//! * `perf aggregate N LEN REPEATS` — `weighted_sum` over N deltas of LEN f32, each repeat right
//!   after a copy of LEN f32 (the roofline of that moment).
//! * `perf safetensors LEN` — encode and decode a LEN-value state.
//!
//! Threads: rayon's (RAYON_NUM_THREADS). Times are best of the repeats.

use std::time::Instant;

use rayon::prelude::*;
use weft_core::aggregate::weighted_sum;
use weft_core::{ModelState, Tensor};

fn best(repeats: usize, mut f: impl FnMut()) -> f64 {
    (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| args.get(i).and_then(|a| a.parse::<usize>().ok());
    let threads = rayon::current_num_threads();
    match (args.first().map(String::as_str), num(1), num(2), num(3)) {
        (Some("bandwidth"), Some(len), _, _) => {
            let b: Vec<f32> = (0..len).into_par_iter().map(|i| (i % 1000) as f32).collect();
            let c: Vec<f32> = (0..len).into_par_iter().map(|i| (i % 7) as f32).collect();
            let mut a = vec![0.0f32; len];
            const CHUNK: usize = 1 << 16;
            let copy = best(5, || {
                a.par_chunks_mut(CHUNK).zip(b.par_chunks(CHUNK)).for_each(|(a, b)| a.copy_from_slice(b));
            });
            let triad = best(5, || {
                a.par_chunks_mut(CHUNK).zip(b.par_chunks(CHUNK)).zip(c.par_chunks(CHUNK)).for_each(|((a, b), c)| {
                    for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                        *a = b + 3.0 * c;
                    }
                });
            });
            let bytes = (len * 4) as f64;
            println!(
                "{{\"threads\": {threads}, \"len\": {len}, \"copy_gbs\": {}, \"triad_gbs\": {}}}",
                2.0 * bytes / copy / 1e9,
                3.0 * bytes / triad / 1e9
            );
        }
        (Some("aggregate"), Some(n), Some(len), repeats) => {
            let inputs: Vec<Vec<f32>> = (0..n)
                .map(|i| (0..len).into_par_iter().map(|j| ((j * 31 + i * 17) % 1000) as f32 * 1e-3).collect())
                .collect();
            let weights: Vec<f32> = (0..n).map(|i| 1.0 / (n + i) as f32).collect();
            let pairs: Vec<(f32, &[f32])> = weights.iter().copied().zip(inputs.iter().map(Vec::as_slice)).collect();
            let mut out = vec![0.0f32; len];
            let before = peak_rss();
            // The roofline is measured in the same loop: a copy of one input into `out`, right
            // before each aggregation, so both see the same share of this (shared) host's
            // bandwidth. Best of the repeats for each, as STREAM does.
            let (mut seconds, mut copy_seconds) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..repeats.unwrap_or(3).max(1) {
                copy_seconds = copy_seconds.min(best(1, || {
                    out.par_chunks_mut(1 << 16)
                        .zip(inputs[0].par_chunks(1 << 16))
                        .for_each(|(o, x)| o.copy_from_slice(x))
                }));
                seconds = seconds.min(best(1, || weighted_sum(&mut out, &pairs).unwrap_or(())));
            }
            let read = (n * len * 4) as f64;
            println!(
                "{{\"threads\": {threads}, \"n\": {n}, \"len\": {len}, \"seconds\": {seconds}, \"gbs\": {}, \"copy_gbs\": {}, \"peak_rss\": {}, \"inputs_bytes\": {}, \"overhead_bytes\": {}}}",
                (read + (len * 4) as f64) / seconds / 1e9,
                (2 * len * 4) as f64 / copy_seconds / 1e9,
                peak_rss(),
                n * len * 4,
                peak_rss().saturating_sub(before)
            );
        }
        (Some("safetensors"), Some(len), _, _) => {
            let mut state = ModelState::new();
            let per = len / 4;
            for k in 0..4 {
                let data = (0..per).map(|i| (i % 977) as f32 * 1e-3).collect();
                state.insert(format!("t{k}"), Tensor::new(vec![per], data).unwrap_or_else(|_| Tensor::zeros(vec![0])));
            }
            let mut bytes = Vec::new();
            let encode = best(3, || bytes = state.to_safetensors(None).unwrap_or_default());
            let decode = best(3, || drop(ModelState::from_safetensors(&bytes)));
            let hash = best(3, || {
                std::hint::black_box(state.content_hash());
            });
            let size = (per * 4 * 4) as f64;
            println!(
                "{{\"len\": {}, \"encode_gbs\": {}, \"decode_gbs\": {}, \"hash_gbs\": {}}}",
                per * 4,
                size / encode / 1e9,
                size / decode / 1e9,
                size / hash / 1e9
            );
        }
        _ => {
            eprintln!("usage: perf bandwidth LEN | perf aggregate N LEN [REPEATS] | perf safetensors LEN");
            std::process::exit(2);
        }
    }
}
