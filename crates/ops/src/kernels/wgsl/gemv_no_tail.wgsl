// gemv.wgsl without tail rows (gemv_tail.wgsl): no bindings past 4.
const TAIL: bool = false;

fn tail_w(i: u32) -> vec4<u32> {
    return vec4<u32>(0u);
}

fn tail_norm(i: u32) -> vec4<f32> {
    return vec4<f32>(1.0);
}

fn tail_put(o: u32, v: f32) {}
