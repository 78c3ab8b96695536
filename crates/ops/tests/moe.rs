//! Mixture-of-experts kernels against the CPU reference: routing (top-k, ties,
//! renormalisation, grouping into tiles) and the whole expert MLP under uniform and skewed
//! routing, experts nobody chose, batches from 1 to 300, and experts split over chunks.

mod common;

use common::{assert_close, ctx, randn, rng};
use vllm_apple_ops::kernels::moe::{
    self, ExpertWeights, GroupedConfig, GroupedPath, MoeScratch, MoeShape, Routing,
};
use vllm_apple_ops::{DType, Step, Weight};

/// Checks the grouping invariants: every pair has one expert-sorted row, rows of one expert
/// are contiguous, in expert order, and tiles cover them in pieces of at most `tile` rows.
fn check_grouping(r: &Routing, ids: &[u32], experts: usize, tile: usize) {
    let ctx = ctx();
    let k = r.top_k;
    let pos = r.pair_pos.to_u32_vec(ctx).unwrap();
    let sorted = r.sorted.to_u32_vec(ctx).unwrap();
    let tiles = r.tiles.to_u32_vec(ctx).unwrap();
    let pairs = ids.len();
    let mut seen = vec![false; pairs];
    for (pair, &row) in pos.iter().enumerate() {
        let row = row as usize;
        assert!(
            row < pairs && !seen[row],
            "pair {pair}: row {row} reused or out of range"
        );
        seen[row] = true;
        assert_eq!(
            sorted[row] as usize,
            pair / k,
            "row {row} reads the wrong token"
        );
    }
    // Expert of each sorted row, from the pairs.
    let mut row_expert = vec![0u32; pairs];
    for (pair, &row) in pos.iter().enumerate() {
        row_expert[row as usize] = ids[pair];
    }
    assert!(
        row_expert.windows(2).all(|w| w[0] <= w[1]),
        "rows not grouped by expert"
    );
    let n = tiles[0] as usize;
    assert!(n <= r.max_tiles);
    let mut next = 0u32;
    for i in 0..n {
        let (e, first, end) = (tiles[1 + 3 * i], tiles[2 + 3 * i], tiles[3 + 3 * i]);
        assert_eq!(first, next, "tile {i} leaves a gap");
        assert!(
            end > first && (end - first) as usize <= tile,
            "tile {i}: {first}..{end}"
        );
        assert!((e as usize) < experts);
        for row in first..end {
            assert_eq!(row_expert[row as usize], e, "tile {i} mixes experts");
        }
        next = end;
    }
    assert_eq!(next as usize, pairs, "tiles do not cover every row");
}

fn run_route(logits: &[f32], shape: &MoeShape, tile: usize) -> (Vec<u32>, Vec<f32>) {
    let ctx = ctx();
    let t = logits.len() / shape.experts;
    let lt = ctx
        .upload_f32(&[t, shape.experts], DType::F32, logits)
        .unwrap();
    let mut s = Step::new(ctx);
    let r = moe::route(&mut s, &lt, shape, tile).unwrap();
    s.submit_and_wait().unwrap();
    let ids = r.topk_ids.to_u32_vec(ctx).unwrap();
    let ws = r.topk_w.to_f32_vec(ctx).unwrap();
    check_grouping(&r, &ids, shape.experts, tile);
    (ids, ws)
}

#[test]
fn routing_matches_cpu() {
    let mut r = rng(40);
    for (t, e, k, norm, tile) in [
        (1usize, 128usize, 8usize, true, 8usize),
        (3, 16, 4, false, 8),
        (17, 64, 8, true, 5),
        (300, 128, 8, true, 32),
        (5, 8, 8, false, 3), // k == E: every expert
        (9, 300, 1, false, 4),
    ] {
        let shape = MoeShape {
            experts: e,
            top_k: k,
            norm_topk: norm,
        };
        let logits = randn(&mut r, t * e, 4.0);
        let (ids, ws) = run_route(&logits, &shape, tile);
        let (want_ids, want_ws) = moe::cpu::route(&logits, e, k, norm);
        assert_eq!(ids, want_ids, "T={t} E={e} k={k}");
        assert_close(
            &format!("route weights T={t} E={e} k={k}"),
            &ws,
            &want_ws,
            1e-5,
        );
    }
}

