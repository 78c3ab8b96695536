//! The offline API, as vLLM's: `LLM::new(EngineArgs { model, dtype, max_model_len,
//! gpu_memory_utilization, .. })`, then `generate(prompts, params)` and `chat(..)`.

use std::sync::Arc;

use vllm_apple_model::load::{load_model, parse_dtype, LoadFormat};
use vllm_apple_ops::kernels::attention::AttentionOptions;
use vllm_apple_ops::kv_cache::{plan_num_blocks, KvBudget};
use vllm_apple_ops::{ContextOptions, GpuContext};

use crate::engine::{EngineConfig, EngineError, LLMEngine, Prompt, RequestOutput};
use crate::params::SamplingParams;

/// vLLM's engine arguments that apply here, with vLLM's names and defaults.
#[derive(Clone, Debug)]
pub struct EngineArgs {
    /// GGUF file, Hugging Face folder, or hub id in the local cache.
    pub model: String,
    /// Where the tokenizer comes from, when not the model's own.
    pub tokenizer: Option<String>,
    /// auto, float16, bfloat16, float32.
    pub dtype: String,
    /// Context length; default the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    pub gpu_memory_utilization: f64,
    pub max_num_seqs: usize,
    /// Tokens per step; default max(max_model_len, 2048)... capped as vLLM's chunked
    /// prefill default (2048) when `None`.
    pub max_num_batched_tokens: Option<usize>,
    pub enable_prefix_caching: bool,
    /// auto or dummy.
    pub load_format: String,
    pub seed: u64,
    pub block_size: usize,
    /// Use exactly this many KV blocks instead of sizing from memory (tests, tuning).
    pub num_gpu_blocks_override: Option<usize>,
    /// Record the next decode step while the GPU runs this one (`LLMEngine::step`); on
    /// by default (vLLM's `async_scheduling`, off there by default).
    pub async_scheduling: bool,
}

impl Default for EngineArgs {
    fn default() -> Self {
        EngineArgs {
            model: String::new(),
            tokenizer: None,
            dtype: "auto".into(),
            max_model_len: None,
            gpu_memory_utilization: 0.9,
            max_num_seqs: 256,
            max_num_batched_tokens: None,
            enable_prefix_caching: true,
            load_format: "auto".into(),
            seed: 0,
            block_size: 16,
            num_gpu_blocks_override: None,
            async_scheduling: true,
        }
    }
}

impl EngineArgs {
    pub fn new(model: impl Into<String>) -> Self {
        EngineArgs {
            model: model.into(),
            ..Default::default()
        }
    }

    /// Loads the model and sizes the KV cache: the engine, ready for requests.
    pub fn build(&self, ctx: Arc<GpuContext>) -> Result<LLMEngine, EngineError> {
        let dtype = parse_dtype(&self.dtype)?;
        let format = LoadFormat::parse(&self.load_format)?;
        let (model, tokenizer) = load_model(
            &ctx,
            &self.model,
            self.tokenizer.as_deref(),
            dtype,
            format,
            self.seed as u32,
        )?;
        let max_model_len = self.max_model_len.unwrap_or(model.cfg.max_position);
        let max_num_batched_tokens = self.max_num_batched_tokens.unwrap_or(2048).max(1);
        let spec = model.kv_spec(self.block_size);
        // More blocks than max_num_seqs sequences of max_model_len could never be used; not
        // allocating them matters where "GPU memory" is the host's (lavapipe) and wgpu
        // zero-fills every buffer before its first use.
        let useful = self.max_num_seqs.max(1) * max_model_len.div_ceil(self.block_size);
        let num_blocks = match self.num_gpu_blocks_override {
            Some(n) => n,
            None => {
                let memory = ctx.memory_bytes.ok_or_else(|| {
                    EngineError::Config(
                        "the GPU's memory size is unknown: set num_gpu_blocks_override".into(),
                    )
                })?;
                // Activations of the largest step (hidden states, projections, MLP, logits
                // of every sequence), counted generously.
                let c = &model.cfg;
                let moe_ffn = c
                    .moe
                    .as_ref()
                    .map_or(0, |m| m.ffn * m.top_k * 2 + c.hidden * m.top_k);
                let per_token = (c.hidden * 6
                    + (c.q_heads + 2 * c.kv_heads) * c.head_dim
                    + 3 * c.ffn
                    + moe_ffn)
                    * 4;
                let activation = (max_num_batched_tokens * per_token
                    + self.max_num_seqs.min(max_num_batched_tokens) * c.vocab * 4)
                    as u64;
                plan_num_blocks(
                    &spec,
                    &KvBudget {
                        memory_bytes: memory,
                        utilization: self.gpu_memory_utilization,
                        weights_bytes: model.weight_bytes(),
                        activation_bytes: activation,
                    },
                    max_model_len,
                    ctx.max_binding_bytes(),
                )?
                .min(useful)
            }
        };
        LLMEngine::new(
            ctx,
            model,
            tokenizer,
            EngineConfig {
                max_model_len,
                max_num_seqs: self.max_num_seqs,
                max_num_batched_tokens,
                block_size: self.block_size,
                num_blocks,
                enable_prefix_caching: self.enable_prefix_caching,
                seed: self.seed,
                attention: AttentionOptions::from_env()?,
                async_scheduling: self.async_scheduling,
            },
        )
    }
}

