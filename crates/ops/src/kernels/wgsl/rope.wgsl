// Rotary embedding (rotate-half layout) applied in place to the q and k heads of a fused
// QKV row [q (hq*d) | k (hkv*d) | v (hkv*d)], optionally after Qwen3's per-head RMSNorm.
// One workgroup per (token, head), one invocation per rotated pair: HALF_D = d / 2.
struct Params {
    m: u32,
    hq: u32,
    hkv: u32,
    eps: f32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(1) var<storage, read> positions: array<u32>;
@group(0) @binding(2) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(3) var<storage, read> q_norm: array<f32>;
@group(0) @binding(4) var<storage, read> k_norm: array<f32>;

@compute @workgroup_size(HALF_D)
fn rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) i: u32, @builtin(subgroup_id) sg: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let heads = p.hq + p.hkv;
    let g = flat_group(wg, nwg);
    if g >= p.m * heads {
        return;
    }
    let t = g / heads;
    let h = g - t * heads;
    let d = 2u * HALF_D;
    let row = t * (p.hq + 2u * p.hkv) * d;
    let base = row + h * d;
    var x1 = qkv[base + i];
    var x2 = qkv[base + i + HALF_D];
    if QK_NORM {
        let total = wg_sum(x1 * x1 + x2 * x2, sg, lane, nsg);
        let scale = inverseSqrt(total / f32(d) + p.eps);
        if h < p.hq {
            x1 = x1 * scale * q_norm[i];
            x2 = x2 * scale * q_norm[i + HALF_D];
        } else {
            x1 = x1 * scale * k_norm[i];
            x2 = x2 * scale * k_norm[i + HALF_D];
        }
    }
    let angle = f32(positions[t]) * inv_freq[i];
    let c = cos(angle);
    let s = sin(angle);
    qkv[base + i] = x1 * c - x2 * s;
    qkv[base + i + HALF_D] = x2 * c + x1 * s;
}
