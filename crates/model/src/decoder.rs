//! Decoder-only transformers (Llama, Qwen2, Qwen3, Qwen3-MoE) as a plain forward over the
//! ops layer: embedding, then per layer RMSNorm -> fused QKV GEMM -> RoPE (+ Qwen3's q/k
//! norm) -> KV write + paged attention -> o_proj -> residual add + RMSNorm -> the MLP, then
//! the final norm and the lm_head on the rows that need logits. The MLP is dense (fused
//! gate/up GEMM -> SiLU-mul -> down) or a mixture of experts (router -> GPU routing ->
//! grouped expert GEMMs -> weighted combine), chosen per layer from the config.

use vllm_apple_ops::kernels::attention::{
    self, AttentionOptions, AttnInputs, AttnMetadata, AttnShape, RopeArgs,
};
use vllm_apple_ops::kernels::moe::{self, ExpertWeights, MoeScratch, MoeShape};
use vllm_apple_ops::kernels::rope;
use vllm_apple_ops::kernels::{activation, bias, embedding, matmul, rmsnorm};
use vllm_apple_ops::kv_cache::{KvCache, KvCacheSpec};
use vllm_apple_ops::weight::WeightChunk;
use vllm_apple_ops::{DType, GpuContext, OpsError, Step, Tensor, Weight};

use crate::config::{Arch, ConfigError, ModelConfig};
use crate::gguf::{GgufError, GgufFile};
use crate::safetensors_dir::{SafetensorsDir, SafetensorsError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error("tensor '{name}' has shape {got:?}, expected {want:?}")]
    Shape {
        name: String,
        got: Vec<u64>,
        want: Vec<u64>,
    },
}

enum Mlp {
    /// `gate_up` stacks the gate rows over the up rows.
    Dense { gate_up: Weight, down: Weight },
    Moe {
        router: Weight,
        experts: ExpertWeights,
        shape: MoeShape,
        /// `moe::router_fold` of this layer (the router through o_proj), for decode steps
        /// on the GEMV path, which route without a router dispatch.
        fold: Option<Weight>,
    },
}

impl Mlp {
    fn nbytes(&self) -> u64 {
        match self {
            Mlp::Dense { gate_up, down } => gate_up.nbytes() + down.nbytes(),
            Mlp::Moe {
                router,
                experts,
                fold,
                ..
            } => router.nbytes() + experts.nbytes() + fold.as_ref().map_or(0, |f| f.nbytes()),
        }
    }

    /// Bytes one token reads: the whole dense MLP, or the router and its k experts (the
    /// model's; not the router fold, which is ours).
    fn active_bytes(&self) -> u64 {
        match self {
            Mlp::Dense { .. } => self.nbytes(),
            Mlp::Moe {
                router,
                experts,
                shape,
                ..
            } => router.nbytes() + experts.nbytes() / experts.experts as u64 * shape.top_k as u64,
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    qkv: Weight,
    o: Weight,
    ffn_norm: Tensor,
    mlp: Mlp,
    qk_norm: Option<(Tensor, Tensor)>,
    /// Qwen2: bias of the fused QKV projection.
    qkv_bias: Option<Tensor>,
}

impl Layer {
    /// This layer with its `Mlp::Moe::fold` (`moe::router_fold`), where it is a MoE layer.
    fn with_router_fold(mut self, ctx: &GpuContext) -> Result<Layer, ModelError> {
        // The router's half rides on the qkv GEMV as tail rows: same dtype and K.
        if let Mlp::Moe { router, fold, .. } = &mut self.mlp {
            if router.dtype == self.qkv.dtype && router.k == self.qkv.k {
                *fold = moe::router_fold(ctx, router, &self.ffn_norm, &self.o)?;
            }
        }
        Ok(self)
    }
}

pub struct DecoderModel {
    pub cfg: ModelConfig,
    pub dtype: DType,
    embed: Weight,
    layers: Vec<Layer>,
    final_norm: Tensor,
    lm_head: Option<Weight>,
    inv_freq: Tensor,
}

/// Layers recorded per submission of a forward (`Step::flush`), after a first submission
/// of FIRST_FLUSH_LAYERS that gets the GPU going early (engine batch 1 on the H100:
/// 168.7-171.1 -> 176.6-177.8 tok/s; flushing every 4 layers instead: 170.3-175.3).
const FLUSH_LAYERS: usize = 8;
const FIRST_FLUSH_LAYERS: usize = 2;

fn missing_scratch() -> ModelError {
    ModelError::Ops(OpsError::Gpu(
        "MLP scratch missing for a layer kind (config and weights disagree)".into(),
    ))
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

/// Where weights come from; the loader asks by Hugging Face tensor name.
enum Source<'a> {
    Gguf(&'a GgufFile),
    Hf(&'a SafetensorsDir),
}

/// The GGUF (llama.cpp) name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let Some(rest) = hf.strip_prefix("model.layers.") else {
        return hf.into();
    };
    let (layer, part) = rest.split_once('.').unwrap_or((rest, ""));
    let part = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "mlp.gate.weight" => "ffn_gate_inp.weight",
        other => other,
    };
    format!("blk.{layer}.{part}")
}

struct Loader<'a> {
    ctx: &'a GpuContext,
    src: Source<'a>,
    dtype: DType,
}