/// A chat message.
#[derive(Clone, Debug)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct LLM {
    pub engine: LLMEngine,
    next_request: u64,
}

impl LLM {
    /// Opens the GPU (honouring `WGPU_BACKEND`) and builds the engine.
    pub fn new(args: EngineArgs) -> Result<LLM, EngineError> {
        let ctx = GpuContext::new(&ContextOptions::default())?;
        Self::with_context(ctx, args)
    }

    pub fn with_context(ctx: Arc<GpuContext>, args: EngineArgs) -> Result<LLM, EngineError> {
        Ok(LLM {
            engine: args.build(ctx)?,
            next_request: 0,
        })
    }

    /// Generates for every prompt (one `params` for all, or one each), batching them all;
    /// outputs in prompt order. A progress bar shows on terminals.
    pub fn generate(
        &mut self,
        prompts: Vec<Prompt>,
        params: &[SamplingParams],
    ) -> Result<Vec<RequestOutput>, EngineError> {
        if params.len() != 1 && params.len() != prompts.len() {
            return Err(EngineError::InvalidRequest(format!(
                "{} sampling params for {} prompts: give one, or one per prompt",
                params.len(),
                prompts.len()
            )));
        }
        let base = self.next_request;
        let n = prompts.len();
        let mut ids: Vec<String> = Vec::with_capacity(n);
        for (i, p) in prompts.into_iter().enumerate() {
            let id = format!("{}", base + i as u64);
            let sp = params.get(i).unwrap_or(&params[0]).clone();
            if let Err(e) = self.engine.add_request(&id, p, sp) {
                for done in &ids {
                    self.engine.abort(done);
                }
                return Err(e);
            }
            ids.push(id);
        }
        self.next_request += n as u64;
        let bar = indicatif::ProgressBar::new(n as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "processed prompts {bar:30} {pos}/{len} {elapsed} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let mut done: std::collections::HashMap<String, RequestOutput> = Default::default();
        while done.len() < n {
            let outs = match self.engine.step() {
                Ok(o) => o,
                Err(e) => {
                    for id in &ids {
                        self.engine.abort(id);
                    }
                    return Err(e);
                }
            };
            if outs.is_empty() && !self.engine.has_unfinished() {
                break;
            }
            for o in outs {
                if o.finished {
                    bar.inc(1);
                    done.insert(o.request_id.clone(), o);
                }
            }
        }
        bar.finish_and_clear();
        ids.iter()
            .map(|id| {
                done.remove(id).ok_or_else(|| {
                    EngineError::Config(format!("request {id} ended without an output"))
                })
            })
            .collect()
    }

    /// Renders each conversation with the model's chat template (with the generation
    /// prompt and `template_kwargs` such as `enable_thinking`), then generates.
    pub fn chat(
        &mut self,
        conversations: &[Vec<ChatMessage>],
        params: &[SamplingParams],
        template_kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<RequestOutput>, EngineError> {
        let tok = self.engine.tokenizer.as_ref().ok_or_else(|| {
            EngineError::InvalidRequest("this model has no tokenizer for chat".into())
        })?;
        let mut prompts = Vec::with_capacity(conversations.len());
        for conv in conversations {
            let msgs: Vec<serde_json::Value> = conv
                .iter()
                .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                .collect();
            let text = tok
                .render_chat(&serde_json::Value::Array(msgs), true, template_kwargs)
                .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
            prompts.push(Prompt::Text(text));
        }
        self.generate(prompts, params)
    }
}
