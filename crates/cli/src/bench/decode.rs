//! `vllm-apple bench decode`: single-sequence generation speed of a whole model, real (GGUF)
//! or dummy (random weights from a Hugging Face config.json, made on the GPU), against the
//! bandwidth roofline: weight bytes read per token (a MoE layer's router and top-k experts,
//! not all its experts) / copy-kernel bandwidth.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use vllm_apple_model::config::ModelConfig;
use vllm_apple_model::decoder::DecoderModel;
use vllm_apple_model::gguf::GgufFile;
use vllm_apple_model::runner::{generate, generate_timed, profile_decode_step, Sampling};
use vllm_apple_ops::kernels::attention::AttentionOptions;
use vllm_apple_ops::{ContextOptions, DType, GpuContext};

use super::timer::copy_kernel_bandwidth;

#[derive(ClapArgs)]
pub struct Args {
    /// A GGUF model file.
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// A Hugging Face config.json: random weights of that shape (load_format dummy).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Weight dtype: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// Prompt tokens.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Generated tokens.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Also time every dispatch of one decode step with GPU timestamps and print the
    /// kernels by total time.
    #[arg(long)]
    profile: bool,
    /// Sequences in the profiled decode step (`--profile`), e.g. 1,16.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    profile_batch: Vec<usize>,
    /// Keep the rope dispatch apart from the attention dispatch in decode steps (the
    /// unfused baseline of `AttentionOptions::fused_rope`).
    #[arg(long)]
    unfused_rope: bool,
    /// Positions per split-K partition of decode attention (default: the planner's).
    #[arg(long)]
    attn_partition: Option<usize>,
    /// Positions per chunk of the matrix attention kernel: 64, 128 or 256.
    #[arg(long)]
    attn_chunk: Option<u32>,
}

