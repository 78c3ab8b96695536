//! RMSNorm, and RMSNorm fused with the residual add (one pass over the residual stream).

use super::{expect_dtype, expect_len, wgsl};
use crate::dtype::DType;
use crate::error::Result;
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;

const SRC: &str = concat!(
    wgsl!("rmsnorm_plain.wgsl"),
    include_str!("wgsl/rmsnorm.wgsl")
);
const SRC_MOE: &str = concat!(wgsl!("rmsnorm_moe.wgsl"), include_str!("wgsl/rmsnorm.wgsl"));

fn kernel(add: bool) -> Kernel {
    Kernel::new("rmsnorm.wgsl", SRC, "add_rmsnorm").bool("ADD_RESIDUAL", add)
}

/// The variant whose layer output is the weighted sum of `k` expert rows per token.
pub(crate) fn moe_kernel(k: usize) -> Kernel {
    Kernel::new("rmsnorm.wgsl+moe", SRC_MOE, "add_rmsnorm")
        .bool("ADD_RESIDUAL", true)
        .u32("K", k as u32)
}

pub(crate) fn variants() -> Vec<Kernel> {
    vec![kernel(false), kernel(true), moe_kernel(8)]
}

fn check(x: &Tensor, w: &Tensor, out: &Tensor) -> Result<(usize, usize)> {
    let h = w.numel();
    expect_dtype("rmsnorm", x, DType::F32)?;
    expect_dtype("rmsnorm", w, DType::F32)?;
    expect_dtype("rmsnorm", out, DType::F32)?;
    let m = x.numel() / h.max(1);
    expect_len("rmsnorm", "x", x, m * h)?;
    expect_len("rmsnorm", "out", out, m * h)?;
    Ok((m, h))
}

/// `out = x / rms(x) * w`, row by row; `w` has the row length.
pub fn rmsnorm(step: &mut Step, x: &Tensor, w: &Tensor, eps: f32, out: &Tensor) -> Result<()> {
    let (m, h) = check(x, w, out)?;
    let dummy = step.ctx.dummy()?;
    let params = [m as u32, h as u32, eps.to_bits()];
    step.dispatch(
        &kernel(false),
        &[x, dummy, w, out],
        &params,
        grid(step.ctx, m),
    )
}

/// `residual += x; out = rmsnorm(residual) * w` in one dispatch.
pub fn add_rmsnorm(
    step: &mut Step,
    x: &Tensor,
    residual: &Tensor,
    w: &Tensor,
    eps: f32,
    out: &Tensor,
) -> Result<()> {
    let (m, h) = check(x, w, out)?;
    expect_dtype("add_rmsnorm", residual, DType::F32)?;
    expect_len("add_rmsnorm", "residual", residual, m * h)?;
    let params = [m as u32, h as u32, eps.to_bits()];
    step.dispatch(
        &kernel(true),
        &[x, residual, w, out],
        &params,
        grid(step.ctx, m),
    )
}

pub mod cpu {
    pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        let h = w.len();
        x.chunks(h)
            .flat_map(|row| {
                let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64;
                let scale = 1.0 / (ms + eps as f64).sqrt();
                row.iter()
                    .zip(w)
                    .map(move |(v, w)| (*v as f64 * scale * *w as f64) as f32)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}
