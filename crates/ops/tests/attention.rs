//! Paged attention against a CPU reference: shuffled, non-contiguous block tables; mixed
//! prefill and decode batches; contexts crossing block boundaries and ending mid-block;
//! prefill chunks starting at ctx > 0; padding tokens; every head dim and GQA ratio; the
//! split-K and single-pass decode agreeing; and all four switch combinations
//! (VLLM_METAL_ATTENTION x VLLM_METAL_FUSED_KV) giving the same results.

mod common;
use common::*;

use rand::seq::SliceRandom;
use vllm_apple_ops::kernels::attention::{
    self, AttentionOptions, AttnInputs, AttnShape, HostMetadata, RopeArgs, SeqSlice,
};
use vllm_apple_ops::kernels::matmul;
use vllm_apple_ops::kernels::rope::{self, RopeShape};
use vllm_apple_ops::kv_cache::{KvCache, KvCacheSpec};
use vllm_apple_ops::{DType, Step, Weight};

/// K/V are f16 in the cache and the reference reads the same f16 values, so what remains is
/// f32 accumulation order and exp: outputs are averages of values in [-1, 1].
const TOL: f64 = 2e-5;
/// The cooperative-matrix kernel rounds the scaled queries and the probabilities to f16.
const MATRIX_TOL: f64 = 3e-3;

struct Case {
    shape: AttnShape,
    block_size: usize,
    /// (tokens already cached, new tokens) per sequence.
    seqs: Vec<(usize, usize)>,
    pad: usize,
    seed: u64,
    /// q and k arrive unrotated and `attention_rope` applies the rotary embedding, with
    /// Qwen3's q/k norm when `Some(true)`.
    rope: Option<bool>,
}

fn all_options() -> Vec<AttentionOptions> {
    let mut v = Vec::new();
    for paged in [true, false] {
        for fused_kv in [true, false] {
            v.push(AttentionOptions {
                paged,
                fused_kv,
                ..Default::default()
            });
        }
    }
    // The rope dispatch kept apart from the attention dispatch (with `attention_rope`).
    v.push(AttentionOptions {
        fused_rope: false,
        ..Default::default()
    });
    // Split-K forced on short contexts, and forced off.
    v.push(AttentionOptions {
        partition: Some(64),
        ..Default::default()
    });
    v.push(AttentionOptions {
        partition: Some(1 << 20),
        ..Default::default()
    });
    // The scalar kernel where the default is the cooperative-matrix one, split and not.
    for partition in [None, Some(64)] {
        v.push(AttentionOptions {
            partition,
            matrices: Some(false),
            ..Default::default()
        });
    }
    // Where matrices are offered: the matrix kernel for every token (prefill too), both
    // chunk lengths, split and not.
    if ctx().coop.is_some() && ctx().subgroup_is(32) {
        for (partition, chunk) in [(None, 128), (Some(256), 256), (None, 256), (Some(64), 64)] {
            v.push(AttentionOptions {
                partition,
                matrices: Some(true),
                chunk: Some(chunk),
                ..Default::default()
            });
        }
    }
    v
}