#[test]
fn routing_breaks_ties_toward_lower_experts() {
    // All equal: experts 0..k; a tie across the k-th place; a tie between the top two.
    let e = 12;
    let mut logits = vec![0.5f32; e];
    let mut row = vec![0.0f32; e];
    row[7] = 2.0;
    row[3] = 1.0;
    row[9] = 1.0;
    row[11] = 1.0;
    logits.extend(&row);
    let mut row = vec![-1.0f32; e];
    row[10] = 3.0;
    row[2] = 3.0;
    logits.extend(&row);
    let shape = MoeShape {
        experts: e,
        top_k: 3,
        norm_topk: true,
    };
    let (ids, ws) = run_route(&logits, &shape, 4);
    assert_eq!(ids, vec![0, 1, 2, 7, 3, 9, 2, 10, 0]);
    let (want_ids, want_ws) = moe::cpu::route(&logits, e, 3, true);
    assert_eq!(ids, want_ids);
    assert_close("tied weights", &ws, &want_ws, 1e-6);
}

#[test]
fn single_token_routing_ties_and_nan() {
    // The one-token path (a subgroup ranks the picks by expert): ties as the batch path,
    // and a row of NaN logits still gives every pick its own row and tile.
    let e = 12;
    let mut row = vec![0.0f32; e];
    row[7] = 2.0;
    row[3] = 1.0;
    row[9] = 1.0;
    row[11] = 1.0;
    let shape = MoeShape {
        experts: e,
        top_k: 3,
        norm_topk: true,
    };
    let (ids, ws) = run_route(&row, &shape, 4);
    assert_eq!(ids, vec![7, 3, 9]);
    let (_, want_ws) = moe::cpu::route(&row, e, 3, true);
    assert_close("tied weights, one token", &ws, &want_ws, 1e-6);
    // NaN everywhere: picks collapse onto one clamped expert; rows stay distinct
    // (run_route checks the grouping invariants).
    let (ids, _) = run_route(&vec![f32::NAN; e], &shape, 4);
    assert!(ids.iter().all(|&i| (i as usize) < e));
}

struct Experts {
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
    gpu: ExpertWeights,
}

fn experts(
    e: usize,
    h: usize,
    f: usize,
    dtype: DType,
    experts_per_chunk: usize,
    seed: u64,
) -> Experts {
    let ctx = ctx();
    let mut r = rng(seed);
    let gate = dtype.round_trip(&randn(&mut r, e * f * h, 0.3));
    let up = dtype.round_trip(&randn(&mut r, e * f * h, 0.3));
    let down = dtype.round_trip(&randn(&mut r, e * h * f, 0.3));
    let gu = ExpertWeights::interleave_gate_up(&gate, &up, e, f, h);
    let chunk = |rows: usize, k: usize| (experts_per_chunk * rows * k * dtype.size()) as u64;
    let gate_up = Weight::upload_grouped(
        ctx,
        "gate_up",
        e * 2 * f,
        h,
        dtype,
        &dtype.encode_f32(&gu),
        2 * f,
        chunk(2 * f, h),
    )
    .unwrap();
    let down_w = Weight::upload_grouped(
        ctx,
        "down",
        e * h,
        f,
        dtype,
        &dtype.encode_f32(&down),
        h,
        chunk(h, f),
    )
    .unwrap();
    assert_eq!(gate_up.chunks.len(), e.div_ceil(experts_per_chunk));
    Experts {
        gpu: ExpertWeights::new(e, h, f, gate_up, down_w).unwrap(),
        gate,
        up,
        down,
    }
}

/// The expert MLP from given logits against the CPU reference.
fn check_moe(
    what: &str,
    x: &[f32],
    logits: &[f32],
    shape: &MoeShape,
    w: &Experts,
    cfg: Option<GroupedConfig>,
) {
    check_moe_tol(what, x, logits, shape, w, cfg, 2e-4);
}

