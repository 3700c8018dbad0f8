//! `weft model`: bring a pretrained open-weights base in (`import`), and look at it (`score`,
//! `generate`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use weft_core::ModelState;
use weft_llama::{Gguf, Llama, LlamaConfig, LlamaTokenizer};

use crate::say;

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Import a GGUF file (llama, qwen2) into Hugging Face's layout: model.safetensors (f32),
    /// config.json, tokenizer.json, tokenizer_config.json and weft-import.json (provenance).
    Import(ImportArgs),
    /// Held-out loss of an imported model on a text file, in bits per byte.
    Score(ScoreArgs),
    /// Greedy continuation of a prompt.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The GGUF file (`scripts/fetch-model` fetches SmolLM2-135M-Instruct).
    pub file: PathBuf,
    /// The directory to write; created if absent, refused if it already holds an import.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// A directory written by `weft model import`.
    pub model: PathBuf,
    /// A UTF-8 text file.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per window; consecutive windows share one token, so every token but the first is
    /// predicted exactly once.
    #[arg(long, default_value_t = 256)]
    pub context: usize,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A directory written by `weft model import`.
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
}

/// The files of an imported model directory.
const OUTPUTS: [&str; 5] =
    ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "weft-import.json"];

pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Import(args) => import(args),
        ModelCommand::Score(args) => score(args),
        ModelCommand::Generate(args) => generate(args),
    }
}

fn import(args: ImportArgs) -> anyhow::Result<()> {
    if let Some(existing) = OUTPUTS.iter().map(|name| args.out.join(name)).find(|path| path.exists()) {
        bail!("{} already exists: choose another --out, or delete the old import first", existing.display());
    }
    let file = std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    // SAFETY: the map is only read; a file changed underneath us can give a wrong import (its
    // SHA-256 in the manifest then differs from the publisher's), not unsafety in this process.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", args.file.display()))?;
    let gguf = Gguf::parse(&bytes).with_context(|| format!("{}", args.file.display()))?;
    let imported = weft_llama::import(&bytes, &gguf).with_context(|| format!("importing {}", args.file.display()))?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let weights = imported.state.to_safetensors(None)?;
    let manifest = serde_json::to_string_pretty(&imported.manifest)? + "\n";
    // The manifest last: its presence says the other files are complete.
    for (name, content) in [
        ("model.safetensors", weights.as_slice()),
        ("config.json", imported.config.to_json().as_bytes()),
        ("tokenizer.json", imported.tokenizer.as_bytes()),
        ("tokenizer_config.json", imported.tokenizer_config.as_bytes()),
        ("weft-import.json", manifest.as_bytes()),
    ] {
        let path = args.out.join(name);
        weft_durable::write_atomic(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    let m = &imported.manifest;
    say!(
        "imported {} ({}, {} parameters in {} tensors)",
        m.name.as_deref().unwrap_or("model"),
        m.architecture,
        m.parameters,
        m.tensors
    );
    say!("  source     {} ({} bytes, SHA-256 {})", args.file.display(), m.source_bytes, m.source_sha256);
    say!("  state hash {}", m.state_hash);
    say!("  written    {}", args.out.display());
    Ok(())
}

/// An imported model directory, loaded.
struct Loaded {
    model: Llama,
    tokenizer: LlamaTokenizer,
}

fn load(dir: &Path) -> anyhow::Result<Loaded> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).with_context(|| {
            format!("reading {} (is {} a directory written by `weft model import`?)", path.display(), dir.display())
        })
    };
    let config_path = dir.join("config.json");
    let config = LlamaConfig::from_json(&String::from_utf8_lossy(&read("config.json")?))
        .with_context(|| format!("{}", config_path.display()))?;
    let state = ModelState::from_safetensors(&read("model.safetensors")?)
        .with_context(|| format!("{}", dir.join("model.safetensors").display()))?;
    let model =
        Llama::from_state(config, &state).with_context(|| format!("{}", dir.join("model.safetensors").display()))?;
    drop(state);
    let tokenizer = LlamaTokenizer::from_file(&dir.join("tokenizer.json"))?;
    Ok(Loaded { model, tokenizer })
}

fn score(args: ScoreArgs) -> anyhow::Result<()> {
    if args.context < 2 {
        bail!("--context {}: a window needs at least 2 tokens", args.context);
    }
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {} (UTF-8 text expected)", args.text.display()))?;
    let loaded = load(&args.model)?;
    let tokens = loaded.tokenizer.encode(&text)?;
    if tokens.len() < 2 {
        bail!("{}: fewer than 2 tokens, nothing to predict", args.text.display());
    }
    let context = args.context.min(loaded.model.config().max_position_embeddings);
    let (mut nats, mut predicted) = (0.0f64, 0usize);
    let mut start = 0;
    while start + 1 < tokens.len() {
        let window = &tokens[start..(start + context).min(tokens.len())];
        let (sum, count) = loaded.model.nll(window)?;
        nats += sum;
        predicted += count;
        start += context - 1;
    }
    // Bytes predicted: the whole text but the first token's.
    let first = loaded.tokenizer.decode(&tokens[..1])?.len();
    let bytes = text.len().saturating_sub(first).max(1);
    let bits_per_byte = nats / std::f64::consts::LN_2 / bytes as f64;
    say!(
        "{}: {:.4} bits/byte ({:.4} nats/token over {predicted} tokens, {:.2} bytes/token)",
        args.text.display(),
        bits_per_byte,
        nats / predicted as f64,
        bytes as f64 / predicted as f64
    );
    Ok(())
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let loaded = load(&args.model)?;
    let prompt = loaded.tokenizer.encode(&args.prompt)?;
    if prompt.is_empty() {
        bail!("--prompt is empty");
    }
    let continuation = loaded.model.greedy(&prompt, args.tokens)?;
    say!("{}{}", args.prompt, loaded.tokenizer.decode(&continuation)?);
    Ok(())
}
