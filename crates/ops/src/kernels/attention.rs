//! Paged attention: the batched KV write, the paged attention kernel for any mix of prefill
//! and decode tokens (single pass, or split-K with a reduce pass for long contexts), and
//! the plain reference path selected by `VLLM_METAL_ATTENTION=0`.

use super::rope::{self, RopeShape};
use super::{expect_dtype, expect_len, softmax, wgsl};
use crate::dtype::DType;
use crate::error::{shape_err, OpsError, Result};
use crate::kv_cache::LayerKv;
use crate::pipeline::Kernel;
use crate::recorder::{grid, Step};
use crate::tensor::Tensor;

const KV_WRITE: &str = wgsl!("kv_write.wgsl");
const PAGED: &str = wgsl!("paged_attention.wgsl");
const PAGED_COOP: &str = wgsl!("paged_attention_coop.wgsl");
const REDUCE: &str = wgsl!("attention_reduce.wgsl");
const REFERENCE: &str = wgsl!("attention_ref.wgsl");

/// Workgroups a step should offer the GPU; fewer (token, kv head) pairs than this split
/// long contexts into partitions (flash-decoding), each its own workgroup.
const TARGET_GROUPS: usize = 1024;
/// The shortest partition: one 128-position chunk of the kernel.
const MIN_PARTITION: usize = 128;
/// Positions per chunk of the cooperative-matrix kernel (a divisor of MIN_PARTITION).
const COOP_CHUNK: u32 = 128;
/// The matrix kernel's longest partition, and the workgroups its plan aims for (about two
/// per SM on the H100: fewer leave SMs idle, more run a second wave of 128-position chunks).
const MATRIX_PARTITION: usize = 512;
const MATRIX_TARGET_GROUPS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn group(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    fn check(&self) -> Result<()> {
        let g = self.group();
        if self.kv_heads == 0
            || !self.q_heads.is_multiple_of(self.kv_heads)
            || !(1..=16).contains(&g)
        {
            return Err(shape_err(
                "attention",
                format!(
                    "{} query heads per {} kv heads: need 1..=16 per kv head",
                    self.q_heads, self.kv_heads
                ),
            ));
        }
        if !matches!(self.head_dim, 64 | 96 | 128 | 256) {
            return Err(shape_err(
                "attention",
                format!("head_dim {} (supported: 64, 96, 128, 256)", self.head_dim),
            ));
        }
        Ok(())
    }
}

/// vLLM's switches: `VLLM_METAL_ATTENTION` (1: our paged kernels, 0: the plain reference
/// path) and `VLLM_METAL_FUSED_KV` (1: KV write and attention in one submission, 0: the KV
/// write submitted and completed first). `partition` overrides the split-K choice;
/// `matrices` the choice of the paged kernel (None: on cooperative matrices for decode
/// batches where the device offers them, Some(false): the scalar kernel, Some(true):
/// matrices or an error); `chunk` the matrix kernel's positions per chunk (64, 128 or 256);
/// `fused_rope` lets a decode batch on the matrix kernel apply the rotary embedding (and
/// q/k norm) inside the attention dispatch (`attention_rope`; off with `VLLM_METAL_FUSED_KV=0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionOptions {
    pub paged: bool,
    pub fused_kv: bool,
    pub partition: Option<usize>,
    pub matrices: Option<bool>,
    pub chunk: Option<u32>,
    pub fused_rope: bool,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions {
            paged: true,
            fused_kv: true,
            partition: None,
            matrices: None,
            chunk: None,
            fused_rope: true,
        }
    }
}

/// A boolean switch as vLLM reads them: unset takes the default; 1/true/yes/on or
/// 0/false/no/off; anything else is an error naming the variable.
pub fn parse_flag(name: &str, value: Option<&str>, default: bool) -> Result<bool> {
    match value {
        None => Ok(default),
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(OpsError::Config(format!("{name}={v:?}: expected 0 or 1"))),
        },
    }
}

fn env_flag(name: &str, default: bool) -> Result<bool> {
    parse_flag(name, std::env::var(name).ok().as_deref(), default)
}

