// Cooperative-matrix GEMM core (tensor cores / Apple simdgroup matrices) for prefill-sized
// M: C[m, n] = sum_k X[m, k] * W[n, k], f16 inputs, f32 accumulation. The front file in
// front of this one says where rows come from and where results go (gemm_coop_dense.wgsl:
// plain row-major matrices; moe_coop.wgsl: the rows of one expert's routing tile):
//   setup(wg) -> bool        per-workgroup state; false: nothing to do (uniform);
//   x_load(r, k) -> vec4<f32>  X[r, k .. k + 4) of local row r (zeros past the edges);
//   w_load(n, k) -> vec4<u32>  W[n, k .. k + 8) packed halves (zeros past the edges);
//   emit4(r, n, i)           writes results cs[i .. i + 4) of local row r, columns n .. n + 4
//                            (n % 4 == 0).
// The workgroup tile is BM = 8 S rows (the MoE routing tiles' height) by BN columns, held
// by 2 x SGN subgroups of 32 (the launcher checks the size); each owns a 4 x FN grid of
// S x S accumulators, FN = 2 or 4. (The accumulators are named variables: in arrays the
// driver spills them to memory, 4x slower on the H100.) X (f32) and W (f16 or bf16) slices of depth BK = 32
// are staged as f16 in workgroup memory, rows PAD halves longer than BK (bank spread),
// through the helpers of gemm_coop_stage_*.wgsl: as scalars (SHW = 1; Metal's simdgroup
// loads take scalar pointers) or as vec4<f16> (SHW = 4: a quarter of the stores, and the
// fragment stride counts vectors). With STAGES = 2 the slices are double-buffered: the
// next slice's global loads are in flight while the current one multiplies, and one
// barrier per slice suffices. With PREFETCH (single buffer) the next slice's global loads
// wait in registers while the current slice multiplies, and are staged after its barrier.
// SUB_EPILOGUE writes the results out with subgroup barriers around each subgroup's own
// staging tile instead of workgroup barriers.
// Needs K % 8 == 0 (128-bit loads). Prelude: S (8 or 16), SGN, FN, STAGES, PAD, BK (32 or
// 64), PREFETCH, SUB_EPILOGUE, W_DTYPE, aliases CA, CB, CC.

const SGM: u32 = 2u;
const FM: u32 = 4u;
const WG: u32 = 32u * SGM * SGN;
const BM: u32 = 8u * S;
const BN: u32 = SGN * FN * S;
// Staged row stride, in halves and in shared elements.
const LDS: u32 = BK + PAD;
const LDE: u32 = LDS / SHW;
const X_LOADS: u32 = BM * BK / 4u / WG;
const W_LOADS: u32 = BN * BK / 8u / WG;
const X_STAGE: u32 = BM * LDE;
const W_STAGE: u32 = BN * LDE;
var<workgroup> xs: array<SH, STAGES * X_STAGE>;
var<workgroup> ws: array<SH, STAGES * W_STAGE>;
var<workgroup> cs: array<f32, SGM * SGN * S * S>;

fn store_tile(acc: CC, sg: u32, lane: u32, sg_size: u32, m_base: u32, n_base: u32) {
    coopStoreT(acc, &cs[sg * S * S], S);
    if SUB_EPILOGUE {
        subgroupBarrier();
    } else {
        workgroupBarrier();
    }
    for (var e = lane * 4u; e < S * S; e += sg_size * 4u) {
        let r = e / S;
        emit4(m_base + r, n_base + e - r * S, sg * S * S + e);
    }
    if SUB_EPILOGUE {
        subgroupBarrier();
    } else {
        workgroupBarrier();
    }
}

// Global loads of one BK-deep slice of x and W into registers (zeros past the edges).
fn load_slice(k0: u32, n0: u32, li: u32,
              xr: ptr<function, array<vec4<f32>, X_LOADS>>,
              wr: ptr<function, array<vec4<u32>, W_LOADS>>) {
    for (var j = 0u; j < X_LOADS; j++) {
        let idx = li + j * WG;
        let r = idx / (BK / 4u);
        (*xr)[j] = x_load(r, k0 + (idx - r * (BK / 4u)) * 4u);
    }
    for (var j = 0u; j < W_LOADS; j++) {
        let idx = li + j * WG;
        let r = idx / (BK / 8u);
        (*wr)[j] = w_load(n0 + r, k0 + (idx - r * (BK / 8u)) * 8u);
    }
}

// Registers of one slice into stage buffer `b`.
fn stage_slice(b: u32, li: u32,
               xr: ptr<function, array<vec4<f32>, X_LOADS>>,
               wr: ptr<function, array<vec4<u32>, W_LOADS>>) {
    for (var j = 0u; j < X_LOADS; j++) {
        let idx = li + j * WG;
        let r = idx / (BK / 4u);
        stage_x(b * X_STAGE * SHW + r * LDS + (idx - r * (BK / 4u)) * 4u, (*xr)[j]);
    }
    for (var j = 0u; j < W_LOADS; j++) {
        let idx = li + j * WG;
        let r = idx / (BK / 8u);
        stage_w(b * W_STAGE * SHW + r * LDS + (idx - r * (BK / 8u)) * 8u, (*wr)[j]);
    }
}

