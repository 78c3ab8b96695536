//! `LLMEngine`: requests in, one batched forward per `step`, outputs out (vLLM's
//! `EngineCore` and output processing in one place).
//!
//! A request with `n` samples becomes `n` sequences that share the prompt (through the
//! prefix cache when it is on). Each step: the scheduler picks the sequences and token
//! counts; the batch is laid out as the attention metadata wants it (each sequence's new
//! tokens in turn, its block table from the KV manager); the model records its forward and
//! the GPU sampler over the rows that need a token (argmax for greedy rows; temperature,
//! min-p, top-k and top-p draws with a uniform from the request's own generator); one
//! submission, with penalties, logit bias and min_tokens applied to the logits on the GPU
//! first; then those rows read back one id each, and only rows that want logprobs read
//! their logits; full blocks are registered for prefix caching; new tokens are detokenized and
//! checked against the stop conditions; finished sequences free their blocks.

use std::collections::HashMap;
use std::time::Instant;

use vllm_apple_model::decoder::DecoderModel;
use vllm_apple_model::runner::HOLD_WAIT_SECONDS;
use vllm_apple_model::tokenizer::GgufTokenizer;
use vllm_apple_ops::kernels::attention::{AttentionOptions, HostMetadata, SeqSlice};
use vllm_apple_ops::kernels::logprobs::{self, LogprobRequest};
use vllm_apple_ops::kernels::sample::{self, RowSampling};
use vllm_apple_ops::kv_cache::KvCache;
use vllm_apple_ops::recorder::Readback;
use vllm_apple_ops::{DType, GpuContext, OpsError, Step, SubmissionIndex, Tensor};

use crate::detokenizer::Detokenizer;
use crate::kv_manager::{KvCacheManager, PrefixCacheStats, ReqId};
use crate::params::{FinishReason, SamplingParams, StopReason, MIN_TEMPERATURE};
use crate::sampler::{self, SeqSampling, TokenLogprob};
use crate::scheduler::{Scheduled, Scheduler, SchedulerConfig, SeqTokens};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is invalid (the server answers 400).
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Model(#[from] vllm_apple_model::decoder::ModelError),
    #[error(transparent)]
    Load(#[from] vllm_apple_model::load::LoadError),
    #[error("{0}")]
    Config(String),
}

/// A prompt as text (tokenized by the engine) or as token ids.
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.to_string())
    }
}

impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}

impl From<Vec<u32>> for Prompt {
    fn from(v: Vec<u32>) -> Self {
        Prompt::Ids(v)
    }
}

/// Top logprobs of one position: the chosen token's own, then the top-N.
#[derive(Clone, Debug, PartialEq)]
pub struct PositionLogprobs {
    pub token: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// One sample of a request (vLLM's `CompletionOutput`).
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionOutput {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub cumulative_logprob: Option<f64>,
    pub logprobs: Option<Vec<PositionLogprobs>>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
}

/// vLLM's `RequestOutput`: cumulative so far, `finished` once every sample is.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOutput {
    pub request_id: String,
    pub prompt: Option<String>,
    pub prompt_token_ids: Vec<u32>,
    /// Per prompt position (the first is `None`, as in vLLM).
    pub prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
    pub outputs: Vec<CompletionOutput>,
    pub finished: bool,
    /// Seconds from arrival to the first generated token, once there is one.
    pub first_token_seconds: Option<f64>,
}

/// What the engine is built with (the engine-relevant part of vLLM's `EngineArgs`).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub enable_prefix_caching: bool,
    pub seed: u64,
    pub attention: AttentionOptions,
    /// Record and submit the next decode step before this one's tokens are read back
    /// (`LLMEngine::step`).
    pub async_scheduling: bool,
}

struct Sequence {
    request: ReqId,
    index: usize,
    params: SamplingParams,
    prompt_len: usize,
    sampling: SeqSampling,
    detok: Option<Detokenizer>,
    text: String,
    cumulative_logprob: f64,
    logprobs: Vec<PositionLogprobs>,
    finish: Option<(FinishReason, Option<StopReason>)>,
}

