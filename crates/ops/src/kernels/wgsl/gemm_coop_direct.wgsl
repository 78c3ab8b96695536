// Cooperative-matrix GEMM reading its fragments straight from global memory (no staging,
// no barriers in the main loop): y[m, n_offset + n] = sum_k x16[m, k] * W[n, k] with x16
// the f16 activations padded with zero rows to a multiple of 8 S, f16 weights whose chunk
// rows are a multiple of 8 S, and K % S == 0 (the launcher checks all three), so no load
// leaves its buffer. The eight subgroups of a workgroup share their fragments through L1.
// Layout of subgroups and accumulators as in gemm_coop.wgsl. Prelude: S, CA, CB, CC.
struct Params {
    m: u32,
    n: u32,
    k: u32,
    n_offset: u32,
    ldy: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<f16>;
@group(0) @binding(1) var<storage, read> w: array<f16>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const BM: u32 = 8u * S;
const BN: u32 = 8u * S;
var<workgroup> cs: array<f32, 8u * S * S>;

// `inside` is uniform over the workgroup (its whole tile lies within M), so the staged
// path's barriers are reached by every invocation or by none.
fn store_tile(acc: CC, inside: bool, sg: u32, lane: u32, sg_size: u32, m_base: u32, n_base: u32) {
    // (Stride and offset as named values: naga 30's SPIR-V writer does not emit a stride
    // expression written inline in the store.)
    let ldy = p.ldy;
    let at = m_base * ldy + p.n_offset + n_base;
    if inside {
        coopStoreT(acc, &y[at], ldy);
        return;
    }
    coopStoreT(acc, &cs[sg * S * S], S);
    workgroupBarrier();
    for (var e = lane; e < S * S; e += sg_size) {
        let r = e / S;
        let m = m_base + r;
        if m < p.m {
            y[m * p.ldy + p.n_offset + n_base + e - r * S] = cs[sg * S * S + e];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn gemm_coop_direct(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_id) sg: u32,
                    @builtin(subgroup_invocation_id) lane: u32,
                    @builtin(subgroup_size) sg_size: u32) {
    let m0 = wg.y * BM + (sg / 4u) * 4u * S;
    let n0 = wg.x * BN + (sg % 4u) * 2u * S;
    var c00 = CC();
    var c01 = CC();
    var c10 = CC();
    var c11 = CC();
    var c20 = CC();
    var c21 = CC();
    var c30 = CC();
    var c31 = CC();
    let k = p.k;
    for (var kk = 0u; kk < k; kk += S) {
        let b0 = coopLoad<CB>(&w[n0 * k + kk], k);
        let b1 = coopLoad<CB>(&w[(n0 + S) * k + kk], k);
        let a0 = coopLoadT<CA>(&x[m0 * k + kk], k);
        c00 = coopMultiplyAdd(a0, b0, c00);
        c01 = coopMultiplyAdd(a0, b1, c01);
        let a1 = coopLoadT<CA>(&x[(m0 + S) * k + kk], k);
        c10 = coopMultiplyAdd(a1, b0, c10);
        c11 = coopMultiplyAdd(a1, b1, c11);
        let a2 = coopLoadT<CA>(&x[(m0 + 2u * S) * k + kk], k);
        c20 = coopMultiplyAdd(a2, b0, c20);
        c21 = coopMultiplyAdd(a2, b1, c21);
        let a3 = coopLoadT<CA>(&x[(m0 + 3u * S) * k + kk], k);
        c30 = coopMultiplyAdd(a3, b0, c30);
        c31 = coopMultiplyAdd(a3, b1, c31);
    }
    let inside = wg.y * BM + BM <= p.m;
    store_tile(c00, inside, sg, lane, sg_size, m0, n0);
    store_tile(c01, inside, sg, lane, sg_size, m0, n0 + S);
    store_tile(c10, inside, sg, lane, sg_size, m0 + S, n0);
    store_tile(c11, inside, sg, lane, sg_size, m0 + S, n0 + S);
    store_tile(c20, inside, sg, lane, sg_size, m0 + 2u * S, n0);
    store_tile(c21, inside, sg, lane, sg_size, m0 + 2u * S, n0 + S);
    store_tile(c30, inside, sg, lane, sg_size, m0 + 3u * S, n0);
    store_tile(c31, inside, sg, lane, sg_size, m0 + 3u * S, n0 + S);
}
