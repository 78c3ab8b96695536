// The plain reference attention (VLLM_METAL_ATTENTION=0): gather each sequence's K/V out
// of the paged cache into contiguous f32 arrays [seq, pos, kv_head, D], then score every
// (token, head, position), softmax the rows (softmax.wgsl), and weight the values.
// Deliberately straightforward: it checks the paged kernels and is not tuned.
struct Params {
    t: u32,
    hq: u32,
    hkv: u32,
    d: u32,
    bs: u32,
    max_blocks: u32,
    max_ctx: u32,
    b: u32,
    scale: f32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> seq_lens: array<u32>;
@group(0) @binding(1) var<storage, read> block_tables: array<u32>;
@group(0) @binding(2) var<storage, read> k_cache: array<u32>;
@group(0) @binding(3) var<storage, read> v_cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> kc: array<f32>;
@group(0) @binding(5) var<storage, read_write> vc: array<f32>;

@compute @workgroup_size(256)
fn gather_kv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let i = flat_group(wg, nwg) * 256u + li;
    let pairs = p.d / 2u;
    if i >= p.b * p.max_ctx * p.hkv * pairs {
        return;
    }
    let j = i % pairs;
    let h = (i / pairs) % p.hkv;
    let pos = (i / (pairs * p.hkv)) % p.max_ctx;
    let b = i / (pairs * p.hkv * p.max_ctx);
    var k = vec2<f32>(0.0);
    var v = vec2<f32>(0.0);
    if pos < seq_lens[b] {
        let block = block_tables[b * p.max_blocks + pos / p.bs];
        let src = (((block * p.hkv + h) * p.bs + pos % p.bs) * p.d) / 2u + j;
        k = unpack2x16float(k_cache[src]);
        v = unpack2x16float(v_cache[src]);
    }
    kc[2u * i] = k.x;
    kc[2u * i + 1u] = k.y;
    vc[2u * i] = v.x;
    vc[2u * i + 1u] = v.y;
}

@group(0) @binding(6) var<storage, read> qkv: array<f32>;
@group(0) @binding(7) var<storage, read> seq_of: array<u32>;
@group(0) @binding(8) var<storage, read> ctx_of: array<u32>;
@group(0) @binding(9) var<storage, read_write> scores: array<f32>;

// scores[t, head, pos] = q . k * scale for pos < ctx[t], -inf after (0 for a padding token).
@compute @workgroup_size(256)
fn naive_scores(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let i = flat_group(wg, nwg) * 256u + li;
    if i >= p.t * p.hq * p.max_ctx {
        return;
    }
    let pos = i % p.max_ctx;
    let head = (i / p.max_ctx) % p.hq;
    let t = i / (p.max_ctx * p.hq);
    let n = ctx_of[t];
    if n == 0u {
        scores[i] = 0.0;
        return;
    }
    if pos >= n {
        scores[i] = -3.4e38;
        return;
    }
    let h = head / (p.hq / p.hkv);
    let q = t * (p.hq + 2u * p.hkv) * p.d + head * p.d;
    let k = ((seq_of[t] * p.max_ctx + pos) * p.hkv + h) * p.d;
    var s = 0.0;
    for (var d = 0u; d < p.d; d++) {
        s += qkv[q + d] * kc[k + d];
    }
    scores[i] = s * p.scale;
}

@group(0) @binding(10) var<storage, read_write> out: array<f32>;

// out[t, head, d] = sum_pos softmax(scores)[t, head, pos] * v[seq, pos, kv_head, d].
@compute @workgroup_size(256)
fn naive_av(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let i = flat_group(wg, nwg) * 256u + li;
    if i >= p.t * p.hq * p.d {
        return;
    }
    let d = i % p.d;
    let head = (i / p.d) % p.hq;
    let t = i / (p.d * p.hq);
    let n = ctx_of[t];
    let h = head / (p.hq / p.hkv);
    var acc = 0.0;
    for (var pos = 0u; pos < n; pos++) {
        acc += scores[(t * p.hq + head) * p.max_ctx + pos] * vc[((seq_of[t] * p.max_ctx + pos) * p.hkv + h) * p.d + d];
    }
    out[i] = acc;
}