struct Request {
    external_id: String,
    prompt: Option<String>,
    prompt_ids: Vec<u32>,
    seqs: Vec<ReqId>,
    prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
    /// Prompt logprobs wanted (top-N), until the prompt is done.
    prompt_logprobs_n: Option<usize>,
    arrival: Instant,
    first_token: Option<f64>,
}

/// Engine counters (the server's /metrics).
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineStats {
    pub num_running: usize,
    pub num_waiting: usize,
    pub kv_cache_usage: f64,
    pub prefix_cache: PrefixCacheStats,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Steps launched ahead of the host (async scheduling), among `steps`.
    pub steps_ahead: u64,
    /// Seconds of the steps so far: the host before submitting (scheduling, batch layout,
    /// uploads, recording), inside `queue.submit` and waiting for the GPU, and the host
    /// after (read-back, detokenizing, stop checks, outputs).
    pub prepare_seconds: f64,
    pub gpu_seconds: f64,
    pub finish_seconds: f64,
}

pub struct LLMEngine {
    pub ctx: std::sync::Arc<GpuContext>,
    pub model: DecoderModel,
    pub tokenizer: Option<GgufTokenizer>,
    pub cfg: EngineConfig,
    kv: KvCache,
    kv_manager: KvCacheManager,
    scheduler: Scheduler,
    seqs: HashMap<ReqId, Sequence>,
    tokens: HashMap<ReqId, SeqTokens>,
    requests: HashMap<ReqId, Request>,
    by_external: HashMap<String, ReqId>,
    next_id: ReqId,
    stats: EngineStats,
    /// Host-readable buffers for the sampled ids, reused by row count (a new mappable
    /// buffer per step costs a driver allocation); two are in use while a step runs ahead.
    readbacks: Vec<Readback>,
    /// The step run ahead of the host (`step`), if any.
    in_flight: Option<Launched>,
    /// The last read-back waited on the GPU (more than `HOLD_WAIT_SECONDS`): a step run
    /// ahead goes in one submission, since the GPU is still busy with the one before.
    gpu_bound: bool,
}

impl LLMEngine {
    pub fn new(
        ctx: std::sync::Arc<GpuContext>,
        model: DecoderModel,
        tokenizer: Option<GgufTokenizer>,
        cfg: EngineConfig,
    ) -> Result<LLMEngine, EngineError> {
        if cfg.max_model_len < 2 || cfg.max_model_len > model.cfg.max_position.max(2) {
            return Err(EngineError::Config(format!(
                "max_model_len {} must be in 2..={} (the model's max_position_embeddings)",
                cfg.max_model_len, model.cfg.max_position
            )));
        }
        if cfg.num_blocks * cfg.block_size < cfg.max_model_len {
            return Err(EngineError::Config(format!(
                "{} KV blocks of {} tokens cannot hold one sequence of max_model_len {}",
                cfg.num_blocks, cfg.block_size, cfg.max_model_len
            )));
        }
        if cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 {
            return Err(EngineError::Config(
                "max_num_seqs and max_num_batched_tokens must be positive".into(),
            ));
        }
        let kv = KvCache::new(&ctx, model.kv_spec(cfg.block_size), cfg.num_blocks)?;
        Ok(LLMEngine {
            kv,
            kv_manager: KvCacheManager::new(
                cfg.num_blocks,
                cfg.block_size,
                cfg.enable_prefix_caching,
            ),
            scheduler: Scheduler::new(SchedulerConfig {
                max_num_seqs: cfg.max_num_seqs,
                max_num_batched_tokens: cfg.max_num_batched_tokens,
            }),
            seqs: HashMap::new(),
            tokens: HashMap::new(),
            requests: HashMap::new(),
            by_external: HashMap::new(),
            next_id: 0,
            stats: EngineStats::default(),
            readbacks: Vec::new(),
            in_flight: None,
            gpu_bound: false,
            ctx,
            model,
            tokenizer,
            cfg,
        })
    }

    fn eos(&self) -> Option<u32> {
        self.tokenizer.as_ref().and_then(|t| t.eos)
    }

