//! `y = x W^T` with weights in Hugging Face layout `[N, K]` (f16, bf16 or f32) and f32
//! activations and accumulation. Four paths: a GEMV for decode-sized M (bandwidth bound),
//! a tiled subgroup-free GEMM for any shape, and where the adapter offers f16 matrices with
//! f32 accumulators a cooperative-matrix GEMM for prefill-sized M and a skinny one for
//! batches of a few to 4 fragments of rows (K split across subgroups).

use super::attention::{AttnShape, Partials};
use super::{coop_gemm_variants, expect_dtype, expect_len, wgsl, CoopSources};
use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;
use crate::weight::{Weight, WeightChunk};

const GEMV: &str = concat!(wgsl!("gemv_no_tail.wgsl"), include_str!("wgsl/gemv.wgsl"));
/// The GEMV with tail rows (`Tail`).
const GEMV_TAIL: &str = concat!(wgsl!("gemv_tail.wgsl"), include_str!("wgsl/gemv.wgsl"));
const GEMM: &str = wgsl!("gemm.wgsl");
/// The dense matrix GEMM by staging (scalar, vec4) and output (f32, vec4<f32>).
const GEMM_COOP: CoopSources = coop_gemm_variants!("gemm_coop.wgsl", "gemm_coop_dense.wgsl");
const GEMM_SKINNY_SCALAR: &str = concat!(
    wgsl!("gemm_coop_stage_scalar.wgsl"),
    include_str!("wgsl/gemm_skinny.wgsl")
);
const GEMM_SKINNY_VEC: &str = concat!(
    wgsl!("gemm_coop_stage_vec.wgsl"),
    include_str!("wgsl/gemm_skinny.wgsl")
);

/// Largest M the GEMV path can take (its accumulators live in registers: M x ROWS).
pub const GEMV_MAX_M: usize = 32;
/// Largest M the automatic choice gives the GEMV: on the H100 it beats the 128-row
/// cooperative-matrix tiles up to 32 rows (too few workgroups there; docs/performance.md).
pub const AUTO_GEMV_MAX_M: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// `auto_path`: the GEMV or the skinny matrix GEMM for decode-sized M, the
    /// cooperative-matrix GEMM above where offered, else the tiled GEMM.
    Auto,
    Gemv,
    Tiled,
    Coop,
    /// The cooperative-matrix GEMM for a few rows (gemm_skinny.wgsl), K split across
    /// subgroups, in row blocks of up to 4 fragments.
    Skinny,
}

/// Rows up to this many elements are short: a subgroup per row keeps every lane loading.
pub const SHORT_ROW: usize = 1024;

