//! Model hyper-parameters, read from a GGUF header (Hugging Face config.json comes with the
//! safetensors loader).

use vllm_apple_ops::kernels::rope::Llama3Scaling;

use crate::gguf::{Gguf, Value};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "unknown architecture '{0}': supported are llama, qwen3 (qwen2 and qwen3moe come next)"
    )]
    UnknownArchitecture(String),
    #[error("model metadata lacks '{0}'")]
    Missing(String),
    #[error("model metadata '{key}' is invalid: {detail}")]
    Invalid { key: String, detail: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub rms_eps: f32,
    pub max_position: usize,
    pub tie_embeddings: bool,
    /// Qwen3's per-head RMSNorm of q and k.
    pub qk_norm: bool,
    /// Qwen2's biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// The checkpoint's own dtype (`dtype` / `torch_dtype` in config.json), what `auto` picks.
    pub checkpoint_dtype: Option<String>,
}

impl ModelConfig {
    /// From a Hugging Face `config.json` (architectures `LlamaForCausalLM`,
    /// `MistralForCausalLM`, `Qwen3ForCausalLM`). Handles an explicit or derived `head_dim`,
    /// `rope_theta` at the top level or inside `rope_parameters` (transformers 5), and
    /// Llama-3 rope scaling.
    pub fn from_hf_config(json: &str) -> Result<ModelConfig, ConfigError> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| ConfigError::Invalid {
                key: "config.json".into(),
                detail: e.to_string(),
            })?;
        let archs: Vec<&str> = v["architectures"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let arch = match archs.first().copied() {
            Some("LlamaForCausalLM") | Some("MistralForCausalLM") => Arch::Llama,
            Some("Qwen3ForCausalLM") => Arch::Qwen3,
            Some("Qwen2ForCausalLM") => Arch::Qwen2,
            Some(other) => return Err(ConfigError::UnknownArchitecture(other.into())),
            None => return Err(ConfigError::Missing("architectures".into())),
        };
        let uint = |k: &str| -> Result<usize, ConfigError> {
            v[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| ConfigError::Missing(k.into()))
        };
        let hidden = uint("hidden_size")?;
        let q_heads = uint("num_attention_heads")?;
        let kv_heads = v["num_key_value_heads"]
            .as_u64()
            .map(|x| x as usize)
            .unwrap_or(q_heads);
        if q_heads == 0 || kv_heads == 0 || q_heads % kv_heads != 0 {
            return Err(ConfigError::Invalid {
                key: "num_key_value_heads".into(),
                detail: format!("{q_heads} query heads, {kv_heads} kv heads"),
            });
        }
        let rope = &v["rope_parameters"];
        let scaling = if rope.is_object() {
            rope
        } else {
            &v["rope_scaling"]
        };
        let rope_scaling = match scaling["rope_type"].as_str().or(scaling["type"].as_str()) {
            Some("llama3") => Some(Llama3Scaling {
                factor: scaling["factor"].as_f64().unwrap_or(8.0),
                low_freq_factor: scaling["low_freq_factor"].as_f64().unwrap_or(1.0),
                high_freq_factor: scaling["high_freq_factor"].as_f64().unwrap_or(4.0),
                original_max_position_embeddings: scaling["original_max_position_embeddings"]
                    .as_f64()
                    .unwrap_or(8192.0),
            }),
            _ => None,
        };
        Ok(ModelConfig {
            arch,
            hidden,
            layers: uint("num_hidden_layers")?,
            q_heads,
            kv_heads,
            head_dim: v["head_dim"]
                .as_u64()
                .map(|x| x as usize)
                .unwrap_or(hidden / q_heads),
            ffn: uint("intermediate_size")?,
            vocab: uint("vocab_size")?,
            rope_theta: v["rope_theta"]
                .as_f64()
                .or(rope["rope_theta"].as_f64())
                .unwrap_or(10000.0),
            rope_scaling,
            rms_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
            max_position: v["max_position_embeddings"].as_u64().unwrap_or(2048) as usize,
            tie_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            qk_norm: arch == Arch::Qwen3,
            qkv_bias: arch == Arch::Qwen2,
            checkpoint_dtype: v["dtype"]
                .as_str()
                .or(v["torch_dtype"].as_str())
                .map(str::to_string),
        })
    }

    pub fn from_gguf(g: &Gguf) -> Result<ModelConfig, ConfigError> {
        let arch_name = g
            .architecture()
            .ok_or_else(|| ConfigError::Missing("general.architecture".into()))?
            .to_string();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen3" => Arch::Qwen3,
            "qwen2" => Arch::Qwen2,
            other => return Err(ConfigError::UnknownArchitecture(other.into())),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let get = |k: &str| g.get(&key(k));
        let uint = |k: &str| -> Result<usize, ConfigError> {
            get(k)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| ConfigError::Missing(key(k)))
        };
        let hidden = uint("embedding_length")?;
        let q_heads = uint("attention.head_count")?;
        let kv_heads = get("attention.head_count_kv")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .unwrap_or(q_heads);
        if q_heads == 0 || kv_heads == 0 || q_heads % kv_heads != 0 {
            return Err(ConfigError::Invalid {
                key: key("attention.head_count_kv"),
                detail: format!("{q_heads} query heads, {kv_heads} kv heads"),
            });
        }
        let head_dim = match get("attention.key_length").and_then(Value::as_u64) {
            Some(d) => d as usize,
            None => hidden / q_heads,
        };
        let vocab = g
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(|t| t.len())
            .or_else(|| {
                get("vocab_size")
                    .and_then(Value::as_u64)
                    .map(|v| v as usize)
            })
            .ok_or_else(|| ConfigError::Missing("tokenizer.ggml.tokens".into()))?;
        let rope_scaling = match get("rope.scaling.type").and_then(Value::as_str) {
            Some("llama3") => Some(Llama3Scaling {
                factor: get("rope.scaling.factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(8.0),
                low_freq_factor: get("rope.scaling.low_freq_factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0),
                high_freq_factor: get("rope.scaling.high_freq_factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(4.0),
                original_max_position_embeddings: get("rope.scaling.original_context_length")
                    .and_then(Value::as_f64)
                    .unwrap_or(8192.0),
            }),
            _ => None,
        };
        Ok(ModelConfig {
            arch,
            hidden,
            layers: uint("block_count")?,
            q_heads,
            kv_heads,
            head_dim,
            ffn: uint("feed_forward_length")?,
            vocab,
            rope_theta: get("rope.freq_base")
                .and_then(Value::as_f64)
                .unwrap_or(10000.0),
            rope_scaling,
            rms_eps: get("attention.layer_norm_rms_epsilon")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6) as f32,
            max_position: uint("context_length").unwrap_or(2048),
            tie_embeddings: g.tensor("output.weight").is_none(),
            qk_norm: arch == Arch::Qwen3,
            qkv_bias: arch == Arch::Qwen2,
            checkpoint_dtype: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_forms() {
        let qwen = include_str!("../../../configs/qwen3-8b.json");
        let c = ModelConfig::from_hf_config(qwen).unwrap();
        assert_eq!(
            (c.arch, c.hidden, c.layers, c.q_heads, c.kv_heads, c.head_dim),
            (Arch::Qwen3, 4096, 36, 32, 8, 128)
        );
        assert_eq!(
            (c.ffn, c.vocab, c.rope_theta, c.tie_embeddings, c.qk_norm),
            (12288, 151936, 1e6, false, true)
        );
        // transformers 5 writes rope_theta inside rope_parameters; head_dim may be derived.
        let llama = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":2048,"intermediate_size":8192,
            "num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256,
            "rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192},"tie_word_embeddings":true}"#;
        let c = ModelConfig::from_hf_config(llama).unwrap();
        assert_eq!(
            (c.head_dim, c.rope_theta, c.tie_embeddings),
            (64, 500000.0, true)
        );
        assert_eq!(c.rope_scaling.map(|s| s.factor), Some(32.0));
        let e =
            ModelConfig::from_hf_config(r#"{"architectures":["GPT2LMHeadModel"]}"#).unwrap_err();
        assert!(
            e.to_string().contains("GPT2LMHeadModel") && e.to_string().contains("supported"),
            "{e}"
        );
        assert!(ModelConfig::from_hf_config("{not json").is_err());
    }
}
