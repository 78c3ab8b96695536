//! Mixture-of-experts layers (Qwen3-MoE): routing, expert grouping and the grouped expert
//! GEMMs, all on the GPU with a fixed handful of dispatches per layer whatever the batch:
//!
//! 1. router GEMM (`matmul`): logits `[T, E]`;
//! 2. `moe_route`: softmax, top-k, renormalisation, and the token-expert pairs grouped by
//!    expert into row tiles (one workgroup, no CPU round trip);
//! 3. gate/up GEMM fused with SiLU-mul over the tiles (hidden rows gathered by token);
//! 4. down GEMM over the same tiles;
//! 5. `moe_combine`: the weighted sum of each token's k rows back in token order.
//!
//! A one-token decode step (`moe_add_normed` with `MoeScratch::down_combine`) routes inside
//! the gate/up GEMV (moe_gemv_routed) and runs 4 and 5 as one dispatch
//! (moe_down_combine.wgsl) added straight into the residual: three dispatches a layer, two
//! where the router rides on the attention's GEMVs (`router_fold`, `Logits::Folded`).
//!
//! Each chosen expert's weights are read once per tile (once per step when its tokens fit one
//! tile), and experts nobody chose cost nothing. Expert weights are stacks `[E * rows, K]`
//! chunked by whole experts (`Weight::upload_grouped`); steps 3 and 4 run once per chunk.

use super::matmul::{self, CoopConfig};
use super::{coop_gemm_variants, expect_dtype, expect_len, wgsl, CoopSources};
use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;
use crate::weight::{Weight, WeightChunk};

const ROUTE: &str = concat!(wgsl!("moe_route.wgsl"), include_str!("wgsl/moe_topk.wgsl"));
const GEMV: &str = concat!(
    wgsl!("moe_bindings.wgsl"),
    include_str!("wgsl/y_scalar.wgsl"),
    include_str!("wgsl/moe_topk.wgsl"),
    include_str!("wgsl/moe_gemv.wgsl")
);
const COMBINE: &str = wgsl!("moe_combine.wgsl");
const DOWN_COMBINE: &str = wgsl!("moe_down_combine.wgsl");
const ROUTER_FOLD: &str = wgsl!("router_fold.wgsl");
/// The experts' matrix GEMM by staging (scalar, vec4) and output (f32, vec4<f32>).
const COOP: CoopSources =
    coop_gemm_variants!("moe_coop.wgsl", "moe_bindings.wgsl", "moe_coop.wgsl");

/// Most experts the routing kernel's counters hold.
pub const MAX_EXPERTS: usize = 512;
/// Most experts per token.
pub const MAX_TOP_K: usize = 32;

/// Routing of a MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeShape {
    pub experts: usize,
    pub top_k: usize,
    /// Renormalise the chosen k probabilities to sum to one (`norm_topk_prob`).
    pub norm_topk: bool,
}

impl MoeShape {
    fn check(&self) -> Result<()> {
        if self.experts == 0 || self.experts > MAX_EXPERTS {
            return Err(shape_err(
                "moe",
                format!("{} experts (1..={MAX_EXPERTS} supported)", self.experts),
            ));
        }
        if self.top_k == 0 || self.top_k > self.experts.min(MAX_TOP_K) {
            return Err(shape_err(
                "moe",
                format!(
                    "top-k {} with {} experts (1..={} supported)",
                    self.top_k,
                    self.experts,
                    self.experts.min(MAX_TOP_K)
                ),
            ));
        }
        Ok(())
    }
}

/// The experts of one layer: `gate_up` stacks per expert `2F` rows of `[H]` with gate and up
/// interleaved (row `2f` = gate row `f`, `2f + 1` = up row `f`); `down` stacks `H` rows of
/// `[F]` per expert. Both are chunked by whole experts.
#[derive(Clone, Debug)]
pub struct ExpertWeights {
    pub experts: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub gate_up: Weight,
    pub down: Weight,
}

impl ExpertWeights {
    pub fn new(
        experts: usize,
        hidden: usize,
        ffn: usize,
        gate_up: Weight,
        down: Weight,
    ) -> Result<Self> {
        let ok = gate_up.n == experts * 2 * ffn
            && gate_up.k == hidden
            && down.n == experts * hidden
            && down.k == ffn
            && gate_up
                .chunks
                .iter()
                .all(|c| c.row_start % (2 * ffn) == 0 && c.rows % (2 * ffn) == 0)
            && down
                .chunks
                .iter()
                .all(|c| c.row_start % hidden == 0 && c.rows % hidden == 0);
        if !ok {
            return Err(shape_err(
                "moe experts",
                format!(
                    "{experts} experts of {hidden} -> {ffn}: gate_up [{}, {}], down [{}, {}] \
                     (chunks must hold whole experts)",
                    gate_up.n, gate_up.k, down.n, down.k
                ),
            ));
        }
        Ok(ExpertWeights {
            experts,
            hidden,
            ffn,
            gate_up,
            down,
        })
    }

    pub fn nbytes(&self) -> u64 {
        self.gate_up.nbytes() + self.down.nbytes()
    }

