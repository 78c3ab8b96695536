// Tiled GEMM for prefill-sized M: y[m, n_offset + n] = sum_k x[m, k] * W[n, k].
// 64x64 output tile per workgroup of 16x16 invocations, each computing a 4x4 block from
// BK-deep slices staged in workgroup memory; any M, N, K (edges are bounds-checked).
struct Params {
    m: u32,
    n: u32,
    k: u32,
    n_offset: u32,
    ldy: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
var<workgroup> xs: array<f32, BK * BM>;
var<workgroup> ws: array<f32, BK * BN>;

@compute @workgroup_size(16, 16)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let n0 = wg.x * BN;
    let m0 = wg.y * BM;
    var acc: array<f32, 16>;
    for (var j = 0u; j < 16u; j++) {
        acc[j] = 0.0;
    }
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var j = 0u; j < 4u; j++) {
            let idx = li + j * 256u;
            let r = idx / BK;
            let kk = idx - r * BK;
            let gk = k0 + kk;
            var xv = 0.0;
            if m0 + r < p.m && gk < p.k {
                xv = x[(m0 + r) * p.k + gk];
            }
            xs[kk * BM + r] = xv;
            var wv = 0.0;
            if n0 + r < p.n && gk < p.k {
                let e = (n0 + r) * p.k + gk;
                wv = elem_f32(w[word_index(e, W_DTYPE)], e, W_DTYPE);
            }
            ws[kk * BN + r] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = xs[kk * BM + lid.y + 16u * i];
                b[i] = ws[kk * BN + lid.x + 16u * i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] += a[i] * b[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + lid.y + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + lid.x + 16u * j;
            if m < p.m && n < p.n {
                y[m * p.ldy + p.n_offset + n] = acc[i * 4u + j];
            }
        }
    }
}