impl Loader<'_> {
    /// A tensor as f32 in Hugging Face layout, checked against the expected `[n, k]`
    /// (`n == 1`: a vector of `k`).
    fn f32(&self, name: &str, n: usize, k: usize) -> Result<Vec<f32>, ModelError> {
        let shape_err = |got: Vec<u64>| ModelError::Shape {
            name: name.into(),
            got,
            want: if n == 1 {
                vec![k as u64]
            } else {
                vec![n as u64, k as u64]
            },
        };
        match self.src {
            Source::Gguf(file) => {
                let g = gguf_name(name);
                let (info, _) = file.tensor_data(&g)?;
                let want = if n == 1 {
                    vec![k as u64]
                } else {
                    vec![k as u64, n as u64]
                };
                if info.dims != want {
                    return Err(shape_err(info.dims.iter().rev().copied().collect()));
                }
                Ok(file.tensor_f32(&g)?)
            }
            Source::Hf(dir) => {
                let (shape, v) = dir.f32(name)?;
                let want: Vec<usize> = if n == 1 { vec![k] } else { vec![n, k] };
                if shape != want {
                    return Err(shape_err(shape.iter().map(|&x| x as u64).collect()));
                }
                Ok(v)
            }
        }
    }

    /// The experts' `proj` (`gate_proj`, `up_proj` or `down_proj`) of layer `layer` as one
    /// `[experts, n, k]` stack: llama.cpp's `ffn_{gate,up,down}_exps`, Hugging Face's
    /// per-expert tensors, or transformers 5's fused `experts.gate_up_proj` / `down_proj`.
    fn expert_stack(
        &self,
        layer: usize,
        proj: &str,
        experts: usize,
        n: usize,
        k: usize,
    ) -> Result<Vec<f32>, ModelError> {
        match self.src {
            Source::Gguf(file) => {
                let short = proj.trim_end_matches("_proj");
                let g = format!("blk.{layer}.ffn_{short}_exps.weight");
                let (info, _) = file.tensor_data(&g)?;
                let want = vec![k as u64, n as u64, experts as u64];
                if info.dims != want {
                    return Err(ModelError::Shape {
                        name: g,
                        got: info.dims.iter().rev().copied().collect(),
                        want: want.into_iter().rev().collect(),
                    });
                }
                Ok(file.tensor_f32(&g)?)
            }
            Source::Hf(dir) => {
                let prefix = format!("model.layers.{layer}.mlp.experts");
                let fused = match proj {
                    "down_proj" => Some((format!("{prefix}.down_proj"), 0)),
                    "gate_proj" => Some((format!("{prefix}.gate_up_proj"), 0)),
                    _ => Some((format!("{prefix}.gate_up_proj"), 1)),
                };
                if let Some((name, half)) = fused.filter(|(name, _)| dir.contains(name)) {
                    let rows = if proj == "down_proj" { n } else { 2 * n };
                    let (shape, v) = dir.f32(&name)?;
                    if shape != [experts, rows, k] {
                        return Err(ModelError::Shape {
                            name,
                            got: shape.iter().map(|&x| x as u64).collect(),
                            want: vec![experts as u64, rows as u64, k as u64],
                        });
                    }
                    if proj == "down_proj" {
                        return Ok(v);
                    }
                    // gate rows first, then up rows, per expert.
                    return Ok(v
                        .chunks(2 * n * k)
                        .flat_map(|e| e[half * n * k..(half + 1) * n * k].iter().copied())
                        .collect());
                }
                let mut out = Vec::with_capacity(experts * n * k);
                for e in 0..experts {
                    out.extend(self.f32(&format!("{prefix}.{e}.{proj}.weight"), n, k)?);
                }
                Ok(out)
            }
        }
    }

    fn has(&self, name: &str) -> bool {
        match self.src {
            Source::Gguf(f) => f.gguf.tensor(&gguf_name(name)).is_some(),
            Source::Hf(d) => d.contains(name),
        }
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

impl DecoderModel {
    /// Loads a GGUF model, dequantizing every tensor to `dtype` (f16, bf16 or f32).
    pub fn from_gguf(
        ctx: &GpuContext,
        file: &GgufFile,
        dtype: DType,
    ) -> Result<DecoderModel, ModelError> {
        let cfg = ModelConfig::from_gguf(&file.gguf)?;
        // llama.cpp's converter interleaves the rotary halves of llama q/k heads.
        let permuted = cfg.arch == Arch::Llama;
        Self::load(
            Loader {
                ctx,
                src: Source::Gguf(file),
                dtype,
            },
            cfg,
            permuted,
        )
    }

    /// Loads a Hugging Face folder (config.json + safetensors), converting to `dtype`.
    pub fn from_hf_dir(
        ctx: &GpuContext,
        dir: &SafetensorsDir,
        dtype: DType,
    ) -> Result<DecoderModel, ModelError> {
        let path = dir.dir().join("config.json");
        let json = std::fs::read_to_string(&path).map_err(|e| ConfigError::Invalid {
            key: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let cfg = ModelConfig::from_hf_config(&json)?;
        Self::load(
            Loader {
                ctx,
                src: Source::Hf(dir),
                dtype,
            },
            cfg,
            false,
        )
    }

    fn load(l: Loader, cfg: ModelConfig, permuted: bool) -> Result<DecoderModel, ModelError> {
        let ctx = l.ctx;
        let (h, d, hq, hkv, f) = (cfg.hidden, cfg.head_dim, cfg.q_heads, cfg.kv_heads, cfg.ffn);
        // A progress bar on terminals (indicatif hides it elsewhere): one tick per layer.
        let bar = indicatif::ProgressBar::new(cfg.layers as u64 + 2).with_style(
            indicatif::ProgressStyle::with_template(
                "loading weights {bar:40} {pos}/{len} {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let embed = l.weight(
            "embed",
            cfg.vocab,
            h,
            l.f32("model.embed_tokens.weight", cfg.vocab, h)?,
        )?;
        bar.inc(1);
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            bar.inc(1);
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let mut q = l.f32(&p("self_attn.q_proj.weight"), hq * d, h)?;
            let mut k = l.f32(&p("self_attn.k_proj.weight"), hkv * d, h)?;
            if permuted {
                q = unpermute_rows(&q, hq, h);
                k = unpermute_rows(&k, hkv, h);
            }
            let v = l.f32(&p("self_attn.v_proj.weight"), hkv * d, h)?;
            let qkv: Vec<f32> = q.into_iter().chain(k).chain(v).collect();
            let mlp = match cfg.moe.as_ref().filter(|_| cfg.is_moe_layer(i)) {
                Some(m) => {
                    let (e, mf) = (m.experts, m.ffn);
                    let gate = l.expert_stack(i, "gate_proj", e, mf, h)?;
                    let up = l.expert_stack(i, "up_proj", e, mf, h)?;
                    let gate_up = ExpertWeights::interleave_gate_up(&gate, &up, e, mf, h);
                    drop((gate, up));
                    let down = l.expert_stack(i, "down_proj", e, h, mf)?;
                    let stack = |label: &str, rows: usize, k: usize, v: &[f32]| {
                        Weight::upload_grouped(
                            ctx,
                            label,
                            e * rows,
                            k,
                            l.dtype,
                            &l.dtype.encode_f32(v),
                            rows,
                            u64::MAX,
                        )
                    };
                    Mlp::Moe {
                        router: l.weight(
                            &p("router"),
                            e,
                            h,
                            l.f32(&p("mlp.gate.weight"), e, h)?,
                        )?,
                        experts: ExpertWeights::new(
                            e,
                            h,
                            mf,
                            stack(&p("experts.gate_up"), 2 * mf, h, &gate_up)?,
                            stack(&p("experts.down"), h, mf, &down)?,
                        )?,
                        shape: MoeShape {
                            experts: e,
                            top_k: m.top_k,
                            norm_topk: m.norm_topk,
                        },
                        fold: None,
                    }
                }
                None => {
                    let gate = l.f32(&p("mlp.gate_proj.weight"), f, h)?;
                    let up = l.f32(&p("mlp.up_proj.weight"), f, h)?;
                    Mlp::Dense {
                        gate_up: l.weight(
                            &p("gate_up"),
                            2 * f,
                            h,
                            gate.into_iter().chain(up).collect(),
                        )?,
                        down: l.weight(
                            &p("down_proj"),
                            h,
                            f,
                            l.f32(&p("mlp.down_proj.weight"), h, f)?,
                        )?,
                    }
                }
            };
            let qk_norm = if cfg.qk_norm {
                Some((
                    l.norm(&p("self_attn.q_norm.weight"), d)?,
                    l.norm(&p("self_attn.k_norm.weight"), d)?,
                ))
            } else {
                None
            };
            let qkv_bias = if cfg.qkv_bias {
                let mut b = l.f32(&p("self_attn.q_proj.bias"), 1, hq * d)?;
                b.extend(l.f32(&p("self_attn.k_proj.bias"), 1, hkv * d)?);
                b.extend(l.f32(&p("self_attn.v_proj.bias"), 1, hkv * d)?);
                Some(ctx.upload_f32(&[b.len()], DType::F32, &b)?)
            } else {
                None
            };
            layers.push(
                Layer {
                    qkv_bias,
                    attn_norm: l.norm(&p("input_layernorm.weight"), h)?,
                    qkv: l.weight(&p("qkv"), (hq + 2 * hkv) * d, h, qkv)?,
                    o: l.weight(
                        &p("o_proj"),
                        h,
                        hq * d,
                        l.f32(&p("self_attn.o_proj.weight"), h, hq * d)?,
                    )?,
                    ffn_norm: l.norm(&p("post_attention_layernorm.weight"), h)?,
                    mlp,
                    qk_norm,
                }
                .with_router_fold(ctx)?,
            );
        }
        bar.finish_and_clear();
        let lm_head = if cfg.tie_embeddings || !l.has("lm_head.weight") {
            None
        } else {
            Some(l.weight(
                "lm_head",
                cfg.vocab,
                h,
                l.f32("lm_head.weight", cfg.vocab, h)?,
            )?)
        };
        let mut inv = rope::inv_freq(d, cfg.rope_theta, cfg.rope_scaling);
        // llama.cpp stores Llama-3 frequency scaling as per-frequency divisors.
        if let Source::Gguf(file) = l.src {
            if file.gguf.tensor("rope_freqs.weight").is_some() {
                let factors = file.tensor_f32("rope_freqs.weight")?;
                if factors.len() != inv.len() {
                    return Err(ModelError::Shape {
                        name: "rope_freqs.weight".into(),
                        got: vec![factors.len() as u64],
                        want: vec![inv.len() as u64],
                    });
                }
                let base = rope::inv_freq(d, cfg.rope_theta, None);
                inv = base.iter().zip(&factors).map(|(f, s)| f / s).collect();
            }
        }
        Ok(DecoderModel {
            final_norm: l.norm("model.norm.weight", h)?,
            inv_freq: ctx.upload_f32(&[d / 2], DType::F32, &inv)?,
            embed,
            layers,
            lm_head,
            dtype: l.dtype,
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
    ) -> Result<DecoderModel, ModelError> {
        let (h, d, hq, hkv, f) = (cfg.hidden, cfg.head_dim, cfg.q_heads, cfg.kv_heads, cfg.ffn);
        let mut next = seed;
        // `align`: rows per chunk boundary (64 for plain matrices, one expert for stacks).
        let mut w = |label: &str, n: usize, k: usize, align: usize| {
            next = next.wrapping_add(0x9e37_79b9);
            let scale = 1.0 / (k as f32).sqrt();
            Weight::random_grouped(ctx, label, n, k, dtype, scale, next, align)
        };
        let ones = |k: usize| ctx.upload_f32(&[k], DType::F32, &vec![1.0; k]);
        let embed = w("token_embd", cfg.vocab, h, 64)?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let mlp = match cfg.moe.as_ref().filter(|_| cfg.is_moe_layer(i)) {
                Some(m) => {
                    let (e, mf) = (m.experts, m.ffn);
                    let gate_up = w("ffn_gate_up_exps", e * 2 * mf, h, 2 * mf)?;
                    let down = w("ffn_down_exps", e * h, mf, h)?;
                    Mlp::Moe {
                        router: w("ffn_gate_inp", e, h, 64)?,
                        experts: ExpertWeights::new(e, h, mf, gate_up, down)?,
                        shape: MoeShape {
                            experts: e,
                            top_k: m.top_k,
                            norm_topk: m.norm_topk,
                        },
                        fold: None,
                    }
                }
                None => Mlp::Dense {
                    gate_up: w("gate_up", 2 * f, h, 64)?,
                    down: w("ffn_down", h, f, 64)?,
                },
            };
            layers.push(
                Layer {
                    attn_norm: ones(h)?,
                    qkv: w("qkv", (hq + 2 * hkv) * d, h, 64)?,
                    o: w("attn_output", h, hq * d, 64)?,
                    ffn_norm: ones(h)?,
                    mlp,
                    qk_norm: if cfg.qk_norm {
                        Some((ones(d)?, ones(d)?))
                    } else {
                        None
                    },
                    // Zero biases: the dummy model's numbers need not be meaningful, only its cost.
                    qkv_bias: if cfg.qkv_bias {
                        let n = (hq + 2 * hkv) * d;
                        Some(ctx.upload_f32(&[n], DType::F32, &vec![0.0; n])?)
                    } else {
                        None
                    },
                }
                .with_router_fold(ctx)?,
            );
        }
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(w("output", cfg.vocab, h, 64)?)
        };
        let inv = rope::inv_freq(d, cfg.rope_theta, cfg.rope_scaling);
        ctx.wait_idle()?;
        Ok(DecoderModel {
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
            b += l.qkv.nbytes() + l.o.nbytes() + l.mlp.nbytes();
        }
        b
    }

    /// Weight bytes one decode step of one sequence must read: every layer's attention
    /// weights, dense MLPs whole, a MoE layer's router and `top_k` experts, the lm_head and
    /// one embedding row (the roofline's numerator).
    pub fn active_weight_bytes_per_token(&self) -> u64 {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).nbytes();
        let row = (self.cfg.hidden * self.dtype.size()) as u64;
        let mut b = head + row;
        for l in &self.layers {
            b += l.qkv.nbytes() + l.o.nbytes() + l.mlp.active_bytes();
        }
        b
    }

    /// Dispatches the MLP of one MoE layer records in a decode step of one sequence, and
    /// whether its router rides on the attention's GEMVs (`Mlp::Moe::fold`): the router
    /// GEMV unless folded, the gate/up GEMV routing the token itself and the down GEMV
    /// carrying the combine and the residual add (`MoeScratch::down_combine`), one each per
    /// weight chunk.
    pub fn moe_layer_dispatches(&self) -> Option<(usize, bool)> {
        self.layers.iter().find_map(|l| match &l.mlp {
            Mlp::Moe {
                router,
                experts,
                fold,
                ..
            } => {
                let router = if fold.is_some() {
                    0
                } else {
                    router.chunks.len()
                };
                let experts = experts.gate_up.chunks.len() + experts.down.chunks.len();
                Some((router + experts, fold.is_some()))
            }
            Mlp::Dense { .. } => None,
        })
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
        // Dense-MLP and MoE scratch, allocated only for the kinds of layers present.
        let dense = (0..c.layers).any(|i| !c.is_moe_layer(i));
        let gate_up = match dense {
            true => Some(ctx.empty(&[t, 2 * c.ffn], DType::F32)?),
            false => None,
        };
        let act = match dense {
            true => Some(ctx.empty(&[t, c.ffn], DType::F32)?),
            false => None,
        };
        let moe_scratch = match (&c.moe, (0..c.layers).any(|i| c.is_moe_layer(i))) {
            (Some(m), true) => Some(MoeScratch::new(
                ctx,
                t,
                &MoeShape {
                    experts: m.experts,
                    top_k: m.top_k,
                    norm_topk: m.norm_topk,
                },
                h,
                m.ffn,
                self.dtype,
                None,
            )?),
            _ => None,
        };
        let shape = AttnShape {
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
        };
        let scale = 1.0 / (d as f32).sqrt();
        // Decode-sized batches fold every RMSNorm into the GEMV that reads it and every
        // residual add into the GEMV (or MoE combine) that produces it: a layer then has no
        // norm or add dispatch. Larger batches norm and add in dispatches of their own.
        let fused = self.layers.iter().all(|l| {
            let mlp = match (&l.mlp, &moe_scratch) {
                (Mlp::Dense { gate_up, down }, _) => {
                    matmul::fusable(t, gate_up) && matmul::fusable(t, down)
                }
                (Mlp::Moe { router, .. }, Some(s)) => moe::fusable(router, s),
                (Mlp::Moe { .. }, None) => false,
            };
            mlp && matmul::fusable(t, &l.qkv) && matmul::fusable(t, &l.o)
        });
        let eps = c.rms_eps;
        if !fused {
            rmsnorm::rmsnorm(step, &residual, &self.layers[0].attn_norm, eps, &normed)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            // The GPU starts on the first layers while the host records the rest.
            if i == FIRST_FLUSH_LAYERS || (i > 0 && i % FLUSH_LAYERS == 0) {
                step.flush()?;
            }
            // o_proj on the GEMV (not the skinny GEMM of larger decode batches): it takes the
            // attention's split-K reduce, where there is one, and the router fold's tail.
            let o_gemv = fused
                && matches!(
                    matmul::fused_path(step, t, &layer.o),
                    matmul::MatmulPath::Gemv
                );
            // A decode step whose qkv and o_proj run on the GEMV (up to 5 tokens on GPUs
            // with matrix units, 16 elsewhere) routes from the layer's router fold:
            // R diag(g) h_prev as tail rows of the qkv GEMV plus F a as tail rows of
            // o_proj's, summed into the scratch logits, so no router dispatch
            // (moe::router_fold).
            let fold = match (&layer.mlp, &moe_scratch) {
                (
                    Mlp::Moe {
                        router,
                        fold: Some(f),
                        ..
                    },
                    Some(s),
                ) if o_gemv
                    && matches!(
                        matmul::fused_path(step, t, &layer.qkv),
                        matmul::MatmulPath::Gemv
                    ) =>
                {
                    Some((router, f, s))
                }
                _ => None,
            };
            if fused {
                let f = matmul::Fusion {
                    norm: Some((&layer.attn_norm, eps)),
                    accumulate: false,
                    tail: fold.map(|(r, _, s)| matmul::Tail {
                        w: r,
                        y: &s.logits,
                        norm: Some(&layer.ffn_norm),
                        accumulate: false,
                    }),
                };
                matmul::matmul_fused(step, &residual, &layer.qkv, &qkv, f)?;
            } else {
                matmul::matmul(step, &normed, &layer.qkv, &qkv)?;
            }
            if let Some(b) = &layer.qkv_bias {
                bias::add_bias(step, &qkv, b)?;
            }
            let rope = RopeArgs {
                positions: &meta.positions,
                inv_freq: &self.inv_freq,
                qk_norm: layer.qk_norm.as_ref().map(|(q, k)| (q, k)),
                eps: c.rms_eps,
            };
            let inputs = AttnInputs {
                qkv: &qkv,
                meta,
                cache: &kv.layers[i],
                shape,
                scale,
            };
            if fused {
                let take =
                    |p: &attention::Partials| o_gemv && matmul::partials_fusable(p, &layer.o);
                let add = matmul::Fusion {
                    norm: None,
                    accumulate: true,
                    tail: None,
                };
                let o_tail = fold.map(|(_, f, s)| matmul::Tail {
                    w: f,
                    y: &s.logits,
                    norm: None,
                    accumulate: true,
                });
                match attention::attention_rope_deferred(step, opts, &inputs, &rope, &attn, &take)?
                {
                    Some(p) => matmul::gemv_partials(step, &p, &layer.o, &residual, true, o_tail)?,
                    None => {
                        let f = matmul::Fusion {
                            tail: o_tail,
                            ..add
                        };
                        matmul::matmul_fused(step, &attn, &layer.o, &residual, f)?
                    }
                }
                let ffn_norm = Some((&layer.ffn_norm, eps));
                match (&layer.mlp, &gate_up, &act, &moe_scratch) {
                    (Mlp::Dense { gate_up: w1, down }, Some(gu), Some(a), _) => {
                        let f = matmul::Fusion {
                            norm: ffn_norm,
                            ..Default::default()
                        };
                        matmul::matmul_fused(step, &residual, w1, gu, f)?;
                        activation::silu_mul(step, gu, a)?;
                        matmul::matmul_fused(step, a, down, &residual, add)?;
                    }
                    (
                        Mlp::Moe {
                            router,
                            experts,
                            shape,
                            ..
                        },
                        _,
                        _,
                        Some(s),
                    ) => {
                        let norm = (&layer.ffn_norm, eps);
                        let logits = match fold {
                            Some(_) => moe::Logits::Folded,
                            None => moe::Logits::Router,
                        };
                        moe::moe_add_normed(
                            step, &residual, norm, router, experts, shape, s, logits,
                        )?;
                    }
                    _ => return Err(missing_scratch()),
                }
                continue;
            }
            attention::attention_rope(step, opts, &inputs, &rope, &attn)?;
            matmul::matmul(step, &attn, &layer.o, &proj)?;
            rmsnorm::add_rmsnorm(step, &proj, &residual, &layer.ffn_norm, c.rms_eps, &normed)?;
            let next_norm = self
                .layers
                .get(i + 1)
                .map_or(&self.final_norm, |l| &l.attn_norm);
            match (&layer.mlp, &gate_up, &act, &moe_scratch) {
                (Mlp::Dense { gate_up: w1, down }, Some(gu), Some(a), _) => {
                    matmul::matmul(step, &normed, w1, gu)?;
                    activation::silu_mul(step, gu, a)?;
                    matmul::matmul(step, a, down, &proj)?;
                    rmsnorm::add_rmsnorm(step, &proj, &residual, next_norm, c.rms_eps, &normed)?;
                }
                (
                    Mlp::Moe {
                        router,
                        experts,
                        shape,
                        ..
                    },
                    _,
                    _,
                    Some(s),
                ) => {
                    // The combine, the residual add and the next norm in one dispatch.
                    moe::moe_rows(step, &normed, router, experts, shape, s)?;
                    moe::combine_add_rmsnorm(
                        step, &s.rows, &s.routing, &residual, next_norm, c.rms_eps, &normed,
                    )?;
                }
                _ => return Err(missing_scratch()),
            }
        }
        if fused {
            rmsnorm::rmsnorm(step, &residual, &self.final_norm, eps, &normed)?;
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