fn check_moe_tol(
    what: &str,
    x: &[f32],
    logits: &[f32],
    shape: &MoeShape,
    w: &Experts,
    cfg: Option<GroupedConfig>,
    tol: f64,
) {
    let ctx = ctx();
    let (h, f) = (w.gpu.hidden, w.gpu.ffn);
    let t = x.len() / h;
    let xt = ctx.upload_f32(&[t, h], DType::F32, x).unwrap();
    let scratch = MoeScratch::new(ctx, t, shape, h, f, w.gpu.gate_up.dtype, cfg).unwrap();
    scratch.logits.write_f32(ctx, logits).unwrap();
    let y = ctx.empty(&[t, h], DType::F32).unwrap();
    y.poison(ctx);
    let mut s = Step::new(ctx);
    moe::experts_from_logits(&mut s, &xt, &w.gpu, shape, &scratch, &y).unwrap();
    s.submit_and_wait().unwrap();
    let (ids, ws) = moe::cpu::route(logits, shape.experts, shape.top_k, shape.norm_topk);
    let want = moe::cpu::experts(x, &ids, &ws, shape.top_k, &w.gate, &w.up, &w.down, h, f);
    assert_close(what, &y.to_f32_vec(ctx).unwrap(), &want, tol);
}

#[test]
fn expert_mlp_matches_cpu_across_batches_and_chunks() {
    let mut r = rng(41);
    let (h, f) = (72, 40);
    for (e, k, chunk, dtype) in [
        (16usize, 4usize, 16usize, DType::F16),
        (40, 8, 7, DType::BF16),
    ] {
        let w = experts(e, h, f, dtype, chunk, 42 + e as u64);
        let shape = MoeShape {
            experts: e,
            top_k: k,
            norm_topk: e == 16,
        };
        for t in [1usize, 3, 17, 300] {
            let x = randn(&mut r, t * h, 1.0);
            let logits = randn(&mut r, t * e, 3.0);
            for cfg in [
                None,
                Some(GroupedConfig::gemv(4, 6)),
                Some(GroupedConfig::gemv(1, 64)),
            ] {
                // The automatic choice may be the cooperative-matrix path (f16 activations).
                let coop = cfg
                    .unwrap_or_else(|| GroupedConfig::auto(ctx(), t, &shape, dtype))
                    .path
                    == GroupedPath::Coop;
                check_moe_tol(
                    &format!("E={e} k={k} T={t} {cfg:?}"),
                    &x,
                    &logits,
                    &shape,
                    &w,
                    cfg,
                    if coop { 4e-3 } else { 2e-4 },
                );
            }
        }
    }
}

/// The cooperative-matrix path (prefill-sized groups) where the adapter offers it: the H100
/// (16x16) and Apple GPUs (8x8); lavapipe has no matrices and skips it.
#[test]
fn expert_mlp_cooperative_matrix_path() {
    let ctx = ctx();
    let Some(c) = ctx.coop.filter(|_| ctx.subgroup_is(32)) else {
        eprintln!("no cooperative matrices with subgroups of 32 here: path not run");
        return;
    };
    let mut r = rng(47);
    let (h, f) = (200, 72);
    for (e, k, chunk, dtype) in [
        (16usize, 4usize, 5usize, DType::F16),
        (8, 2, 8, DType::BF16),
    ] {
        let w = experts(e, h, f, dtype, chunk, 48 + e as u64);
        let shape = MoeShape {
            experts: e,
            top_k: k,
            norm_topk: true,
        };
        for t in [1usize, 37, 300] {
            let x = randn(&mut r, t * h, 1.0);
            let mut logits = randn(&mut r, t * e, 3.0);
            if t == 300 {
                for row in logits.chunks_mut(e) {
                    row[3] = 20.0; // 300 rows on one expert: three tiles
                }
            }
            for tile in [8 * c.m, 40] {
                let cfg = GroupedConfig {
                    path: GroupedPath::Coop,
                    tile,
                };
                // Activations are rounded to f16 before the product.
                check_moe_tol(
                    &format!("coop E={e} T={t} tile={tile}"),
                    &x,
                    &logits,
                    &shape,
                    &w,
                    Some(cfg),
                    4e-3,
                );
            }
        }
    }
}

