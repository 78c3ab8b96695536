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
}

impl ModelConfig {
    pub fn from_gguf(g: &Gguf) -> Result<ModelConfig, ConfigError> {
        let arch_name = g
            .architecture()
            .ok_or_else(|| ConfigError::Missing("general.architecture".into()))?
            .to_string();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen3" => Arch::Qwen3,
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
        })
    }
}