fn run(case: &Case, options: &[AttentionOptions]) {
    let ctx = ctx();
    let s = case.shape;
    let bs = case.block_size;
    let mut r = rng(case.seed);
    // Shuffled block ids shared out to the sequences: tables are non-contiguous.
    let need: usize = case.seqs.iter().map(|(c, n)| (c + n).div_ceil(bs)).sum();
    let num_blocks = need + 3;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(&mut r);
    let mut tables = Vec::new();
    let mut next = 0;
    for (c, n) in &case.seqs {
        let k = (c + n).div_ceil(bs);
        tables.push(ids[next..next + k].to_vec());
        next += k;
    }
    let row = (s.q_heads + 2 * s.kv_heads) * s.head_dim;
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let spec = KvCacheSpec {
        num_layers: 1,
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        block_size: bs,
    };

    // The history: every sequence's cached tokens written by one batched KV write.
    let hist: Vec<SeqSlice> = case
        .seqs
        .iter()
        .zip(&tables)
        .filter(|((c, _), _)| *c > 0)
        .map(|((c, _), t)| SeqSlice {
            block_table: t,
            num_cached: 0,
            num_new: *c,
        })
        .collect();
    let hist_meta = HostMetadata::build(&hist, bs, 0).unwrap();
    let hist_qkv = randn(&mut r, hist_meta.positions.len() * row, 1.0);

    let step_seqs: Vec<SeqSlice> = case
        .seqs
        .iter()
        .zip(&tables)
        .map(|((c, n), t)| SeqSlice {
            block_table: t,
            num_cached: *c,
            num_new: *n,
        })
        .collect();
    let n_real: usize = case.seqs.iter().map(|(_, n)| n).sum();
    let meta = HostMetadata::build(&step_seqs, bs, n_real + case.pad).unwrap();
    let t = meta.positions.len();
    let raw = randn(&mut r, t * row, 1.0);
    // With rope: the rotated rows the cache and the reference see, and the tables.
    let d = s.head_dim;
    let inv_freq = rope::inv_freq(d, 1e6, None);
    let norms = (randn(&mut r, d, 0.5), randn(&mut r, d, 0.5));
    let qk_norm = case
        .rope
        .filter(|n| *n)
        .map(|_| (&norms.0[..], &norms.1[..]));
    let mut qkv = raw.clone();
    if case.rope.is_some() {
        let shape = RopeShape {
            q_heads: s.q_heads,
            kv_heads: s.kv_heads,
            head_dim: d,
        };
        rope::cpu::rope(&mut qkv, &meta.positions, &inv_freq, qk_norm, 1e-6, shape);
    }

    let mut first: Option<(Vec<f32>, f64)> = None;
    for opts in options {
        let chunk = opts.chunk.unwrap_or(128);
        if opts.matrices == Some(true) && attention::matrix_fragment(ctx, s, bs, chunk).is_none() {
            continue; // this shape or block size is not one the matrix kernel takes
        }
        let gm = meta.upload(ctx, bs).unwrap();
        let tol = match attention::uses_matrices(ctx, opts, &gm, s).unwrap() {
            Some(_) => MATRIX_TOL,
            None => TOL,
        };
        let cache = KvCache::new(ctx, spec, num_blocks).unwrap();
        let layer = &cache.layers[0];
        layer.k.poison(ctx);
        layer.v.poison(ctx);
        if !hist.is_empty() {
            let hm = hist_meta.upload(ctx, bs).unwrap();
            let hq = ctx
                .upload_f32(&[hist_meta.positions.len(), row], DType::F32, &hist_qkv)
                .unwrap();
            let mut st = Step::new(ctx);
            let a = AttnInputs {
                qkv: &hq,
                meta: &hm,
                cache: layer,
                shape: s,
                scale,
            };
            attention::write_kv(&mut st, &a).unwrap();
            st.submit_and_wait().unwrap();
        }
        let uploaded = if case.rope.is_some() { &raw } else { &qkv };
        let qkv_t = ctx.upload_f32(&[t, row], DType::F32, uploaded).unwrap();
        let out = ctx.empty(&[t, s.q_heads * s.head_dim], DType::F32).unwrap();
        out.poison(ctx);
        let mut st = Step::new(ctx);
        let a = AttnInputs {
            qkv: &qkv_t,
            meta: &gm,
            cache: layer,
            shape: s,
            scale,
        };
        let positions = ctx.upload_u32(&[t], &meta.positions).unwrap();
        let freq = ctx.upload_f32(&[d / 2], DType::F32, &inv_freq).unwrap();
        let qn = ctx.upload_f32(&[d], DType::F32, &norms.0).unwrap();
        let kn = ctx.upload_f32(&[d], DType::F32, &norms.1).unwrap();
        match case.rope {
            None => attention::attention(&mut st, opts, &a, &out).unwrap(),
            Some(norm) => {
                let rope = RopeArgs {
                    positions: &positions,
                    inv_freq: &freq,
                    qk_norm: norm.then_some((&qn, &kn)),
                    eps: 1e-6,
                };
                attention::attention_rope(&mut st, opts, &a, &rope, &out).unwrap()
            }
        }
        st.submit_and_wait().unwrap();
        let got = out.to_f32_vec(ctx).unwrap();
        // A split-K decode left unreduced, its reduce folded into the output projection
        // (here an identity, so the projection must give the reduced output back). The
        // step writes the same K/V into the same slots again.
        if let Some(norm) = case.rope {
            let rope = RopeArgs {
                positions: &positions,
                inv_freq: &freq,
                qk_norm: norm.then_some((&qn, &kn)),
                eps: 1e-6,
            };
            let take = |p: &attention::Partials| {
                p.tokens <= matmul::FUSED_MAX_M && matmul::partials_fit(p)
            };
            let out2 = ctx.empty(&[t, s.q_heads * d], DType::F32).unwrap();
            // (Fresh rows: a rope dispatch rotates them in place.)
            let qkv2 = ctx.upload_f32(&[t, row], DType::F32, uploaded).unwrap();
            let a2 = AttnInputs { qkv: &qkv2, ..a };
            let mut st = Step::new(ctx);
            let deferred =
                attention::attention_rope_deferred(&mut st, opts, &a2, &rope, &out2, &take)
                    .unwrap();
            if let Some(p) = deferred {
                let k = s.q_heads * d;
                let eye: Vec<f32> = (0..k * k)
                    .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
                    .collect();
                let w = Weight::upload_f32(ctx, "eye", k, k, DType::F16, &eye).unwrap();
                matmul::gemv_partials(&mut st, &p, &w, &out2, false, None).unwrap();
                st.submit_and_wait().unwrap();
                assert_close(
                    &format!("reduce folded into a GEMV, seqs={:?} {opts:?}", case.seqs),
                    &out2.to_f32_vec(ctx).unwrap(),
                    &got,
                    TOL,
                );
            } else {
                st.submit_and_wait().unwrap();
            }
        }

        // The cache holds exactly the f16 K/V of every real token at its slot (K within
        // an f16 rounding step where the GPU rotated it in f32 and the reference in f64).
        let kc = layer.k.to_f32_vec(ctx).unwrap();
        let vc = layer.v.to_f32_vec(ctx).unwrap();
        for (tok, &slot) in meta.slot_mapping.iter().enumerate() {
            if slot < 0 {
                continue;
            }
            let (blk, off) = (slot as usize / bs, slot as usize % bs);
            for h in 0..s.kv_heads {
                let at = ((blk * s.kv_heads + h) * bs + off) * d;
                let k_src = &qkv[tok * row + (s.q_heads + h) * d..][..d];
                let v_src = &qkv[tok * row + (s.q_heads + s.kv_heads + h) * d..][..d];
                let k_want = DType::F16.round_trip(k_src);
                if case.rope.is_some() {
                    for (i, (g, w)) in kc[at..at + d].iter().zip(&k_want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-3 * w.abs().max(1.0),
                            "K of token {tok} head {h} dim {i}: {g} vs {w}"
                        );
                    }
                } else {
                    assert_eq!(&kc[at..at + d], &k_want[..], "K of token {tok} head {h}");
                }
                assert_eq!(
                    &vc[at..at + d],
                    &DType::F16.round_trip(v_src)[..],
                    "V of token {tok} head {h}"
                );
            }
        }
        let want = attention::cpu::attention(&qkv, &kc, &vc, &meta, s, bs, scale);
        assert_close(
            &format!("attention {s:?} bs={bs} seqs={:?} {opts:?}", case.seqs),
            &got,
            &want,
            tol,
        );
        for (tok, c) in meta.ctx_of.iter().enumerate() {
            if *c == 0 {
                let o = &got[tok * s.q_heads * d..(tok + 1) * s.q_heads * d];
                assert!(
                    o.iter().all(|x| *x == 0.0),
                    "padding token {tok} must give zeros"
                );
            }
        }
        match &first {
            None => first = Some((got, tol)),
            Some((f, t)) => assert_close(
                &format!("{opts:?} vs the first option"),
                &got,
                f,
                tol.max(*t),
            ),
        }
    }
}