impl AttentionOptions {
    pub fn from_env() -> Result<Self> {
        let fused_kv = env_flag("VLLM_METAL_FUSED_KV", true)?;
        Ok(AttentionOptions {
            paged: env_flag("VLLM_METAL_ATTENTION", true)?,
            fused_kv,
            partition: None,
            matrices: None,
            chunk: None,
            fused_rope: fused_kv,
        })
    }
}

/// One sequence of a batch: its block table, the tokens already in the cache, and the new
/// tokens of this step (a prefill chunk, or 1 for decode).
#[derive(Clone, Copy, Debug)]
pub struct SeqSlice<'a> {
    pub block_table: &'a [u32],
    pub num_cached: usize,
    pub num_new: usize,
}

/// What the attention kernels need about a batch (vLLM's attention metadata), on the GPU.
/// Token order: each sequence's new tokens in turn, then padding tokens.
pub struct AttnMetadata {
    pub num_tokens: usize,
    pub num_seqs: usize,
    pub block_size: usize,
    pub max_blocks: usize,
    /// Longest context (cached + new) of any sequence.
    pub max_ctx: usize,
    /// Most new tokens of any sequence (1: a pure decode batch).
    pub max_query_len: usize,
    /// `[tokens]` u32: the position of each token (for RoPE).
    pub positions: Tensor,
    /// `[tokens]` i32: cache slot (block * block_size + offset) of each new token; -1 = padding.
    pub slot_mapping: Tensor,
    /// `[seqs, max_blocks]` u32.
    pub block_tables: Tensor,
    /// `[tokens]` u32: the block-table row of each token's sequence.
    pub seq_of: Tensor,
    /// `[tokens]` u32: cache positions each token attends to (its position + 1; 0 = padding).
    pub ctx_of: Tensor,
    /// `[seqs]` u32: cached + new tokens of each sequence.
    pub seq_lens: Tensor,
}

/// CPU side of `AttnMetadata`, for building and for references.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostMetadata {
    pub positions: Vec<u32>,
    pub slot_mapping: Vec<i32>,
    pub block_tables: Vec<u32>,
    pub seq_of: Vec<u32>,
    pub ctx_of: Vec<u32>,
    pub seq_lens: Vec<u32>,
    pub max_blocks: usize,
}

impl HostMetadata {
    /// Lays out a batch; `pad_to` appends padding tokens (slot -1, no context) up to that count.
    pub fn build(seqs: &[SeqSlice], block_size: usize, pad_to: usize) -> Result<HostMetadata> {
        if block_size == 0 {
            return Err(OpsError::Config("block_size must be positive".into()));
        }
        let max_blocks = seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut m = HostMetadata {
            max_blocks,
            ..Default::default()
        };
        for (b, s) in seqs.iter().enumerate() {
            let total = s.num_cached + s.num_new;
            if total.div_ceil(block_size) > s.block_table.len() {
                return Err(shape_err(
                    "attention metadata",
                    format!(
                        "sequence {b}: {total} tokens need {} blocks, its table has {}",
                        total.div_ceil(block_size),
                        s.block_table.len()
                    ),
                ));
            }
            let mut row = s.block_table.to_vec();
            row.resize(max_blocks, 0);
            m.block_tables.extend(row);
            m.seq_lens.push(total as u32);
            for pos in s.num_cached..total {
                let slot = s.block_table[pos / block_size] as usize * block_size + pos % block_size;
                let slot = i32::try_from(slot)
                    .map_err(|_| shape_err("attention metadata", "slot beyond i32"))?;
                m.positions.push(pos as u32);
                m.slot_mapping.push(slot);
                m.seq_of.push(b as u32);
                m.ctx_of.push(pos as u32 + 1);
            }
        }
        while m.positions.len() < pad_to {
            m.positions.push(0);
            m.slot_mapping.push(-1);
            m.seq_of.push(0);
            m.ctx_of.push(0);
        }
        if m.seq_lens.is_empty() {
            m.seq_lens.push(0);
            m.block_tables.resize(max_blocks, 0);
        }
        Ok(m)
    }

    /// Most new tokens of any sequence (tokens of a sequence are consecutive).
    pub fn max_query_len(&self) -> usize {
        let real = self.ctx_of.iter().filter(|&&c| c > 0).count();
        let mut best = 0;
        let mut run = 0;
        for i in 0..real {
            run = if i > 0 && self.seq_of[i] == self.seq_of[i - 1] {
                run + 1
            } else {
                1
            };
            best = best.max(run);
        }
        best
    }

