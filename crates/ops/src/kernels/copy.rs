//! Device-side copy in 16-byte words (also the benchmarks' bandwidth reference).

use super::wgsl;
use crate::error::{shape_err, Result};
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;

const SRC: &str = wgsl!("copy.wgsl");

fn kernel() -> Kernel {
    Kernel::new("copy.wgsl", SRC, "copy")
}

pub(crate) fn variants() -> Vec<Kernel> {
    vec![kernel()]
}

/// `dst = src` for tensors of equal byte size, a multiple of 16.
pub fn copy(step: &mut Step, src: &Tensor, dst: &Tensor) -> Result<()> {
    let bytes = src.nbytes();
    if bytes != dst.nbytes() || !bytes.is_multiple_of(16) {
        return Err(shape_err(
            "copy",
            format!(
                "{bytes} bytes into {} (need equal, multiple of 16)",
                dst.nbytes()
            ),
        ));
    }
    let words = bytes / 16;
    if words > u32::MAX as u64 {
        return Err(shape_err("copy", "more than 2^32 words"));
    }
    let groups = grid(step.ctx, words.div_ceil(1024) as usize);
    step.dispatch(&kernel(), &[src, dst], &[words as u32], groups)
}
