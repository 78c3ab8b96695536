// y[m, n_offset + n] = sum_k x[m, k] * W[n, k] for a few rows of x (decode): the whole
// workgroup streams ROWS weight rows as 128-bit loads while each invocation keeps M x ROWS
// partial sums, reduced by subgroupAdd and then across subgroups in workgroup memory.
// W_DTYPE: 0 = f32 (4 per vec4<u32>), 1 = f16, 2 = bf16 (8 per vec4<u32>). K % 8 == 0.
struct Params {
    n: u32,
    k: u32,
    n_offset: u32,
    ldy: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const WG: u32 = 256u;
const ACC: u32 = M * ROWS;
var<workgroup> partial: array<f32, 64u * ACC>;

@compute @workgroup_size(WG)
fn gemv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let row0 = flat_group(wg, nwg) * ROWS;
    if row0 >= p.n {
        return;
    }
    var acc: array<f32, ACC>;
    for (var j = 0u; j < ACC; j++) {
        acc[j] = 0.0;
    }
    let kx = p.k / 4u;
    if W_DTYPE == 0u {
        let kv = p.k / 4u;
        for (var i = li; i < kv; i += WG) {
            for (var r = 0u; r < ROWS; r++) {
                let row = min(row0 + r, p.n - 1u);
                let wf = bitcast<vec4<f32>>(w[row * kv + i]);
                for (var m = 0u; m < M; m++) {
                    acc[m * ROWS + r] += dot(wf, x[m * kx + i]);
                }
            }
        }
    } else {
        let kv = p.k / 8u;
        for (var i = li; i < kv; i += WG) {
            for (var r = 0u; r < ROWS; r++) {
                let row = min(row0 + r, p.n - 1u);
                let wv = w[row * kv + i];
                let a = vec4<f32>(half2_to_f32(wv.x, W_DTYPE), half2_to_f32(wv.y, W_DTYPE));
                let b = vec4<f32>(half2_to_f32(wv.z, W_DTYPE), half2_to_f32(wv.w, W_DTYPE));
                for (var m = 0u; m < M; m++) {
                    acc[m * ROWS + r] += dot(a, x[m * kx + 2u * i]) + dot(b, x[m * kx + 2u * i + 1u]);
                }
            }
        }
    }
    for (var j = 0u; j < ACC; j++) {
        let s = subgroupAdd(acc[j]);
        if lane == 0u {
            partial[sg * ACC + j] = s;
        }
    }
    workgroupBarrier();
    if li < ACC {
        let m = li / ROWS;
        let r = li - m * ROWS;
        var total = 0.0;
        for (var s = 0u; s < nsg; s++) {
            total += partial[s * ACC + li];
        }
        if row0 + r < p.n {
            y[m * p.ldy + p.n_offset + row0 + r] = total;
        }
    }
}