    pub fn upload(&self, ctx: &crate::GpuContext, block_size: usize) -> Result<AttnMetadata> {
        let t = self.positions.len();
        if t == 0 {
            return Err(shape_err("attention metadata", "no tokens"));
        }
        // One buffer and one queue write for the six arrays.
        let slots: &[u32] = bytemuck::cast_slice(&self.slot_mapping);
        let (nb, ns) = (self.block_tables.len(), self.seq_lens.len());
        let [positions, slot_mapping, block_tables, seq_of, ctx_of, seq_lens] =
            ctx.upload_packed([
                (&[t], DType::U32, &self.positions),
                (&[t], DType::I32, slots),
                (&[nb], DType::U32, &self.block_tables),
                (&[t], DType::U32, &self.seq_of),
                (&[t], DType::U32, &self.ctx_of),
                (&[ns], DType::U32, &self.seq_lens),
            ])?;
        Ok(AttnMetadata {
            num_tokens: t,
            num_seqs: ns,
            block_size,
            max_blocks: self.max_blocks,
            max_ctx: self.seq_lens.iter().copied().max().unwrap_or(0) as usize,
            max_query_len: self.max_query_len(),
            positions,
            slot_mapping,
            block_tables,
            seq_of,
            ctx_of,
            seq_lens,
        })
    }
}

/// One layer's attention inputs: the fused QKV rows of the step's tokens (q and k already
/// rotated), the batch metadata, the layer's cache, the head shape and the softmax scale.
#[derive(Clone, Copy)]
pub struct AttnInputs<'a> {
    pub qkv: &'a Tensor,
    pub meta: &'a AttnMetadata,
    pub cache: &'a LayerKv,
    pub shape: AttnShape,
    pub scale: f32,
}

fn check_inputs(a: &AttnInputs) -> Result<()> {
    let (qkv, meta, cache, s) = (a.qkv, a.meta, a.cache, a.shape);
    s.check()?;
    expect_dtype("attention", qkv, DType::F32)?;
    expect_len(
        "attention",
        "qkv",
        qkv,
        meta.num_tokens * (s.q_heads + 2 * s.kv_heads) * s.head_dim,
    )?;
    expect_dtype("attention", &cache.k, DType::F16)?;
    let shape = cache.k.shape();
    if shape.len() != 4
        || shape[1] != s.kv_heads
        || shape[2] != meta.block_size
        || shape[3] != s.head_dim
    {
        return Err(shape_err(
            "attention",
            format!(
                "cache {:?} does not match {s:?} with block size {}",
                shape, meta.block_size
            ),
        ));
    }
    Ok(())
}

/// Writes the new tokens' K and V (from the rotated QKV rows) into the cache: one dispatch.
pub fn write_kv(step: &mut Step, a: &AttnInputs) -> Result<()> {
    check_inputs(a)?;
    let (qkv, meta, cache, s) = (a.qkv, a.meta, a.cache, a.shape);
    let k = Kernel::new("kv_write.wgsl", KV_WRITE, "kv_write");
    let params = [
        meta.num_tokens as u32,
        s.q_heads as u32,
        s.kv_heads as u32,
        s.head_dim as u32,
        meta.block_size as u32,
    ];
    let n = meta.num_tokens * s.kv_heads * s.head_dim / 2;
    step.dispatch(
        &k,
        &[qkv, &meta.slot_mapping, &cache.k, &cache.v],
        &params,
        grid(step.ctx, n.div_ceil(256)),
    )
}

fn paged_kernel(s: AttnShape, split: bool) -> Kernel {
    Kernel::new("paged_attention.wgsl", PAGED, "paged_attention")
        .u32("G", s.group() as u32)
        .u32("D", s.head_dim as u32)
        .bool("SPLIT", split)
}

