// y[m, n_offset + n] = sum_k x[m, k] * W[n, k] for a few rows of x (decode). Weight rows
// stream through 128-bit loads; TPR invocations share a row (so short rows still fill the
// workgroup) and each keeps M x RPT partial sums for its RPT rows, reduced by subgroupAdd
// and then across the TPR / subgroup_size subgroups of its row group in workgroup memory.
// TPR is a multiple of the subgroup size (the launcher checks), so no subgroup straddles
// two row groups.
// W_DTYPE: 0 = f32 (4 per vec4<u32>), 1 = f16, 2 = bf16 (8 per vec4<u32>).
// NORM: the x rows are raw residual-stream rows and the product is with their RMSNorm,
// rmsnorm(x) = x * g / sqrt(mean(x^2) + eps): y = rstd(x) * W (x * g). Each row group sums
// the squares of its own share of k alongside the products (so it sees all of k), and the
// sums are reduced with them: the norm costs no pass and no dispatch of its own.
// ACCUM: y += the product (a residual add in the epilogue), else y = the product.
// Prelude: M, WG, TPR, RPT, W_DTYPE, NORM, ACCUM.
struct Params {
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

const GROUPS: u32 = WG / TPR;
const ACC: u32 = M * RPT;
// Partial sums per subgroup: the products, then (NORM) the M sums of squares.
const SLOTS: u32 = ACC + select(0u, M, NORM);
var<workgroup> partial: array<f32, (WG / 4u) * SLOTS>;

@compute @workgroup_size(WG)
fn gemv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) sg_size: u32) {
    let wg_row0 = flat_group(wg, nwg) * GROUPS * RPT;
    if wg_row0 >= p.n {
        return;
    }
    let g = li / TPR;
    let lt = li - g * TPR;
    let row0 = wg_row0 + g * RPT;
    var acc: array<f32, ACC>;
    for (var j = 0u; j < ACC; j++) {
        acc[j] = 0.0;
    }
    // Sums of squares of the x rows (NORM).
    var ssq: array<f32, M>;
    for (var m = 0u; m < M; m++) {
        ssq[m] = 0.0;
    }
    let kx = p.k / 4u;
    if W_DTYPE == 0u {
        for (var i = lt; i < kx; i += TPR) {
            for (var m = 0u; m < M; m++) {
                var xv = x[m * kx + i];
                if NORM {
                    ssq[m] += dot(xv, xv);
                    xv *= norm_w[i];
                }
                for (var r = 0u; r < RPT; r++) {
                    let row = min(row0 + r, p.n - 1u);
                    acc[m * RPT + r] += dot(bitcast<vec4<f32>>(w[row * kx + i]), xv);
                }
            }
        }
    } else {
        // Each weight vector is converted once and each x vector loaded once per step:
        // the RPT rows' halves wait in registers while the M x rows stream past them.
        let kv = p.k / 8u;
        for (var i = lt; i < kv; i += TPR) {
            var wa: array<vec4<f32>, RPT>;
            var wb: array<vec4<f32>, RPT>;
            for (var r = 0u; r < RPT; r++) {
                let wv = w[min(row0 + r, p.n - 1u) * kv + i];
                wa[r] = vec4<f32>(half2_to_f32(wv.x, W_DTYPE), half2_to_f32(wv.y, W_DTYPE));
                wb[r] = vec4<f32>(half2_to_f32(wv.z, W_DTYPE), half2_to_f32(wv.w, W_DTYPE));
            }
            for (var m = 0u; m < M; m++) {
                var x0 = x[m * kx + 2u * i];
                var x1 = x[m * kx + 2u * i + 1u];
                if NORM {
                    ssq[m] += dot(x0, x0) + dot(x1, x1);
                    x0 *= norm_w[2u * i];
                    x1 *= norm_w[2u * i + 1u];
                }
                for (var r = 0u; r < RPT; r++) {
                    acc[m * RPT + r] += dot(wa[r], x0) + dot(wb[r], x1);
                }
            }
        }
    }
    for (var j = 0u; j < ACC; j++) {
        let s = subgroupAdd(acc[j]);
        if lane == 0u {
            partial[sg * SLOTS + j] = s;
        }
    }
    if NORM {
        for (var m = 0u; m < M; m++) {
            let s = subgroupAdd(ssq[m]);
            if lane == 0u {
                partial[sg * SLOTS + min(ACC + m, SLOTS - 1u)] = s;
            }
        }
    }
    workgroupBarrier();
    if li < GROUPS * ACC {
        let og = li / ACC;
        let j = li - og * ACC;
        let m = j / RPT;
        let r = j - m * RPT;
        let per = TPR / sg_size;
        var total = 0.0;
        var ss = 0.0;
        for (var s = og * per; s < (og + 1u) * per; s++) {
            total += partial[s * SLOTS + j];
            if NORM {
                ss += partial[s * SLOTS + min(ACC + m, SLOTS - 1u)];
            }
        }
        if NORM {
            total *= inverseSqrt(ss / f32(p.k) + p.eps);
        }
        let row = wg_row0 + og * RPT + r;
        if row < p.n {
            let o = m * p.ldy + p.n_offset + row;
            if ACCUM {
                y[o] += total;
            } else {
                y[o] = total;
            }
        }
    }
}
