//! Rotary position embedding (rotate-half, as Hugging Face's Llama and Qwen) applied in
//! place to the q and k heads of the fused QKV projection, fused with Qwen3's per-head
//! q/k RMSNorm so the whole thing is one dispatch.

use super::{expect_dtype, expect_len, wgsl};
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;

const SRC: &str = wgsl!("rope.wgsl");

fn kernel(head_dim: usize, qk_norm: bool) -> Kernel {
    Kernel::new("rope.wgsl", SRC, "rope")
        .u32("HALF_D", head_dim as u32 / 2)
        .bool("QK_NORM", qk_norm)
}

pub(crate) fn variants() -> Vec<Kernel> {
    vec![kernel(64, false), kernel(128, true), kernel(256, true)]
}

/// Llama-3 style frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// `inv_freq[i] = theta^(-2i/d)`, with Llama-3 scaling if given (as transformers computes it).
pub fn inv_freq(head_dim: usize, theta: f64, scaling: Option<Llama3Scaling>) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let f = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let f = match scaling {
                None => f,
                Some(s) => {
                    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / s.factor
                    } else {
                        let smooth = (s.original_max_position_embeddings / wavelen
                            - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * f / s.factor + smooth * f
                    }
                }
            };
            f as f32
        })
        .collect()
}

/// Shapes of one rope call.
#[derive(Clone, Copy, Debug)]
pub struct RopeShape {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Normalises (if `qk_norm` weights are given) and rotates the q and k heads of
/// `qkv: [m, (hq + 2 hkv) * d]` in place; v is untouched.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    step: &mut Step,
    qkv: &Tensor,
    positions: &Tensor,
    inv_freq: &Tensor,
    qk_norm: Option<(&Tensor, &Tensor)>,
    eps: f32,
    s: RopeShape,
) -> Result<()> {
    let d = s.head_dim;
    if !d.is_multiple_of(2) || !(8..=512).contains(&d) {
        return Err(shape_err(
            "rope",
            format!("head_dim {d} must be even and in 8..=512"),
        ));
    }
    expect_dtype("rope", qkv, DType::F32)?;
    expect_dtype("rope", positions, DType::U32)?;
    expect_dtype("rope", inv_freq, DType::F32)?;
    let m = positions.numel();
    expect_len("rope", "qkv", qkv, m * (s.q_heads + 2 * s.kv_heads) * d)?;
    expect_len("rope", "inv_freq", inv_freq, d / 2)?;
    let dummy = step.ctx.dummy()?;
    let (qn, kn) = match qk_norm {
        Some((q, k)) => {
            expect_len("rope", "q_norm", q, d)?;
            expect_len("rope", "k_norm", k, d)?;
            (q, k)
        }
        None => (dummy, dummy),
    };
    let params = [m as u32, s.q_heads as u32, s.kv_heads as u32, eps.to_bits()];
    let groups = grid(step.ctx, m * (s.q_heads + s.kv_heads));
    step.dispatch(
        &kernel(d, qk_norm.is_some()),
        &[qkv, positions, inv_freq, qn, kn],
        &params,
        groups,
    )
}

pub mod cpu {
    use super::RopeShape;

    /// Reference for `rope`, in f64.
    pub fn rope(
        qkv: &mut [f32],
        positions: &[u32],
        inv_freq: &[f32],
        qk_norm: Option<(&[f32], &[f32])>,
        eps: f32,
        s: RopeShape,
    ) {
        let d = s.head_dim;
        let row = (s.q_heads + 2 * s.kv_heads) * d;
        for (t, &pos) in positions.iter().enumerate() {
            for h in 0..s.q_heads + s.kv_heads {
                let x = &mut qkv[t * row + h * d..t * row + (h + 1) * d];
                let mut v: Vec<f64> = x.iter().map(|a| *a as f64).collect();
                if let Some((qn, kn)) = qk_norm {
                    let w = if h < s.q_heads { qn } else { kn };
                    let ms = v.iter().map(|a| a * a).sum::<f64>() / d as f64;
                    let scale = 1.0 / (ms + eps as f64).sqrt();
                    for (a, w) in v.iter_mut().zip(w) {
                        *a *= scale * *w as f64;
                    }
                }
                for i in 0..d / 2 {
                    let angle = pos as f64 * inv_freq[i] as f64;
                    let (sn, c) = angle.sin_cos();
                    let (x1, x2) = (v[i], v[i + d / 2]);
                    x[i] = (x1 * c - x2 * sn) as f32;
                    x[i + d / 2] = (x2 * c + x1 * sn) as f32;
                }
            }
        }
    }
}
