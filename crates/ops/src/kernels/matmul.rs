//! `y = x W^T` with weights in Hugging Face layout `[N, K]` (f16, bf16 or f32) and f32
//! activations and accumulation. Three paths: a GEMV for decode-sized M (bandwidth bound),
//! a tiled subgroup-free GEMM for any shape, and a cooperative-matrix GEMM where the adapter
//! offers f16 matrices with f32 accumulators.

use super::{expect_dtype, expect_len, wgsl};
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;
use crate::weight::Weight;

const GEMV: &str = wgsl!("gemv.wgsl");
const GEMM: &str = wgsl!("gemm.wgsl");
const GEMM_COOP_SCALAR: &str = concat!(
    wgsl!("gemm_coop_stage_scalar.wgsl"),
    include_str!("wgsl/gemm_coop_dense.wgsl"),
    include_str!("wgsl/gemm_coop.wgsl")
);
const GEMM_COOP_VEC: &str = concat!(
    wgsl!("gemm_coop_stage_vec.wgsl"),
    include_str!("wgsl/gemm_coop_dense.wgsl"),
    include_str!("wgsl/gemm_coop.wgsl")
);

/// Largest M the GEMV path can take (its accumulators live in registers: M x ROWS).
pub const GEMV_MAX_M: usize = 32;
/// Largest M the automatic choice gives the GEMV: on the H100 it beats the 128-row
/// cooperative-matrix tiles up to 32 rows (too few workgroups there; docs/performance.md).
pub const AUTO_GEMV_MAX_M: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// GEMV for M <= 8, cooperative matrices above where offered, else the tiled GEMM.
    Auto,
    Gemv,
    Tiled,
    Coop,
}

/// Work split of the GEMV: `wg` invocations per workgroup, `tpr` of them per weight row
/// (>= 64 so that no subgroup straddles two rows), `rpt` rows per row group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvConfig {
    pub wg: u32,
    pub tpr: u32,
    pub rpt: u32,
}

impl GemvConfig {
    /// Rows one workgroup produces.
    pub fn rows_per_group(self) -> usize {
        (self.wg / self.tpr * self.rpt) as usize
    }

    fn valid(self, m: usize) -> bool {
        self.tpr >= 64
            && self.wg.is_multiple_of(self.tpr)
            && self.wg <= 256
            && self.rpt >= 1
            && m as u32 * self.rpt <= 64
    }

    /// The default split, from the sweeps on the H100 / H200 (docs/performance.md): at
    /// M = 1, 128 invocations on 2 rows ran within 3% of the best split on every
    /// Qwen3-30B-A3B shape; up to M = 16, 64 invocations on 4 rows; above, 64 on 2 rows
    /// in workgroups of 256.
    pub fn for_batch(m: usize) -> GemvConfig {
        if m <= 2 {
            GemvConfig {
                wg: 128,
                tpr: 128,
                rpt: 2,
            }
        } else if m <= 16 {
            GemvConfig {
                wg: 128,
                tpr: 64,
                rpt: 4,
            }
        } else {
            GemvConfig {
                wg: 256,
                tpr: 64,
                rpt: 2,
            }
        }
    }
}

fn gemv_kernel(m: usize, c: GemvConfig, dtype: DType) -> Kernel {
    Kernel::new("gemv.wgsl", GEMV, "gemv")
        .u32("M", m as u32)
        .u32("WG", c.wg)
        .u32("TPR", c.tpr)
        .u32("RPT", c.rpt)
        .u32("W_DTYPE", dtype.float_code())
}

fn gemm_kernel(dtype: DType) -> Kernel {
    Kernel::new("gemm.wgsl", GEMM, "gemm").u32("W_DTYPE", dtype.float_code())
}

/// Variant of the cooperative-matrix GEMM: stage slices in workgroup memory as `vec4<f16>`
/// (a quarter of the stores) or as scalars (what Metal's simdgroup loads take).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopConfig {
    pub vec_staging: bool,
}

impl CoopConfig {
    /// Vector staging where fragments are 16x16 (Vulkan / NVIDIA); scalar for Apple's 8x8.
    pub fn for_size(s: u32) -> CoopConfig {
        CoopConfig {
            vec_staging: s == 16,
        }
    }
}

/// Explicit kernel variants for benchmark sweeps and tests; `None` takes the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuning {
    pub gemv: Option<GemvConfig>,
    pub coop: Option<CoopConfig>,
}

fn coop_kernel(s: u32, dtype: DType, c: CoopConfig) -> Kernel {
    let (name, src) = if c.vec_staging {
        ("gemm_coop.wgsl+vec", GEMM_COOP_VEC)
    } else {
        ("gemm_coop.wgsl+scalar", GEMM_COOP_SCALAR)
    };
    coop_base(name, src, s, dtype)
}

/// A kernel built on gemm_coop.wgsl with fragment size `s` and weight dtype `dtype`.
pub(crate) fn coop_base(name: &'static str, src: &'static str, s: u32, dtype: DType) -> Kernel {
    Kernel::new(name, src, "gemm_coop")
        .u32("S", s)
        .u32("W_DTYPE", dtype.float_code())
        .alias("CA", format!("coop_mat{s}x{s}<f16, A>"))
        .alias("CB", format!("coop_mat{s}x{s}<f16, B>"))
        .alias("CC", format!("coop_mat{s}x{s}<f32, C>"))
        .coop()
}

/// Whether the cooperative-matrix GEMM runs here: matrices offered, subgroups of 32.
pub(crate) fn coop_available(step: &Step) -> bool {
    step.ctx.coop.is_some() && step.ctx.subgroup_is(32)
}

