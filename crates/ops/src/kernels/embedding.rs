//! Embedding gather: token ids -> f32 hidden states.

use super::{expect_dtype, expect_len, wgsl};
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;
use crate::weight::Weight;

const SRC: &str = wgsl!("embedding.wgsl");

fn kernel(dtype: DType) -> Kernel {
    Kernel::new("embedding.wgsl", SRC, "embedding").u32("W_DTYPE", dtype.float_code())
}

pub(crate) fn variants() -> Vec<Kernel> {
    vec![kernel(DType::F32), kernel(DType::F16), kernel(DType::BF16)]
}

/// `out[t, :] = table[ids[t], :]`. Ids must be below the vocabulary size (the engine checks
/// this before they reach the GPU; an out-of-range id leaves its row unwritten).
pub fn embedding(step: &mut Step, ids: &Tensor, table: &Weight, out: &Tensor) -> Result<()> {
    let m = ids.numel();
    expect_dtype("embedding", ids, DType::U32)?;
    expect_dtype("embedding", out, DType::F32)?;
    expect_len("embedding", "out", out, m * table.k)?;
    if m == 0 {
        return Err(shape_err("embedding", "no tokens"));
    }
    let k = kernel(table.dtype);
    for c in &table.chunks {
        let params = [m as u32, table.k as u32, c.row_start as u32, c.rows as u32];
        step.dispatch(&k, &[ids, &c.tensor, out], &params, grid(step.ctx, m))?;
    }
    Ok(())
}

pub mod cpu {
    pub fn embedding(ids: &[u32], table: &[f32], h: usize) -> Vec<f32> {
        ids.iter()
            .flat_map(|&id| {
                table[id as usize * h..(id as usize + 1) * h]
                    .iter()
                    .copied()
            })
            .collect()
    }
}