/// Work split of the GEMV: `wg` invocations per workgroup, `tpr` of them per weight row
/// (whole subgroups, so that no subgroup straddles two rows), `rpt` rows per row group.
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

    /// Whether the split works for `m` rows on subgroups of up to `subgroup` invocations
    /// (a row group must be whole subgroups, and one invocation writes each output of the
    /// workgroup: row groups x m x rpt of them).
    pub fn valid(self, m: usize, subgroup: u32) -> bool {
        self.tpr >= subgroup.max(1)
            && self.tpr.is_multiple_of(subgroup.max(1))
            && self.wg.is_multiple_of(self.tpr)
            && self.wg <= 256
            && self.rpt >= 1
            && m as u32 * self.rpt <= 64
            && self.wg / self.tpr * m as u32 * self.rpt <= self.wg
    }

    /// The default split, from the sweeps on the H100 / H200 (docs/performance.md): at
    /// M = 1, 128 invocations on 2 rows ran within 3% of the best split on every
    /// Qwen3-30B-A3B shape but the short-row expert down projection, where one subgroup
    /// per row (each lane 3 of the 96 vectors of a 768-wide f16 row) gives 71% of the copy
    /// roofline against 59%; up to M = 16, 64 invocations on 4 rows; above, 64 on 2 rows
    /// in workgroups of 256.
    pub fn for_shape(m: usize, k: usize) -> GemvConfig {
        if m <= 2 && k <= SHORT_ROW {
            GemvConfig {
                wg: 256,
                tpr: 32,
                rpt: 2,
            }
        } else if m <= 2 {
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

fn gemv_kernel(
    m: usize,
    c: GemvConfig,
    dtype: DType,
    norm: bool,
    accum: bool,
    tail: Option<bool>,
) -> Kernel {
    gemv_base(m, c, dtype, norm, accum, tail)
        .bool("SPLITX", false)
        .u32("HQ", 1)
        .u32("HG", 1)
        .u32("D", 4)
        .u32("MAXS", 1)
}

/// `tail`: with tail rows (`Tail`), accumulated into their output or not.
fn gemv_base(
    m: usize,
    c: GemvConfig,
    dtype: DType,
    norm: bool,
    accum: bool,
    tail: Option<bool>,
) -> Kernel {
    match tail {
        Some(a) => Kernel::new("gemv.wgsl+tail", GEMV_TAIL, "gemv").bool("TAIL_ACCUM", a),
        None => Kernel::new("gemv.wgsl", GEMV, "gemv"),
    }
    .u32("M", m as u32)
    .u32("WG", c.wg)
    .u32("TPR", c.tpr)
    .u32("RPT", c.rpt)
    .u32("W_DTYPE", dtype.float_code())
    .bool("NORM", norm)
    .bool("ACCUM", accum)
}

/// The GEMV whose x is decode attention's split-K partials (`gemv_partials`), for `shape`
/// and up to `max_splits` splits.
fn gemv_partials_kernel(
    m: usize,
    c: GemvConfig,
    dtype: DType,
    accum: bool,
    tail: Option<bool>,
    shape: AttnShape,
    max_splits: usize,
) -> Kernel {
    gemv_base(m, c, dtype, false, accum, tail)
        .bool("SPLITX", true)
        .u32("HQ", shape.q_heads as u32)
        .u32("HG", (shape.q_heads / shape.kv_heads.max(1)) as u32)
        .u32("D", shape.head_dim as u32)
        .u32("MAXS", max_splits as u32)
}

/// Most floats of the split weights `gemv_partials` keeps in workgroup memory (tokens x
/// query heads x splits held).
const PARTIAL_WEIGHTS: usize = 2048;

/// Most splits `gemv_partials` takes: every workgroup of the GEMV reads every split's
/// vector of x, so each split costs it what the reduce dispatch saves only up to about
/// three (Qwen3-30B-A3B's o_proj on the H100, GPU step against the reduce dispatch: 2
/// splits 4.10 -> 4.04 ms, 3 splits 4.16 -> 4.13, 9 splits 4.22 -> 4.56; workgroups of
/// 8 or 16 rows, which read x less often, did no better).
const PARTIAL_MAX_SPLITS: usize = 3;

/// Whether `gemv_partials` takes `p` times `w` (a decode-sized batch on the GEMV path with
/// few enough splits): else reduce the partials and use `matmul_fused`.
pub fn partials_fusable(p: &Partials, w: &Weight) -> bool {
    fusable(p.tokens, w) && w.k == p.shape.q_heads * p.shape.head_dim && partials_fit(p)
}

/// Whether the split weights of `p` fit the GEMV's workgroup memory.
pub fn partials_fit(p: &Partials) -> bool {
    p.splits <= PARTIAL_MAX_SPLITS
        && p.tokens * p.shape.q_heads * p.splits.next_power_of_two() <= PARTIAL_WEIGHTS
}

/// `y = x W^T` (`y += ..` with `accumulate`) where x is the attention output that `p`'s
/// split-K partials reduce to: the reduce folded into the GEMV (gemv.wgsl, SPLITX), so a
/// decode layer has no reduce dispatch; `tail` as in `Fusion`. An error where
/// `partials_fusable` is false.
pub fn gemv_partials(
    step: &mut Step,
    p: &Partials,
    w: &Weight,
    y: &Tensor,
    accumulate: bool,
    tail: Option<Tail>,
) -> Result<()> {
    if !partials_fusable(p, w) {
        return Err(shape_err(
            "matmul",
            format!(
                "GEMV over attention partials: {} tokens, {} splits, {:?} against [{}, {}]",
                p.tokens, p.splits, p.shape, w.n, w.k
            ),
        ));
    }
    let (m, k) = (p.tokens, w.k);
    expect_dtype("matmul", y, DType::F32)?;
    expect_len("matmul", "y", y, m * w.n)?;
    let mut cfg = GemvConfig::for_shape(m, k);
    if !cfg.valid(m, step.ctx.info.subgroup_max_size) {
        cfg = GemvConfig::for_shape(m, usize::MAX);
    }
    let kernel = |tail: Option<bool>| {
        gemv_partials_kernel(
            m,
            cfg,
            w.dtype,
            accumulate,
            tail,
            p.shape,
            p.splits.next_power_of_two(),
        )
    };
    let dummy = step.ctx.dummy()?.clone();
    let rpg = cfg.rows_per_group();
    for (i, c) in w.chunks.iter().enumerate() {
        let last = i + 1 == w.chunks.len();
        let (n_tail, tail_accum, tb) = tail_bindings(tail, last, m, w, false, &dummy)?;
        let params = [
            c.rows as u32,
            k as u32,
            c.row_start as u32,
            w.n as u32,
            0,
            p.shape.kv_heads as u32,
            p.splits as u32,
            n_tail as u32,
        ];
        let groups = grid(step.ctx, c.rows.div_ceil(rpg) + n_tail.div_ceil(rpg));
        let bindings = [&p.part, &c.tensor, y, &dummy, &p.ml, tb[0], tb[1], tb[2]];
        let used = if tail_accum.is_some() { 8 } else { 5 };
        step.dispatch(&kernel(tail_accum), &bindings[..used], &params, groups)?;
    }
    Ok(())
}

/// What a decode GEMV folds around its product (`matmul_fused`): the RMSNorm of its input
/// (x holds raw residual-stream rows; the product is with `rmsnorm(x) * weight`, with this
/// weight and eps), and the residual add of its output (y += the product).
#[derive(Clone, Copy, Debug, Default)]
pub struct Fusion<'a> {
    pub norm: Option<(&'a Tensor, f32)>,
    pub accumulate: bool,
    /// Rows of a second matrix in the same dispatch (GEMV path only).
    pub tail: Option<Tail<'a>>,
}

/// Rows of a second matrix that a decode GEMV computes beside its own, in the same
/// dispatch (gemv_tail.wgsl): `y (+)= x' W^T` with the GEMV's x, where x' is x scaled by
/// `norm` (without the 1/rms) when the GEMV folds a norm, else x as the GEMV sees it. `w`:
/// `[n, K]` in one chunk, of the GEMV's dtype and K; `y`: `[M, n]` f32. A decode
/// step's router halves ride on its qkv and o_proj GEMVs this way (`moe::router_fold`).
#[derive(Clone, Copy, Debug)]
pub struct Tail<'a> {
    pub w: &'a Weight,
    pub y: &'a Tensor,
    /// The tail's norm weight: present exactly when the GEMV folds a norm.
    pub norm: Option<&'a Tensor>,
    pub accumulate: bool,
}

impl<'a> Tail<'a> {
    /// Checks the tail against the GEMV's `m` rows of x times `w`, normed or not; its
    /// weight's one chunk.
    fn check(self, m: usize, w: &Weight, norm: bool) -> Result<&'a WeightChunk> {
        let [c] = self.w.chunks.as_slice() else {
            return Err(shape_err(
                "matmul tail",
                "tail weight in more than one chunk",
            ));
        };
        if self.w.k != w.k || self.w.dtype != w.dtype || self.norm.is_some() != norm {
            return Err(shape_err(
                "matmul tail",
                format!(
                    "tail [{}, {}] {} (norm {}) beside [{}, {}] {} (norm {norm})",
                    self.w.n,
                    self.w.k,
                    self.w.dtype,
                    self.norm.is_some(),
                    w.n,
                    w.k,
                    w.dtype
                ),
            ));
        }
        expect_dtype("matmul tail", self.y, DType::F32)?;
        expect_len("matmul tail", "y", self.y, m * self.w.n)?;
        if let Some(g) = self.norm {
            expect_dtype("matmul tail norm weight", g, DType::F32)?;
            expect_len("matmul tail", "norm weight", g, w.k)?;
        }
        Ok(c)
    }
}

