//! Greedy generation for one sequence, straight over the model: the smallest loop that
//! turns a prompt into text (the engine, with batching and sampling, builds on the same
//! forward). One submission per step; only the sampled id comes back.

use std::time::Instant;

use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::SeedableRng;

use vllm_apple_ops::kernels::argmax;
use vllm_apple_ops::kernels::attention::{AttentionOptions, HostMetadata, SeqSlice};
use vllm_apple_ops::kv_cache::KvCache;
use vllm_apple_ops::recorder::{Readback, StepTimeline, TimelineSpans};
use vllm_apple_ops::{DType, GpuContext, OpsError, Step, Tensor};

use crate::decoder::{DecoderModel, ModelError};

pub const BLOCK_SIZE: usize = 16;

/// How the next token is chosen: greedy on the GPU (temperature 0, only the id comes back),
/// or sampled from softmax(logits / temperature) with a seeded generator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Sampling {
        Sampling {
            temperature: 0.0,
            seed: 0,
        }
    }
}

pub struct Generated {
    /// The generated ids (the stop token, if one ended generation, included).
    pub ids: Vec<u32>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Host time spent building inputs and recording the decode steps, out of
    /// `decode_seconds` (a greedy decode records each step while the GPU runs the one
    /// before).
    pub decode_record_seconds: f64,
    /// Host time inside `queue.submit` of the decode steps (wgpu encodes the pass into the
    /// backend's command buffer there), out of `decode_seconds`.
    pub decode_submit_seconds: f64,
    /// The greedy decode's steps on the GPU's clock (`generate_timed`, where the device
    /// has timestamp queries).
    pub decode_gpu: Option<TimelineSpans>,
}

/// Host time of the steps: recording, and submitting.
#[derive(Default)]
struct HostTimes {
    record: f64,
    submit: f64,
}

#[allow(clippy::too_many_arguments)]
fn one_step(
    ctx: &GpuContext,
    model: &DecoderModel,
    kv: &KvCache,
    table: &[u32],
    tokens: &[u32],
    cached: usize,
    opts: &AttentionOptions,
    sampler: &mut Option<(f32, StdRng)>,
    host: &mut HostTimes,
) -> Result<u32, ModelError> {
    let t0 = Instant::now();
    let seq = SeqSlice {
        block_table: table,
        num_cached: cached,
        num_new: tokens.len(),
    };
    let meta = HostMetadata::build(&[seq], BLOCK_SIZE, 0)?.upload(ctx, BLOCK_SIZE)?;
    let ids = ctx.upload_u32(&[tokens.len()], tokens)?;
    let last = ctx.upload_u32(&[1], &[tokens.len() as u32 - 1])?;
    let out = ctx.empty(&[1], DType::U32)?;
    let mut step = Step::new(ctx);
    let logits = model.forward(&mut step, &ids, &meta, kv, &last, opts)?;
    let Some((temperature, rng)) = sampler else {
        argmax::argmax(&mut step, &logits, &out)?;
        host.record += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        step.submit()?;
        host.submit += t1.elapsed().as_secs_f64();
        ctx.wait_idle()?;
        return Ok(out.to_u32_vec(ctx)?[0]);
    };
    step.submit_and_wait()?;
    let l = logits.to_f32_vec(ctx)?;
    let mx = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = l
        .iter()
        .map(|x| (((x - mx) / *temperature) as f64).exp())
        .collect();
    let dist = WeightedIndex::new(&w)
        .map_err(|e| OpsError::Gpu(format!("logits cannot be sampled: {e}")))?;
    Ok(dist.sample(rng) as u32)
}

/// A pipelined decode submits each step whole once the host waits this long for the
/// previous step's token (the GPU is the bound).
pub const HOLD_WAIT_SECONDS: f64 = 200e-6;