    /// Gate rows `[E, F, H]` and up rows `[E, F, H]` (Hugging Face order) interleaved into
    /// the `gate_up` stack's row order.
    pub fn interleave_gate_up(
        gate: &[f32],
        up: &[f32],
        experts: usize,
        ffn: usize,
        hidden: usize,
    ) -> Vec<f32> {
        let mut out = Vec::with_capacity(gate.len() * 2);
        for e in 0..experts {
            for f in 0..ffn {
                let r = (e * ffn + f) * hidden;
                out.extend_from_slice(&gate[r..r + hidden]);
                out.extend_from_slice(&up[r..r + hidden]);
            }
        }
        out
    }
}

/// Routing results of one step, all on the GPU.
pub struct Routing {
    pub tokens: usize,
    pub top_k: usize,
    /// Most rows per tile.
    pub tile: usize,
    /// `[T, k]` chosen experts in pick order (descending probability).
    pub topk_ids: Tensor,
    /// `[T, k]` their weights.
    pub topk_w: Tensor,
    /// `[T, k]` row of each pair in expert-sorted order.
    pub pair_pos: Tensor,
    /// `[T k]` token of each expert-sorted row.
    pub sorted: Tensor,
    /// `[1 + 3 max_tiles]`: tile count, then (expert, first row, end row) per tile.
    pub tiles: Tensor,
    pub max_tiles: usize,
}

/// How the grouped expert GEMMs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupedPath {
    /// Grouped GEMV: `mt` tokens accumulated together in registers (decode-sized groups).
    Gemv { mt: u32 },
    /// Cooperative-matrix tiles of 8 S x 8 S (prefill-sized groups), where offered.
    Coop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupedConfig {
    pub path: GroupedPath,
    /// Most rows of one routing tile (a tile is one workgroup row of the grid).
    pub tile: u32,
}

impl GroupedConfig {
    /// GEMV with one register batch when tokens rarely share an expert (decode), four with
    /// longer tiles as groups grow, and cooperative matrices once experts average 32 rows.
    pub fn auto(
        ctx: &GpuContext,
        tokens: usize,
        shape: &MoeShape,
        weights: DType,
    ) -> GroupedConfig {
        let pairs = tokens * shape.top_k;
        let coop = ctx
            .coop
            .filter(|_| ctx.subgroup_is(32) && weights.is_half());
        match coop {
            Some(c) if pairs >= 32 * shape.experts => GroupedConfig {
                path: GroupedPath::Coop,
                tile: 8 * c.m,
            },
            _ if pairs <= shape.experts => GroupedConfig {
                path: GroupedPath::Gemv { mt: 1 },
                tile: 8,
            },
            _ => GroupedConfig {
                path: GroupedPath::Gemv { mt: 4 },
                tile: 32,
            },
        }
    }

    /// The grouped GEMV with `mt` tokens per register batch and tiles of `tile` rows.
    pub fn gemv(mt: u32, tile: u32) -> GroupedConfig {
        GroupedConfig {
            path: GroupedPath::Gemv { mt },
            tile,
        }
    }
}

/// `vpl`: router logits each invocation of a routing subgroup holds in registers
/// (`route_vpl`).
/// `folded`: the logits lack each token's 1/rms (`Logits::Folded`).
fn route_kernel(vpl: u32, folded: bool) -> Kernel {
    Kernel::new("moe_route.wgsl", ROUTE, "moe_route")
        .u32("MAX_E", MAX_EXPERTS as u32)
        .u32("MAX_K", MAX_TOP_K as u32)
        .u32("VPL", vpl)
        .bool("LOGIT_RSTD", folded)
}

/// Logits per invocation for `experts` on this device's smallest subgroups, rounded up to
/// a power of two (few pipeline variants).
fn route_vpl(ctx: &GpuContext, experts: usize) -> u32 {
    let sg = ctx.info.subgroup_min_size.max(1) as usize;
    experts.div_ceil(sg).next_power_of_two() as u32
}

const GEMV_WG: u32 = 128;
const GEMV_RPT: u32 = 2;

/// Invocations per weight row of the grouped GEMV: a subgroup for short rows (as the
/// dense GEMV, matmul::SHORT_ROW) and for one token (the gate/up GEMV of a one-token step:
/// 4.50-4.52 -> 4.44-4.45 ms per Qwen3-30B-A3B decode step on the H100), else 64.
fn gemv_tpr(ctx: &GpuContext, k: usize, tokens: usize) -> u32 {
    if (k <= matmul::SHORT_ROW || tokens == 1) && ctx.info.subgroup_max_size <= 32 {
        32
    } else {
        64
    }
}

fn gemv_kernel(mt: u32, tpr: u32, dtype: DType, act: bool, gather: bool, norm: bool) -> Kernel {
    gemv_base("moe_gemv", mt, tpr, dtype, act, gather, norm)
        .u32("VPL", 1)
        .bool("LOGIT_RSTD", false)
}

/// The gate/up GEMV (+ SiLU-mul, folded RMSNorm) of one token that routes it itself;
/// `vpl` as for `route_kernel`; `folded`: from `Logits::Folded`.
fn routed_gate_up_kernel(tpr: u32, dtype: DType, vpl: u32, folded: bool) -> Kernel {
    gemv_base("moe_gemv_routed", 1, tpr, dtype, true, false, true)
        .u32("VPL", vpl)
        .bool("LOGIT_RSTD", folded)
}