/// The tail's share of one GEMV dispatch over a chunk of `w` (only the last chunk's
/// carries it): its rows, whether it accumulates (`None`: no tail), and bindings 5-7
/// (`fill` where unused).
fn tail_bindings<'a>(
    tail: Option<Tail<'a>>,
    last: bool,
    m: usize,
    w: &Weight,
    norm: bool,
    fill: &'a Tensor,
) -> Result<(usize, Option<bool>, [&'a Tensor; 3])> {
    match tail.filter(|_| last) {
        None => Ok((0, None, [fill; 3])),
        Some(t) => {
            let c = t.check(m, w, norm)?;
            let tensors = [&c.tensor, t.y, t.norm.unwrap_or(fill)];
            Ok((t.w.n, Some(t.accumulate), tensors))
        }
    }
}

/// Largest M `matmul_fused` takes: each token adds a sum of squares to the GEMV's
/// register accumulators.
pub const FUSED_MAX_M: usize = 16;

/// Whether `matmul_fused` runs for `m` rows of x times `w` (the GEMV path).
pub fn fusable(m: usize, w: &Weight) -> bool {
    m <= FUSED_MAX_M && gemv_ok(m, w)
}

/// `matmul` on the GEMV path with `f` folded in: a decode step's RMSNorm and residual add
/// without dispatches of their own. An error where the GEMV does not apply (`fusable`).
pub fn matmul_fused(step: &mut Step, x: &Tensor, w: &Weight, y: &Tensor, f: Fusion) -> Result<()> {
    let m = x.numel() / w.k.max(1);
    if !fusable(m, w) {
        return Err(shape_err(
            "matmul",
            format!(
                "fused GEMV needs M <= {FUSED_MAX_M} and K % 8 == 0; got M={m} K={}",
                w.k
            ),
        ));
    }
    if let Some((g, _)) = f.norm {
        expect_dtype("matmul norm weight", g, DType::F32)?;
        expect_len("matmul", "norm weight", g, w.k)?;
    }
    gemm_checked(step, x, w, y, fused_path(step, m, w), Tuning::default(), &f)
}

/// The path `matmul_fused` takes: the skinny matrix GEMM where `Auto` would, else the GEMV.
pub fn fused_path(step: &Step, m: usize, w: &Weight) -> MatmulPath {
    match auto_path(step, m, w) {
        MatmulPath::Skinny => MatmulPath::Skinny,
        _ => MatmulPath::Gemv,
    }
}

fn gemm_kernel(dtype: DType) -> Kernel {
    Kernel::new("gemm.wgsl", GEMM, "gemm").u32("W_DTYPE", dtype.float_code())
}

/// Variant of the cooperative-matrix GEMM (gemm_coop.wgsl): how slices are staged in
/// workgroup memory (`vec4<f16>`, a quarter of the stores, or scalars, which Metal's
/// simdgroup loads take), and how the workgroup tile of 8 S rows is cut among subgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopConfig {
    pub vec_staging: bool,
    /// Subgroups along N (two along M, each on 4 fragments of rows).
    pub sgn: u32,
    /// S x S fragments along N per subgroup: 2 or 4.
    pub frags_n: u32,
    /// 2: double-buffered slices (one barrier per slice, next loads in flight).
    pub stages: u32,
    /// Halves of padding per staged row (spreads fragment rows over banks).
    pub pad: u32,
    /// Depth of a staged slice: 32 or 64.
    pub bk: u32,
    /// Single-buffered, with the next slice's global loads held in registers while the
    /// current one multiplies (`stages` must be 1).
    pub prefetch: bool,
    /// Result tiles written out with subgroup barriers instead of workgroup barriers
    /// (each subgroup owns its staging tile).
    pub sub_epilogue: bool,
}

