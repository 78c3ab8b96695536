// Staging helpers of gemm_coop.wgsl: workgroup memory as vec4<f16>, a quarter of the stores.
// (bf16 values beyond f16's range would overflow; trained weights stay far inside it.)
alias SH = vec4<f16>;
const SHW: u32 = 4u;

fn stage_x(o: u32, v: vec4<f32>) {
    xs[o / 4u] = vec4<f16>(v);
}

fn stage_w(o: u32, v: vec4<u32>) {
    ws[o / 4u] = vec4<f16>(vec4<f32>(half2_to_f32(v.x, W_DTYPE), half2_to_f32(v.y, W_DTYPE)));
    ws[o / 4u + 1u] = vec4<f16>(vec4<f32>(half2_to_f32(v.z, W_DTYPE), half2_to_f32(v.w, W_DTYPE)));
}
