//! Random fill on the GPU, for dummy weights (vLLM's `load_format = "dummy"`).

use super::wgsl;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;

const SRC: &str = wgsl!("fill.wgsl");

fn kernel(dtype: DType) -> Kernel {
    Kernel::new("fill.wgsl", SRC, "fill").u32("W_DTYPE", dtype.float_code())
}

pub(crate) fn variants() -> Vec<Kernel> {
    vec![kernel(DType::F32), kernel(DType::F16), kernel(DType::BF16)]
}

/// Fills a float tensor with values uniform in [-scale, scale), reproducible for `seed`.
pub fn fill_uniform(step: &mut Step, t: &Tensor, scale: f32, seed: u32) -> Result<()> {
    if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) || !t.nbytes().is_multiple_of(4)
    {
        return Err(shape_err(
            "fill",
            format!("{t:?}: need a float tensor of whole 4-byte words"),
        ));
    }
    let words = t.nbytes() / 4;
    let groups = grid(step.ctx, (words as usize).div_ceil(256));
    step.dispatch(
        &kernel(t.dtype()),
        &[t],
        &[words as u32, seed, scale.to_bits(), groups[0]],
        groups,
    )
}
