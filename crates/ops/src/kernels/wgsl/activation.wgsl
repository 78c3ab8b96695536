// SiLU(gate) * up over rows laid out [gate (i) | up (i)], as the fused gate/up GEMM writes.
struct Params {
    m: u32,
    i: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> gate_up: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn silu_mul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let idx = flat_group(wg, nwg) * 256u + li;
    if idx >= p.m * p.i {
        return;
    }
    let row = idx / p.i;
    let col = idx - row * p.i;
    let g = gate_up[row * 2u * p.i + col];
    let u = gate_up[row * 2u * p.i + p.i + col];
    out[idx] = g / (1.0 + exp(-g)) * u;
}
