// Gathers rows of an embedding table (chunk [row_start, row_start + rows) of the vocab)
// into f32 hidden states. Tokens whose id falls outside the chunk are left to the
// dispatch of the chunk that holds them.
struct Params {
    m: u32,
    h: u32,
    row_start: u32,
    rows: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> ids: array<u32>;
@group(0) @binding(1) var<storage, read> table: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn embedding(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let t = flat_group(wg, nwg);
    if t >= p.m {
        return;
    }
    let id = ids[t];
    if id < p.row_start || id >= p.row_start + p.rows {
        return;
    }
    let base = (id - p.row_start) * p.h;
    for (var i = li; i < p.h; i += 256u) {
        let e = base + i;
        out[t * p.h + i] = elem_f32(table[word_index(e, W_DTYPE)], e, W_DTYPE);
    }
}
