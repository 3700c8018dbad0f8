//! weft's logits for bench/run's parity check against Hugging Face transformers
//! (`bench/transformers_parity.py compare`): the held-out text as the coordinator takes it (the
//! last 1200 bytes of a corpus, from a line start), tokenized, scored in one sequence.
//!
//! usage: llama_logits MODEL_DIR TEXT TOKENS_OUT LOGITS_OUT
//!   writes the token ids as JSON and the logits as little-endian f32, [tokens × vocabulary].

use weft_core::ModelState;
use weft_llama::{Llama, LlamaConfig, LlamaTokenizer};

const HELDOUT_BYTES: usize = 1200;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        return Err("usage: llama_logits MODEL_DIR TEXT TOKENS_OUT LOGITS_OUT".into());
    }
    let dir = std::path::Path::new(&args[1]);
    let config = LlamaConfig::from_json(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let tokenizer = LlamaTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let text = std::fs::read_to_string(&args[2])?;
    let from = text.len().saturating_sub(HELDOUT_BYTES);
    let start = text.as_bytes()[from..].iter().position(|&b| b == b'\n').map_or(from, |i| from + i + 1);
    let tokens = tokenizer.encode(text.get(start..).ok_or("the held-out text does not start at a character")?)?;
    std::fs::write(&args[3], serde_json::to_vec(&tokens)?)?;
    let state = ModelState::from_safetensors(&std::fs::read(dir.join("model.safetensors"))?)?;
    let model = Llama::from_state(config, &state)?;
    drop(state);
    let logits = model.logits(&tokens)?;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&args[4], bytes)?;
    Ok(())
}