    /// Tokenizes (when text), validates and queues a request.
    pub fn add_request(
        &mut self,
        request_id: &str,
        prompt: Prompt,
        params: SamplingParams,
    ) -> Result<(), EngineError> {
        params.validate().map_err(EngineError::InvalidRequest)?;
        if self.by_external.contains_key(request_id) {
            return Err(EngineError::InvalidRequest(format!(
                "request id '{request_id}' is already in use"
            )));
        }
        let (text, ids) = match prompt {
            Prompt::Text(t) => {
                let tok = self.tokenizer.as_ref().ok_or_else(|| {
                    EngineError::InvalidRequest(
                        "this model has no tokenizer: give prompt token ids".into(),
                    )
                })?;
                let ids = tok
                    .encode(&t)
                    .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
                (Some(t), ids)
            }
            Prompt::Ids(ids) => (None, ids),
        };
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.model.cfg.vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is out of vocabulary (size {})",
                self.model.cfg.vocab
            )));
        }
        if ids.len() >= self.cfg.max_model_len {
            return Err(EngineError::InvalidRequest(format!(
                "this model's maximum context length is {} tokens; the prompt has {} tokens \
                 (at least one token must be left to generate)",
                self.cfg.max_model_len,
                ids.len()
            )));
        }
        if let Some((t, _)) = params
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= self.model.cfg.vocab)
        {
            return Err(EngineError::InvalidRequest(format!(
                "logit_bias token {t} is out of vocabulary"
            )));
        }
        let rid = self.next_id;
        self.next_id += 1;
        let mut seq_ids = Vec::with_capacity(params.n);
        for index in 0..params.n {
            let id = self.next_id;
            self.next_id += 1;
            let mut p = params.clone();
            if let Some(s) = p.seed {
                p.seed = Some(s.wrapping_add(index as u64));
            }
            let fallback = self
                .cfg
                .seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(id);
            let detok = self
                .tokenizer
                .as_ref()
                .map(|_| Detokenizer::new(&ids, p.skip_special_tokens));
            self.seqs.insert(
                id,
                Sequence {
                    request: rid,
                    index,
                    sampling: SeqSampling::new(&p, fallback),
                    params: p,
                    prompt_len: ids.len(),
                    detok,
                    text: String::new(),
                    cumulative_logprob: 0.0,
                    logprobs: Vec::new(),
                    finish: None,
                },
            );
            self.tokens.insert(
                id,
                SeqTokens {
                    tokens: ids.clone(),
                    num_computed: 0,
                },
            );
            self.scheduler.add(id);
            seq_ids.push(id);
        }
        self.stats.prompt_tokens += ids.len() as u64;
        self.by_external.insert(request_id.to_string(), rid);
        self.requests.insert(
            rid,
            Request {
                external_id: request_id.to_string(),
                prompt: text,
                prompt_logprobs: params.prompt_logprobs.map(|_| vec![None]),
                prompt_logprobs_n: params.prompt_logprobs,
                prompt_ids: ids,
                seqs: seq_ids,
                arrival: Instant::now(),
                first_token: None,
            },
        );
        Ok(())
    }

    /// Drops a request wherever it is (waiting, mid-prefill, decoding) and frees its blocks.
    /// Returns its final output (finish reason `abort`), or `None` for an unknown id.
    pub fn abort(&mut self, request_id: &str) -> Option<RequestOutput> {
        let rid = self.by_external.get(request_id).copied()?;
        let seq_ids = self.requests.get(&rid)?.seqs.clone();
        for id in &seq_ids {
            if let Some(s) = self.seqs.get_mut(id) {
                if s.finish.is_none() {
                    s.finish = Some((FinishReason::Abort, None));
                }
            }
            self.release(*id);
        }
        let out = self.output_of(rid);
        self.retire(rid);
        Some(out)
    }

    pub fn has_unfinished(&self) -> bool {
        !self.requests.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            kv_cache_usage: self.kv_manager.usage(),
            prefix_cache: self.kv_manager.prefix_cache_stats(),
            preemptions: self.scheduler.num_preemptions,
            ..self.stats
        }
    }

    /// Blocks in use (0 when idle: the leak check of the tests).
    pub fn kv_blocks_in_use(&self) -> usize {
        self.kv_manager.num_blocks() - self.kv_manager.num_free_blocks()
    }

    /// Takes a finished or aborted sequence out of scheduling and frees its blocks (its
    /// tokens stay until the request is retired).
    /// Whether sequence `id` is still going (not finished, not aborted).
    fn live(&self, id: ReqId) -> bool {
        self.seqs.get(&id).is_some_and(|s| s.finish.is_none())
    }

    fn release(&mut self, id: ReqId) {
        self.scheduler.remove(id);
        self.kv_manager.free(id);
    }

    fn retire(&mut self, rid: ReqId) {
        if let Some(r) = self.requests.remove(&rid) {
            self.by_external.remove(&r.external_id);
            for id in r.seqs {
                self.seqs.remove(&id);
                self.tokens.remove(&id);
            }
        }
    }

    fn output_of(&self, rid: ReqId) -> RequestOutput {
        let r = &self.requests[&rid];
        let outputs: Vec<CompletionOutput> = r
            .seqs
            .iter()
            .filter_map(|id| Some((self.seqs.get(id)?, self.tokens.get(id)?)))
            .map(|(s, t)| CompletionOutput {
                index: s.index,
                text: s.text.clone(),
                token_ids: t.tokens[s.prompt_len..].to_vec(),
                cumulative_logprob: s.params.logprobs.map(|_| s.cumulative_logprob),
                logprobs: s.params.logprobs.map(|_| s.logprobs.clone()),
                finish_reason: s.finish.as_ref().map(|f| f.0),
                stop_reason: s.finish.as_ref().and_then(|f| f.1.clone()),
            })
            .collect();
        RequestOutput {
            request_id: r.external_id.clone(),
            prompt: r.prompt.clone(),
            prompt_token_ids: r.prompt_ids.clone(),
            prompt_logprobs: r.prompt_logprobs.clone(),
            finished: outputs.iter().all(|o| o.finish_reason.is_some()),
            outputs,
            first_token_seconds: r.first_token,
        }
    }

    /// Runs one step; returns the outputs of requests that progressed (cumulative), the
    /// finished ones last time they appear.
    ///
    /// With `async_scheduling`, a step of decodes only also records and submits the next
    /// step before it reads its own tokens back (vLLM's async scheduling): the next step's
    /// input ids are this step's sampled ids, still on the GPU, so the host's batch layout
    /// and recording overlap the GPU's work. That step runs one token ahead of what the
    /// host knows; it is only launched where its batch is certain (`run_ahead`), and the
    /// rows of sequences that stopped in between are dropped when it is read.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>, EngineError> {
        let t0 = Instant::now();
        // A step in flight whose sequences all ended (aborted, or stopped a step before)
        // is dropped unread.
        let in_flight = self.in_flight.take();
        let in_flight = in_flight.filter(|l| l.seqs.iter().any(|sc| self.live(sc.id)));
        let cur = match in_flight {
            Some(l) => l,
            None => {
                let sched = self
                    .scheduler
                    .schedule(&mut self.tokens, &mut self.kv_manager);
                if sched.seqs.is_empty() {
                    return Ok(Vec::new());
                }
                self.stats.prepare_seconds += t0.elapsed().as_secs_f64();
                self.launch(sched.seqs, None)?
            }
        };
        if self.cfg.async_scheduling {
            if let Some(next) = self.run_ahead(&cur) {
                let ids = cur.ids.clone();
                match self.launch(next, ids) {
                    Ok(l) => {
                        self.stats.steps_ahead += 1;
                        self.in_flight = Some(l);
                    }
                    // The synchronous path of the next step meets the same error and
                    // reports it there, after this step's tokens are out.
                    Err(e) => tracing::warn!("running a step ahead: {e}"),
                }
            }
        }
        self.finish(cur)
    }

    /// The decode step that follows `cur`, where it is certain whatever `cur` samples:
    /// every running sequence is in `cur` and samples there, none waits for admission, none
    /// is at a length limit, no request needs its tokens on the host to build the step
    /// (repetition penalties, logits on the host, prompt logprobs), and the cache has a
    /// slot for each next token (allocated here). `None` otherwise.
    fn run_ahead(&mut self, cur: &Launched) -> Option<Vec<Scheduled>> {
        let n = cur.seqs.len();
        let waiting = self.scheduler.num_waiting() > 0 && n < self.cfg.max_num_seqs;
        if waiting
            || cur.ids.is_none()
            || !cur.prompt_rows.is_empty()
            || cur.sample_rows.len() != n
            || self.scheduler.num_running() != n
            || n > self.cfg.max_num_batched_tokens
        {
            return None;
        }
        let mut next = Vec::with_capacity(n);
        for sc in &cur.seqs {
            let seq = self.seqs.get(&sc.id)?;
            let p = &seq.params;
            // Tokens once `cur`'s is in, and generated ones among them.
            let len = sc.num_computed + sc.num_new + 1;
            if seq.finish.is_some()
                || p.needs_logits()
                || p.has_penalties()
                || p.max_tokens.is_some_and(|m| len - seq.prompt_len >= m)
                || len >= self.cfg.max_model_len
            {
                return None;
            }
            next.push(Scheduled {
                id: sc.id,
                num_computed: len - 1,
                num_new: 1,
            });
        }
        for sc in &next {
            if !self.kv_manager.allocate(sc.id, sc.num_computed + 1, &[]) {
                return None;
            }
        }
        Some(next)
    }

    /// Lays out, records and submits one step over `seqs`. `ahead`: the step runs ahead of
    /// the host (`run_ahead`), its input ids (one per sequence) are these sampled ids on
    /// the GPU and every sequence samples; otherwise the ids are the host's tokens.
    fn launch(
        &mut self,
        seqs: Vec<Scheduled>,
        ahead: Option<Tensor>,
    ) -> Result<Launched, EngineError> {
        let started = Instant::now();
        self.stats.steps += 1;
        let mut ids = Vec::with_capacity(seqs.iter().map(|s| s.num_new).sum());
        // (sequence, batch row of its last token) for sequences that complete their tokens.
        let mut sample_rows: Vec<(ReqId, usize)> = Vec::new();
        // (request, prompt position p, batch row of token p) for prompt logprobs of p + 1.
        let mut prompt_rows: Vec<(ReqId, usize, usize)> = Vec::new();
        let mut offset = 0;
        for sc in &seqs {
            if ahead.is_some() {
                sample_rows.push((sc.id, offset));
                offset += 1;
                continue;
            }
            let toks = &self.tokens[&sc.id];
            ids.extend_from_slice(&toks.tokens[sc.num_computed..sc.num_computed + sc.num_new]);
            if sc.num_computed + sc.num_new == toks.tokens.len() {
                sample_rows.push((sc.id, offset + sc.num_new - 1));
            }
            let seq = &self.seqs[&sc.id];
            let req = &self.requests[&seq.request];
            if req.prompt_logprobs_n.is_some() && seq.index == 0 {
                for p in sc.num_computed..(sc.num_computed + sc.num_new).min(seq.prompt_len - 1) {
                    prompt_rows.push((seq.request, p, offset + p - sc.num_computed));
                }
            }
            offset += sc.num_new;
        }
        let num_tokens = offset;
        let is_ahead = ahead.is_some();
        let tables: Vec<&[u32]> = seqs
            .iter()
            .map(|sc| self.kv_manager.blocks_of(sc.id))
            .collect();
        let seq_slices: Vec<SeqSlice> = seqs
            .iter()
            .zip(&tables)
            .map(|(sc, table)| SeqSlice {
                block_table: table,
                num_cached: sc.num_computed,
                num_new: sc.num_new,
            })
            .collect();
        let ctx = &*self.ctx;
        let meta = HostMetadata::build(&seq_slices, self.cfg.block_size, 0)?
            .upload(ctx, self.cfg.block_size)?;
        // Logit rows: sampled rows first, then prompt-logprob rows.
        let rows: Vec<u32> = sample_rows
            .iter()
            .map(|&(_, r)| r as u32)
            .chain(prompt_rows.iter().map(|&(_, _, r)| r as u32))
            .collect();
        // The token ids and the logit rows (the last token where none is sampled: its
        // logits are computed and unused) in one upload.
        let last = [(num_tokens - 1) as u32];
        let logit_rows: &[u32] = if rows.is_empty() { &last } else { &rows };
        let (ids_t, rows_t) = match ahead {
            Some(t) => (t, ctx.upload_u32(&[logit_rows.len()], logit_rows)?),
            None => {
                let [ids_t, rows_t] = ctx.upload_packed([
                    (&[ids.len()], DType::U32, &ids),
                    (&[logit_rows.len()], DType::U32, logit_rows),
                ])?;
                (ids_t, rows_t)
            }
        };
        let mut step = Step::new(ctx);
        // Early partial submissions only let the GPU start sooner when it is idle; behind
        // a busy GPU each costs it a gap between parts.
        if is_ahead && self.gpu_bound {
            step.hold_parts();
        }
        let mut gpu_logprobs: Option<(logprobs::Logprobs, Vec<usize>)> = None;
        let logits = self.model.forward(
            &mut step,
            &ids_t,
            &meta,
            &self.kv,
            &rows_t,
            &self.cfg.attention,
        )?;
        let (logits, sampled) = if rows.is_empty() {
            (None, None)
        } else {
            // Per sampled row: its logits processing, its draw (greedy rows and rows the
            // host samples take the argmax, unused for the latter, as for the
            // prompt-logprob rows), and whether it wants logprobs (of the raw logits,
            // copied before processing).
            let mut row_sampling = Vec::with_capacity(rows.len());
            let mut adjust = Vec::new();
            let mut lp_rows = Vec::new();
            let mut lp_reqs = Vec::new();
            let eos = self.eos();
            let vocab = self.model.cfg.vocab;
            for (row, &(id, _)) in sample_rows.iter().enumerate() {
                let (Some(seq), Some(toks)) = (self.seqs.get_mut(&id), self.tokens.get(&id)) else {
                    row_sampling.push(RowSampling::GREEDY);
                    continue;
                };
                if seq.params.needs_logits() {
                    row_sampling.push(RowSampling::GREEDY);
                    continue;
                }
                let output = &toks.tokens[seq.prompt_len..];
                // Ahead of the host, the previous step's token is not here yet. Without
                // penalties (`run_ahead`) only the output's length matters, and only while
                // it is below min_tokens.
                let pending;
                let output = if is_ahead && output.len() < seq.params.min_tokens {
                    pending = vec![0; output.len() + 1];
                    &pending[..]
                } else {
                    output
                };
                adjust.extend(sampler::logit_adjustments(
                    row as u32,
                    vocab,
                    &seq.params,
                    &toks.tokens[..seq.prompt_len],
                    output,
                    eos,
                ));
                if let Some(n) = seq.params.logprobs {
                    lp_rows.push(row);
                    lp_reqs.push(LogprobRequest {
                        row: row as u32,
                        top: n as u32,
                    });
                }
                row_sampling.push(if seq.params.sampled_on_gpu() {
                    RowSampling {
                        temperature: seq.params.temperature.max(MIN_TEMPERATURE),
                        min_p: seq.params.min_p,
                        top_k: seq.params.top_k.max(0) as u32,
                        top_p: seq.params.top_p,
                        u: seq.sampling.uniform_f32(),
                    }
                } else {
                    RowSampling::GREEDY
                });
            }
            row_sampling.resize(rows.len(), RowSampling::GREEDY);
            let out = ctx.empty(&[rows.len()], DType::U32)?;
            let lp = if lp_reqs.is_empty() {
                None
            } else {
                Some(logprobs::gather(&mut step, &logits, &lp_reqs)?)
            };
            sample::adjust(&mut step, &logits, &adjust)?;
            sample::sample(&mut step, &logits, &row_sampling, &out)?;
            if let Some(lp) = lp {
                logprobs::finish(&mut step, &lp, &out)?;
                gpu_logprobs = Some((lp, lp_rows));
            }
            (Some(logits), Some(out))
        };
        let readback = match &sampled {
            Some(out) => {
                let n = out.nbytes() as usize;
                let rb = match self.readbacks.iter().position(|r| r.len() == n) {
                    Some(i) => self.readbacks.swap_remove(i),
                    None => Readback::new(ctx, n),
                };
                step.readback_into(out, &rb)?;
                Some(rb)
            }
            None => None,
        };
        let submitted = Instant::now();
        let idx = step.submit()?;
        self.stats.prepare_seconds += (submitted - started).as_secs_f64();
        self.stats.gpu_seconds += submitted.elapsed().as_secs_f64();
        Ok(Launched {
            seqs,
            sample_rows,
            prompt_rows,
            logits,
            ids: sampled,
            gpu_logprobs,
            readback,
            idx,
        })
    }

    /// Waits for a launched step's results and processes them: progress and prefix-cache
    /// registration, prompt logprobs, the sampled tokens (detokenized, checked against the
    /// stop conditions), finished sequences freed; returns the outputs.
    fn finish(&mut self, l: Launched) -> Result<Vec<RequestOutput>, EngineError> {
        let ctx = &*self.ctx;
        let t1 = Instant::now();
        let gpu_ids: Vec<u32> = match &l.readback {
            Some(rb) => rb
                .read(ctx, l.idx)?
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            None => {
                ctx.wait_idle()?;
                Vec::new()
            }
        };
        if let Some(rb) = l.readback {
            self.readbacks.push(rb);
        }
        let t2 = Instant::now();
        self.stats.gpu_seconds += (t2 - t1).as_secs_f64();
        self.gpu_bound = (t2 - t1).as_secs_f64() > HOLD_WAIT_SECONDS;
        // (A step run ahead may hold rows of sequences that stopped since it was launched:
        // those rows are dropped.)
        // Progress and prefix-cache registration for every scheduled sequence.
        for sc in &l.seqs {
            if !self.live(sc.id) {
                continue;
            }
            let computed = sc.num_computed + sc.num_new;
            if let Some(t) = self.tokens.get_mut(&sc.id) {
                t.num_computed = computed;
                self.kv_manager
                    .cache_full_blocks(sc.id, &t.tokens[..computed]);
            }
        }
        let mut row_logprobs: HashMap<usize, logprobs::RowLogprobs> = HashMap::new();
        if let Some((lp, lp_rows)) = &l.gpu_logprobs {
            row_logprobs.extend(lp_rows.iter().copied().zip(logprobs::read(ctx, lp)?));
        }
        let needs_logits = !l.prompt_rows.is_empty()
            || l.sample_rows
                .iter()
                .any(|(id, _)| self.seqs.get(id).is_some_and(|s| s.params.needs_logits()));
        let vocab = self.model.cfg.vocab;
        let host_logits = match (&l.logits, needs_logits) {
            (Some(t), true) => Some(t.to_f32_vec(ctx)?),
            _ => None,
        };
        // Prompt logprobs.
        for (k, &(rid, p, _)) in l.prompt_rows.iter().enumerate() {
            let row = l.sample_rows.len() + k;
            let (Some(logits), Some(req)) = (&host_logits, self.requests.get_mut(&rid)) else {
                continue;
            };
            let n = req.prompt_logprobs_n.unwrap_or(0);
            let next = req.prompt_ids[p + 1];
            let (own, top) = sampler::logprobs_of(&logits[row * vocab..(row + 1) * vocab], next, n);
            if let Some(v) = req.prompt_logprobs.as_mut() {
                v.push(Some(PositionLogprobs { token: own, top }));
            }
        }
        // Sample, detokenize, check stops.
        let eos = self.eos();
        let mut touched: Vec<ReqId> = Vec::new();
        let mut finished: Vec<ReqId> = Vec::new();
        for (row, &(id, _)) in l.sample_rows.iter().enumerate() {
            if !self.live(id) {
                continue;
            }
            let (Some(seq), Some(toks)) = (self.seqs.get_mut(&id), self.tokens.get_mut(&id)) else {
                continue;
            };
            let (token, lp) = if seq.params.needs_logits() {
                let Some(logits) = &host_logits else { continue };
                let s = sampler::sample(
                    &logits[row * vocab..(row + 1) * vocab],
                    &seq.params,
                    &toks.tokens[..seq.prompt_len],
                    &toks.tokens[seq.prompt_len..],
                    eos,
                    &mut seq.sampling,
                );
                (s.token, Some((s.logprob, s.top)))
            } else {
                let token = gpu_ids[row];
                let lp = match (row_logprobs.get(&row), seq.params.logprobs) {
                    (Some(r), Some(n)) => Some(sampler::logprobs_from_gpu(token, r, n)),
                    _ => None,
                };
                (token, lp)
            };
            toks.tokens.push(token);
            if let Some((own, top)) = lp {
                if seq.params.logprobs.is_some() {
                    seq.cumulative_logprob += own.logprob as f64;
                    seq.logprobs.push(PositionLogprobs { token: own, top });
                }
            }
            self.stats.generation_tokens += 1;
            if let (Some(d), Some(tok)) = (seq.detok.as_mut(), self.tokenizer.as_ref()) {
                match d.push(tok, token) {
                    Ok(new) => seq.text.push_str(&new),
                    Err(e) => tracing::warn!("detokenizing {token}: {e}"),
                }
            }
            seq.finish = check_stop(seq, &toks.tokens, token, eos, self.cfg.max_model_len);
            if seq.finish.is_some() {
                finished.push(id);
            }
            touched.push(seq.request);
            if let Some(r) = self.requests.get_mut(&seq.request) {
                if r.first_token.is_none() {
                    r.first_token = Some(r.arrival.elapsed().as_secs_f64());
                }
            }
        }
        // Free the sequences that finished here; emit outputs.
        for id in finished {
            self.release(id);
        }
        touched.sort_unstable();
        touched.dedup();
        let mut outs = Vec::with_capacity(touched.len());
        for rid in touched {
            let out = self.output_of(rid);
            if out.finished {
                self.retire(rid);
            }
            outs.push(out);
        }
        self.stats.finish_seconds += t2.elapsed().as_secs_f64();
        Ok(outs)
    }
}

