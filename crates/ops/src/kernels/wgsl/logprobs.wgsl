// Logprobs of sampled tokens on the GPU (vLLM's raw logprobs), for the rows that ask:
//   logprobs_gather: copies those rows of the logits before any processing;
//   logprobs_rows:   one workgroup per such row: log-sum-exp; the sampled token's logit
//                    and rank (1 + tokens with a larger logprob); its top-N tokens: all
//                    above the N-th largest key (found before by sample.wgsl's search,
//                    spread over the row's blocks) and, of those at it, the lowest ids.
// Out per row, NMAX + 2 vec2<u32>: (lse bits, own logit bits), (rank, count), then count
// (id, logit bits) pairs in no particular order. NaN counts as the lowest value.
// Prelude: NMAX.
struct Params {
    rows: u32,
    n: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> raw: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
// Per logprob row: (its row in the logits / ids, N).
@group(0) @binding(3) var<storage, read> req: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read_write> out: array<vec2<u32>>;
// The N-th largest key of each row.
@group(0) @binding(5) var<storage, read> nth_key: array<u32>;

@compute @workgroup_size(256)
fn logprobs_gather(@builtin(global_invocation_id) gid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.rows * p.n {
        return;
    }
    let r = i / p.n;
    raw[i] = logits[req[r].x * p.n + i - r * p.n];
}

var<workgroup> above_count: atomic<u32>;
var<workgroup> tie_sums: array<u32, 64>;

@compute @workgroup_size(256)
fn logprobs_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
                 @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let r = wg.x + wg.y * nwg.x;
    if r >= p.rows {
        return;
    }
    let base = r * p.n;
    let want = min(req[r].y, NMAX);
    // Log-sum-exp.
    var m = -3.4e38;
    for (var i = li; i < p.n; i += 256u) {
        let x = raw[base + i];
        if x > m {
            m = x;
        }
    }
    let mx = wg_max(m, sg, lane, nsg);
    var s = 0.0;
    for (var i = li; i < p.n; i += 256u) {
        let z = raw[base + i] - mx;
        if z > -87.0 {
            s += exp(z);
        }
    }
    let lse = mx + log(wg_sum(s, sg, lane, nsg));
    // The sampled token: logprob and rank (comparing logprobs, as vLLM does).
    let own = raw[base + ids[req[r].x]];
    let own_lp = own - lse;
    var c = 0.0;
    for (var i = li; i < p.n; i += 256u) {
        c += select(0.0, 1.0, raw[base + i] - lse > own_lp);
    }
    let rank = u32(wg_sum(c, sg, lane, nsg)) + 1u;
    let lo = nth_key[r];
    // Gather: keys above the threshold anywhere (fewer than N of them), then ties at it
    // by increasing id (each invocation owns a contiguous run of ids).
    if li == 0u {
        atomicStore(&above_count, 0u);
    }
    workgroupBarrier();
    let out_base = r * (NMAX + 2u);
    let run = (p.n + 255u) / 256u;
    let first = min(li * run, p.n);
    let last = min(first + run, p.n);
    var ties = 0u;
    if want > 0u {
        for (var i = first; i < last; i++) {
            let x = raw[base + i];
            let k = key(x);
            if k > lo {
                let slot = atomicAdd(&above_count, 1u);
                if slot < want {
                    out[out_base + 2u + slot] = vec2<u32>(i, bitcast<u32>(x));
                }
            } else if k == lo {
                ties += 1u;
            }
        }
    }
    let before_sg = subgroupExclusiveAdd(ties);
    let sg_total = subgroupAdd(ties);
    if lane == 0u {
        tie_sums[sg] = sg_total;
    }
    workgroupBarrier();
    var at = before_sg;
    for (var k = 0u; k < sg; k++) {
        at += tie_sums[k];
    }
    let n_above = min(atomicLoad(&above_count), want);
    if want > 0u && ties > 0u {
        var pos = n_above + at;
        for (var i = first; i < last && pos < want; i++) {
            let x = raw[base + i];
            if key(x) == lo {
                out[out_base + 2u + pos] = vec2<u32>(i, bitcast<u32>(x));
                pos += 1u;
            }
        }
    }
    var total_ties = 0u;
    for (var k = 0u; k < nsg; k++) {
        total_ties += tie_sums[k];
    }
    if li == 0u {
        out[out_base] = vec2<u32>(bitcast<u32>(lse), bitcast<u32>(own));
        out[out_base + 1u] = vec2<u32>(rank, min(want, n_above + total_ties));
    }
}
