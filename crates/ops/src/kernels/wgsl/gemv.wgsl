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
// SPLITX: x is the split-K partials of decode attention (binding 0: paged_attention_coop's
// per-split outputs, binding 4: their (max, sum) pairs), reduced here as
// attention_reduce.wgsl would: each workgroup first turns the pairs into one weight per
// (token, query head, split), then every x vector it loads is the weighted sum of its
// splits' vectors. The attention needs no reduce dispatch (nor its barrier) before the
// output projection. Rows of x: HQ heads of D (HG of them per kv head), `splits` splits.
// TAIL (gemv_tail.wgsl; gemv_no_tail.wgsl without): n_tail rows of a second matrix after
// the main n, in workgroups of their own.
// Prelude: M, WG, TPR, RPT, W_DTYPE, NORM, ACCUM, SPLITX, HQ, HG, D, MAXS (splits held).
struct Params {
    n: u32,
    k: u32,
    n_offset: u32,
    ldy: u32,
    eps: f32,
    // SPLITX: kv heads and splits of the partials.
    hkv: u32,
    splits: u32,
    // TAIL: rows of the tail matrix.
    n_tail: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
// The norm weight (NORM; a dummy otherwise).
@group(0) @binding(3) var<storage, read> norm_w: array<vec4<f32>>;
// SPLITX: the partials' (max, sum) pairs (a dummy otherwise).
@group(0) @binding(4) var<storage, read> ml: array<vec2<f32>>;

const GROUPS: u32 = WG / TPR;
const ACC: u32 = M * RPT;
// Partial sums per subgroup: the products, then (NORM) the M sums of squares.
const SLOTS: u32 = ACC + select(0u, M, NORM);
var<workgroup> partial: array<f32, (WG / 4u) * SLOTS>;
// SPLITX: weight of split s for (token m, query head q) at (m HQ + q) MAXS + s.
var<workgroup> split_w: array<f32, select(1u, M * HQ * MAXS, SPLITX)>;

// Vector `at` of the RPT rows from row0 (rows of `stride` vectors; past n, row n - 1) of the
// main matrix, or of the tail's in a tail workgroup: one branch for all of them, so their
// loads issue together (a branch per load cost the 3-row split dearly).
fn w_rows(tail: bool, row0: u32, n: u32, stride: u32, at: u32) -> array<vec4<u32>, RPT> {
    var v: array<vec4<u32>, RPT>;
    if TAIL && tail {
        for (var r = 0u; r < RPT; r++) {
            v[r] = tail_w(min(row0 + r, n - 1u) * stride + at);
        }
    } else {
        for (var r = 0u; r < RPT; r++) {
            v[r] = w[min(row0 + r, n - 1u) * stride + at];
        }
    }
    return v;
}

// NORM: vector i of the norm weight for this workgroup's rows.
fn norm_at(tail: bool, i: u32) -> vec4<f32> {
    if TAIL && tail {
        return tail_norm(i);
    }
    return norm_w[i];
}

// Vector v of x row m: loaded, or (SPLITX) the weighted sum of the splits' vectors.
fn x_vec(m: u32, v: u32) -> vec4<f32> {
    if !SPLITX {
        return x[m * (p.k / 4u) + v];
    }
    let e = 4u * v;
    let q = e / D;
    let h = q / HG;
    // Split 0's element; split s is s HG D further.
    let base = (m * p.hkv + h) * p.splits * HG * D + e - h * HG * D;
    var acc = vec4<f32>(0.0);
    for (var s = 0u; s < p.splits; s++) {
        acc += split_w[(m * HQ + q) * MAXS + s] * x[(base + s * HG * D) / 4u];
    }
    return acc;
}

// SPLITX: the splits' weights e^(m_s - M) / sum_s e^(m_s - M) l_s of every (token, query
// head); zero for a token without context (l = 0 everywhere).
fn split_weights(li: u32) {
    for (var i = li; i < M * HQ; i += WG) {
        let m = i / HQ;
        let q = i - m * HQ;
        let h = q / HG;
        let first = (m * p.hkv + h) * p.splits * HG + q - h * HG;
        var mx = -3.4e38;
        for (var s = 0u; s < p.splits; s++) {
            mx = max(mx, ml[first + s * HG].x);
        }
        var l = 0.0;
        for (var s = 0u; s < p.splits; s++) {
            let v = ml[first + s * HG];
            l += v.y * exp(v.x - mx);
        }
        for (var s = 0u; s < p.splits; s++) {
            let v = ml[first + s * HG];
            split_w[i * MAXS + s] = select(0.0, exp(v.x - mx) / l, l > 0.0);
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn gemv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) sg_size: u32) {
    // TAIL: the workgroups past the main rows' take the tail rows.
    let group = flat_group(wg, nwg);
    let main_groups = (p.n + GROUPS * RPT - 1u) / (GROUPS * RPT);
    let tail = TAIL && group >= main_groups;
    let n = select(p.n, p.n_tail, tail);
    let wg_row0 = (group - select(0u, main_groups, tail)) * GROUPS * RPT;
    if wg_row0 >= n {
        return;
    }
    if SPLITX {
        split_weights(li);
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
            let wv = w_rows(tail, row0, n, kx, i);
            var nw = vec4<f32>(1.0);
            if NORM {
                nw = norm_at(tail, i);
            }
            for (var m = 0u; m < M; m++) {
                var xv = x_vec(m, i);
                if NORM {
                    ssq[m] += dot(xv, xv);
                    xv *= nw;
                }
                for (var r = 0u; r < RPT; r++) {
                    acc[m * RPT + r] += dot(bitcast<vec4<f32>>(wv[r]), xv);
                }
            }
        }
    } else {
        // Each weight vector is converted once and each x vector loaded once per step:
        // the RPT rows' halves wait in registers while the M x rows stream past them.
        let kv = p.k / 8u;
        for (var i = lt; i < kv; i += TPR) {
            let wv = w_rows(tail, row0, n, kv, i);
            var wa: array<vec4<f32>, RPT>;
            var wb: array<vec4<f32>, RPT>;
            for (var r = 0u; r < RPT; r++) {
                wa[r] = vec4<f32>(half2_to_f32(wv[r].x, W_DTYPE), half2_to_f32(wv[r].y, W_DTYPE));
                wb[r] = vec4<f32>(half2_to_f32(wv[r].z, W_DTYPE), half2_to_f32(wv[r].w, W_DTYPE));
            }
            var n0 = vec4<f32>(1.0);
            var n1 = vec4<f32>(1.0);
            if NORM {
                n0 = norm_at(tail, 2u * i);
                n1 = norm_at(tail, 2u * i + 1u);
            }
            for (var m = 0u; m < M; m++) {
                var x0 = x_vec(m, 2u * i);
                var x1 = x_vec(m, 2u * i + 1u);
                if NORM {
                    ssq[m] += dot(x0, x0) + dot(x1, x1);
                    x0 *= n0;
                    x1 *= n1;
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
        if NORM && !tail {
            total *= inverseSqrt(ss / f32(p.k) + p.eps);
        }
        let row = wg_row0 + og * RPT + r;
        if tail && row < n {
            tail_put(m * p.n_tail + row, total);
        } else if !tail && row < n {
            let o = m * p.ldy + p.n_offset + row;
            if ACCUM {
                y[o] += total;
            } else {
                y[o] = total;
            }
        }
    }
}
