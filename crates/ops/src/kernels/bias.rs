//! Row-broadcast bias add, in place.

use super::{expect_dtype, expect_len, wgsl};
use crate::dtype::DType;
use crate::error::Result;
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;

const SRC: &str = wgsl!("bias.wgsl");

fn kernel() -> Kernel {
    Kernel::new("bias.wgsl", SRC, "add_bias")
}

pub(crate) fn variants() -> Vec<Kernel> {
    vec![kernel()]
}

/// `y[m, :] += b` for every row of `y` (`[m, n]`, f32) with `b` of length `n` (f32).
pub fn add_bias(step: &mut Step, y: &Tensor, b: &Tensor) -> Result<()> {
    expect_dtype("add_bias", y, DType::F32)?;
    expect_dtype("add_bias", b, DType::F32)?;
    let n = b.numel();
    let m = y.numel() / n.max(1);
    expect_len("add_bias", "y", y, m * n)?;
    step.dispatch(
        &kernel(),
        &[y, b],
        &[m as u32, n as u32],
        grid(step.ctx, (m * n).div_ceil(256)),
    )
}

pub mod cpu {
    pub fn add_bias(y: &mut [f32], b: &[f32]) {
        for row in y.chunks_mut(b.len()) {
            for (v, b) in row.iter_mut().zip(b) {
                *v += b;
            }
        }
    }
}
