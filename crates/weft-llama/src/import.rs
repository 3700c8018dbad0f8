//! GGUF → what `transformers` reads: f32 state under Hugging Face tensor names and layout,
//! `config.json`, `tokenizer.json` and `tokenizer_config.json`, plus a provenance manifest.
//!
//! llama.cpp's converter stores the query and key projections of `llama` models permuted for its
//! interleaved-pair RoPE; the import undoes that so the state is exactly Hugging Face's layout,
//! which uses rotate-half RoPE.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use weft_core::{ContentHash, ModelState, Tensor};

use crate::config::{LlamaConfig, LlamaConfigError};
use crate::gguf::{Gguf, GgufError, Value};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImportError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("the GGUF describes a model weft cannot build: {0}")]
    Config(#[from] LlamaConfigError),
    #[error("architecture '{0}' is not supported (weft imports llama and qwen2)")]
    Architecture(String),
    #[error("tensor '{name}' has no Hugging Face counterpart in a {architecture} model")]
    UnknownTensor { name: String, architecture: String },
    #[error("tensor '{name}' has shape {got:?}; the metadata says {expected:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("tensor '{hf_name}' is missing from the GGUF")]
    MissingTensor { hf_name: String },
    #[error("tensor '{name}' holds a non-finite value at index {index}")]
    NonFinite { name: String, index: usize },
    #[error("the tokenizer cannot be rebuilt: {0}")]
    Tokenizer(String),
}

/// What an import produces, before anything is written.
pub struct Imported {
    pub config: LlamaConfig,
    pub state: ModelState,
    /// Hugging Face `tokenizer.json`.
    pub tokenizer: String,
    /// Hugging Face `tokenizer_config.json` (special tokens, chat template).
    pub tokenizer_config: String,
    pub manifest: ImportManifest,
}

/// Where an imported base came from: written beside it as `weft-import.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportManifest {
    pub format: String,
    /// SHA-256 of the GGUF file, as its publisher lists it.
    pub source_sha256: String,
    pub source_bytes: u64,
    pub gguf_version: u32,
    pub architecture: String,
    pub name: Option<String>,
    pub license: Option<String>,
    /// How many tensors of each ggml type the file held.
    pub source_types: BTreeMap<String, usize>,
    /// weft's canonical hash of the imported f32 state: the base's identity in every ledger.
    pub state_hash: ContentHash,
    pub parameters: usize,
    pub tensors: usize,
}

pub const MANIFEST_FORMAT: &str = "weft.import.v1";

