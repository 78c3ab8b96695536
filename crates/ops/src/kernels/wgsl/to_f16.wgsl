// f32 activations [m, k] -> f16 [rows, k] with zero rows from m to rows (padding for
// kernels that read whole tiles).
struct Params {
    m: u32,
    k: u32,
    rows: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<vec2<f32>>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(256)
fn to_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let i = flat_group(wg, nwg) * 256u + li;
    let half_k = p.k / 2u;
    if i >= p.rows * half_k {
        return;
    }
    var v = vec2<f32>(0.0);
    if i < p.m * half_k {
        v = x[i];
    }
    out[i] = pack2x16float(v);
}