#[test]
fn decode_batch_gqa8_head128_across_block_boundaries() {
    run(
        &Case {
            shape: AttnShape {
                q_heads: 32,
                kv_heads: 4,
                head_dim: 128,
            },
            block_size: 16,
            seqs: vec![(0, 1), (14, 1), (15, 1), (16, 1), (299, 1)],
            pad: 2,
            seed: 1,
            rope: None,
        },
        &all_options(),
    );
}

#[test]
fn decode_with_rope_and_qk_norm_in_the_attention_dispatch() {
    // Qwen3's decode: the matrix kernel with the KV write fused norms and rotates q and k
    // itself; every other option runs the rope dispatch first. Split and single pass.
    run(
        &Case {
            shape: AttnShape {
                q_heads: 32,
                kv_heads: 4,
                head_dim: 128,
            },
            block_size: 16,
            // (128 + 1: the newest position's own partition starts where a full one ends.)
            seqs: vec![(0, 1), (15, 1), (16, 1), (128, 1), (700, 1)],
            pad: 1,
            seed: 7,
            rope: Some(true),
        },
        &all_options(),
    );
}

#[test]
fn rope_without_qk_norm_head64_mixed_batch() {
    // Llama's rope (no q/k norm); a prefill chunk in the batch takes the rope dispatch.
    let decode = vec![(3, 1), (130, 1)];
    for (seqs, seed) in [(decode.clone(), 8), ([decode, vec![(5, 9)]].concat(), 9)] {
        run(
            &Case {
                shape: AttnShape {
                    q_heads: 8,
                    kv_heads: 2,
                    head_dim: 64,
                },
                block_size: 16,
                seqs,
                pad: 0,
                seed,
                rope: Some(false),
            },
            &all_options(),
        );
    }
}

