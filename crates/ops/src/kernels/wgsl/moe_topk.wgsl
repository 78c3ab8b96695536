// One token's routing by one subgroup (moe_route.wgsl, moe_gemv.wgsl): softmax over the
// router logits `logits[base .. base + experts)`, top-k by k passes of a subgroup arg-max
// (ties go to the lower expert index, as the CPU reference defines), weights renormalised
// over the chosen k when `norm`. Every invocation of the subgroup gets the same picks.
// Prelude: MAX_K, VPL (logits per invocation: at least experts / subgroup size),
// LOGIT_RSTD; the including kernel's x (hidden rows as vec4<f32>).

// What token t's logits are multiplied by: 1, or with LOGIT_RSTD (the router fold's logits,
// R diag(g) x short of x's 1/rms: the two halves of router_fold.wgsl summed by the qkv and
// o_proj GEMVs' tail rows) the 1/rms of the token's row of x (`k` wide), by the subgroup.
// The ranking does not need it; the weights do.
fn logit_scale(t: u32, k: u32, eps: f32, lane: u32, sg_size: u32) -> f32 {
    if !LOGIT_RSTD {
        return 1.0;
    }
    let row = t * (k / 4u);
    var ss = 0.0;
    for (var i = lane; i < k / 4u; i += sg_size) {
        let v = x[row + i];
        ss += dot(v, v);
    }
    return inverseSqrt(subgroupAdd(ss) / f32(k) + eps);
}

// A subgroup's view of one token's logits (times `scale`: moe_gemv.wgsl's LOGIT_RSTD): each
// invocation keeps its experts' logits (lane, lane + sg_size, ..) in registers, so the k
// passes cost subgroup operations, not k re-reads of memory; with the softmax's max and sum.
struct Logits {
    vals: array<f32, VPL>,
    mx: f32,
    total: f32,
}

// An expert and its value (a logit, or once finished a routing weight).
struct Pick {
    v: f32,
    e: u32,
}

fn subgroup_logits(base: u32, experts: u32, lane: u32, sg_size: u32, scale: f32) -> Logits {
    var l: Logits;
    var mx = -3.4e38;
    for (var i = 0u; i < VPL; i++) {
        let e = lane + i * sg_size;
        var v = -3.4e38;
        if e < experts {
            v = logits[base + e] * scale;
        }
        l.vals[i] = v;
        mx = max(mx, v);
    }
    l.mx = subgroupMax(mx);
    var total = 0.0;
    for (var i = 0u; i < VPL; i++) {
        if lane + i * sg_size < experts {
            total += exp(l.vals[i] - l.mx);
        }
    }
    l.total = subgroupAdd(total);
    return l;
}

// The best logit strictly after `prev` in descending (value, -index) order.
fn next_pick(l: ptr<function, Logits>, experts: u32, prev: Pick, lane: u32,
             sg_size: u32) -> Pick {
    var best_v = -3.4e38;
    var best_e = 0xffffffffu;
    for (var i = 0u; i < VPL; i++) {
        let e = lane + i * sg_size;
        let v = (*l).vals[i];
        let after = v < prev.v || (v == prev.v && e > prev.e);
        if e < experts && after && (v > best_v || (v == best_v && e < best_e)) {
            best_v = v;
            best_e = e;
        }
    }
    let top = subgroupMax(best_v);
    // (NaN logits never win a comparison; clamp so a bad row cannot index past the
    // experts.)
    return Pick(top, min(subgroupMin(select(0xffffffffu, best_e, best_v == top)), experts - 1u));
}

// Before the first pick.
const NO_PICK: Pick = Pick(3.4e38, 0xffffffffu);

struct Picks {
    ids: array<u32, MAX_K>,
    ws: array<f32, MAX_K>,
}

fn topk_picks(base: u32, experts: u32, k: u32, norm: bool, lane: u32, sg_size: u32,
              scale: f32) -> Picks {
    var l = subgroup_logits(base, experts, lane, sg_size, scale);
    var prev = NO_PICK;
    var out: Picks;
    var chosen = 0.0;
    for (var j = 0u; j < k; j++) {
        prev = next_pick(&l, experts, prev, lane, sg_size);
        out.ids[j] = prev.e;
        out.ws[j] = exp(prev.v - l.mx);
        chosen += out.ws[j];
    }
    let denom = select(l.total, chosen, norm);
    for (var j = 0u; j < k; j++) {
        out.ws[j] = out.ws[j] / denom;
    }
    return out;
}

// Pick j alone (expert, routing weight) of topk_picks, in registers: no arrays of k; the
// logits times `scale`.
fn topk_pick(base: u32, experts: u32, k: u32, norm: bool, j: u32, lane: u32, sg_size: u32,
             scale: f32) -> Pick {
    var l = subgroup_logits(base, experts, lane, sg_size, scale);
    var prev = NO_PICK;
    var mine = NO_PICK;
    var chosen = 0.0;
    for (var i = 0u; i < k; i++) {
        prev = next_pick(&l, experts, prev, lane, sg_size);
        chosen += exp(prev.v - l.mx);
        if i == j {
            mine = prev;
        }
    }
    let denom = select(l.total, chosen, norm);
    return Pick(exp(mine.v - l.mx) / denom, mine.e);
}