pub(crate) fn variants(coop_sizes: &[u32]) -> Vec<Kernel> {
    let mut v = Vec::new();
    for dt in [DType::F32, DType::F16, DType::BF16] {
        v.push(gemv_kernel(1, GemvConfig::for_batch(1), dt));
        v.push(gemm_kernel(dt));
    }
    v.push(gemv_kernel(
        8,
        GemvConfig {
            wg: 256,
            tpr: 64,
            rpt: 8,
        },
        DType::F16,
    ));
    v.push(gemv_kernel(32, GemvConfig::for_batch(32), DType::F16));
    v.push(gemv_kernel(
        3,
        GemvConfig {
            wg: 128,
            tpr: 128,
            rpt: 2,
        },
        DType::BF16,
    ));
    for &s in coop_sizes {
        v.push(coop_kernel(s, DType::F16, CoopConfig::for_size(s)));
        v.push(coop_kernel(s, DType::BF16, CoopConfig::for_size(s)));
    }
    v
}

fn gemv_ok(m: usize, w: &Weight) -> bool {
    let vec = if w.dtype == DType::F32 { 4 } else { 8 };
    m <= GEMV_MAX_M && w.k.is_multiple_of(vec)
}

fn coop_ok(step: &Step, w: &Weight) -> bool {
    coop_available(step) && w.dtype.is_half() && w.k.is_multiple_of(8)
}

/// The path `Auto` takes for this shape on this device.
pub fn auto_path(step: &Step, m: usize, w: &Weight) -> MatmulPath {
    if m <= AUTO_GEMV_MAX_M && gemv_ok(m, w) {
        MatmulPath::Gemv
    } else if coop_ok(step, w) {
        MatmulPath::Coop
    } else {
        MatmulPath::Tiled
    }
}

/// `y[M, N] = x[M, K] W[N, K]^T` by the automatic path.
pub fn matmul(step: &mut Step, x: &Tensor, w: &Weight, y: &Tensor) -> Result<()> {
    matmul_with(step, x, w, y, MatmulPath::Auto)
}

/// `matmul` by a chosen path (tests and benchmarks); an impossible choice is an error.
pub fn matmul_with(
    step: &mut Step,
    x: &Tensor,
    w: &Weight,
    y: &Tensor,
    path: MatmulPath,
) -> Result<()> {
    matmul_tuned(step, x, w, y, path, Tuning::default())
}

/// `matmul_with` with an explicit GEMV split (benchmark sweeps and tests of each split).
pub fn matmul_tuned(
    step: &mut Step,
    x: &Tensor,
    w: &Weight,
    y: &Tensor,
    path: MatmulPath,
    tuning: Tuning,
) -> Result<()> {
    expect_dtype("matmul", x, DType::F32)?;
    expect_dtype("matmul", y, DType::F32)?;
    let k = w.k;
    let m = x.numel() / k.max(1);
    expect_len("matmul", "x", x, m * k)?;
    expect_len("matmul", "y", y, m * w.n)?;
    if m == 0 {
        return Err(shape_err("matmul", "empty input"));
    }
    let path = match path {
        MatmulPath::Auto => auto_path(step, m, w),
        MatmulPath::Gemv if !gemv_ok(m, w) => {
            return Err(shape_err(
                "matmul",
                format!("GEMV needs M <= {GEMV_MAX_M} and K % 8 == 0; got M={m} K={k}"),
            ))
        }
        MatmulPath::Coop if !coop_ok(step, w) => {
            return Err(shape_err(
                "matmul",
                "cooperative-matrix GEMM unavailable for this device or shape",
            ))
        }
        p => p,
    };
    for c in &w.chunks {
        let n = c.rows as u32;
        match path {
            MatmulPath::Gemv => {
                let cfg = tuning.gemv.unwrap_or_else(|| GemvConfig::for_batch(m));
                if !cfg.valid(m) {
                    return Err(shape_err(
                        "matmul",
                        format!("invalid GEMV split {cfg:?} for M={m}"),
                    ));
                }
                let params = [n, k as u32, c.row_start as u32, w.n as u32];
                let groups = grid(step.ctx, c.rows.div_ceil(cfg.rows_per_group()));
                step.dispatch(
                    &gemv_kernel(m, cfg, w.dtype),
                    &[x, &c.tensor, y],
                    &params,
                    groups,
                )?;
            }
            MatmulPath::Coop => {
                let s = step.ctx.coop.map(|c| c.m).unwrap_or(16);
                let tile = (8 * s) as usize;
                let params = [m as u32, n, k as u32, c.row_start as u32, w.n as u32];
                let groups = [c.rows.div_ceil(tile) as u32, m.div_ceil(tile) as u32, 1];
                let cfg = tuning.coop.unwrap_or(CoopConfig::for_size(s));
                step.dispatch(
                    &coop_kernel(s, w.dtype, cfg),
                    &[x, &c.tensor, y],
                    &params,
                    groups,
                )?;
            }
            _ => {
                let params = [m as u32, n, k as u32, c.row_start as u32, w.n as u32];
                let groups = [c.rows.div_ceil(64) as u32, m.div_ceil(64) as u32, 1];
                step.dispatch(&gemm_kernel(w.dtype), &[x, &c.tensor, y], &params, groups)?;
            }
        }
    }
    Ok(())
}

pub mod cpu {
    /// `y = x W^T` in f64 accumulation; `w` is `[n, k]` as the kernel sees it (already
    /// rounded through its dtype).
    pub fn matmul(x: &[f32], w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let m = x.len() / k;
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            for j in 0..n {
                let wr = &w[j * k..(j + 1) * k];
                y[i * n + j] = xr
                    .iter()
                    .zip(wr)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }
}