impl CoopConfig {
    /// 16x16 (Vulkan / NVIDIA): vector staging, 4 subgroups of 64 x 64, rows padded by 8
    /// halves and the next slice prefetched into registers, the best of the sweep on the
    /// H100 (160-206 TFLOP/s on the Qwen3-30B-A3B prefill shapes against 89-109 for 8
    /// subgroups of 64 x 32 unpadded; docs/performance.md). Apple's 8x8: scalar staging (what simdgroup loads take),
    /// 8 subgroups of 32 x 16, unpadded, until measured on a Mac.
    pub fn for_size(s: u32) -> CoopConfig {
        if s == 16 {
            CoopConfig {
                vec_staging: true,
                sgn: 2,
                frags_n: 4,
                stages: 1,
                pad: 8,
                bk: 32,
                prefetch: true,
                sub_epilogue: false,
            }
        } else {
            CoopConfig {
                vec_staging: false,
                sgn: 4,
                frags_n: 2,
                stages: 1,
                pad: 0,
                bk: 32,
                prefetch: false,
                sub_epilogue: false,
            }
        }
    }

    /// `for_size` for this device's fragments, with the subgroup-barrier epilogue where
    /// the device orders workgroup memory at a subgroup barrier (160-209 TFLOP/s against
    /// 148-204 without on the H100's prefill shapes; docs/performance.md).
    pub fn for_device(ctx: &GpuContext) -> CoopConfig {
        let s = frag_size(ctx);
        CoopConfig {
            sub_epilogue: ctx.subgroup_barrier_orders_shared(),
            ..CoopConfig::for_size(s)
        }
    }

    /// Invocations per workgroup (subgroups of 32).
    pub fn threads(&self) -> u32 {
        64 * self.sgn
    }

    /// Columns of one workgroup tile.
    pub fn tile_n(&self, s: u32) -> u32 {
        self.sgn * self.frags_n * s
    }

    /// Workgroup memory in bytes: staged slices plus one S x S f32 tile per subgroup.
    pub fn shared_bytes(&self, s: u32) -> u32 {
        let lds = self.bk + self.pad;
        self.stages * (8 * s + self.tile_n(s)) * lds * 2 + 2 * self.sgn * s * s * 4
    }

    /// Whether the kernel can be built with fragments of size `s` within `shared_limit`.
    pub fn valid(&self, s: u32, shared_limit: u32) -> bool {
        let t = self.threads();
        let unit = if self.vec_staging { 4 } else { 1 };
        self.sgn > 0
            && matches!(self.frags_n, 2 | 4)
            && (1..=2).contains(&self.stages)
            && !(self.prefetch && self.stages == 2)
            && matches!(self.bk, 32 | 64)
            && self.bk.is_multiple_of(s)
            && self.pad.is_multiple_of(unit.max(4))
            && (8 * s * self.bk / 4).is_multiple_of(t)
            && (self.tile_n(s) * self.bk / 8).is_multiple_of(t)
            && self.shared_bytes(s) <= shared_limit
    }

    /// The splits `bench kernels --coop-sweep` compares (the default first), each valid:
    /// around the default (the wider sweep of docs/performance.md ruled the rest out).
    pub fn sweep(s: u32, shared_limit: u32) -> Vec<CoopConfig> {
        let base = CoopConfig::for_size(s);
        let mut v = vec![base];
        let mut add = |c: CoopConfig| {
            if c.valid(s, shared_limit) && !v.contains(&c) {
                v.push(c);
            }
        };
        add(CoopConfig {
            vec_staging: !base.vec_staging,
            ..base
        });
        for (sgn, frags_n) in [(4, 2), (2, 4), (4, 4), (2, 2)] {
            for pad in [0, 4, 8] {
                add(CoopConfig {
                    sgn,
                    frags_n,
                    pad,
                    ..base
                });
            }
        }
        add(CoopConfig {
            prefetch: false,
            ..base
        });
        add(CoopConfig {
            stages: 2,
            prefetch: false,
            ..base
        });
        add(CoopConfig { bk: 64, ..base });
        add(CoopConfig {
            sub_epilogue: true,
            ..base
        });
        v
    }

