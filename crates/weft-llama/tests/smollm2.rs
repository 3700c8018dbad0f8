//! The real SmolLM2-135M-Instruct GGUF (fetched by `scripts/fetch-model` on first use) against
//! the fixtures of ../shared/models.md, measured with a numpy reference: dequantized values,
//! tokenization, mean NLL and the greedy continuation.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use weft_llama::gguf::TensorType;
use weft_llama::{Gguf, Imported, Llama, LlamaTokenizer};

fn model_file() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join("data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        let status =
            Command::new("bash").arg(root.join("scripts/fetch-model")).status().expect("running scripts/fetch-model");
        assert!(status.success(), "scripts/fetch-model failed: the SmolLM2 tests need the model file");
    }
    path
}

fn gguf_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(model_file()).expect("reading the GGUF"))
}

fn imported() -> &'static Imported {
    static IMPORTED: OnceLock<Imported> = OnceLock::new();
    IMPORTED.get_or_init(|| {
        let gguf = Gguf::parse(gguf_bytes()).expect("parsing the GGUF");
        weft_llama::import(gguf_bytes(), &gguf).expect("importing")
    })
}

fn model() -> &'static Llama {
    static MODEL: OnceLock<Llama> = OnceLock::new();
    MODEL.get_or_init(|| Llama::from_state(imported().config.clone(), &imported().state).expect("building the model"))
}

fn tokenizer() -> LlamaTokenizer {
    LlamaTokenizer::from_json(&imported().tokenizer).expect("loading tokenizer.json")
}

/// (name, type, ggml dims, first four values, sum in f64) from the numpy reference.
type Fixture = (&'static str, TensorType, &'static [u64], [f64; 4], f64);

#[test]
fn dequantized_tensors_match_the_reference() {
    let gguf = Gguf::parse(gguf_bytes()).unwrap();
    assert_eq!(gguf.version, 3);
    assert_eq!(gguf.get_str("general.architecture").unwrap(), "llama");
    let fixtures: [Fixture; 4] = [
        (
            "token_embd.weight",
            TensorType::Q8_0,
            &[576, 49152],
            [-0.10654449462890625, 0.032978057861328125, 0.048198699951171875, -0.022830963134765625],
            -15353.0445,
        ),
        (
            "blk.0.attn_q.weight",
            TensorType::Q4_1,
            &[576, 576],
            [-0.0963134765625, 0.1573486328125, -0.0963134765625, -0.73046875],
            59.2232208,
        ),
        (
            "blk.29.ffn_down.weight",
            TensorType::Q4_1,
            &[1536, 576],
            [-0.2733154296875, 0.186279296875, 0.186279296875, 0.04840087890625],
            49.8357086,
        ),
        ("output_norm.weight", TensorType::F32, &[576], [1.7578125, 1.8203125, 1.78125, 1.6015625], 1038.33203),
    ];
    for (name, kind, dims, first, sum) in fixtures {
        let info = gguf.tensor(name).unwrap();
        assert_eq!((info.kind, info.dims.as_slice()), (kind, dims), "{name}");
        let values = gguf.dequantize(name).unwrap();
        // The reference's values are exact in f64: compare them exactly.
        let head: Vec<f64> = values[..4].iter().map(|&v| v as f64).collect();
        assert_eq!(head, first, "{name}");
        let total: f64 = values.iter().map(|&v| v as f64).sum();
        assert!((total - sum).abs() <= 1e-6 * sum.abs().max(1.0), "{name}: sum {total}, reference {sum}");
    }
}

