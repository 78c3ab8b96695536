// Mixture-of-experts routing in one workgroup, so no CPU round trip sits between the router
// GEMM and the expert GEMMs:
//  1. each subgroup routes whole tokens: softmax over the router logits, top-k by k passes of
//     a subgroup arg-max (ties go to the lower expert index, as the CPU reference defines),
//     weights renormalised over the chosen k when NORM; each pick takes a rank within its
//     expert from a workgroup atomic counter;
//  2. one invocation scans the counts into expert offsets and cuts each expert's rows into
//     tiles of at most TILE rows: tiles = [count, (expert, start, end) x count];
//  3. every pair gets its row in expert-sorted order: pair_pos[t k + j] = offset + rank and
//     sorted[row] = t (the token whose hidden state that row reads).
// Prelude: MAX_E (capacity of the counters), MAX_K.
struct Params {
    tokens: u32,
    experts: u32,
    k: u32,
    norm: u32,
    tile: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> topk_ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> topk_w: array<f32>;
@group(0) @binding(3) var<storage, read_write> pair_pos: array<u32>;
@group(0) @binding(4) var<storage, read_write> sorted: array<u32>;
@group(0) @binding(5) var<storage, read_write> tiles: array<u32>;

var<workgroup> counts: array<atomic<u32>, MAX_E>;
var<workgroup> offsets: array<u32, MAX_E>;

@compute @workgroup_size(256)
fn moe_route(@builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
             @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) sg_size: u32,
             @builtin(num_subgroups) nsg: u32) {
    for (var e = li; e < p.experts; e += 256u) {
        atomicStore(&counts[e], 0u);
    }
    workgroupBarrier();
    for (var t = sg; t < p.tokens; t += nsg) {
        let base = t * p.experts;
        var mx = -3.4e38;
        for (var e = lane; e < p.experts; e += sg_size) {
            mx = max(mx, logits[base + e]);
        }
        mx = subgroupMax(mx);
        var total = 0.0;
        for (var e = lane; e < p.experts; e += sg_size) {
            total += exp(logits[base + e] - mx);
        }
        total = subgroupAdd(total);
        // Picks in descending (value, -index) order: each pass takes the best candidate
        // strictly after the previous pick in that order.
        var prev_v = 3.4e38;
        var prev_e = 0xffffffffu;
        var ids: array<u32, MAX_K>;
        var ws: array<f32, MAX_K>;
        var chosen = 0.0;
        for (var j = 0u; j < p.k; j++) {
            var best_v = -3.4e38;
            var best_e = 0xffffffffu;
            for (var e = lane; e < p.experts; e += sg_size) {
                let v = logits[base + e];
                let after = v < prev_v || (v == prev_v && e > prev_e);
                if after && (v > best_v || (v == best_v && e < best_e)) {
                    best_v = v;
                    best_e = e;
                }
            }
            let top = subgroupMax(best_v);
            // (NaN logits never win a comparison; clamp so a bad row cannot index past the
            // counters.)
            let e = min(subgroupMin(select(0xffffffffu, best_e, best_v == top)), p.experts - 1u);
            prev_v = top;
            prev_e = e;
            ids[j] = e;
            ws[j] = exp(top - mx);
            chosen += ws[j];
        }
        let denom = select(total, chosen, p.norm != 0u);
        for (var j = lane; j < p.k; j += sg_size) {
            let e = ids[j];
            let w = ws[j];
            let pair = t * p.k + j;
            topk_ids[pair] = e;
            topk_w[pair] = w / denom;
            pair_pos[pair] = atomicAdd(&counts[e], 1u);
        }
    }
    workgroupBarrier();
    if li == 0u {
        var off = 0u;
        var n = 0u;
        for (var e = 0u; e < p.experts; e++) {
            let c = atomicLoad(&counts[e]);
            offsets[e] = off;
            for (var s = 0u; s < c; s += p.tile) {
                tiles[1u + 3u * n] = e;
                tiles[2u + 3u * n] = off + s;
                tiles[3u + 3u * n] = off + min(c, s + p.tile);
                n++;
            }
            off += c;
        }
        tiles[0] = n;
    }
    storageBarrier();
    workgroupBarrier();
    for (var pair = li; pair < p.tokens * p.k; pair += 256u) {
        let row = offsets[topk_ids[pair]] + pair_pos[pair];
        pair_pos[pair] = row;
        sorted[row] = pair / p.k;
    }
}
