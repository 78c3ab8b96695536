// Skinny cooperative-matrix GEMM for decode batches and short prefills:
// y[m, n_offset + n] (= or +=) sum_k x[m, k] W[n, k], on the matrix units instead of the
// GEMV's scalar multiply-adds, which are bound by instruction issue from a few rows on.
// A workgroup owns BN = FN x S output columns of a block of MR = FM x S rows (workgroup
// z: the block; one block up to 4 S rows, e.g. 64); its NSG subgroups split K: the
// subgroup sg multiplies slices sg, sg + NSG, sg + 2 NSG, ... of depth BK, each staged (as
// f16, through gemm_coop_stage_*.wgsl) in the subgroup's own workgroup memory, with the
// next slice's global loads held in registers while the current one multiplies. The
// partial products then meet in workgroup memory and are summed. Many narrow workgroups,
// each with K split NSG ways, keep enough weight loads in flight to stream the weights.
// SUB_SYNC: the staging needs only subgroup barriers (devices that order workgroup memory
// at them: GpuContext::subgroup_barrier_orders_shared); else workgroup barriers, which the
// uniform trip count allows.
// NORM: x rows are raw residual-stream rows and the product is with rmsnorm(x) * norm_w:
// the staged x is multiplied by norm_w, each lane sums the squares of what it loads (the
// same rows every slice), and the result rows are scaled by 1 / rms at the end.
// ACCUM: y += the product (a residual add), else y = the product.
// Needs subgroups of 32 and K % 8 == 0. Prelude: S, FM (1..4), FN (1 or 2), NSG, BK (a
// multiple of S: 32, 64 or 128), PAD, SUB_SYNC, NORM, ACCUM, W_DTYPE, aliases CA, CB, CC.
struct Params {
    m: u32,
    n: u32,
    k: u32,
    n_offset: u32,
    ldy: u32,
    eps: f32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
// The norm weight (NORM; a dummy otherwise).
@group(0) @binding(3) var<storage, read> norm_w: array<vec4<f32>>;

const WG: u32 = 32u * NSG;
const MR: u32 = FM * S;
const BN: u32 = FN * S;
const LDS: u32 = BK + PAD;
const LDE: u32 = LDS / SHW;
// Per lane and slice: vec4<f32> loads of x, vec4<u32> (8 halves) loads of W.
const XL: u32 = MR * BK / 4u / 32u;
const WL: u32 = BN * BK / 8u / 32u;
// x vectors per staged row, and the rows one load step of the subgroup covers.
const XV: u32 = BK / 4u;
const X_ROWS_PER_STEP: u32 = 32u / XV;
var<workgroup> xs: array<SH, NSG * MR * LDE>;
var<workgroup> ws: array<SH, NSG * BN * LDE>;
var<workgroup> red: array<f32, NSG * MR * BN>;
// Lanes' sums of squares (NORM). Sized the same without NORM: with a one-element array
// there (array<f32, select(1u, .., NORM)>) the kernel computed wrong products on the
// H100 (naga's SPIR-V or NVIDIA's driver; not isolated), and every split passes sized
// like this.
var<workgroup> sq: array<f32, NSG * XL * 32u>;
var<workgroup> rs: array<f32, MR>;

// First row of this workgroup's block.
var<private> m0: u32;

fn x_load(r: u32, k: u32) -> vec4<f32> {
    if m0 + r < p.m && k < p.k {
        return x[((m0 + r) * p.k + k) / 4u];
    }
    return vec4<f32>(0.0);
}

fn norm_load(k: u32) -> vec4<f32> {
    if k < p.k {
        return norm_w[k / 4u];
    }
    return vec4<f32>(0.0);
}

fn w_load(n: u32, k: u32) -> vec4<u32> {
    if n < p.n && k < p.k {
        return w[(n * p.k + k) / 8u];
    }
    return vec4<u32>(0u);
}

// Global loads of this subgroup's slice at k0 into registers (zeros past the edges): x,
// the norm weight (NORM) and W.
fn load_slice(k0: u32, n0: u32, lane: u32, xr: ptr<function, array<vec4<f32>, XL>>,
              nr: ptr<function, array<vec4<f32>, XL>>,
              wr: ptr<function, array<vec4<u32>, WL>>) {
    for (var j = 0u; j < XL; j++) {
        let idx = lane + j * 32u;
        (*xr)[j] = x_load(idx / XV, k0 + (idx % XV) * 4u);
        if NORM {
            (*nr)[j] = norm_load(k0 + (idx % XV) * 4u);
        }
    }
    for (var j = 0u; j < WL; j++) {
        let idx = lane + j * 32u;
        (*wr)[j] = w_load(n0 + idx / (BK / 8u), k0 + (idx % (BK / 8u)) * 8u);
    }
}

fn sync() {
    if SUB_SYNC {
        subgroupBarrier();
    } else {
        workgroupBarrier();
    }
}

@compute @workgroup_size(WG)
fn gemm_skinny(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
               @builtin(subgroup_invocation_id) lane: u32) {
    // (Workgroups past the last tile of a two-dimensional grid load zeros and store
    // nothing: a return here would break the uniform control flow matrix loads need.)
    let n0 = flat_group(wg, nwg) * BN;
    m0 = wg.z * MR;
    let xb = sg * MR * LDE;
    let wb = sg * BN * LDE;
    var c00 = CC();
    var c01 = CC();
    var c10 = CC();
    var c11 = CC();
    var c20 = CC();
    var c21 = CC();
    var c30 = CC();
    var c31 = CC();
    var xr: array<vec4<f32>, XL>;
    // The norm weight's vectors for the x vectors in flight (NORM), prefetched with them.
    var nr: array<vec4<f32>, XL>;
    var wr: array<vec4<u32>, WL>;
    var ssq: array<f32, XL>;
    for (var j = 0u; j < XL; j++) {
        ssq[j] = 0.0;
    }
    let slices = (p.k + BK - 1u) / BK;
    let trips = (slices + NSG - 1u) / NSG;
    var k0 = sg * BK;
    load_slice(k0, n0, lane, &xr, &nr, &wr);
    for (var t = 0u; t < trips; t++) {
        for (var j = 0u; j < XL; j++) {
            let idx = lane + j * 32u;
            var v = xr[j];
            if NORM {
                ssq[j] += dot(v, v);
                v *= nr[j];
            }
            stage_x(xb * SHW + (idx / XV) * LDS + (idx % XV) * 4u, v);
        }
        for (var j = 0u; j < WL; j++) {
            let idx = lane + j * 32u;
            stage_w(wb * SHW + (idx / (BK / 8u)) * LDS + (idx % (BK / 8u)) * 8u, wr[j]);
        }
        sync();
        // The next slice's loads, in flight while this one multiplies.
        k0 += NSG * BK;
        if t + 1u < trips {
            load_slice(k0, n0, lane, &xr, &nr, &wr);
        }
        for (var kk = 0u; kk < BK; kk += S) {
            let b0 = coopLoad<CB>(&ws[wb + kk / SHW], LDE);
            var b1 = CB();
            if FN == 2u {
                b1 = coopLoad<CB>(&ws[wb + (S * LDS + kk) / SHW], LDE);
            }
            let a0 = coopLoadT<CA>(&xs[xb + kk / SHW], LDE);
            c00 = coopMultiplyAdd(a0, b0, c00);
            if FN == 2u {
                c01 = coopMultiplyAdd(a0, b1, c01);
            }
            if FM > 1u {
                let a1 = coopLoadT<CA>(&xs[xb + (S * LDS + kk) / SHW], LDE);
                c10 = coopMultiplyAdd(a1, b0, c10);
                if FN == 2u {
                    c11 = coopMultiplyAdd(a1, b1, c11);
                }
            }
            if FM > 2u {
                let a2 = coopLoadT<CA>(&xs[xb + (2u * S * LDS + kk) / SHW], LDE);
                c20 = coopMultiplyAdd(a2, b0, c20);
                if FN == 2u {
                    c21 = coopMultiplyAdd(a2, b1, c21);
                }
            }
            if FM > 3u {
                let a3 = coopLoadT<CA>(&xs[xb + (3u * S * LDS + kk) / SHW], LDE);
                c30 = coopMultiplyAdd(a3, b0, c30);
                if FN == 2u {
                    c31 = coopMultiplyAdd(a3, b1, c31);
                }
            }
        }
        sync();
    }
    // Each subgroup's partial tile, row-major MR x BN, then the sum over subgroups.
    let rb = sg * MR * BN;
    coopStoreT(c00, &red[rb], BN);
    if FN == 2u {
        coopStoreT(c01, &red[rb + S], BN);
    }
    if FM > 1u {
        coopStoreT(c10, &red[rb + S * BN], BN);
        if FN == 2u {
            coopStoreT(c11, &red[rb + S * BN + S], BN);
        }
    }
    if FM > 2u {
        coopStoreT(c20, &red[rb + 2u * S * BN], BN);
        if FN == 2u {
            coopStoreT(c21, &red[rb + 2u * S * BN + S], BN);
        }
    }
    if FM > 3u {
        coopStoreT(c30, &red[rb + 3u * S * BN], BN);
        if FN == 2u {
            coopStoreT(c31, &red[rb + 3u * S * BN + S], BN);
        }
    }
    if NORM {
        for (var j = 0u; j < XL; j++) {
            sq[(sg * XL + j) * 32u + lane] = ssq[j];
        }
    }
    workgroupBarrier();
    if NORM {
        // Row r's squares: load step j = r / X_ROWS_PER_STEP, lanes of its XV vectors.
        if li < MR {
            let j = li / X_ROWS_PER_STEP;
            let l0 = (li % X_ROWS_PER_STEP) * XV;
            var s = 0.0;
            for (var g = 0u; g < NSG; g++) {
                for (var l = l0; l < l0 + XV; l++) {
                    s += sq[(g * XL + j) * 32u + l];
                }
            }
            rs[li] = inverseSqrt(s / f32(p.k) + p.eps);
        }
        workgroupBarrier();
    }
    let rows = min(p.m - m0, MR);
    for (var e = li; e < rows * BN; e += WG) {
        let r = e / BN;
        let c = e % BN;
        if n0 + c < p.n {
            var v = 0.0;
            for (var g = 0u; g < NSG; g++) {
                v += red[g * MR * BN + e];
            }
            if NORM {
                v *= rs[r];
            }
            let o = (m0 + r) * p.ldy + p.n_offset + n0 + c;
            if ACCUM {
                y[o] += v;
            } else {
                y[o] = v;
            }
        }
    }
}
