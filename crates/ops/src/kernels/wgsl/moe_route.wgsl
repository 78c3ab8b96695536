// Mixture-of-experts routing in one workgroup, so no CPU round trip sits between the router
// GEMM and the expert GEMMs:
//  1. each subgroup routes whole tokens: softmax over the router logits, top-k by k passes of
//     a subgroup arg-max (ties go to the lower expert index, as the CPU reference defines),
//     weights renormalised over the chosen k when NORM; each pick takes a rank within its
//     expert from a workgroup atomic counter;
//  2. a workgroup scan of the counts gives expert offsets; each expert's rows are cut into
//     tiles of at most `tile` rows: tiles = [count, (expert, start, end) x count];
//  3. every pair gets its row in expert-sorted order: pair_pos[t k + j] = offset + rank and
//     sorted[row] = t (the token whose hidden state that row reads).
// Prelude: MAX_E (capacity of the counters, at most 512: two experts per invocation), MAX_K.
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
var<workgroup> scan_rows: array<u32, 256>;
var<workgroup> scan_tiles: array<u32, 256>;

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
    // Expert offsets and tiles: each invocation owns experts 2 li and 2 li + 1; inclusive
    // scans (Hillis-Steele) of their row and tile counts give where each expert starts.
    let e0 = 2u * li;
    var c0 = 0u;
    var c1 = 0u;
    if e0 < p.experts {
        c0 = atomicLoad(&counts[e0]);
    }
    if e0 + 1u < p.experts {
        c1 = atomicLoad(&counts[e0 + 1u]);
    }
    let t0 = (c0 + p.tile - 1u) / p.tile;
    let t1 = (c1 + p.tile - 1u) / p.tile;
    scan_rows[li] = c0 + c1;
    scan_tiles[li] = t0 + t1;
    workgroupBarrier();
    for (var d = 1u; d < 256u; d *= 2u) {
        var r = 0u;
        var n = 0u;
        if li >= d {
            r = scan_rows[li - d];
            n = scan_tiles[li - d];
        }
        workgroupBarrier();
        scan_rows[li] += r;
        scan_tiles[li] += n;
        workgroupBarrier();
    }
    let row0 = scan_rows[li] - c0 - c1;
    let tile0 = scan_tiles[li] - t0 - t1;
    if e0 < p.experts {
        offsets[e0] = row0;
        for (var s = 0u; s < t0; s++) {
            tiles[1u + 3u * (tile0 + s)] = e0;
            tiles[2u + 3u * (tile0 + s)] = row0 + s * p.tile;
            tiles[3u + 3u * (tile0 + s)] = row0 + min(c0, (s + 1u) * p.tile);
        }
    }
    if e0 + 1u < p.experts {
        offsets[e0 + 1u] = row0 + c0;
        for (var s = 0u; s < t1; s++) {
            tiles[1u + 3u * (tile0 + t0 + s)] = e0 + 1u;
            tiles[2u + 3u * (tile0 + t0 + s)] = row0 + c0 + s * p.tile;
            tiles[3u + 3u * (tile0 + t0 + s)] = row0 + c0 + min(c1, (s + 1u) * p.tile);
        }
    }
    if li == 255u {
        tiles[0] = scan_tiles[255];
    }
    storageBarrier();
    workgroupBarrier();
    for (var pair = li; pair < p.tokens * p.k; pair += 256u) {
        let row = offsets[topk_ids[pair]] + pair_pos[pair];
        pair_pos[pair] = row;
        sorted[row] = pair / p.k;
    }
}