pub fn run(opts: &ContextOptions, args: Args) -> Result<()> {
    let Some(dtype) = DType::parse_float(&args.dtype) else {
        bail!("--dtype {}: expected f16, bf16 or f32", args.dtype);
    };
    if args.prompt == 0 || args.tokens < 2 {
        bail!("--prompt must be positive and --tokens at least 2");
    }
    let ctx = GpuContext::new(opts)?;
    let t0 = std::time::Instant::now();
    let (model, what) = match (&args.model, &args.config) {
        (Some(path), None) => {
            let file = GgufFile::open(path)?;
            (
                DecoderModel::from_gguf(&ctx, &file, dtype)?,
                path.display().to_string(),
            )
        }
        (None, Some(path)) => {
            let cfg = ModelConfig::from_hf_config(&std::fs::read_to_string(path)?)?;
            (
                DecoderModel::dummy(&ctx, cfg, dtype, 1)?,
                format!("{} (dummy weights)", path.display()),
            )
        }
        _ => bail!("give --model FILE.gguf or --config config.json"),
    };
    let load = t0.elapsed().as_secs_f64();
    let copy = copy_kernel_bandwidth(&ctx, 1 << 30, 10)?;
    let prompt: Vec<u32> = (0..args.prompt)
        .map(|i| ((i * 7919 + 13) % model.cfg.vocab) as u32)
        .collect();
    let mut attn = AttentionOptions::from_env()?;
    attn.fused_rope &= !args.unfused_rope;
    attn.partition = args.attn_partition;
    attn.chunk = args.attn_chunk;
    // Warm-up (pipelines, pool), then the measured run.
    generate(&ctx, &model, &prompt, 2, &[], &attn, Sampling::greedy())?;
    let out = generate_timed(
        &ctx,
        &model,
        &prompt,
        args.tokens,
        &[],
        &attn,
        Sampling::greedy(),
    )?;
    let decode_tok_s = (out.ids.len() - 1) as f64 / out.decode_seconds;
    let total = model.weight_bytes() as f64;
    let bytes = model.active_weight_bytes_per_token() as f64;
    let roofline = copy / bytes;
    println!(
        "model: {what}, {} layers, {:.2} GB of {dtype} weights ({:.2} GB read per token), loaded in {load:.1} s",
        model.cfg.layers,
        total / 1e9,
        bytes / 1e9
    );
    match model.moe_layer_dispatches() {
        Some((n, true)) => println!(
            "MoE layer: {n} dispatches per decode step (routing + gate/up GEMV + norm + \
             SiLU-mul, down GEMV + combine + residual add; the router's logits from extra \
             rows of the qkv and o_proj GEMVs)"
        ),
        Some((n, false)) => println!(
            "MoE layer: {n} dispatches per decode step (router GEMV + norm, routing + \
             gate/up GEMV + norm + SiLU-mul, down GEMV + combine + residual add)"
        ),
        None => {}
    }
    println!(
        "device: {} ({:?}); copy kernel {:.1} GB/s",
        ctx.info.name,
        ctx.info.backend,
        copy / 1e9
    );
    println!(
        "prefill {} tokens: {:.1} ms ({:.0} tok/s)",
        args.prompt,
        out.prefill_seconds * 1e3,
        args.prompt as f64 / out.prefill_seconds
    );
    println!(
        "decode: {decode_tok_s:.1} tok/s = {:.2} ms/token; roofline {roofline:.1} tok/s (weights read / copy bandwidth): {:.1}%",
        1e3 / decode_tok_s,
        100.0 * decode_tok_s / roofline
    );
    let steps = (out.ids.len() - 1) as f64;
    println!(
        "per decode step: {:.2} ms recording on the host, {:.2} ms in queue.submit (host), {:.2} ms GPU + read-back",
        1e3 * out.decode_record_seconds / steps,
        1e3 * out.decode_submit_seconds / steps,
        1e3 * (out.decode_seconds - out.decode_record_seconds - out.decode_submit_seconds) / steps
    );
    if let Some(g) = out.decode_gpu {
        // The decode on the GPU's clock: inside steps, and between them (submission
        // boundaries, and whatever the host kept the GPU waiting).
        let steps = g.steps as f64;
        let per_token = g.span_seconds / steps;
        println!(
            "decode on the GPU's clock: {:.2} ms in each step + {:.2} ms between steps = {:.1} tok/s, {:.1}% of the roofline",
            1e3 * g.busy_seconds / steps,
            1e3 * (g.span_seconds - g.busy_seconds) / (steps - 1.0).max(1.0),
            1.0 / per_token,
            100.0 / per_token / roofline
        );
    }
    let (reused, created) = ctx.bind_group_stats();
    println!("bind groups over the run: {reused} reused, {created} created");
    let inside = wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
    if ctx.features.contains(inside) {
        // The median of five steps' GPU spans (two timestamps each: no per-dispatch cost).
        let runs = profile_decode_step(&ctx, &model, args.prompt, 1, &attn, false, 5)?;
        let mut spans: Vec<f64> = runs
            .iter()
            .map(|r| r.iter().map(|(_, s)| s).sum())
            .collect();
        spans.sort_by(f64::total_cmp);
        println!(
            "GPU time of one decode step (timestamps around it): {:.2} ms",
            spans[spans.len() / 2] * 1e3
        );
    }
    if args.profile {
        for &batch in &args.profile_batch {
            let runs = profile_decode_step(&ctx, &model, args.prompt, batch, &attn, true, 1)?;
            println!("batch {batch}:");
            print_profile(&runs[0]);
        }
    }
    Ok(())
}

/// Kernels of one decode step by total GPU time (a dispatch's time runs from the previous
/// timestamp, so barriers and launch gaps count too).
fn print_profile(times: &[(String, f64)]) {
    let total: f64 = times.iter().map(|(_, t)| t).sum();
    let mut by: Vec<(String, usize, f64)> = Vec::new();
    for (label, t) in times {
        match by.iter_mut().find(|(l, _, _)| l == label) {
            Some(e) => {
                e.1 += 1;
                e.2 += t;
            }
            None => by.push((label.clone(), 1, *t)),
        }
    }
    by.sort_by(|a, b| b.2.total_cmp(&a.2));
    println!(
        "profile of one decode step: {} dispatches, {:.2} ms of GPU time",
        times.len(),
        total * 1e3
    );
    println!(
        "{:>9} {:>6} {:>7} {:>6}  kernel",
        "ms", "%", "count", "us/call"
    );
    for (label, n, t) in by {
        println!(
            "{:>9.3} {:>6.1} {:>7} {:>6.1}  {label}",
            t * 1e3,
            100.0 * t / total,
            n,
            t * 1e6 / n as f64
        );
    }
}
