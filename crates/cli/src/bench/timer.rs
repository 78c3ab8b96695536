//! Timing of recorded work: each repetition in its own timestamped compute pass.

use std::time::Instant;

use anyhow::Result;
use vllm_apple_ops::kernels::copy;
use vllm_apple_ops::recorder::read_timestamps;
use vllm_apple_ops::{DType, GpuContext, Step};

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Seconds per repetition of `record(step, rep)`, from `rounds` timed passes that each hold
/// all `reps` repetitions back to back (the median round, divided by `reps`). Back to back,
/// launch latency overlaps as it does in a real step; `rep` lets the caller rotate buffers
/// so repetitions neither share outputs (a barrier each) nor re-read cached weights.
pub fn time_reps(
    ctx: &GpuContext,
    reps: usize,
    mut record: impl FnMut(&mut Step, usize) -> vllm_apple_ops::Result<()>,
) -> Result<f64> {
    let rounds = 3usize;
    let mut warm = Step::new(ctx);
    for r in 0..reps {
        record(&mut warm, r)?;
    }
    warm.submit_and_wait()?;
    if !ctx.has_timestamps() {
        let mut samples = Vec::new();
        for _ in 0..rounds {
            let t0 = Instant::now();
            let mut step = Step::new(ctx);
            for r in 0..reps {
                record(&mut step, r)?;
            }
            step.submit_and_wait()?;
            samples.push(t0.elapsed().as_secs_f64() / reps as f64);
        }
        return Ok(median(samples));
    }
    let n = (2 * rounds) as u32;
    let qs = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("bench"),
        ty: wgpu::QueryType::Timestamp,
        count: n,
    });
    let mut step = Step::new(ctx);
    for round in 0..rounds {
        step.begin_timed_pass(&qs, 2 * round as u32)?;
        for r in 0..reps {
            record(&mut step, r)?;
        }
    }
    step.end_pass();
    let ticks = read_timestamps(ctx, &mut step, &qs, n)?;
    let period = ctx.queue.get_timestamp_period() as f64 * 1e-9;
    let times: Vec<f64> = ticks
        .chunks_exact(2)
        .map(|p| p[1].saturating_sub(p[0]) as f64 * period / reps as f64)
        .collect();
    Ok(median(times))
}

/// Device-to-device copy bandwidth (bytes read + written per second), the roofline the
/// issue measures kernels against.
pub fn copy_bandwidth(ctx: &GpuContext, bytes: u64, reps: usize) -> Result<f64> {
    let mk = |label| {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    let (a, b) = (mk("copy-a"), mk("copy-b"));
    let run = |n: usize| -> Result<f64> {
        let t0 = Instant::now();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        for i in 0..n {
            let (s, d) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            enc.copy_buffer_to_buffer(s, 0, d, 0, bytes);
        }
        ctx.queue.submit([enc.finish()]);
        ctx.wait_idle()?;
        Ok(t0.elapsed().as_secs_f64())
    };
    run(1)?;
    let samples: Vec<f64> = (0..3).map(|_| run(reps)).collect::<Result<_>>()?;
    Ok(2.0 * bytes as f64 * reps as f64 / median(samples))
}

/// Streaming bandwidth of our copy kernel (bytes read + written per second): the roofline.
pub fn copy_kernel_bandwidth(ctx: &GpuContext, bytes: u64, reps: usize) -> Result<f64> {
    let bytes = bytes.min(ctx.max_binding_bytes() / 16 * 16);
    let n = (bytes / 4) as usize;
    let a = ctx.empty(&[n], DType::F32)?;
    let b = ctx.empty(&[n], DType::F32)?;
    let t = time_reps(ctx, reps, |s, _| copy::copy(s, &a, &b))?;
    Ok(2.0 * bytes as f64 / t)
}
