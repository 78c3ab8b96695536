//! `vllm-apple bench kernels`: GEMV (decode) bandwidth and GEMM (prefill) throughput on the
//! projection shapes of Qwen3-30B-A3B, plus the small per-layer kernels, against the
//! device's measured copy bandwidth.

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use vllm_apple_ops::kernels::matmul::{
    self, CoopConfig, GemvConfig, MatmulPath, SkinnyConfig, Tuning,
};
use vllm_apple_ops::kernels::{activation, argmax, copy, rmsnorm, rope};
use vllm_apple_ops::{ContextOptions, DType, GpuContext, Weight};

use super::timer::{copy_bandwidth, copy_kernel_bandwidth, time_reps};

#[derive(ClapArgs)]
pub struct Args {
    /// Weight dtype: f16 or bf16.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// Tokens in the prefill GEMM rows.
    #[arg(long, default_value_t = 2048)]
    prefill_m: usize,
    /// Decode batch sizes for the GEMV rows.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    decode_m: Vec<usize>,
    /// Timed repetitions per kernel (the median is reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Also time the tiled GEMM where the cooperative-matrix GEMM is the default.
    #[arg(long)]
    all_paths: bool,
    /// Time every GEMV work split on the decode shapes (tuning).
    #[arg(long)]
    gemv_sweep: bool,
    /// Time every cooperative-matrix GEMM variant on the prefill shapes (tuning).
    #[arg(long)]
    coop_sweep: bool,
    /// Time every skinny matrix GEMM split at the decode batch sizes (tuning).
    #[arg(long)]
    skinny_sweep: bool,
    /// Only measure the GPU cost of one tiny dispatch, independent of the previous one or
    /// dependent on it (a barrier between), and exit.
    #[arg(long)]
    dispatch_overhead: bool,
    /// Every repetition writes the same output, so each waits for the one before (the
    /// latency of a dependent chain, as in a decode step) instead of overlapping it.
    #[arg(long)]
    serial: bool,
    /// Only time the matrix GEMM at M = --prefill-m, K = 2048 for N of 1 to 48 column
    /// tiles, with the default tiles and with half-width ones, as dependent repetitions
    /// (as --serial), and exit: the steps in time against the tile count show how many
    /// workgroups run at once (a wave).
    #[arg(long)]
    wave_probe: bool,
}

const SWEEP: &[GemvConfig] = &[
    // One row per invocation group: the fewest accumulators (M of them), for batches.
    GemvConfig {
        wg: 128,
        tpr: 32,
        rpt: 1,
    },
    GemvConfig {
        wg: 256,
        tpr: 32,
        rpt: 1,
    },
    GemvConfig {
        wg: 128,
        tpr: 64,
        rpt: 1,
    },
    GemvConfig {
        wg: 256,
        tpr: 64,
        rpt: 1,
    },
    GemvConfig {
        wg: 128,
        tpr: 128,
        rpt: 1,
    },
    GemvConfig {
        wg: 256,
        tpr: 32,
        rpt: 2,
    },
    GemvConfig {
        wg: 256,
        tpr: 32,
        rpt: 4,
    },
    GemvConfig {
        wg: 128,
        tpr: 32,
        rpt: 2,
    },
    GemvConfig {
        wg: 128,
        tpr: 32,
        rpt: 4,
    },
    GemvConfig {
        wg: 64,
        tpr: 32,
        rpt: 4,
    },
    GemvConfig {
        wg: 256,
        tpr: 256,
        rpt: 1,
    },
    GemvConfig {
        wg: 256,
        tpr: 256,
        rpt: 2,
    },
    GemvConfig {
        wg: 256,
        tpr: 256,
        rpt: 4,
    },
    GemvConfig {
        wg: 256,
        tpr: 128,
        rpt: 2,
    },
    GemvConfig {
        wg: 256,
        tpr: 128,
        rpt: 4,
    },
    GemvConfig {
        wg: 256,
        tpr: 64,
        rpt: 2,
    },
    GemvConfig {
        wg: 256,
        tpr: 64,
        rpt: 4,
    },
    GemvConfig {
        wg: 128,
        tpr: 128,
        rpt: 2,
    },
    GemvConfig {
        wg: 128,
        tpr: 128,
        rpt: 4,
    },
    GemvConfig {
        wg: 128,
        tpr: 64,
        rpt: 4,
    },
    GemvConfig {
        wg: 128,
        tpr: 64,
        rpt: 8,
    },
    GemvConfig {
        wg: 64,
        tpr: 64,
        rpt: 4,
    },
    GemvConfig {
        wg: 64,
        tpr: 64,
        rpt: 8,
    },
];

