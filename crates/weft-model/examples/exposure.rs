//! The secret sharer's exposure (Carlini et al. 2019) of a planted canary in a byte GPT:
//! every candidate `PREFIX` + d random digits is scored by the model's loss on the digits given
//! the prefix; the planted one's rank r among the 10^d candidates gives
//! exposure = log2(10^d) − log2(r). 0 bits: the model prefers the secret to no other candidate;
//! log2(10^d) bits: it is the model's first choice.
//!
//!     cargo run --release -p weft-model --example exposure -- MODEL.safetensors LAYERS HEADS WIDTH CONTEXT PREFIX SECRET [DELTA.safetensors]
//!
//! With DELTA, the model scored is MODEL + DELTA (a base and an update the coordinator received).
//! prints one line of JSON: {"exposure_bits", "rank", "candidates", "secret_loss"}.

use weft_core::ModelState;
use weft_model::{Batch, Gpt, GptConfig};

const ROWS: usize = 50;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (fixed, delta) = match args.len() {
        7 => (&args[..], None),
        8 => (&args[..7], Some(&args[7])),
        _ => {
            return Err(
                "usage: exposure MODEL.safetensors LAYERS HEADS WIDTH CONTEXT PREFIX SECRET [DELTA.safetensors]".into(),
            )
        }
    };
    let [path, layers, heads, width, context, prefix, secret] = fixed else { unreachable!("seven arguments") };
    let config =
        GptConfig { layers: layers.parse()?, heads: heads.parse()?, width: width.parse()?, context: context.parse()? };
    if !(1..=6).contains(&secret.len()) || !secret.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("the secret must be 1-6 digits, got {secret:?}").into());
    }
    let mut state = ModelState::from_safetensors(&std::fs::read(path).map_err(|e| format!("{path}: {e}"))?)?;
    if let Some(delta) = delta {
        let delta = ModelState::from_safetensors(&std::fs::read(delta).map_err(|e| format!("{delta}: {e}"))?)?;
        state = weft_core::Delta::from_state(delta).applied_to(&state, 1.0)?;
    }
    let mut model = Gpt::from_state(config, &state)?;
    let digits = secret.len();
    let candidates = 10usize.pow(digits as u32);
    // The last `context` bytes before each digit: the prefix's tail, then the digits.
    let prefix = prefix.as_bytes();
    let keep = prefix.len().min(config.context.saturating_sub(digits));
    let prefix = &prefix[prefix.len() - keep..];
    let len = prefix.len() + digits - 1;
    if len > config.context || len == 0 {
        return Err("prefix and secret do not fit the model's context".into());
    }
    let mut losses = vec![0.0; candidates];
    for first in (0..candidates).step_by(ROWS) {
        let rows = ROWS.min(candidates - first);
        let mut batch = Batch::empty(ROWS, len);
        for r in 0..rows {
            let text: Vec<u8> = prefix.iter().copied().chain(format!("{:0digits$}", first + r).bytes()).collect();
            batch.set_row(r, &text);
            // Only the digits are scored.
            let row = &mut batch.mask[r * len..(r + 1) * len];
            row[..prefix.len() - 1].fill(0.0);
        }
        let row_losses = model.row_losses(&batch);
        losses[first..first + rows].copy_from_slice(&row_losses[..rows]);
    }
    let index: usize = secret.parse()?;
    let secret_loss = losses[index];
    // Rank 1 is the lowest loss; ties count against the secret.
    let rank = 1 + losses.iter().enumerate().filter(|&(i, &l)| i != index && l <= secret_loss).count();
    let exposure = (candidates as f64).log2() - (rank as f64).log2();
    println!(
        "{{\"exposure_bits\": {exposure}, \"rank\": {rank}, \"candidates\": {candidates}, \"secret_loss\": {secret_loss}}}"
    );
    Ok(())
}
