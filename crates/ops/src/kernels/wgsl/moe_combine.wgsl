// Weighted sum of each token's k expert outputs (rows in expert-sorted order) back into
// token order: y[t, h] = sum_j topk_w[t k + j] * rows[pair_pos[t k + j], h], in pick order;
// ACCUM: y[t, h] += that sum (the residual add of a decode step whose next RMSNorm is folded
// into the GEMV that reads it). Prelude: ACCUM.
struct Params {
    tokens: u32,
    hidden: u32,
    k: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> rows: array<f32>;
@group(0) @binding(1) var<storage, read> topk_w: array<f32>;
@group(0) @binding(2) var<storage, read> pair_pos: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn moe_combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let idx = flat_group(wg, nwg) * 256u + li;
    if idx >= p.tokens * p.hidden {
        return;
    }
    let t = idx / p.hidden;
    let h = idx - t * p.hidden;
    var acc = 0.0;
    for (var j = 0u; j < p.k; j++) {
        let pair = t * p.k + j;
        acc += topk_w[pair] * rows[pair_pos[pair] * p.hidden + h];
    }
    if ACCUM {
        y[idx] += acc;
    } else {
        y[idx] = acc;
    }
}