fn gemv_base(
    entry: &'static str,
    mt: u32,
    tpr: u32,
    dtype: DType,
    act: bool,
    gather: bool,
    norm: bool,
) -> Kernel {
    Kernel::new("moe_gemv.wgsl", GEMV, entry)
        .u32("MAX_K", MAX_TOP_K as u32)
        .u32("MT", mt)
        .u32("WG", GEMV_WG)
        .u32("TPR", tpr)
        .u32("RPT", GEMV_RPT)
        .u32("W_DTYPE", dtype.float_code())
        .u32("ACT", act as u32)
        .u32("GATHER", gather as u32)
        .bool("NORM", norm)
}

/// `y4`: results stored as vec4<f32> (without ACT, and rows of a multiple of 4).
fn coop_kernel(s: u32, c: CoopConfig, dtype: DType, act: bool, gather: bool, y4: bool) -> Kernel {
    matmul::coop_base(&COOP, s, dtype, c, y4)
        .u32("ACT", act as u32)
        .u32("GATHER", gather as u32)
}

/// Rows per workgroup of the fused down + combine.
const DOWN_COMBINE_RPT: u32 = 2;

fn down_combine_kernel(tpr: u32, dtype: DType) -> Kernel {
    Kernel::new("moe_down_combine.wgsl", DOWN_COMBINE, "moe_down_combine")
        .u32("TPR", tpr)
        .u32("PG", 256 / tpr)
        .u32("RPT", DOWN_COMBINE_RPT)
        .u32("W_DTYPE", dtype.float_code())
}

fn router_fold_kernel(router: DType, o: DType) -> Kernel {
    Kernel::new("router_fold.wgsl", ROUTER_FOLD, "router_fold")
        .u32("R_DTYPE", router.float_code())
        .u32("O_DTYPE", o.float_code())
}

fn combine_kernel(accumulate: bool) -> Kernel {
    Kernel::new("moe_combine.wgsl", COMBINE, "moe_combine").bool("ACCUM", accumulate)
}

pub(crate) fn variants(coop_sizes: &[u32]) -> Vec<Kernel> {
    let mut v = vec![
        route_kernel(4, false),
        route_kernel(16, false),
        route_kernel(4, true),
        down_combine_kernel(32, DType::F16),
        down_combine_kernel(64, DType::BF16),
        down_combine_kernel(32, DType::F32),
        combine_kernel(false),
        combine_kernel(true),
        router_fold_kernel(DType::F16, DType::F16),
        router_fold_kernel(DType::F32, DType::BF16),
        router_fold_kernel(DType::BF16, DType::F32),
    ];
    for &s in coop_sizes {
        for sub_epilogue in [false, true] {
            let c = CoopConfig {
                sub_epilogue,
                ..CoopConfig::for_size(s)
            };
            v.push(coop_kernel(s, c, DType::F16, true, true, false));
            v.push(coop_kernel(s, c, DType::BF16, false, false, false));
            v.push(coop_kernel(s, c, DType::F16, false, true, true));
        }
    }
    for (mt, dt, act) in [
        (1, DType::F16, true),
        (1, DType::F16, false),
        (4, DType::BF16, true),
        (4, DType::BF16, false),
        (2, DType::F32, true),
    ] {
        v.push(gemv_kernel(mt, 64, dt, act, act, false));
        v.push(gemv_kernel(mt, 32, dt, act, act, false));
        v.push(gemv_kernel(mt, 32, dt, act, act, true));
    }
    v.push(routed_gate_up_kernel(32, DType::F16, 4, false));
    v.push(routed_gate_up_kernel(64, DType::BF16, 16, false));
    v.push(routed_gate_up_kernel(32, DType::F16, 4, true));
    v.push(routed_gate_up_kernel(32, DType::F32, 16, true));
    v
}

impl Routing {
    /// Buffers for routing `tokens` tokens into tiles of at most `tile` rows.
    pub fn new(ctx: &GpuContext, tokens: usize, shape: &MoeShape, tile: usize) -> Result<Routing> {
        shape.check()?;
        if tokens == 0 || tile == 0 {
            return Err(shape_err("moe route", "no tokens"));
        }
        let pairs = tokens * shape.top_k;
        // Each expert with rows adds at most one partial tile.
        let max_tiles = pairs.div_ceil(tile) + shape.experts.min(pairs);
        if max_tiles > ctx.limits.max_compute_workgroups_per_dimension as usize {
            return Err(shape_err(
                "moe route",
                format!("{tokens} tokens need {max_tiles} tiles; split the batch"),
            ));
        }
        Ok(Routing {
            tokens,
            top_k: shape.top_k,
            tile,
            topk_ids: ctx.empty(&[tokens, shape.top_k], DType::U32)?,
            topk_w: ctx.empty(&[tokens, shape.top_k], DType::F32)?,
            pair_pos: ctx.empty(&[tokens, shape.top_k], DType::U32)?,
            sorted: ctx.empty(&[pairs], DType::U32)?,
            tiles: ctx.empty(&[1 + 3 * max_tiles], DType::U32)?,
            max_tiles,
        })
    }
}

/// Routes `logits` `[T, E]`: top-k experts per token and their rows grouped by expert into
/// tiles of at most `tile` rows.
pub fn route(step: &mut Step, logits: &Tensor, shape: &MoeShape, tile: usize) -> Result<Routing> {
    let t = logits.numel() / shape.experts.max(1);
    let r = Routing::new(step.ctx, t, shape, tile)?;
    route_into(step, logits, shape, &r)?;
    Ok(r)
}

