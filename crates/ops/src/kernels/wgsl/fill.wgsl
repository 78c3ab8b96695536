// Fills a tensor with uniform pseudo-random values in [-scale, scale) from a hash of
// (element index, seed): random weights without generating or uploading them on the CPU
// (`load_format = "dummy"`). One u32 word per invocation: 1 f32 or 2 f16/bf16 values.
struct Params {
    words: u32,
    seed: u32,
    scale: f32,
    wg_x: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read_write> out: array<u32>;

fn hash(x: u32) -> u32 {
    var h = x * 0x9e3779b9u ^ p.seed;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

fn uniform(i: u32) -> f32 {
    return (f32(hash(i) >> 8u) / 16777216.0 * 2.0 - 1.0) * p.scale;
}

@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = flat_group(wg, nwg) * 256u + li;
    if i >= p.words {
        return;
    }
    if W_DTYPE == 0u {
        out[i] = bitcast<u32>(uniform(i));
    } else if W_DTYPE == 1u {
        out[i] = pack2x16float(vec2<f32>(uniform(2u * i), uniform(2u * i + 1u)));
    } else {
        let lo = bitcast<u32>(uniform(2u * i)) >> 16u;
        let hi = bitcast<u32>(uniform(2u * i + 1u)) & 0xffff0000u;
        out[i] = lo | hi;
    }
}