    /// A short name for benchmark tables.
    pub fn label(&self) -> String {
        format!(
            "{}x{}{}{}{}{}{}{}",
            self.sgn,
            self.frags_n,
            if self.stages == 2 { "+db" } else { "" },
            if self.prefetch { "+pf" } else { "" },
            if self.bk != 32 { "+k64" } else { "" },
            if self.sub_epilogue { "+se" } else { "" },
            if self.pad > 0 {
                format!("+p{}", self.pad)
            } else {
                String::new()
            },
            if self.vec_staging { "" } else { "+sc" }
        )
    }
}

/// Explicit kernel variants for benchmark sweeps and tests; `None` takes the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuning {
    pub gemv: Option<GemvConfig>,
    pub coop: Option<CoopConfig>,
    pub skinny: Option<SkinnyConfig>,
}

/// Split of the skinny cooperative-matrix GEMM (gemm_skinny.wgsl): workgroups of `nsg`
/// subgroups own `frags_n` fragments of columns and a block of up to 4 fragments of rows,
/// and split K among their subgroups in slices `bk` deep, staged with rows `pad` halves
/// longer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkinnyConfig {
    pub frags_n: u32,
    pub nsg: u32,
    pub bk: u32,
    pub pad: u32,
}

impl SkinnyConfig {
    /// Fragments of rows in one row block of `m` rows: up to four.
    pub fn frags_m(s: u32, m: usize) -> u32 {
        (m as u32).div_ceil(s.max(1)).clamp(1, 4)
    }

    /// Row blocks (workgroups along z) that `m` rows take: one up to four fragments.
    pub fn row_blocks(s: u32, m: usize) -> u32 {
        (m as u32).div_ceil(Self::frags_m(s, m) * s.max(1))
    }

    /// Workgroup memory in bytes for `m` rows.
    pub fn shared_bytes(&self, s: u32, m: usize) -> u32 {
        let mr = Self::frags_m(s, m) * s;
        let bn = self.frags_n * s;
        let lds = self.bk + self.pad;
        let xl = mr * self.bk / 4 / 32;
        self.nsg * (mr + bn) * lds * 2 + self.nsg * mr * bn * 4 + self.nsg * xl * 32 * 4 + mr * 4
    }

    /// Whether the kernel can be built for `m` rows with fragments of size `s`.
    pub fn valid(&self, s: u32, m: usize, shared_limit: u32) -> bool {
        let fm = Self::frags_m(s, m);
        matches!(self.frags_n, 1 | 2)
            && matches!(self.nsg, 1 | 2 | 4 | 8)
            && matches!(self.bk, 32 | 64 | 128)
            && self.bk.is_multiple_of(s)
            && self.pad.is_multiple_of(4)
            && (fm * s * self.bk / 4).is_multiple_of(32)
            && (self.frags_n * s * self.bk / 8).is_multiple_of(32)
            && self.shared_bytes(s, m) <= shared_limit
    }

    /// The default split for `m` rows times a weight of `n` rows (`norm`: with the input
    /// RMSNorm folded in), within `shared_limit` bytes of workgroup memory. From the sweeps
    /// and step profiles on the H100 (docs/performance.md), the latency of a dependent
    /// call: one fragment of columns per workgroup. Without the norm, 128-deep slices (the
    /// most weight bytes in flight per subgroup) and K split four ways, two for a
    /// vocabulary (which has workgroups to spare). With it, whose sums of squares take
    /// registers of their own, 64-deep slices and K split two ways for qkv_proj-sized
    /// weights (256+ column fragments), four below. Eight for weights of fewer than 64
    /// column fragments either way. Where that overflows the workgroup memory (more
    /// fragments of rows, or Apple's 32 KiB), shallower slices, then fewer subgroups.
    pub fn for_shape(s: u32, m: usize, n: usize, norm: bool, shared_limit: u32) -> SkinnyConfig {
        let column_tiles = n / s as usize;
        let (mut nsg, depths): (u32, &[u32]) = if column_tiles < 64 {
            (8, &[64, 32])
        } else if norm {
            let nsg = if column_tiles >= 256 && Self::frags_m(s, m) == 1 {
                2
            } else {
                4
            };
            (nsg, &[64, 32])
        } else if n >= VOCAB_ROWS {
            (2, &[128, 64, 32])
        } else {
            (4, &[128, 64, 32])
        };
        loop {
            for &bk in depths {
                let c = SkinnyConfig {
                    frags_n: 1,
                    nsg,
                    bk,
                    pad: 8,
                };
                if c.valid(s, m, shared_limit) || (nsg == 1 && bk == 32) {
                    return c;
                }
            }
            nsg /= 2;
        }
    }