/// `route` into preallocated buffers.
pub fn route_into(step: &mut Step, logits: &Tensor, shape: &MoeShape, r: &Routing) -> Result<()> {
    route_scaled(step, logits, shape, r, None)
}

/// `route_into`; with `rstd_of` (the hidden rows `[T, H]` and the RMSNorm's eps) the logits
/// lack each token's 1/rms of its row (`Logits::Folded`) and the kernel applies it.
fn route_scaled(
    step: &mut Step,
    logits: &Tensor,
    shape: &MoeShape,
    r: &Routing,
    rstd_of: Option<(&Tensor, f32)>,
) -> Result<()> {
    shape.check()?;
    expect_dtype("moe route", logits, DType::F32)?;
    expect_len("moe route", "logits", logits, r.tokens * shape.experts)?;
    if r.top_k != shape.top_k {
        return Err(shape_err(
            "moe route",
            "routing buffers made for another top-k",
        ));
    }
    let dummy = step.ctx.dummy()?.clone();
    let (x, hidden, eps) = match rstd_of {
        Some((x, eps)) => {
            expect_dtype("moe route", x, DType::F32)?;
            let hidden = x.numel() / r.tokens.max(1);
            if hidden * r.tokens != x.numel() || !hidden.is_multiple_of(4) {
                return Err(shape_err(
                    "moe route",
                    format!("{} hidden values for {} tokens", x.numel(), r.tokens),
                ));
            }
            (x, hidden, eps)
        }
        None => (&dummy, 0, 0.0),
    };
    let params = [
        r.tokens as u32,
        shape.experts as u32,
        shape.top_k as u32,
        shape.norm_topk as u32,
        r.tile as u32,
        hidden as u32,
        eps.to_bits(),
    ];
    step.dispatch(
        &route_kernel(route_vpl(step.ctx, shape.experts), rstd_of.is_some()),
        &[
            logits,
            &r.topk_ids,
            &r.topk_w,
            &r.pair_pos,
            &r.sorted,
            &r.tiles,
            x,
        ],
        &params,
        [1, 1, 1],
    )
}

/// Intermediate buffers of a MoE MLP for one batch, reused by every MoE layer of a step.
pub struct MoeScratch {
    pub cfg: GroupedConfig,
    pub logits: Tensor,
    pub routing: Routing,
    /// `[T k, F]` SiLU(gate) * up per expert-sorted row.
    pub act: Tensor,
    /// `[T k, H]` down projection per expert-sorted row.
    pub rows: Tensor,
    /// `moe_add_normed` runs the down projection and the combine as one dispatch
    /// (`down_combine`); by default for a single token, whose grouped GEMV gains nothing
    /// from expert tiles.
    pub down_combine: bool,
}

impl MoeScratch {
    pub fn new(
        ctx: &GpuContext,
        tokens: usize,
        shape: &MoeShape,
        hidden: usize,
        ffn: usize,
        weights: DType,
        cfg: Option<GroupedConfig>,
    ) -> Result<MoeScratch> {
        let cfg = cfg.unwrap_or_else(|| GroupedConfig::auto(ctx, tokens, shape, weights));
        let pairs = tokens * shape.top_k;
        Ok(MoeScratch {
            cfg,
            logits: ctx.empty(&[tokens, shape.experts], DType::F32)?,
            routing: Routing::new(ctx, tokens, shape, cfg.tile as usize)?,
            act: ctx.empty(&[pairs, ffn], DType::F32)?,
            rows: ctx.empty(&[pairs, hidden], DType::F32)?,
            down_combine: tokens == 1,
        })
    }
}

/// One grouped GEMM over the routing tiles, once per expert chunk of `w`.
#[allow(clippy::too_many_arguments)]
fn grouped(
    step: &mut Step,
    x: &Tensor,
    w: &Weight,
    rows_per_expert: usize,
    r: &Routing,
    y: &Tensor,
    act: bool,
    gather: bool,
    cfg: GroupedConfig,
    norm: Option<(&Tensor, f32)>,
) -> Result<()> {
    let vec = if w.dtype == DType::F32 { 4 } else { 8 };
    if !w.k.is_multiple_of(vec) {
        return Err(shape_err(
            "moe gemm",
            format!(
                "{} expert weights need K % {vec} == 0; got K = {}",
                w.dtype, w.k
            ),
        ));
    }
    let (kernel, groups_x) = match cfg.path {
        GroupedPath::Gemv { mt } => {
            if mt == 0 || mt as usize * GEMV_RPT as usize > 64 {
                return Err(shape_err(
                    "moe gemm",
                    format!("{mt} tokens per register batch"),
                ));
            }
            let tpr = gemv_tpr(step.ctx, w.k, r.tokens);
            let rows_per_group = (GEMV_WG / tpr * GEMV_RPT) as usize;
            (
                gemv_kernel(mt, tpr, w.dtype, act, gather, norm.is_some()),
                rows_per_expert.div_ceil(rows_per_group),
            )
        }
        GroupedPath::Coop if norm.is_some() => {
            return Err(shape_err(
                "moe gemm",
                "a folded RMSNorm needs the GEMV path (decode-sized groups)",
            ))
        }
        GroupedPath::Coop => {
            let s = match step.ctx.coop {
                Some(c) if matmul::coop_available(step) && w.dtype.is_half() => c.m,
                _ => {
                    return Err(shape_err(
                        "moe gemm",
                        "cooperative-matrix path unavailable for this device or dtype",
                    ))
                }
            };
            if r.tile > 8 * s as usize {
                return Err(shape_err(
                    "moe gemm",
                    format!(
                        "tiles of {} rows exceed the {}-row matrix tile",
                        r.tile,
                        8 * s
                    ),
                ));
            }
            let c = CoopConfig::for_device(step.ctx);
            (
                coop_kernel(
                    s,
                    c,
                    w.dtype,
                    act,
                    gather,
                    !act && rows_per_expert.is_multiple_of(4),
                ),
                rows_per_expert.div_ceil(c.tile_n(s) as usize),
            )
        }
    };
    let gemv = matches!(cfg.path, GroupedPath::Gemv { .. });
    let dummy = step.ctx.dummy()?.clone();
    let norm_w = norm.map_or(&dummy, |(g, _)| g);
    for c in &w.chunks {
        let params = chunk_params(rows_per_expert, w.k, c, norm.map_or(0.0, |(_, e)| e), None);
        let mut b = vec![x, &c.tensor, y, &r.tiles, &r.sorted];
        if gemv {
            b.push(norm_w);
        }
        step.dispatch(
            &kernel,
            &b,
            &params,
            [groups_x as u32, r.max_tiles as u32, 1],
        )?;
    }
    Ok(())
}

