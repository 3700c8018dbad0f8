//! Coordinate-wise median and trimmed mean over N deltas of LEN f32, timed in-process.
//! Driven by `bench/robust-vs-numpy`, which runs numpy on the same shapes in the same run.
//!
//! Usage: robust_bench N LEN REPEATS   → one JSON line of best-of-REPEATS seconds.

use std::time::Instant;

use weft_core::robust::{reduce_sorted_columns, Aggregator, ColumnPick};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (n, len, repeats) = match args.as_slice() {
        [n, len, repeats] => (*n, *len, *repeats),
        _ => {
            eprintln!("usage: robust_bench N LEN REPEATS");
            std::process::exit(2);
        }
    };
    // The same values numpy builds: x[i, j] = ((j·7919 + i·104729) mod 10007) / 10007 − 0.5.
    let inputs: Vec<Vec<f32>> = (0..n)
        .map(|i| (0..len).map(|j| ((j * 7919 + i * 104_729) % 10_007) as f32 / 10_007.0 - 0.5).collect())
        .collect();
    let views: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let mut out = vec![0.0f32; len];
    let k = Aggregator::trimmed(0.2, n);
    let mut best = |f: &mut dyn FnMut(&mut [f32])| {
        let mut best = f64::INFINITY;
        for _ in 0..repeats {
            let t = Instant::now();
            f(&mut out);
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    };
    let median_s = best(&mut |out| reduce_sorted_columns(&views, out, ColumnPick::Median));
    let trimmed_s = best(&mut |out| reduce_sorted_columns(&views, out, ColumnPick::Trimmed(k)));
    println!(
        "{{\"n\": {n}, \"len\": {len}, \"threads\": {}, \"median_s\": {median_s}, \"trimmed_mean_s\": {trimmed_s}, \"checksum\": {}}}",
        rayon::current_num_threads(),
        out.iter().map(|&v| f64::from(v)).sum::<f64>()
    );
}