#[test]
fn import_gives_the_hugging_face_model_and_its_provenance() {
    let imported = imported();
    let config = &imported.config;
    assert_eq!(
        (
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            config.kv_heads()
        ),
        (576, 1536, 30, 9, 3)
    );
    assert_eq!((config.rope_theta, config.rms_norm_eps, config.tie_word_embeddings), (100_000.0, 1e-5, true));
    assert_eq!(config.vocab_size, 49_152);
    assert_eq!(imported.manifest.parameters, 134_515_008);
    assert_eq!(imported.manifest.source_sha256, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53");
    assert_eq!(imported.manifest.state_hash, imported.state.content_hash());
    // The query projection is un-permuted: HF row h·64 + i·32 + j is GGUF row h·64 + 2j + i.
    let gguf = Gguf::parse(gguf_bytes()).unwrap();
    let permuted = gguf.dequantize("blk.0.attn_q.weight").unwrap();
    let hf = imported.state.get("model.layers.0.self_attn.q_proj.weight").unwrap().data();
    for (h, i, j) in [(0, 0, 0), (0, 1, 0), (3, 1, 17), (8, 0, 31)] {
        let (to, from) = (h * 64 + i * 32 + j, h * 64 + 2 * j + i);
        assert_eq!(hf[to * 576..][..576], permuted[from * 576..][..576]);
    }
    // Deterministic: a second import is the same state, tokenizer and manifest.
    let again = weft_llama::import(gguf_bytes(), &gguf).unwrap();
    assert_eq!(again.manifest, imported.manifest);
    assert_eq!(again.tokenizer, imported.tokenizer);
    assert_eq!(again.tokenizer_config, imported.tokenizer_config);
}

#[test]
fn tokenizer_matches_the_reference() {
    let tokenizer = tokenizer();
    assert_eq!(tokenizer.encode("The capital of France is").unwrap(), vec![504, 3575, 282, 4649, 314]);
    // The smollm pre-tokenizer splits every digit on its own; control tokens are matched whole.
    let digits = tokenizer.encode("1234").unwrap();
    assert_eq!(digits.len(), 4);
    assert_eq!(tokenizer.encode("<|im_start|>user").unwrap()[0], 1);
    let text = "Los seres humanos nacen libres — 人人生而自由 🙂";
    assert_eq!(tokenizer.decode(&tokenizer.encode(text).unwrap()).unwrap(), text);
}

#[test]
fn forward_gives_the_reference_nll_and_greedy_continuation() {
    let tokenizer = tokenizer();
    let text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her \
                friends. One day, she found a shiny red ball under a big tree.";
    let ids = tokenizer.encode(text).unwrap();
    assert_eq!(ids.len(), 39);
    let (nats, predicted) = model().nll(&ids).unwrap();
    let mean = nats / predicted as f64;
    eprintln!("SmolLM2 mean NLL on the reference text: {mean:.7}");
    // The numpy reference (f32 weights, f64/f32 mixed arithmetic) gives 1.6501650.
    assert!((mean - 1.650_165_0).abs() < 1e-5, "mean NLL {mean}");

    let prompt = tokenizer.encode("The capital of France is").unwrap();
    let continuation = model().greedy(&prompt, 8).unwrap();
    assert_eq!(tokenizer.decode(&continuation).unwrap(), " Paris.\n\nThe answer is:");
}

/// weft's forward pass against Hugging Face transformers' on the same imported weights. The
/// fixture (`bench/transformers_parity.py fixture`, transformers 5.25 and torch 2.15 in f32)
/// holds, for the first 96 tokens of three UDHR texts, transformers' own token ids, the NLL of
/// every position, and the logits at three positions over every 61st vocabulary entry and that
/// position's top five.
#[test]
fn forward_matches_transformers_on_the_same_weights() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/transformers_smollm2.json")).expect("the fixture");
    let tokenizer = tokenizer();
    let vocab = imported().config.vocab_size;
    for case in fixture["cases"].as_array().expect("cases") {
        let source = case["source"].as_str().unwrap_or_default();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).expect("ids");
        // The two tokenizers agree on the text.
        assert_eq!(tokenizer.encode(case["text"].as_str().expect("text")).unwrap(), ids, "{source}");
        let logits = model().logits(&ids).unwrap();
        assert_eq!(logits.len(), ids.len() * vocab);
        let mut max_logit_diff = 0f64;
        for sample in case["sampled"].as_array().expect("sampled") {
            let position = sample["position"].as_u64().expect("position") as usize;
            let row = &logits[position * vocab..][..vocab];
            let entries: Vec<usize> = serde_json::from_value(sample["vocab"].clone()).expect("vocab");
            let theirs: Vec<f64> = serde_json::from_value(sample["logits"].clone()).expect("logits");
            for (&v, &expected) in entries.iter().zip(&theirs) {
                max_logit_diff = max_logit_diff.max((f64::from(row[v]) - expected).abs());
            }
        }
        let theirs: Vec<f64> = serde_json::from_value(case["nll"].clone()).expect("nll");
        let mut max_nll_diff = 0f64;
        let (mut ours_sum, mut theirs_sum) = (0.0, 0.0);
        for (position, &expected) in theirs.iter().enumerate() {
            let row = &logits[position * vocab..][..vocab];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            let log_sum = row.iter().map(|&x| (f64::from(x) - max).exp()).sum::<f64>().ln() + max;
            let nll = log_sum - f64::from(row[ids[position + 1] as usize]);
            max_nll_diff = max_nll_diff.max((nll - expected).abs());
            ours_sum += nll;
            theirs_sum += expected;
        }
        let mean_diff = (ours_sum - theirs_sum) / theirs.len() as f64;
        eprintln!(
            "{source}: {} tokens, max |Δlogit| {max_logit_diff:.2e}, max |ΔNLL| {max_nll_diff:.2e}, mean NLL {:.6} (transformers {:.6}, Δ {mean_diff:+.2e})",
            ids.len(),
            ours_sum / theirs.len() as f64,
            theirs_sum / theirs.len() as f64
        );
        // Measured: |Δlogit| ≤ 9.5e-5, |ΔNLL| ≤ 7.2e-5, mean NLL within 1.5e-6 (f32 sums in
        // another order); a wrong RoPE, norm or tokenizer is orders of magnitude above.
        assert!(max_logit_diff < 5e-4, "{source}: logits differ by {max_logit_diff}");
        assert!(max_nll_diff < 5e-4 && mean_diff.abs() < 1e-5, "{source}: NLL differs by {max_nll_diff}");
    }
}