/// The immediates of moe_bindings.wgsl for weight chunk `c` (whole experts of `rows`
/// rows of `k`): the routing fields only for moe_gemv_routed (`routed`).
fn chunk_params(
    rows: usize,
    k: usize,
    c: &WeightChunk,
    eps: f32,
    routed: Option<&MoeShape>,
) -> [u32; 8] {
    let (experts, top_k, norm_topk) =
        routed.map_or((0, 0, 0), |s| (s.experts, s.top_k, s.norm_topk as usize));
    [
        rows as u32,
        k as u32,
        (c.row_start / rows) as u32,
        (c.rows / rows) as u32,
        eps.to_bits(),
        experts as u32,
        top_k as u32,
        norm_topk as u32,
    ]
}

/// The whole MoE MLP of one layer: `y[T, H] = sum_j w_j down_j(silu(gate_j x) * up_j x)` for
/// `x` `[T, H]` (normed hidden states), with `router` `[E, H]`.
pub fn moe(
    step: &mut Step,
    x: &Tensor,
    router: &Weight,
    experts: &ExpertWeights,
    shape: &MoeShape,
    y: &Tensor,
) -> Result<()> {
    let t = x.numel() / experts.hidden.max(1);
    let scratch = MoeScratch::new(
        step.ctx,
        t,
        shape,
        experts.hidden,
        experts.ffn,
        experts.gate_up.dtype,
        None,
    )?;
    moe_with(step, x, router, experts, shape, &scratch, y)
}

/// `moe` with caller-owned scratch buffers (one set per step, shared by the layers).
pub fn moe_with(
    step: &mut Step,
    x: &Tensor,
    router: &Weight,
    experts: &ExpertWeights,
    shape: &MoeShape,
    scratch: &MoeScratch,
    y: &Tensor,
) -> Result<()> {
    moe_rows(step, x, router, experts, shape, scratch)?;
    combine(step, &scratch.rows, &scratch.routing, y)
}

/// Steps 2 to 5 of the MoE MLP, with the router logits already in `scratch.logits`.
pub fn experts_from_logits(
    step: &mut Step,
    x: &Tensor,
    experts: &ExpertWeights,
    shape: &MoeShape,
    s: &MoeScratch,
    y: &Tensor,
) -> Result<()> {
    let (h, f) = (experts.hidden, experts.ffn);
    let t = s.routing.tokens;
    expect_dtype("moe", x, DType::F32)?;
    expect_dtype("moe", y, DType::F32)?;
    expect_len("moe", "x", x, t * h)?;
    expect_len("moe", "y", y, t * h)?;
    expect_len("moe", "scratch rows", &s.rows, t * shape.top_k * h)?;
    expect_len("moe", "scratch act", &s.act, t * shape.top_k * f)?;
    expert_rows(step, x, experts, shape, s)?;
    combine(step, &s.rows, &s.routing, y)
}

/// Routing and the grouped expert GEMMs (steps 2 to 4), leaving each pair's output in
/// `s.rows` for `combine` or `combine_add_rmsnorm`; the router logits are in `s.logits`.
pub fn expert_rows(
    step: &mut Step,
    x: &Tensor,
    experts: &ExpertWeights,
    shape: &MoeShape,
    s: &MoeScratch,
) -> Result<()> {
    expert_rows_normed(step, x, None, experts, shape, s, false)
}

/// `folded`: `Logits::Folded` (needs `norm`).
fn expert_rows_normed(
    step: &mut Step,
    x: &Tensor,
    norm: Option<(&Tensor, f32)>,
    experts: &ExpertWeights,
    shape: &MoeShape,
    s: &MoeScratch,
    folded: bool,
) -> Result<()> {
    route_gate_up(step, x, norm, experts, shape, s, folded)?;
    grouped(
        step,
        &s.act,
        &experts.down,
        experts.hidden,
        &s.routing,
        &s.rows,
        false,
        false,
        s.cfg,
        None,
    )
}

