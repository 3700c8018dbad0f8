//! `weft model`: bring a pretrained open-weights base in (`import`), and look at it (`score`,
//! `generate`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use weft_core::ModelState;
use weft_llama::{
    Adapters, Gguf, Llama, LlamaConfig, LlamaTokenizer, LoraSpec, LoraTrainer, LoraTraining, Projection, Windows,
};
use weft_model::SplitMix64;

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
    /// Train a LoRA adapter on a corpus with the base frozen; held-out bits per byte before and
    /// after.
    Adapt(AdaptArgs),
}

#[derive(clap::Args)]
pub struct AdaptArgs {
    /// A directory written by `weft model import`.
    pub model: PathBuf,
    /// The training text (UTF-8).
    #[arg(long)]
    pub corpus: PathBuf,
    /// Held-out text (UTF-8), never trained on.
    #[arg(long)]
    pub heldout: PathBuf,
    /// Held-out tokens scored (from the start of the file), to bound the evaluation's cost.
    #[arg(long, default_value_t = 2048)]
    pub heldout_tokens: usize,
    #[arg(long, default_value_t = 20)]
    pub steps: u64,
    /// Windows per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// The adapter's scale is alpha / rank.
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// Adapted projections, comma-separated: q, k, v, o, gate, up, down.
    #[arg(long, default_value = "q,k,v,o,gate,up,down", value_delimiter = ',')]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f32,
    /// Train A as well as B (A is otherwise frozen at its seeded orthonormal draw).
    #[arg(long)]
    pub train_a: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the adapter (safetensors, PEFT-style names).
    #[arg(long)]
    pub out: Option<PathBuf>,
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
    #[arg(long, default_value_t = SCORE_CONTEXT)]
    pub context: usize,
}

/// Tokens per scoring window, for `score` and `adapt`'s held-out measurements alike.
const SCORE_CONTEXT: usize = 512;

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
        ModelCommand::Adapt(args) => adapt(args),
    }
}

