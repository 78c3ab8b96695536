//! The paged KV cache: per layer, K and V each in one GPU buffer of `num_blocks` blocks of
//! `block_size` token slots, laid out `[num_blocks, kv_heads, block_size, head_dim]` in f16
//! so that decode streams one head of one block as contiguous memory. The number of blocks
//! comes from the memory budget (`gpu_memory_utilization`).

use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{OpsError, Result};
use crate::tensor::Tensor;

/// The cache's shape, from the model config and the block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheSpec {
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl KvCacheSpec {
    /// f16 K and V of one block in every layer.
    pub fn bytes_per_block(&self) -> u64 {
        (self.num_layers * 2 * self.kv_heads * self.block_size * self.head_dim * 2) as u64
    }

    /// One layer's K (or V) for `num_blocks` blocks.
    pub fn layer_bytes(&self, num_blocks: usize) -> u64 {
        (num_blocks * self.kv_heads * self.block_size * self.head_dim * 2) as u64
    }
}

/// What the cache may take: `utilization` of `memory_bytes`, less what is already spoken for.
#[derive(Clone, Copy, Debug)]
pub struct KvBudget {
    pub memory_bytes: u64,
    pub utilization: f64,
    pub weights_bytes: u64,
    pub activation_bytes: u64,
}

/// Blocks that fit the budget (and one storage binding per layer), or an error when not even
/// one sequence of `max_model_len` tokens fits.
pub fn plan_num_blocks(
    spec: &KvCacheSpec,
    budget: &KvBudget,
    max_model_len: usize,
    max_binding_bytes: u64,
) -> Result<usize> {
    if !(budget.utilization > 0.0 && budget.utilization <= 1.0) {
        return Err(OpsError::Config(format!(
            "gpu_memory_utilization must be in (0, 1], got {}",
            budget.utilization
        )));
    }
    if spec.block_size == 0 || !spec.head_dim.is_multiple_of(8) || spec.kv_heads == 0 {
        return Err(OpsError::Config(format!(
            "KV cache needs block_size > 0, kv_heads > 0 and head_dim % 8 == 0: {spec:?}"
        )));
    }
    let usable = (budget.memory_bytes as f64 * budget.utilization) as u64;
    let reserved = budget.weights_bytes + budget.activation_bytes;
    let free = usable.saturating_sub(reserved);
    let by_memory = (free / spec.bytes_per_block().max(1)) as usize;
    let by_binding = (max_binding_bytes / spec.layer_bytes(1).max(1)) as usize;
    let by_index = (i32::MAX as usize) / spec.block_size;
    let blocks = by_memory.min(by_binding).min(by_index);
    let needed = max_model_len.div_ceil(spec.block_size);
    if blocks < needed {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(OpsError::KvCache(format!(
            "the KV cache cannot hold one sequence of max_model_len={max_model_len} tokens: it \
             needs {needed} blocks of {} tokens ({:.2} GiB) but {blocks} fit ({:.2} GiB of \
             {:.2} GiB x gpu_memory_utilization {} remain after {:.2} GiB of weights and \
             activations). Lower max_model_len or raise gpu_memory_utilization.",
            spec.block_size,
            gib(needed as u64 * spec.bytes_per_block()),
            gib(free),
            gib(budget.memory_bytes),
            budget.utilization,
            gib(reserved),
        )));
    }
    Ok(blocks)
}

/// One layer's cache.
pub struct LayerKv {
    pub k: Tensor,
    pub v: Tensor,
}

pub struct KvCache {
    pub spec: KvCacheSpec,
    pub num_blocks: usize,
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(ctx: &GpuContext, spec: KvCacheSpec, num_blocks: usize) -> Result<KvCache> {
        let shape = [num_blocks, spec.kv_heads, spec.block_size, spec.head_dim];
        let layers = (0..spec.num_layers)
            .map(|_| {
                Ok(LayerKv {
                    k: ctx.persistent("k_cache", &shape, DType::F16)?,
                    v: ctx.persistent("v_cache", &shape, DType::F16)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            spec,
            num_blocks,
            layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> KvCacheSpec {
        KvCacheSpec {
            num_layers: 48,
            kv_heads: 4,
            head_dim: 128,
            block_size: 16,
        }
    }

    #[test]
    fn blocks_follow_the_budget() {
        let budget = KvBudget {
            memory_bytes: 80 << 30,
            utilization: 0.9,
            weights_bytes: 61 << 30,
            activation_bytes: 1 << 30,
        };
        // 72 GiB usable - 62 GiB = 10 GiB; a block is 48 * 2 * 4 * 16 * 128 * 2 = 1.5 MiB.
        let blocks = plan_num_blocks(&spec(), &budget, 2048, 2 << 30).unwrap();
        let free = (80u64 << 30) as f64 * 0.9 - (62u64 << 30) as f64;
        assert_eq!(blocks, (free as u64 / spec().bytes_per_block()) as usize);
    }

    #[test]
    fn too_small_a_budget_names_the_fix() {
        let budget = KvBudget {
            memory_bytes: 64 << 30,
            utilization: 0.5,
            weights_bytes: 31 << 30,
            activation_bytes: 1 << 30,
        };
        let e = plan_num_blocks(&spec(), &budget, 32768, 2 << 30)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_model_len=32768") && e.contains("gpu_memory_utilization"),
            "{e}"
        );
        let bad = KvBudget {
            utilization: 1.5,
            ..budget
        };
        assert!(plan_num_blocks(&spec(), &bad, 16, 2 << 30).is_err());
    }

    #[test]
    fn one_binding_caps_a_layer() {
        let budget = KvBudget {
            memory_bytes: 1 << 40,
            utilization: 0.9,
            weights_bytes: 0,
            activation_bytes: 0,
        };
        let blocks = plan_num_blocks(&spec(), &budget, 16, 128 << 20).unwrap();
        assert_eq!(blocks, (128 << 20) / spec().layer_bytes(1) as usize);
    }
}