    /// The splits `bench kernels --skinny-sweep` compares (the default first), each valid.
    pub fn sweep(s: u32, m: usize, n: usize, shared_limit: u32) -> Vec<SkinnyConfig> {
        let base = SkinnyConfig::for_shape(s, m, n, false, shared_limit);
        let mut v = vec![base];
        for frags_n in [1, 2] {
            for nsg in [2, 4, 8] {
                for (bk, pad) in [(32, 8), (32, 0), (64, 8), (64, 0), (128, 8), (128, 0)] {
                    let c = SkinnyConfig {
                        frags_n,
                        nsg,
                        bk,
                        pad,
                    };
                    if c.valid(s, m, shared_limit) && !v.contains(&c) {
                        v.push(c);
                    }
                }
            }
        }
        v
    }

    /// A short name for benchmark tables.
    pub fn label(&self) -> String {
        format!(
            "fn{} sg{} k{} p{}",
            self.frags_n, self.nsg, self.bk, self.pad
        )
    }
}

fn skinny_kernel(
    s: u32,
    m: usize,
    c: SkinnyConfig,
    dtype: DType,
    sub_sync: bool,
    norm: bool,
    accum: bool,
) -> Kernel {
    let (name, src) = if CoopConfig::for_size(s).vec_staging {
        ("gemm_skinny.wgsl+vec", GEMM_SKINNY_VEC)
    } else {
        ("gemm_skinny.wgsl+scalar", GEMM_SKINNY_SCALAR)
    };
    Kernel::new(name, src, "gemm_skinny")
        .u32("S", s)
        .u32("FM", SkinnyConfig::frags_m(s, m))
        .u32("FN", c.frags_n)
        .u32("NSG", c.nsg)
        .u32("BK", c.bk)
        .u32("PAD", c.pad)
        .bool("SUB_SYNC", sub_sync)
        .bool("NORM", norm)
        .bool("ACCUM", accum)
        .u32("W_DTYPE", dtype.float_code())
        .alias("CA", format!("coop_mat{s}x{s}<f16, A>"))
        .alias("CB", format!("coop_mat{s}x{s}<f16, B>"))
        .alias("CC", format!("coop_mat{s}x{s}<f32, C>"))
        .coop()
}

/// `y4`: results stored as vec4<f32> (every row of y 16-byte aligned).
fn coop_kernel(s: u32, dtype: DType, c: CoopConfig, y4: bool) -> Kernel {
    coop_base(&GEMM_COOP, s, dtype, c, y4)
}

/// A kernel built on gemm_coop.wgsl with fragment size `s`, weight dtype `dtype`, split
/// `c` (whose staging picks the source) and vec4<f32> stores where `y4`.
pub(crate) fn coop_base(
    sources: &CoopSources,
    s: u32,
    dtype: DType,
    c: CoopConfig,
    y4: bool,
) -> Kernel {
    let (name, src) = sources[c.vec_staging as usize][y4 as usize];
    Kernel::new(name, src, "gemm_coop")
        .u32("S", s)
        .u32("SGN", c.sgn)
        .u32("FN", c.frags_n)
        .u32("STAGES", c.stages)
        .u32("PAD", c.pad)
        .u32("BK", c.bk)
        .bool("PREFETCH", c.prefetch)
        .bool("SUB_EPILOGUE", c.sub_epilogue)
        .u32("W_DTYPE", dtype.float_code())
        .alias("CA", format!("coop_mat{s}x{s}<f16, A>"))
        .alias("CB", format!("coop_mat{s}x{s}<f16, B>"))
        .alias("CC", format!("coop_mat{s}x{s}<f32, C>"))
        .coop()
}

/// The device's matrix fragment size (16 where none is offered: the launchers check
/// `coop_available` before they dispatch).
pub fn frag_size(ctx: &GpuContext) -> u32 {
    ctx.coop.map_or(16, |c| c.m)
}

/// Whether the cooperative-matrix GEMM runs here: matrices offered, subgroups of 32.
pub(crate) fn coop_available(step: &Step) -> bool {
    step.ctx.coop.is_some() && step.ctx.subgroup_is(32)
}

