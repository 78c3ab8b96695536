//! Every kernel against its CPU reference: random non-zero inputs, poisoned outputs,
//! shapes that are not multiples of the tile sizes. Error bounds are relative to the
//! output's largest magnitude; the references see the same dtype-rounded weights, so the
//! bounds measure accumulation order (f32) or the f16 rounding of activations (coop path).

mod common;
use common::*;

use vllm_apple_ops::kernels::copy;
use vllm_apple_ops::kernels::matmul::{CoopConfig, GemvConfig, MatmulPath, SkinnyConfig, Tuning};
use vllm_apple_ops::kernels::{activation, argmax, embedding, matmul, rmsnorm, rope, softmax};
use vllm_apple_ops::{DType, Step, Weight};

const F32_ACCUM_TOL: f64 = 2e-5;
/// The coop path rounds activations to f16 (11-bit mantissa) before the product.
const COOP_TOL: f64 = 4e-3;

#[test]
fn embedding_gathers_rows_across_chunks() {
    let ctx = ctx();
    let mut r = rng(1);
    for (dtype, v, h, m, chunk_bytes) in [
        (DType::F16, 1000usize, 576usize, 17usize, u64::MAX),
        (DType::BF16, 300, 100, 5, 64 * 100 * 2), // 5 chunks of 64 rows
        (DType::F32, 130, 72, 3, 64 * 72 * 4),
    ] {
        let table = dtype.round_trip(&randn(&mut r, v * h, 1.0));
        let w = Weight::upload_chunked(
            ctx,
            "emb",
            v,
            h,
            dtype,
            &dtype.encode_f32(&table),
            chunk_bytes,
        )
        .unwrap();
        let ids: Vec<u32> = (0..m).map(|i| ((i * 7919 + 13) % v) as u32).collect();
        let ids_t = ctx.upload_u32(&[m], &ids).unwrap();
        let out = ctx.empty(&[m, h], DType::F32).unwrap();
        out.poison(ctx);
        let mut s = Step::new(ctx);
        embedding::embedding(&mut s, &ids_t, &w, &out).unwrap();
        s.submit_and_wait().unwrap();
        let want = embedding::cpu::embedding(&ids, &table, h);
        assert_eq!(out.to_f32_vec(ctx).unwrap(), want, "{dtype} v={v} h={h}");
    }
}

#[test]
fn rmsnorm_and_fused_residual() {
    let ctx = ctx();
    let mut r = rng(2);
    for (m, h) in [(1usize, 576usize), (3, 1000), (17, 2048), (5, 100)] {
        let x = randn(&mut r, m * h, 2.0);
        let res = randn(&mut r, m * h, 1.0);
        let w = randn(&mut r, h, 1.0);
        let eps = 1e-6;
        let xt = ctx.upload_f32(&[m, h], DType::F32, &x).unwrap();
        let rt = ctx.upload_f32(&[m, h], DType::F32, &res).unwrap();
        let wt = ctx.upload_f32(&[h], DType::F32, &w).unwrap();
        let o1 = ctx.empty(&[m, h], DType::F32).unwrap();
        let o2 = ctx.empty(&[m, h], DType::F32).unwrap();
        o1.poison(ctx);
        o2.poison(ctx);
        let mut s = Step::new(ctx);
        rmsnorm::rmsnorm(&mut s, &xt, &wt, eps, &o1).unwrap();
        rmsnorm::add_rmsnorm(&mut s, &xt, &rt, &wt, eps, &o2).unwrap();
        s.submit_and_wait().unwrap();
        assert_close(
            "rmsnorm",
            &o1.to_f32_vec(ctx).unwrap(),
            &rmsnorm::cpu::rmsnorm(&x, &w, eps),
            1e-5,
        );
        let sum: Vec<f32> = x.iter().zip(&res).map(|(a, b)| a + b).collect();
        assert_close("residual", &rt.to_f32_vec(ctx).unwrap(), &sum, 1e-6);
        assert_close(
            "add_rmsnorm",
            &o2.to_f32_vec(ctx).unwrap(),
            &rmsnorm::cpu::rmsnorm(&sum, &w, eps),
            1e-5,
        );
    }
}

fn check_matmul(
    m: usize,
    n: usize,
    k: usize,
    dtype: DType,
    path: MatmulPath,
    chunk: u64,
    seed: u64,
) {
    check_matmul_cfg(m, n, k, dtype, path, chunk, seed, Tuning::default())
}

#[allow(clippy::too_many_arguments)]
fn check_matmul_cfg(
    m: usize,
    n: usize,
    k: usize,
    dtype: DType,
    path: MatmulPath,
    chunk: u64,
    seed: u64,
    cfg: Tuning,
) {
    let ctx = ctx();
    let mut r = rng(seed);
    let x = randn(&mut r, m * k, 1.0);
    let w = dtype.round_trip(&randn(&mut r, n * k, 0.5));
    let wt = Weight::upload_chunked(ctx, "w", n, k, dtype, &dtype.encode_f32(&w), chunk).unwrap();
    let xt = ctx.upload_f32(&[m, k], DType::F32, &x).unwrap();
    let y = ctx.empty(&[m, n], DType::F32).unwrap();
    y.poison(ctx);
    let mut s = Step::new(ctx);
    matmul::matmul_tuned(&mut s, &xt, &wt, &y, path, cfg).unwrap();
    s.submit_and_wait().unwrap();
    let (want, tol) = if matches!(path, MatmulPath::Coop | MatmulPath::Skinny) {
        let xh = DType::F16.round_trip(&x);
        (matmul::cpu::matmul(&xh, &w, n, k), COOP_TOL)
    } else {
        (
            matmul::cpu::matmul(&x, &w, n, k),
            F32_ACCUM_TOL * (k as f64).sqrt(),
        )
    };
    assert_close(
        &format!(
            "matmul {path:?} {cfg:?} {dtype} m={m} n={n} k={k} chunks={}",
            wt.chunks.len()
        ),
        &y.to_f32_vec(ctx).unwrap(),
        &want,
        tol,
    );
}

