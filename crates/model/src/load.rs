//! One entry point from a `--model` argument to a loaded model and its tokenizer: a GGUF
//! file, a Hugging Face folder or a hub id in the local cache, real or dummy weights.

use crate::config::{ConfigError, ModelConfig};
use crate::decoder::{DecoderModel, ModelError};
use crate::gguf::{GgufError, GgufFile};
use crate::resolve::{hub_cache, resolve_or_download, ModelLocation, ResolveError};
use crate::safetensors_dir::{SafetensorsDir, SafetensorsError};
use crate::tokenizer::{GgufTokenizer, TokenizerError};
use vllm_apple_ops::{DType, GpuContext};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{0}")]
    Invalid(String),
}

/// vLLM's `load_format`: real weights, or random ones of the model's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadFormat {
    Auto,
    Dummy,
}

impl LoadFormat {
    pub fn parse(s: &str) -> Result<LoadFormat, LoadError> {
        match s {
            "auto" | "safetensors" | "gguf" => Ok(LoadFormat::Auto),
            "dummy" => Ok(LoadFormat::Dummy),
            other => Err(LoadError::Invalid(format!(
                "load_format '{other}': expected auto or dummy"
            ))),
        }
    }
}

/// `dtype` as vLLM spells it: auto (the checkpoint's own; float16 for GGUF), float16 /
/// half, bfloat16, float32 / float.
pub fn parse_dtype(d: &str) -> Result<Option<DType>, LoadError> {
    if d == "auto" {
        return Ok(None);
    }
    DType::parse_float(d).map(Some).ok_or_else(|| {
        LoadError::Invalid(format!(
            "dtype '{d}': expected auto, float16, bfloat16 or float32"
        ))
    })
}

/// Loads `spec` (GGUF file, Hugging Face folder, or hub id in the local cache) with its
/// tokenizer; `tokenizer` overrides where the tokenizer comes from (a GGUF or a folder with
/// tokenizer.json). A folder without tokenizer files loads with no tokenizer (prompts must
/// then be token ids).
pub fn load_model(
    ctx: &GpuContext,
    spec: &str,
    tokenizer: Option<&str>,
    dtype: Option<DType>,
    format: LoadFormat,
    seed: u32,
) -> Result<(DecoderModel, Option<GgufTokenizer>), LoadError> {
    let location = resolve_or_download(spec, &hub_cache())?;
    let (model, tok) = match &location {
        ModelLocation::Gguf(_) if format == LoadFormat::Dummy => {
            return Err(LoadError::Invalid(
                "load_format dummy needs a Hugging Face folder (its config.json gives the shapes)"
                    .into(),
            ))
        }
        ModelLocation::Gguf(path) => {
            let file = GgufFile::open(path)?;
            let model = DecoderModel::from_gguf(ctx, &file, dtype.unwrap_or(DType::F16))?;
            (model, Some(GgufTokenizer::from_gguf(&file.gguf)?))
        }
        ModelLocation::HfDir(dir) => {
            let path = dir.join("config.json");
            let json = std::fs::read_to_string(&path).map_err(|e| ConfigError::Invalid {
                key: path.display().to_string(),
                detail: e.to_string(),
            })?;
            let cfg = ModelConfig::from_hf_config(&json)?;
            let dtype = match dtype {
                Some(d) => d,
                None => parse_dtype(cfg.checkpoint_dtype.as_deref().unwrap_or("float16"))?
                    .unwrap_or(DType::F16),
            };
            let model = match format {
                LoadFormat::Dummy => DecoderModel::dummy(ctx, cfg, dtype, seed)?,
                LoadFormat::Auto => {
                    DecoderModel::from_hf_dir(ctx, &SafetensorsDir::open(dir)?, dtype)?
                }
            };
            let tok = if dir.join("tokenizer.json").exists() {
                Some(GgufTokenizer::from_hf_dir(dir)?)
            } else {
                None
            };
            (model, tok)
        }
    };
    let tok = match tokenizer {
        None => tok,
        Some(t) => Some(load_tokenizer(t)?),
    };
    Ok((model, tok))
}

/// A tokenizer alone: a folder with tokenizer.json, a GGUF file, or a hub id.
pub fn load_tokenizer(spec: &str) -> Result<GgufTokenizer, LoadError> {
    let path = std::path::Path::new(spec);
    if path.join("tokenizer.json").is_file() {
        return Ok(GgufTokenizer::from_hf_dir(path)?);
    }
    Ok(match resolve_or_download(spec, &hub_cache())? {
        ModelLocation::Gguf(path) => GgufTokenizer::from_gguf(&GgufFile::open(&path)?.gguf)?,
        ModelLocation::HfDir(dir) => GgufTokenizer::from_hf_dir(&dir)?,
    })
}
