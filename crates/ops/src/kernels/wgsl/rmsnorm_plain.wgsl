// Front of rmsnorm.wgsl: the layer output is a row of x.
struct Params {
    m: u32,
    h: u32,
    eps: f32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<f32>;

fn layer_out(row: u32, i: u32) -> f32 {
    return x[row * p.h + i];
}