#[test]
fn gemv_decode_shapes() {
    for (i, (m, n, k, dt)) in [
        (1usize, 1536usize, 576usize, DType::F16),
        (3, 1000, 1000, DType::BF16),
        (8, 77, 2048, DType::F16),
        (5, 130, 64, DType::F32),
        (1, 2049, 1000, DType::BF16),
        (16, 333, 2048, DType::BF16),
        (11, 129, 768, DType::F16),
    ]
    .into_iter()
    .enumerate()
    {
        check_matmul(m, n, k, dt, MatmulPath::Gemv, u64::MAX, 10 + i as u64);
    }
}

#[test]
fn gemv_splits_write_every_output() {
    // A split is valid only if its workgroup has an invocation for each output it owns
    // (row groups x M x rows per group); the defaults are valid on subgroups of 8 and 32.
    let too_many = GemvConfig {
        wg: 128,
        tpr: 32,
        rpt: 4,
    };
    assert!(!too_many.valid(16, 32), "256 outputs for 128 invocations");
    assert!(too_many.valid(8, 32));
    for m in 1..=32 {
        for k in [64, 768, 1024, 2048, 4096] {
            for sg in [8, 32] {
                let c = GemvConfig::for_shape(m, k);
                assert!(
                    c.valid(m, sg),
                    "for_shape({m}, {k}) = {c:?} on subgroups of {sg}"
                );
            }
        }
    }
}

#[test]
fn fused_gemv_norm_and_accumulate() {
    // y (+)= rmsnorm(x) W^T or x W^T, against the CPU norm then the CPU product.
    let ctx = ctx();
    for (i, (m, n, k, dt)) in [
        (1usize, 1536usize, 576usize, DType::F16),
        (3, 1000, 1000, DType::BF16),
        (8, 77, 2048, DType::F16),
        (5, 130, 64, DType::F32),
        (2, 300, 768, DType::F16),
        (16, 200, 1024, DType::BF16),
        (12, 130, 2048, DType::F16),
        (4, 96, 1000, DType::BF16),
    ]
    .into_iter()
    .enumerate()
    {
        for (norm, accumulate) in [(true, false), (false, true), (true, true)] {
            let mut r = rng(400 + i as u64);
            // Rows of a residual stream: not unit scale, so the norm matters.
            let x = randn(&mut r, m * k, 3.0);
            let g = randn(&mut r, k, 1.0);
            let w = dt.round_trip(&randn(&mut r, n * k, 0.5));
            let y0 = randn(&mut r, m * n, 1.0);
            let eps = 1e-6;
            let wt =
                Weight::upload_chunked(ctx, "w", n, k, dt, &dt.encode_f32(&w), u64::MAX).unwrap();
            let xt = ctx.upload_f32(&[m, k], DType::F32, &x).unwrap();
            let gt = ctx.upload_f32(&[k], DType::F32, &g).unwrap();
            let y = ctx.upload_f32(&[m, n], DType::F32, &y0).unwrap();
            if !accumulate {
                y.poison(ctx);
            }
            let mut s = Step::new(ctx);
            let f = matmul::Fusion {
                norm: norm.then_some((&gt, eps)),
                accumulate,
                tail: None,
            };
            // Where the skinny matrix GEMM takes the rows, x goes in as f16.
            let path = matmul::fused_path(&s, m, &wt);
            matmul::matmul_fused(&mut s, &xt, &wt, &y, f).unwrap();
            s.submit_and_wait().unwrap();
            let xin = match norm {
                true => vllm_apple_ops::kernels::rmsnorm::cpu::rmsnorm(&x, &g, eps),
                false => x.clone(),
            };
            let mut want = matmul::cpu::matmul(&xin, &w, n, k);
            if accumulate {
                for (a, b) in want.iter_mut().zip(&y0) {
                    *a += b;
                }
            }
            let tol = match path {
                MatmulPath::Skinny => COOP_TOL,
                _ => F32_ACCUM_TOL * (k as f64).sqrt(),
            };
            assert_close(
                &format!(
                    "fused {path:?} norm={norm} accumulate={accumulate} {dt} m={m} n={n} k={k}"
                ),
                &y.to_f32_vec(ctx).unwrap(),
                &want,
                tol,
            );
        }
    }
    // Beyond the fused GEMV's rows: an error, not a silent fallback.
    let m = matmul::FUSED_MAX_M + 1;
    let xt = ctx
        .upload_f32(&[m, 64], DType::F32, &vec![1.0; m * 64])
        .unwrap();
    let wt = Weight::upload_chunked(
        ctx,
        "w",
        8,
        64,
        DType::F32,
        &DType::F32.encode_f32(&[0.5; 512]),
        u64::MAX,
    )
    .unwrap();
    let y = ctx.empty(&[m, 8], DType::F32).unwrap();
    let mut s = Step::new(ctx);
    assert!(matmul::matmul_fused(&mut s, &xt, &wt, &y, matmul::Fusion::default()).is_err());
}

fn gemv(c: GemvConfig) -> Tuning {
    Tuning {
        gemv: Some(c),
        ..Default::default()
    }
}

