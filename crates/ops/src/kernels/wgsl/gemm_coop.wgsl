// Cooperative-matrix GEMM (tensor cores / Apple simdgroup matrices) for prefill-sized M:
// y[m, n_offset + n] = sum_k x[m, k] * W[n, k], f16 inputs, f32 accumulation.
// 256 invocations = 8 subgroups of 32 (the launcher checks) in a 2 x 4 grid; each subgroup
// owns a (4 S) x (2 S) block of the (8 S) x (8 S) workgroup tile as eight S x S accumulators.
// x (f32) and W (f16 or bf16) slices of depth BK are staged as f16 in workgroup memory.
// Needs K % 8 == 0 (128-bit loads); M and N edges are bounds-checked.
// Prelude: S (8 or 16), BK (32 or 64), W_DTYPE, PAD, PREFETCH, and aliases CA, CB, CC for the coop_mat types.
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
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const BM: u32 = 8u * S;
const BN: u32 = 8u * S;
// Row stride of the staged slices: BK plus PAD halves, to spread rows over memory banks.
const LDS: u32 = BK + PAD;
const X_LOADS: u32 = BM * BK / 4u / 256u;
const W_LOADS: u32 = BN * BK / 8u / 256u;
var<workgroup> xs: array<f16, BM * LDS>;
var<workgroup> ws: array<f16, BN * LDS>;
var<workgroup> cs: array<f32, 8u * S * S>;

fn to_f16x2(v: u32) -> vec2<f16> {
    // f16 -> f32 -> f16 is exact; bf16 values beyond f16's range would overflow, but
    // trained weights stay far inside it.
    return vec2<f16>(half2_to_f32(v, W_DTYPE));
}

fn store_tile(acc: CC, sg: u32, lane: u32, sg_size: u32, m_base: u32, n_base: u32) {
    coopStoreT(acc, &cs[sg * S * S], S);
    workgroupBarrier();
    for (var e = lane; e < S * S; e += sg_size) {
        let r = e / S;
        let c = e - r * S;
        let m = m_base + r;
        let n = n_base + c;
        if m < p.m && n < p.n {
            y[m * p.ldy + p.n_offset + n] = cs[sg * S * S + e];
        }
    }
    workgroupBarrier();
}

// Global loads of one BK-deep slice of x and W into registers (zeros past the edges).
fn load_slice(k0: u32, m0: u32, n0: u32, li: u32,
              xr: ptr<function, array<vec4<f32>, X_LOADS>>,
              wr: ptr<function, array<vec4<u32>, W_LOADS>>) {
    for (var j = 0u; j < X_LOADS; j++) {
        let idx = li + j * 256u;
        let r = idx / (BK / 4u);
        let gm = m0 + r;
        let gk = k0 + (idx - r * (BK / 4u)) * 4u;
        var v = vec4<f32>(0.0);
        if gm < p.m && gk < p.k {
            v = x[(gm * p.k + gk) / 4u];
        }
        (*xr)[j] = v;
    }
    for (var j = 0u; j < W_LOADS; j++) {
        let idx = li + j * 256u;
        let r = idx / (BK / 8u);
        let gn = n0 + r;
        let gk = k0 + (idx - r * (BK / 8u)) * 8u;
        var v = vec4<u32>(0u);
        if gn < p.n && gk < p.k {
            v = w[(gn * p.k + gk) / 8u];
        }
        (*wr)[j] = v;
    }
}

@compute @workgroup_size(256)
fn gemm_coop(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,
             @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32,
             @builtin(subgroup_size) sg_size: u32) {
    let n0 = wg.x * BN;
    let m0 = wg.y * BM;
    let wm = (sg / 4u) * 4u * S;
    let wn = (sg % 4u) * 2u * S;
    var c00 = CC();
    var c01 = CC();
    var c10 = CC();
    var c11 = CC();
    var c20 = CC();
    var c21 = CC();
    var c30 = CC();
    var c31 = CC();
    // Software pipelining: the next slice's global loads are issued into registers before
    // the current slice's matrix products, so memory latency hides behind tensor-core work.
    var xr: array<vec4<f32>, X_LOADS>;
    var wr: array<vec4<u32>, W_LOADS>;
    load_slice(0u, m0, n0, li, &xr, &wr);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        if !PREFETCH && k0 > 0u {
            load_slice(k0, m0, n0, li, &xr, &wr);
        }
        for (var j = 0u; j < X_LOADS; j++) {
            let idx = li + j * 256u;
            let r = idx / (BK / 4u);
            let o = r * LDS + (idx - r * (BK / 4u)) * 4u;
            let v = xr[j];
            xs[o] = f16(v.x);
            xs[o + 1u] = f16(v.y);
            xs[o + 2u] = f16(v.z);
            xs[o + 3u] = f16(v.w);
        }
        for (var j = 0u; j < W_LOADS; j++) {
            let idx = li + j * 256u;
            let r = idx / (BK / 8u);
            let o = r * LDS + (idx - r * (BK / 8u)) * 8u;
            let v = wr[j];
            let h0 = to_f16x2(v.x);
            let h1 = to_f16x2(v.y);
            let h2 = to_f16x2(v.z);
            let h3 = to_f16x2(v.w);
            ws[o] = h0.x;
            ws[o + 1u] = h0.y;
            ws[o + 2u] = h1.x;
            ws[o + 3u] = h1.y;
            ws[o + 4u] = h2.x;
            ws[o + 5u] = h2.y;
            ws[o + 6u] = h3.x;
            ws[o + 7u] = h3.y;
        }
        workgroupBarrier();
        if PREFETCH && k0 + BK < p.k {
            load_slice(k0 + BK, m0, n0, li, &xr, &wr);
        }
        for (var kk = 0u; kk < BK; kk += S) {
            let b0 = coopLoad<CB>(&ws[wn * LDS + kk], LDS);
            let b1 = coopLoad<CB>(&ws[(wn + S) * LDS + kk], LDS);
            let a0 = coopLoadT<CA>(&xs[wm * LDS + kk], LDS);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            let a1 = coopLoadT<CA>(&xs[(wm + S) * LDS + kk], LDS);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            let a2 = coopLoadT<CA>(&xs[(wm + 2u * S) * LDS + kk], LDS);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            let a3 = coopLoadT<CA>(&xs[(wm + 3u * S) * LDS + kk], LDS);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
        }
        workgroupBarrier();
    }
    let mb = m0 + wm;
    let nb = n0 + wn;
    store_tile(c00, sg, lane, sg_size, mb, nb);
    store_tile(c01, sg, lane, sg_size, mb, nb + S);
    store_tile(c10, sg, lane, sg_size, mb + S, nb);
    store_tile(c11, sg, lane, sg_size, mb + S, nb + S);
    store_tile(c20, sg, lane, sg_size, mb + 2u * S, nb);
    store_tile(c21, sg, lane, sg_size, mb + 2u * S, nb + S);
    store_tile(c30, sg, lane, sg_size, mb + 3u * S, nb);
    store_tile(c31, sg, lane, sg_size, mb + 3u * S, nb + S);
}
