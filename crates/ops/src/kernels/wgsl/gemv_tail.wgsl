// gemv.wgsl's tail rows: a second, small matrix (binding 5, [n_tail, K] in the main
// weight's dtype) times the same x in the same dispatch, in workgroups after the main
// rows', into its own output (binding 6, [M, n_tail]; += with TAIL_ACCUM). With NORM its x
// is scaled by its own weight (binding 7) and not by rstd(x): a decode step's router
// halves R diag(g) h_prev and F a (router_fold.wgsl) ride on the qkv and o_proj
// GEMVs this way, with no dispatch (nor barrier) of their own.
// Prelude: TAIL_ACCUM.
const TAIL: bool = true;

@group(0) @binding(5) var<storage, read> w_tail: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read_write> y_tail: array<f32>;
@group(0) @binding(7) var<storage, read> norm_tail: array<vec4<f32>>;

fn tail_w(i: u32) -> vec4<u32> {
    return w_tail[i];
}

fn tail_norm(i: u32) -> vec4<f32> {
    return norm_tail[i];
}

fn tail_put(o: u32, v: f32) {
    if TAIL_ACCUM {
        y_tail[o] += v;
    } else {
        y_tail[o] = v;
    }
}