#[test]
fn gemv_every_work_split() {
    // Each split changes which invocations share a row and how partial sums meet.
    let splits = [
        GemvConfig {
            wg: 256,
            tpr: 256,
            rpt: 1,
        },
        GemvConfig {
            wg: 256,
            tpr: 64,
            rpt: 8,
        },
        GemvConfig {
            wg: 128,
            tpr: 128,
            rpt: 2,
        },
        GemvConfig {
            wg: 256,
            tpr: 128,
            rpt: 3,
        },
        GemvConfig {
            wg: 64,
            tpr: 64,
            rpt: 5,
        },
        GemvConfig {
            wg: 128,
            tpr: 32,
            rpt: 3,
        },
    ];
    for (i, cfg) in splits.into_iter().enumerate() {
        check_matmul_cfg(
            2,
            203,
            1000,
            DType::F16,
            MatmulPath::Gemv,
            u64::MAX,
            70 + i as u64,
            gemv(cfg),
        );
        check_matmul_cfg(
            1,
            67,
            96,
            DType::F32,
            MatmulPath::Gemv,
            u64::MAX,
            80 + i as u64,
            gemv(cfg),
        );
    }
}

#[test]
fn copy_kernel_copies_exactly() {
    let ctx = ctx();
    let mut r = rng(5);
    let n = 1024 * 1024 + 12; // a partial last workgroup
    let v = randn(&mut r, n, 1.0);
    let a = ctx.upload_f32(&[n], DType::F32, &v).unwrap();
    let b = ctx.empty(&[n], DType::F32).unwrap();
    b.poison(ctx);
    let mut s = Step::new(ctx);
    copy::copy(&mut s, &a, &b).unwrap();
    s.submit_and_wait().unwrap();
    assert_eq!(b.to_f32_vec(ctx).unwrap(), v);
}

#[test]
fn packed_upload_gives_aligned_views_of_each_array() {
    // Arrays of awkward lengths (empty, one word, one past an alignment unit) in one
    // buffer: each view reads back exactly its own words, and a kernel reads through one.
    let ctx = ctx();
    let a: Vec<u32> = (0..65).map(|i| 1000 + i).collect();
    let b: Vec<u32> = vec![7];
    let c: Vec<u32> = Vec::new();
    let d: Vec<f32> = (0..8).map(|i| i as f32 * -0.5).collect();
    let d_bits: Vec<u32> = d.iter().map(|x| x.to_bits()).collect();
    let views = ctx
        .upload_packed([
            (&[65], DType::U32, &a),
            (&[1], DType::U32, &b),
            (&[0], DType::U32, &c),
            (&[8], DType::F32, &d_bits),
        ])
        .unwrap();
    let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
    for v in &views {
        assert!(v.offset().is_multiple_of(align), "{v:?}");
    }
    assert_eq!(views[0].to_u32_vec(ctx).unwrap(), a);
    assert_eq!(views[1].to_u32_vec(ctx).unwrap(), b);
    assert_eq!(views[2].numel(), 0);
    let out = ctx.empty(&[8], DType::F32).unwrap();
    out.poison(ctx);
    let mut s = Step::new(ctx);
    copy::copy(&mut s, &views[3], &out).unwrap();
    s.submit_and_wait().unwrap();
    assert_eq!(out.to_f32_vec(ctx).unwrap(), d);
    let bad = ctx.upload_packed([(&[2], DType::U32, &b)]);
    assert!(bad.is_err(), "one value for two elements");
}

#[test]
fn flushed_parts_of_a_step_run_in_order() {
    // A chain of copies cut into several submissions (Step::flush), with the scratch
    // tensors of the early parts dropped by their owner right away: each part sees the
    // previous one's result, and no buffer is recycled while a part still uses it.
    let ctx = ctx();
    let mut r = rng(6);
    let n = 4096 + 4;
    let v = randn(&mut r, n, 1.0);
    let first = ctx.upload_f32(&[n], DType::F32, &v).unwrap();
    let mut s = Step::new(ctx);
    let mut cur = first;
    for i in 0..6 {
        let next = ctx.empty(&[n], DType::F32).unwrap();
        next.poison(ctx);
        copy::copy(&mut s, &cur, &next).unwrap();
        if i % 2 == 1 {
            s.flush().unwrap();
        }
        cur = next;
    }
    s.submit_and_wait().unwrap();
    assert_eq!(cur.to_f32_vec(ctx).unwrap(), v);
}

#[test]
fn gemv_large_vocab_split_across_chunks() {
    // 151936 x 576 f16 is 175 MB: more than one lavapipe binding, so this runs as 2 chunks.
    check_matmul(1, 151_936, 576, DType::F16, MatmulPath::Auto, u64::MAX, 20);
    // Forced small chunks: 7 dispatches writing disjoint column ranges of y.
    check_matmul(2, 1000, 64, DType::BF16, MatmulPath::Gemv, 150 * 64 * 2, 21);
}

#[test]
fn tiled_gemm_awkward_shapes() {
    for (i, (m, n, k, dt)) in [
        (17usize, 1536usize, 576usize, DType::F16),
        (300, 130, 1000, DType::BF16),
        (65, 67, 33, DType::F32),
        (3, 100, 1002, DType::F16),
    ]
    .into_iter()
    .enumerate()
    {
        check_matmul(m, n, k, dt, MatmulPath::Tiled, u64::MAX, 30 + i as u64);
    }
    check_matmul(70, 300, 96, DType::F16, MatmulPath::Tiled, 128 * 96 * 2, 40);
}

#[test]
fn auto_path_falls_back_for_odd_k() {
    // K % 8 != 0 cannot use 128-bit loads: Auto must still give the right answer.
    check_matmul(1, 50, 1002, DType::F16, MatmulPath::Auto, u64::MAX, 41);
}

