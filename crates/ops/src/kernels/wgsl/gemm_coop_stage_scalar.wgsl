// Staging helpers of gemm_coop.wgsl: workgroup memory as f16 scalars.
alias SH = f16;
const SHW: u32 = 1u;

// x[o .. o + 4) (in halves) of the staged x slice.
fn stage_x(o: u32, v: vec4<f32>) {
    xs[o] = f16(v.x);
    xs[o + 1u] = f16(v.y);
    xs[o + 2u] = f16(v.z);
    xs[o + 3u] = f16(v.w);
}

// W[o .. o + 8) (in halves) of the staged W slice, from 8 packed halves.
fn stage_w(o: u32, v: vec4<u32>) {
    let a = vec4<f32>(half2_to_f32(v.x, W_DTYPE), half2_to_f32(v.y, W_DTYPE));
    let b = vec4<f32>(half2_to_f32(v.z, W_DTYPE), half2_to_f32(v.w, W_DTYPE));
    for (var i = 0u; i < 4u; i++) {
        ws[o + i] = f16(a[i]);
        ws[o + 4u + i] = f16(b[i]);
    }
}