/// Imports a parsed GGUF whose raw bytes are `file` (for the provenance hash).
pub fn import(file: &[u8], gguf: &Gguf<'_>) -> Result<Imported, ImportError> {
    let architecture = gguf.get_str("general.architecture")?.to_string();
    if architecture != "llama" && architecture != "qwen2" {
        return Err(ImportError::Architecture(architecture));
    }
    let config = config_from(gguf, &architecture)?;
    let expected: BTreeMap<String, Vec<usize>> = config.tensor_shapes().into_iter().collect();

    let mut sources = Vec::new();
    for info in &gguf.tensors {
        let hf_name = hf_name(&info.name).ok_or_else(|| ImportError::UnknownTensor {
            name: info.name.clone(),
            architecture: architecture.clone(),
        })?;
        let shape = expected.get(&hf_name).ok_or_else(|| ImportError::UnknownTensor {
            name: info.name.clone(),
            architecture: architecture.clone(),
        })?;
        if &info.shape() != shape {
            return Err(ImportError::Shape { name: info.name.clone(), expected: shape.clone(), got: info.shape() });
        }
        sources.push((info.name.clone(), hf_name, shape.clone()));
    }
    if let Some(missing) = expected.keys().find(|name| !sources.iter().any(|(_, hf, _)| hf == *name)) {
        return Err(ImportError::MissingTensor { hf_name: missing.clone() });
    }

    let (heads, kv_heads, head) = (config.num_attention_heads, config.kv_heads(), config.head_size());
    let permuted = architecture == "llama";
    // Tensors dequantize independently: in parallel, each in a fixed order.
    let tensors = sources
        .par_iter()
        .map(|(gguf_name, hf_name, shape)| {
            let mut values = gguf.dequantize(gguf_name)?;
            if permuted {
                if hf_name.ends_with("q_proj.weight") || hf_name.ends_with("q_proj.bias") {
                    values = unpermute(&values, heads, head);
                } else if hf_name.ends_with("k_proj.weight") || hf_name.ends_with("k_proj.bias") {
                    values = unpermute(&values, kv_heads, head);
                }
            }
            if let Some(index) = values.iter().position(|v| !v.is_finite()) {
                return Err(ImportError::NonFinite { name: gguf_name.clone(), index });
            }
            let tensor = Tensor::new(shape.clone(), values).map_err(|e| ImportError::Shape {
                name: gguf_name.clone(),
                expected: shape.clone(),
                got: vec![e.got],
            })?;
            Ok((hf_name.clone(), tensor))
        })
        .collect::<Result<Vec<_>, ImportError>>()?;
    let mut state = ModelState::new();
    for (name, tensor) in tensors {
        state.insert(name, tensor);
    }

    let (tokenizer, tokenizer_config) = tokenizer_files(gguf, &config)?;
    let mut source_types = BTreeMap::new();
    for info in &gguf.tensors {
        *source_types.entry(info.kind.to_string()).or_insert(0) += 1;
    }
    let manifest = ImportManifest {
        format: MANIFEST_FORMAT.into(),
        source_sha256: sha256_hex(file),
        source_bytes: file.len() as u64,
        gguf_version: gguf.version,
        architecture,
        name: gguf.get_str("general.name").ok().map(str::to_owned),
        license: gguf.get_str("general.license").ok().map(str::to_owned),
        source_types,
        state_hash: state.content_hash(),
        parameters: state.num_values(),
        tensors: state.len(),
    };
    Ok(Imported { config, state, tokenizer, tokenizer_config, manifest })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn config_from(gguf: &Gguf<'_>, arch: &str) -> Result<LlamaConfig, ImportError> {
    let key = |k: &str| format!("{arch}.{k}");
    let usize_of = |k: &str| gguf.get_u64(&key(k)).map(|v| usize::try_from(v).unwrap_or(usize::MAX));
    if let Ok(kind) = gguf.get_str(&key("rope.scaling.type")) {
        if kind != "none" {
            return Err(LlamaConfigError::Field {
                field: "rope_scaling",
                value: kind.into(),
                why: "scaled RoPE is not supported",
            }
            .into());
        }
    }
    if gguf.tensor("rope_freqs.weight").is_some() {
        return Err(LlamaConfigError::Field {
            field: "rope_scaling",
            value: "rope_freqs.weight".into(),
            why: "scaled RoPE is not supported",
        }
        .into());
    }
    let hidden = usize_of("embedding_length")?;
    let heads = usize_of("attention.head_count")?;
    let vocab = match gguf.get_u64(&key("vocab_size")) {
        Ok(v) => usize::try_from(v).unwrap_or(usize::MAX),
        Err(_) => gguf.get_array("tokenizer.ggml.tokens")?.len(),
    };
    let head_dim = gguf.get_u64(&key("attention.key_length")).ok().map(|v| usize::try_from(v).unwrap_or(usize::MAX));
    let token = |k: &str| gguf.get_u64(k).ok().and_then(|v| u32::try_from(v).ok());
    let config = LlamaConfig {
        architectures: vec![if arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }.into()],
        model_type: arch.into(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: usize_of("feed_forward_length")?,
        num_hidden_layers: usize_of("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(usize_of("attention.head_count_kv").unwrap_or(heads)),
        head_dim: head_dim.filter(|&d| heads == 0 || d != hidden / heads),
        rms_norm_eps: gguf.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: gguf.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
        max_position_embeddings: usize_of("context_length")?,
        tie_word_embeddings: gguf.tensor("output.weight").is_none(),
        attention_bias: gguf.tensor("blk.0.attn_q.bias").is_some(),
        hidden_act: "silu".into(),
        bos_token_id: token("tokenizer.ggml.bos_token_id"),
        eos_token_id: token("tokenizer.ggml.eos_token_id"),
        pad_token_id: token("tokenizer.ggml.padding_token_id"),
        rope_scaling: None,
        torch_dtype: "float32".into(),
    };
    config.validate()?;
    Ok(config)
}

/// The Hugging Face name of a GGUF tensor (llama.cpp's `tensor_mapping`, for Llama-family models).
fn hf_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes llama.cpp's `permute` of a query or key projection (rows grouped per head as
/// interleaved pairs) back to Hugging Face's halves: row `h·hd + i·hd/2 + j` of the result is row
/// `h·hd + 2j + i` of the GGUF tensor. Works for a weight (rows of any width) and a bias.
pub fn unpermute(values: &[f32], heads: usize, head: usize) -> Vec<f32> {
    let width = values.len() / (heads * head);
    let half = head / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let to = (h * head + i * half + j) * width;
                let from = (h * head + 2 * j + i) * width;
                out[to..to + width].copy_from_slice(&values[from..from + width]);
            }
        }
    }
    out
}