#[test]
fn coop_gemm_matches_reference_where_offered() {
    let ctx = ctx();
    if ctx.coop.is_none() || !ctx.subgroup_is(32) {
        eprintln!(
            "cooperative matrices not offered here ({}): coop GEMM not run",
            ctx.info.name
        );
        return;
    }
    for (i, (m, n, k, dt)) in [
        (17usize, 1536usize, 576usize, DType::F16),
        (300, 130, 1000, DType::BF16),
        (2048, 512, 2048, DType::F16),
        (9, 4099, 64, DType::F16),
    ]
    .into_iter()
    .enumerate()
    {
        check_matmul(m, n, k, dt, MatmulPath::Coop, u64::MAX, 50 + i as u64);
    }
    check_matmul(
        200,
        700,
        96,
        DType::BF16,
        MatmulPath::Coop,
        256 * 96 * 2,
        60,
    );
    // Every split the sweep compares: the tile edges (M, N, K) fall mid-fragment.
    let s = ctx.coop.unwrap().m;
    let limit = ctx.limits.max_compute_workgroup_storage_size;
    for (i, c) in CoopConfig::sweep(s, limit).into_iter().enumerate() {
        let i = 2 * i as u64;
        let t = Tuning {
            coop: Some(c),
            ..Default::default()
        };
        check_matmul_cfg(
            130,
            300,
            200,
            DType::F16,
            MatmulPath::Coop,
            u64::MAX,
            61 + i,
            t,
        );
        check_matmul_cfg(
            17,
            1536,
            576,
            DType::BF16,
            MatmulPath::Coop,
            u64::MAX,
            63 + i,
            t,
        );
    }
}

#[test]
fn skinny_gemm_is_skipped_where_its_splits_do_not_fit() {
    // The automatic path asks `skinny_fits`: with WebGPU's minimum of 16 KiB a decode
    // batch still fits, with 1 KiB no split does (and `Auto` falls back).
    for s in [8u32, 16] {
        assert!(matmul::skinny_fits(s, 16, 2048, 16 * 1024), "s={s}");
        for m in 1..=4 * s as usize {
            for n in [128, 2048, 151_936] {
                assert!(!matmul::skinny_fits(s, m, n, 1024), "s={s} m={m} n={n}");
            }
        }
    }
}

