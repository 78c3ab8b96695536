//! Decoder-only dense transformers (Llama, Qwen3) as a plain forward over the ops layer:
//! embedding, then per layer RMSNorm -> fused QKV GEMM -> RoPE (+ Qwen3's q/k norm) ->
//! KV write + paged attention -> o_proj -> residual add + RMSNorm -> fused gate/up GEMM ->
//! SiLU-mul -> down, then the final norm and the lm_head on the rows that need logits.

use vllm_apple_ops::kernels::attention::{
    self, AttentionOptions, AttnInputs, AttnMetadata, AttnShape,
};
use vllm_apple_ops::kernels::rope::{self, RopeShape};
use vllm_apple_ops::kernels::{activation, embedding, matmul, rmsnorm};
use vllm_apple_ops::kv_cache::{KvCache, KvCacheSpec};
use vllm_apple_ops::weight::WeightChunk;
use vllm_apple_ops::{DType, GpuContext, OpsError, Step, Tensor, Weight};

use crate::config::{Arch, ConfigError, ModelConfig};
use crate::gguf::{GgufError, GgufFile};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error("tensor '{name}' has shape {got:?}, expected {want:?}")]
    Shape {
        name: String,
        got: Vec<u64>,
        want: Vec<u64>,
    },
}

struct Layer {
    attn_norm: Tensor,
    qkv: Weight,
    o: Weight,
    ffn_norm: Tensor,
    gate_up: Weight,
    down: Weight,
    qk_norm: Option<(Tensor, Tensor)>,
}

pub struct DenseModel {
    pub cfg: ModelConfig,
    pub dtype: DType,
    embed: Weight,
    layers: Vec<Layer>,
    final_norm: Tensor,
    lm_head: Option<Weight>,
    inv_freq: Tensor,
}

/// llama.cpp's converter interleaves the two rotary halves of every q/k head
/// (row `j * d/2 + i` of a head is stored at `2 i + j`); undo it to get Hugging Face rows.
fn unpermute_rows(w: &[f32], heads: usize, k: usize) -> Vec<f32> {
    let rows = w.len() / k;
    let d = rows / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * (d / 2) + i;
                out[dst * k..(dst + 1) * k].copy_from_slice(&w[src * k..(src + 1) * k]);
            }
        }
    }
    out
}

struct Loader<'a> {
    ctx: &'a GpuContext,
    file: &'a GgufFile,
    dtype: DType,
}

impl Loader<'_> {
    /// A tensor as f32 in Hugging Face layout, checked against the expected `[n, k]`.
    fn f32(&self, name: &str, n: usize, k: usize) -> Result<Vec<f32>, ModelError> {
        let (info, _) = self.file.tensor_data(name)?;
        let want = if n == 1 {
            vec![k as u64]
        } else {
            vec![k as u64, n as u64]
        };
        if info.dims != want {
            return Err(ModelError::Shape {
                name: name.into(),
                got: info.dims.clone(),
                want,
            });
        }
        Ok(self.file.tensor_f32(name)?)
    }

    fn norm(&self, name: &str, k: usize) -> Result<Tensor, ModelError> {
        Ok(self
            .ctx
            .upload_f32(&[k], DType::F32, &self.f32(name, 1, k)?)?)
    }

    fn weight(
        &self,
        label: &str,
        n: usize,
        k: usize,
        rows: Vec<f32>,
    ) -> Result<Weight, ModelError> {
        Ok(Weight::upload_f32(
            self.ctx, label, n, k, self.dtype, &rows,
        )?)
    }
}

