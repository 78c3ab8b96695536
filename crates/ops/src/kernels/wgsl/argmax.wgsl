// Greedy sampling: the index of each row's largest logit; ties go to the lowest index
// (as torch.argmax). Two passes so a 151936-wide row spreads over many workgroups:
// `argmax_blocks` reduces each BLOCK-wide slice of a row to one (value, index) pair,
// `argmax_rows` reduces a row's pairs to its id. Only these ids travel back to the CPU.
struct Params {
    m: u32,
    n: u32,
    blocks: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> partial: array<vec2<u32>>;

var<workgroup> best_v: array<f32, 64>;
var<workgroup> best_i: array<u32, 64>;

// Workgroup-wide (max value, lowest index of it); every invocation gets the result.
fn wg_argmax(v: f32, idx: u32, sg: u32, lane: u32, nsg: u32) -> vec2<u32> {
    let sv = subgroupMax(v);
    let si = subgroupMin(select(0xffffffffu, idx, v == sv));
    if lane == 0u {
        best_v[sg] = sv;
        best_i[sg] = si;
    }
    workgroupBarrier();
    var bv = best_v[0];
    var bi = best_i[0];
    for (var s = 1u; s < nsg; s++) {
        let cv = best_v[s];
        let ci = best_i[s];
        if cv > bv || (cv == bv && ci < bi) {
            bv = cv;
            bi = ci;
        }
    }
    return vec2<u32>(bitcast<u32>(bv), bi);
}

@compute @workgroup_size(256)
fn argmax_blocks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
                 @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let g = flat_group(wg, nwg);
    if g >= p.m * p.blocks {
        return;
    }
    let row = g / p.blocks;
    let b = g - row * p.blocks;
    let lo = b * BLOCK;
    let hi = min(lo + BLOCK, p.n);
    var v = -3.4e38;
    var idx = 0xffffffffu;
    // Increasing indices per invocation: a strict > keeps its first maximum.
    for (var i = lo + li; i < hi; i += 256u) {
        let x = logits[row * p.n + i];
        if x > v || idx == 0xffffffffu {
            v = x;
            idx = i;
        }
    }
    let r = wg_argmax(v, idx, sg, lane, nsg);
    if li == 0u {
        partial[g] = r;
    }
}

@group(0) @binding(2) var<storage, read_write> ids: array<u32>;

@compute @workgroup_size(64)
fn argmax_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
               @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let row = flat_group(wg, nwg);
    if row >= p.m {
        return;
    }
    var v = -3.4e38;
    var idx = 0xffffffffu;
    for (var b = li; b < p.blocks; b += 64u) {
        let c = partial[row * p.blocks + b];
        let cv = bitcast<f32>(c.x);
        // Blocks are visited in increasing index order, so > keeps the lowest index.
        if cv > v || idx == 0xffffffffu {
            v = cv;
            idx = c.y;
        }
    }
    let r = wg_argmax(v, idx, sg, lane, nsg);
    if li == 0u {
        ids[row] = r.y;
    }
}