#[test]
fn mixed_prefill_chunks_and_decodes_gqa4_head64() {
    run(
        &Case {
            shape: AttnShape {
                q_heads: 8,
                kv_heads: 2,
                head_dim: 64,
            },
            block_size: 16,
            seqs: vec![(0, 37), (20, 13), (50, 1), (33, 2)],
            pad: 3,
            seed: 2,
            rope: None,
        },
        &all_options(),
    );
}

#[test]
fn mha_head96_small_blocks() {
    run(
        &Case {
            shape: AttnShape {
                q_heads: 3,
                kv_heads: 3,
                head_dim: 96,
            },
            block_size: 8,
            seqs: vec![(5, 3), (0, 1), (130, 1)],
            pad: 0,
            seed: 3,
            rope: None,
        },
        &all_options(),
    );
}

#[test]
fn gqa16_head256_with_prefill_at_offset() {
    run(
        &Case {
            shape: AttnShape {
                q_heads: 16,
                kv_heads: 1,
                head_dim: 256,
            },
            block_size: 16,
            seqs: vec![(100, 1), (7, 20)],
            pad: 1,
            seed: 4,
            rope: None,
        },
        &all_options(),
    );
}

#[test]
fn long_context_decode_split_and_single_pass_agree() {
    let split = AttentionOptions::default(); // 2 tokens x 4 kv heads: split into partitions
    let single = AttentionOptions {
        partition: Some(1 << 20),
        ..Default::default()
    };
    let reference = AttentionOptions {
        paged: false,
        ..Default::default()
    };
    run(
        &Case {
            shape: AttnShape {
                q_heads: 32,
                kv_heads: 4,
                head_dim: 128,
            },
            block_size: 16,
            seqs: vec![(2047, 1), (1000, 1)],
            pad: 0,
            seed: 5,
            rope: None,
        },
        &[split, single, reference],
    );
}

#[test]
fn prefill_of_2048_tokens() {
    run(
        &Case {
            shape: AttnShape {
                q_heads: 4,
                kv_heads: 1,
                head_dim: 64,
            },
            block_size: 16,
            seqs: vec![(0, 2048)],
            pad: 0,
            seed: 6,
            rope: None,
        },
        &[AttentionOptions::default()],
    );
}

#[test]
fn switches_parse_like_vllm() {
    use attention::parse_flag;
    assert!(parse_flag("VLLM_METAL_ATTENTION", None, true).unwrap());
    assert!(!parse_flag("VLLM_METAL_FUSED_KV", Some("0"), true).unwrap());
    assert!(parse_flag("VLLM_METAL_FUSED_KV", Some("true"), false).unwrap());
    let e = parse_flag("VLLM_METAL_ATTENTION", Some("maybe"), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("VLLM_METAL_ATTENTION"), "{e}");
}

#[test]
fn bad_shapes_and_short_tables_are_errors() {
    let ctx = ctx();
    let table = [0u32];
    let e = HostMetadata::build(
        &[SeqSlice {
            block_table: &table,
            num_cached: 10,
            num_new: 10,
        }],
        16,
        0,
    );
    assert!(e.unwrap_err().to_string().contains("need 2 blocks"));
    let s = AttnShape {
        q_heads: 6,
        kv_heads: 4,
        head_dim: 128,
    };
    let cache = KvCache::new(
        ctx,
        KvCacheSpec {
            num_layers: 1,
            kv_heads: 4,
            head_dim: 128,
            block_size: 16,
        },
        2,
    )
    .unwrap();
    let meta = HostMetadata::build(
        &[SeqSlice {
            block_table: &table,
            num_cached: 0,
            num_new: 1,
        }],
        16,
        0,
    )
    .unwrap()
    .upload(ctx, 16)
    .unwrap();
    let qkv = ctx.empty(&[1, (6 + 8) * 128], DType::F32).unwrap();
    let mut st = Step::new(ctx);
    let a = AttnInputs {
        qkv: &qkv,
        meta: &meta,
        cache: &cache.layers[0],
        shape: s,
        scale: 1.0,
    };
    assert!(attention::write_kv(&mut st, &a).is_err());
}
