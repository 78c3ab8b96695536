// Paged attention for any mix of prefill and decode tokens. One workgroup per (query
// token, kv head, split): the G = hq / hkv query heads that share the kv head read each
// K/V row once. Query token t sees cache positions [0, ctx[t]) of sequence seq[t] (causal
// prefill gives each of its tokens its own ctx), walked CHUNK = 128 positions at a time:
//   scores: invocation j takes position c + j and dots its K row (128-bit loads) with the
//           G scaled queries held in workgroup memory;
//   softmax: invocations g < G update the running max / sum of head g (online softmax);
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

// Queries first, then the per-group value sums: both fit in 4096 floats.
var<workgroup> shared_a: array<f32, 4096>;
var<workgroup> scores: array<f32, G * CHUNK>;
var<workgroup> row_base: array<u32, CHUNK>;
var<workgroup> m_run: array<f32, G>;
var<workgroup> l_run: array<f32, G>;
var<workgroup> alpha: array<f32, G>;

@compute @workgroup_size(WG)
fn paged_attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32) {
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
    for (var i = li; i < G * D; i += WG) {
        shared_a[i] = qkv[qrow + i] * p.scale;
    }
    if li < G {
        m_run[li] = NEG_INF;
        l_run[li] = 0.0;
    }
    // Value accumulators: pair `vp` of dimensions, positions of group `grp`.
    let grp = li / PAIRS;
    let vp = li - grp * PAIRS;
    let active_v = grp < TG;
    var acc: array<vec2<f32>, G>;
    for (var g = 0u; g < G; g++) {
        acc[g] = vec2<f32>(0.0);
    }
    workgroupBarrier();

    for (var c = lo; c < hi; c += CHUNK) {
        // Scores of position c + li for every head of the group.
        let pos = c + li;
        var base = 0u;
        if pos < hi {
            let block = block_tables[seq * p.max_blocks + pos / p.bs];
            base = ((block * p.hkv + h) * p.bs + pos % p.bs) * D;
            var s: array<f32, G>;
            for (var g = 0u; g < G; g++) {
                s[g] = 0.0;
            }
            for (var i = 0u; i < D / 8u; i++) {
                let kv = k_cache[base / 8u + i];
                let k0 = vec4<f32>(unpack2x16float(kv.x), unpack2x16float(kv.y));
                let k1 = vec4<f32>(unpack2x16float(kv.z), unpack2x16float(kv.w));
                for (var g = 0u; g < G; g++) {
                    let q = g * D + i * 8u;
                    let q0 = vec4<f32>(shared_a[q], shared_a[q + 1u], shared_a[q + 2u], shared_a[q + 3u]);
                    let q1 = vec4<f32>(shared_a[q + 4u], shared_a[q + 5u], shared_a[q + 6u], shared_a[q + 7u]);
                    s[g] += dot(k0, q0) + dot(k1, q1);
                }
            }
            for (var g = 0u; g < G; g++) {
                scores[g * CHUNK + li] = s[g];
            }
        } else {
            for (var g = 0u; g < G; g++) {
                scores[g * CHUNK + li] = NEG_INF;
            }
        }
        row_base[li] = base;
        workgroupBarrier();

        // Online softmax, one head per invocation.
        if li < G {
            let n = min(CHUNK, hi - c);
            var mx = m_run[li];
            for (var j = 0u; j < n; j++) {
                mx = max(mx, scores[li * CHUNK + j]);
            }
            let a = exp(m_run[li] - mx);
            var sum = 0.0;
            for (var j = 0u; j < n; j++) {
                let e = exp(scores[li * CHUNK + j] - mx);
                scores[li * CHUNK + j] = e;
                sum += e;
            }
            alpha[li] = a;
            m_run[li] = mx;
            l_run[li] = l_run[li] * a + sum;
        }
        workgroupBarrier();

        if active_v {
            for (var g = 0u; g < G; g++) {
                acc[g] *= alpha[g];
            }
            let n = min(CHUNK, hi - c);
            for (var j = grp; j < n; j += TG) {
                let v = unpack2x16float(v_cache[row_base[j] / 2u + vp]);
                for (var g = 0u; g < G; g++) {
                    acc[g] += scores[g * CHUNK + j] * v;
                }
            }
        }
        workgroupBarrier();
    }

    // Sum the TG position groups (queries are no longer needed: reuse their memory).
    if active_v {
        for (var g = 0u; g < G; g++) {
            shared_a[(grp * G + g) * D + 2u * vp] = acc[g].x;
            shared_a[(grp * G + g) * D + 2u * vp + 1u] = acc[g].y;
        }
    }
    workgroupBarrier();
    for (var i = li; i < G * D; i += WG) {
        var total = 0.0;
        for (var k = 0u; k < TG; k++) {
            total += shared_a[k * G * D + i];
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
