// The router of a MoE layer carried through the attention's output projection, once at
// load: F = R diag(g) W_o, [E, K], from the router R [E, H], the post-attention RMSNorm
// weight g [H] and o_proj W_o [H, K]. With h = h_prev + W_o a, the router logits of
// rmsnorm(h) * g are rstd(h) (R diag(g) h_prev + F a): a decode step computes the first half
// beside the qkv GEMV and the second beside o_proj (gemv.wgsl's TAIL), and needs no router
// dispatch between o_proj and the experts (LOGIT_RSTD in moe_gemv.wgsl and moe_route.wgsl).
// One invocation per output word (two f16 / bf16 elements, or one f32), f32 accumulation,
// rounded once to the output's dtype (nearest even for bf16).
// Prelude: R_DTYPE (the router's dtype), O_DTYPE (o_proj's, and the output's).
struct Params {
    experts: u32,
    h: u32,
    // Output words per row (K, or K / 2).
    words: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> r: array<u32>;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> wo: array<u32>;
@group(0) @binding(3) var<storage, read_write> f: array<u32>;

fn bf16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

@compute @workgroup_size(64)
fn router_fold(@builtin(global_invocation_id) gid: vec3<u32>) {
    let word = gid.x;
    let e = gid.y;
    if word >= p.words || e >= p.experts {
        return;
    }
    var acc = vec2<f32>(0.0);
    for (var i = 0u; i < p.h; i++) {
        let ri = e * p.h + i;
        let rg = elem_f32(r[word_index(ri, R_DTYPE)], ri, R_DTYPE) * g[i];
        let ow = wo[i * p.words + word];
        if O_DTYPE == 0u {
            acc.x += rg * bitcast<f32>(ow);
        } else {
            acc += rg * half2_to_f32(ow, O_DTYPE);
        }
    }
    var out = bitcast<u32>(acc.x);
    if O_DTYPE == 1u {
        out = pack2x16float(acc);
    } else if O_DTYPE == 2u {
        out = bf16_bits(acc.x) | (bf16_bits(acc.y) << 16u);
    }
    f[e * p.words + word] = out;
}
