// Combines the splits of flash-decoding: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s
// with M the largest split max. Splits past a token's context carry l = 0 and add nothing;
// a token with no context at all gets zeros. One workgroup per (token, query head).
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

@compute @workgroup_size(128)
fn attention_reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let flat = flat_group(wg, nwg);
    if flat >= p.t * p.hkv * G {
        return;
    }
    let pair = flat / G;
    let g = flat - pair * G;
    let t = pair / p.hkv;
    let h = pair - t * p.hkv;
    let first = pair * p.splits;
    var mx = -3.4e38;
    for (var s = 0u; s < p.splits; s++) {
        let v = ml[(first + s) * G + g];
        if v.y > 0.0 {
            mx = max(mx, v.x);
        }
    }
    var den = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        let v = ml[(first + s) * G + g];
        if v.y > 0.0 {
            den += exp(v.x - mx) * v.y;
        }
    }
    for (var d = li; d < D; d += 128u) {
        var num = 0.0;
        for (var s = 0u; s < p.splits; s++) {
            let v = ml[(first + s) * G + g];
            if v.y > 0.0 {
                num += exp(v.x - mx) * part[((first + s) * G + g) * D + d];
            }
        }
        out[t * p.hq * D + (h * G + g) * D + d] = select(0.0, num / den, den > 0.0);
    }
}
