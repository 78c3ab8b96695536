//! Model hyper-parameters, read from a GGUF header (Hugging Face config.json comes with the
//! safetensors loader).

use vllm_apple_ops::kernels::rope::Llama3Scaling;

use crate::gguf::{Gguf, Value};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "unknown architecture '{0}': supported are LlamaForCausalLM (and MistralForCausalLM), \
         Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM; in GGUF llama, qwen2, qwen3, \
         qwen3moe"
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
    /// Qwen3 attention with a mixture-of-experts MLP (Qwen3-30B-A3B).
    Qwen3Moe,
}

/// The mixture-of-experts part of a config (Qwen3-MoE).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Intermediate size of one expert (`moe_intermediate_size`).
    pub ffn: usize,
    /// Renormalise the top-k probabilities (`norm_topk_prob`).
    pub norm_topk: bool,
    /// Every `sparse_step`-th layer is MoE (`decoder_sparse_step`).
    pub sparse_step: usize,
    /// Layers that keep a dense MLP whatever the step (`mlp_only_layers`).
    pub mlp_only_layers: Vec<usize>,
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
    /// Mixture-of-experts MLPs (Qwen3-MoE); `None` for dense models.
    pub moe: Option<MoeConfig>,
}

impl ModelConfig {
    /// Whether layer `i` has a MoE MLP, as transformers decides it: not listed in
    /// `mlp_only_layers` and `(i + 1) % decoder_sparse_step == 0`.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| {
            m.experts > 0
                && !m.mlp_only_layers.contains(&i)
                && m.sparse_step > 0
                && (i + 1).is_multiple_of(m.sparse_step)
        })
    }
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
            Some("Qwen3MoeForCausalLM") => Arch::Qwen3Moe,
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
        let moe = if arch == Arch::Qwen3Moe {
            let mlp_only_layers = match &v["mlp_only_layers"] {
                serde_json::Value::Null => Vec::new(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| ConfigError::Invalid {
                        key: "mlp_only_layers".into(),
                        detail: "expected a list of layer indices".into(),
                    })?,
                other => {
                    return Err(ConfigError::Invalid {
                        key: "mlp_only_layers".into(),
                        detail: format!("expected a list, got {other}"),
                    })
                }
            };
            Some(MoeConfig {
                experts: uint("num_experts").or_else(|_| uint("num_local_experts"))?,
                top_k: uint("num_experts_per_tok")?,
                ffn: uint("moe_intermediate_size")?,
                norm_topk: v["norm_topk_prob"].as_bool().unwrap_or(false),
                sparse_step: v["decoder_sparse_step"].as_u64().unwrap_or(1) as usize,
                mlp_only_layers,
            })
        } else {
            None
        };
        if let Some(m) = &moe {
            check_moe(m, "num_experts_per_tok")?;
        }
        Ok(ModelConfig {
            moe,
            arch,
            hidden,
            layers: uint("num_hidden_layers")?,
            q_heads,
            kv_heads,
            head_dim: v["head_dim"]
                .as_u64()
                .map(|x| x as usize)
                .unwrap_or(hidden / q_heads),
            // MoE configs whose every layer is sparse may omit the dense size.
            ffn: if arch == Arch::Qwen3Moe {
                uint("intermediate_size").unwrap_or(0)
            } else {
                uint("intermediate_size")?
            },
            vocab: uint("vocab_size")?,
            rope_theta: v["rope_theta"]
                .as_f64()
                .or(rope["rope_theta"].as_f64())
                .unwrap_or(10000.0),
            rope_scaling,
            rms_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
            max_position: v["max_position_embeddings"].as_u64().unwrap_or(2048) as usize,
            tie_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe),
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
            "qwen3moe" => Arch::Qwen3Moe,
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
        // llama.cpp's qwen3moe: every layer sparse, top-k always renormalised.
        let moe = if arch == Arch::Qwen3Moe {
            let m = MoeConfig {
                experts: uint("expert_count")?,
                top_k: uint("expert_used_count")?,
                ffn: uint("expert_feed_forward_length")?,
                norm_topk: true,
                sparse_step: 1,
                mlp_only_layers: Vec::new(),
            };
            check_moe(&m, &key("expert_used_count"))?;
            Some(m)
        } else {
            None
        };
        Ok(ModelConfig {
            moe,
            arch,
            hidden,
            layers: uint("block_count")?,
            q_heads,
            kv_heads,
            head_dim,
            ffn: if arch == Arch::Qwen3Moe {
                uint("feed_forward_length").unwrap_or(0)
            } else {
                uint("feed_forward_length")?
            },
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
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe),
            qkv_bias: arch == Arch::Qwen2,
            checkpoint_dtype: None,
        })
    }
}

fn check_moe(m: &MoeConfig, key: &str) -> Result<(), ConfigError> {
    if m.experts == 0 || m.top_k == 0 || m.top_k > m.experts || m.ffn == 0 {
        return Err(ConfigError::Invalid {
            key: key.into(),
            detail: format!(
                "{} of {} experts with intermediate size {}",
                m.top_k, m.experts, m.ffn
            ),
        });
    }
    Ok(())
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

    #[test]
    fn qwen3_moe_config() {
        let json = include_str!("../../../configs/qwen3-30b-a3b.json");
        let c = ModelConfig::from_hf_config(json).unwrap();
        assert_eq!(c.arch, Arch::Qwen3Moe);
        let m = c.moe.clone().unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.ffn, m.norm_topk),
            (128, 8, 768, true)
        );
        assert!((0..c.layers).all(|i| c.is_moe_layer(i)));
        // decoder_sparse_step and mlp_only_layers pick the dense layers.
        let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
        v["decoder_sparse_step"] = 2.into();
        v["mlp_only_layers"] = serde_json::json!([3]);
        let c = ModelConfig::from_hf_config(&v.to_string()).unwrap();
        let sparse: Vec<usize> = (0..6).filter(|&i| c.is_moe_layer(i)).collect();
        assert_eq!(sparse, vec![1, 5]);
        v["num_experts_per_tok"] = 200.into();
        let e = ModelConfig::from_hf_config(&v.to_string()).unwrap_err();
        assert!(e.to_string().contains("num_experts_per_tok"), "{e}");
    }
}