impl DenseModel {
    /// Loads a GGUF model, dequantizing every tensor to `dtype` (f16, bf16 or f32).
    pub fn from_gguf(
        ctx: &GpuContext,
        file: &GgufFile,
        dtype: DType,
    ) -> Result<DenseModel, ModelError> {
        let cfg = ModelConfig::from_gguf(&file.gguf)?;
        let l = Loader { ctx, file, dtype };
        let (h, d, hq, hkv, f) = (cfg.hidden, cfg.head_dim, cfg.q_heads, cfg.kv_heads, cfg.ffn);
        let llama_perm = cfg.arch == Arch::Llama;
        let embed = l.weight(
            "token_embd",
            cfg.vocab,
            h,
            l.f32("token_embd.weight", cfg.vocab, h)?,
        )?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            let mut q = l.f32(&p("attn_q.weight"), hq * d, h)?;
            let mut k = l.f32(&p("attn_k.weight"), hkv * d, h)?;
            if llama_perm {
                q = unpermute_rows(&q, hq, h);
                k = unpermute_rows(&k, hkv, h);
            }
            let v = l.f32(&p("attn_v.weight"), hkv * d, h)?;
            let qkv: Vec<f32> = q.into_iter().chain(k).chain(v).collect();
            let gate = l.f32(&p("ffn_gate.weight"), f, h)?;
            let up = l.f32(&p("ffn_up.weight"), f, h)?;
            let qk_norm = if cfg.qk_norm {
                Some((
                    l.norm(&p("attn_q_norm.weight"), d)?,
                    l.norm(&p("attn_k_norm.weight"), d)?,
                ))
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: l.norm(&p("attn_norm.weight"), h)?,
                qkv: l.weight(&p("qkv"), (hq + 2 * hkv) * d, h, qkv)?,
                o: l.weight(
                    &p("attn_output"),
                    h,
                    hq * d,
                    l.f32(&p("attn_output.weight"), h, hq * d)?,
                )?,
                ffn_norm: l.norm(&p("ffn_norm.weight"), h)?,
                gate_up: l.weight(
                    &p("gate_up"),
                    2 * f,
                    h,
                    gate.into_iter().chain(up).collect(),
                )?,
                down: l.weight(&p("ffn_down"), h, f, l.f32(&p("ffn_down.weight"), h, f)?)?,
                qk_norm,
            });
        }
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(l.weight(
                "output",
                cfg.vocab,
                h,
                l.f32("output.weight", cfg.vocab, h)?,
            )?)
        };
        let inv = rope::inv_freq(d, cfg.rope_theta, cfg.rope_scaling);
        Ok(DenseModel {
            final_norm: l.norm("output_norm.weight", h)?,
            inv_freq: ctx.upload_f32(&[d / 2], DType::F32, &inv)?,
            embed,
            layers,
            lm_head,
            dtype,
            cfg,
        })
    }

    /// Random weights for `cfg` generated on the GPU (vLLM's `load_format = "dummy"`), scaled
    /// so activations stay in range; for benchmarks.
    pub fn dummy(
        ctx: &GpuContext,
        cfg: ModelConfig,
        dtype: DType,
        seed: u32,
    ) -> Result<DenseModel, ModelError> {
        let (h, d, hq, hkv, f) = (cfg.hidden, cfg.head_dim, cfg.q_heads, cfg.kv_heads, cfg.ffn);
        let mut next = seed;
        let mut w = |label: &str, n: usize, k: usize| {
            next = next.wrapping_add(0x9e37_79b9);
            Weight::random(ctx, label, n, k, dtype, 1.0 / (k as f32).sqrt(), next)
        };
        let ones = |k: usize| ctx.upload_f32(&[k], DType::F32, &vec![1.0; k]);
        let embed = w("token_embd", cfg.vocab, h)?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            layers.push(Layer {
                attn_norm: ones(h)?,
                qkv: w("qkv", (hq + 2 * hkv) * d, h)?,
                o: w("attn_output", h, hq * d)?,
                ffn_norm: ones(h)?,
                gate_up: w("gate_up", 2 * f, h)?,
                down: w("ffn_down", h, f)?,
                qk_norm: if cfg.qk_norm {
                    Some((ones(d)?, ones(d)?))
                } else {
                    None
                },
            });
        }
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(w("output", cfg.vocab, h)?)
        };
        let inv = rope::inv_freq(d, cfg.rope_theta, cfg.rope_scaling);
        ctx.wait_idle()?;
        Ok(DenseModel {
            final_norm: ones(h)?,
            inv_freq: ctx.upload_f32(&[d / 2], DType::F32, &inv)?,
            embed,
            layers,
            lm_head,
            dtype,
            cfg,
        })
    }

    pub fn kv_spec(&self, block_size: usize) -> KvCacheSpec {
        KvCacheSpec {
            num_layers: self.cfg.layers,
            kv_heads: self.cfg.kv_heads,
            head_dim: self.cfg.head_dim,
            block_size,
        }
    }

    /// Bytes of weights on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        let mut b = self.embed.nbytes() + self.lm_head.as_ref().map_or(0, |w| w.nbytes());
        for l in &self.layers {
            b += l.qkv.nbytes() + l.o.nbytes() + l.gate_up.nbytes() + l.down.nbytes();
        }
        b
    }

    /// Records the forward pass of a batch: `ids` `[tokens]` (u32), laid out as `meta`;
    /// returns the logits `[rows, vocab]` of the tokens listed in `logit_rows` (u32 indices
    /// into the batch, e.g. each sequence's last token).
    pub fn forward(
        &self,
        step: &mut Step,
        ids: &Tensor,
        meta: &AttnMetadata,
        kv: &KvCache,
        logit_rows: &Tensor,
        opts: &AttentionOptions,
    ) -> Result<Tensor, ModelError> {
        let ctx = step.ctx;
        let c = &self.cfg;
        let t = meta.num_tokens;
        let (h, d, hq, hkv) = (c.hidden, c.head_dim, c.q_heads, c.kv_heads);
        let residual = ctx.empty(&[t, h], DType::F32)?;
        embedding::embedding(step, ids, &self.embed, &residual)?;
        let normed = ctx.empty(&[t, h], DType::F32)?;
        let qkv = ctx.empty(&[t, (hq + 2 * hkv) * d], DType::F32)?;
        let attn = ctx.empty(&[t, hq * d], DType::F32)?;
        let proj = ctx.empty(&[t, h], DType::F32)?;
        let gate_up = ctx.empty(&[t, 2 * c.ffn], DType::F32)?;
        let act = ctx.empty(&[t, c.ffn], DType::F32)?;
        let shape = AttnShape {
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
        };
        let rope_shape = RopeShape {
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
        };
        let scale = 1.0 / (d as f32).sqrt();
        rmsnorm::rmsnorm(
            step,
            &residual,
            &self.layers[0].attn_norm,
            c.rms_eps,
            &normed,
        )?;
        for (i, layer) in self.layers.iter().enumerate() {
            matmul::matmul(step, &normed, &layer.qkv, &qkv)?;
            let qk = layer.qk_norm.as_ref().map(|(q, k)| (q, k));
            rope::rope(
                step,
                &qkv,
                &meta.positions,
                &self.inv_freq,
                qk,
                c.rms_eps,
                rope_shape,
            )?;
            let inputs = AttnInputs {
                qkv: &qkv,
                meta,
                cache: &kv.layers[i],
                shape,
                scale,
            };
            attention::attention(step, opts, &inputs, &attn)?;
            matmul::matmul(step, &attn, &layer.o, &proj)?;
            rmsnorm::add_rmsnorm(step, &proj, &residual, &layer.ffn_norm, c.rms_eps, &normed)?;
            matmul::matmul(step, &normed, &layer.gate_up, &gate_up)?;
            activation::silu_mul(step, &gate_up, &act)?;
            matmul::matmul(step, &act, &layer.down, &proj)?;
            let next_norm = self
                .layers
                .get(i + 1)
                .map_or(&self.final_norm, |l| &l.attn_norm);
            rmsnorm::add_rmsnorm(step, &proj, &residual, next_norm, c.rms_eps, &normed)?;
        }
        // The rows that need logits, gathered with the embedding kernel over the hidden states.
        let r = logit_rows.numel();
        let hidden = Weight {
            n: t,
            k: h,
            dtype: DType::F32,
            chunks: vec![WeightChunk {
                row_start: 0,
                rows: t,
                tensor: normed,
            }],
        };
        let picked = ctx.empty(&[r, h], DType::F32)?;
        embedding::embedding(step, logit_rows, &hidden, &picked)?;
        let logits = ctx.empty(&[r, c.vocab], DType::F32)?;
        matmul::matmul(
            step,
            &picked,
            self.lm_head.as_ref().unwrap_or(&self.embed),
            &logits,
        )?;
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::unpermute_rows;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(heads, 2, d/2, k).swapaxes(1, 2).
        let (heads, d, k) = (2, 6, 3);
        let hf: Vec<f32> = (0..heads * d * k).map(|x| x as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let src = h * d + j * (d / 2) + i;
                    let dst = h * d + 2 * i + j;
                    gguf[dst * k..(dst + 1) * k].copy_from_slice(&hf[src * k..(src + 1) * k]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, heads, k), hf);
    }
}