/// Greedy decode with step N + 1 recorded and submitted before step N's id is read back:
/// the next step's input is step N's argmax, still on the GPU, so host recording overlaps
/// the GPU's work (vLLM's async scheduling, for one sequence). When a stop token comes
/// back, the step already in flight is wasted (its KV write lands in the sequence's own
/// blocks, past its end).
#[allow(clippy::too_many_arguments)]
fn greedy_pipelined(
    ctx: &GpuContext,
    model: &DecoderModel,
    kv: &KvCache,
    table: &[u32],
    prompt_len: usize,
    first: u32,
    max_tokens: usize,
    stop: &[u32],
    opts: &AttentionOptions,
    host: &mut HostTimes,
    timeline: Option<&StepTimeline>,
) -> Result<Vec<u32>, ModelError> {
    let mut ids = vec![first];
    if stop.contains(&first) || max_tokens <= 1 {
        return Ok(ids);
    }
    let last = ctx.upload_u32(&[1], &[0])?;
    // Two read-back buffers, alternating: one for the step being read, one for the step in
    // flight.
    let readbacks = [Readback::new(ctx, 4), Readback::new(ctx, 4)];
    // Records the decode step of the token at `position` (its id in `input`), copying its
    // id into `rb`.
    // `hold`: the step goes in one submission (`Step::hold_parts`), chosen while the host
    // waits on the GPU's read-back, i.e. it records a step before the previous one is done
    // and an early partial submit would only cost the GPU a submission boundary.
    let launch = |input: &Tensor,
                  position: usize,
                  rb: usize,
                  hold: bool,
                  host: &mut HostTimes|
     -> Result<_, ModelError> {
        let t0 = Instant::now();
        let seq = SeqSlice {
            block_table: table,
            num_cached: position,
            num_new: 1,
        };
        let meta = HostMetadata::build(&[seq], BLOCK_SIZE, 0)?.upload(ctx, BLOCK_SIZE)?;
        let out = ctx.empty(&[1], DType::U32)?;
        let mut step = Step::new(ctx);
        if hold {
            step.hold_parts();
        }
        if let Some(t) = timeline {
            t.time(&mut step)?;
        }
        let logits = model.forward(&mut step, input, &meta, kv, &last, opts)?;
        argmax::argmax(&mut step, &logits, &out)?;
        step.readback_into(&out, &readbacks[rb])?;
        host.record += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let idx = step.submit()?;
        host.submit += t1.elapsed().as_secs_f64();
        Ok((out, rb, idx))
    };
    let first_t = ctx.upload_u32(&[1], &[first])?;
    let mut in_flight = launch(&first_t, prompt_len, 0, false, host)?;
    let mut submitted = 2; // tokens produced or in flight
    let mut hold = false;
    loop {
        let (out, rb, idx) = in_flight;
        let ahead = if submitted < max_tokens {
            submitted += 1;
            Some(launch(
                &out,
                prompt_len + submitted - 2,
                1 - rb,
                hold,
                host,
            )?)
        } else {
            None
        };
        let t_wait = Instant::now();
        let bytes = readbacks[rb].read(ctx, idx)?;
        hold = t_wait.elapsed().as_secs_f64() > HOLD_WAIT_SECONDS;
        let id = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        ids.push(id);
        match ahead {
            Some(next) if !stop.contains(&id) => in_flight = next,
            _ => break,
        }
    }
    ctx.wait_idle()?;
    Ok(ids)
}

/// Continuation of `prompt` for up to `max_tokens` tokens, stopping after any id in `stop`.
pub fn generate(
    ctx: &GpuContext,
    model: &DecoderModel,
    prompt: &[u32],
    max_tokens: usize,
    stop: &[u32],
    opts: &AttentionOptions,
    sampling: Sampling,
) -> Result<Generated, ModelError> {
    generate_with(ctx, model, prompt, max_tokens, stop, opts, sampling, false)
}

/// `generate` with the greedy decode's steps also timed on the GPU
/// (`Generated::decode_gpu`; every timed step goes in one submission, as the pipelined
/// decode submits them anyway once the GPU is the bound).
pub fn generate_timed(
    ctx: &GpuContext,
    model: &DecoderModel,
    prompt: &[u32],
    max_tokens: usize,
    stop: &[u32],
    opts: &AttentionOptions,
    sampling: Sampling,
) -> Result<Generated, ModelError> {
    generate_with(ctx, model, prompt, max_tokens, stop, opts, sampling, true)
}