#[test]
fn expert_mlp_with_skewed_routing() {
    let mut r = rng(43);
    let (h, f, e) = (64, 24, 32);
    let w = experts(e, h, f, DType::F16, 5, 44);
    let shape = MoeShape {
        experts: e,
        top_k: 2,
        norm_topk: true,
    };
    for t in [1usize, 8, 150] {
        let x = randn(&mut r, t * h, 1.0);
        // Every token's first choice is expert 13; most experts are never chosen.
        let mut logits = randn(&mut r, t * e, 0.5);
        for row in logits.chunks_mut(e) {
            row[13] = 10.0;
            row[30] += 5.0;
        }
        check_moe(&format!("skewed T={t}"), &x, &logits, &shape, &w, None);
        // Exactly tied logits everywhere: experts 0 and 1 take every token.
        let tied = vec![0.25f32; t * e];
        check_moe(&format!("tied T={t}"), &x, &tied, &shape, &w, None);
    }
}

#[test]
fn moe_layer_with_router_gemm() {
    let ctx = ctx();
    let mut r = rng(45);
    let (h, f, e, t) = (128, 32, 16, 5);
    let w = experts(e, h, f, DType::F16, 16, 46);
    let router = DType::F16.round_trip(&randn(&mut r, e * h, 0.2));
    let rw = Weight::upload_f32(ctx, "router", e, h, DType::F16, &router).unwrap();
    let shape = MoeShape {
        experts: e,
        top_k: 4,
        norm_topk: false,
    };
    let x = randn(&mut r, t * h, 1.0);
    let xt = ctx.upload_f32(&[t, h], DType::F32, &x).unwrap();
    let y = ctx.empty(&[t, h], DType::F32).unwrap();
    y.poison(ctx);
    let mut s = Step::new(ctx);
    moe::moe(&mut s, &xt, &rw, &w.gpu, &shape, &y).unwrap();
    s.submit_and_wait().unwrap();
    let logits = vllm_apple_ops::kernels::matmul::cpu::matmul(&x, &router, e, h);
    let (ids, ws) = moe::cpu::route(&logits, e, 4, false);
    let want = moe::cpu::experts(&x, &ids, &ws, 4, &w.gate, &w.up, &w.down, h, f);
    assert_close("moe layer", &y.to_f32_vec(ctx).unwrap(), &want, 2e-4);
}

#[test]
fn moe_rejects_bad_shapes() {
    let ctx = ctx();
    let lt = ctx.upload_f32(&[2, 4], DType::F32, &[0.0; 8]).unwrap();
    let mut s = Step::new(ctx);
    for (e, k) in [(4usize, 5usize), (4, 0), (0, 1), (600, 2)] {
        let shape = MoeShape {
            experts: e,
            top_k: k,
            norm_topk: true,
        };
        let err = moe::route(&mut s, &lt, &shape, 8).err().expect("rejected");
        assert!(
            err.to_string().contains("expert") || err.to_string().contains("top-k"),
            "{err}"
        );
    }
}

