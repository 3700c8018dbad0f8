//! The model's shape as Hugging Face's `config.json` writes it (LlamaConfig field names), so a
//! directory weft imports loads in `transformers` and a `transformers` checkpoint's config loads
//! here.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: query heads share key/value heads in equal groups.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Qwen2-style biases on the query, key and value projections.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Scaled RoPE variants (llama3, yarn, …) change the rotary angles; weft computes plain RoPE
    /// only, so a config that asks for scaling is refused rather than silently evaluated wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_dtype")]
    pub torch_dtype: String,
}

fn default_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}
fn default_model_type() -> String {
    "llama".into()
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    2048
}
fn default_hidden_act() -> String {
    "silu".into()
}
fn default_dtype() -> String {
    "float32".into()
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LlamaConfigError {
    #[error("config.json is not a Llama-family config: {0}")]
    Parse(String),
    #[error("config field '{field}' is {value}: {why}")]
    Field { field: &'static str, value: String, why: &'static str },
}

impl LlamaConfig {
    pub fn from_json(text: &str) -> Result<Self, LlamaConfigError> {
        let config: Self = serde_json::from_str(text).map_err(|e| LlamaConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_json(&self) -> String {
        // A struct of plain fields always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_size(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn validate(&self) -> Result<(), LlamaConfigError> {
        let field = |field, value: String, why| Err(LlamaConfigError::Field { field, value, why });
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return field(name, "0".into(), "it must be at least 1");
            }
        }
        // Shapes are multiplied together: keep every tensor far from overflowing usize.
        for (name, value, limit) in [
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("vocab_size", self.vocab_size, 1 << 22),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 10),
            ("num_attention_heads", self.num_attention_heads, 1 << 10),
            ("head_dim", self.head_dim.unwrap_or(0), 1 << 12),
        ] {
            if value > limit {
                return field(name, value.to_string(), "larger than weft handles");
            }
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return field("num_key_value_heads", kv.to_string(), "it must divide num_attention_heads");
        }
        let head = self.head_size();
        if head == 0 || !head.is_multiple_of(2) {
            return field("head_dim", head.to_string(), "rotary embeddings need an even, non-zero head size");
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return field("hidden_size", self.hidden_size.to_string(), "it must be a multiple of num_attention_heads");
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return field("rms_norm_eps", self.rms_norm_eps.to_string(), "it must be positive");
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return field("rope_theta", self.rope_theta.to_string(), "it must be greater than 1");
        }
        if self.hidden_act != "silu" {
            return field("hidden_act", self.hidden_act.clone(), "weft's Llama computes SwiGLU (silu) only");
        }
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() {
                return field("rope_scaling", scaling.to_string(), "scaled RoPE is not supported");
            }
        }
        Ok(())
    }

    /// The Hugging Face tensor names and row-major shapes of this model, sorted by name.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (self.num_attention_heads * self.head_size(), self.kv_heads() * self.head_size());
        let mut shapes =
            vec![("model.embed_tokens.weight".to_string(), vec![v, d]), ("model.norm.weight".into(), vec![d])];
        if !self.tie_word_embeddings {
            shapes.push(("lm_head.weight".into(), vec![v, d]));
        }
        for layer in 0..self.num_hidden_layers {
            let p = format!("model.layers.{layer}.");
            shapes.push((format!("{p}input_layernorm.weight"), vec![d]));
            shapes.push((format!("{p}post_attention_layernorm.weight"), vec![d]));
            shapes.push((format!("{p}self_attn.q_proj.weight"), vec![q, d]));
            shapes.push((format!("{p}self_attn.k_proj.weight"), vec![kv, d]));
            shapes.push((format!("{p}self_attn.v_proj.weight"), vec![kv, d]));
            shapes.push((format!("{p}self_attn.o_proj.weight"), vec![d, q]));
            if self.attention_bias {
                shapes.push((format!("{p}self_attn.q_proj.bias"), vec![q]));
                shapes.push((format!("{p}self_attn.k_proj.bias"), vec![kv]));
                shapes.push((format!("{p}self_attn.v_proj.bias"), vec![kv]));
            }
            shapes.push((format!("{p}mlp.gate_proj.weight"), vec![f, d]));
            shapes.push((format!("{p}mlp.up_proj.weight"), vec![f, d]));
            shapes.push((format!("{p}mlp.down_proj.weight"), vec![d, f]));
        }
        shapes.sort();
        shapes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":49152,
        "hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
        "num_key_value_heads":3,"rms_norm_eps":1e-5,"rope_theta":100000.0,"max_position_embeddings":8192,
        "tie_word_embeddings":true,"hidden_act":"silu","bos_token_id":1,"eos_token_id":2,
        "rope_scaling":null,"torch_dtype":"bfloat16","attention_bias":false,"mlp_bias":false}"#;

    #[test]
    fn reads_a_transformers_config_and_counts_its_parameters() {
        let config = LlamaConfig::from_json(SMOLLM2).unwrap();
        assert_eq!((config.kv_heads(), config.head_size()), (3, 64));
        let params: usize = config.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        // SmolLM2-135M's published parameter count.
        assert_eq!(params, 134_515_008);
        let again = LlamaConfig::from_json(&config.to_json()).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn refuses_shapes_it_cannot_compute() {
        let bad = |from: &str, to: &str| LlamaConfig::from_json(&SMOLLM2.replace(from, to)).unwrap_err();
        assert!(matches!(
            bad(r#""num_key_value_heads":3"#, r#""num_key_value_heads":4"#),
            LlamaConfigError::Field { field: "num_key_value_heads", .. }
        ));
        assert!(matches!(
            bad(r#""hidden_act":"silu""#, r#""hidden_act":"gelu""#),
            LlamaConfigError::Field { field: "hidden_act", .. }
        ));
        assert!(matches!(
            bad(r#""rope_scaling":null"#, r#""rope_scaling":{"type":"llama3"}"#),
            LlamaConfigError::Field { field: "rope_scaling", .. }
        ));
        assert!(matches!(
            bad(r#""num_hidden_layers":30"#, r#""num_hidden_layers":0"#),
            LlamaConfigError::Field { field: "num_hidden_layers", .. }
        ));
        // A hostile file cannot make weft loop over or allocate for absurd shapes.
        assert!(matches!(
            bad(r#""num_hidden_layers":30"#, r#""num_hidden_layers":1099511627776"#),
            LlamaConfigError::Field { field: "num_hidden_layers", .. }
        ));
        assert!(matches!(
            bad(r#""num_attention_heads":9"#, r#""num_attention_heads":9000000"#),
            LlamaConfigError::Field { field: "num_attention_heads", .. }
        ));
        assert!(matches!(bad(r#""vocab_size":49152,"#, ""), LlamaConfigError::Parse(_)));
    }
}