@compute @workgroup_size(WG)
fn gemm_coop(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,
             @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32,
             @builtin(subgroup_size) sg_size: u32) {
    if !setup(wg) {
        return;
    }
    let n0 = wg.x * BN;
    let wm = (sg / SGN) * FM * S;
    let wn = (sg % SGN) * FN * S;
    var c00 = CC();
    var c01 = CC();
    var c02 = CC();
    var c03 = CC();
    var c10 = CC();
    var c11 = CC();
    var c12 = CC();
    var c13 = CC();
    var c20 = CC();
    var c21 = CC();
    var c22 = CC();
    var c23 = CC();
    var c30 = CC();
    var c31 = CC();
    var c32 = CC();
    var c33 = CC();
    var xr: array<vec4<f32>, X_LOADS>;
    var wr: array<vec4<u32>, W_LOADS>;
    var cur = 0u;
    if STAGES == 2u || PREFETCH {
        load_slice(0u, n0, li, &xr, &wr);
    }
    if STAGES == 2u {
        stage_slice(0u, li, &xr, &wr);
        workgroupBarrier();
    }
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        if PREFETCH {
            stage_slice(0u, li, &xr, &wr);
            workgroupBarrier();
            if k0 + BK < p.k {
                load_slice(k0 + BK, n0, li, &xr, &wr);
            }
        } else if STAGES == 1u {
            load_slice(k0, n0, li, &xr, &wr);
            stage_slice(0u, li, &xr, &wr);
            workgroupBarrier();
        } else if k0 + BK < p.k {
            load_slice(k0 + BK, n0, li, &xr, &wr);
        }
        let xb = cur * X_STAGE;
        let wb = cur * W_STAGE;
        for (var kk = 0u; kk < BK; kk += S) {
            let b0 = coopLoad<CB>(&ws[wb + (wn * LDS + kk) / SHW], LDE);
            let b1 = coopLoad<CB>(&ws[wb + ((wn + S) * LDS + kk) / SHW], LDE);
            var b2 = CB();
            var b3 = CB();
            if FN == 4u {
                b2 = coopLoad<CB>(&ws[wb + ((wn + 2u * S) * LDS + kk) / SHW], LDE);
                b3 = coopLoad<CB>(&ws[wb + ((wn + 3u * S) * LDS + kk) / SHW], LDE);
            }
            let a0 = coopLoadT<CA>(&xs[xb + (wm * LDS + kk) / SHW], LDE);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            if FN == 4u {
                c02 = coopMultiplyAdd(a0, b2, c02);
                c03 = coopMultiplyAdd(a0, b3, c03);
            }
            let a1 = coopLoadT<CA>(&xs[xb + ((wm + S) * LDS + kk) / SHW], LDE);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            if FN == 4u {
                c12 = coopMultiplyAdd(a1, b2, c12);
                c13 = coopMultiplyAdd(a1, b3, c13);
            }
            let a2 = coopLoadT<CA>(&xs[xb + ((wm + 2u * S) * LDS + kk) / SHW], LDE);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            if FN == 4u {
                c22 = coopMultiplyAdd(a2, b2, c22);
                c23 = coopMultiplyAdd(a2, b3, c23);
            }
            let a3 = coopLoadT<CA>(&xs[xb + ((wm + 3u * S) * LDS + kk) / SHW], LDE);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
            if FN == 4u {
                c32 = coopMultiplyAdd(a3, b2, c32);
                c33 = coopMultiplyAdd(a3, b3, c33);
            }
        }
        if STAGES == 2u {
            if k0 + BK < p.k {
                cur = 1u - cur;
                stage_slice(cur, li, &xr, &wr);
            }
        }
        workgroupBarrier();
    }
    let nb = n0 + wn;
    store_tile(c00, sg, lane, sg_size, wm, nb);
    store_tile(c01, sg, lane, sg_size, wm, nb + S);
    store_tile(c10, sg, lane, sg_size, wm + S, nb);
    store_tile(c11, sg, lane, sg_size, wm + S, nb + S);
    store_tile(c20, sg, lane, sg_size, wm + 2u * S, nb);
    store_tile(c21, sg, lane, sg_size, wm + 2u * S, nb + S);
    store_tile(c30, sg, lane, sg_size, wm + 3u * S, nb);
    store_tile(c31, sg, lane, sg_size, wm + 3u * S, nb + S);
    if FN == 4u {
        store_tile(c02, sg, lane, sg_size, wm, nb + 2u * S);
        store_tile(c03, sg, lane, sg_size, wm, nb + 3u * S);
        store_tile(c12, sg, lane, sg_size, wm + S, nb + 2u * S);
        store_tile(c13, sg, lane, sg_size, wm + S, nb + 3u * S);
        store_tile(c22, sg, lane, sg_size, wm + 2u * S, nb + 2u * S);
        store_tile(c23, sg, lane, sg_size, wm + 2u * S, nb + 3u * S);
        store_tile(c32, sg, lane, sg_size, wm + 3u * S, nb + 2u * S);
        store_tile(c33, sg, lane, sg_size, wm + 3u * S, nb + 3u * S);
    }
}
