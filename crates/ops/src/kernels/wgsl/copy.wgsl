// Streaming copy of 16-byte words: the bandwidth reference for benchmarks, and a plain
// device-side tensor copy.
struct Params {
    n: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(256)
fn copy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    // Four words per invocation, strided by the workgroup so accesses stay coalesced.
    let base = flat_group(wg, nwg) * 1024u + li;
    for (var j = 0u; j < 4u; j++) {
        let i = base + j * 256u;
        if i < p.n {
            dst[i] = src[i];
        }
    }
}