/// Routing and the gate/up GEMM (+ SiLU-mul) into `s.act`; `folded`: `Logits::Folded`
/// (the logits lack x's 1/rms; needs `norm`).
fn route_gate_up(
    step: &mut Step,
    x: &Tensor,
    norm: Option<(&Tensor, f32)>,
    experts: &ExpertWeights,
    shape: &MoeShape,
    s: &MoeScratch,
    folded: bool,
) -> Result<()> {
    let rstd_of = match (folded, norm) {
        (false, _) => None,
        (true, Some((_, eps))) => Some((x, eps)),
        (true, None) => return Err(shape_err("moe", "folded router logits without a norm")),
    };
    route_scaled(step, &s.logits, shape, &s.routing, rstd_of)?;
    grouped(
        step,
        x,
        &experts.gate_up,
        2 * experts.ffn,
        &s.routing,
        &s.act,
        true,
        true,
        s.cfg,
        norm,
    )
}

/// The router carried through the attention's output projection, `F = R diag(g) W_o`
/// (`[E, K]` in o_proj's dtype) for the router `R` `[E, H]`, the post-attention RMSNorm
/// weight `g` `[H]` and o_proj `W_o` `[H, K]`, computed on the GPU (router_fold.wgsl).
/// With `h = h_prev + W_o a`, the router logits of `rmsnorm(h) * g` are
/// `rstd(h) (R diag(g) h_prev + F a)`: a decode step whose qkv and o_proj run on the GEMV
/// gets the two halves from them (`matmul::Tail`) and routes from their sum
/// (`moe_add_normed`'s `Logits::Folded`), without a router dispatch. `None` where it does
/// not apply: a router or o_proj in more than one chunk, or an odd K of f16 / bf16.
pub fn router_fold(
    ctx: &GpuContext,
    router: &Weight,
    norm: &Tensor,
    o: &Weight,
) -> Result<Option<Weight>> {
    let (h, k) = (o.n, o.k);
    if router.k != h {
        return Err(shape_err(
            "router fold",
            format!(
                "router [{}, {}] against o_proj [{h}, {k}]",
                router.n, router.k
            ),
        ));
    }
    expect_dtype("router fold", norm, DType::F32)?;
    expect_len("router fold", "norm weight", norm, h)?;
    let per_word = if o.dtype == DType::F32 { 1 } else { 2 };
    let ([r], [wo]) = (router.chunks.as_slice(), o.chunks.as_slice()) else {
        return Ok(None);
    };
    if !k.is_multiple_of(per_word) {
        return Ok(None);
    }
    let words = k / per_word;
    let out = ctx.persistent("router fold", &[router.n, k], o.dtype)?;
    let mut step = Step::new(ctx);
    step.dispatch(
        &router_fold_kernel(router.dtype, o.dtype),
        &[&r.tensor, norm, &wo.tensor, &out],
        &[router.n as u32, h as u32, words as u32],
        [words.div_ceil(64) as u32, router.n as u32, 1],
    )?;
    step.submit()?;
    Ok(Some(Weight {
        n: router.n,
        k,
        dtype: o.dtype,
        chunks: vec![WeightChunk {
            row_start: 0,
            rows: router.n,
            tensor: out,
        }],
    }))
}

/// Whether `moe_add_normed` runs for this layer and scratch: decode-sized batches, whose
/// router and expert GEMMs take the GEMV path.
pub fn fusable(router: &Weight, scratch: &MoeScratch) -> bool {
    matches!(scratch.cfg.path, GroupedPath::Gemv { .. })
        && matmul::fusable(scratch.routing.tokens, router)
}

/// Where `moe_add_normed` gets the router logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// From a router GEMV over the normed rows, into `MoeScratch::logits`.
    Router,
    /// `MoeScratch::logits` already holds `R diag(g) x`, the logits short of each token's
    /// 1/rms of x: the two halves of `router_fold` summed by the qkv and o_proj GEMVs' tail
    /// rows. The routing (inside the gate/up GEMV for one token, `moe_route` for more) finds
    /// the 1/rms itself.
    Folded,
}

/// The whole MoE layer of a decode step added into the residual stream:
/// `residual += moe(rmsnorm(residual) * norm_w)`, with the RMSNorm (`norm`: weight, eps)
/// folded into the router GEMV and the gate/up GEMV (see `fusable`), and the combine added
/// into `residual` by its own dispatch or, with `scratch.down_combine`, inside the down
/// projection. The layer needs no norm or add dispatch of its own, and with
/// `Logits::Folded` no router dispatch either.
#[allow(clippy::too_many_arguments)]
pub fn moe_add_normed(
    step: &mut Step,
    residual: &Tensor,
    norm: (&Tensor, f32),
    router: &Weight,
    experts: &ExpertWeights,
    shape: &MoeShape,
    scratch: &MoeScratch,
    logits: Logits,
) -> Result<()> {
    if !fusable(router, scratch) {
        return Err(shape_err(
            "moe",
            "a folded RMSNorm needs the GEMV paths (decode-sized batches)",
        ));
    }
    check_router(router, experts, shape)?;
    expect_dtype("moe", residual, DType::F32)?;
    expect_len("moe", "norm weight", norm.0, experts.hidden)?;
    expect_len(
        "moe",
        "residual",
        residual,
        scratch.routing.tokens * experts.hidden,
    )?;
    let folded = logits == Logits::Folded;
    if !folded {
        let f = matmul::Fusion {
            norm: Some(norm),
            ..Default::default()
        };
        matmul::matmul_fused(step, residual, router, &scratch.logits, f)?;
    }
    if scratch.down_combine {
        if scratch.routing.tokens == 1 {
            routed_gate_up(step, residual, norm, experts, shape, scratch, folded)?;
        } else {
            route_gate_up(step, residual, Some(norm), experts, shape, scratch, folded)?;
        }
        return down_combine(
            step,
            &scratch.act,
            &experts.down,
            &scratch.routing,
            residual,
        );
    }
    expert_rows_normed(step, residual, Some(norm), experts, shape, scratch, folded)?;
    combine_add(step, &scratch.rows, &scratch.routing, residual)
}

