// Greedy sampling: the index of each row's largest logit; ties go to the lowest index
// (as torch.argmax). Only these ids travel back to the CPU.
struct Params {
    m: u32,
    n: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> ids: array<u32>;

var<workgroup> best_v: array<f32, 64>;
var<workgroup> best_i: array<u32, 64>;

@compute @workgroup_size(256)
fn argmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
          @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let row = flat_group(wg, nwg);
    if row >= p.m {
        return;
    }
    let base = row * p.n;
    var v = -3.4e38;
    var idx = 0xffffffffu;
    // Each thread walks increasing indices, so a strict > keeps its first maximum.
    for (var i = li; i < p.n; i += 256u) {
        let x = logits[base + i];
        if x > v || idx == 0xffffffffu {
            v = x;
            idx = i;
        }
    }
    let sv = subgroupMax(v);
    let si = subgroupMin(select(0xffffffffu, idx, v == sv));
    if lane == 0u {
        best_v[sg] = sv;
        best_i[sg] = si;
    }
    workgroupBarrier();
    if li == 0u {
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
        ids[row] = bi;
    }
}
