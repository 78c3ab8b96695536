// Cooperative-matrix GEMM core (tensor cores / Apple simdgroup matrices) for prefill-sized
// M: C[m, n] = sum_k X[m, k] * W[n, k], f16 inputs, f32 accumulation. The front file in
// front of this one says where rows come from and where results go (gemm_coop_dense.wgsl:
// plain row-major matrices; moe_coop.wgsl: the rows of one expert's routing tile):
//   setup(wg) -> bool        per-workgroup state; false: nothing to do (uniform);
//   x_load(r, k) -> vec4<f32>  X[r, k .. k + 4) of local row r (zeros past the edges);
//   w_load(n, k) -> vec4<u32>  W[n, k .. k + 8) packed halves (zeros past the edges);
//   emit(r, n, i)            writes result cs[i] of local row r, column n.
// 256 invocations = 8 subgroups of 32 (the launcher checks) in a 2 x 4 grid; each subgroup
// owns a (4 S) x (2 S) block of the (8 S) x (8 S) workgroup tile as eight S x S accumulators.
// X (f32) and W (f16 or bf16) slices of depth BK = 32 are staged as f16 in workgroup memory,
// through the helpers of gemm_coop_stage_*.wgsl: as scalars (SHW = 1; Metal's simdgroup
// loads take scalar pointers) or as vec4<f16> (SHW = 4; a quarter of the stores, and the
// fragment stride counts vectors), chosen by the launcher.
// Needs K % 8 == 0 (128-bit loads). Prelude: S (8 or 16), W_DTYPE, aliases CA, CB, CC.

const BM: u32 = 8u * S;
const BN: u32 = 8u * S;
const BK: u32 = 32u;
// Staged row stride, in halves and in shared elements.
const LDS: u32 = BK;
const LDE: u32 = LDS / SHW;
const X_LOADS: u32 = BM * BK / 4u / 256u;
const W_LOADS: u32 = BN * BK / 8u / 256u;
var<workgroup> xs: array<SH, BM * LDE>;
var<workgroup> ws: array<SH, BN * LDE>;
var<workgroup> cs: array<f32, 8u * S * S>;

fn store_tile(acc: CC, sg: u32, lane: u32, sg_size: u32, m_base: u32, n_base: u32) {
    coopStoreT(acc, &cs[sg * S * S], S);
    workgroupBarrier();
    for (var e = lane; e < S * S; e += sg_size) {
        let r = e / S;
        emit(m_base + r, n_base + e - r * S, sg * S * S + e);
    }
    workgroupBarrier();
}

// Global loads of one BK-deep slice of x and W into registers (zeros past the edges).
fn load_slice(k0: u32, n0: u32, li: u32,
              xr: ptr<function, array<vec4<f32>, X_LOADS>>,
              wr: ptr<function, array<vec4<u32>, W_LOADS>>) {
    for (var j = 0u; j < X_LOADS; j++) {
        let idx = li + j * 256u;
        let r = idx / (BK / 4u);
        (*xr)[j] = x_load(r, k0 + (idx - r * (BK / 4u)) * 4u);
    }
    for (var j = 0u; j < W_LOADS; j++) {
        let idx = li + j * 256u;
        let r = idx / (BK / 8u);
        (*wr)[j] = w_load(n0 + r, k0 + (idx - r * (BK / 8u)) * 8u);
    }
}

@compute @workgroup_size(256)
fn gemm_coop(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,
             @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32,
             @builtin(subgroup_size) sg_size: u32) {
    if !setup(wg) {
        return;
    }
    let n0 = wg.x * BN;
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
    var xr: array<vec4<f32>, X_LOADS>;
    var wr: array<vec4<u32>, W_LOADS>;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        load_slice(k0, n0, li, &xr, &wr);
        for (var j = 0u; j < X_LOADS; j++) {
            let idx = li + j * 256u;
            let r = idx / (BK / 4u);
            stage_x(r * LDS + (idx - r * (BK / 4u)) * 4u, xr[j]);
        }
        for (var j = 0u; j < W_LOADS; j++) {
            let idx = li + j * 256u;
            let r = idx / (BK / 8u);
            stage_w(r * LDS + (idx - r * (BK / 8u)) * 8u, wr[j]);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += S) {
            let b0 = coopLoad<CB>(&ws[(wn * LDS + kk) / SHW], LDE);
            let b1 = coopLoad<CB>(&ws[((wn + S) * LDS + kk) / SHW], LDE);
            let a0 = coopLoadT<CA>(&xs[(wm * LDS + kk) / SHW], LDE);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            let a1 = coopLoadT<CA>(&xs[((wm + S) * LDS + kk) / SHW], LDE);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            let a2 = coopLoadT<CA>(&xs[((wm + 2u * S) * LDS + kk) / SHW], LDE);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            let a3 = coopLoadT<CA>(&xs[((wm + 3u * S) * LDS + kk) / SHW], LDE);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
        }
        workgroupBarrier();
    }
    let mb = wm;
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
