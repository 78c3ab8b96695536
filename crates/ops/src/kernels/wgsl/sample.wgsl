// Random sampling on the GPU (temperature, min-p, top-k, top-p), so that only one id per
// row comes back. Row r's parameters are two vec4: (temperature, min_p, u, top_p) and
// (top_k, 0, 0, 0). Weights are w_i = exp((x_i - max) / T), zero where w_i < min_p (min-p:
// p_i >= min_p * p_max), for NaN or -inf logits, and below the row's threshold (top-k:
// the k-th largest logit, ties kept; top-p: the smallest set of the largest logits whose
// weight reaches top_p of what top-k kept); the token is the inverse CDF at u * sum(w)
// over ids in increasing order. T <= 0 (greedy), a row with nothing finite, or zero total
// weight give the argmax. After argmax_blocks (argmax.wgsl), whose per-block (max, index)
// pairs give each row its max and its argmax:
//   search_hist / search_narrow: top-k and top-p thresholds by a 16-way search over the
//                order-preserving u32 keys of the logits, PASSES passes each (recorded
//                only when some row asks): every pass spreads each row over its blocks
//                (search_hist: a 16-bin histogram of the keys in the row's current range,
//                counts for top-k, weights for top-p), then search_narrow sums a row's
//                bins and narrows its range to the bin where the count or weight at and
//                above reaches the goal;
//   sample_sums: one workgroup per (row, BLOCK-wide block): the block's weight sum;
//   sample_pick: one workgroup per row: the block holding the draw (serially over the
//                row's block sums), then within it a workgroup scan of 16-entry runs and
//                a walk of the run holding the draw.
// Prelude: BLOCK (4096: 256 invocations x 16 entries).
struct Params {
    m: u32,
    n: u32,
    blocks: u32,
    step: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> partial: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> row_params: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> sums: array<f32>;
@group(0) @binding(4) var<storage, read_write> ids: array<u32>;
@group(0) @binding(5) var<storage, read_write> thresholds: array<u32>;
// Search state per row: (lo, hi, top-k key, -), (top-p goal bits, -, -, -).
@group(0) @binding(6) var<storage, read_write> search: array<vec4<u32>>;
// Search histograms: [row, block, 16].
@group(0) @binding(7) var<storage, read_write> hist: array<f32>;

// Passes per threshold: each narrows the range 16-fold, so 8 cover 32 bits; one is slack.
const PASSES: u32 = 9u;

const RUN: u32 = BLOCK / 256u;
const NOT_FOUND: u32 = 0xffffffffu;

var<workgroup> found: atomic<u32>;
var<workgroup> last_positive: atomic<u32>;

// The largest non-NaN block maximum of the row (-3.4e38 when there is none).
fn row_max(row: u32) -> f32 {
    var mx = -3.4e38;
    for (var b = 0u; b < p.blocks; b++) {
        let v = bitcast<f32>(partial[row * p.blocks + b].x);
        if v > mx {
            mx = v;
        }
    }
    return mx;
}

fn weight(x: f32, mx: f32, t: f32, min_p: f32, tkey: u32) -> f32 {
    if key(x) < tkey {
        return 0.0;
    }
    let z = (x - mx) / t;
    // NaN and -inf (and anything below exp's range) weigh nothing.
    if !(z > -87.0) {
        return 0.0;
    }
    let w = exp(min(z, 0.0));
    if min_p > 0.0 && w < min_p {
        return 0.0;
    }
    return w;
}

var<workgroup> bins: array<f32, 64u * 16u>;
var<workgroup> row_bins: array<f32, 16>;

fn wants_top_k(row: u32, rp: vec4<f32>) -> bool {
    let k = u32(row_params[2u * row + 1u].x);
    return rp.x > 0.0 && k > 0u && k < p.n;
}

fn wants_top_p(rp: vec4<f32>) -> bool {
    return rp.x > 0.0 && rp.w < 1.0;
}

// Passes 0 .. PASSES - 1 search the top-k key (counts), the next PASSES the top-p key
// (weights of logits at or above the top-k key). The range [lo, hi] is cut by pivots
// lo + j s (j = 1..15, s = (hi - lo) / 16 + 1) into 16 bins; each logit adds to the bin
// of its key, and the count or weight at and above a pivot is the sum of the bins from
// it up.
@compute @workgroup_size(256)
fn search_hist(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
               @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let g = wg.x + wg.y * nwg.x;
    if g >= p.m * p.blocks {
        return;
    }
    let row = g / p.blocks;
    let b = g - row * p.blocks;
    let rp = row_params[2u * row];
    let st = search[2u * row];
    let counting = p.step < PASSES;
    let searching = select(wants_top_p(rp), wants_top_k(row, rp), counting) && st.x < st.y;
    var acc: array<f32, 16>;
    if searching {
        let lo = st.x;
        let s = (st.y - lo) / 16u + 1u;
        let mx = row_max(row);
        let hi = min(b * BLOCK + BLOCK, p.n);
        for (var i = b * BLOCK + li; i < hi; i += 256u) {
            let x = logits[row * p.n + i];
            let k = key(x);
            if k >= lo {
                var v = 1.0;
                if !counting {
                    v = weight(x, mx, rp.x, rp.y, st.z);
                }
                acc[min((k - lo) / s, 15u)] += v;
            }
        }
    }
    for (var j = 0u; j < 16u; j++) {
        let t = subgroupAdd(acc[j]);
        if lane == 0u {
            bins[sg * 16u + j] = t;
        }
    }
    workgroupBarrier();
    if li < 16u {
        var t = 0.0;
        for (var k = 0u; k < nsg; k++) {
            t += bins[k * 16u + li];
        }
        hist[g * 16u + li] = t;
    }
}

@compute @workgroup_size(16)
fn search_narrow(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    if row >= p.m {
        return;
    }
    var t = 0.0;
    for (var b = 0u; b < p.blocks; b++) {
        t += hist[(row * p.blocks + b) * 16u + li];
    }
    row_bins[li] = t;
    workgroupBarrier();
    if li != 0u {
        return;
    }
    let rp = row_params[2u * row];
    var st = search[2u * row];
    var aux = search[2u * row + 1u];
    let counting = p.step < PASSES;
    let searching = select(wants_top_p(rp), wants_top_k(row, rp), counting) && st.x < st.y;
    if searching {
        let lo = st.x;
        let hi = st.y;
        let s = (hi - lo) / 16u + 1u;
        var goal = row_params[2u * row + 1u].x;
        if !counting {
            if p.step == PASSES {
                // The first top-p pass sees every logit at or above the top-k key.
                var total = 0.0;
                for (var j = 0u; j < 16u; j++) {
                    total += row_bins[j];
                }
                aux.x = bitcast<u32>(rp.w * total);
            }
            goal = bitcast<f32>(aux.x);
        }
        var above = 0.0;
        var best = 0u;
        for (var j = 15u; j >= 1u; j--) {
            above += row_bins[j];
            // Pivot j lies inside the range and reaches the goal: the highest such wins.
            if best == 0u && j * s <= hi - lo && above >= goal && above > 0.0 {
                best = j;
            }
        }
        st.x = lo + best * s;
        if best < 15u && (best + 1u) * s - 1u <= hi - lo {
            st.y = lo + (best + 1u) * s - 1u;
        }
    }
    if p.step == PASSES - 1u {
        // The top-k key is found (0 where top-k is off): the threshold unless top-p
        // passes follow and search from it up.
        st.z = st.x;
        st.y = 0xffffffffu;
        thresholds[row] = st.z;
    }
    if p.step == 2u * PASSES - 1u {
        thresholds[row] = select(st.z, st.x, wants_top_p(rp));
    }
    search[2u * row] = st;
    search[2u * row + 1u] = aux;
}

@compute @workgroup_size(256)
fn sample_sums(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
               @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let g = wg.x + wg.y * nwg.x;
    if g >= p.m * p.blocks {
        return;
    }
    let row = g / p.blocks;
    let b = g - row * p.blocks;
    let rp = row_params[2u * row];
    let tkey = thresholds[row];
    var s = 0.0;
    if rp.x > 0.0 {
        let mx = row_max(row);
        let hi = min(b * BLOCK + BLOCK, p.n);
        for (var i = b * BLOCK + li; i < hi; i += 256u) {
            s += weight(logits[row * p.n + i], mx, rp.x, rp.y, tkey);
        }
    }
    let total = wg_sum(s, sg, lane, nsg);
    if li == 0u {
        sums[g] = total;
    }
}

@compute @workgroup_size(256)
fn sample_pick(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
               @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let row = wg.x + wg.y * nwg.x;
    if row >= p.m {
        return;
    }
    let rp = row_params[2u * row];
    let tkey = thresholds[row];
    // The argmax (lowest index on ties), the greedy answer and every fallback.
    var best_v = -3.4e38;
    var best_i = NOT_FOUND;
    for (var b = 0u; b < p.blocks; b++) {
        let c = partial[row * p.blocks + b];
        let v = bitcast<f32>(c.x);
        if v > best_v || best_i == NOT_FOUND {
            best_v = v;
            best_i = c.y;
        }
    }
    // The block holding the draw u * total.
    var total = 0.0;
    for (var b = 0u; b < p.blocks; b++) {
        total += sums[row * p.blocks + b];
    }
    var goal = rp.z * total;
    var block = NOT_FOUND;
    var last = NOT_FOUND;
    for (var b = 0u; b < p.blocks; b++) {
        let s = sums[row * p.blocks + b];
        if s > 0.0 {
            last = b;
            if block == NOT_FOUND {
                if goal < s {
                    block = b;
                } else {
                    goal -= s;
                }
            }
        }
    }
    if block == NOT_FOUND && last != NOT_FOUND {
        // Rounding left the goal past the end: the last block with weight.
        block = last;
        goal = sums[row * p.blocks + last];
    }
    if li == 0u {
        atomicStore(&found, NOT_FOUND);
        atomicStore(&last_positive, 0u);
    }
    // (No early return for greedy rows: the barriers below must be reached by all.)
    let drawing = rp.x > 0.0 && block != NOT_FOUND;
    // Within the block: this invocation's run of RUN entries, its weight, and the
    // weight of the runs before it.
    let mx = row_max(row);
    let lo = block * BLOCK + li * RUN;
    let hi = min(lo + RUN, p.n);
    var s = 0.0;
    if drawing {
        for (var i = lo; i < hi; i++) {
            s += weight(logits[row * p.n + i], mx, rp.x, rp.y, tkey);
        }
    }
    let before_sg = subgroupExclusiveAdd(s);
    let sg_total = subgroupAdd(s);
    if lane == 0u {
        red_f32[sg] = sg_total;
    }
    workgroupBarrier();
    var before = before_sg;
    for (var k = 0u; k < sg; k++) {
        before += red_f32[k];
    }
    if s > 0.0 {
        var c = before;
        var pos = NOT_FOUND;
        for (var i = lo; i < hi; i++) {
            let w = weight(logits[row * p.n + i], mx, rp.x, rp.y, tkey);
            if w > 0.0 {
                pos = i;
                c += w;
                if c > goal {
                    break;
                }
            }
        }
        if before <= goal && goal < before + s {
            atomicMin(&found, pos);
        }
        atomicMax(&last_positive, pos + 1u);
    }
    workgroupBarrier();
    if li == 0u {
        var id = atomicLoad(&found);
        if id == NOT_FOUND {
            // Rounding left the goal past the last run: its last positive entry.
            id = atomicLoad(&last_positive) - 1u;
        }
        if !drawing || atomicLoad(&last_positive) == 0u {
            id = best_i;
        }
        ids[row] = id;
    }
}

// Logits processing before sampling (the host's apply_logits_processors, entry by entry):
// one invocation per (row, token) entry, tokens distinct within a row. Entry: (row, token,
// mask, -) then f32 bits of (bias, 1 / repetition penalty, repetition penalty, -) and
// (frequency penalty x count, presence penalty, -, -). In the host's order: -inf for
// masked stop tokens, + bias, x / penalty if positive else x * penalty, - frequency,
// - presence (the same f32 operations: the same values, within one rounding where the
// driver fuses the multiply and the subtraction, as the H100's does).
struct AdjustParams {
    count: u32,
    n: u32,
}
var<immediate> ap: AdjustParams;

@group(0) @binding(0) var<storage, read_write> adj_logits: array<f32>;
@group(0) @binding(1) var<storage, read> entries: array<vec4<u32>>;

@compute @workgroup_size(64)
fn logits_adjust(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * 64u;
    if e >= ap.count {
        return;
    }
    let a = entries[3u * e];
    let b = bitcast<vec4<f32>>(entries[3u * e + 1u]);
    let c = bitcast<vec4<f32>>(entries[3u * e + 2u]);
    let i = a.x * ap.n + a.y;
    var x = adj_logits[i];
    if a.z != 0u {
        x = bitcast<f32>(0xff800000u);
    }
    x += b.x;
    x *= select(b.z, b.y, x > 0.0);
    x -= c.x;
    x -= c.y;
    adj_logits[i] = x;
}
