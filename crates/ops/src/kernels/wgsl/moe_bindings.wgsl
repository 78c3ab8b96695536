// Immediates and bindings of the grouped expert GEMMs (moe_gemv.wgsl, moe_coop.wgsl): this
// dispatch's weight chunk holds experts [e0, e0 + e_count), n rows of k each; tiles and
// sorted come from moe_route.wgsl. y (binding 2): y_scalar.wgsl or y_vec4.wgsl.
struct Params {
    n: u32,
    k: u32,
    e0: u32,
    e_count: u32,
    // RMSNorm epsilon of moe_gemv.wgsl's NORM.
    eps: f32,
    // moe_gemv_routed's routing: experts, picks per token, renormalise the picks.
    experts: u32,
    top_k: u32,
    norm_topk: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> tiles: array<u32>;
@group(0) @binding(4) var<storage, read> sorted: array<u32>;