/// `tokenizer.json` and `tokenizer_config.json` from the GGUF's byte-level BPE vocabulary.
fn tokenizer_files(gguf: &Gguf<'_>, config: &LlamaConfig) -> Result<(String, String), ImportError> {
    let model = gguf.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(ImportError::Tokenizer(format!(
            "tokenizer.ggml.model is '{model}'; weft rebuilds byte-level BPE ('gpt2') tokenizers only"
        )));
    }
    let strings = |key: &str| -> Result<Vec<String>, ImportError> {
        gguf.get_array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(ImportError::Tokenizer(format!("{key} holds a non-string"))),
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    if tokens.len() != config.vocab_size {
        return Err(ImportError::Tokenizer(format!(
            "{} tokens for a vocabulary of {}",
            tokens.len(),
            config.vocab_size
        )));
    }
    let types: Vec<u64> = match gguf.get_array("tokenizer.ggml.token_type") {
        Ok(values) => values.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        Err(_) => vec![1; tokens.len()],
    };
    // llama.cpp's pre-tokenizer names: `smollm` splits every digit on its own before the GPT-2
    // pattern; `gpt-2`/`default` is the pattern alone.
    let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "gpt-2" | "default" => byte_level,
        other => {
            return Err(ImportError::Tokenizer(format!("pre-tokenizer '{other}' is not supported (smollm, gpt-2)")))
        }
    };
    let mut vocab = serde_json::Map::new();
    for (id, token) in tokens.iter().enumerate() {
        if vocab.insert(token.clone(), json!(id)).is_some() {
            return Err(ImportError::Tokenizer(format!("token {token:?} appears twice")));
        }
    }
    // Control (3) and user-defined (4) tokens are matched whole, before the BPE.
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &kind))| kind == 3 || kind == 4)
        .map(|(id, (content, &kind))| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": kind == 3})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let name = |id: Option<u32>| id.and_then(|id| tokens.get(id as usize)).cloned();
    let mut tokenizer_config = json!({
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": config.max_position_embeddings,
        "bos_token": name(config.bos_token_id),
        "eos_token": name(config.eos_token_id),
        "pad_token": name(config.pad_token_id),
        "unk_token": name(gguf.get_u64("tokenizer.ggml.unknown_token_id").ok().and_then(|v| u32::try_from(v).ok())),
    });
    if let Ok(template) = gguf.get_str("tokenizer.chat_template") {
        tokenizer_config["chat_template"] = json!(template);
    }
    let text =
        |v: &Json| serde_json::to_string_pretty(v).map(|s| s + "\n").map_err(|e| ImportError::Tokenizer(e.to_string()));
    Ok((text(&tokenizer)?, text(&tokenizer_config)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::tests::Writer;

    /// llama.cpp's `permute` (convert_hf_to_gguf.py), written out: the inverse of `unpermute`.
    fn permute(values: &[f32], heads: usize, head: usize) -> Vec<f32> {
        let width = values.len() / (heads * head);
        let half = head / 2;
        let mut out = vec![0.0; values.len()];
        for h in 0..heads {
            for j in 0..half {
                for i in 0..2 {
                    let to = (h * head + 2 * j + i) * width;
                    let from = (h * head + i * half + j) * width;
                    out[to..to + width].copy_from_slice(&values[from..from + width]);
                }
            }
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn unpermute_inverts_llama_cpp_permute(heads in 1usize..4, half in 1usize..5, width in 1usize..4) {
            let head = 2 * half;
            let values: Vec<f32> = (0..heads * head * width).map(|v| v as f32).collect();
            proptest::prop_assert_eq!(unpermute(&permute(&values, heads, head), heads, head), values);
        }
    }

    /// GPT-2's byte → printable-character map, as byte-level BPE vocabularies spell bytes.
    fn byte_chars() -> Vec<String> {
        let mut printable: Vec<u32> = (33..127).chain(161..173).chain(174..256).collect();
        let mut chars: Vec<u32> = printable.clone();
        let mut next = 256;
        for b in 0..256u32 {
            if !printable.contains(&b) {
                printable.push(b);
                chars.push(next);
                next += 1;
            }
        }
        let mut by_byte = vec![String::new(); 256];
        for (b, c) in printable.into_iter().zip(chars) {
            by_byte[b as usize] = char::from_u32(c).unwrap().to_string();
        }
        by_byte
    }

    /// A tiny random Llama written the way llama.cpp's converter writes one: GGUF names, Q and K
    /// permuted, f32 data, a byte-level vocabulary of the 256 bytes, two merges and one control
    /// token.
    fn tiny_gguf(config: &LlamaConfig, state: &ModelState) -> Vec<u8> {
        tiny_gguf_with(config, state, None)
    }

    /// [`tiny_gguf`] with the tensor `q4k` (a Hugging Face name), if any, stored as Q4_K, a
    /// type weft does not read.
    fn tiny_gguf_with(config: &LlamaConfig, state: &ModelState, q4k: Option<&str>) -> Vec<u8> {
        let mut tokens = byte_chars();
        tokens.push("Ġt".into());
        tokens.push("<|end|>".into());
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut types = vec![1; 257];
        types.push(3);
        let mut writer = Writer::new()
            .string("general.architecture", "llama")
            .u32("llama.block_count", config.num_hidden_layers as u32)
            .u32("llama.embedding_length", config.hidden_size as u32)
            .u32("llama.feed_forward_length", config.intermediate_size as u32)
            .u32("llama.attention.head_count", config.num_attention_heads as u32)
            .u32("llama.attention.head_count_kv", config.kv_heads() as u32)
            .u32("llama.context_length", config.max_position_embeddings as u32)
            .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
            .f32("llama.rope.freq_base", 10000.0)
            .string("tokenizer.ggml.model", "gpt2")
            .string("tokenizer.ggml.pre", "smollm")
            .strings("tokenizer.ggml.tokens", &token_refs)
            .strings("tokenizer.ggml.merges", &["Ġ t"])
            .i32s("tokenizer.ggml.token_type", &types)
            .u32("tokenizer.ggml.eos_token_id", 257);
        let gguf_name = |hf: &str| -> String {
            let table = [
                ("model.embed_tokens.weight", "token_embd.weight"),
                ("model.norm.weight", "output_norm.weight"),
                ("lm_head.weight", "output.weight"),
            ];
            if let Some((_, g)) = table.iter().find(|(h, _)| *h == hf) {
                return g.to_string();
            }
            let rest = hf.strip_prefix("model.layers.").unwrap();
            let (layer, part) = rest.split_once('.').unwrap();
            (0..)
                .map(|i| {
                    format!(
                        "blk.{layer}.{}",
                        [
                            "attn_norm.weight",
                            "ffn_norm.weight",
                            "attn_q.weight",
                            "attn_k.weight",
                            "attn_v.weight",
                            "attn_output.weight",
                            "ffn_gate.weight",
                            "ffn_up.weight",
                            "ffn_down.weight"
                        ][i]
                    )
                })
                .find(|g| hf_name(g).as_deref() == Some(&format!("model.layers.{layer}.{part}")))
                .unwrap()
        };
        for (name, tensor) in state.iter() {
            let mut values = tensor.data().to_vec();
            let head = config.head_size();
            if name.ends_with("q_proj.weight") {
                values = permute(&values, config.num_attention_heads, head);
            } else if name.ends_with("k_proj.weight") {
                values = permute(&values, config.kv_heads(), head);
            }
            if q4k == Some(name) {
                let dims: Vec<u64> = tensor.shape().iter().rev().map(|&d| d as u64).collect();
                writer = writer.tensor(&gguf_name(name), &dims, crate::gguf::TensorType(12), vec![0; 144]);
            } else {
                writer = writer.f32_tensor(&gguf_name(name), tensor.shape(), &values);
            }
        }
        writer.finish()
    }

    fn tiny() -> (LlamaConfig, ModelState) {
        let mut config = crate::model::tests::tiny_config(false, false);
        config.vocab_size = 258;
        (config.clone(), crate::model::tests::random_state(&config, 11))
    }

    #[test]
    fn imports_a_llama_cpp_file_back_to_the_hugging_face_state() {
        let (config, state) = tiny();
        let bytes = tiny_gguf(&config, &state);
        let gguf = Gguf::parse(&bytes).unwrap();
        let imported = import(&bytes, &gguf).unwrap();
        assert_eq!(imported.state, state);
        assert_eq!(imported.config.tensor_shapes(), config.tensor_shapes());
        assert_eq!((imported.config.rms_norm_eps, imported.config.eos_token_id), (1e-5, Some(257)));
        assert_eq!(imported.manifest.state_hash, state.content_hash());
        assert_eq!(imported.manifest.source_types.get("F32"), Some(&state.len()));
        let tokenizer = crate::LlamaTokenizer::from_json(&imported.tokenizer).unwrap();
        assert_eq!(tokenizer.encode("a t<|end|>").unwrap(), vec![97, 256, 257]);
        // Tokens are indexed by byte here: digits are split one by one, never merged.
        assert_eq!(tokenizer.encode("12").unwrap(), vec![49, 50]);
        let config_json: Json = serde_json::from_str(&imported.tokenizer_config).unwrap();
        assert_eq!(config_json["eos_token"], "<|end|>");
    }

    #[test]
    fn refuses_files_that_do_not_describe_their_model() {
        let (config, state) = tiny();
        let import_err = |bytes: Vec<u8>| {
            let gguf = Gguf::parse(&bytes).unwrap();
            import(&bytes, &gguf).err().unwrap()
        };
        // A tensor whose shape disagrees with the metadata.
        let mut wrong = state.clone();
        wrong.insert("model.norm.weight", Tensor::zeros(vec![23]));
        assert!(
            matches!(import_err(tiny_gguf(&config, &wrong)), ImportError::Shape { name, .. } if name == "output_norm.weight")
        );
        // A block missing.
        let mut missing = state.clone();
        missing.remove("model.layers.1.mlp.up_proj.weight");
        assert_eq!(
            import_err(tiny_gguf(&config, &missing)),
            ImportError::MissingTensor { hf_name: "model.layers.1.mlp.up_proj.weight".into() }
        );
        // A non-finite weight.
        let mut nan = state.clone();
        nan.get_mut("model.layers.0.mlp.gate_proj.weight").unwrap().data_mut()[5] = f32::INFINITY;
        assert!(matches!(import_err(tiny_gguf(&config, &nan)), ImportError::NonFinite { index: 5, .. }));
        // A tensor of a type weft cannot read names the type.
        let exotic = import_err(tiny_gguf_with(&config, &state, Some("model.layers.1.mlp.up_proj.weight")));
        assert_eq!(
            exotic,
            ImportError::Gguf(GgufError::UnsupportedType {
                name: "blk.1.ffn_up.weight".into(),
                kind: crate::gguf::TensorType(12)
            })
        );
        assert!(exotic.to_string().contains("Q4_K"), "{exotic}");
        // Another architecture.
        let gpt2 = Writer::new().string("general.architecture", "gpt2").finish();
        let gguf = Gguf::parse(&gpt2).unwrap();
        assert_eq!(import(&gpt2, &gguf).err(), Some(ImportError::Architecture("gpt2".into())));
    }

    #[test]
    fn hf_names_cover_the_llama_blocks() {
        assert_eq!(hf_name("blk.12.attn_q.weight").as_deref(), Some("model.layers.12.self_attn.q_proj.weight"));
        assert_eq!(hf_name("blk.0.ffn_down.weight").as_deref(), Some("model.layers.0.mlp.down_proj.weight"));
        assert_eq!(hf_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