#[allow(clippy::too_many_arguments)]
fn generate_with(
    ctx: &GpuContext,
    model: &DecoderModel,
    prompt: &[u32],
    max_tokens: usize,
    stop: &[u32],
    opts: &AttentionOptions,
    sampling: Sampling,
    timed: bool,
) -> Result<Generated, ModelError> {
    let total = prompt.len() + max_tokens;
    if !(sampling.temperature >= 0.0 && sampling.temperature.is_finite()) {
        return Err(OpsError::Config(format!(
            "temperature must be >= 0, got {}",
            sampling.temperature
        ))
        .into());
    }
    let mut sampler = (sampling.temperature > 0.0)
        .then(|| (sampling.temperature, StdRng::seed_from_u64(sampling.seed)));
    if prompt.is_empty() {
        return Err(OpsError::Config("the prompt is empty".into()).into());
    }
    if total > model.cfg.max_position {
        return Err(OpsError::Config(format!(
            "prompt ({}) + max_tokens ({max_tokens}) exceeds the model's {} positions",
            prompt.len(),
            model.cfg.max_position
        ))
        .into());
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= model.cfg.vocab) {
        return Err(OpsError::Config(format!(
            "token id {bad} is outside the vocabulary ({})",
            model.cfg.vocab
        ))
        .into());
    }
    let blocks = total.div_ceil(BLOCK_SIZE);
    let kv = KvCache::new(ctx, model.kv_spec(BLOCK_SIZE), blocks)?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let t0 = Instant::now();
    let mut ids = Vec::new();
    let mut prefill_host = HostTimes::default();
    let mut host = HostTimes::default();
    let mut next = one_step(
        ctx,
        model,
        &kv,
        &table,
        prompt,
        0,
        opts,
        &mut sampler,
        &mut prefill_host,
    )?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    if sampler.is_none() {
        let timeline = timed.then(|| StepTimeline::new(ctx, max_tokens)).flatten();
        ids = greedy_pipelined(
            ctx,
            model,
            &kv,
            &table,
            prompt.len(),
            next,
            max_tokens,
            stop,
            opts,
            &mut host,
            timeline.as_ref(),
        )?;
        let decode_seconds = t1.elapsed().as_secs_f64();
        let decode_gpu = match &timeline {
            Some(t) => t.finish(ctx)?,
            None => None,
        };
        return Ok(Generated {
            ids,
            prefill_seconds,
            decode_seconds,
            decode_record_seconds: host.record,
            decode_submit_seconds: host.submit,
            decode_gpu,
        });
    }
    while ids.len() < max_tokens {
        ids.push(next);
        if stop.contains(&next) || ids.len() == max_tokens {
            break;
        }
        let cached = prompt.len() + ids.len() - 1;
        next = one_step(
            ctx,
            model,
            &kv,
            &table,
            &[next],
            cached,
            opts,
            &mut sampler,
            &mut host,
        )?;
    }
    Ok(Generated {
        ids,
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
        decode_record_seconds: host.record,
        decode_submit_seconds: host.submit,
        decode_gpu: None,
    })
}

/// GPU time of every dispatch of one decode step of `batch` sequences at a context of
/// `context` tokens: (kernel label, seconds), in recording order, then "end" (for `bench
/// decode --profile`); without `per_dispatch` only "end": the whole step's GPU time, from
/// two timestamps. The first sequence is prefilled with a prompt (the others' caches
/// hold zeros: the same work); the step is recorded `repeats` times.
pub fn profile_decode_step(
    ctx: &GpuContext,
    model: &DecoderModel,
    context: usize,
    batch: usize,
    opts: &AttentionOptions,
    per_dispatch: bool,
    repeats: usize,
) -> Result<Vec<Vec<(String, f64)>>, ModelError> {
    let context = context.max(1);
    let batch = batch.max(1);
    let blocks = (context + 1).div_ceil(BLOCK_SIZE);
    let kv = KvCache::new(ctx, model.kv_spec(BLOCK_SIZE), blocks * batch)?;
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|b| ((b * blocks) as u32..((b + 1) * blocks) as u32).collect())
        .collect();
    let prompt: Vec<u32> = (0..context)
        .map(|i| ((i * 7919 + 13) % model.cfg.vocab) as u32)
        .collect();
    let next = one_step(
        ctx,
        model,
        &kv,
        &tables[0],
        &prompt,
        0,
        opts,
        &mut None,
        &mut HostTimes::default(),
    )?;
    let seqs: Vec<SeqSlice> = tables
        .iter()
        .map(|t| SeqSlice {
            block_table: t,
            num_cached: context,
            num_new: 1,
        })
        .collect();
    let meta = HostMetadata::build(&seqs, BLOCK_SIZE, 0)?.upload(ctx, BLOCK_SIZE)?;
    let ids = ctx.upload_u32(&[batch], &vec![next; batch])?;
    let rows: Vec<u32> = (0..batch as u32).collect();
    let last = ctx.upload_u32(&[batch], &rows)?;
    let out = ctx.empty(&[batch], DType::U32)?;
    let mut runs = Vec::new();
    for _ in 0..repeats.max(1) {
        // The same step each time: its KV writes land on the same slots.
        let mut step = Step::profiled(ctx, if per_dispatch { 4095 } else { 0 })?;
        let logits = model.forward(&mut step, &ids, &meta, &kv, &last, opts)?;
        argmax::argmax(&mut step, &logits, &out)?;
        runs.push(step.finish_profile()?);
    }
    Ok(runs)
}
