//! Greedy sampling on the GPU: only one id per row comes back.

use super::{expect_dtype, expect_len, wgsl};
use crate::dtype::DType;
use crate::error::Result;
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;

const SRC: &str = wgsl!("argmax.wgsl");

/// Logits per workgroup in the first pass.
pub(crate) const BLOCK: u32 = 4096;

fn blocks_kernel() -> Kernel {
    Kernel::new("argmax.wgsl", SRC, "argmax_blocks").u32("BLOCK", BLOCK)
}

fn rows_kernel() -> Kernel {
    Kernel::new("argmax.wgsl", SRC, "argmax_rows").u32("BLOCK", BLOCK)
}

pub(crate) fn variants() -> Vec<Kernel> {
    vec![blocks_kernel(), rows_kernel()]
}

/// `ids[m] = argmax(logits[m, :])`, lowest index on ties.
pub fn argmax(step: &mut Step, logits: &Tensor, ids: &Tensor) -> Result<()> {
    expect_dtype("argmax", logits, DType::F32)?;
    expect_dtype("argmax", ids, DType::U32)?;
    let n = logits.dim_back(0);
    let m = logits.rows();
    expect_len("argmax", "ids", ids, m)?;
    let blocks = n.div_ceil(BLOCK as usize).max(1);
    let partial = step.ctx.empty(&[m * blocks, 2], DType::U32)?;
    let params = [m as u32, n as u32, blocks as u32];
    record_blocks(step, logits, &partial, &params, m * blocks)?;
    step.dispatch_at(
        &rows_kernel(),
        &[(1, &partial), (2, ids)],
        &params,
        grid(step.ctx, m),
    )
}

/// The first pass: each BLOCK-wide slice of a row to its (max value bits, index).
pub(crate) fn record_blocks(
    step: &mut Step,
    logits: &Tensor,
    partial: &Tensor,
    params: &[u32; 3],
    groups: usize,
) -> Result<()> {
    step.dispatch(
        &blocks_kernel(),
        &[logits, partial],
        params,
        grid(step.ctx, groups),
    )
}

pub mod cpu {
    pub fn argmax(x: &[f32], n: usize) -> Vec<u32> {
        x.chunks(n)
            .map(|row| {
                let mut best = 0;
                for (i, v) in row.iter().enumerate() {
                    if *v > row[best] {
                        best = i;
                    }
                }
                best as u32
            })
            .collect()
    }
}
