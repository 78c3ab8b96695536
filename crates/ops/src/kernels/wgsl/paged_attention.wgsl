// Paged attention for any mix of prefill and decode tokens. One workgroup per (query
// token, kv head, split): the G = hq / hkv query heads that share the kv head read each
// K/V row once. Query token t sees cache positions [0, ctx[t]) of sequence seq[t] (causal
// prefill gives each of its tokens its own ctx).
// Each subgroup works alone, with no workgroup barrier in its loop: it takes every
// num_subgroups-th run of subgroup_size positions, and for each run
//   scores: lane j dots the K row of position j (128-bit loads) with the G scaled queries
//           held in workgroup memory (broadcast reads);
//   softmax: subgroup max / sum per head update the subgroup's running max and sum
//           (online softmax, kept in registers, identical in every lane);
//   values: position by position, the subgroup reads one V row (lane k: four dimensions,
//           64-bit loads) and adds it to every head's sum with the position's probability,
//           which a shuffle brings from the lane that scored it.
// At the end the subgroups' partial results are merged like splits (rescaled to the
// common max), through workgroup memory.
// SPLIT: the workgroup covers positions [split * part_len, ...) and leaves unnormalised
// sums and (max, sum) for `attention_reduce` (flash-decoding); otherwise it writes the
// normalised output. ctx[t] == 0 (a padding token) writes zeros.
// Prelude: G, D, SPLIT, SG_MIN (the adapter's smallest subgroup size).
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
const QUADS: u32 = D / 4u;
// V quads per lane: one on 32-wide subgroups at D = 128.
const MAXQ: u32 = (QUADS + SG_MIN - 1u) / SG_MIN;
const NEG_INF: f32 = -3.4e38;

// The scaled queries as vec4; after the main loop, the merged value sums.
var<workgroup> q4: array<vec4<f32>, 1024>;
var<workgroup> sub_m: array<f32, 32u * G>;
var<workgroup> sub_l: array<f32, 32u * G>;

@compute @workgroup_size(WG)
fn paged_attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
                   @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32,
                   @builtin(subgroup_size) sgs: u32) {
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
    workgroupBarrier();

    var m_run: array<f32, G>;
    var l_run: array<f32, G>;
    var acc: array<vec4<f32>, G * MAXQ>;
    for (var g = 0u; g < G; g++) {
        m_run[g] = NEG_INF;
        l_run[g] = 0.0;
    }
    for (var k = 0u; k < G * MAXQ; k++) {
        acc[k] = vec4<f32>(0.0);
    }

    for (var c = lo + sg * sgs; c < hi; c += nsg * sgs) {
        let n = min(sgs, hi - c);
        let valid = lane < n;
        var base = 0u;
        var s: array<f32, G>;
        for (var g = 0u; g < G; g++) {
            s[g] = NEG_INF;
        }
        if valid {
            let pos = c + lane;
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
        // Online softmax for this run; s becomes the probabilities.
        for (var g = 0u; g < G; g++) {
            let mx = max(m_run[g], subgroupMax(s[g]));
            let alpha = exp(m_run[g] - mx);
            var e = 0.0;
            if valid {
                e = exp(s[g] - mx);
            }
            s[g] = e;
            l_run[g] = l_run[g] * alpha + subgroupAdd(e);
            m_run[g] = mx;
            for (var k = 0u; k < MAXQ; k++) {
                acc[g * MAXQ + k] *= alpha;
            }
        }
        // Values, one position at a time for the whole subgroup.
        for (var j = 0u; j < n; j++) {
            let row = subgroupShuffle(base, j) / 4u;
            var pj: array<f32, G>;
            for (var g = 0u; g < G; g++) {
                pj[g] = subgroupShuffle(s[g], j);
            }
            for (var k = 0u; k < MAXQ; k++) {
                let quad = lane + k * sgs;
                if quad < QUADS {
                    let w = v_cache[row + quad];
                    let v = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
                    for (var g = 0u; g < G; g++) {
                        acc[g * MAXQ + k] += pj[g] * v;
                    }
                }
            }
        }
    }

    // Merge the subgroups: common max, rescaled sums, then the value sums one subgroup
    // after another into workgroup memory (once every subgroup is done with the queries).
    workgroupBarrier();
    if lane == 0u {
        for (var g = 0u; g < G; g++) {
            sub_m[sg * G + g] = m_run[g];
            sub_l[sg * G + g] = l_run[g];
        }
    }
    for (var i = li; i < G * D / 4u; i += WG) {
        q4[i] = vec4<f32>(0.0);
    }
    workgroupBarrier();
    var scale_g: array<f32, G>;
    for (var g = 0u; g < G; g++) {
        var mx = NEG_INF;
        for (var k = 0u; k < nsg; k++) {
            mx = max(mx, sub_m[k * G + g]);
        }
        scale_g[g] = exp(m_run[g] - mx);
    }
    for (var k = 0u; k < nsg; k++) {
        if sg == k {
            for (var g = 0u; g < G; g++) {
                for (var kq = 0u; kq < MAXQ; kq++) {
                    let quad = lane + kq * sgs;
                    if quad < QUADS {
                        q4[(g * D) / 4u + quad] += acc[g * MAXQ + kq] * scale_g[g];
                    }
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = li; i < G * D; i += WG) {
        let g = i / D;
        var mx = NEG_INF;
        for (var k = 0u; k < nsg; k++) {
            mx = max(mx, sub_m[k * G + g]);
        }
        var l = 0.0;
        for (var k = 0u; k < nsg; k++) {
            l += sub_l[k * G + g] * exp(sub_m[k * G + g] - mx);
        }
        let total = q4[i / 4u][i % 4u];
        if SPLIT {
            out[((t * p.hkv + h) * p.splits + split) * G * D + i] = total;
            if i % D == 0u {
                ml[((t * p.hkv + h) * p.splits + split) * G + g] = vec2<f32>(mx, l);
            }
        } else {
            out[t * p.hq * D + h * G * D + i] = select(0.0, total / l, l > 0.0);
        }
    }
}
