// Front of gemm_coop.wgsl for plain matrices: y[m, n_offset + n] = sum_k x[m, k] W[n, k],
// workgroup (x, y) = (column tile, row tile); M and N edges bounds-checked. Results go
// through put4 / put1 (y_vec4.wgsl or y_scalar.wgsl).
struct Params {
    m: u32,
    n: u32,
    k: u32,
    n_offset: u32,
    ldy: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;

var<private> m0: u32;

fn setup(wg: vec3<u32>) -> bool {
    m0 = wg.y * 8u * S;
    return true;
}

fn x_load(r: u32, k: u32) -> vec4<f32> {
    if m0 + r < p.m && k < p.k {
        return x[((m0 + r) * p.k + k) / 4u];
    }
    return vec4<f32>(0.0);
}

fn w_load(n: u32, k: u32) -> vec4<u32> {
    if n < p.n && k < p.k {
        return w[(n * p.k + k) / 8u];
    }
    return vec4<u32>(0u);
}

fn emit4(r: u32, n: u32, i: u32) {
    if m0 + r >= p.m {
        return;
    }
    let o = (m0 + r) * p.ldy + p.n_offset + n;
    if n + 3u < p.n {
        put4(o, vec4<f32>(cs[i], cs[i + 1u], cs[i + 2u], cs[i + 3u]));
        return;
    }
    for (var j = 0u; n + j < p.n; j++) {
        put1(o + j, cs[i + j]);
    }
}
