// Paged attention for any mix of prefill and decode tokens. One workgroup per (query
// token, kv head, split): the G = hq / hkv query heads that share the kv head read each
// K/V row once. Query token t sees cache positions [0, ctx[t]) of sequence seq[t] (causal
// prefill gives each of its tokens its own ctx), walked CHUNK = 128 positions at a time:
//   scores: invocation j takes position c + j and dots its K row (128-bit loads) with the
//           G scaled queries in workgroup memory (broadcast reads);
//   softmax: invocation j takes position j of the chunk: subgroup max / sum per head,
//           combined across subgroups; every invocation keeps the running max and sum of
//           every head (online softmax);
//   values: TG groups of D / 4 invocations take every TG-th position, each invocation four
//           dimensions (64-bit loads) of all G heads; the groups are summed at the end.
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
@group(0) @binding(5) var<storage, read> v_cache: array<vec2<u32>>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<storage, read_write> ml: array<vec2<f32>>;

const WG: u32 = 128u;
const CHUNK: u32 = 128u;
const QUADS: u32 = D / 4u;
// Position groups of the value phase, bounded so their sums fit the 4096-float area.
const TG: u32 = min(WG / QUADS, 4096u / (G * D));
const NEG_INF: f32 = -3.4e38;

// The scaled queries as vec4, later reused for the per-group value sums.
var<workgroup> q4: array<vec4<f32>, 1024>;
var<workgroup> probs: array<f32, G * CHUNK>;
var<workgroup> row_base: array<u32, CHUNK>;
// Per-subgroup partial maxima and sums of each head (at most 32 subgroups of 4+).
var<workgroup> red_max: array<f32, 32u * G>;
var<workgroup> red_sum: array<f32, 32u * G>;
// Running max and sum of every head, and the rescale of the current chunk (kept in
// workgroup memory rather than G registers per invocation, for occupancy).
var<workgroup> m_run: array<f32, G>;
var<workgroup> l_run: array<f32, G>;
var<workgroup> alpha: array<f32, G>;

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
    if li < G {
        m_run[li] = NEG_INF;
        l_run[li] = 0.0;
    }
    var acc: array<vec4<f32>, G>;
    for (var g = 0u; g < G; g++) {
        acc[g] = vec4<f32>(0.0);
    }
    let grp = li / QUADS;
    let vq = li - grp * QUADS;
    let active_v = grp < TG;

    for (var c = lo; c < hi; c += CHUNK) {
        let n = min(CHUNK, hi - c);
        if li < n {
            let pos = c + li;
            let block = block_tables[seq * p.max_blocks + pos / p.bs];
            row_base[li] = ((block * p.hkv + h) * p.bs + pos % p.bs) * D;
        }
        workgroupBarrier();

        // Scores: invocation li dots the K row of position li with the G scaled queries
        // (broadcast reads of workgroup memory).
        if li < n {
            let base = row_base[li] / 8u;
            var s: array<f32, G>;
            for (var g = 0u; g < G; g++) {
                s[g] = 0.0;
            }
            for (var i = 0u; i < D / 8u; i++) {
                let kv = k_cache[base + i];
                let k0 = vec4<f32>(unpack2x16float(kv.x), unpack2x16float(kv.y));
                let k1 = vec4<f32>(unpack2x16float(kv.z), unpack2x16float(kv.w));
                for (var g = 0u; g < G; g++) {
                    let q = (g * D) / 4u + 2u * i;
                    s[g] += dot(k0, q4[q]) + dot(k1, q4[q + 1u]);
                }
            }
            for (var g = 0u; g < G; g++) {
                probs[g * CHUNK + li] = s[g];
            }
        }
        workgroupBarrier();

        // Online softmax over the chunk, position li per invocation.
        for (var g = 0u; g < G; g++) {
            var x = NEG_INF;
            if li < n {
                x = probs[g * CHUNK + li];
            }
            let mx = subgroupMax(x);
            if lane == 0u {
                red_max[sg * G + g] = mx;
            }
        }
        workgroupBarrier();
        if li < G {
            var mx = m_run[li];
            for (var k = 0u; k < nsg; k++) {
                mx = max(mx, red_max[k * G + li]);
            }
            alpha[li] = exp(m_run[li] - mx);
            m_run[li] = mx;
        }
        workgroupBarrier();
        for (var g = 0u; g < G; g++) {
            var e = 0.0;
            if li < n {
                e = exp(probs[g * CHUNK + li] - m_run[g]);
                probs[g * CHUNK + li] = e;
            }
            let sum = subgroupAdd(e);
            if lane == 0u {
                red_sum[sg * G + g] = sum;
            }
        }
        workgroupBarrier();
        if li < G {
            var sum = 0.0;
            for (var k = 0u; k < nsg; k++) {
                sum += red_sum[k * G + li];
            }
            l_run[li] = l_run[li] * alpha[li] + sum;
        }

        if active_v {
            for (var g = 0u; g < G; g++) {
                acc[g] *= alpha[g];
            }
            // Two positions per step so their loads are in flight together.
            var j = grp;
            for (; j + TG < n; j += 2u * TG) {
                let w0 = v_cache[row_base[j] / 4u + vq];
                let w1 = v_cache[row_base[j + TG] / 4u + vq];
                let v0 = vec4<f32>(unpack2x16float(w0.x), unpack2x16float(w0.y));
                let v1 = vec4<f32>(unpack2x16float(w1.x), unpack2x16float(w1.y));
                for (var g = 0u; g < G; g++) {
                    acc[g] += probs[g * CHUNK + j] * v0 + probs[g * CHUNK + j + TG] * v1;
                }
            }
            if j < n {
                let w0 = v_cache[row_base[j] / 4u + vq];
                let v0 = vec4<f32>(unpack2x16float(w0.x), unpack2x16float(w0.y));
                for (var g = 0u; g < G; g++) {
                    acc[g] += probs[g * CHUNK + j] * v0;
                }
            }
        }
        workgroupBarrier();
    }

    // Sum the TG position groups (the queries are no longer needed: reuse their memory).
    if active_v {
        for (var g = 0u; g < G; g++) {
            q4[((grp * G + g) * D) / 4u + vq] = acc[g];
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