/// `rope`: None, or Some(q/k norm) where the kernel also applies the rotary embedding.
fn coop_kernel(s: AttnShape, split: bool, frag: u32, chunk: u32, rope: Option<bool>) -> Kernel {
    Kernel::new(
        "paged_attention_coop.wgsl",
        PAGED_COOP,
        "paged_attention_coop",
    )
    .u32("G", s.group() as u32)
    .u32("D", s.head_dim as u32)
    .bool("SPLIT", split)
    .u32("S", frag)
    .u32("CH", chunk)
    .u32("NSG", coop_subgroups(frag, chunk))
    .bool("ROPE", rope.is_some())
    .bool("QK_NORM", rope == Some(true))
    .alias("CA", format!("coop_mat{frag}x{frag}<f16, A>"))
    .alias("CB", format!("coop_mat{frag}x{frag}<f16, B>"))
    .alias("CC", format!("coop_mat{frag}x{frag}<f32, C>"))
    .coop()
}

/// Subgroups per workgroup of the cooperative-matrix kernel: 8 where a chunk has a
/// position fragment for each, else 4.
fn coop_subgroups(frag: u32, chunk: u32) -> u32 {
    if chunk / frag >= 8 {
        8
    } else {
        4
    }
}

/// Workgroup memory of the cooperative-matrix kernel in bytes.
fn coop_shared_bytes(s: AttnShape, frag: usize, ch: usize) -> usize {
    let d = s.head_dim;
    let hp = frag;
    // Up to 8 query fragments are held in registers, staged through the probabilities.
    // Scores and probabilities are [head][pos] with rows padded by 4 and 8 elements, the
    // outputs [head][dim] padded by 4.
    let (sps, pps) = (ch + 4, ch + 8);
    let (qh, ph) = match d / frag <= 8 {
        true => (1, (hp * pps).max(hp * d)),
        false => (hp * d, hp * pps),
    };
    qh * 2 + (hp * sps).max(hp * (d + 4)) * 4 + ph * 2 + frag * d * 2 + (ch / frag + 3 * hp) * 4
}

/// Whether the kernel's layout takes this shape with `frag` x `frag` fragments.
fn coop_shape_ok(s: AttnShape, frag: usize) -> bool {
    s.group() <= frag && s.head_dim.is_multiple_of(frag) && s.head_dim / frag <= 16
}

/// The fragment size the cooperative-matrix kernel runs with for this shape, or `None`
/// where it cannot: no f16 matrices with f32 accumulators, subgroups other than 32, more
/// query heads per kv head than a fragment has rows, more than 16 fragments per head,
/// blocks that are not whole fragments, or too little workgroup memory.
pub fn matrix_fragment(
    ctx: &crate::GpuContext,
    s: AttnShape,
    block_size: usize,
    chunk: u32,
) -> Option<u32> {
    let frag = ctx.coop?.m;
    let f = frag as usize;
    let fits = coop_shared_bytes(s, f, chunk as usize)
        <= ctx.limits.max_compute_workgroup_storage_size as usize;
    let ok = ctx.subgroup_is(32) && coop_shape_ok(s, f) && block_size.is_multiple_of(f) && fits;
    ok.then_some(frag)
}

/// Whether `attend` runs the cooperative-matrix kernel for this batch (an error where the
/// options demand it and the device or shape cannot). By default only decode batches do:
/// a prefill token's workgroup fills a 16-row fragment with its G heads alone, and the
/// scalar kernel prefills twice as fast on the H100 (docs/performance.md).
pub fn uses_matrices(
    ctx: &crate::GpuContext,
    opts: &AttentionOptions,
    meta: &AttnMetadata,
    s: AttnShape,
) -> Result<Option<u32>> {
    let chunk = opts.chunk.unwrap_or(COOP_CHUNK);
    if !matches!(chunk, 64 | 128 | 256) {
        return Err(OpsError::Config(format!(
            "attention chunk {chunk}: 64, 128 or 256"
        )));
    }
    let wanted = match opts.matrices {
        _ if !opts.paged => false,
        Some(m) => m,
        None => meta.max_query_len <= 1,
    };
    if !wanted {
        return Ok(None);
    }
    let frag = matrix_fragment(ctx, s, meta.block_size, chunk);
    if opts.matrices == Some(true) && frag.is_none() {
        return Err(shape_err(
            "attention",
            format!(
                "cooperative-matrix attention unavailable here for {s:?}, block size {}",
                meta.block_size
            ),
        ));
    }
    Ok(frag)
}

