// Mixture-of-experts routing in one workgroup, so no CPU round trip sits between the router
// GEMM and the expert GEMMs:
//  1. each subgroup routes whole tokens (topk_picks, moe_topk.wgsl); each pick takes a rank
//     within its expert from a workgroup atomic counter;
//  2. a workgroup scan of the counts gives expert offsets; each expert's rows are cut into
//     tiles of at most `tile` rows: tiles = [count, (expert, start, end) x count];
//  3. every pair gets its row in expert-sorted order: pair_pos[t k + j] = offset + rank and
//     sorted[row] = t (the token whose hidden state that row reads).
// LOGIT_RSTD: the logits are R diag(g) x short of each token's 1/rms (the router fold's two
// halves from the qkv and o_proj GEMVs, moe.rs `Logits::Folded`); each token's subgroup finds
// it from the token's row of x (binding 6) first.
// Prelude: MAX_E (capacity of the counters, at most 512: two experts per invocation), MAX_K,
// LOGIT_RSTD.
struct Params {
    tokens: u32,
    experts: u32,
    k: u32,
    norm: u32,
    tile: u32,
    // LOGIT_RSTD: x's row length and the RMSNorm's epsilon.
    hidden: u32,
    eps: f32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> topk_ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> topk_w: array<f32>;
@group(0) @binding(3) var<storage, read_write> pair_pos: array<u32>;
@group(0) @binding(4) var<storage, read_write> sorted: array<u32>;
@group(0) @binding(5) var<storage, read_write> tiles: array<u32>;
// LOGIT_RSTD: the hidden rows (raw residual stream); a dummy otherwise.
@group(0) @binding(6) var<storage, read> x: array<vec4<f32>>;

var<workgroup> counts: array<atomic<u32>, MAX_E>;
var<workgroup> offsets: array<u32, MAX_E>;
// Row and tile totals of each subgroup (subgroups of at least 4 invocations).
var<workgroup> sg_rows: array<u32, 64>;
var<workgroup> sg_tiles: array<u32, 64>;

@compute @workgroup_size(256)
fn moe_route(@builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
             @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) sg_size: u32,
             @builtin(num_subgroups) nsg: u32) {
    if p.tokens == 1u {
        // One token (decode of one sequence): one subgroup routes it and ranks its picks by
        // expert (ties, only possible for NaN rows, by pick), one row and one tile each: no
        // counters, no scan, no workgroup barrier.
        if sg == 0u {
            let scale = logit_scale(0u, p.hidden, p.eps, lane, sg_size);
            let picks = topk_picks(0u, p.experts, p.k, p.norm != 0u, lane, sg_size, scale);
            for (var j = lane; j < p.k; j += sg_size) {
                let e = picks.ids[j];
                var row = 0u;
                for (var i = 0u; i < p.k; i++) {
                    let o = picks.ids[i];
                    row += select(0u, 1u, o < e || (o == e && i < j));
                }
                topk_ids[j] = e;
                topk_w[j] = picks.ws[j];
                pair_pos[j] = row;
                sorted[row] = 0u;
                tiles[1u + 3u * row] = e;
                tiles[2u + 3u * row] = row;
                tiles[3u + 3u * row] = row + 1u;
            }
            if lane == 0u {
                tiles[0] = p.k;
            }
        }
        return;
    }
    for (var e = li; e < p.experts; e += 256u) {
        atomicStore(&counts[e], 0u);
    }
    workgroupBarrier();
    for (var t = sg; t < p.tokens; t += nsg) {
        let scale = logit_scale(t, p.hidden, p.eps, lane, sg_size);
        let picks = topk_picks(t * p.experts, p.experts, p.k, p.norm != 0u, lane, sg_size,
                               scale);
        for (var j = lane; j < p.k; j += sg_size) {
            let e = picks.ids[j];
            let pair = t * p.k + j;
            topk_ids[pair] = e;
            topk_w[pair] = picks.ws[j];
            pair_pos[pair] = atomicAdd(&counts[e], 1u);
        }
    }
    workgroupBarrier();
    // Expert offsets and tiles: each invocation owns experts 2 li and 2 li + 1; exclusive
    // scans of their row and tile counts (within each subgroup, then over the subgroups'
    // totals) give where each expert starts.
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
    let rx = subgroupExclusiveAdd(c0 + c1);
    let tx = subgroupExclusiveAdd(t0 + t1);
    if lane == sg_size - 1u {
        sg_rows[sg] = rx + c0 + c1;
        sg_tiles[sg] = tx + t0 + t1;
    }
    workgroupBarrier();
    var row0 = rx;
    var tile0 = tx;
    for (var s = 0u; s < sg; s++) {
        row0 += sg_rows[s];
        tile0 += sg_tiles[s];
    }
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
        tiles[0] = tile0 + t0 + t1;
    }
    storageBarrier();
    workgroupBarrier();
    for (var pair = li; pair < p.tokens * p.k; pair += 256u) {
        let row = offsets[topk_ids[pair]] + pair_pos[pair];
        pair_pos[pair] = row;
        sorted[row] = pair / p.k;
    }
}
