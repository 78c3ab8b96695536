// Workgroup-wide sum and max for kernels of at most 256 invocations, correct for any
// subgroup size from 4 up (at most 64 subgroups).
var<workgroup> red_f32: array<f32, 64>;

fn wg_sum(v: f32, sg: u32, lane: u32, nsg: u32) -> f32 {
    let s = subgroupAdd(v);
    if lane == 0u {
        red_f32[sg] = s;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < nsg; i++) {
        total += red_f32[i];
    }
    workgroupBarrier();
    return total;
}

fn wg_max(v: f32, sg: u32, lane: u32, nsg: u32) -> f32 {
    let s = subgroupMax(v);
    if lane == 0u {
        red_f32[sg] = s;
    }
    workgroupBarrier();
    var best = red_f32[0];
    for (var i = 1u; i < nsg; i++) {
        best = max(best, red_f32[i]);
    }
    workgroupBarrier();
    return best;
}