fn reduce_kernel(s: AttnShape) -> Kernel {
    Kernel::new("attention_reduce.wgsl", REDUCE, "attention_reduce")
        .u32("G", s.group() as u32)
        .u32("D", s.head_dim as u32)
}

fn reference_kernel(entry: &'static str) -> Kernel {
    Kernel::new("attention_ref.wgsl", REFERENCE, entry)
}

pub(crate) fn variants(coop_sizes: &[u32]) -> Vec<Kernel> {
    let mut v = vec![Kernel::new("kv_write.wgsl", KV_WRITE, "kv_write")];
    for (q, kv, d) in [(4, 4, 64), (32, 4, 128), (16, 1, 256), (8, 2, 96)] {
        let s = AttnShape {
            q_heads: q,
            kv_heads: kv,
            head_dim: d,
        };
        v.push(paged_kernel(s, false));
        v.push(paged_kernel(s, true));
        v.push(reduce_kernel(s));
        for frag in coop_sizes.iter().filter(|&&f| coop_shape_ok(s, f as usize)) {
            v.push(coop_kernel(s, false, *frag, COOP_CHUNK, None));
            v.push(coop_kernel(s, true, *frag, 256, None));
            v.push(coop_kernel(s, false, *frag, COOP_CHUNK, Some(true)));
            v.push(coop_kernel(s, true, *frag, COOP_CHUNK, Some(false)));
        }
    }
    for e in ["gather_kv", "naive_scores", "naive_av"] {
        v.push(reference_kernel(e));
    }
    v
}

/// Positions per split for this batch, or `None` for a single pass: split only when the
/// batch alone leaves the GPU idle and some context is longer than one partition. The
/// matrix kernel (`matrices`) cuts contexts into MATRIX_TARGET_GROUPS workgroups' worth of
/// partitions, each a multiple of 128 positions and at most MATRIX_PARTITION: on the
/// H100, 64 x 8192 ran at 50% of the copy rate in 512-position splits against 41% in 4
/// splits of 2048, 16 x 2048 at 36% against 27% in 16 splits of 128, and batch 1 x 16384
/// in 28 us with 64 splits of 256 against 38 us in 128 of 128 (docs/performance.md).
pub fn plan_partition(
    opts: &AttentionOptions,
    meta: &AttnMetadata,
    s: AttnShape,
    matrices: bool,
) -> Option<usize> {
    if let Some(p) = opts.partition {
        return (meta.max_ctx > p).then_some(p.max(1));
    }
    let groups = meta.num_tokens * s.kv_heads;
    if matrices {
        let part = meta
            .max_ctx
            .div_ceil(MATRIX_TARGET_GROUPS.div_ceil(groups))
            .next_multiple_of(128)
            .clamp(MIN_PARTITION, MATRIX_PARTITION);
        return (part < meta.max_ctx).then_some(part);
    }
    if groups >= TARGET_GROUPS {
        return None;
    }
    let splits = TARGET_GROUPS.div_ceil(groups);
    let part = meta
        .max_ctx
        .div_ceil(splits)
        .max(MIN_PARTITION)
        .next_multiple_of(128);
    (part < meta.max_ctx).then_some(part)
}

/// Attention over the cache (after `write_kv`), by our paged kernels or the reference path.
/// `out`: `[tokens, q_heads * head_dim]` f32.
pub fn attend(
    step: &mut Step,
    opts: &AttentionOptions,
    a: &AttnInputs,
    out: &Tensor,
) -> Result<()> {
    attend_writing(step, opts, a, out, false, None, None).map(|_| ())
}

/// Whether the attention dispatch itself writes the batch's new K/V (fused decode): a
/// decode batch on the matrix kernel, with the KV write fused.
fn writes_kv(step: &Step, opts: &AttentionOptions, a: &AttnInputs) -> Result<bool> {
    Ok(opts.paged
        && opts.fused_kv
        && a.meta.max_query_len <= 1
        && uses_matrices(step.ctx, opts, a.meta, a.shape)?.is_some())
}

