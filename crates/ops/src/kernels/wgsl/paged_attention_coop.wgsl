// Paged attention on cooperative matrices (tensor cores / Apple simdgroup matrices): the
// same work and outputs as paged_attention.wgsl (one workgroup per (query token, kv head,
// split); see there for ctx, SPLIT and the outputs), with the products on matrix units.
// The G query heads of a kv head are the narrow side of both products, padded to HP (a
// multiple of S) with zero queries. Per chunk of CH positions (S-position fragments, each
// inside one cache block, so its rows are D apart):
//   scores:  subgroups take position fragments; S[pos, head] = K[pos, :] . Q[head, :]
//            with K fragments loaded straight from the cache, Q (scaled, f16) from
//            registers (up to 8 fragments: D <= 8 S) or workgroup memory;
//   softmax: a subgroup per head: the chunk max, the running max and sum (online
//            softmax), probabilities rounded to f16 (the sum counts the rounded values);
//   values:  subgroups take D / S column fragments; O[head, :] = P[head, pos] V[pos, :]
//            with V fragments from the cache (the last, partial fragment staged with
//            zero rows past the context, so stale cache rows never meet a zero weight);
//   merge:   the chunk's O goes through workgroup memory into per-invocation registers,
//            o = o * alpha + O (matrices cannot be rescaled row by row).
// Needs subgroups of 32 (NSG per workgroup, 4 or 8, CH / S >= NSG), G <= S, D / S <= 16
// and block_size % S == 0 (the launcher checks). Matrices live in named variables (in arrays the driver spills
// them), and no branch around a matrix operation depends on the subgroup: subgroups whose
// fragment is past the context, or past D, redo a valid one and their result is unused.
// ROPE (decode batches, write_kv = 1): q and k arrive as the QKV projection left them; the
// kernel applies Qwen3's per-head RMSNorm (QK_NORM) and the rotary embedding at the token's
// position (n_ctx - 1) to the queries it stages and to the K it writes, as rope.wgsl does,
// so a decode step needs no rope dispatch.
// Prelude: G, D, SPLIT, S, CH, NSG, ROPE, QK_NORM; aliases CA, CB, CC.
struct Params {
    t: u32,
    hq: u32,
    hkv: u32,
    bs: u32,
    max_blocks: u32,
    scale: f32,
    part_len: u32,
    splits: u32,
    // 1: decode batch whose new K/V this dispatch writes (see write_new_kv).
    write_kv: u32,
    // RMSNorm epsilon of QK_NORM.
    eps: f32,
    // 1 (with SPLIT and write_kv): the newest position's fragment is a partition of its own.
    own_part: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> qkv: array<f32>;
@group(0) @binding(1) var<storage, read> seq_of: array<u32>;
@group(0) @binding(2) var<storage, read> ctx_of: array<u32>;
@group(0) @binding(3) var<storage, read> block_tables: array<u32>;
@group(0) @binding(4) var<storage, read_write> k_cache: array<f16>;
@group(0) @binding(5) var<storage, read_write> v_cache: array<f16>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<storage, read_write> ml: array<vec2<f32>>;
@group(0) @binding(8) var<storage, read> slots: array<i32>;
// ROPE: inverse frequencies [D / 2] and the q / k norm weights [D] (QK_NORM).
@group(0) @binding(9) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(10) var<storage, read> q_norm: array<f32>;
@group(0) @binding(11) var<storage, read> k_norm: array<f32>;

const WG: u32 = 32u * NSG;
// Heads padded to one fragment; fragments per row (dims); position fragments per subgroup.
const HP: u32 = S;
const KF: u32 = D / S;
const PFS: u32 = CH / S / NSG;
// Column fragments of O per subgroup (1 to 4); heads per subgroup in the softmax; outputs
// per invocation in the merge.
const NF: u32 = (KF + NSG - 1u) / NSG;
const HPS: u32 = (G + NSG - 1u) / NSG;
const OPT: u32 = (G * D + WG - 1u) / WG;
const NEG_INF: f32 = -3.4e38;
const HALF_D: u32 = D / 2u;

// ROPE: 1 / rms of one head's raw q or k row (1 without QK_NORM), by one subgroup.
fn head_rstd(base: u32, lane: u32) -> f32 {
    if !QK_NORM {
        return 1.0;
    }
    var ss = 0.0;
    for (var i = lane; i < D; i += 32u) {
        let x = qkv[base + i];
        ss += x * x;
    }
    return inverseSqrt(subgroupAdd(ss) / f32(D) + p.eps);
}

// ROPE: the normed and rotated pair (i, i + D / 2) of the head row at `base`.
fn rotate(base: u32, i: u32, rstd: f32, pos: f32, is_q: bool) -> vec2<f32> {
    var x1 = qkv[base + i] * rstd;
    var x2 = qkv[base + i + HALF_D] * rstd;
    if QK_NORM {
        if is_q {
            x1 *= q_norm[i];
            x2 *= q_norm[i + HALF_D];
        } else {
            x1 *= k_norm[i];
            x2 *= k_norm[i + HALF_D];
        }
    }
    let angle = pos * inv_freq[i];
    let c = cos(angle);
    let s = sin(angle);
    return vec2<f32>(x1 * c - x2 * s, x2 * c + x1 * s);
}

// Up to 8 query fragments live in registers (named q0 .. q7), staged once through ph;
// more stay in workgroup memory (qh). Workgroup memory bounds this kernel's occupancy,
// and so its bandwidth, on the H100 (docs/performance.md).
const QREG: bool = KF <= 8u;
// Scaled queries [head][dim] (pad heads zero), where not in registers.
var<workgroup> qh: array<f16, select(HP * D, 1u, QREG)>;
// Row strides of the chunk's scores (f32) and probabilities (f16), [head][pos]: a
// subgroup's softmax walks one head's positions without bank conflicts, and the padding
// spreads a fragment's rows over the banks.
const SPS: u32 = CH + 4u;
const PPS: u32 = CH + 8u;
// Row stride of the chunk's outputs [head][dim] (f32), padded likewise.
const OPS: u32 = D + 4u;
// The chunk's scores [head][pos] (stride SPS), later its outputs [head][dim] (stride OPS).
var<workgroup> fs: array<f32, max(HP * SPS, HP * OPS)>;
// Probabilities [head][pos] (stride PPS; pad heads stay zero); first the queries [head][dim]
// where QREG.
var<workgroup> ph: array<f16, max(HP * PPS, select(0u, HP * D, QREG))>;
// The partial fragment's V rows, zero past the context.
var<workgroup> vt: array<f16, S * D>;
// First cache element of each position fragment's rows.
var<workgroup> fbase: array<u32, CH / S>;
var<workgroup> alpha: array<f32, HP>;
var<workgroup> m_fin: array<f32, HP>;
var<workgroup> l_fin: array<f32, HP>;

@compute @workgroup_size(WG)
fn paged_attention_coop(@builtin(workgroup_id) wg: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) li: u32,
                        @builtin(subgroup_id) sg: u32,
                        @builtin(subgroup_invocation_id) lane: u32) {
    // (Not flat_group(): naga's uniformity analysis takes a function's result for
    // non-uniform, and matrix operations must follow uniform control flow.)
    let flat = wg.x + wg.y * nwg.x;
    if flat >= p.t * p.hkv * p.splits {
        return;
    }
    let t = flat / (p.hkv * p.splits);
    let rem = flat - t * p.hkv * p.splits;
    let h = rem / p.splits;
    let split = rem - h * p.splits;
    let n_ctx = ctx_of[t];
    let seq = seq_of[t];
    var lo = split * p.part_len;
    var hi = min(lo + p.part_len, n_ctx);
    if SPLIT && p.own_part == 1u && n_ctx > 0u {
        // Fused decode: the fragment of the newest position is a partition of its own (the
        // sequence's last, after partitions of part_len up to it), so the workgroup that
        // writes the token's K and V (normed and rotated with ROPE: a longer road) attends
        // over at most S positions while the others attend over theirs. With the newest
        // position inside a full partition, that workgroup's time grew with the partition
        // (Qwen3-30B-A3B on the H100: the decode step rose 0.2 ms over each 128 positions).
        let own = (n_ctx - 1u) / S * S;
        let body = (own + p.part_len - 1u) / p.part_len;
        if split < body {
            hi = min(hi, own);
        } else if split == body {
            lo = own;
            hi = n_ctx;
        } else {
            lo = n_ctx;
            hi = n_ctx;
        }
    }

    let qrow = t * (p.hq + 2u * p.hkv) * D + h * G * D;
    // Fused decode: in a decode batch every token is its sequence's newest position, so the
    // workgroup whose partition holds that position writes the token's K and V for head h
    // into the cache (f16, at its slot) before reading the cache. No other workgroup reads
    // that row: the other partitions stop short of it and other sequences own other blocks.
    if p.write_kv == 1u && n_ctx > 0u && n_ctx - 1u >= lo && n_ctx - 1u < hi && slots[t] >= 0 {
        let slot = u32(slots[t]);
        let dst = ((slot / p.bs * p.hkv + h) * p.bs + slot % p.bs) * D;
        let src = t * (p.hq + 2u * p.hkv) * D + (p.hq + h) * D;
        for (var i = li; i < D; i += WG) {
            if !ROPE {
                k_cache[dst + i] = f16(qkv[src + i]);
            }
            v_cache[dst + i] = f16(qkv[src + p.hkv * D + i]);
        }
        if ROPE && sg == 0u {
            let rstd = head_rstd(src, lane);
            for (var i = lane; i < HALF_D; i += 32u) {
                let k = rotate(src, i, rstd, f32(n_ctx - 1u), false);
                k_cache[dst + i] = f16(k.x);
                k_cache[dst + i + HALF_D] = f16(k.y);
            }
        }
    }
    storageBarrier();
    if ROPE {
        // A subgroup per query head (pad heads zero), normed and rotated at the token's
        // position.
        let pos = f32(max(n_ctx, 1u) - 1u);
        for (var g = sg; g < HP; g += NSG) {
            var rstd = 0.0;
            if g < G {
                rstd = head_rstd(qrow + g * D, lane);
            }
            for (var i = lane; i < HALF_D; i += 32u) {
                var q = vec2<f32>(0.0);
                if g < G {
                    q = rotate(qrow + g * D, i, rstd, pos, true) * p.scale;
                }
                if QREG {
                    ph[g * D + i] = f16(q.x);
                    ph[g * D + i + HALF_D] = f16(q.y);
                } else {
                    qh[g * D + i] = f16(q.x);
                    qh[g * D + i + HALF_D] = f16(q.y);
                }
            }
        }
    } else {
        for (var i = li; i < HP * D; i += WG) {
            var v = 0.0;
            if i < G * D {
                v = qkv[qrow + i] * p.scale;
            }
            if QREG {
                ph[i] = f16(v);
            } else {
                qh[i] = f16(v);
            }
        }
    }
    var q0 = CB();
    var q1 = CB();
    var q2 = CB();
    var q3 = CB();
    var q4 = CB();
    var q5 = CB();
    var q6 = CB();
    var q7 = CB();
    if QREG {
        workgroupBarrier();
        q0 = coopLoad<CB>(&ph[0], D);
        if KF > 1u {
            q1 = coopLoad<CB>(&ph[S], D);
        }
        if KF > 2u {
            q2 = coopLoad<CB>(&ph[2u * S], D);
            q3 = coopLoad<CB>(&ph[3u * S], D);
        }
        if KF > 4u {
            q4 = coopLoad<CB>(&ph[4u * S], D);
            q5 = coopLoad<CB>(&ph[5u * S], D);
            q6 = coopLoad<CB>(&ph[6u * S], D);
            q7 = coopLoad<CB>(&ph[7u * S], D);
        }
        workgroupBarrier();
    }
    for (var i = li; i < HP * PPS; i += WG) {
        ph[i] = f16(0.0);
    }
    for (var i = li; i < S * D; i += WG) {
        vt[i] = f16(0.0);
    }
    var o: array<f32, OPT>;
    var m_run: array<f32, HPS>;
    var l_run: array<f32, HPS>;
    for (var j = 0u; j < HPS; j++) {
        m_run[j] = NEG_INF;
    }
    workgroupBarrier();

    for (var c = lo; c < hi; c += CH) {
        let n = min(CH, hi - c);
        let nf = (n + S - 1u) / S;
        for (var j = 0u; j < PFS; j++) {
            let f = sg + j * NSG;
            let pos = c + min(f, nf - 1u) * S;
            let block = block_tables[seq * p.max_blocks + pos / p.bs];
            let base = ((block * p.hkv + h) * p.bs + pos % p.bs) * D;
            if lane == 0u {
                fbase[f] = base;
            }
            var sc = CC();
            if QREG {
                sc = coopMultiplyAdd(coopLoadT<CA>(&k_cache[base], D), q0, sc);
                if KF > 1u {
                    sc = coopMultiplyAdd(coopLoadT<CA>(&k_cache[base + S], D), q1, sc);
                }
                if KF > 2u {
                    sc = coopMultiplyAdd(coopLoadT<CA>(&k_cache[base + 2u * S], D), q2, sc);
                    sc = coopMultiplyAdd(coopLoadT<CA>(&k_cache[base + 3u * S], D), q3, sc);
                }
                if KF > 4u {
                    sc = coopMultiplyAdd(coopLoadT<CA>(&k_cache[base + 4u * S], D), q4, sc);
                    sc = coopMultiplyAdd(coopLoadT<CA>(&k_cache[base + 5u * S], D), q5, sc);
                    sc = coopMultiplyAdd(coopLoadT<CA>(&k_cache[base + 6u * S], D), q6, sc);
                    sc = coopMultiplyAdd(coopLoadT<CA>(&k_cache[base + 7u * S], D), q7, sc);
                }
            } else {
                for (var kf = 0u; kf < KF; kf++) {
                    let a = coopLoadT<CA>(&k_cache[base + kf * S], D);
                    let b = coopLoad<CB>(&qh[kf * S], D);
                    sc = coopMultiplyAdd(a, b, sc);
                }
            }
            coopStore(sc, &fs[f * S], SPS);
        }
        workgroupBarrier();

        for (var j = 0u; j < HPS; j++) {
            let g = sg + j * NSG;
            if g < G {
                var mx = NEG_INF;
                for (var i = lane; i < n; i += 32u) {
                    mx = max(mx, fs[g * SPS + i]);
                }
                let m_new = max(m_run[j], subgroupMax(mx));
                let a = exp(m_run[j] - m_new);
                var sum = 0.0;
                for (var i = lane; i < CH; i += 32u) {
                    var e = f16(0.0);
                    if i < n {
                        e = f16(exp(fs[g * SPS + i] - m_new));
                    }
                    ph[g * PPS + i] = e;
                    sum += f32(e);
                }
                l_run[j] = l_run[j] * a + subgroupAdd(sum);
                m_run[j] = m_new;
                if lane == 0u {
                    alpha[g] = a;
                }
            }
        }
        // The partial fragment's rows, zero past the context. Only the partition's last
        // chunk can end mid-fragment, so vt holds zeros (set at the start) until then.
        let nfull = n / S;
        let rows = n - nfull * S;
        if rows > 0u {
            for (var i = li; i < S * D; i += WG) {
                var v = f16(0.0);
                if i / D < rows {
                    v = v_cache[fbase[nfull] + i];
                }
                vt[i] = v;
            }
        }
        workgroupBarrier();

        var o0 = CC();
        var o1 = CC();
        var o2 = CC();
        var o3 = CC();
        let d0 = min(sg, KF - 1u) * S;
        let d1 = min(sg + NSG, KF - 1u) * S;
        let d2 = min(sg + 2u * NSG, KF - 1u) * S;
        let d3 = min(sg + 3u * NSG, KF - 1u) * S;
        for (var f = 0u; f < nfull; f++) {
            let a = coopLoadT<CA>(&ph[f * S], PPS);
            let base = fbase[f];
            o0 = coopMultiplyAdd(a, coopLoadT<CB>(&v_cache[base + d0], D), o0);
            if NF > 1u {
                o1 = coopMultiplyAdd(a, coopLoadT<CB>(&v_cache[base + d1], D), o1);
            }
            if NF > 2u {
                o2 = coopMultiplyAdd(a, coopLoadT<CB>(&v_cache[base + d2], D), o2);
                o3 = coopMultiplyAdd(a, coopLoadT<CB>(&v_cache[base + d3], D), o3);
            }
        }
        // Unconditionally (uniform control flow): the partial fragment, or zeros.
        let a = coopLoadT<CA>(&ph[min(nfull, CH / S - 1u) * S], PPS);
        o0 = coopMultiplyAdd(a, coopLoadT<CB>(&vt[d0], D), o0);
        if NF > 1u {
            o1 = coopMultiplyAdd(a, coopLoadT<CB>(&vt[d1], D), o1);
        }
        if NF > 2u {
            o2 = coopMultiplyAdd(a, coopLoadT<CB>(&vt[d2], D), o2);
            o3 = coopMultiplyAdd(a, coopLoadT<CB>(&vt[d3], D), o3);
        }
        // Subgroups that redid a fragment store the same values as its owner.
        coopStoreT(o0, &fs[d0], OPS);
        if NF > 1u {
            coopStoreT(o1, &fs[d1], OPS);
        }
        if NF > 2u {
            coopStoreT(o2, &fs[d2], OPS);
            coopStoreT(o3, &fs[d3], OPS);
        }
        workgroupBarrier();
        for (var k = 0u; k < OPT; k++) {
            let i = li + k * WG;
            if i < G * D {
                let g = i / D;
                o[k] = o[k] * alpha[g] + fs[i + g * (OPS - D)];
            }
        }
        workgroupBarrier();
    }

    for (var j = 0u; j < HPS; j++) {
        let g = sg + j * NSG;
        if g < G && lane == 0u {
            m_fin[g] = m_run[j];
            l_fin[g] = l_run[j];
        }
    }
    workgroupBarrier();
    for (var k = 0u; k < OPT; k++) {
        let i = li + k * WG;
        if i < G * D {
            if SPLIT {
                out[((t * p.hkv + h) * p.splits + split) * G * D + i] = o[k];
            } else {
                let l = l_fin[i / D];
                out[t * p.hq * D + h * G * D + i] = select(0.0, o[k] / l, l > 0.0);
            }
        }
    }
    if SPLIT && li < G {
        ml[((t * p.hkv + h) * p.splits + split) * G + li] = vec2<f32>(m_fin[li], l_fin[li]);
    }
}