fn import(args: ImportArgs) -> anyhow::Result<()> {
    let m = import_dir(&args.file, &args.out)?;
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

/// Imports the GGUF `file` into the directory `out` (which must not hold an import yet).
pub(crate) fn import_dir(file: &Path, out: &Path) -> anyhow::Result<weft_llama::ImportManifest> {
    if let Some(existing) = OUTPUTS.iter().map(|name| out.join(name)).find(|path| path.exists()) {
        bail!("{} already exists: choose another --out, or delete the old import first", existing.display());
    }
    let handle = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    // SAFETY: the map is only read; a file changed underneath us can give a wrong import (its
    // SHA-256 in the manifest then differs from the publisher's), not unsafety in this process.
    let bytes = unsafe { memmap2::Mmap::map(&handle) }.with_context(|| format!("mapping {}", file.display()))?;
    let gguf = Gguf::parse(&bytes).with_context(|| format!("{}", file.display()))?;
    let imported = weft_llama::import(&bytes, &gguf).with_context(|| format!("importing {}", file.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
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
        let path = out.join(name);
        weft_durable::write_atomic(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(imported.manifest)
}

/// An imported model directory, loaded.
struct Loaded {
    model: Llama,
    tokenizer: LlamaTokenizer,
}

/// A text's loss under a model: in nats, per token and per byte.
struct Score {
    nats: f64,
    predicted: usize,
    /// UTF-8 bytes of the predicted tokens (all but the first).
    bytes: usize,
    bits_per_byte: f64,
}

impl Loaded {
    /// Scores `tokens` in windows of `context`; bytes are those the predicted tokens decode to,
    /// so that a truncated text is measured by what was scored.
    fn bits_per_byte(&self, tokens: &[u32], adapters: Option<&Adapters>, context: usize) -> anyhow::Result<Score> {
        let (nats, predicted) = self.model.score(tokens, adapters, context)?;
        let bytes = self.tokenizer.decode(&tokens[1..])?.len().max(1);
        Ok(Score { nats, predicted, bytes, bits_per_byte: nats / std::f64::consts::LN_2 / bytes as f64 })
    }
}

fn load(dir: &Path) -> anyhow::Result<Loaded> {
    let (config, tokenizer, state) = read_imported(dir)?;
    let weights_path = dir.join("model.safetensors");
    let model = Llama::from_state(config, &state).with_context(|| format!("{}", weights_path.display()))?;
    Ok(Loaded { model, tokenizer })
}

/// An imported model directory's config, tokenizer and weights, each checked.
pub(crate) fn read_imported(dir: &Path) -> anyhow::Result<(LlamaConfig, LlamaTokenizer, ModelState)> {
    // The small files first, so that a broken directory fails before the weights are read.
    let (config, tokenizer) = read_config_and_tokenizer(dir)?;
    let weights_path = dir.join("model.safetensors");
    let weights = std::fs::File::open(&weights_path).with_context(|| {
        format!("opening {} (is {} a directory written by `weft model import`?)", weights_path.display(), dir.display())
    })?;
    // SAFETY: only read; decoding copies every tensor out of the map, so the state never points
    // into a file that could change underneath it.
    let map = unsafe { memmap2::Mmap::map(&weights) }.with_context(|| format!("mapping {}", weights_path.display()))?;
    let state = ModelState::from_safetensors(&map).with_context(|| format!("{}", weights_path.display()))?;
    Ok((config, tokenizer, state))
}

/// `config.json` and `tokenizer.json` of an imported model (a node's kit holds only these: its
/// weights come from the coordinator).
pub(crate) fn read_config_and_tokenizer(dir: &Path) -> anyhow::Result<(LlamaConfig, LlamaTokenizer)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read(&config_path).with_context(|| {
        format!("reading {} (is {} a directory written by `weft model import`?)", config_path.display(), dir.display())
    })?;
    let config = LlamaConfig::from_json(&String::from_utf8_lossy(&text))
        .with_context(|| format!("{}", config_path.display()))?;
    let tokenizer = LlamaTokenizer::from_file(&dir.join("tokenizer.json"))?;
    Ok((config, tokenizer))
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
    let score = loaded.bits_per_byte(&tokens, None, args.context)?;
    say!(
        "{}: {:.4} bits/byte ({:.4} nats/token over {} tokens, {:.2} bytes/token)",
        args.text.display(),
        score.bits_per_byte,
        score.nats / score.predicted as f64,
        score.predicted,
        score.bytes as f64 / score.predicted as f64
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

fn adapt(args: AdaptArgs) -> anyhow::Result<()> {
    let targets = args
        .targets
        .iter()
        .map(|t| t.trim().parse::<Projection>())
        .collect::<Result<Vec<_>, _>>()
        .context("--targets")?;
    if args.batch == 0 || args.context < 2 {
        bail!("--batch {} --context {}: a step needs at least 1 window of at least 2 tokens", args.batch, args.context);
    }
    let read_text = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {} (UTF-8 text expected)", path.display()))
    };
    let corpus_text = read_text(&args.corpus)?;
    let heldout_text = read_text(&args.heldout)?;
    let loaded = load(&args.model)?;
    let positions = loaded.model.config().max_position_embeddings;
    if args.context > positions {
        bail!("--context {}: the model has {positions} positions", args.context);
    }
    let spec = LoraSpec { rank: args.rank, alpha: args.alpha, targets };
    let mut adapters = Adapters::init(loaded.model.config(), spec, args.seed).context("adapter settings")?;
    let corpus = loaded.tokenizer.encode(&corpus_text)?;
    let mut heldout = loaded.tokenizer.encode(&heldout_text)?;
    heldout.truncate(args.heldout_tokens.max(2));
    if corpus.len() < args.context || heldout.len() < 2 {
        bail!(
            "{} gives {} tokens and {} gives {}: need at least --context {} to train and 2 to score",
            args.corpus.display(),
            corpus.len(),
            args.heldout.display(),
            heldout.len(),
            args.context
        );
    }
    let bits_per_byte =
        |adapters: Option<&Adapters>| loaded.bits_per_byte(&heldout, adapters, SCORE_CONTEXT).map(|s| s.bits_per_byte);
    let started = std::time::Instant::now();
    let before = bits_per_byte(None)?;
    say!("held-out {}: {} tokens, {before:.4} bits/byte with the base", args.heldout.display(), heldout.len());
    let settings = LoraTraining { lr: args.lr, train_a: args.train_a, ..LoraTraining::default() };
    let mut trainer = LoraTrainer::new(settings, &adapters);
    let mut rng = SplitMix64::derive(args.seed, "adapt-windows", 0);
    let windows = Windows { rows: args.batch, context: args.context };
    let trainable = if args.train_a { adapters.params().len() } else { adapters.is_b().iter().filter(|&&b| b).count() };
    say!("training {trainable} adapter parameters (rank {}, {} corpus tokens)", args.rank, corpus.len());
    for step in 1..=args.steps {
        let report = trainer.train(&loaded.model, &mut adapters, &corpus, 1, windows, &mut rng)?;
        say!("  step {step:>4}  loss {:.4} nats/token  ({:.0} s)", report.last_loss, started.elapsed().as_secs_f64());
    }
    let after = bits_per_byte(Some(&adapters))?;
    say!(
        "held-out {}: {before:.4} → {after:.4} bits/byte ({:+.1}%) after {} steps ({:.0} s)",
        args.heldout.display(),
        100.0 * (after / before - 1.0),
        args.steps,
        started.elapsed().as_secs_f64()
    );
    if let Some(out) = &args.out {
        let bytes = adapters.to_state().to_safetensors(None)?;
        weft_durable::write_atomic(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
        say!("adapter written to {}", out.display());
    }
    Ok(())
}
