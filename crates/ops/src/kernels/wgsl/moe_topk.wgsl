// One token's routing by one subgroup (moe_route.wgsl): softmax over the router logits
// `logits[base .. base + experts)`, top-k by k passes of a subgroup arg-max (ties go to the
// lower expert index, as the CPU reference defines), weights renormalised over the chosen
// k when `norm`. Every invocation of the subgroup returns the same picks. Prelude: MAX_K,
// VPL (logits per invocation: at least experts / subgroup size).
struct Picks {
    ids: array<u32, MAX_K>,
    ws: array<f32, MAX_K>,
}

fn topk_picks(base: u32, experts: u32, k: u32, norm: bool, lane: u32, sg_size: u32) -> Picks {
    // Each invocation keeps its experts' logits (lane, lane + sg_size, ..) in registers:
    // the k passes below then cost subgroup operations, not k re-reads of memory.
    var vals: array<f32, VPL>;
    var mx = -3.4e38;
    for (var i = 0u; i < VPL; i++) {
        let e = lane + i * sg_size;
        var v = -3.4e38;
        if e < experts {
            v = logits[base + e];
        }
        vals[i] = v;
        mx = max(mx, v);
    }
    mx = subgroupMax(mx);
    var total = 0.0;
    for (var i = 0u; i < VPL; i++) {
        if lane + i * sg_size < experts {
            total += exp(vals[i] - mx);
        }
    }
    total = subgroupAdd(total);
    // Picks in descending (value, -index) order: each pass takes the best candidate
    // strictly after the previous pick in that order.
    var prev_v = 3.4e38;
    var prev_e = 0xffffffffu;
    var out: Picks;
    var chosen = 0.0;
    for (var j = 0u; j < k; j++) {
        var best_v = -3.4e38;
        var best_e = 0xffffffffu;
        for (var i = 0u; i < VPL; i++) {
            let e = lane + i * sg_size;
            let v = vals[i];
            let after = v < prev_v || (v == prev_v && e > prev_e);
            if e < experts && after && (v > best_v || (v == best_v && e < best_e)) {
                best_v = v;
                best_e = e;
            }
        }
        let top = subgroupMax(best_v);
        // (NaN logits never win a comparison; clamp so a bad row cannot index past the
        // experts.)
        let e = min(subgroupMin(select(0xffffffffu, best_e, best_v == top)), experts - 1u);
        prev_v = top;
        prev_e = e;
        out.ids[j] = e;
        out.ws[j] = exp(top - mx);
        chosen += out.ws[j];
    }
    let denom = select(total, chosen, norm);
    for (var j = 0u; j < k; j++) {
        out.ws[j] = out.ws[j] / denom;
    }
    return out;
}