/// The gate/up GEMV (+ SiLU-mul) of one token with the RMSNorm folded in, routing the token
/// itself from `s.logits` (moe_gemv_routed; `folded`: `Logits::Folded`, the kernel finds
/// the 1/rms the logits lack): workgroup row j computes pick j's rows into
/// `s.act` row j and leaves the picks in `s.routing` (pair j at row j) for `down_combine`.
/// One dispatch per expert chunk, none for routing.
fn routed_gate_up(
    step: &mut Step,
    x: &Tensor,
    norm: (&Tensor, f32),
    experts: &ExpertWeights,
    shape: &MoeShape,
    s: &MoeScratch,
    folded: bool,
) -> Result<()> {
    let w = &experts.gate_up;
    let r = &s.routing;
    let vec = if w.dtype == DType::F32 { 4 } else { 8 };
    if r.tokens != 1 || !w.k.is_multiple_of(vec) {
        return Err(shape_err(
            "moe routed gate/up",
            format!(
                "one token and K % {vec} == 0; got {} tokens, K = {}",
                r.tokens, w.k
            ),
        ));
    }
    let rows = 2 * experts.ffn;
    let tpr = gemv_tpr(step.ctx, w.k, 1);
    let vpl = route_vpl(step.ctx, shape.experts);
    let kernel = routed_gate_up_kernel(tpr, w.dtype, vpl, folded);
    let groups_x = rows.div_ceil((GEMV_WG / tpr * GEMV_RPT) as usize) as u32;
    for c in &w.chunks {
        let params = chunk_params(rows, w.k, c, norm.1, Some(shape));
        step.dispatch_at(
            &kernel,
            &[
                (0, x),
                (1, &c.tensor),
                (2, &s.act),
                (4, &r.sorted),
                (5, norm.0),
                (6, &s.logits),
                (7, &r.topk_ids),
                (8, &r.topk_w),
                (9, &r.pair_pos),
            ],
            &params,
            [groups_x, shape.top_k as u32, 1],
        )?;
    }
    Ok(())
}

/// `y[t] += sum_j topk_w[t, j] down_{e_j}(act[pair_pos[t, j]])`: the down projection and the
/// combine in one dispatch per expert chunk (moe_down_combine.wgsl).
fn down_combine(step: &mut Step, act: &Tensor, w: &Weight, r: &Routing, y: &Tensor) -> Result<()> {
    let n = y.numel() / r.tokens;
    let vec = if w.dtype == DType::F32 { 4 } else { 8 };
    if !w.k.is_multiple_of(vec) || !w.n.is_multiple_of(n) {
        return Err(shape_err(
            "moe down + combine",
            format!("{} weights [{}, {}] for rows of {n}", w.dtype, w.n, w.k),
        ));
    }
    expect_len("moe down + combine", "act", act, r.tokens * r.top_k * w.k)?;
    let tpr = gemv_tpr(step.ctx, w.k, r.tokens);
    let kernel = down_combine_kernel(tpr, w.dtype);
    let groups = [
        n.div_ceil(DOWN_COMBINE_RPT as usize) as u32,
        r.tokens as u32,
        1,
    ];
    for c in &w.chunks {
        let params = [
            n as u32,
            w.k as u32,
            (c.row_start / n) as u32,
            (c.rows / n) as u32,
            r.top_k as u32,
            r.tokens as u32,
        ];
        step.dispatch(
            &kernel,
            &[act, &c.tensor, y, &r.topk_ids, &r.topk_w, &r.pair_pos],
            &params,
            groups,
        )?;
    }
    Ok(())
}

fn check_router(router: &Weight, experts: &ExpertWeights, shape: &MoeShape) -> Result<()> {
    if router.n != shape.experts || router.k != experts.hidden || experts.experts != shape.experts {
        return Err(shape_err(
            "moe",
            format!(
                "router [{}, {}] and {} experts for {} experts of hidden {}",
                router.n, router.k, experts.experts, shape.experts, experts.hidden
            ),
        ));
    }
    Ok(())
}

/// Router GEMM, routing and expert GEMMs of a MoE layer (everything but the combine), for
/// a caller that fuses the combine with what follows (`combine_add_rmsnorm`).
pub fn moe_rows(
    step: &mut Step,
    x: &Tensor,
    router: &Weight,
    experts: &ExpertWeights,
    shape: &MoeShape,
    scratch: &MoeScratch,
) -> Result<()> {
    check_router(router, experts, shape)?;
    expect_dtype("moe", x, DType::F32)?;
    matmul::matmul(step, x, router, &scratch.logits)?;
    expert_rows(step, x, experts, shape, scratch)
}

