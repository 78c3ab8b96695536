//! SiLU-and-multiply for gated MLPs.

use super::{expect_dtype, expect_len, wgsl};
use crate::dtype::DType;
use crate::error::Result;
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;

const SRC: &str = wgsl!("activation.wgsl");

fn kernel() -> Kernel {
    Kernel::new("activation.wgsl", SRC, "silu_mul")
}

pub(crate) fn variants() -> Vec<Kernel> {
    vec![kernel()]
}

/// `out[m, j] = silu(gate_up[m, j]) * gate_up[m, i + j]` for `gate_up` of shape `[m, 2i]`.
pub fn silu_mul(step: &mut Step, gate_up: &Tensor, out: &Tensor) -> Result<()> {
    expect_dtype("silu_mul", gate_up, DType::F32)?;
    expect_dtype("silu_mul", out, DType::F32)?;
    let i = gate_up.dim_back(0) / 2;
    let m = gate_up.rows();
    expect_len("silu_mul", "out", out, m * i)?;
    let groups = (m * i).div_ceil(256);
    step.dispatch(
        &kernel(),
        &[gate_up, out],
        &[m as u32, i as u32],
        grid(step.ctx, groups),
    )
}

pub mod cpu {
    pub fn silu_mul(gate_up: &[f32], i: usize) -> Vec<f32> {
        gate_up
            .chunks(2 * i)
            .flat_map(|row| {
                (0..i).map(move |j| {
                    let g = row[j] as f64;
                    (g / (1.0 + (-g).exp()) * row[i + j] as f64) as f32
                })
            })
            .collect()
    }
}
