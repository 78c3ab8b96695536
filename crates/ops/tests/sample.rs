//! GPU sampling (temperature, min-p, top-k, top-p, greedy) against an f64 CPU reference:
//! the same token wherever neither the draw nor the top-p cut is within rounding of a
//! boundary between two tokens.

mod common;
use common::*;

use rand::Rng;
use vllm_apple_ops::kernels::sample::{self, RowSampling};
use vllm_apple_ops::{DType, Step};

fn run(n: usize, rows: &[(Vec<f32>, RowSampling)]) -> Vec<u32> {
    let ctx = ctx();
    let flat: Vec<f32> = rows.iter().flat_map(|(r, _)| r.iter().copied()).collect();
    let logits = ctx.upload_f32(&[rows.len(), n], DType::F32, &flat).unwrap();
    let params: Vec<RowSampling> = rows.iter().map(|(_, p)| *p).collect();
    let ids = ctx.empty(&[rows.len()], DType::U32).unwrap();
    ids.poison(ctx);
    let mut s = Step::new(ctx);
    sample::sample(&mut s, &logits, &params, &ids).unwrap();
    s.submit_and_wait().unwrap();
    ids.to_u32_vec(ctx).unwrap()
}

#[test]
fn draws_match_the_inverse_cdf() {
    let mut r = rng(91);
    let mut checked = 0;
    // Vocabulary sizes around the 4096-entry blocks, and a real one.
    for (n, scale) in [(4097usize, 3.0f32), (1000, 1.0), (49152, 4.0), (8192, 8.0)] {
        let mut rows = Vec::new();
        for k in 0..24 {
            let row = randn(&mut r, n, scale);
            let p = RowSampling {
                temperature: [0.0, 0.3, 1.0, 2.5][k % 4],
                min_p: [0.0, 0.0, 0.05, 0.3][(k / 4) % 4],
                top_k: [0, 1, 40, 0, 3000, 0][k % 6],
                top_p: [1.0, 1.0, 0.9, 0.5, 1.0, 0.97][(k / 2) % 6],
                u: if k == 11 {
                    0.999_999_9
                } else {
                    r.random::<f32>()
                },
            };
            rows.push((row, p));
        }
        let got = run(n, &rows);
        for (i, ((row, p), g)) in rows.iter().zip(&got).enumerate() {
            let (want, margin) = sample::cpu::sample(row, *p);
            if margin > 1e-5 {
                assert_eq!(*g, want, "n={n} row {i} {p:?}");
                checked += 1;
            } else {
                assert!((*g as usize) < n, "n={n} row {i}: id {g} out of range");
            }
        }
    }
    assert!(
        checked > 80,
        "only {checked} draws were far enough from a boundary"
    );
}

#[test]
fn degenerate_rows_fall_back_to_the_argmax() {
    let n = 5000;
    let mut one_finite = vec![f32::NEG_INFINITY; n];
    one_finite[4321] = -2.0;
    let mut with_nan = randn(&mut rng(5), n, 1.0);
    with_nan[10] = f32::NAN;
    with_nan[4999] = 50.0;
    let hot = RowSampling {
        temperature: 1.0,
        u: 0.7,
        ..RowSampling::GREEDY
    };
    let rows = vec![
        (one_finite, hot),
        // A spike 50 above the rest: every draw lands on it; NaN weighs nothing.
        (with_nan, hot),
        (randn(&mut rng(6), n, 1.0), RowSampling::GREEDY),
    ];
    let got = run(n, &rows);
    assert_eq!(got[0], 4321);
    assert_eq!(got[1], 4999);
    assert_eq!(
        got[2],
        sample::cpu::sample(&rows[2].0, RowSampling::GREEDY).0
    );
}

#[test]
fn truncation_keeps_exactly_the_top_tokens() {
    // Distinct logits 0, -1, -2, ...: top-k 3 may only give ids 0..3; top-p 0.5 at
    // T = 1 keeps id 0 alone (e^0 / sum = 0.63 reaches 0.5 by itself).
    let n = 300;
    let row: Vec<f32> = (0..n).map(|i| -(i as f32)).collect();
    let mut rows = Vec::new();
    for k in 0..64 {
        let u = (k as f32 + 0.5) / 64.0;
        rows.push((
            row.clone(),
            RowSampling {
                temperature: 1.0,
                top_k: 3,
                u,
                ..RowSampling::GREEDY
            },
        ));
        rows.push((
            row.clone(),
            RowSampling {
                temperature: 1.0,
                top_p: 0.5,
                u,
                ..RowSampling::GREEDY
            },
        ));
    }
    let got = run(n, &rows);
    for (i, g) in got.iter().enumerate() {
        if i % 2 == 0 {
            assert!(*g < 3, "top-k 3 drew id {g}");
        } else {
            assert_eq!(*g, 0, "top-p 0.5 drew id {g}");
        }
    }
    for id in 0..3u32 {
        assert!(
            got.iter().step_by(2).any(|&g| g == id),
            "top-k 3 never drew {id}"
        );
    }
    // A batch where no row asks for top-p runs the top-k half of the search only.
    let top_k_only: Vec<_> = rows.iter().step_by(2).cloned().collect();
    let alone = run(n, &top_k_only);
    assert_eq!(alone, got.iter().step_by(2).copied().collect::<Vec<_>>());
}

#[test]
fn frequencies_follow_the_distribution() {
    // Many rows of the same logits with evenly spread draws: each token's share of the
    // draws is its probability (to within one draw in 256).
    let logits: Vec<f32> = (0..7).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
    let n = logits.len();
    let t = 0.8f32;
    let draws = 256;
    let rows: Vec<_> = (0..draws)
        .map(|k| {
            (
                logits.clone(),
                RowSampling {
                    temperature: t,
                    u: (k as f32 + 0.5) / draws as f32,
                    ..RowSampling::GREEDY
                },
            )
        })
        .collect();
    let got = run(n, &rows);
    let mx = logits.iter().copied().fold(f32::MIN, f32::max);
    let w: Vec<f64> = logits
        .iter()
        .map(|&x| (((x - mx) / t) as f64).exp())
        .collect();
    let total: f64 = w.iter().sum();
    for (i, wi) in w.iter().enumerate() {
        let share = got.iter().filter(|&&g| g as usize == i).count() as f64 / draws as f64;
        assert!(
            (share - wi / total).abs() <= 1.5 / draws as f64,
            "token {i}: drawn {share:.4}, probability {:.4}",
            wi / total
        );
    }
}
