// Paged attention for any mix of prefill and decode tokens. One workgroup per (query
// token, kv head, split): the G = hq / hkv query heads that share the kv head read each
// K/V row once. Query token t sees cache positions [0, ctx[t]) of sequence seq[t] (causal
// prefill gives each of its tokens its own ctx), walked CHUNK = 128 positions at a time:
//   scores: invocation j takes position c + j and dots its K row (128-bit loads) with the
//           G scaled queries held in workgroup memory;
//   softmax: subgroup max / sum per head, combined across subgroups; every invocation
//            keeps the running max and sum of every head (online softmax);
//   values: TG groups of D / 2 invocations take every TG-th position, each invocation two
//           adjacent dimensions of all G heads; groups are summed at the end.
// SPLIT: the workgroup covers positions [split * part_len, ...) and leaves unnormalised
// sums and (max, sum) for `attention_reduce` (flash-decoding); otherwise it writes the
// normalised output. ctx[t] == 0 (a padding token) writes zeros.
// Prelude: G, D, SPLIT.
struct Params {
    t: u32,
    hq: u32,
    hkv: u32,
    bs: u32,
    max_blocks: u32,
    scale: f32,
    part_len: u32,
    splits: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> qkv: array<f32>;
@group(0) @binding(1) var<storage, read> seq_of: array<u32>;
@group(0) @binding(2) var<storage, read> ctx_of: array<u32>;
@group(0) @binding(3) var<storage, read> block_tables: array<u32>;
@group(0) @binding(4) var<storage, read> k_cache: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> v_cache: array<u32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<storage, read_write> ml: array<vec2<f32>>;

const WG: u32 = 128u;
const CHUNK: u32 = 128u;
const PAIRS: u32 = D / 2u;
const TG: u32 = max(WG / PAIRS, 1u);
const NEG_INF: f32 = -3.4e38;

// The scaled queries as vec4 (one 128-bit read per 4 dimensions), later reused for the
// per-group value sums (TG * G * D <= 4096 floats).
var<workgroup> q4: array<vec4<f32>, 1024>;
var<workgroup> probs: array<f32, G * CHUNK>;
var<workgroup> row_base: array<u32, CHUNK>;
// Per-subgroup partial maxima and sums of each head (at most 32 subgroups of 4+).
var<workgroup> red_max: array<f32, 32u * G>;
var<workgroup> red_sum: array<f32, 32u * G>;

@compute @workgroup_size(WG)
fn paged_attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
                   @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let flat = flat_group(wg, nwg);
    if flat >= p.t * p.hkv * p.splits {
        return;
    }
    let t = flat / (p.hkv * p.splits);
    let rem = flat - t * p.hkv * p.splits;
    let h = rem / p.splits;
    let split = rem - h * p.splits;
    let n_ctx = ctx_of[t];
    let seq = seq_of[t];
    let lo = split * p.part_len;
    let hi = min(lo + p.part_len, n_ctx);

    let qrow = t * (p.hq + 2u * p.hkv) * D + h * G * D;
    for (var i = li; i < G * D / 4u; i += WG) {
        let b = qrow + 4u * i;
        q4[i] = vec4<f32>(qkv[b], qkv[b + 1u], qkv[b + 2u], qkv[b + 3u]) * p.scale;
    }
    // Running max and sum of every head, kept identically by every invocation.
    var m_run: array<f32, G>;
    var l_run: array<f32, G>;
    var acc: array<vec2<f32>, G>;
    for (var g = 0u; g < G; g++) {
        m_run[g] = NEG_INF;
        l_run[g] = 0.0;
        acc[g] = vec2<f32>(0.0);
    }
    // Value accumulators: pair `vp` of dimensions, positions of group `grp`.
    let grp = li / PAIRS;
    let vp = li - grp * PAIRS;
    let active_v = grp < TG;
    workgroupBarrier();