/// `attend`; with `write_kv` (only where `writes_kv`) the matrix kernel also writes each
/// token's K/V into the cache first.
/// With `rope` (only with `write_kv`) the kernel also norms and rotates q and k.
fn attend_writing(
    step: &mut Step,
    opts: &AttentionOptions,
    a: &AttnInputs,
    out: &Tensor,
    write_kv: bool,
    rope: Option<&RopeArgs>,
    defer: Option<&dyn Fn(&Partials) -> bool>,
) -> Result<Option<Partials>> {
    check_inputs(a)?;
    let (qkv, meta, cache, s, scale) = (a.qkv, a.meta, a.cache, a.shape, a.scale);
    expect_dtype("attention", out, DType::F32)?;
    expect_len(
        "attention",
        "out",
        out,
        meta.num_tokens * s.q_heads * s.head_dim,
    )?;
    if !opts.paged {
        return attend_reference(step, a, out).map(|_| None);
    }
    let t = meta.num_tokens;
    let frag = uses_matrices(step.ctx, opts, meta, s)?;
    let plan = plan_partition(opts, meta, s, frag.is_some());
    // The fused decode gives the newest position's fragment a partition of its own
    // (paged_attention_coop.wgsl) where the workgroups stay at most half the plan's target:
    // latency-bound decode steps, whose writer workgroup is their slowest (Qwen3-30B-A3B on
    // the H100: the mean GPU step over contexts 129-384 4.25 -> 4.17 ms). Larger batches
    // are bandwidth-bound and the extra workgroups cost (16 x 512: 17.9 -> 26.9 us).
    let own_part = match (plan, frag) {
        (Some(p), Some(f)) if write_kv => {
            let own = (meta.max_ctx.max(1) - 1) / f as usize * f as usize;
            let splits = own.div_ceil(p) + 1;
            (t * s.kv_heads * splits <= MATRIX_TARGET_GROUPS / 2).then_some(splits)
        }
        _ => None,
    };
    let (partition, splits) = match (plan, own_part) {
        (Some(p), Some(splits)) => (p, splits),
        (Some(p), None) => (p, meta.max_ctx.div_ceil(p)),
        (None, _) => (meta.max_ctx.max(1), 1),
    };
    let params = [
        t as u32,
        s.q_heads as u32,
        s.kv_heads as u32,
        meta.block_size as u32,
        meta.max_blocks as u32,
        scale.to_bits(),
        partition as u32,
        splits as u32,
    ];
    let groups = grid(step.ctx, t * s.kv_heads * splits);
    let chunk = opts.chunk.unwrap_or(COOP_CHUNK);
    let rope_kind = rope.map(|r| r.qk_norm.is_some());
    let kernel = |split| match frag {
        Some(f) => coop_kernel(s, split, f, chunk, rope_kind),
        None => paged_kernel(s, split),
    };
    let inputs = [
        qkv,
        &meta.seq_of,
        &meta.ctx_of,
        &meta.block_tables,
        &cache.k,
        &cache.v,
    ];
    // The matrix kernel also takes the slots and the write flag.
    let mut params = params.to_vec();
    let mut tail: Vec<&Tensor> = Vec::new();
    let dummy = step.ctx.dummy()?.clone();
    if frag.is_some() {
        params.push(write_kv as u32);
        params.push(rope.map_or(0.0, |r| r.eps).to_bits());
        params.push(own_part.is_some() as u32);
        tail.push(&meta.slot_mapping);
        // Unused rope tables take a read-only buffer of this dispatch (the dummy may be
        // bound read-write above).
        let unused = &meta.seq_of;
        let (qn, kn) = rope.and_then(|r| r.qk_norm).unwrap_or((unused, unused));
        tail.extend([rope.map_or(unused, |r| r.inv_freq), qn, kn]);
    }
    if splits == 1 {
        let b: Vec<&Tensor> = inputs
            .iter()
            .copied()
            .chain([out, &dummy])
            .chain(tail)
            .collect();
        return step
            .dispatch(&kernel(false), &b, &params, groups)
            .map(|_| None);
    }
    let g = s.group();
    let part = step
        .ctx
        .empty(&[t * s.kv_heads * splits, g * s.head_dim], DType::F32)?;
    let ml = step
        .ctx
        .empty(&[t * s.kv_heads * splits, g, 2], DType::F32)?;
    let b: Vec<&Tensor> = inputs
        .iter()
        .copied()
        .chain([&part, &ml])
        .chain(tail)
        .collect();
    step.dispatch(&kernel(true), &b, &params, groups)?;
    let partials = Partials {
        part,
        ml,
        splits,
        tokens: t,
        shape: s,
    };
    if defer.is_some_and(|take| take(&partials)) {
        return Ok(Some(partials));
    }
    let rparams = [t as u32, s.q_heads as u32, s.kv_heads as u32, splits as u32];
    step.dispatch(
        &reduce_kernel(s),
        &[&partials.part, &partials.ml, out],
        &rparams,
        grid(step.ctx, t * s.q_heads),
    )?;
    Ok(None)
}

