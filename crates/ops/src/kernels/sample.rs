//! Random sampling on the GPU: temperature, min-p, top-k and top-p, one id per row back
//! to the CPU
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
    vec![
        kernel("logits_adjust"),
        kernel("search_hist"),
        kernel("search_narrow"),
        kernel("sample_sums"),
        kernel("sample_pick"),
    ]
}

/// Per-row parameters of [`sample`]: temperature (<= 0: greedy), min-p (0: off), top-k
/// (0: off), top-p (1: off) and the uniform draw in [0, 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSampling {
    pub temperature: f32,
    pub min_p: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub u: f32,
}

impl RowSampling {
    pub const GREEDY: RowSampling = RowSampling {
        temperature: 0.0,
        min_p: 0.0,
        top_k: 0,
        top_p: 1.0,
        u: 0.0,
    };
}

/// Uploads per-row parameters as [`sample`] reads them (`[rows, 8]` f32; top-k is exact
/// in f32 up to 2^24, far beyond any vocabulary).
pub(crate) fn upload_params(ctx: &crate::GpuContext, rows: &[RowSampling]) -> Result<Tensor> {
    let flat: Vec<f32> = rows
        .iter()
        .flat_map(|r| {
            let k = r.top_k.min(1 << 24) as f32;
            [r.temperature, r.min_p, r.u, r.top_p, k, 0.0, 0.0, 0.0]
        })
        .collect();
    ctx.upload_f32(&[rows.len(), 8], DType::F32, &flat)
}

/// Passes of the threshold search per threshold (sample.wgsl's PASSES).
const PASSES: u32 = 9;

/// `ids[m]`: row m of `logits` sampled with `rows[m]` (see [`RowSampling`]). The
/// threshold search is recorded only when some row asks for top-k or top-p, and its
/// top-p half only when some row asks for top-p.
pub fn sample(step: &mut Step, logits: &Tensor, rows: &[RowSampling], ids: &Tensor) -> Result<()> {
    expect_dtype("sample", logits, DType::F32)?;
    expect_dtype("sample", ids, DType::U32)?;
    let n = logits.dim_back(0);
    let m = logits.rows();
    expect_len("sample", "ids", ids, m)?;
    if rows.len() != m {
        return Err(crate::error::shape_err(
            "sample",
            format!("{} parameter rows for {m} logits rows", rows.len()),
        ));
    }
    let params = &upload_params(step.ctx, rows)?;
    let drawn = |r: &&RowSampling| r.temperature > 0.0;
    let top_k = rows.iter().filter(drawn).any(|r| r.top_k > 0);
    let top_p = rows.iter().filter(drawn).any(|r| r.top_p < 1.0);
    let blocks = n.div_ceil(argmax::BLOCK as usize).max(1);
    let partial = step.ctx.empty(&[m * blocks, 2], DType::U32)?;
    let sums = step.ctx.empty(&[m * blocks], DType::F32)?;
    let thresholds = step.ctx.upload_u32(&[m], &vec![0; m])?;
    argmax::record_blocks(
        step,
        logits,
        &partial,
        &[m as u32, n as u32, blocks as u32],
        m * blocks,
    )?;
    if top_k || top_p {
        search(step, logits, &partial, params, &thresholds, blocks, top_p)?;
    }
    let p = [m as u32, n as u32, blocks as u32, 0];
    step.dispatch_at(
        &kernel("sample_sums"),
        &[
            (0, logits),
            (1, &partial),
            (2, params),
            (3, &sums),
            (5, &thresholds),
        ],
        &p,
        grid(step.ctx, m * blocks),
    )?;
    step.dispatch_at(
        &kernel("sample_pick"),
        &[
            (0, logits),
            (1, &partial),
            (2, params),
            (3, &sums),
            (4, ids),
            (5, &thresholds),
        ],
        &p,
        grid(step.ctx, m),
    )
}

/// The threshold search of sample.wgsl (search_hist / search_narrow) over `logits`
/// (`[m, n]`) with `partial` from argmax's first pass and per-row `params`: writes each
/// row's threshold key (the top-k key, or with `top_p` the top-p key above it; 0 where
/// the row asks for neither) into `thresholds`, which must start at 0.
pub(crate) fn search(
    step: &mut Step,
    logits: &Tensor,
    partial: &Tensor,
    params: &Tensor,
    thresholds: &Tensor,
    blocks: usize,
    top_p: bool,
) -> Result<()> {
    let n = logits.dim_back(0);
    let m = logits.rows();
    let init: Vec<u32> = (0..m)
        .flat_map(|_| [0, u32::MAX, 0, 0, 0, 0, 0, 0])
        .collect();
    let state = step.ctx.upload_u32(&[m * 8], &init)?;
    let hist = step.ctx.empty(&[m * blocks * 16], DType::F32)?;
    let passes = if top_p { 2 * PASSES } else { PASSES };
    for pass in 0..passes {
        let pp = [m as u32, n as u32, blocks as u32, pass];
        step.dispatch_at(
            &kernel("search_hist"),
            &[
                (0, logits),
                (1, partial),
                (2, params),
                (6, &state),
                (7, &hist),
            ],
            &pp,
            grid(step.ctx, m * blocks),
        )?;
        step.dispatch_at(
            &kernel("search_narrow"),
            &[(2, params), (5, thresholds), (6, &state), (7, &hist)],
            &pp,
            grid(step.ctx, m),
        )?;
    }
    Ok(())
}

