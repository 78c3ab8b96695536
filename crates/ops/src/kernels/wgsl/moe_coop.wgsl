// Front of gemm_coop.wgsl for the experts of a MoE layer (see moe_gemv.wgsl for the
// routing tiles, GATHER and ACT): workgroup (x, y) = (column tile, routing tile); the rows
// are the tile's, the weights its expert's. Tiles hold at most 8 S rows.
// Params and bindings: moe_bindings.wgsl.

var<private> first: u32;
var<private> rows: u32;
var<private> wbase: u32;

fn setup(wg: vec3<u32>) -> bool {
    let tile = wg.y;
    if tile >= tiles[0] || wg.x * BN >= p.n {
        return false;
    }
    let e = tiles[1u + 3u * tile];
    if e < p.e0 || e >= p.e0 + p.e_count {
        return false;
    }
    first = tiles[2u + 3u * tile];
    rows = tiles[3u + 3u * tile] - first;
    wbase = (e - p.e0) * p.n;
    return true;
}

fn x_load(r: u32, k: u32) -> vec4<f32> {
    if r < rows && k < p.k {
        let row = select(first + r, sorted[first + r], GATHER == 1u);
        return x[(row * p.k + k) / 4u];
    }
    return vec4<f32>(0.0);
}

fn w_load(n: u32, k: u32) -> vec4<u32> {
    if n < p.n && k < p.k {
        return w[((wbase + n) * p.k + k) / 8u];
    }
    return vec4<u32>(0u);
}

fn emit4(r: u32, n: u32, i: u32) {
    if r >= rows {
        return;
    }
    let row = first + r;
    if ACT == 1u {
        // Gate and up columns are adjacent (even, odd) in the same fragment row.
        for (var j = 0u; j < 4u && n + j < p.n; j += 2u) {
            let g = cs[i + j];
            put1(row * (p.n / 2u) + (n + j) / 2u, g / (1.0 + exp(-g)) * cs[i + j + 1u]);
        }
    } else if n + 3u < p.n {
        put4(row * p.n + n, vec4<f32>(cs[i], cs[i + 1u], cs[i + 2u], cs[i + 3u]));
    } else {
        for (var j = 0u; n + j < p.n; j++) {
            put1(row * p.n + n + j, cs[i + j]);
        }
    }
}