/// Split-K decode attention not yet reduced: per (token, kv head, split) the outputs of the
/// split's group of query heads (`part`, `[tokens * kv_heads * splits, group * head_dim]`,
/// unnormalised) and their running (max, sum) pairs (`ml`), as attention_reduce.wgsl
/// takes them; `matmul::gemv_partials` folds that reduce into the output projection.
pub struct Partials {
    pub part: Tensor,
    pub ml: Tensor,
    pub splits: usize,
    pub tokens: usize,
    pub shape: AttnShape,
}

fn attend_reference(step: &mut Step, a: &AttnInputs, out: &Tensor) -> Result<()> {
    let (qkv, meta, cache, s, scale) = (a.qkv, a.meta, a.cache, a.shape, a.scale);
    let (t, b, mc) = (meta.num_tokens, meta.num_seqs, meta.max_ctx.max(1));
    let ctx = step.ctx;
    let kc = ctx.empty(&[b, mc, s.kv_heads, s.head_dim], DType::F32)?;
    let vc = ctx.empty(&[b, mc, s.kv_heads, s.head_dim], DType::F32)?;
    let scores = ctx.empty(&[t * s.q_heads, mc], DType::F32)?;
    let params = [
        t as u32,
        s.q_heads as u32,
        s.kv_heads as u32,
        s.head_dim as u32,
        meta.block_size as u32,
        meta.max_blocks as u32,
        mc as u32,
        b as u32,
        scale.to_bits(),
    ];
    let n = b * mc * s.kv_heads * s.head_dim / 2;
    step.dispatch_at(
        &reference_kernel("gather_kv"),
        &[
            (0, &meta.seq_lens),
            (1, &meta.block_tables),
            (2, &cache.k),
            (3, &cache.v),
            (4, &kc),
            (5, &vc),
        ],
        &params,
        grid(ctx, n.div_ceil(256)),
    )?;
    let n = t * s.q_heads * mc;
    step.dispatch_at(
        &reference_kernel("naive_scores"),
        &[
            (4, &kc),
            (6, qkv),
            (7, &meta.seq_of),
            (8, &meta.ctx_of),
            (9, &scores),
        ],
        &params,
        grid(ctx, n.div_ceil(256)),
    )?;
    softmax::softmax(step, &scores)?;
    let n = t * s.q_heads * s.head_dim;
    step.dispatch_at(
        &reference_kernel("naive_av"),
        &[
            (5, &vc),
            (7, &meta.seq_of),
            (8, &meta.ctx_of),
            (9, &scores),
            (10, out),
        ],
        &params,
        grid(ctx, n.div_ceil(256)),
    )
}

/// KV write and attention for one layer. With `fused_kv` both go into the current
/// submission back to back (the GPU orders them; the CPU never waits), and a decode batch
/// on the matrix kernel writes its K/V inside the attention dispatch itself; without it
/// the KV write is submitted and completed before attention is recorded.
pub fn attention(
    step: &mut Step,
    opts: &AttentionOptions,
    a: &AttnInputs,
    out: &Tensor,
) -> Result<()> {
    if writes_kv(step, opts, a)? {
        return attend_writing(step, opts, a, out, true, None, None).map(|_| ());
    }
    write_kv(step, a)?;
    if !opts.fused_kv {
        step.sync()?;
    }
    attend(step, opts, a, out)
}

