//! Random sampling on the GPU: temperature and min-p, one id per row back to the CPU
//! (greedy rows get the argmax from the same dispatches). The uniform draw `u` of each row
//! comes from the caller (the request's seeded generator), so a row's token depends only
//! on its logits, its parameters and its own draw: not on the rest of the batch.

use super::{argmax, expect_dtype, expect_len, wgsl};
use crate::dtype::DType;
use crate::error::Result;
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;

const SRC: &str = wgsl!("sample.wgsl");

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new("sample.wgsl", SRC, entry).u32("BLOCK", argmax::BLOCK)
}

pub(crate) fn variants() -> Vec<Kernel> {
    vec![kernel("sample_sums"), kernel("sample_pick")]
}

/// Per-row parameters of [`sample`]: temperature (<= 0: greedy), min-p (0: off) and the
/// uniform draw in [0, 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSampling {
    pub temperature: f32,
    pub min_p: f32,
    pub u: f32,
}

impl RowSampling {
    pub const GREEDY: RowSampling = RowSampling {
        temperature: 0.0,
        min_p: 0.0,
        u: 0.0,
    };
}

/// Uploads per-row parameters as [`sample`] reads them (`[rows, 4]` f32).
pub fn upload_params(ctx: &crate::GpuContext, rows: &[RowSampling]) -> Result<Tensor> {
    let flat: Vec<f32> = rows
        .iter()
        .flat_map(|r| [r.temperature, r.min_p, r.u, 0.0])
        .collect();
    ctx.upload_f32(&[rows.len(), 4], DType::F32, &flat)
}

/// `ids[m]`: row m of `logits` sampled with `params[m]` (see [`RowSampling`]).
pub fn sample(step: &mut Step, logits: &Tensor, params: &Tensor, ids: &Tensor) -> Result<()> {
    expect_dtype("sample", logits, DType::F32)?;
    expect_dtype("sample", params, DType::F32)?;
    expect_dtype("sample", ids, DType::U32)?;
    let n = logits.dim_back(0);
    let m = logits.rows();
    expect_len("sample", "ids", ids, m)?;
    expect_len("sample", "params", params, 4 * m)?;
    let blocks = n.div_ceil(argmax::BLOCK as usize).max(1);
    let partial = step.ctx.empty(&[m * blocks, 2], DType::U32)?;
    let sums = step.ctx.empty(&[m * blocks], DType::F32)?;
    let p = [m as u32, n as u32, blocks as u32];
    argmax::record_blocks(step, logits, &partial, &p, m * blocks)?;
    step.dispatch(
        &kernel("sample_sums"),
        &[logits, &partial, params, &sums],
        &p,
        grid(step.ctx, m * blocks),
    )?;
    step.dispatch(
        &kernel("sample_pick"),
        &[logits, &partial, params, &sums, ids],
        &p,
        grid(step.ctx, m),
    )
}

pub mod cpu {
    use super::RowSampling;

    /// The token [`super::sample`] draws, in f64: the inverse CDF over ids in order. Also
    /// returns how far (as a share of the total weight) `u` lies from the nearest
    /// boundary between tokens, for tests that skip draws rounding could flip.
    pub fn sample(row: &[f32], r: RowSampling) -> (u32, f64) {
        let argmax = row
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv {
                    (i, v)
                } else {
                    (bi, bv)
                }
            })
            .0 as u32;
        if r.temperature <= 0.0 {
            return (argmax, 1.0);
        }
        let mx = row
            .iter()
            .copied()
            .filter(|x| !x.is_nan())
            .fold(f32::MIN, f32::max);
        let w: Vec<f64> = row
            .iter()
            .map(|&x| {
                let z = (f64::from(x) - f64::from(mx)) / f64::from(r.temperature);
                if z.is_nan() || z <= -87.0 {
                    return 0.0;
                }
                let w = z.min(0.0).exp();
                if r.min_p > 0.0 && w < f64::from(r.min_p) {
                    0.0
                } else {
                    w
                }
            })
            .collect();
        let total: f64 = w.iter().sum();
        if total <= 0.0 {
            return (argmax, 1.0);
        }
        let target = f64::from(r.u) * total;
        let mut c = 0.0;
        for (i, &wi) in w.iter().enumerate() {
            if wi > 0.0 && c + wi > target {
                let margin = (target - c).min(c + wi - target) / total;
                return (i as u32, margin);
            }
            c += wi;
        }
        let last = w.iter().rposition(|&x| x > 0.0).unwrap_or(0);
        (last as u32, 0.0)
    }
}
