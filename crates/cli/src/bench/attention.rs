//! `vllm-apple bench attention`: decode attention bandwidth (KV bytes read per second) over
//! batch x context, and causal prefill attention throughput, on Qwen3-30B-A3B's attention
//! shape (32 query heads, 4 KV heads, head_dim 128, 16-token blocks).

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use vllm_apple_ops::kernels::attention::{
    self, AttentionOptions, AttnInputs, AttnShape, HostMetadata, SeqSlice,
};
use vllm_apple_ops::kv_cache::{KvCache, KvCacheSpec};
use vllm_apple_ops::{ContextOptions, DType, GpuContext};

use super::timer::{copy_kernel_bandwidth, time_reps};

#[derive(ClapArgs)]
pub struct Args {
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    batches: Vec<usize>,
    /// Context lengths (tokens per sequence, the new one included).
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    contexts: Vec<usize>,
    /// Prompt lengths for the prefill rows (one sequence each).
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    prefill: Vec<usize>,
    /// Timed repetitions (the median of three rounds is reported).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Give each sequence consecutive blocks instead of interleaving them across sequences.
    #[arg(long)]
    contiguous: bool,
    /// Split-K partition length for decode (positions per split) instead of the automatic
    /// plan; a length of at least the context means a single pass.
    #[arg(long)]
    partition: Option<usize>,
    /// Time the scalar paged kernel where the cooperative-matrix one is the default.
    #[arg(long)]
    scalar: bool,
    /// Positions per chunk of the cooperative-matrix kernel (64, 128 or 256).
    #[arg(long)]
    chunk: Option<u32>,
}

const SHAPE: AttnShape = AttnShape {
    q_heads: 32,
    kv_heads: 4,
    head_dim: 128,
};
const BLOCK: usize = 16;

struct Setup {
    cache: KvCache,
    meta: attention::AttnMetadata,
    qkv: vllm_apple_ops::Tensor,
    out: vllm_apple_ops::Tensor,
}

impl Setup {
    fn inputs(&self, scale: f32) -> AttnInputs<'_> {
        AttnInputs {
            qkv: &self.qkv,
            meta: &self.meta,
            cache: &self.cache.layers[0],
            shape: SHAPE,
            scale,
        }
    }
}

/// `batch` sequences of `cached` cached tokens and `new` new ones, blocks interleaved across
/// sequences as a busy cache would leave them (or consecutive per sequence).
fn setup(
    ctx: &GpuContext,
    batch: usize,
    cached: usize,
    new: usize,
    contiguous: bool,
) -> Result<Setup> {
    let per_seq = (cached + new).div_ceil(BLOCK);
    let num_blocks = batch * per_seq;
    let block = |b: usize, i: usize| {
        if contiguous {
            b * per_seq + i
        } else {
            i * batch + b
        }
    };
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|b| (0..per_seq).map(|i| block(b, i) as u32).collect())
        .collect();
    let seqs: Vec<SeqSlice> = tables
        .iter()
        .map(|t| SeqSlice {
            block_table: t,
            num_cached: cached,
            num_new: new,
        })
        .collect();
    let host = HostMetadata::build(&seqs, BLOCK, 0)?;
    let meta = host.upload(ctx, BLOCK)?;
    let spec = KvCacheSpec {
        num_layers: 1,
        kv_heads: SHAPE.kv_heads,
        head_dim: SHAPE.head_dim,
        block_size: BLOCK,
    };
    let cache = KvCache::new(ctx, spec, num_blocks)?;
    let t = meta.num_tokens;
    let row = (SHAPE.q_heads + 2 * SHAPE.kv_heads) * SHAPE.head_dim;
    let qkv = ctx.upload_f32(&[t, row], DType::F32, &vec![0.01; t * row])?;
    let out = ctx.empty(&[t, SHAPE.q_heads * SHAPE.head_dim], DType::F32)?;
    Ok(Setup {
        cache,
        meta,
        qkv,
        out,
    })
}

pub fn run(opts: &ContextOptions, args: Args) -> Result<()> {
    if args.reps == 0
        || args.batches.contains(&0)
        || args.contexts.contains(&0)
        || args.prefill.contains(&0)
    {
        bail!("--reps, --batches, --contexts and --prefill must be positive");
    }
    let ctx = GpuContext::new(opts)?;
    let copy_bw = copy_kernel_bandwidth(&ctx, 256 << 20, args.reps)?;
    println!(
        "device: {} ({:?}), subgroup {}..{}",
        ctx.info.name, ctx.info.backend, ctx.info.subgroup_min_size, ctx.info.subgroup_max_size
    );
    println!(
        "copy kernel bandwidth: {:.1} GB/s (the roofline for %copy)",
        copy_bw / 1e9
    );
    println!("shape: {} q heads, {} kv heads, head_dim {}, block {BLOCK}, f16 cache; KV write + attention per step", SHAPE.q_heads, SHAPE.kv_heads, SHAPE.head_dim);
    let fused = AttentionOptions {
        partition: args.partition,
        matrices: args.scalar.then_some(false),
        chunk: args.chunk,
        ..AttentionOptions::default()
    };
    let probe = setup(&ctx, 1, 1, 1, false)?;
    let kernel = match attention::uses_matrices(&ctx, &fused, &probe.meta, SHAPE)? {
        Some(f) => format!(
            "cooperative matrices {f}x{f}, chunk {}",
            args.chunk.unwrap_or(128)
        ),
        None => "scalar".to_string(),
    };
    drop(probe);
    println!("paged kernel (decode): {kernel}");
    let scale = 1.0 / (SHAPE.head_dim as f32).sqrt();

    println!();
    println!(
        "{:>6} {:>8} {:>10} {:>8} {:>11} {:>10} {:>7}",
        "batch", "context", "tokens", "splits", "time us", "KV GB/s", "%copy"
    );
    for &b in &args.batches {
        for &c in &args.contexts {
            let s = setup(&ctx, b, c - 1, 1, args.contiguous)?;
            let a = s.inputs(scale);
            let t = time_reps(&ctx, args.reps, |st, _| {
                attention::attention(st, &fused, &a, &s.out)
            })?;
            let kv_bytes = (b * c * SHAPE.kv_heads * SHAPE.head_dim * 2 * 2) as f64;
            println!(
                "{:>6} {:>8} {:>10} {:>8} {:>11.1} {:>10.1} {:>6.1}%",
                b,
                c,
                b * c,
                match attention::plan_partition(
                    &fused,
                    &s.meta,
                    SHAPE,
                    attention::uses_matrices(&ctx, &fused, &s.meta, SHAPE)?.is_some(),
                ) {
                    Some(p) => s.meta.max_ctx.div_ceil(p),
                    None => 1,
                },
                t * 1e6,
                kv_bytes / t / 1e9,
                100.0 * kv_bytes / t / copy_bw
            );
        }
    }
    println!();
    println!("{:>8} {:>11} {:>9}", "prompt", "time us", "TFLOP/s");
    for &l in &args.prefill {
        let s = setup(&ctx, 1, 0, l, args.contiguous)?;
        let a = s.inputs(scale);
        let t = time_reps(&ctx, args.reps, |st, _| {
            attention::attention(st, &fused, &a, &s.out)
        })?;
        // Causal: QK^T and PV over l^2 / 2 (query, key) pairs, 2 FLOPs per multiply-add.
        let flops = 2.0 * 2.0 * (SHAPE.q_heads * SHAPE.head_dim) as f64 * (l * l) as f64 / 2.0;
        println!("{:>8} {:>11.1} {:>9.3}", l, t * 1e6, flops / t / 1e12);
    }
    Ok(())
}
