//! `weft model` with the real SmolLM2-135M-Instruct GGUF (fetched by `scripts/fetch-model` on
//! first use): import, the files it writes, generation, and malformed files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use weft_core::{ContentHash, ModelState};

fn weft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft")).args(args).output().expect("weft runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn model_file() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join("data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        let status =
            Command::new("bash").arg(root.join("scripts/fetch-model")).status().expect("running scripts/fetch-model");
        assert!(status.success(), "scripts/fetch-model failed: these tests need the model file");
    }
    path
}

#[test]
fn import_writes_a_hugging_face_directory_that_generates() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2");
    let gguf = model_file();
    let run = weft(&["model", "import", gguf.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", stderr(&run));

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("weft-import.json")).unwrap()).unwrap();
    assert_eq!(manifest["source_sha256"], "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53");
    assert_eq!(manifest["parameters"], 134_515_008);
    let state = ModelState::from_safetensors(&std::fs::read(out.join("model.safetensors")).unwrap()).unwrap();
    let recorded: ContentHash = manifest["state_hash"].as_str().unwrap().parse().unwrap();
    assert_eq!(state.content_hash(), recorded);
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["num_key_value_heads"], 3);
    drop(state);

    // An existing import is never overwritten.
    let again = weft(&["model", "import", gguf.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already exists"), "{}", stderr(&again));

    let generated =
        weft(&["model", "generate", out.to_str().unwrap(), "--prompt", "The capital of France is", "--tokens", "8"]);
    assert!(generated.status.success(), "{}", stderr(&generated));
    assert_eq!(String::from_utf8_lossy(&generated.stdout), "The capital of France is Paris.\n\nThe answer is:\n");
}

#[test]
fn malformed_files_get_a_clear_error_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(model_file()).unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        // The metadata and tensor table are whole; the tensor data is cut short.
        ("truncated.gguf", bytes[..4_000_000].to_vec(), "lies outside the file"),
        // Cut inside the metadata.
        ("header.gguf", bytes[..100_000].to_vec(), "truncated?"),
        ("text.gguf", b"this is not a model\n".to_vec(), "not a GGUF file"),
    ];
    for (name, content, message) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let out = dir.path().join(format!("{name}.out"));
        let run = weft(&["model", "import", path.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(!run.status.success(), "{name} imported");
        let err = stderr(&run);
        assert!(err.contains(message) && err.contains(name) && !err.contains("panicked"), "{name}: {err}");
        assert!(!out.exists(), "{name}: {} was created", out.display());
    }
    let missing =
        weft(&["model", "import", "/nonexistent/model.gguf", "--out", dir.path().join("x").to_str().unwrap()]);
    assert!(stderr(&missing).contains("/nonexistent/model.gguf"), "{}", stderr(&missing));
}

#[test]
fn adapt_names_a_wrong_projection_and_a_missing_model() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "Bonjour tout le monde.\n").unwrap();
    let (text, model) = (text.to_str().unwrap(), dir.path().join("none"));
    let wrong =
        weft(&["model", "adapt", model.to_str().unwrap(), "--corpus", text, "--heldout", text, "--targets", "q,w1"]);
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("'w1' is not a projection"), "{}", stderr(&wrong));
    let missing = weft(&["model", "adapt", model.to_str().unwrap(), "--corpus", text, "--heldout", text]);
    assert!(stderr(&missing).contains("written by `weft model import`"), "{}", stderr(&missing));
    assert!(!model.exists());
}