/// The rotary embedding a layer applies to q and k before attention (`rope::rope`'s
/// arguments but the QKV rows and the shape, which come from `AttnInputs`).
#[derive(Clone, Copy)]
pub struct RopeArgs<'a> {
    pub positions: &'a Tensor,
    pub inv_freq: &'a Tensor,
    /// Qwen3's per-head RMSNorm weights (q, k), `[head_dim]` each.
    pub qk_norm: Option<(&'a Tensor, &'a Tensor)>,
    pub eps: f32,
}

/// `rope::rope` on `a.qkv` then `attention`, as one step: a decode batch that `attention`
/// runs on the matrix kernel with its KV write fused (and `opts.fused_rope`) norms and
/// rotates q and k inside that same dispatch, so the layer has no rope dispatch; any other
/// batch gets the rope dispatch first. `a.qkv` holds q and k unrotated.
pub fn attention_rope(
    step: &mut Step,
    opts: &AttentionOptions,
    a: &AttnInputs,
    rope: &RopeArgs,
    out: &Tensor,
) -> Result<()> {
    attention_rope_deferred(step, opts, a, rope, out, &|_| false).map(|_| ())
}

/// `attention_rope`, except that a split-K decode whose partials `take` accepts returns
/// them unreduced (`Some`; `out` untouched) for a consumer that folds the reduce in
/// (`matmul::gemv_partials`); otherwise `out` holds the attention output (`None`).
pub fn attention_rope_deferred(
    step: &mut Step,
    opts: &AttentionOptions,
    a: &AttnInputs,
    rope: &RopeArgs,
    out: &Tensor,
    take: &dyn Fn(&Partials) -> bool,
) -> Result<Option<Partials>> {
    let s = a.shape;
    let d = s.head_dim;
    expect_dtype("attention", rope.inv_freq, DType::F32)?;
    expect_len("attention", "inv_freq", rope.inv_freq, d / 2)?;
    if let Some((q, k)) = rope.qk_norm {
        expect_len("attention", "q_norm", q, d)?;
        expect_len("attention", "k_norm", k, d)?;
    }
    if opts.fused_rope && writes_kv(step, opts, a)? {
        return attend_writing(step, opts, a, out, true, Some(rope), Some(take));
    }
    let shape = RopeShape {
        q_heads: s.q_heads,
        kv_heads: s.kv_heads,
        head_dim: d,
    };
    rope::rope(
        step,
        a.qkv,
        rope.positions,
        rope.inv_freq,
        rope.qk_norm,
        rope.eps,
        shape,
    )?;
    attention(step, opts, a, out).map(|_| None)
}

pub mod cpu {
    use super::{AttnShape, HostMetadata};

    /// Reference attention in f64 over a CPU copy of the cache (`[blocks, kv_heads, bs, d]`,
    /// already f16-rounded), for every token of `meta`; padding tokens give zeros.
    pub fn attention(
        qkv: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        meta: &HostMetadata,
        s: AttnShape,
        block_size: usize,
        scale: f32,
    ) -> Vec<f32> {
        let (d, hq, hkv) = (s.head_dim, s.q_heads, s.kv_heads);
        let g = hq / hkv;
        let row = (hq + 2 * hkv) * d;
        let t_count = meta.ctx_of.len();
        let mut out = vec![0f32; t_count * hq * d];
        for t in 0..t_count {
            let n = meta.ctx_of[t] as usize;
            if n == 0 {
                continue;
            }
            let seq = meta.seq_of[t] as usize;
            let table = &meta.block_tables[seq * meta.max_blocks..(seq + 1) * meta.max_blocks];
            for head in 0..hq {
                let h = head / g;
                let q = &qkv[t * row + head * d..t * row + (head + 1) * d];
                let at = |pos: usize| {
                    ((table[pos / block_size] as usize * hkv + h) * block_size + pos % block_size)
                        * d
                };
                let scores: Vec<f64> = (0..n)
                    .map(|pos| {
                        let k = &k_cache[at(pos)..at(pos) + d];
                        q.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
                let sum: f64 = w.iter().sum();
                for dd in 0..d {
                    let v: f64 = (0..n)
                        .map(|pos| w[pos] * v_cache[at(pos) + dd] as f64)
                        .sum();
                    out[(t * hq + head) * d + dd] = (v / sum) as f32;
                }
            }
        }
        out
    }
}
