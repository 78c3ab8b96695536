// y[m, n] += b[n] over the rows of a matrix (Qwen2's q/k/v projection biases).
struct Params {
    m: u32,
    n: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;

@compute @workgroup_size(256)
fn add_bias(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let i = flat_group(wg, nwg) * 256u + li;
    if i >= p.m * p.n {
        return;
    }
    y[i] += b[i % p.n];
}
