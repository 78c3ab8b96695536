// RMSNorm over rows of f32 hidden states, one workgroup per row; with ADD_RESIDUAL it
// first adds the layer output into the residual stream (in place), then normalises the
// sum. The front in front of this file gives `layer_out(row, i)`, the layer output
// (rmsnorm_plain.wgsl: a row of x; rmsnorm_moe.wgsl: the weighted sum of a token's expert
// rows), and the bindings beyond these:
@group(0) @binding(1) var<storage, read_write> residual: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn add_rmsnorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
               @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let row = flat_group(wg, nwg);
    if row >= p.m {
        return;
    }
    let base = row * p.h;
    var ss = 0.0;
    for (var i = li; i < p.h; i += 256u) {
        var v = layer_out(row, i);
        if ADD_RESIDUAL {
            v += residual[base + i];
            residual[base + i] = v;
        }
        ss += v * v;
    }
    let total = wg_sum(ss, sg, lane, nsg);
    let scale = inverseSqrt(total / f32(p.h) + p.eps);
    for (var i = li; i < p.h; i += 256u) {
        var v: f32;
        if ADD_RESIDUAL {
            v = residual[base + i];
        } else {
            v = layer_out(row, i);
        }
        out[base + i] = v * scale * w[i];
    }
}
