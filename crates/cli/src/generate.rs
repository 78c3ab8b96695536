//! `vllm-apple generate`: prompts in, completions out, through our kernels.

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use vllm_apple_model::config::ModelConfig;
use vllm_apple_model::decoder::DecoderModel;
use vllm_apple_model::gguf::GgufFile;
use vllm_apple_model::resolve::{hub_cache, resolve, ModelLocation};
use vllm_apple_model::runner::{generate, Sampling};
use vllm_apple_model::safetensors_dir::SafetensorsDir;
use vllm_apple_model::tokenizer::GgufTokenizer;
use vllm_apple_ops::kernels::attention::AttentionOptions;
use vllm_apple_ops::{ContextOptions, DType, GpuContext};

/// Where scripts/fetch-assets.sh puts the embedded default model.
const DEFAULT_MODEL: &str = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(ClapArgs)]
pub struct Args {
    /// A GGUF file, a Hugging Face folder (config.json + safetensors + tokenizer.json), or a
    /// hub id such as Qwen/Qwen3-0.6B found in the local Hugging Face cache.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Apply the model's chat template (each prompt as one user message).
    #[arg(long)]
    chat: bool,
    /// Print one JSON object per prompt (prompt and completion, text and token ids).
    #[arg(long)]
    json: bool,
    /// Weight dtype on the GPU: auto (the checkpoint's own for Hugging Face folders,
    /// float16 for GGUF), float16, bfloat16 or float32.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// `auto` loads the weights; `dummy` makes random ones of the model's shape on the GPU
    /// (Hugging Face folders: config.json and the tokenizer are still read), for benchmarks.
    #[arg(long, default_value = "auto")]
    load_format: String,
    #[arg(required = true)]
    prompts: Vec<String>,
}

fn parse_dtype(d: &str) -> Result<DType> {
    match DType::parse_float(d) {
        Some(t) => Ok(t),
        None => bail!("dtype {d}: expected auto, float16, bfloat16 or float32"),
    }
}

pub fn run(opts: &ContextOptions, args: Args) -> Result<()> {
    let dtype = match args.dtype.as_str() {
        "auto" => None,
        d => Some(parse_dtype(d)?),
    };
    if !matches!(args.load_format.as_str(), "auto" | "dummy") {
        bail!("--load-format {}: expected auto or dummy", args.load_format);
    }
    let location = resolve(&args.model, &hub_cache()).with_context(|| {
        if args.model == DEFAULT_MODEL {
            "the default model is fetched by scripts/fetch-assets.sh".to_string()
        } else {
            format!("--model {}", args.model)
        }
    })?;
    let ctx = GpuContext::new(opts)?;
    let (tok, model) = match &location {
        ModelLocation::Gguf(_) if args.load_format == "dummy" => {
            bail!("--load-format dummy needs a Hugging Face folder (its config.json gives the shapes)")
        }
        ModelLocation::Gguf(path) => {
            let file = GgufFile::open(path)?;
            (
                GgufTokenizer::from_gguf(&file.gguf)?,
                DecoderModel::from_gguf(&ctx, &file, dtype.unwrap_or(DType::F16))?,
            )
        }
        ModelLocation::HfDir(dir) => {
            let cfg =
                ModelConfig::from_hf_config(&std::fs::read_to_string(dir.join("config.json"))?)?;
            let dtype = match dtype {
                Some(d) => d,
                None => parse_dtype(cfg.checkpoint_dtype.as_deref().unwrap_or("float16"))?,
            };
            let model = if args.load_format == "dummy" {
                DecoderModel::dummy(&ctx, cfg, dtype, args.seed as u32)?
            } else {
                DecoderModel::from_hf_dir(&ctx, &SafetensorsDir::open(dir)?, dtype)?
            };
            (GgufTokenizer::from_hf_dir(dir)?, model)
        }
    };
    let attn = AttentionOptions::from_env()?;
    let sampling = Sampling {
        temperature: args.temperature,
        seed: args.seed,
    };
    let stop: Vec<u32> = tok.eos.into_iter().collect();
    for prompt in &args.prompts {
        let text = if args.chat {
            tok.apply_chat_template(&[("user", prompt)], true)?
        } else {
            prompt.clone()
        };
        let ids = tok.encode(&text)?;
        let out = generate(&ctx, &model, &ids, args.max_tokens, &stop, &attn, sampling)?;
        let completion = tok.decode(&out.ids, true)?;
        let decode_tok_s = out.ids.len().saturating_sub(1) as f64 / out.decode_seconds.max(1e-9);
        if args.json {
            let obj = serde_json::json!({
                "prompt": text,
                "prompt_token_ids": ids,
                "completion": completion,
                "completion_token_ids": out.ids,
                "prefill_seconds": out.prefill_seconds,
                "decode_tokens_per_second": decode_tok_s,
            });
            println!("{obj}");
        } else {
            println!("{prompt}\n=> {completion}");
            eprintln!(
                "[{} prompt tokens in {:.2} s, {} generated at {:.1} tok/s on {}]",
                ids.len(),
                out.prefill_seconds,
                out.ids.len(),
                decode_tok_s,
                ctx.info.name
            );
        }
    }
    Ok(())
}