/// A step recorded and submitted, waiting for its results.
struct Launched {
    seqs: Vec<Scheduled>,
    /// (sequence, batch row of its last token) for sequences that sample a token.
    sample_rows: Vec<(ReqId, usize)>,
    /// (request, prompt position p, batch row of token p) for prompt logprobs of p + 1.
    prompt_rows: Vec<(ReqId, usize, usize)>,
    logits: Option<Tensor>,
    /// The sampled ids, one per sample row, on the GPU (the input of a step run ahead).
    ids: Option<Tensor>,
    gpu_logprobs: Option<(logprobs::Logprobs, Vec<usize>)>,
    /// Host-readable copy of `ids`.
    readback: Option<Readback>,
    idx: SubmissionIndex,
}

/// The stop conditions, in vLLM's order: stop strings (trimming the text), eos, stop token
/// ids, max_tokens, max_model_len; none before `min_tokens`.
fn check_stop(
    seq: &mut Sequence,
    tokens: &[u32],
    token: u32,
    eos: Option<u32>,
    max_model_len: usize,
) -> Option<(FinishReason, Option<StopReason>)> {
    let generated = tokens.len() - seq.prompt_len;
    let p = &seq.params;
    if generated >= p.min_tokens.max(1) {
        if !p.stop.is_empty() {
            // Only text that could contain a new match: the tail as long as the longest stop.
            let from = seq
                .text
                .len()
                .saturating_sub(p.max_stop_len() + 16)
                .min(seq.text.len());
            let from = (0..=from)
                .rev()
                .find(|&i| seq.text.is_char_boundary(i))
                .unwrap_or(0);
            let hit = p
                .stop
                .iter()
                .filter_map(|s| seq.text[from..].find(s.as_str()).map(|i| (from + i, s)))
                .min_by_key(|(i, _)| *i);
            if let Some((at, s)) = hit {
                let end = if p.include_stop_str_in_output {
                    at + s.len()
                } else {
                    at
                };
                seq.text.truncate(end);
                return Some((FinishReason::Stop, Some(StopReason::Text(s.clone()))));
            }
        }
        if !p.ignore_eos && Some(token) == eos {
            return Some((FinishReason::Stop, None));
        }
        if p.stop_token_ids.contains(&token) {
            return Some((FinishReason::Stop, Some(StopReason::Token(token))));
        }
    }
    if p.max_tokens.is_some_and(|m| generated >= m) || tokens.len() >= max_model_len {
        return Some((FinishReason::Length, None));
    }
    None
}
