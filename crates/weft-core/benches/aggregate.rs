//! The aggregation kernel: Σ wᵢ·Δᵢ over N deltas, in bytes of delta read per second.
//!
//! `weighted_sum` reads all N inputs chunk by chunk in one pass over the output (the kernel a
//! coordinator with the deltas in memory would use); `streamed_axpy` adds one delta at a time
//! into the step, which is what the coordinator does while streaming deltas from its store
//! (memory independent of N). Run: `cargo bench -p weft-core --bench aggregate`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use weft_core::aggregate::{axpy, weighted_sum};

const LEN: usize = 4 * 1024 * 1024; // 4M f32 = 16 MiB per delta

fn deltas(n: usize) -> Vec<Vec<f32>> {
    (0..n).map(|i| (0..LEN).map(|j| ((j * 31 + i * 17) % 1000) as f32 * 1e-3 - 0.5).collect()).collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("aggregate");
    group.sample_size(10);
    for n in [4usize, 16] {
        let inputs = deltas(n);
        let weights: Vec<f32> = (0..n).map(|i| 1.0 / (n + i) as f32).collect();
        let pairs: Vec<(f32, &[f32])> = weights.iter().copied().zip(inputs.iter().map(Vec::as_slice)).collect();
        let mut out = vec![0.0f32; LEN];
        group.throughput(Throughput::Bytes((n * LEN * 4) as u64));
        group.bench_with_input(BenchmarkId::new("weighted_sum", n), &n, |b, _| {
            b.iter(|| weighted_sum(&mut out, &pairs).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("streamed_axpy", n), &n, |b, _| {
            b.iter(|| {
                out.fill(0.0);
                for (w, x) in &pairs {
                    axpy(&mut out, *w, x).unwrap();
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
