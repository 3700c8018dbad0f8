//! `weft demo --base DIR` with a tiny random Llama written as `weft model import` writes one
//! (config.json, model.safetensors, a byte-level tokenizer.json): the adapter rounds run through
//! the real binary, the ledger replays, the same seed gives the same base, and bad settings get
//! a clear error. (The real SmolLM2 run is measured in the README: it takes minutes.)

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};
use weft_core::{ModelState, Tensor};

fn weft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft")).args(args).output().expect("the weft binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// GPT-2's byte-level tokenizer with no merges: one token per byte, any script.
fn byte_level_tokenizer() -> Value {
    let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = bytes.clone();
    let mut extra = 0;
    for b in 0..256 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let vocab: serde_json::Map<String, Value> =
        bytes.iter().zip(&chars).map(|(&b, &c)| (char::from_u32(c).unwrap().to_string(), json!(b))).collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// A tiny random Llama in `dir`, as an import would leave it.
fn tiny_base(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), byte_level_tokenizer().to_string()).unwrap();
    let llama = weft_llama::LlamaConfig::from_json(&config.to_string()).unwrap();
    let mut rng = weft_model::SplitMix64::new(3);
    let mut state = ModelState::new();
    for (name, shape) in llama.tensor_shapes() {
        let n: usize = shape.iter().product();
        let (offset, scale) = if name.ends_with("norm.weight") { (1.0, 0.0) } else { (0.0, 0.1) };
        let values = (0..n).map(|_| offset + scale * rng.normal() as f32).collect();
        state.insert(name, Tensor::new(shape, values).unwrap());
    }
    std::fs::write(dir.join("model.safetensors"), state.to_safetensors(None).unwrap()).unwrap();
}

const SMALL: &[&str] = &[
    "--rounds",
    "2",
    "--adapter-rank",
    "2",
    "--adapter-steps",
    "3",
    "--adapter-context",
    "32",
    "--adapter-lr",
    "0.03",
    "--heldout-bytes",
    "300",
];

fn demo(base: &Path, out: &Path, extra: &[&str]) -> Value {
    let json = out.with_extension("json");
    let mut args = vec!["demo", "--base", base.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(&["--json", json.to_str().unwrap()]);
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    let run = weft(&args);
    assert!(run.status.success(), "weft demo --base failed:\n{}", stderr(&run));
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

#[test]
fn adapter_rounds_on_a_real_base_replay_and_reproduce() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    tiny_base(&base);
    let first = demo(&base, &tmp.path().join("one"), &[]);

    // Four non-English nodes, each with its language's four figures.
    let languages: Vec<&str> =
        first["languages"].as_array().unwrap().iter().map(|l| l["language"].as_str().unwrap()).collect();
    assert_eq!(languages, ["de", "fr", "es", "ja"]);
    for row in first["languages"].as_array().unwrap() {
        for key in ["initial", "consortium", "consortium_plus_sovereign", "alone"] {
            assert!(row[key].as_f64().is_some_and(f64::is_finite), "{key} in {row}");
        }
    }
    let rounds = first["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().any(|r| r["base_changed"] == true), "no round moved the base: {rounds:?}");
    assert_eq!(first["adapter"]["rank"], 2);
    // B only: out × rank for each of the 7 projections (q 32, k 16, v 16, o 32, gate 64, up 64,
    // down 32), 2 layers, rank 2.
    assert_eq!(first["adapter"]["update_values"], 2 * 256 * 2);
    for node in first["nodes"].as_array().unwrap() {
        assert_eq!(node["bytes_sent"].as_u64().unwrap(), 2 * 4 * first["adapter"]["update_values"].as_u64().unwrap());
        assert_eq!(node["artifacts"].as_array().unwrap().len(), 2);
        assert_eq!(node["sovereign"].as_str().unwrap().len(), 64);
    }

    // The ledger records each round's adapter and replays every round.
    let storage = tmp.path().join("one/coordinator");
    let verified = weft(&["ledger", "verify", storage.to_str().unwrap(), "--json"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    let report: Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(report["rounds"], 2);
    assert_eq!(report["final_base_hash"], first["final_base_hash"]);
    let shown = weft(&["ledger", "show", storage.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&shown.stdout).matches("LoRA rank 2").count(), 2);

    // The same command on the same --out continues the stored run: nothing left to train, the
    // same bases and the same initial figures.
    let resumed = demo(&base, &tmp.path().join("one"), &["--baseline", "none"]);
    assert_eq!(resumed["final_base_hash"], first["final_base_hash"]);
    assert_eq!(resumed["rounds"].as_array().unwrap().len(), 2);
    assert_eq!(resumed["languages"][0]["initial"], first["languages"][0]["initial"]);

    // Same seed, same bases; another seed, another run.
    let again = demo(&base, &tmp.path().join("two"), &["--baseline", "none"]);
    assert_eq!(again["final_base_hash"], first["final_base_hash"]);
    assert!(again["languages"][0]["alone"].is_null());
    let other = demo(&base, &tmp.path().join("three"), &["--baseline", "none", "--seed", "1"]);
    assert_ne!(other["final_base_hash"], first["final_base_hash"]);

    // Both factors trained: nodes send A and B (twice the values here), the ledger replays.
    let full = demo(&base, &tmp.path().join("full"), &["--baseline", "none", "--adapter-track", "full"]);
    assert_eq!(full["adapter"]["track"], "full");
    assert_eq!(full["adapter"]["update_values"], 2 * 2 * 256 * 2);
    let storage = tmp.path().join("full/coordinator");
    let verified = weft(&["ledger", "verify", storage.to_str().unwrap(), "--json"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    let report: Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(report["final_base_hash"], full["final_base_hash"]);
}

#[test]
fn bad_real_base_settings_get_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    tiny_base(&base);
    let b = base.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["demo", "--base", "/nonexistent/model"], "not a directory written by `weft model import`"),
        (&["demo", "--base", b, "--adapter-targets", "q,w9"], "'w9' is not a projection"),
        (&["demo", "--base", b, "--adapter-rank", "0"], "rank 0"),
        (&["demo", "--base", b, "--adapter-context", "1000"], "exceeds the model's 64 positions"),
        (&["demo", "--base", b, "--adapter-lr", "-1"], "--adapter-lr must be a positive number"),
        (&["demo", "--base", b, "--adapter-alpha", "-2"], "alpha -2 must be positive"),
        (&["demo", "--base", b, "--outer", "nesterov"], "plain outer optimizer"),
        (&["demo", "--base", b, "--languages", "de,xx"], "unknown language 'xx'"),
        (&["demo", "--base", b, "--governance"], "drop --processes, --attack and --governance"),
        (&["demo", "--base", b, "--adapter-track", "full", "--aggregator", "median"], "--aggregator: median"),
    ];
    for (args, expected) in cases {
        let out = weft(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let message = stderr(&out);
        assert!(message.contains(expected), "{args:?}: expected {expected:?} in\n{message}");
        assert!(!message.contains("panicked"), "{args:?}: {message}");
    }
    // A broken weights file: an error naming it, no panic.
    std::fs::write(base.join("model.safetensors"), b"not safetensors").unwrap();
    let out = weft(&["demo", "--base", b, "--out", tmp.path().join("x").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("model.safetensors"), "{}", stderr(&out));
}
