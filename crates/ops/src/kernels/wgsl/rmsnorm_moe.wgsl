// Front of rmsnorm.wgsl for a MoE layer: the layer output of token t is the weighted sum
// of its K expert rows (expert-sorted order, see moe_route.wgsl), so the combine, the
// residual add and the next RMSNorm are one dispatch. Prelude: K.
struct Params {
    m: u32,
    h: u32,
    eps: f32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> rows: array<f32>;
@group(0) @binding(4) var<storage, read> topk_w: array<f32>;
@group(0) @binding(5) var<storage, read> pair_pos: array<u32>;

fn layer_out(row: u32, i: u32) -> f32 {
    var acc = 0.0;
    for (var j = 0u; j < K; j++) {
        let pair = row * K + j;
        acc += topk_w[pair] * rows[pair_pos[pair] * p.h + i];
    }
    return acc;
}