/// One token's processing before sampling (see `logits_adjust` in sample.wgsl): applied
/// in place, in this order, as the host sampler does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitAdjust {
    pub row: u32,
    pub token: u32,
    /// Set to -inf first (a stop token before `min_tokens`).
    pub mask: bool,
    pub bias: f32,
    /// `1 / penalty` for positive logits and `penalty` for the others (1 and 1: none).
    pub inv_repetition: f32,
    pub repetition: f32,
    /// Subtracted after the repetition penalty: frequency penalty times the count, then
    /// the presence penalty.
    pub frequency: f32,
    pub presence: f32,
}

/// Applies `adjust` to `logits` (`[rows, vocab]`) in place; tokens must be distinct within
/// a row and inside the vocabulary (checked).
pub fn adjust(step: &mut Step, logits: &Tensor, adjust: &[LogitAdjust]) -> Result<()> {
    expect_dtype("logits adjust", logits, DType::F32)?;
    if adjust.is_empty() {
        return Ok(());
    }
    let n = logits.dim_back(0);
    let m = logits.rows();
    let mut words = Vec::with_capacity(adjust.len() * 12);
    for a in adjust {
        if a.row as usize >= m || a.token as usize >= n {
            return Err(crate::error::shape_err(
                "logits adjust",
                format!("entry row {} token {} outside {m} x {n}", a.row, a.token),
            ));
        }
        words.extend([a.row, a.token, a.mask as u32, 0]);
        words.extend([a.bias, a.inv_repetition, a.repetition, 0.0].map(f32::to_bits));
        words.extend([a.frequency, a.presence, 0.0, 0.0].map(f32::to_bits));
    }
    let entries = step.ctx.upload_u32(&[words.len()], &words)?;
    let groups = adjust.len().div_ceil(64);
    step.dispatch(
        &kernel("logits_adjust"),
        &[logits, &entries],
        &[adjust.len() as u32, n as u32],
        grid(step.ctx, groups),
    )
}

pub mod cpu {
    use super::RowSampling;

    /// The token [`super::sample`] draws, in f64: min-p, top-k (ties kept), top-p (the
    /// smallest set of largest logits reaching `top_p` of the mass, ties kept), then the
    /// inverse CDF over ids in order. Also returns how far, as a share of the total
    /// weight, the draw and the top-p cut lie from a boundary, for tests that skip cases
    /// rounding could flip.
    pub fn sample(row: &[f32], r: RowSampling) -> (u32, f64) {
        let value = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
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
        let mx = row.iter().copied().map(value).fold(f32::MIN, f32::max);
        let mut w: Vec<f64> = row
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
        let mut by_value: Vec<usize> = (0..row.len()).collect();
        by_value.sort_by(|&a, &b| value(row[b]).total_cmp(&value(row[a])));
        let k = r.top_k as usize;
        if k > 0 && k < row.len() {
            let cut = value(row[by_value[k - 1]]);
            for (wi, &x) in w.iter_mut().zip(row) {
                if value(x) < cut {
                    *wi = 0.0;
                }
            }
        }
        let mut margin = 1.0f64;
        if r.top_p < 1.0 {
            let total: f64 = w.iter().sum();
            let goal = f64::from(r.top_p) * total;
            let mut cum = 0.0;
            let mut i = 0;
            while i < by_value.len() {
                let v = value(row[by_value[i]]);
                let before = cum;
                while i < by_value.len() && value(row[by_value[i]]) == v {
                    cum += w[by_value[i]];
                    i += 1;
                }
                if cum >= goal && cum > 0.0 {
                    margin = margin.min((cum - goal).min(goal - before).abs() / total);
                    for (wi, &x) in w.iter_mut().zip(row) {
                        if value(x) < v {
                            *wi = 0.0;
                        }
                    }
                    break;
                }
            }
        }
        let total: f64 = w.iter().sum();
        if total <= 0.0 {
            return (argmax, 1.0);
        }
        let goal = f64::from(r.u) * total;
        let mut c = 0.0;
        for (i, &wi) in w.iter().enumerate() {
            if wi > 0.0 && c + wi > goal {
                let m = (goal - c).min(c + wi - goal) / total;
                return (i as u32, margin.min(m));
            }
            c += wi;
        }
        let last = w.iter().rposition(|&x| x > 0.0).unwrap_or(0);
        (last as u32, 0.0)
    }
}