    for (var c = lo; c < hi; c += CHUNK) {
        let n = min(CHUNK, hi - c);
        // Scores of position c + li for every head of the group.
        let pos = c + li;
        var s: array<f32, G>;
        for (var g = 0u; g < G; g++) {
            s[g] = NEG_INF;
        }
        var base = 0u;
        if li < n {
            let block = block_tables[seq * p.max_blocks + pos / p.bs];
            base = ((block * p.hkv + h) * p.bs + pos % p.bs) * D;
            for (var g = 0u; g < G; g++) {
                s[g] = 0.0;
            }
            for (var i = 0u; i < D / 8u; i++) {
                let kv = k_cache[base / 8u + i];
                let k0 = vec4<f32>(unpack2x16float(kv.x), unpack2x16float(kv.y));
                let k1 = vec4<f32>(unpack2x16float(kv.z), unpack2x16float(kv.w));
                for (var g = 0u; g < G; g++) {
                    let q = (g * D) / 4u + 2u * i;
                    s[g] += dot(k0, q4[q]) + dot(k1, q4[q + 1u]);
                }
            }
        }
        row_base[li] = base;
        // Online softmax over the chunk: subgroup maxima, then across subgroups.
        for (var g = 0u; g < G; g++) {
            let mx = subgroupMax(s[g]);
            if lane == 0u {
                red_max[sg * G + g] = mx;
            }
        }
        workgroupBarrier();
        var alpha: array<f32, G>;
        for (var g = 0u; g < G; g++) {
            var mx = m_run[g];
            for (var k = 0u; k < nsg; k++) {
                mx = max(mx, red_max[k * G + g]);
            }
            alpha[g] = exp(m_run[g] - mx);
            m_run[g] = mx;
            var e = 0.0;
            if li < n {
                e = exp(s[g] - mx);
            }
            probs[g * CHUNK + li] = e;
            let sum = subgroupAdd(e);
            if lane == 0u {
                red_sum[sg * G + g] = sum;
            }
        }
        workgroupBarrier();
        for (var g = 0u; g < G; g++) {
            var sum = 0.0;
            for (var k = 0u; k < nsg; k++) {
                sum += red_sum[k * G + g];
            }
            l_run[g] = l_run[g] * alpha[g] + sum;
        }

        if active_v {
            for (var g = 0u; g < G; g++) {
                acc[g] *= alpha[g];
            }
            // Four positions per step so their loads are in flight together.
            var j = grp;
            for (; j + 3u * TG < n; j += 4u * TG) {
                let v0 = unpack2x16float(v_cache[row_base[j] / 2u + vp]);
                let v1 = unpack2x16float(v_cache[row_base[j + TG] / 2u + vp]);
                let v2 = unpack2x16float(v_cache[row_base[j + 2u * TG] / 2u + vp]);
                let v3 = unpack2x16float(v_cache[row_base[j + 3u * TG] / 2u + vp]);
                for (var g = 0u; g < G; g++) {
                    let pb = g * CHUNK + j;
                    acc[g] += probs[pb] * v0 + probs[pb + TG] * v1 + probs[pb + 2u * TG] * v2
                        + probs[pb + 3u * TG] * v3;
                }
            }
            for (; j < n; j += TG) {
                let v = unpack2x16float(v_cache[row_base[j] / 2u + vp]);
                for (var g = 0u; g < G; g++) {
                    acc[g] += probs[g * CHUNK + j] * v;
                }
            }
        }
        workgroupBarrier();
    }

    // Sum the TG position groups (the queries are no longer needed: reuse their memory).
    if active_v {
        for (var g = 0u; g < G; g++) {
            let i = (grp * G + g) * D + 2u * vp;
            q4[i / 4u][i % 4u] = acc[g].x;
            q4[(i + 1u) / 4u][(i + 1u) % 4u] = acc[g].y;
        }
    }
    workgroupBarrier();
    for (var i = li; i < G * D; i += WG) {
        var total = 0.0;
        for (var k = 0u; k < TG; k++) {
            let e = k * G * D + i;
            total += q4[e / 4u][e % 4u];
        }
        let g = i / D;
        if SPLIT {
            out[((t * p.hkv + h) * p.splits + split) * G * D + i] = total;
        } else {
            let l = l_run[g];
            out[t * p.hq * D + h * G * D + i] = select(0.0, total / l, l > 0.0);
        }
    }
    if SPLIT && li < G {
        ml[((t * p.hkv + h) * p.splits + split) * G + li] = vec2<f32>(m_run[li], l_run[li]);
    }
}
