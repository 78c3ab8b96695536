//! Logprobs of sampled tokens on the GPU (vLLM's raw logprobs): the rows that ask are
//! copied before any logits processing, and after sampling each gives back its
//! log-sum-exp, the sampled token's logit and rank, and its top-N (id, logit) pairs:
//! a few dozen numbers instead of the vocabulary.

use super::{argmax, expect_dtype, sample, wgsl};
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;

const SRC: &str = wgsl!("logprobs.wgsl");

/// The most top logprobs per token the GPU path returns (vLLM's default limit is 20).
pub const MAX_TOP: usize = 32;

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new("logprobs.wgsl", SRC, entry).u32("NMAX", MAX_TOP as u32)
}

pub(crate) fn variants() -> Vec<Kernel> {
    vec![kernel("logprobs_gather"), kernel("logprobs_rows")]
}

/// One row that wants logprobs: its row in the logits (and in the sampled ids) and how
/// many top logprobs (at most [`MAX_TOP`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogprobRequest {
    pub row: u32,
    pub top: u32,
}

/// What comes back for one row: `logprob(x) = x - lse` for the raw logits x.
#[derive(Clone, Debug, PartialEq)]
pub struct RowLogprobs {
    pub lse: f32,
    /// The sampled token's raw logit and rank (1 + tokens with a larger logprob).
    pub logit: f32,
    pub rank: u32,
    /// The top tokens as (id, raw logit), unordered: all above the N-th largest logit and,
    /// of those equal to it, the lowest ids.
    pub top: Vec<(u32, f32)>,
}

/// Buffers of one step's logprob rows, from [`gather`] to [`finish`] to [`read`].
pub struct Logprobs {
    rows: usize,
    n: usize,
    raw: Tensor,
    req: Tensor,
    out: Tensor,
    nth_key: Tensor,
}

/// Copies the rows in `reqs` of `logits` (`[rows, vocab]`): record before anything
/// processes the logits in place.
pub fn gather(step: &mut Step, logits: &Tensor, reqs: &[LogprobRequest]) -> Result<Logprobs> {
    expect_dtype("logprobs", logits, DType::F32)?;
    let n = logits.dim_back(0);
    let m = logits.rows();
    if reqs.is_empty()
        || reqs
            .iter()
            .any(|r| r.row as usize >= m || r.top as usize > MAX_TOP)
    {
        return Err(shape_err(
            "logprobs",
            format!(
                "{} requests over {m} rows (top at most {MAX_TOP})",
                reqs.len()
            ),
        ));
    }
    let rows = reqs.len();
    let words: Vec<u32> = reqs.iter().flat_map(|r| [r.row, r.top]).collect();
    let lp = Logprobs {
        rows,
        n,
        raw: step.ctx.empty(&[rows, n], DType::F32)?,
        req: step.ctx.upload_u32(&[words.len()], &words)?,
        out: step.ctx.empty(&[rows * (MAX_TOP + 2) * 2], DType::U32)?,
        nth_key: step.ctx.upload_u32(&[rows], &vec![0; rows])?,
    };
    let params = [rows as u32, n as u32];
    step.dispatch_at(
        &kernel("logprobs_gather"),
        &[(0, logits), (1, &lp.raw), (3, &lp.req)],
        &params,
        grid(step.ctx, (rows * n).div_ceil(256)),
    )?;
    // The N-th largest logit of each row: the sampler's top-k search (at temperature 1).
    let blocks = n.div_ceil(argmax::BLOCK as usize).max(1);
    let partial = step.ctx.empty(&[rows * blocks, 2], DType::U32)?;
    argmax::record_blocks(
        step,
        &lp.raw,
        &partial,
        &[rows as u32, n as u32, blocks as u32],
        rows * blocks,
    )?;
    let search: Vec<sample::RowSampling> = reqs
        .iter()
        .map(|r| sample::RowSampling {
            temperature: 1.0,
            top_k: r.top,
            ..sample::RowSampling::GREEDY
        })
        .collect();
    let search_params = sample::upload_params(step.ctx, &search)?;
    sample::search(
        step,
        &lp.raw,
        &partial,
        &search_params,
        &lp.nth_key,
        blocks,
        false,
    )?;
    Ok(lp)
}

/// Records the statistics of every gathered row, `ids` being the sampled tokens of all
/// logits rows.
pub fn finish(step: &mut Step, lp: &Logprobs, ids: &Tensor) -> Result<()> {
    expect_dtype("logprobs", ids, DType::U32)?;
    step.dispatch_at(
        &kernel("logprobs_rows"),
        &[
            (1, &lp.raw),
            (2, ids),
            (3, &lp.req),
            (4, &lp.out),
            (5, &lp.nth_key),
        ],
        &[lp.rows as u32, lp.n as u32],
        grid(step.ctx, lp.rows),
    )
}

/// Reads the results back (after the step's submission).
pub fn read(ctx: &crate::GpuContext, lp: &Logprobs) -> Result<Vec<RowLogprobs>> {
    let words = lp.out.to_u32_vec(ctx)?;
    Ok(words
        .chunks_exact((MAX_TOP + 2) * 2)
        .map(|w| {
            let count = (w[3] as usize).min(MAX_TOP);
            RowLogprobs {
                lse: f32::from_bits(w[0]),
                logit: f32::from_bits(w[1]),
                rank: w[2],
                top: (0..count)
                    .map(|i| (w[4 + 2 * i], f32::from_bits(w[5 + 2 * i])))
                    .collect(),
            }
        })
        .collect())
}
