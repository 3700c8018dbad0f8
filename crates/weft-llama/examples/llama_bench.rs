//! Speed of the Llama forward pass and of LoRA training, for bench/run (beside PyTorch's on the
//! same weights and tokens, bench/llama_torch.py). Prints one JSON object.
//!
//! usage: llama_bench MODEL_DIR TEXT BATCH CONTEXT REPEATS TOKENS_OUT
//!   MODEL_DIR   a directory written by `weft model import`
//!   TEXT        UTF-8 text; its first BATCH × CONTEXT tokens are the batch (also written to
//!               TOKENS_OUT as JSON, so that the baseline scores the same ids)
//! Threads: RAYON_NUM_THREADS.

use std::time::Instant;

use weft_core::ModelState;
use weft_llama::{Adapters, Llama, LlamaConfig, LlamaTokenizer, LoraSpec, LoraTrainer, LoraTraining, Projection};

fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 7 {
        return Err("usage: llama_bench MODEL_DIR TEXT BATCH CONTEXT REPEATS TOKENS_OUT".into());
    }
    let dir = std::path::Path::new(&args[1]);
    let (batch, context, repeats): (usize, usize, usize) = (args[3].parse()?, args[4].parse()?, args[5].parse()?);
    let config = LlamaConfig::from_json(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let tokenizer = LlamaTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let tokens = tokenizer.encode(&std::fs::read_to_string(&args[2])?)?;
    if tokens.len() < batch * context {
        return Err(format!("the text has {} tokens, fewer than {batch} × {context}", tokens.len()).into());
    }
    let tokens = &tokens[..batch * context];
    std::fs::write(&args[6], serde_json::to_vec(tokens)?)?;
    let load = Instant::now();
    let state = ModelState::from_safetensors(&std::fs::read(dir.join("model.safetensors"))?)?;
    let model = Llama::from_state(config.clone(), &state)?;
    drop(state);
    let load_seconds = load.elapsed().as_secs_f64();
    let sequences: Vec<&[u32]> = tokens.chunks_exact(context).collect();

    // Forward: the mean next-token loss of every sequence (what the coordinator's scoring does).
    let mut forward = Vec::new();
    let mut loss = 0.0;
    for _ in 0..repeats {
        let started = Instant::now();
        let (mut nats, mut count) = (0.0, 0);
        for (sum, n) in model.nll_sequences(&sequences, None)? {
            nats += sum;
            count += n;
        }
        forward.push(started.elapsed().as_secs_f64());
        loss = nats / count as f64;
    }

    // LoRA training: rank 8, alpha 16 on every projection, A frozen, one AdamW step per batch
    // (what a node does each round).
    let spec = LoraSpec { rank: 8, alpha: 16.0, targets: Projection::ALL.to_vec() };
    let mut adapters = Adapters::init(&config, spec, 1)?;
    let mut trainer = LoraTrainer::new(LoraTraining { lr: 5e-3, ..LoraTraining::default() }, &adapters);
    let mut train = Vec::new();
    let mut first_step_loss = f64::NAN;
    for repeat in 0..=repeats {
        let started = Instant::now();
        let step_loss = trainer.step(&model, &mut adapters, &sequences)?;
        // The first step is a warm-up (buffers, page faults): not timed.
        if repeat == 0 {
            first_step_loss = step_loss;
        } else {
            train.push(started.elapsed().as_secs_f64());
        }
    }
    let predicted = (batch * (context - 1)) as f64;
    let processed = (batch * context) as f64;
    let report = serde_json::json!({
        "threads": rayon::current_num_threads(),
        "batch": batch,
        "context": context,
        "load_seconds": load_seconds,
        "forward_seconds": forward,
        "forward_tokens_per_s": processed / median(forward.clone()),
        "train_seconds": train,
        "train_tokens_per_s": processed / median(train.clone()),
        "mean_nll": loss,
        "first_step_loss": first_step_loss,
        "predicted": predicted,
        "peak_rss_bytes": peak_rss(),
    });
    println!("{report}");
    Ok(())
}