pub(crate) fn variants(coop_sizes: &[u32]) -> Vec<Kernel> {
    let mut v = vec![gemv_partials_kernel(
        1,
        GemvConfig::for_shape(1, 4096),
        DType::F16,
        true,
        None,
        AttnShape {
            q_heads: 32,
            kv_heads: 4,
            head_dim: 128,
        },
        4,
    )];
    for dt in [DType::F32, DType::F16, DType::BF16] {
        v.push(gemv_kernel(
            1,
            GemvConfig::for_shape(1, 2048),
            dt,
            false,
            false,
            None,
        ));
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
        false,
        false,
        None,
    ));
    v.push(gemv_kernel(
        32,
        GemvConfig::for_shape(32, 2048),
        DType::F16,
        false,
        false,
        None,
    ));
    v.push(gemv_kernel(
        1,
        GemvConfig::for_shape(1, 768),
        DType::F16,
        false,
        false,
        None,
    ));
    // The decode fusions: a normed input, an accumulated output, both, for each dtype.
    for dt in [DType::F32, DType::F16, DType::BF16] {
        for (norm, accum) in [(true, false), (false, true), (true, true)] {
            v.push(gemv_kernel(
                4,
                GemvConfig::for_shape(4, 2048),
                dt,
                norm,
                accum,
                None,
            ));
        }
    }
    // The tail rows of a decode step's qkv (normed) and o_proj (over attention
    // partials, accumulated) GEMVs.
    for dt in [DType::F32, DType::F16, DType::BF16] {
        v.push(gemv_kernel(
            1,
            GemvConfig::for_shape(1, 2048),
            dt,
            true,
            false,
            Some(false),
        ));
    }
    v.push(gemv_partials_kernel(
        1,
        GemvConfig::for_shape(1, 4096),
        DType::BF16,
        true,
        Some(true),
        AttnShape {
            q_heads: 16,
            kv_heads: 4,
            head_dim: 128,
        },
        2,
    ));
    v.push(gemv_kernel(
        3,
        GemvConfig {
            wg: 128,
            tpr: 128,
            rpt: 2,
        },
        DType::BF16,
        false,
        false,
        None,
    ));
    for &s in coop_sizes {
        for sub_epilogue in [false, true] {
            for dt in [DType::F16, DType::BF16] {
                for y4 in [false, true] {
                    let c = CoopConfig {
                        sub_epilogue,
                        ..CoopConfig::for_size(s)
                    };
                    v.push(coop_kernel(s, dt, c, y4));
                }
            }
        }
        for c in CoopConfig::sweep(s, 48 * 1024) {
            v.push(coop_kernel(s, DType::F16, c, true));
        }
        // The skinny GEMM: one to four fragments of rows, each fusion, both barriers.
        for m in [1, s as usize + 1, 3 * s as usize, 4 * s as usize] {
            for (norm, accum) in [(false, false), (true, false), (false, true)] {
                for sub_sync in [false, true] {
                    let c = SkinnyConfig::for_shape(s, m, 2048, norm, 48 * 1024);
                    v.push(skinny_kernel(s, m, c, DType::BF16, sub_sync, norm, accum));
                }
            }
            for c in SkinnyConfig::sweep(s, m, 2048, 48 * 1024) {
                v.push(skinny_kernel(s, m, c, DType::F16, true, true, false));
            }
        }
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

fn skinny_ok(step: &Step, m: usize, w: &Weight) -> bool {
    let s = frag_size(step.ctx);
    let limit = step.ctx.limits.max_compute_workgroup_storage_size;
    coop_ok(step, w) && skinny_fits(s, m, w.n, limit)
}

/// Whether the skinny GEMM's default splits (with and without a folded norm) for `m`
/// rows times a weight of `n` rows fit `shared_limit` bytes of workgroup memory with
/// fragments of `s`: where they do not, `Auto` takes another path.
pub fn skinny_fits(s: u32, m: usize, n: usize, shared_limit: u32) -> bool {
    m > 0
        && [false, true].into_iter().all(|norm| {
            SkinnyConfig::for_shape(s, m, n, norm, shared_limit).valid(s, m, shared_limit)
        })
}

/// Rows from which `Auto` takes the skinny matrix GEMM over the GEMV where it runs: on
/// the H100 the GEMV is as fast at 4 rows (faster on qkv_proj and the lm_head, slower
/// on o_proj) and up to 1.6x slower at 8 (docs/performance.md).
pub const SKINNY_MIN_M: usize = 6;

/// Rows up to which `Auto` takes the skinny GEMM (in row blocks of four fragments) over
/// the 128-row matrix tiles when those would run at most `SKINNY_COOP_WORKGROUPS`
/// workgroups; below `SKINNY_ALWAYS_M` rows, always. On the H100 (chained latency, us,
/// docs/performance.md): at 128 rows o_proj 68 against 141 (16 tiles), the expert shapes
/// 37 / 19 against 74 / 31 (12 / 16 tiles), but qkv_proj 92 against 74 (40 tiles); at
/// 256 rows o_proj 125 against 133 (32 tiles); from 384 rows the tiles win everywhere.
pub const SKINNY_MAX_M: usize = 256;
pub const SKINNY_ALWAYS_M: usize = 64;
pub const SKINNY_COOP_WORKGROUPS: usize = 32;

/// Whether `Auto` prefers the skinny GEMM to the matrix tiles for `m` rows times `w`.
fn skinny_preferred(step: &Step, m: usize, w: &Weight) -> bool {
    if !(SKINNY_MIN_M..=SKINNY_MAX_M).contains(&m) {
        return false;
    }
    if m <= SKINNY_ALWAYS_M {
        return true;
    }
    let s = frag_size(step.ctx) as usize;
    let tile_n = CoopConfig::for_device(step.ctx).tile_n(s as u32) as usize;
    w.n.div_ceil(tile_n) * m.div_ceil(8 * s) <= SKINNY_COOP_WORKGROUPS
}

/// Weights with at least this many rows (a vocabulary) have workgroups to spare: from 17
/// rows the 128-row matrix GEMM tiles beat the skinny GEMM on them (442 against 519 us for
/// the 151936-row lm_head at 32 rows on the H100).
pub const VOCAB_ROWS: usize = 32768;

/// The path `Auto` takes for this shape on this device.
pub fn auto_path(step: &Step, m: usize, w: &Weight) -> MatmulPath {
    if m > 16 && w.n >= VOCAB_ROWS && coop_ok(step, w) {
        MatmulPath::Coop
    } else if skinny_preferred(step, m, w) && skinny_ok(step, m, w) {
        MatmulPath::Skinny
    } else if m <= AUTO_GEMV_MAX_M && gemv_ok(m, w) {
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
    gemm_checked(step, x, w, y, path, tuning, &Fusion::default())
}

fn gemm_checked(
    step: &mut Step,
    x: &Tensor,
    w: &Weight,
    y: &Tensor,
    path: MatmulPath,
    tuning: Tuning,
    fusion: &Fusion,
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
        MatmulPath::Skinny if !skinny_ok(step, m, w) => {
            return Err(shape_err(
                "matmul",
                format!("skinny matrix GEMM unavailable for this device or M={m}"),
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
    if fusion.tail.is_some() && path != MatmulPath::Gemv {
        return Err(shape_err(
            "matmul",
            format!("tail rows need the GEMV path, not {path:?}"),
        ));
    }
    // The GEMV's and the skinny GEMM's norm binding: the norm weight, or a dummy.
    let eps = fusion.norm.map_or(0.0, |(_, e)| e).to_bits();
    let dummy;
    let g = match fusion.norm {
        Some((g, _)) => g,
        None => {
            dummy = step.ctx.dummy()?.clone();
            &dummy
        }
    };
    for (i, c) in w.chunks.iter().enumerate() {
        let n = c.rows as u32;
        match path {
            MatmulPath::Gemv => {
                let mut cfg = tuning.gemv.unwrap_or_else(|| GemvConfig::for_shape(m, k));
                if tuning.gemv.is_none() && !cfg.valid(m, step.ctx.info.subgroup_max_size) {
                    cfg = GemvConfig::for_shape(m, usize::MAX);
                }
                if !cfg.valid(m, step.ctx.info.subgroup_max_size) {
                    return Err(shape_err(
                        "matmul",
                        format!("invalid GEMV split {cfg:?} for M={m}"),
                    ));
                }
                let normed = fusion.norm.is_some();
                let last = i + 1 == w.chunks.len();
                let (n_tail, tail_accum, tb) = tail_bindings(fusion.tail, last, m, w, normed, g)?;
                let params = [
                    n,
                    k as u32,
                    c.row_start as u32,
                    w.n as u32,
                    eps,
                    0,
                    0,
                    n_tail as u32,
                ];
                let rpg = cfg.rows_per_group();
                let groups = grid(step.ctx, c.rows.div_ceil(rpg) + n_tail.div_ceil(rpg));
                let kernel = gemv_kernel(m, cfg, w.dtype, normed, fusion.accumulate, tail_accum);
                let bindings = [x, &c.tensor, y, g, g, tb[0], tb[1], tb[2]];
                let used = if tail_accum.is_some() { 8 } else { 5 };
                step.dispatch(&kernel, &bindings[..used], &params, groups)?;
            }
            MatmulPath::Skinny => {
                let s = frag_size(step.ctx);
                let limit = step.ctx.limits.max_compute_workgroup_storage_size;
                let cfg = tuning.skinny.unwrap_or_else(|| {
                    SkinnyConfig::for_shape(s, m, w.n, fusion.norm.is_some(), limit)
                });
                if !cfg.valid(s, m, limit) {
                    return Err(shape_err(
                        "matmul",
                        format!("invalid skinny GEMM split {cfg:?} for M={m}"),
                    ));
                }
                let params = [m as u32, n, k as u32, c.row_start as u32, w.n as u32, eps];
                let [gx, gy, _] = grid(step.ctx, c.rows.div_ceil((cfg.frags_n * s) as usize));
                let groups = [gx, gy, SkinnyConfig::row_blocks(s, m)];
                let kernel = skinny_kernel(
                    s,
                    m,
                    cfg,
                    w.dtype,
                    step.ctx.subgroup_barrier_orders_shared(),
                    fusion.norm.is_some(),
                    fusion.accumulate,
                );
                step.dispatch(&kernel, &[x, &c.tensor, y, g], &params, groups)?;
            }
            MatmulPath::Coop => {
                let s = frag_size(step.ctx);
                let cfg = tuning.coop.unwrap_or(CoopConfig::for_device(step.ctx));
                if !cfg.valid(s, step.ctx.limits.max_compute_workgroup_storage_size) {
                    return Err(shape_err(
                        "matmul",
                        format!("invalid cooperative-matrix split {cfg:?} for {s}x{s}"),
                    ));
                }
                let params = [m as u32, n, k as u32, c.row_start as u32, w.n as u32];
                let groups = [
                    c.rows.div_ceil(cfg.tile_n(s) as usize) as u32,
                    m.div_ceil(8 * s as usize) as u32,
                    1,
                ];
                // vec4 stores where every row of y starts 16-byte aligned.
                let y4 = w.n.is_multiple_of(4) && c.row_start.is_multiple_of(4);
                step.dispatch(
                    &coop_kernel(s, w.dtype, cfg, y4),
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
