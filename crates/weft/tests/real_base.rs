//! `weft demo --base DIR` with a tiny random Llama written as `weft model import` writes one
//! (config.json, model.safetensors, a byte-level tokenizer.json): the adapter rounds run through
//! the real binary, the ledger replays, the same seed gives the same base, and bad settings get
//! a clear error. (The real SmolLM2 run is measured in the README: it takes minutes.)

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};
use weft_core::{ModelState, Tensor};

mod support;
use support::{free_port, Running};

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
    // The run's report.html: the demo verified the adapter rounds for it (replay needs the family).
    let html = std::fs::read_to_string(tmp.path().join("one/report.html")).unwrap();
    assert!(html.contains(r#"id="verify"><span class="badge ok""#), "the report's ledger check did not pass");
    assert!(html.contains(r#"data-languages="de,es,fr,ja""#), "the report's chart lacks a language");
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

    // Canary governance through the same family: every contribution scored on every member
    // language's public canaries and audited on the secret reserve, the ledger replays.
    let governed = demo(&base, &tmp.path().join("governed"), &["--baseline", "none", "--governance"]);
    let storage = tmp.path().join("governed/coordinator");
    for round in 1..=2 {
        let record: Value =
            serde_json::from_slice(&std::fs::read(storage.join(format!("rounds/round-{round:04}.json"))).unwrap())
                .unwrap();
        let scores = record["governance"]["scores"].as_array().unwrap_or_else(|| panic!("round {round}: {record}"));
        assert_eq!(scores.len(), 4, "round {round}: {scores:?}");
        for score in scores {
            assert!(score["quality"].as_f64().is_some_and(f64::is_finite), "{score}");
            assert!(score["secret_gain"].as_object().is_some_and(|g| g.len() == 4), "{score}");
        }
    }
    let verified = weft(&["ledger", "verify", storage.to_str().unwrap(), "--json"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    let report: Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(report["final_base_hash"], governed["final_base_hash"]);
    // Governance is part of the run: continuing it without is refused by name, not run quietly.
    let out = tmp.path().join("governed");
    let mut args = vec!["demo", "--base", base.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    let ungoverned = weft(&args);
    assert!(!ungoverned.status.success());
    assert!(stderr(&ungoverned).contains("governance"), "{}", stderr(&ungoverned));

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
        (&["demo", "--base", b, "--processes"], "drop --processes and --attack"),
        (&["demo", "--base", b, "--adapter-track", "full", "--aggregator", "median"], "--aggregator: median"),
    ];
    for (args, expected) in cases {
        let out = weft(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let message = stderr(&out);
        assert!(message.contains(expected), "{args:?}: expected {expected:?} in\n{message}");
        assert!(!message.contains("panicked"), "{args:?}: {message}");
    }
    // A consortium on this base: refused before anything is written when it asks for what adapter
    // rounds cannot do…
    let dir = tmp.path().join("consortium");
    let d = dir.to_str().unwrap();
    let init = [
        "consortium",
        "init",
        d,
        "--base",
        b,
        "--adapter-context",
        "32",
        "--node",
        "n1:de",
        "--node",
        "n2:fr",
        "--node",
        "n3:es",
    ];
    for (extra, expected) in [
        (&["--adapter-track", "full", "--aggregator", "median"][..], "--aggregator: median"),
        (&["--adapter-targets", "q,w9"][..], "'w9' is not a projection"),
    ] {
        let out = weft(&[&init[..], extra].concat());
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert!(stderr(&out).contains(expected), "{extra:?}: expected {expected:?} in\n{}", stderr(&out));
        assert!(!dir.exists(), "{extra:?}: a refused init left {}", dir.display());
    }
    // …and its coordinator refuses to start from another base than the one it was made with.
    let made = weft(&init);
    assert!(made.status.success(), "{}", stderr(&made));
    let weights = base.join("model.safetensors");
    let mut state = ModelState::from_safetensors(&std::fs::read(&weights).unwrap()).unwrap();
    let norm = state.get("model.norm.weight").unwrap().clone();
    let changed: Vec<f32> = norm.data().iter().map(|v| v + 0.5).collect();
    state.insert("model.norm.weight", Tensor::new(norm.shape().to_vec(), changed).unwrap());
    std::fs::write(&weights, state.to_safetensors(None).unwrap()).unwrap();
    let out = weft(&["coordinator", "serve", d]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("the consortium was made with"), "{}", stderr(&out));
    assert!(!dir.join("coordinator/state.sqlite").exists(), "a refused serve started a ledger");

    // A broken weights file: an error naming it, no panic.
    std::fs::write(base.join("model.safetensors"), b"not safetensors").unwrap();
    let out = weft(&["demo", "--base", b, "--out", tmp.path().join("x").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("model.safetensors"), "{}", stderr(&out));
}

impl Running {
    fn spawn(args: &[&str], log: &Path) -> Running {
        let child = Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(args)
            .env("WEFT_LOG", "info")
            .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        Running(child)
    }

    fn succeeds(&mut self, log: &Path) {
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_secs(300) {
            if let Some(status) = self.0.try_wait().unwrap() {
                let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
                assert!(status.success(), "{} failed:\n{err}", log.display());
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("{} did not finish in 5 minutes", log.display());
    }
}

#[test]
fn a_networked_consortium_on_a_pretrained_base_gives_the_in_process_bases() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    tiny_base(&base);
    let languages = ["de", "fr", "es"];
    let in_process =
        demo(&base, &tmp.path().join("demo"), &["--nodes", "3", "--languages", "de,fr,es", "--baseline", "none"]);

    // `consortium init --base` pins the base by hash; each kit gets its config and tokenizer,
    // never its weights (the coordinator sends those).
    let dir = tmp.path().join("consortium");
    let address = format!("127.0.0.1:{}", free_port());
    let mut init = vec!["consortium", "init", dir.to_str().unwrap(), "--address", &address, "--base"];
    init.push(base.to_str().unwrap());
    init.extend_from_slice(SMALL);
    let nodes: Vec<String> = languages.iter().map(|l| format!("node-{l}:{l}")).collect();
    for node in &nodes {
        init.extend_from_slice(&["--node", node]);
    }
    let made = weft(&init);
    assert!(made.status.success(), "{}", stderr(&made));
    let config: toml::Value = toml::from_str(&std::fs::read_to_string(dir.join("consortium.toml")).unwrap()).unwrap();
    assert!(config.get("model").is_none());
    assert_eq!(config["base"]["adapter"]["rank"].as_integer(), Some(2));
    let kit = dir.join("nodes/node-de");
    assert!(kit.join("base/config.json").is_file() && kit.join("base/tokenizer.json").is_file());
    assert!(!kit.join("base/model.safetensors").exists());

    let served = dir.join("serve.json");
    let mut coordinator = Running::spawn(
        &["coordinator", "serve", dir.to_str().unwrap(), "--linger-secs", "2", "--json", served.to_str().unwrap()],
        &dir.join("coordinator-log"),
    );
    // A byte-model kit (no `base` in node.toml) in this consortium is told so and sends nothing.
    let wrong_kit = tmp.path().join("wrong-kit");
    std::fs::create_dir_all(&wrong_kit).unwrap();
    for file in ["ca.pem", "tls.pem", "tls.key", "signing.key"] {
        std::fs::copy(kit.join(file), wrong_kit.join(file)).unwrap();
    }
    let node_toml = std::fs::read_to_string(kit.join("node.toml")).unwrap();
    std::fs::write(wrong_kit.join("node.toml"), node_toml.replace("base = \"base\"\n", "")).unwrap();
    let wrong = weft(&["node", "join", wrong_kit.to_str().unwrap(), "--give-up-after", "60"]);
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("this node's kit has no base"), "{}", stderr(&wrong));

    let mut members: Vec<(Running, std::path::PathBuf)> = languages
        .iter()
        .map(|l| {
            let kit = dir.join("nodes").join(format!("node-{l}"));
            let log = dir.join(format!("node-{l}-log"));
            let json = dir.join(format!("node-{l}.json"));
            let args =
                ["node", "join", kit.to_str().unwrap(), "--give-up-after", "60", "--json", json.to_str().unwrap()];
            (Running::spawn(&args, &log), log)
        })
        .collect();
    for (node, log) in &mut members {
        node.succeeds(log);
    }
    coordinator.succeeds(&dir.join("coordinator-log"));

    // Three processes over mutual TLS, the same bases as one process, bit for bit.
    let served: Value = serde_json::from_slice(&std::fs::read(&served).unwrap()).unwrap();
    let bases = |rounds: &Value| -> Vec<String> {
        rounds.as_array().unwrap().iter().map(|r| r["base_hash"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(bases(&served["rounds"]), bases(&in_process["rounds"]));
    assert!(served["rounds"].as_array().unwrap().iter().any(|r| r["base_changed"] == true));
    // What crossed the wire per node and round: B only, f32.
    for (_, per_node) in served["wire_bytes"].as_object().unwrap() {
        for (_, bytes) in per_node.as_object().unwrap() {
            assert!(bytes.as_u64().unwrap() < 2 * 256 * 2 * 4 + 4096, "{bytes} bytes: more than the B factors");
        }
    }
    let verified = weft(&["ledger", "verify", dir.join("coordinator").to_str().unwrap(), "--json"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    let report: Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(report["final_base_hash"], in_process["final_base_hash"]);

    // After the last round each node trains its own adapter on the published base and keeps it:
    // the one the in-process demo's node keeps.
    for node in in_process["nodes"].as_array().unwrap() {
        let id = node["node"].as_str().unwrap();
        let joined: Value = serde_json::from_slice(&std::fs::read(dir.join(format!("{id}.json"))).unwrap()).unwrap();
        assert_eq!(joined["private_adapter"]["adapter_hash"], node["sovereign"], "{id}");
        assert_eq!(joined["private_adapter"]["base_hash"], in_process["final_base_hash"], "{id}");
    }

    // A node leaves with its adapters, its private adapter and a ledger proof per contribution.
    let bundle = tmp.path().join("bundle");
    let exported = weft(&[
        "node",
        "export",
        kit.join("artifacts").to_str().unwrap(),
        "--coordinator",
        dir.join("coordinator").to_str().unwrap(),
        "--node",
        "node-de",
        "--out",
        bundle.to_str().unwrap(),
    ]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    for kept in
        ["round-0001/update.safetensors", "round-0002/adapter.safetensors", "sovereign/round-0002/manifest.json"]
    {
        assert!(bundle.join(kept).is_file(), "{kept} is not in the bundle");
    }
    assert!(!bundle.join("bases").exists(), "the bundle carries a cached base");
    let proofs: Value = serde_json::from_slice(&std::fs::read(bundle.join("proofs.json")).unwrap()).unwrap();
    assert_eq!(proofs.as_array().unwrap().len(), 2);

    // Each node keeps every round's adapter with the record it was trained for.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(kit.join("artifacts/round-0002/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["round"], 2);
    assert_eq!(manifest["adapter"]["rank"], 2);
    let adapter = std::fs::read(kit.join("artifacts/round-0002/adapter.safetensors")).unwrap();
    assert_eq!(
        ModelState::from_safetensors(&adapter).unwrap().content_hash().to_string(),
        manifest["adapter_hash"].as_str().unwrap()
    );
}

#[test]
fn dp_sgd_on_a_pretrained_bases_adapters_is_charged_per_node_and_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    tiny_base(&base);
    let flags = ["--privacy", "dp", "--epsilon", "8", "--dp-sample-rate", "0.05", "--nodes", "2", "--baseline", "none"];
    let report = demo(&base, &tmp.path().join("dp"), &flags);
    for round in report["rounds"].as_array().unwrap() {
        for c in round["contributions"].as_array().unwrap() {
            // The adapter's update states its mechanism and (ε, δ) only: no loss, no token count.
            assert!(c["declared"]["dp_epsilon"].as_f64().is_some_and(|e| e > 0.0), "{c}");
            assert_eq!(c["declared"]["dp_steps"], 3.0, "{c}");
            assert!(c["declared"].get("train_loss").is_none(), "{c}");
            assert_eq!(c["token_count"], 0);
        }
    }
    // The coordinator charged each node both rounds, composed within the budget, and `verify`
    // recomputes every charge.
    let storage = tmp.path().join("dp/coordinator");
    let table = weft(&["privacy", storage.to_str().unwrap(), "--json"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let table: Value = serde_json::from_slice(&table.stdout).unwrap();
    let text = table.to_string();
    assert!(text.contains("node-de") && text.contains("node-fr"), "{text}");
    let verified = weft(&["ledger", "verify", storage.to_str().unwrap()]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    let shown = String::from_utf8_lossy(&weft(&["ledger", "show", storage.to_str().unwrap()]).stdout).into_owned();
    assert_eq!(shown.matches(" charged   ε ").count(), 4, "{shown}");
    // The same secret-keyed streams give the same bases.
    let again = demo(&base, &tmp.path().join("again"), &flags);
    assert_eq!(again["final_base_hash"], report["final_base_hash"]);
}

#[test]
fn dp_sgd_on_a_pretrained_base_over_the_network_is_announced_and_charged() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    tiny_base(&base);
    let dir = tmp.path().join("consortium");
    let address = format!("127.0.0.1:{}", free_port());
    let mut init = vec!["consortium", "init", dir.to_str().unwrap(), "--address", &address, "--base"];
    init.push(base.to_str().unwrap());
    init.extend_from_slice(SMALL);
    init.extend_from_slice(&["--privacy", "dp", "--epsilon", "8", "--dp-sample-rate", "0.05"]);
    init.extend_from_slice(&["--node", "node-de:de", "--node", "node-fr:fr"]);
    let made = weft(&init);
    assert!(made.status.success(), "{}", stderr(&made));
    let mut coordinator = Running::spawn(
        &["coordinator", "serve", dir.to_str().unwrap(), "--linger-secs", "2"],
        &dir.join("coordinator-log"),
    );
    let mut members: Vec<(Running, std::path::PathBuf)> = ["de", "fr"]
        .iter()
        .map(|l| {
            let kit = dir.join("nodes").join(format!("node-{l}"));
            let log = dir.join(format!("node-{l}-log"));
            (Running::spawn(&["node", "join", kit.to_str().unwrap(), "--give-up-after", "60"], &log), log)
        })
        .collect();
    for (node, log) in &mut members {
        node.succeeds(log);
    }
    coordinator.succeeds(&dir.join("coordinator-log"));
    // Each node trained its adapter with the announced mechanism, keyed by its own signing key;
    // the coordinator charged both nodes for both rounds, and `verify` recomputes the charges.
    let storage = dir.join("coordinator");
    let verified = weft(&["ledger", "verify", storage.to_str().unwrap()]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    let shown = String::from_utf8_lossy(&weft(&["ledger", "show", storage.to_str().unwrap()]).stdout).into_owned();
    assert_eq!(shown.matches(" charged   ε ").count(), 4, "{shown}");
    let kept: Value =
        serde_json::from_slice(&std::fs::read(dir.join("nodes/node-de/artifacts/round-0001/manifest.json")).unwrap())
            .unwrap();
    assert!(kept["dp"]["epsilon"].as_f64().is_some_and(|e| e > 0.0), "{kept}");
}