#[test]
fn skinny_default_splits_fit_the_workgroup_memory() {
    // Every default split is buildable for one to four fragments of rows, on NVIDIA's
    // 48 KiB and Apple's 32 KiB of workgroup memory, for fragments of 16 and of 8.
    for s in [8u32, 16] {
        for limit in [32 * 1024, 48 * 1024] {
            for m in 1..=4 * s as usize {
                for n in [8, 128, 768, 2048, 5120, 151_936] {
                    for norm in [false, true] {
                        let c = SkinnyConfig::for_shape(s, m, n, norm, limit);
                        assert!(
                            c.valid(s, m, limit),
                            "for_shape({s}, {m}, {n}, {norm}, {limit}) = {c:?}: {} bytes",
                            c.shared_bytes(s, m)
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn skinny_gemm_matches_reference_where_offered() {
    let ctx = ctx();
    if ctx.coop.is_none() || !ctx.subgroup_is(32) {
        eprintln!(
            "cooperative matrices not offered here ({}): skinny GEMM not run",
            ctx.info.name
        );
        return;
    }
    let s = ctx.coop.unwrap().m as usize;
    // One to four fragments of rows, edges mid-fragment in M, N and K, split weights.
    for (i, (m, n, k, dt, chunk)) in [
        (1usize, 1536usize, 576usize, DType::F16, u64::MAX),
        (3, 130, 1000, DType::BF16, u64::MAX),
        (9, 4099, 64, DType::F16, u64::MAX),
        (16, 333, 2048, DType::BF16, u64::MAX),
        (s + 1, 200, 1024, DType::F16, 96 * 1024 * 2),
        (2 * s, 77, 768, DType::F16, u64::MAX),
        (4 * s, 45, 136, DType::BF16, u64::MAX),
    ]
    .into_iter()
    .enumerate()
    {
        if SkinnyConfig::frags_m(s as u32, m) <= 4 {
            check_matmul(m, n, k, dt, MatmulPath::Skinny, chunk, 80 + i as u64);
        }
    }
    // Every split the sweep compares.
    let limit = ctx.limits.max_compute_workgroup_storage_size;
    for m in [5, s + 3, 2 * s] {
        for (i, c) in SkinnyConfig::sweep(s as u32, m, 300, limit)
            .into_iter()
            .enumerate()
        {
            let t = Tuning {
                skinny: Some(c),
                ..Default::default()
            };
            let seed = 90 + 3 * i as u64 + m as u64;
            check_matmul_cfg(
                m,
                300,
                1000,
                DType::BF16,
                MatmulPath::Skinny,
                u64::MAX,
                seed,
                t,
            );
        }
    }
    // More rows than four fragments: blocks of four fragments, the last one partial.
    for (i, m) in [4 * s + 1, 9 * s + 5].into_iter().enumerate() {
        check_matmul(
            m,
            130,
            1000,
            DType::F16,
            MatmulPath::Skinny,
            u64::MAX,
            120 + i as u64,
        );
    }
}

#[test]
fn rope_with_and_without_qk_norm() {
    let ctx = ctx();
    let mut r = rng(3);
    let scaling = Some(rope::Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    });
    for (m, hq, hkv, d, norm, theta, sc) in [
        (3usize, 4usize, 2usize, 64usize, false, 1e4, None),
        (5, 8, 1, 128, true, 1e6, None),
        (2, 2, 2, 256, true, 1e6, None),
        (4, 6, 2, 96, false, 5e5, scaling),
    ] {
        let s = rope::RopeShape {
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
        };
        let row = (hq + 2 * hkv) * d;
        let qkv = randn(&mut r, m * row, 3.0);
        let pos: Vec<u32> = (0..m as u32).map(|i| i * 37 + 5).collect();
        let inv = rope::inv_freq(d, theta, sc);
        let qn = randn(&mut r, d, 1.0);
        let kn = randn(&mut r, d, 1.0);
        let qkv_t = ctx.upload_f32(&[m, row], DType::F32, &qkv).unwrap();
        let pos_t = ctx.upload_u32(&[m], &pos).unwrap();
        let inv_t = ctx.upload_f32(&[d / 2], DType::F32, &inv).unwrap();
        let qn_t = ctx.upload_f32(&[d], DType::F32, &qn).unwrap();
        let kn_t = ctx.upload_f32(&[d], DType::F32, &kn).unwrap();
        let mut st = Step::new(ctx);
        let normw = if norm { Some((&qn_t, &kn_t)) } else { None };
        rope::rope(&mut st, &qkv_t, &pos_t, &inv_t, normw, 1e-6, s).unwrap();
        st.submit_and_wait().unwrap();
        let mut want = qkv.clone();
        let normc = if norm { Some((&qn[..], &kn[..])) } else { None };
        rope::cpu::rope(&mut want, &pos, &inv, normc, 1e-6, s);
        assert_close(
            &format!("rope d={d} norm={norm}"),
            &qkv_t.to_f32_vec(ctx).unwrap(),
            &want,
            2e-5,
        );
    }
}

#[test]
fn llama3_inv_freq_matches_transformers_rule() {
    // transformers keeps high frequencies, divides low ones by `factor`, and blends between.
    let s = rope::Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let plain = rope::inv_freq(128, 5e5, None);
    let scaled = rope::inv_freq(128, 5e5, Some(s));
    assert_eq!(plain[0], scaled[0]);
    assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-12);
    let mid = scaled
        .iter()
        .zip(&plain)
        .filter(|(a, b)| *a < *b && **a > **b / 8.0)
        .count();
    assert!(mid > 0, "some frequencies are blended");
}

#[test]
fn silu_mul_softmax_argmax() {
    let ctx = ctx();
    let mut r = rng(4);
    for (m, i) in [(1usize, 1536usize), (17, 768), (3, 1000)] {
        let gu = randn(&mut r, m * 2 * i, 4.0);
        let gt = ctx.upload_f32(&[m, 2 * i], DType::F32, &gu).unwrap();
        let out = ctx.empty(&[m, i], DType::F32).unwrap();
        out.poison(ctx);
        let mut s = Step::new(ctx);
        activation::silu_mul(&mut s, &gt, &out).unwrap();
        s.submit_and_wait().unwrap();
        assert_close(
            "silu_mul",
            &out.to_f32_vec(ctx).unwrap(),
            &activation::cpu::silu_mul(&gu, i),
            1e-6,
        );
    }
    for (m, n) in [(1usize, 151_936usize), (3, 1000), (17, 37)] {
        let mut x = randn(&mut r, m * n, 10.0);
        // A tie for the maximum in row 0: the lower index must win.
        let hi = 50.0;
        x[n / 3] = hi;
        x[n / 2] = hi;
        let xt = ctx.upload_f32(&[m, n], DType::F32, &x).unwrap();
        let ids = ctx.empty(&[m], DType::U32).unwrap();
        ids.poison(ctx);
        let mut s = Step::new(ctx);
        argmax::argmax(&mut s, &xt, &ids).unwrap();
        softmax::softmax(&mut s, &xt).unwrap();
        s.submit_and_wait().unwrap();
        let got_ids = ids.to_u32_vec(ctx).unwrap();
        assert_eq!(got_ids, argmax::cpu::argmax(&x, n), "argmax m={m} n={n}");
        assert_eq!(got_ids[0], (n / 3) as u32);
        assert_close(
            "softmax",
            &xt.to_f32_vec(ctx).unwrap(),
            &softmax::cpu::softmax(&x, n),
            1e-5,
        );
    }
}

#[test]
fn shape_and_dtype_errors_are_reported_not_panicked() {
    let ctx = ctx();
    let x = ctx.upload_f32(&[2, 8], DType::F32, &[1.0; 16]).unwrap();
    let w = Weight::upload_f32(ctx, "w", 4, 16, DType::F16, &[0.5; 64]).unwrap();
    let y = ctx.empty(&[2, 4], DType::F32).unwrap();
    let mut s = Step::new(ctx);
    let e = matmul::matmul(&mut s, &x, &w, &y).unwrap_err();
    assert!(e.to_string().contains("shape mismatch"), "{e}");
    let ids = ctx.upload_u32(&[2], &[0, 1]).unwrap();
    let e = softmax::softmax(&mut s, &ids).unwrap_err();
    assert!(e.to_string().contains("dtype"), "{e}");
    assert!(Weight::upload(ctx, "bad", 4, 16, DType::F16, &[0u8; 10]).is_err());
}

#[test]
fn pool_never_recycles_a_buffer_the_gpu_still_uses() {
    let ctx = ctx();
    // An odd size class no other test uses, so the pool's behaviour here is deterministic.
    let n = 77_780;
    let src = ctx.upload_f32(&[n], DType::F32, &vec![1.5; n]).unwrap();
    let scratch = ctx.empty(&[n], DType::F32).unwrap();
    let raw = scratch.buffer().clone();
    let mut s = Step::new(ctx);
    copy::copy(&mut s, &src, &scratch).unwrap();
    drop(scratch);
    // Dropped by its owner but bound in a recorded step: not back in the pool.
    let other = ctx.empty(&[n], DType::F32).unwrap();
    assert!(
        other.buffer() != &raw,
        "pool handed out a buffer still recorded in a step"
    );
    s.submit().unwrap();
    let again = ctx.empty(&[n], DType::F32).unwrap();
    assert!(
        again.buffer() != &raw,
        "pool handed out a buffer the GPU may still be writing"
    );
    drop((other, again));
    ctx.wait_idle().unwrap();
    // Once the GPU is done, the buffer is reusable.
    let reused = ctx.empty(&[n], DType::F32).unwrap();
    let reused2 = ctx.empty(&[n], DType::F32).unwrap();
    let reused3 = ctx.empty(&[n], DType::F32).unwrap();
    assert!([&reused, &reused2, &reused3]
        .iter()
        .any(|t| t.buffer() == &raw));
}

#[test]
fn random_fill_is_bounded_centred_and_seeded() {
    let ctx = ctx();
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let a = Weight::random(ctx, "r", 70, 96, dt, 0.5, 11).unwrap();
        let b = Weight::random(ctx, "r", 70, 96, dt, 0.5, 11).unwrap();
        let c = Weight::random(ctx, "r", 70, 96, dt, 0.5, 12).unwrap();
        ctx.wait_idle().unwrap();
        let va = a.chunks[0].tensor.to_f32_vec(ctx).unwrap();
        assert_eq!(
            va,
            b.chunks[0].tensor.to_f32_vec(ctx).unwrap(),
            "{dt}: same seed"
        );
        assert_ne!(
            va,
            c.chunks[0].tensor.to_f32_vec(ctx).unwrap(),
            "{dt}: other seed"
        );
        assert!(va.iter().all(|x| x.abs() <= 0.5 + 1e-3), "{dt}: bounded");
        let mean = va.iter().sum::<f32>() / va.len() as f32;
        let var = va.iter().map(|x| x * x).sum::<f32>() / va.len() as f32;
        assert!(
            mean.abs() < 0.02 && (var - 0.25 / 3.0).abs() < 0.01,
            "{dt}: mean {mean} var {var}"
        );
    }
}

#[test]
fn bias_add_broadcasts_over_rows() {
    let ctx = ctx();
    let mut r = rng(6);
    let (m, n) = (17, 1000);
    let y = randn(&mut r, m * n, 1.0);
    let b = randn(&mut r, n, 1.0);
    let yt = ctx.upload_f32(&[m, n], DType::F32, &y).unwrap();
    let bt = ctx.upload_f32(&[n], DType::F32, &b).unwrap();
    let mut s = Step::new(ctx);
    vllm_apple_ops::kernels::bias::add_bias(&mut s, &yt, &bt).unwrap();
    s.submit_and_wait().unwrap();
    let mut want = y.clone();
    vllm_apple_ops::kernels::bias::cpu::add_bias(&mut want, &b);
    assert_eq!(yt.to_f32_vec(ctx).unwrap(), want);
}

#[test]
fn views_share_the_buffer_and_check_alignment() {
    let ctx = ctx();
    let align = ctx.limits.min_storage_buffer_offset_alignment as usize;
    // Rows of exactly one alignment unit, so row 1 starts on an aligned offset.
    let k = align / 4;
    let v: Vec<f32> = (0..3 * k).map(|i| i as f32 + 0.5).collect();
    let t = ctx.upload_f32(&[3, k], DType::F32, &v).unwrap();
    let rows = t.narrow(ctx, 1, 2).unwrap();
    assert_eq!(rows.shape(), &[2, k]);
    assert_eq!(rows.to_f32_vec(ctx).unwrap(), v[k..].to_vec());
    // A kernel writing through the view lands in the parent's rows.
    let out = rows.reshape(&[2 * k]).unwrap();
    let src = ctx
        .upload_f32(&[2 * k], DType::F32, &vec![-1.0; 2 * k])
        .unwrap();
    let mut s = Step::new(ctx);
    copy::copy(&mut s, &src, &out).unwrap();
    s.submit_and_wait().unwrap();
    let all = t.to_f32_vec(ctx).unwrap();
    assert_eq!(&all[..k], &v[..k]);
    assert!(all[k..].iter().all(|x| *x == -1.0));
    assert!(t.reshape(&[7]).is_err());
    assert!(t.narrow(ctx, 2, 2).is_err(), "past the end");
    let odd = ctx.upload_f32(&[3, 5], DType::F32, &[1.0; 15]).unwrap();
    let e = odd.narrow(ctx, 1, 1).unwrap_err().to_string();
    assert!(e.contains("alignment"), "{e}");
}

/// The output projection over split-K attention partials (the reduce folded into the
/// GEMV) against the reduce then the product on the CPU: splits past a token's context
/// (l = 0, m = -inf) and a token without any context, f16 and f32 weights, residual add.
#[test]
fn gemv_over_attention_partials_matches_reduce_then_gemv() {
    use vllm_apple_ops::kernels::attention::{AttnShape, Partials};
    let ctx = ctx();
    let mut r = rng(71);
    // (tokens, q heads, kv heads, head dim, splits, dtype, accumulate)
    for (t, hq, hkv, d, splits, dt, acc) in [
        (1usize, 8usize, 2usize, 32usize, 3usize, DType::F16, true),
        (2, 4, 1, 16, 3, DType::F32, false),
        (1, 6, 3, 8, 1, DType::BF16, true),
    ] {
        let g = hq / hkv;
        let n = 40;
        let k = hq * d;
        let rows = t * hkv * splits;
        let mut part = randn(&mut r, rows * g * d, 1.0);
        let mut ml: Vec<f32> = (0..rows * g)
            .flat_map(|i| [((i * 37) % 11) as f32 * 0.7 - 3.0, 1.0 + (i % 5) as f32])
            .collect();
        // Split 1 of every (token, kv head) past the context; the last token has none
        // at all when there are two.
        for tk in 0..t {
            for h in 0..hkv {
                for s in 0..splits {
                    let empty = (s == 1 && splits > 1) || (t == 2 && tk == 1);
                    if empty {
                        let row = (tk * hkv + h) * splits + s;
                        for j in 0..g {
                            ml[2 * (row * g + j)] = -3.4e38;
                            ml[2 * (row * g + j) + 1] = 0.0;
                        }
                        part[row * g * d..(row + 1) * g * d].fill(0.0);
                    }
                }
            }
        }
        // The reduce on the CPU: x[tk, q, :] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
        let mut x = vec![0f32; t * k];
        for tk in 0..t {
            for q in 0..hq {
                let (h, j) = (q / g, q % g);
                let at = |s: usize| ((tk * hkv + h) * splits + s) * g + j;
                let mx = (0..splits).map(|s| ml[2 * at(s)]).fold(f32::MIN, f32::max);
                let l: f64 = (0..splits)
                    .map(|s| ml[2 * at(s) + 1] as f64 * ((ml[2 * at(s)] - mx) as f64).exp())
                    .sum();
                for e in 0..d {
                    let v: f64 = (0..splits)
                        .map(|s| ((ml[2 * at(s)] - mx) as f64).exp() * part[at(s) * d + e] as f64)
                        .sum();
                    x[tk * k + q * d + e] = if l > 0.0 { (v / l) as f32 } else { 0.0 };
                }
            }
        }
        let wv = dt.round_trip(&randn(&mut r, n * k, 0.3));
        let w = Weight::upload_f32(ctx, "o", n, k, dt, &wv).unwrap();
        let y0 = randn(&mut r, t * n, 1.0);
        let mut want = matmul::cpu::matmul(&x, &wv, n, k);
        if acc {
            for (a, b) in want.iter_mut().zip(&y0) {
                *a += b;
            }
        }
        let p = Partials {
            part: ctx.upload_f32(&[rows, g * d], DType::F32, &part).unwrap(),
            ml: ctx.upload_f32(&[rows, g, 2], DType::F32, &ml).unwrap(),
            splits,
            tokens: t,
            shape: AttnShape {
                q_heads: hq,
                kv_heads: hkv,
                head_dim: d,
            },
        };
        assert!(matmul::partials_fusable(&p, &w));
        // Without and with tail rows (5 rows of a second matrix over the same reduced x,
        // accumulated into their own output).
        let rv = dt.round_trip(&randn(&mut r, 5 * k, 0.3));
        let rt = Weight::upload_f32(ctx, "tail", 5, k, dt, &rv).unwrap();
        let yt0 = randn(&mut r, t * 5, 1.0);
        let mut want_t = matmul::cpu::matmul(&x, &rv, 5, k);
        for (a, b) in want_t.iter_mut().zip(&yt0) {
            *a += b;
        }
        for with_tail in [false, true] {
            let y = ctx.upload_f32(&[t, n], DType::F32, &y0).unwrap();
            let yt = ctx.upload_f32(&[t, 5], DType::F32, &yt0).unwrap();
            let tail = with_tail.then_some(matmul::Tail {
                w: &rt,
                y: &yt,
                norm: None,
                accumulate: true,
            });
            let mut s = Step::new(ctx);
            matmul::gemv_partials(&mut s, &p, &w, &y, acc, tail).unwrap();
            s.submit_and_wait().unwrap();
            let what = format!("gemv over partials t={t} splits={splits} {dt} tail {with_tail}");
            assert_close(&what, &y.to_f32_vec(ctx).unwrap(), &want, F32_ACCUM_TOL);
            if with_tail {
                let got = yt.to_f32_vec(ctx).unwrap();
                assert_close(&format!("{what}: tail rows"), &got, &want_t, F32_ACCUM_TOL);
            }
        }
        let y = ctx.upload_f32(&[t, n], DType::F32, &y0).unwrap();
        // More splits than the GEMV takes: an error, and the caller reduces instead.
        let many = Partials { splits: 4, ..p };
        assert!(!matmul::partials_fusable(&many, &w));
        let mut s = Step::new(ctx);
        assert!(matmul::gemv_partials(&mut s, &many, &w, &y, acc, None).is_err());
    }
}

/// Tail rows (a second matrix over the same x in the same dispatch, into its own output):
/// with a folded norm the tail scales x by its own weight and not by 1/rms (the router
/// half of a one-token MoE step); without, a plain product; stored or accumulated; the main
/// matrix in one chunk or several (the tail rides on the last chunk's dispatch).
#[test]
fn gemv_tail_rows_beside_the_main_product() {
    let ctx = ctx();
    // (m, n, k, tail rows, dtype, main chunk bytes)
    for (i, (m, n, k, nt, dt, chunk)) in [
        (1usize, 300usize, 256usize, 16usize, DType::F16, u64::MAX),
        (1, 200, 136, 12, DType::BF16, 64 * 136 * 2),
        (3, 130, 64, 5, DType::F32, u64::MAX),
        (2, 96, 1000, 128, DType::F16, 64 * 1000 * 2),
        (5, 200, 256, 16, DType::F16, u64::MAX),
    ]
    .into_iter()
    .enumerate()
    {
        for norm in [true, false] {
            let mut r = rng(900 + i as u64);
            let x = randn(&mut r, m * k, 3.0);
            let (g, g2) = (randn(&mut r, k, 1.0), randn(&mut r, k, 1.0));
            let w = dt.round_trip(&randn(&mut r, n * k, 0.5));
            let rw = dt.round_trip(&randn(&mut r, nt * k, 0.5));
            let (y0, yt0) = (randn(&mut r, m * n, 1.0), randn(&mut r, m * nt, 1.0));
            let eps = 1e-6;
            let wt = Weight::upload_chunked(ctx, "w", n, k, dt, &dt.encode_f32(&w), chunk).unwrap();
            let rt = Weight::upload_f32(ctx, "tail", nt, k, dt, &rw).unwrap();
            let xt = ctx.upload_f32(&[m, k], DType::F32, &x).unwrap();
            let gt = ctx.upload_f32(&[k], DType::F32, &g).unwrap();
            let g2t = ctx.upload_f32(&[k], DType::F32, &g2).unwrap();
            let y = ctx.upload_f32(&[m, n], DType::F32, &y0).unwrap();
            let yt = ctx.upload_f32(&[m, nt], DType::F32, &yt0).unwrap();
            // Normed: both stored (the qkv GEMV's case); plain: both accumulated (o_proj's).
            if norm {
                y.poison(ctx);
                yt.poison(ctx);
            }
            let f = matmul::Fusion {
                norm: norm.then_some((&gt, eps)),
                accumulate: !norm,
                tail: Some(matmul::Tail {
                    w: &rt,
                    y: &yt,
                    norm: norm.then_some(&g2t),
                    accumulate: !norm,
                }),
            };
            let mut s = Step::new(ctx);
            matmul::matmul_fused(&mut s, &xt, &wt, &y, f).unwrap();
            s.submit_and_wait().unwrap();
            let (xm, xt2) = match norm {
                true => (
                    rmsnorm::cpu::rmsnorm(&x, &g, eps),
                    x.chunks(k)
                        .flat_map(|row| row.iter().zip(&g2).map(|(a, b)| a * b))
                        .collect(),
                ),
                false => (x.clone(), x.clone()),
            };
            let mut want = matmul::cpu::matmul(&xm, &w, n, k);
            let mut want_t = matmul::cpu::matmul(&xt2, &rw, nt, k);
            if !norm {
                want.iter_mut().zip(&y0).for_each(|(a, b)| *a += b);
                want_t.iter_mut().zip(&yt0).for_each(|(a, b)| *a += b);
            }
            let what = format!("tail rows m={m} n={n} k={k} tail {nt} {dt} norm={norm}");
            let tol = F32_ACCUM_TOL * (k as f64).sqrt();
            assert_close(&what, &y.to_f32_vec(ctx).unwrap(), &want, tol);
            let got = yt.to_f32_vec(ctx).unwrap();
            assert_close(&format!("{what}: tail"), &got, &want_t, tol);
        }
    }
    // A tail that does not match its GEMV: an error, not a wrong product.
    let wt = Weight::upload_f32(ctx, "w", 8, 64, DType::F16, &[0.5; 512]).unwrap();
    let other_k = Weight::upload_f32(ctx, "tail", 4, 72, DType::F16, &[0.5; 288]).unwrap();
    let xt = ctx.upload_f32(&[1, 64], DType::F32, &[1.0; 64]).unwrap();
    let gt = ctx.upload_f32(&[64], DType::F32, &[1.0; 64]).unwrap();
    let (y, yt) = (
        ctx.empty(&[1, 8], DType::F32).unwrap(),
        ctx.empty(&[1, 4], DType::F32).unwrap(),
    );
    let tail = |w, norm| {
        Some(matmul::Tail {
            w,
            y: &yt,
            norm,
            accumulate: false,
        })
    };
    let same = Weight::upload_f32(ctx, "tail", 4, 64, DType::F16, &[0.5; 256]).unwrap();
    for (what, norm, t) in [
        ("another K", None, tail(&other_k, None)),
        (
            "a tail norm without the GEMV's",
            None,
            tail(&same, Some(&gt)),
        ),
        (
            "no tail norm beside the GEMV's",
            Some((&gt, 1e-6)),
            tail(&same, None),
        ),
    ] {
        let f = matmul::Fusion {
            norm,
            accumulate: false,
            tail: t,
        };
        let mut s = Step::new(ctx);
        assert!(
            matmul::matmul_fused(&mut s, &xt, &wt, &y, f).is_err(),
            "{what}"
        );
    }
}

/// Which free buffer the pool hands out depends only on which are free, not on the order
/// they came back in (GPU completion callbacks): the earliest created first. So a step
/// that allocates like one before it gets the same buffers, and its bind groups are found
/// in the context's cache instead of being made again.
#[test]
fn pool_hands_out_the_earliest_created_free_buffer() {
    let ctx = ctx();
    // A size class no other test uses.
    let n = 123_457;
    let (a, b, c) = (
        ctx.empty(&[n], DType::F32).unwrap(),
        ctx.empty(&[n], DType::F32).unwrap(),
        ctx.empty(&[n], DType::F32).unwrap(),
    );
    let raws = [a.buffer().clone(), b.buffer().clone(), c.buffer().clone()];
    drop(c);
    drop(a);
    drop(b);
    let mut held = Vec::new();
    for raw in &raws {
        let t = ctx.empty(&[n], DType::F32).unwrap();
        assert!(t.buffer() == raw, "not the earliest-created free buffer");
        held.push(t);
    }
}