/// (name, N, K) of y = x W^T for Qwen3-30B-A3B (hidden 2048, 32 q / 4 kv heads of 128,
/// experts with moe_intermediate 768, vocab 151936).
const SHAPES: &[(&str, usize, usize)] = &[
    ("qkv_proj 2048->4096+512+512", 5120, 2048),
    ("o_proj 4096->2048", 2048, 4096),
    ("lm_head 2048->151936", 151_936, 2048),
    ("expert gate_up 2048->1536", 1536, 2048),
    ("expert down 768->2048", 2048, 768),
];

/// Random half-precision bits, magnitudes 2^-6..2^-1, cheap enough for 600 MB of weights.
fn random_half_bytes(n: usize, dtype: DType, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let r = s as u32;
        let bits: u16 = match dtype {
            // sign | exponent 9..14 | 10 mantissa bits
            DType::F16 => (((r >> 31) << 15) | ((9 + (r >> 16) % 6) << 10) | (r & 0x3ff)) as u16,
            // sign | exponent 121..126 | 7 mantissa bits
            _ => (((r >> 31) << 15) | ((121 + (r >> 16) % 6) << 7) | (r & 0x7f)) as u16,
        };
        out.extend_from_slice(&bits.to_le_bytes());
    }
    out
}

struct Row {
    name: String,
    shape: String,
    path: String,
    us: f64,
    gbs: f64,
    tflops: Option<f64>,
}