/// The combine fused with the residual add and the next RMSNorm, one dispatch:
/// `residual[t] += sum_j topk_w[t, j] rows[pair_pos[t, j]]; out = rmsnorm(residual) * w`.
pub fn combine_add_rmsnorm(
    step: &mut Step,
    rows: &Tensor,
    r: &Routing,
    residual: &Tensor,
    w: &Tensor,
    eps: f32,
    out: &Tensor,
) -> Result<()> {
    let h = w.numel();
    expect_dtype("moe combine + rmsnorm", residual, DType::F32)?;
    expect_len(
        "moe combine + rmsnorm",
        "rows",
        rows,
        r.tokens * r.top_k * h,
    )?;
    expect_len("moe combine + rmsnorm", "residual", residual, r.tokens * h)?;
    expect_len("moe combine + rmsnorm", "out", out, r.tokens * h)?;
    let params = [r.tokens as u32, h as u32, eps.to_bits()];
    step.dispatch_at(
        &super::rmsnorm::moe_kernel(r.top_k),
        &[
            (0, rows),
            (1, residual),
            (2, w),
            (3, out),
            (4, &r.topk_w),
            (5, &r.pair_pos),
        ],
        &params,
        grid(step.ctx, r.tokens),
    )
}

/// `y[t] = sum_j topk_w[t, j] rows[pair_pos[t, j]]`.
pub fn combine(step: &mut Step, rows: &Tensor, r: &Routing, y: &Tensor) -> Result<()> {
    combine_into(step, rows, r, y, false)
}

/// `combine` added into `residual` (`residual[t] += sum_j topk_w[t, j] rows[pair_pos[t, j]]`):
/// the end of a decode step's MoE layer whose next RMSNorm is folded into the next GEMV.
pub fn combine_add(step: &mut Step, rows: &Tensor, r: &Routing, residual: &Tensor) -> Result<()> {
    combine_into(step, rows, r, residual, true)
}

fn combine_into(
    step: &mut Step,
    rows: &Tensor,
    r: &Routing,
    y: &Tensor,
    accumulate: bool,
) -> Result<()> {
    let h = y.numel() / r.tokens;
    expect_len("moe combine", "rows", rows, r.tokens * r.top_k * h)?;
    let params = [r.tokens as u32, h as u32, r.top_k as u32];
    step.dispatch(
        &combine_kernel(accumulate),
        &[rows, &r.topk_w, &r.pair_pos, y],
        &params,
        grid(step.ctx, (r.tokens * h).div_ceil(256)),
    )
}

pub mod cpu {
    /// Top-k of softmax(logits) per token: (expert ids, weights), ties to the lower index,
    /// renormalised over the k when `norm`.
    pub fn route(logits: &[f32], experts: usize, k: usize, norm: bool) -> (Vec<u32>, Vec<f32>) {
        let mut ids = Vec::new();
        let mut ws = Vec::new();
        for row in logits.chunks(experts) {
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let total: f64 = row.iter().map(|v| (*v as f64 - mx).exp()).sum();
            let mut order: Vec<usize> = (0..experts).collect();
            // Stable sort: equal logits keep ascending expert order.
            order.sort_by(|&a, &b| {
                row[b]
                    .partial_cmp(&row[a])
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            let picked = &order[..k];
            let chosen: f64 = picked.iter().map(|&e| (row[e] as f64 - mx).exp()).sum();
            let denom = if norm { chosen } else { total };
            for &e in picked {
                ids.push(e as u32);
                ws.push(((row[e] as f64 - mx).exp() / denom) as f32);
            }
        }
        (ids, ws)
    }

    /// The MoE MLP with Hugging Face-layout expert weights: `gate`/`up` `[E, F, H]`,
    /// `down` `[E, H, F]`, routing given.
    #[allow(clippy::too_many_arguments)]
    pub fn experts(
        x: &[f32],
        ids: &[u32],
        ws: &[f32],
        k: usize,
        gate: &[f32],
        up: &[f32],
        down: &[f32],
        h: usize,
        f: usize,
    ) -> Vec<f32> {
        let t = x.len() / h;
        let mut y = vec![0f32; t * h];
        for ti in 0..t {
            let xr = &x[ti * h..(ti + 1) * h];
            let mut acc = vec![0f64; h];
            for j in 0..k {
                let e = ids[ti * k + j] as usize;
                let dot = |w: &[f32], row: usize, len: usize, v: &[f64]| -> f64 {
                    w[row * len..(row + 1) * len]
                        .iter()
                        .zip(v)
                        .map(|(a, b)| *a as f64 * b)
                        .sum()
                };
                let xd: Vec<f64> = xr.iter().map(|v| *v as f64).collect();
                let a: Vec<f64> = (0..f)
                    .map(|fi| {
                        let g = dot(gate, e * f + fi, h, &xd);
                        let u = dot(up, e * f + fi, h, &xd);
                        g / (1.0 + (-g).exp()) * u
                    })
                    .collect();
                for (hi, o) in acc.iter_mut().enumerate() {
                    *o += ws[ti * k + j] as f64 * dot(down, e * h + hi, f, &a);
                }
            }
            for (o, a) in y[ti * h..(ti + 1) * h].iter_mut().zip(acc) {
                *o = a as f32;
            }
        }
        y
    }
}
