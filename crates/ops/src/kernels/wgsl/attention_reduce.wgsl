// Combines the splits of flash-decoding: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s
// with M the largest split max. Splits past a token's context carry l = 0 and add nothing;
// a token with no context at all gets zeros. One workgroup per (token, query head).
// Built for latency (at batch 1 this pass sits in every layer's dependent chain): the
// workgroup reads the splits' (max, sum) pairs in parallel and reduces them with subgroup
// operations, and each output dimension issues the loads of eight splits at a time. Up to
// eight splits each invocation walks them alone.
// Prelude: G, D.
struct Params {
    t: u32,
    hq: u32,
    hkv: u32,
    splits: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> part: array<f32>;
@group(0) @binding(1) var<storage, read> ml: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const WG: u32 = 128u;
const NEG_INF: f32 = -3.4e38;
// Splits whose loads one step of the output loop issues together.
const SU: u32 = 8u;
// Per-subgroup partial results (subgroups of 4 or more).
var<workgroup> red: array<f32, WG / 4u>;

@compute @workgroup_size(WG)
fn attention_reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
                    @builtin(num_subgroups) nsg: u32,
                    @builtin(subgroup_invocation_id) lane: u32) {
    let flat = flat_group(wg, nwg);
    if flat >= p.t * p.hkv * G {
        return;
    }
    let pair = flat / G;
    let g = flat - pair * G;
    let t = pair / p.hkv;
    let h = pair - t * p.hkv;
    let first = pair * p.splits;
    let dst = t * p.hq * D + (h * G + g) * D;
    if p.splits <= SU {
        // Few splits (short contexts): each invocation walks them itself, no barrier (on
        // the H100 this beats the workgroup reduction below up to 8 splits).
        var m = NEG_INF;
        for (var s = 0u; s < p.splits; s++) {
            let v = ml[(first + s) * G + g];
            if v.y > 0.0 {
                m = max(m, v.x);
            }
        }
        var l = 0.0;
        for (var s = 0u; s < p.splits; s++) {
            let v = ml[(first + s) * G + g];
            if v.y > 0.0 {
                l += exp(v.x - m) * v.y;
            }
        }
        for (var d = li; d < D; d += WG) {
            var num = 0.0;
            for (var s = 0u; s < p.splits; s++) {
                let v = ml[(first + s) * G + g];
                if v.y > 0.0 {
                    num += exp(v.x - m) * part[((first + s) * G + g) * D + d];
                }
            }
            out[dst + d] = select(0.0, num / l, l > 0.0);
        }
        return;
    }
    // M: the largest max of the splits with context.
    var mx = NEG_INF;
    for (var s = li; s < p.splits; s += WG) {
        let v = ml[(first + s) * G + g];
        if v.y > 0.0 {
            mx = max(mx, v.x);
        }
    }
    mx = subgroupMax(mx);
    if lane == 0u {
        red[sg] = mx;
    }
    workgroupBarrier();
    mx = NEG_INF;
    for (var i = 0u; i < nsg; i++) {
        mx = max(mx, red[i]);
    }
    workgroupBarrier();
    var den = 0.0;
    for (var s = li; s < p.splits; s += WG) {
        let v = ml[(first + s) * G + g];
        if v.y > 0.0 {
            den += exp(v.x - mx) * v.y;
        }
    }
    den = subgroupAdd(den);
    if lane == 0u {
        red[sg] = den;
    }
    workgroupBarrier();
    den = 0.0;
    for (var i = 0u; i < nsg; i++) {
        den += red[i];
    }
    for (var d = li; d < D; d += WG) {
        var num = 0.0;
        var s = 0u;
        for (; s + SU <= p.splits; s += SU) {
            var v: array<vec2<f32>, SU>;
            var a: array<f32, SU>;
            for (var u = 0u; u < SU; u++) {
                v[u] = ml[(first + s + u) * G + g];
                a[u] = part[((first + s + u) * G + g) * D + d];
            }
            for (var u = 0u; u < SU; u++) {
                if v[u].y > 0.0 {
                    num += exp(v[u].x - mx) * a[u];
                }
            }
        }
        for (; s < p.splits; s++) {
            let v = ml[(first + s) * G + g];
            if v.y > 0.0 {
                num += exp(v.x - mx) * part[((first + s) * G + g) * D + d];
            }
        }
        out[dst + d] = select(0.0, num / den, den > 0.0);
    }
}