pub fn run(opts: &ContextOptions, args: Args) -> Result<()> {
    let dtype = match DType::parse_float(&args.dtype) {
        Some(d) if d.is_half() => d,
        _ => bail!("--dtype {}: expected f16 or bf16", args.dtype),
    };
    if args.reps == 0 || args.prefill_m == 0 || args.decode_m.contains(&0) {
        bail!("--reps, --prefill-m and --decode-m must be positive");
    }
    let ctx = GpuContext::new(opts)?;
    if args.dispatch_overhead {
        return dispatch_overhead(&ctx);
    }
    if args.wave_probe {
        return wave_probe(&ctx, dtype, args.prefill_m, args.reps);
    }
    let cpu = ctx.info.device_type == wgpu::DeviceType::Cpu;
    let copy_bytes: u64 = if cpu { 64 << 20 } else { 1 << 30 };
    let copy_bytes = copy_bytes.min(ctx.limits.max_buffer_size / 2);
    let copy_cmd_bw = copy_bandwidth(&ctx, copy_bytes, if cpu { 4 } else { 20 })?;
    let copy_bw = copy_kernel_bandwidth(&ctx, copy_bytes, args.reps)?;
    println!(
        "device: {} ({:?}), subgroup {}..{}, coop {:?}",
        ctx.info.name,
        ctx.info.backend,
        ctx.info.subgroup_min_size,
        ctx.info.subgroup_max_size,
        ctx.coop
    );
    println!(
        "copy bandwidth (read + write, {} MiB): copy kernel {:.1} GB/s (the roofline below), copy command {:.1} GB/s",
        copy_bytes >> 20,
        copy_bw / 1e9,
        copy_cmd_bw / 1e9
    );
    println!(
        "timing: {}",
        if ctx.has_timestamps() {
            "GPU timestamps, median"
        } else {
            "CPU wall clock / reps"
        }
    );

    let mut rows = Vec::new();
    // Enough copies of each weight that one timed round streams at least 4x the largest L2
    // (50 MB on the H100) rather than re-reading cached weights.
    let mut weights = Vec::new();
    for (i, &(name, n, k)) in SHAPES.iter().enumerate() {
        let bytes = random_half_bytes(n * k, dtype, 7 + i as u64);
        let copies = if cpu {
            1
        } else {
            (256usize << 20).div_ceil(bytes.len()).min(args.reps)
        };
        let set = (0..copies)
            .map(|_| Weight::upload(&ctx, name, n, k, dtype, &bytes))
            .collect::<vllm_apple_ops::Result<Vec<_>>>()?;
        weights.push((name, set));
    }
    for (name, w) in &weights {
        let w = &w[..];
        for &m in &args.decode_m {
            let matrices = ctx.coop.is_some() && ctx.subgroup_is(32);
            let s = matmul::frag_size(&ctx);
            let mut paths = vec![(MatmulPath::Auto, Tuning::default())];
            // The other paths at decode batch sizes, for comparison.
            if args.all_paths {
                if m <= matmul::GEMV_MAX_M {
                    paths.push((MatmulPath::Gemv, Tuning::default()));
                }
                if matrices && m > 2 {
                    paths.push((MatmulPath::Coop, Tuning::default()));
                }
                if matrices {
                    paths.push((MatmulPath::Skinny, Tuning::default()));
                }
            }
            if args.skinny_sweep && matrices {
                let limit = ctx.limits.max_compute_workgroup_storage_size;
                for c in SkinnyConfig::sweep(s, m, w[0].n, limit) {
                    let t = Tuning {
                        skinny: Some(c),
                        ..Default::default()
                    };
                    paths.push((MatmulPath::Skinny, t));
                }
            }
            for (path, t) in paths {
                bench_matmul(&ctx, &mut rows, name, w, m, path, t, args.reps, args.serial)?;
            }
        }
    }
    if args.gemv_sweep {
        for (name, w) in &weights {
            let w = &w[..];
            for &m in &args.decode_m {
                let sg = ctx.info.subgroup_max_size;
                for cfg in SWEEP.iter().filter(|c| c.valid(m, sg)) {
                    let t = Tuning {
                        gemv: Some(*cfg),
                        ..Default::default()
                    };
                    bench_matmul(
                        &ctx,
                        &mut rows,
                        name,
                        w,
                        m,
                        MatmulPath::Gemv,
                        t,
                        args.reps,
                        args.serial,
                    )?;
                }
            }
        }
    }
    // Prefill computes logits only for the last token of each sequence, so lm_head is
    // a decode-shaped product even there and is left out of the GEMM rows.
    for (name, w) in weights.iter().filter(|(_, w)| w[0].n != 151_936) {
        let w = &w[..1];
        let m = args.prefill_m;
        bench_matmul(
            &ctx,
            &mut rows,
            name,
            w,
            m,
            MatmulPath::Auto,
            Tuning::default(),
            args.reps,
            args.serial,
        )?;
        if args.all_paths && ctx.coop.is_some() {
            bench_matmul(
                &ctx,
                &mut rows,
                name,
                w,
                m,
                MatmulPath::Tiled,
                Tuning::default(),
                args.reps,
                args.serial,
            )?;
        }
        if args.coop_sweep {
            if let Some(shape) = ctx.coop {
                let limit = ctx.limits.max_compute_workgroup_storage_size;
                for c in CoopConfig::sweep(shape.m, limit) {
                    let t = Tuning {
                        coop: Some(c),
                        ..Default::default()
                    };
                    bench_matmul(
                        &ctx,
                        &mut rows,
                        name,
                        w,
                        m,
                        MatmulPath::Coop,
                        t,
                        args.reps,
                        args.serial,
                    )?;
                }
            }
        }
    }
    bench_small(&ctx, &mut rows, args.prefill_m, args.reps)?;

    println!();
    println!(
        "{:<30} {:>22} {:>20} {:>10} {:>9} {:>7} {:>9}",
        "kernel", "shape (MxNxK)", "path", "time us", "GB/s", "%copy", "TFLOP/s"
    );
    for r in &rows {
        println!(
            "{:<30} {:>22} {:>20} {:>10.1} {:>9.1} {:>6.1}% {:>9}",
            r.name,
            r.shape,
            r.path,
            r.us,
            r.gbs,
            100.0 * r.gbs * 1e9 / copy_bw,
            r.tflops.map(|t| format!("{t:.2}")).unwrap_or_default()
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_matmul(
    ctx: &GpuContext,
    rows: &mut Vec<Row>,
    name: &str,
    ws: &[Weight],
    m: usize,
    path: MatmulPath,
    cfg: Tuning,
    reps: usize,
    serial: bool,
) -> Result<()> {
    let w = &ws[0];
    let x = ctx.upload_f32(&[m, w.k], DType::F32, &vec![0.01; m * w.k])?;
    let ys = (0..ws.len().max(8).min(reps))
        .map(|_| ctx.empty(&[m, w.n], DType::F32))
        .collect::<vllm_apple_ops::Result<Vec<_>>>()?;
    let probe = vllm_apple_ops::Step::new(ctx);
    let resolved = match path {
        MatmulPath::Auto => matmul::auto_path(&probe, m, w),
        p => p,
    };
    drop(probe);
    let outs = if serial { 1 } else { ys.len() };
    let t = time_reps(ctx, reps, |s, r| {
        matmul::matmul_tuned(s, &x, &ws[r % ws.len()], &ys[r % outs], resolved, cfg)
    })?;
    let bytes = w.nbytes() as f64 + (m * w.k * 4 + m * w.n * 4) as f64;
    let flops = 2.0 * (m * w.n * w.k) as f64;
    rows.push(Row {
        name: name.to_string(),
        shape: format!("{m}x{}x{}", w.n, w.k),
        path: match (resolved, cfg) {
            (MatmulPath::Gemv, Tuning { gemv: Some(c), .. }) => {
                format!("gemv {}/{}/{}", c.wg, c.tpr, c.rpt)
            }
            (MatmulPath::Coop, Tuning { coop: Some(c), .. }) => {
                format!("coop {}", c.label())
            }
            (
                MatmulPath::Skinny,
                Tuning {
                    skinny: Some(c), ..
                },
            ) => {
                format!("skinny {}", c.label())
            }
            (p, _) => format!("{p:?}").to_lowercase(),
        },
        us: t * 1e6,
        gbs: bytes / t / 1e9,
        tflops: (m > matmul::AUTO_GEMV_MAX_M).then_some(flops / t / 1e12),
    });
    Ok(())
}

fn bench_small(ctx: &GpuContext, rows: &mut Vec<Row>, prefill_m: usize, reps: usize) -> Result<()> {
    let h = 2048;
    for m in [1usize, prefill_m] {
        let x = ctx.upload_f32(&[m, h], DType::F32, &vec![0.5; m * h])?;
        let res = ctx.upload_f32(&[m, h], DType::F32, &vec![0.25; m * h])?;
        let w = ctx.upload_f32(&[h], DType::F32, &vec![1.0; h])?;
        let out = ctx.empty(&[m, h], DType::F32)?;
        let t = time_reps(ctx, reps, |s, _| {
            rmsnorm::add_rmsnorm(s, &x, &res, &w, 1e-6, &out)
        })?;
        rows.push(small_row(
            "add_rmsnorm",
            format!("{m}x{h}"),
            t,
            (m * h * 16) as f64,
        ));

        let i = 768;
        let gu = ctx.upload_f32(&[m, 2 * i], DType::F32, &vec![0.5; m * 2 * i])?;
        let o = ctx.empty(&[m, i], DType::F32)?;
        let t = time_reps(ctx, reps, |s, _| activation::silu_mul(s, &gu, &o))?;
        rows.push(small_row(
            "silu_mul",
            format!("{m}x{i}"),
            t,
            (m * i * 12) as f64,
        ));

        let (hq, hkv, d) = (32, 4, 128);
        let qkv = ctx.upload_f32(
            &[m, (hq + 2 * hkv) * d],
            DType::F32,
            &vec![0.5; m * (hq + 2 * hkv) * d],
        )?;
        let pos = ctx.upload_u32(&[m], &(0..m as u32).collect::<Vec<_>>())?;
        let inv = ctx.upload_f32(&[d / 2], DType::F32, &rope::inv_freq(d, 1e6, None))?;
        let qn = ctx.upload_f32(&[d], DType::F32, &vec![1.0; d])?;
        let shape = rope::RopeShape {
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
        };
        let t = time_reps(ctx, reps, |s, _| {
            rope::rope(s, &qkv, &pos, &inv, Some((&qn, &qn)), 1e-6, shape)
        })?;
        rows.push(small_row(
            "rope+qk_norm",
            format!("{m}x{}x{d}", hq + hkv),
            t,
            (m * (hq + hkv) * d * 8) as f64,
        ));
    }
    for m in [1usize, 8] {
        let v = 151_936;
        let logits = ctx.upload_f32(&[m, v], DType::F32, &vec![0.5; m * v])?;
        let ids = ctx.empty(&[m], DType::U32)?;
        let t = time_reps(ctx, reps, |s, _| argmax::argmax(s, &logits, &ids))?;
        rows.push(small_row(
            "argmax",
            format!("{m}x{v}"),
            t,
            (m * v * 4) as f64,
        ));
    }
    Ok(())
}

fn small_row(name: &str, shape: String, t: f64, bytes: f64) -> Row {
    Row {
        name: name.to_string(),
        shape,
        path: "-".into(),
        us: t * 1e6,
        gbs: bytes / t / 1e9,
        tflops: None,
    }
}

/// The matrix GEMM at M = `m`, K = 2048 over 1 to 48 column tiles, default and half-width
/// tiles, as dependent repetitions: steps in time against the tile count show how many
/// workgroups run at once.
fn wave_probe(ctx: &GpuContext, dtype: DType, m: usize, reps: usize) -> Result<()> {
    let Some(shape) = ctx.coop.filter(|_| ctx.subgroup_is(32)) else {
        bail!("--wave-probe needs cooperative matrices and subgroups of 32");
    };
    let s = shape.m;
    let k = 2048;
    let wide = CoopConfig::for_device(ctx);
    let narrow = CoopConfig { frags_n: 2, ..wide };
    let max_tiles = 48;
    let bytes = random_half_bytes(max_tiles * wide.tile_n(s) as usize * k, dtype, 11);
    println!(
        "{:>6} {:>6} {:>12} {:>10} {:>12} {:>10}",
        "tiles", "wgs", "wide us", "TFLOP/s", "narrow us", "TFLOP/s"
    );
    let row_tiles = m.div_ceil(8 * s as usize);
    for t in 1..=max_tiles {
        let mut cols = Vec::new();
        for c in [wide, narrow] {
            let n = t * c.tile_n(s) as usize;
            let w = Weight::upload(ctx, "probe", n, k, dtype, &bytes[..2 * n * k])?;
            let mut rows = Vec::new();
            let tuning = Tuning {
                coop: Some(c),
                ..Default::default()
            };
            let ws = std::slice::from_ref(&w);
            bench_matmul(
                ctx,
                &mut rows,
                "probe",
                ws,
                m,
                MatmulPath::Coop,
                tuning,
                reps,
                true,
            )?;
            cols.push((rows[0].us, rows[0].tflops.unwrap_or(0.0)));
        }
        println!(
            "{:>6} {:>6} {:>12.1} {:>10.1} {:>12.1} {:>10.1}",
            t,
            t * row_tiles,
            cols[0].0,
            cols[0].1,
            cols[1].0,
            cols[1].1
        );
    }
    Ok(())
}

/// GPU time per tiny (one-workgroup, 4 KiB) copy dispatch, back to back in one pass: on
/// distinct buffers (no barrier needed) and as a chain a -> b -> a (a barrier each).
fn dispatch_overhead(ctx: &GpuContext) -> Result<()> {
    let n = 256;
    let bufs: Vec<_> = (0..2 * n)
        .map(|_| ctx.empty(&[1024], DType::F32))
        .collect::<vllm_apple_ops::Result<_>>()?;
    let independent = time_reps(ctx, n, |s, r| copy::copy(s, &bufs[2 * r], &bufs[2 * r + 1]))?;
    let chain = time_reps(ctx, n, |s, r| copy::copy(s, &bufs[r % 2], &bufs[1 - r % 2]))?;
    println!(
        "device: {} ({:?})\nper tiny dispatch: {:.2} us independent, {:.2} us dependent (barrier)",
        ctx.info.name,
        ctx.info.backend,
        independent * 1e6,
        chain * 1e6
    );
    Ok(())
}
