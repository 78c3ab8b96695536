// Batched KV write: the k and v heads of every token of the step (the fused QKV rows,
// already rotated) go into the paged cache as f16 at their slot (block * BS + offset).
// A negative slot marks a padding token and is skipped. Cache layout, per layer:
// [num_blocks, kv_heads, BS, D] for K and for V, so a decode workgroup streams one block
// of one head as BS * D contiguous halves.
struct Params {
    t: u32,
    hq: u32,
    hkv: u32,
    d: u32,
    bs: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> qkv: array<vec2<f32>>;
@group(0) @binding(1) var<storage, read> slots: array<i32>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<u32>;

@compute @workgroup_size(256)
fn kv_write(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let i = flat_group(wg, nwg) * 256u + li;
    let pairs = p.d / 2u;
    if i >= p.t * p.hkv * pairs {
        return;
    }
    let t = i / (p.hkv * pairs);
    let rem = i - t * p.hkv * pairs;
    let h = rem / pairs;
    let j = rem - h * pairs;
    let slot = slots[t];
    if slot < 0 {
        return;
    }
    let s = u32(slot);
    let block = s / p.bs;
    let off = s - block * p.bs;
    let dst = (((block * p.hkv + h) * p.bs + off) * p.d) / 2u + j;
    let row = t * (p.hq + 2u * p.hkv) * pairs;
    let k = qkv[row + (p.hq + h) * pairs + j];
    let v = qkv[row + (p.hq + p.hkv + h) * pairs + j];
    k_cache[dst] = pack2x16float(k);
    v_cache[dst] = pack2x16float(v);
}