/// The combine fused with the residual add and the next RMSNorm, against the CPU.
#[test]
fn decode_layer_with_folded_norm_and_residual_add() {
    // residual += moe(rmsnorm(residual) * g): the router and gate/up GEMVs take the raw
    // rows and fold the norm, the combine adds into the residual (decode batches). One
    // token routes inside the gate/up GEMV; `tied`: router rows in equal triples, so the
    // fourth pick is one of three tied experts and the lowest must win.
    let ctx = ctx();
    // (tokens, dtype, seed, hidden, experts per weight chunk, tied)
    for (t, dt, seed, h, per_chunk, tied) in [
        (1usize, DType::F16, 51u64, 128usize, 16usize, false),
        (1, DType::BF16, 59, 136, 5, false),
        (1, DType::F16, 61, 128, 3, true),
        (3, DType::BF16, 53, 128, 16, false),
        (8, DType::F32, 55, 120, 6, false),
        (16, DType::F16, 57, 128, 16, true),
    ] {
        let mut r = rng(seed);
        let (f, e) = (32, 16);
        let w = experts(e, h, f, dt, per_chunk, seed + 1);
        let mut router = dt.round_trip(&randn(&mut r, e * h, 0.2));
        if tied {
            for i in 0..e {
                router.copy_within(i / 3 * 3 * h..(i / 3 * 3 + 1) * h, i * h);
            }
        }
        let rw = Weight::upload_f32(ctx, "router", e, h, dt, &router).unwrap();
        let shape = MoeShape {
            experts: e,
            top_k: 4,
            norm_topk: true,
        };
        let x = randn(&mut r, t * h, 3.0);
        let g = randn(&mut r, h, 1.0);
        let gt = ctx.upload_f32(&[h], DType::F32, &g).unwrap();
        let normed = vllm_apple_ops::kernels::rmsnorm::cpu::rmsnorm(&x, &g, 1e-6);
        let logits = vllm_apple_ops::kernels::matmul::cpu::matmul(&normed, &router, e, h);
        let (ids, ws) = moe::cpu::route(&logits, e, 4, true);
        let mut want = moe::cpu::experts(&normed, &ids, &ws, 4, &w.gate, &w.up, &w.down, h, f);
        for (a, b) in want.iter_mut().zip(&x) {
            *a += b;
        }
        // The router fold's logits, R diag(g) x short of each token's 1/rms, summed (on the
        // GPU by the qkv and o_proj GEMVs' tail rows): the routing (in the gate/up GEMV for
        // one token, moe_route for more) finds the 1/rms itself and routes the same.
        let xg: Vec<f32> = x.iter().zip(g.iter().cycle()).map(|(a, b)| a * b).collect();
        let raw = vllm_apple_ops::kernels::matmul::cpu::matmul(&xg, &router, e, h);
        // Both ends of the layer: the down projection with the combine fused in (the
        // default for one token) and the grouped down GEMV + combine dispatch; the logits
        // from the router GEMV and from the fold.
        for down_combine in [false, true] {
            let mut scratch = MoeScratch::new(ctx, t, &shape, h, f, dt, None).unwrap();
            assert_eq!(scratch.down_combine, t == 1);
            assert!(
                moe::fusable(&rw, &scratch),
                "decode batch of {t} on the GEMV paths"
            );
            scratch.down_combine = down_combine;
            for logits in [moe::Logits::Router, moe::Logits::Folded] {
                if logits == moe::Logits::Folded {
                    scratch.logits.write_f32(ctx, &raw).unwrap();
                }
                let xt = ctx.upload_f32(&[t, h], DType::F32, &x).unwrap();
                let mut s = Step::new(ctx);
                moe::moe_add_normed(
                    &mut s,
                    &xt,
                    (&gt, 1e-6),
                    &rw,
                    &w.gpu,
                    &shape,
                    &scratch,
                    logits,
                )
                .unwrap();
                s.submit_and_wait().unwrap();
                assert_close(
                    &format!("moe layer t={t} {dt} down+combine {down_combine} {logits:?}"),
                    &xt.to_f32_vec(ctx).unwrap(),
                    &want,
                    2e-4,
                );
            }
        }
    }
}

