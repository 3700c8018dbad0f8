//! `weft inspect FILE`: what is in a safetensors file, and its content hash.

use std::path::PathBuf;

use anyhow::Context;
use weft_core::ModelState;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// A safetensors file (a base, a delta or a sovereign artifact).
    pub file: PathBuf,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let state = ModelState::from_safetensors(&bytes).with_context(|| format!("parsing {}", args.file.display()))?;
    for (name, tensor) in state.iter() {
        let non_finite = tensor.first_non_finite().map_or(String::new(), |i| format!("  non-finite at {i}"));
        println!("{name:<28} {:<14} {:>10}{non_finite}", format!("{:?}", tensor.shape()), tensor.len());
    }
    println!("{} tensors, {} values", state.len(), state.num_values());
    println!("content hash {}", state.content_hash());
    Ok(())
}
