// The down projection and the weighted combine of decode tokens in one dispatch, added into
// the residual stream:
//   y[t, n] += sum_j topk_w[t k + j] * (W[e_j, n, :] . act[pair_pos[t k + j], :])
// over the picks j whose expert e_j lies in this dispatch's weight chunk [e0, e0 + e_count)
// (a stack of e_count experts, n rows of k each). Workgroup (row group, token): PG slices
// of TPR invocations take picks g, g + PG, ..; each slice keeps the weighted sums of RPT
// rows, and the slices' sums meet in workgroup memory, added in a fixed order. Each chosen
// expert's rows are read once per token: the split for one token, where the grouped GEMV
// (moe_gemv.wgsl) would need a combine dispatch after it.
// Weights f32 (W_DTYPE 0, K % 4 == 0) or f16 / bf16 (K % 8 == 0).
// Prelude: TPR, PG, RPT, W_DTYPE.
struct Params {
    n: u32,
    k: u32,
    e0: u32,
    e_count: u32,
    top_k: u32,
    tokens: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> topk_ids: array<u32>;
@group(0) @binding(4) var<storage, read> topk_w: array<f32>;
@group(0) @binding(5) var<storage, read> pair_pos: array<u32>;

const WG: u32 = TPR * PG;
// One slot per (subgroup, row); subgroups of at least 4 invocations.
var<workgroup> partial: array<f32, (WG / 4u) * RPT>;

@compute @workgroup_size(WG)
fn moe_down_combine(@builtin(workgroup_id) wg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32,
                    @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32,
                    @builtin(subgroup_size) sg_size: u32) {
    let t = wg.y;
    let row0 = wg.x * RPT;
    if t >= p.tokens || row0 >= p.n {
        return;
    }
    let g = li / TPR;
    let lt = li - g * TPR;
    let kx = p.k / 4u;
    let kv = p.k / 8u;
    var acc: array<f32, RPT>;
    for (var r = 0u; r < RPT; r++) {
        acc[r] = 0.0;
    }
    for (var j = g; j < p.top_k; j += PG) {
        let pair = t * p.top_k + j;
        let e = topk_ids[pair];
        if e < p.e0 || e >= p.e0 + p.e_count {
            continue;
        }
        let wbase = (e - p.e0) * p.n;
        let xb = pair_pos[pair] * kx;
        var part: array<f32, RPT>;
        for (var r = 0u; r < RPT; r++) {
            part[r] = 0.0;
        }
        if W_DTYPE == 0u {
            for (var i = lt; i < kx; i += TPR) {
                let xv = x[xb + i];
                for (var r = 0u; r < RPT; r++) {
                    let row = wbase + min(row0 + r, p.n - 1u);
                    part[r] += dot(bitcast<vec4<f32>>(w[row * kx + i]), xv);
                }
            }
        } else {
            for (var i = lt; i < kv; i += TPR) {
                let x0 = x[xb + 2u * i];
                let x1 = x[xb + 2u * i + 1u];
                for (var r = 0u; r < RPT; r++) {
                    let row = wbase + min(row0 + r, p.n - 1u);
                    let wv = w[row * kv + i];
                    let a = vec4<f32>(half2_to_f32(wv.x, W_DTYPE), half2_to_f32(wv.y, W_DTYPE));
                    let b = vec4<f32>(half2_to_f32(wv.z, W_DTYPE), half2_to_f32(wv.w, W_DTYPE));
                    part[r] += dot(a, x0) + dot(b, x1);
                }
            }
        }
        let wt = topk_w[pair];
        for (var r = 0u; r < RPT; r++) {
            acc[r] += wt * part[r];
        }
    }
    for (var r = 0u; r < RPT; r++) {
        let s = subgroupAdd(acc[r]);
        if lane == 0u {
            partial[sg * RPT + r] = s;
        }
    }
    workgroupBarrier();
    if li < RPT {
        let row = row0 + li;
        var total = 0.0;
        for (var s = 0u; s < WG / sg_size; s++) {
            total += partial[s * RPT + li];
        }
        if row < p.n {
            y[t * p.n + row] += total;
        }
    }
}
