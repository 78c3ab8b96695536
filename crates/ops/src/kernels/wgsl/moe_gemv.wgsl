// Grouped expert GEMV: the rows of one routing tile (tokens that chose the same expert, in
// expert-sorted order) times that expert's weights, for decode-sized groups. Like gemv.wgsl,
// TPR invocations share a weight row and each keeps partial sums for RPT rows and up to MT
// tokens; a tile with more than MT rows loops, re-reading the (cache-resident) row group.
// Each expert's weights are read once per tile, and only tiles of chosen experts run.
// GATHER = 1: x row of sorted row r is sorted[r] (hidden states by token); 0: x row r.
// ACT = 1: weight rows interleave gate and up (row 2f = gate f, 2f + 1 = up f) and the
// output is silu(gate) * up, n / 2 columns; 0: plain output, n columns.
// Weights: this dispatch's chunk holds experts [e0, e0 + e_count), n rows each.
// Weights f32 (W_DTYPE 0, K % 4 == 0) or f16 / bf16 (K % 8 == 0).
// NORM: x rows are raw residual-stream rows, multiplied as rmsnorm(x) * norm_w (as in
// gemv.wgsl: the sums of squares ride along with the products).
// Entry points: moe_gemv takes its tiles from moe_route.wgsl; moe_gemv_routed routes one
// token itself (below), so a one-token decode step needs no routing dispatch.
// Prelude: MT, WG, TPR, RPT (even when ACT), W_DTYPE, ACT, GATHER, NORM, LOGIT_RSTD (below),
// and moe_topk.wgsl's MAX_K and VPL.
// Params and bindings: moe_bindings.wgsl, and the norm weight (NORM; a dummy otherwise):
@group(0) @binding(5) var<storage, read> norm_w: array<vec4<f32>>;
// moe_gemv_routed's router logits (moe_topk.wgsl reads them) and its picks, laid out as
// moe_route.wgsl writes them for the down projection:
@group(0) @binding(6) var<storage, read> logits: array<f32>;
@group(0) @binding(7) var<storage, read_write> topk_ids: array<u32>;
@group(0) @binding(8) var<storage, read_write> topk_w: array<f32>;
@group(0) @binding(9) var<storage, read_write> pair_pos: array<u32>;

const GROUPS: u32 = WG / TPR;
const ACC: u32 = MT * RPT;
const SLOTS: u32 = ACC + select(0u, MT, NORM);
var<workgroup> partial: array<f32, (WG / 4u) * SLOTS>;

@compute @workgroup_size(WG)
fn moe_gemv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,
            @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32,
            @builtin(subgroup_size) sg_size: u32) {
    let tile = wg.y;
    if tile >= tiles[0] || wg.x * GROUPS * RPT >= p.n {
        return;
    }
    let e = tiles[1u + 3u * tile];
    if e < p.e0 || e >= p.e0 + p.e_count {
        return;
    }
    expert_rows(wg.x, li, sg, lane, sg_size, e, tiles[2u + 3u * tile], tiles[3u + 3u * tile],
                false);
}

var<workgroup> routed_e: u32;

// One token's k experts, workgroup row j = wg.y for the j-th pick: subgroup 0 of every
// workgroup routes the token (moe_topk.wgsl, the same picks everywhere) and the first
// workgroup of each row records pick j for the down projection (pair j reads act row j).
// Routing inside the GEMV costs its workgroups a few subgroup passes over the logits and
// saves the routing dispatch and its barrier.
@compute @workgroup_size(WG)
fn moe_gemv_routed(@builtin(workgroup_id) wg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
                   @builtin(subgroup_invocation_id) lane: u32,
                   @builtin(subgroup_size) sg_size: u32) {
    let j = wg.y;
    if j >= p.top_k || wg.x * GROUPS * RPT >= p.n {
        return;
    }
    if sg == 0u {
        let scale = logit_scale(0u, p.k, p.eps, lane, sg_size);
        let pick = topk_pick(0u, p.experts, p.top_k, p.norm_topk != 0u, j, lane, sg_size,
                             scale);
        if lane == 0u {
            routed_e = pick.e;
            if wg.x == 0u {
                topk_ids[j] = pick.e;
                topk_w[j] = pick.v;
                pair_pos[j] = j;
            }
        }
    }
    let e = workgroupUniformLoad(&routed_e);
    if e < p.e0 || e >= p.e0 + p.e_count {
        return;
    }
    expert_rows(wg.x, li, sg, lane, sg_size, e, j, j + 1u, true);
}

