// Numerically stable softmax over each row of an f32 matrix, in place.
struct Params {
    m: u32,
    n: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(256)
fn softmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
           @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let row = flat_group(wg, nwg);
    if row >= p.m {
        return;
    }
    let base = row * p.n;
    var mx = -3.4e38;
    for (var i = li; i < p.n; i += 256u) {
        mx = max(mx, x[base + i]);
    }
    mx = wg_max(mx, sg, lane, nsg);
    var s = 0.0;
    for (var i = li; i < p.n; i += 256u) {
        s += exp(x[base + i] - mx);
    }
    let inv = 1.0 / wg_sum(s, sg, lane, nsg);
    for (var i = li; i < p.n; i += 256u) {
        x[base + i] = exp(x[base + i] - mx) * inv;
    }
}
