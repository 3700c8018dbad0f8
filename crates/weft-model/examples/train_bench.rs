//! Local-training throughput of the built-in trainer, for `bench/run`.
//!
//! Usage: train_bench [--profile] TEXT_FILE STEPS [LAYERS HEADS WIDTH CONTEXT BATCH]
//! Threads: RAYON_NUM_THREADS. Prints one JSON line: tokens/s over STEPS after 3 warm-up steps;
//! with `--profile`, also the wall time per kernel per step (`weft_model::profile`).

use std::time::Instant;

use weft_model::{AdamW, AdamWSettings, Gpt, GptConfig, SplitMix64};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let profile = args.first().is_some_and(|a| a == "--profile");
    if profile {
        args.remove(0);
    }
    let num = |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let Some(path) = args.first() else {
        eprintln!("usage: train_bench [--profile] TEXT_FILE STEPS [LAYERS HEADS WIDTH CONTEXT BATCH]");
        std::process::exit(2);
    };
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("train_bench: {path}: {e}");
            std::process::exit(2);
        }
    };
    let steps = num(1, 30) as u64;
    let config = GptConfig { layers: num(2, 2), heads: num(3, 4), width: num(4, 128), context: num(5, 64) };
    let batch = num(6, 16);
    let mut model = match Gpt::init(config, 0) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("train_bench: {e}");
            std::process::exit(2);
        }
    };
    let mut opt = AdamW::new(AdamWSettings { lr: 3e-4, warmup_steps: 0, ..AdamWSettings::default() }, &model);
    let mut rng = SplitMix64::new(1);
    opt.train(&mut model, &text, 3, batch, &mut rng, |_, _| {});
    if profile {
        weft_model::profile::enable();
    }
    let started = Instant::now();
    let report = opt.train(&mut model, &text, steps, batch, &mut rng, |_, _| {});
    let seconds = started.elapsed().as_secs_f64();
    let kernels: Vec<String> = weft_model::profile::take()
        .iter()
        .map(|k| {
            format!(
                "{{\"kernel\": \"{}\", \"seconds_per_step\": {}, \"calls\": {}}}",
                k.kernel,
                k.seconds / steps as f64,
                k.calls
            )
        })
        .collect();
    println!(
        "{{\"threads\": {}, \"parameters\": {}, \"steps\": {steps}, \"tokens\": {}, \"seconds\": {seconds}, \"tokens_per_s\": {}, \"final_loss\": {}, \"profile\": [{}]}}",
        rayon::current_num_threads(),
        model.num_params(),
        report.tokens,
        report.tokens as f64 / seconds,
        report.final_loss,
        kernels.join(", ")
    );
}
