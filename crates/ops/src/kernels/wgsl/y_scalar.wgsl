// Output binding 2 as f32 scalars, for any row stride and offset (gemm_coop_dense.wgsl,
// moe_coop.wgsl, moe_gemv.wgsl).
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

fn put4(o: u32, v: vec4<f32>) {
    y[o] = v.x;
    y[o + 1u] = v.y;
    y[o + 2u] = v.z;
    y[o + 3u] = v.w;
}

fn put1(o: u32, v: f32) {
    y[o] = v;
}