// Rows [first, end) of one expert's group times its weights, row groups from wg_x on. x_row0:
// every row reads x row 0 (one routed token).
fn expert_rows(wg_x: u32, li: u32, sg: u32, lane: u32, sg_size: u32, e: u32, first: u32,
               end: u32, x_row0: bool) {
    let wg_row0 = wg_x * GROUPS * RPT;
    let wbase = (e - p.e0) * p.n;
    let g = li / TPR;
    let lt = li - g * TPR;
    let row0 = wg_row0 + g * RPT;
    let kx = p.k / 4u;
    let kv = p.k / 8u;
    let out_cols = select(p.n, p.n / 2u, ACT == 1u);
    for (var r0 = first; r0 < end; r0 += MT) {
        let count = min(MT, end - r0);
        var xrow: array<u32, MT>;
        for (var m = 0u; m < MT; m++) {
            let r = min(r0 + m, end - 1u);
            xrow[m] = select(select(r, sorted[r], GATHER == 1u), 0u, x_row0) * kx;
        }
        var acc: array<f32, ACC>;
        for (var j = 0u; j < ACC; j++) {
            acc[j] = 0.0;
        }
        var ssq: array<f32, MT>;
        for (var m = 0u; m < MT; m++) {
            ssq[m] = 0.0;
        }
        if W_DTYPE == 0u {
            for (var i = lt; i < kx; i += TPR) {
                for (var m = 0u; m < MT; m++) {
                    if m < count {
                        var xv = x[xrow[m] + i];
                        if NORM {
                            ssq[m] += dot(xv, xv);
                            xv *= norm_w[i];
                        }
                        for (var r = 0u; r < RPT; r++) {
                            let row = wbase + min(row0 + r, p.n - 1u);
                            acc[m * RPT + r] += dot(bitcast<vec4<f32>>(w[row * kx + i]), xv);
                        }
                    }
                }
            }
        } else {
            // As in gemv.wgsl: weights converted once, each x vector loaded once per step.
            for (var i = lt; i < kv; i += TPR) {
                var wa: array<vec4<f32>, RPT>;
                var wb: array<vec4<f32>, RPT>;
                for (var r = 0u; r < RPT; r++) {
                    let wv = w[(wbase + min(row0 + r, p.n - 1u)) * kv + i];
                    wa[r] = vec4<f32>(half2_to_f32(wv.x, W_DTYPE), half2_to_f32(wv.y, W_DTYPE));
                    wb[r] = vec4<f32>(half2_to_f32(wv.z, W_DTYPE), half2_to_f32(wv.w, W_DTYPE));
                }
                for (var m = 0u; m < MT; m++) {
                    if m < count {
                        var x0 = x[xrow[m] + 2u * i];
                        var x1 = x[xrow[m] + 2u * i + 1u];
                        if NORM {
                            ssq[m] += dot(x0, x0) + dot(x1, x1);
                            x0 *= norm_w[2u * i];
                            x1 *= norm_w[2u * i + 1u];
                        }
                        for (var r = 0u; r < RPT; r++) {
                            acc[m * RPT + r] += dot(wa[r], x0) + dot(wb[r], x1);
                        }
                    }
                }
            }
        }
        for (var j = 0u; j < ACC; j++) {
            let s = subgroupAdd(acc[j]);
            if lane == 0u {
                partial[sg * SLOTS + j] = s;
            }
        }
        if NORM {
            for (var m = 0u; m < MT; m++) {
                let s = subgroupAdd(ssq[m]);
                if lane == 0u {
                    partial[sg * SLOTS + min(ACC + m, SLOTS - 1u)] = s;
                }
            }
        }
        workgroupBarrier();
        // One invocation per output: (row group, token, row) or, with ACT, (.., row pair).
        let outs = select(ACC, ACC / 2u, ACT == 1u);
        if li < GROUPS * outs {
            let og = li / outs;
            let j = (li - og * outs) * select(1u, 2u, ACT == 1u);
            let m = j / RPT;
            let r = j - m * RPT;
            let per = TPR / sg_size;
            var v0 = 0.0;
            var v1 = 0.0;
            var ss = 0.0;
            for (var s = og * per; s < (og + 1u) * per; s++) {
                v0 += partial[s * SLOTS + j];
                if ACT == 1u {
                    v1 += partial[s * SLOTS + j + 1u];
                }
                if NORM {
                    ss += partial[s * SLOTS + min(ACC + m, SLOTS - 1u)];
                }
            }
            if NORM {
                let rstd = inverseSqrt(ss / f32(p.k) + p.eps);
                v0 *= rstd;
                v1 *= rstd;
            }
            let row = wg_row0 + og * RPT + r;
            if row < p.n && m < count {
                if ACT == 1u {
                    y[(r0 + m) * out_cols + row / 2u] = v0 / (1.0 + exp(-v0)) * v1;
                } else {
                    y[(r0 + m) * out_cols + row] = v0;
                }
            }
        }
        workgroupBarrier();
    }
}