/// The router carried through o_proj, F = R diag(g) W_o, against the CPU in f64 rounded
/// once to o_proj's dtype, for pairings of the router's and o_proj's dtypes.
#[test]
fn router_fold_matches_cpu() {
    let ctx = ctx();
    let mut r = rng(97);
    // (experts, hidden, o_proj input, router dtype, o_proj dtype, tolerance)
    for (e, h, k, rdt, odt, tol) in [
        (16usize, 136usize, 200usize, DType::F16, DType::F16, 1e-3),
        (12, 64, 72, DType::F32, DType::BF16, 8e-3),
        (5, 40, 64, DType::BF16, DType::F32, 1e-5),
    ] {
        let router = rdt.round_trip(&randn(&mut r, e * h, 0.2));
        let g = randn(&mut r, h, 1.0);
        let wo = odt.round_trip(&randn(&mut r, h * k, 0.3));
        let mut want = vec![0f32; e * k];
        for ei in 0..e {
            for j in 0..k {
                want[ei * k + j] = (0..h)
                    .map(|i| router[ei * h + i] as f64 * g[i] as f64 * wo[i * k + j] as f64)
                    .sum::<f64>() as f32;
            }
        }
        let want = odt.round_trip(&want);
        let rw = Weight::upload_f32(ctx, "router", e, h, rdt, &router).unwrap();
        let ow = Weight::upload_f32(ctx, "o", h, k, odt, &wo).unwrap();
        let gt = ctx.upload_f32(&[h], DType::F32, &g).unwrap();
        let f = moe::router_fold(ctx, &rw, &gt, &ow).unwrap().unwrap();
        assert_eq!((f.n, f.k, f.dtype, f.chunks.len()), (e, k, odt, 1));
        let got = f.chunks[0].tensor.to_f32_vec(ctx).unwrap();
        assert_close(&format!("router fold {rdt} x {odt}"), &got, &want, tol);
        // A router in two chunks: no fold (its half could not ride on one GEMV binding).
        let bytes = rdt.encode_f32(&router);
        let row = (h * rdt.size()) as u64;
        let split = Weight::upload_grouped(ctx, "router", e, h, rdt, &bytes, 1, row).unwrap();
        assert!(split.chunks.len() > 1);
        assert!(moe::router_fold(ctx, &split, &gt, &ow).unwrap().is_none());
    }
}

#[test]
fn combine_add_rmsnorm_matches_cpu() {
    let ctx = ctx();
    let mut r = rng(49);
    let (t, e, k, h) = (7usize, 12usize, 3usize, 200usize);
    let shape = MoeShape {
        experts: e,
        top_k: k,
        norm_topk: true,
    };
    let logits = randn(&mut r, t * e, 2.0);
    let lt = ctx.upload_f32(&[t, e], DType::F32, &logits).unwrap();
    let rows = randn(&mut r, t * k * h, 1.0);
    let resid = randn(&mut r, t * h, 1.0);
    let w = randn(&mut r, h, 1.0);
    let rows_t = ctx.upload_f32(&[t * k, h], DType::F32, &rows).unwrap();
    let resid_t = ctx.upload_f32(&[t, h], DType::F32, &resid).unwrap();
    let w_t = ctx.upload_f32(&[h], DType::F32, &w).unwrap();
    let out = ctx.empty(&[t, h], DType::F32).unwrap();
    out.poison(ctx);
    let mut s = Step::new(ctx);
    let routing = moe::route(&mut s, &lt, &shape, 4).unwrap();
    moe::combine_add_rmsnorm(&mut s, &rows_t, &routing, &resid_t, &w_t, 1e-6, &out).unwrap();
    s.submit_and_wait().unwrap();
    let pos = routing.pair_pos.to_u32_vec(ctx).unwrap();
    let ws = routing.topk_w.to_f32_vec(ctx).unwrap();
    let mut want_resid = resid.clone();
    for ti in 0..t {
        for i in 0..h {
            let mut acc = 0f64;
            for j in 0..k {
                let pair = ti * k + j;
                acc += ws[pair] as f64 * rows[pos[pair] as usize * h + i] as f64;
            }
            want_resid[ti * h + i] += acc as f32;
        }
    }
    let want = vllm_apple_ops::kernels::rmsnorm::cpu::rmsnorm(&want_resid, &w, 1e-6);
    assert_close(
        "residual",
        &resid_t.to_f32_vec(ctx).unwrap(),
        &want_resid,
        1e-5,
    );
    assert_close("normed", &out.to_f32_vec(ctx).unwrap(), &want, 1e-5);
}
