//! Bind groups kept from one step to the next. A decode step binds the same buffers in the
//! same order as the step two before it (weights, the KV cache, and pooled activations:
//! the pool hands out the earliest-created free buffer of a size, `BufferPool::take`), so
//! once warm each dispatch finds its bind group here instead of having wgpu validate and
//! build one (and destroy it once the GPU is done): on the host, creating bind groups was
//! most of recording a step.
//!
//! A cached bind group holds its buffers alive. Pooled buffers are never freed anyway (the
//! pool keeps them), but weights and caches are: dropping any persistent buffer clears the
//! cache, so a dropped model's memory is not held here. The cache is also cleared when it
//! reaches `CAPACITY` entries (prefills of ever-new shapes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::tensor::Tensor;

/// Most bind groups kept (a Qwen3-30B-A3B decode step has ~300 dispatches, and steps
/// alternate between two sets of pooled buffers).
const CAPACITY: usize = 8192;

#[derive(PartialEq, Eq, Hash)]
struct Key {
    /// The pipeline (its address: pipelines live as long as the context's cache).
    pipeline: usize,
    /// (binding, buffer, offset, size) of each entry.
    entries: Vec<(u32, wgpu::Buffer, u64, u64)>,
}

#[derive(Default)]
pub(crate) struct BindGroupCache {
    map: Mutex<HashMap<Key, wgpu::BindGroup>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl BindGroupCache {
    /// The bind group of `bindings` for group 0 of `pipeline`, made on first use.
    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        pipeline: &Arc<wgpu::ComputePipeline>,
        label: &str,
        bindings: &[(u32, &Tensor)],
    ) -> wgpu::BindGroup {
        let key = Key {
            pipeline: Arc::as_ptr(pipeline) as usize,
            entries: bindings
                .iter()
                .map(|(i, t)| {
                    let (offset, size) = t.binding_range();
                    (*i, t.buffer().clone(), offset, size)
                })
                .collect(),
        };
        // (A poisoned lock only means another thread panicked mid-insert: start afresh.)
        let mut map = self.map.lock().unwrap_or_else(|p| {
            let mut m = p.into_inner();
            m.clear();
            m
        });
        if let Some(bg) = map.get(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return bg.clone();
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let entries: Vec<wgpu::BindGroupEntry> = bindings
            .iter()
            .map(|(i, t)| wgpu::BindGroupEntry {
                binding: *i,
                resource: t.binding(),
            })
            .collect();
        let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        if map.len() >= CAPACITY {
            map.clear();
        }
        map.insert(key, bg.clone());
        bg
    }

    /// (hits, misses) so far.
    pub(crate) fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Forgets every bind group (a persistent buffer is going away).
    pub(crate) fn clear(&self) {
        if let Ok(mut map) = self.map.lock() {
            map.clear();
        }
    }
}
