//! Row-wise softmax, in place.

use super::{expect_dtype, wgsl};
use crate::dtype::DType;
use crate::error::Result;
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;

const SRC: &str = wgsl!("softmax.wgsl");

fn kernel() -> Kernel {
    Kernel::new("softmax.wgsl", SRC, "softmax")
}

pub(crate) fn variants() -> Vec<Kernel> {
    vec![kernel()]
}

/// Softmax over the last dimension of `x`, in place.
pub fn softmax(step: &mut Step, x: &Tensor) -> Result<()> {
    expect_dtype("softmax", x, DType::F32)?;
    let n = x.dim_back(0);
    let m = x.rows();
    step.dispatch(&kernel(), &[x], &[m as u32, n as u32], grid(step.ctx, m))
}

pub mod cpu {
    pub fn softmax(x: &[f32], n: usize) -> Vec<f32> {
        x.chunks(n)
            .flat_map(|row| {
                let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let s: f64 = row.iter().map(|v| (*v as f64 - mx).exp()).sum();
                row.iter()
                    .map(move |v| ((*v as f64 - mx).exp() / s) as f32)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}
