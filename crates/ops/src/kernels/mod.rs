//! One module per kernel family: the WGSL variant(s), the launcher that checks shapes and
//! records the dispatch, and `cpu`, the plain-Rust reference the tests compare against.

pub mod activation;
pub mod argmax;
pub mod attention;
pub mod bias;
pub mod copy;
pub mod embedding;
pub mod fill;
pub mod logprobs;
pub mod matmul;
pub mod moe;
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod softmax;

use crate::dtype::DType;
use crate::error::{OpsError, Result};
use crate::pipeline::Kernel;
use crate::tensor::Tensor;

/// WGSL source of a kernel file with the shared helpers in front.
macro_rules! wgsl {
    ($file:literal) => {
        concat!(
            include_str!("wgsl/common.wgsl"),
            include_str!("wgsl/reduce.wgsl"),
            include_str!(concat!("wgsl/", $file))
        )
    };
}

/// A kernel on the cooperative-matrix GEMM core: its staging helpers
/// (`gemm_coop_stage_*.wgsl`), its output binding (`y_scalar.wgsl` or `y_vec4.wgsl`), its
/// front files (where rows come from and where results go), then `gemm_coop.wgsl`.
macro_rules! coop_gemm {
    ($stage:literal, $out:literal, $($front:literal),+) => {
        concat!(
            $crate::kernels::wgsl!($stage),
            include_str!(concat!("wgsl/", $out)),
            $(include_str!(concat!("wgsl/", $front)),)+
            include_str!("wgsl/gemm_coop.wgsl")
        )
    };
}

/// The four kernels a front makes on the cooperative-matrix GEMM core (`coop_gemm!`), as
/// (name, source) indexed `[vec4 staging][vec4 output]` (`matmul::coop_base` picks one).
macro_rules! coop_gemm_variants {
    ($name:literal, $($front:literal),+) => {
        [
            [
                (concat!($name, "+scalar"), $crate::kernels::coop_gemm!(
                    "gemm_coop_stage_scalar.wgsl", "y_scalar.wgsl", $($front),+
                )),
                (concat!($name, "+scalar+y4"), $crate::kernels::coop_gemm!(
                    "gemm_coop_stage_scalar.wgsl", "y_vec4.wgsl", $($front),+
                )),
            ],
            [
                (concat!($name, "+vec"), $crate::kernels::coop_gemm!(
                    "gemm_coop_stage_vec.wgsl", "y_scalar.wgsl", $($front),+
                )),
                (concat!($name, "+vec+y4"), $crate::kernels::coop_gemm!(
                    "gemm_coop_stage_vec.wgsl", "y_vec4.wgsl", $($front),+
                )),
            ],
        ]
    };
}
pub(crate) use {coop_gemm, coop_gemm_variants, wgsl};

/// (name, source) of a cooperative-matrix GEMM kernel by `[vec4 staging][vec4 output]`.
pub(crate) type CoopSources = [[(&'static str, &'static str); 2]; 2];

pub(crate) fn expect_dtype(op: &'static str, t: &Tensor, want: DType) -> Result<()> {
    if t.dtype() != want {
        return Err(OpsError::DType {
            op,
            expected: want.to_string(),
            got: t.dtype().to_string(),
        });
    }
    Ok(())
}

pub(crate) fn expect_len(op: &'static str, what: &str, t: &Tensor, len: usize) -> Result<()> {
    if t.numel() != len {
        return Err(crate::error::shape_err(
            op,
            format!(
                "{what} has shape {:?} ({} elements), expected {len}",
                t.shape(),
                t.numel()
            ),
        ));
    }
    Ok(())
}

/// Representative variants of every kernel entry point, for the naga validation and MSL
/// translation guard (`coop_sizes` lists the cooperative-matrix sizes to cover).
pub fn all_variants(coop_sizes: &[u32]) -> Vec<Kernel> {
    let mut v = Vec::new();
    v.extend(embedding::variants());
    v.extend(rmsnorm::variants());
    v.extend(matmul::variants(coop_sizes));
    v.extend(rope::variants());
    v.extend(activation::variants());
    v.extend(softmax::variants());
    v.extend(argmax::variants());
    v.extend(sample::variants());
    v.extend(logprobs::variants());
    v.extend(copy::variants());
    v.extend(attention::variants(coop_sizes));
    v.extend(fill::variants());
    v.extend(bias::variants());
    v.extend(moe::variants(coop_sizes));
    v
}
