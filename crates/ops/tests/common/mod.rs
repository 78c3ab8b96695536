#![allow(dead_code)]
//! Shared test helpers: one GPU context per test binary, seeded random inputs, error norms.

use std::sync::{Arc, OnceLock};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vllm_apple_ops::{ContextOptions, GpuContext};

pub fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| match GpuContext::new(&ContextOptions::default()) {
        Ok(c) => {
            eprintln!(
                "test GPU: {} ({:?}), subgroups {}..{}, coop {:?}",
                c.info.name,
                c.info.backend,
                c.info.subgroup_min_size,
                c.info.subgroup_max_size,
                c.coop
            );
            c
        }
        Err(e) => panic!("tests need a GPU adapter (lavapipe on CI): {e}"),
    })
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform values in [-scale, scale] that are never exactly zero.
pub fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = rng.random_range(-1.0..1.0);
            let v = if v.abs() < 1e-3 { 0.5 } else { v };
            v * scale
        })
        .collect()
}

/// max |got - want| / max |want|: the error relative to the output's scale.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want
        .iter()
        .fold(0f64, |a, b| a.max(b.abs() as f64))
        .max(1e-30);
    worst_element(got, want).1 / scale
}

/// (index, absolute error) of the worst element.
fn worst_element(got: &[f32], want: &[f32]) -> (usize, f64) {
    let mut worst = (0, 0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (*g as f64 - *w as f64).abs();
        assert!(
            g.is_finite(),
            "element {i} is {g} (want {w}): unwritten or overflowed"
        );
        if e > worst.1 {
            worst = (i, e);
        }
    }
    worst
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    let (i, _) = worst_element(got, want);
    assert!(
        e <= tol,
        "{what}: relative error {e:.3e} > {tol:.1e} (worst at {i}: got {}, want {})",
        got[i],
        want[i]
    );
}
