//! GPU tensors (a buffer, a byte offset, a shape and a dtype), their upload and download,
//! and the buffer pool that recycles activation buffers by size class.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::bind_cache::BindGroupCache;
use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{shape_err, OpsError, Result};

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Size classes: exact multiples of 256 B up to 64 KiB, then eight classes per power of two,
/// so a recycled buffer wastes at most 12.5%.
fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(16).next_multiple_of(256);
    if b <= 65536 {
        return b;
    }
    let p = 63 - b.leading_zeros() as u64; // floor(log2 b)
    let step = 1u64 << (p - 3);
    b.next_multiple_of(step)
}

/// Free buffers by size class, each class ordered by the buffers' creation serials.
#[derive(Default)]
struct FreeLists {
    classes: HashMap<u64, BTreeMap<u64, wgpu::Buffer>>,
    next_serial: u64,
}

#[derive(Default, Clone)]
pub struct BufferPool {
    free: Arc<Mutex<FreeLists>>,
}

impl BufferPool {
    /// The free buffer of the size class created first, else a new one. Which buffer a
    /// request gets then depends only on which buffers are free, not on the order they came
    /// back in (GPU completion callbacks): a decode step that allocates like the one two
    /// steps before gets the same buffers, so its bind groups can be reused.
    fn take(&self, device: &wgpu::Device, bytes: u64) -> PooledBuffer {
        let class = size_class(bytes);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((serial, buffer)) = free.classes.get_mut(&class).and_then(|c| c.pop_first()) {
            return PooledBuffer {
                buffer: Some(buffer),
                pool: Some(self.clone()),
                serial,
                bind_groups: None,
            };
        }
        let serial = free.next_serial;
        free.next_serial += 1;
        drop(free);
        PooledBuffer {
            buffer: Some(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("pooled"),
                size: class,
                usage: USAGE,
                mapped_at_creation: false,
            })),
            pool: Some(self.clone()),
            serial,
            bind_groups: None,
        }
    }
}

/// A buffer that returns to its pool when the last tensor using it is dropped.
pub struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    pool: Option<BufferPool>,
    /// Creation order within the pool.
    serial: u64,
    /// A persistent buffer's context bind-group cache, cleared when the buffer goes.
    bind_groups: Option<Arc<BindGroupCache>>,
}

impl PooledBuffer {
    fn raw(&self) -> &wgpu::Buffer {
        // Only `drop` takes the buffer out.
        self.buffer.as_ref().expect("buffer present until drop")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(cache) = &self.bind_groups {
            cache.clear();
        }
        if let (Some(buf), Some(pool)) = (self.buffer.take(), &self.pool) {
            if let Ok(mut f) = pool.free.lock() {
                f.classes
                    .entry(buf.size())
                    .or_default()
                    .insert(self.serial, buf);
            }
        }
    }
}

#[derive(Clone)]
pub struct Tensor {
    buf: Arc<PooledBuffer>,
    offset: u64,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, offset {})",
            self.shape, self.dtype, self.offset
        )
    }
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> u64 {
        (self.numel() * self.dtype.size()) as u64
    }

    /// Size of the dimension `i` counted from the end (`dim_back(0)` is the last); 1 past the
    /// first dimension, as broadcasting would have it.
    pub fn dim_back(&self, i: usize) -> usize {
        self.shape.iter().rev().nth(i).copied().unwrap_or(1)
    }

    /// Rows when seen as a matrix with the last dimension as columns.
    pub fn rows(&self) -> usize {
        self.numel() / self.shape.last().copied().unwrap_or(1).max(1)
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buf.raw()
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The binding kernels see. Sizes round up to 16 bytes where the buffer has room (all
    /// our buffers are padded), so vec4 views and odd half-precision counts bind cleanly.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        let (offset, size) = self.binding_range();
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buf.raw(),
            offset,
            size: wgpu::BufferSize::new(size),
        })
    }

    /// Offset and size of `binding`.
    pub fn binding_range(&self) -> (u64, u64) {
        let room = self.buf.raw().size() - self.offset;
        (
            self.offset,
            self.nbytes().next_multiple_of(16).min(room).max(4),
        )
    }

    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(shape_err(
                "reshape",
                format!(
                    "{:?} has {} elements, {shape:?} does not",
                    self.shape,
                    self.numel()
                ),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self.clone()
        })
    }

    /// Rows `[start, start + len)` of dimension 0, sharing the buffer. The byte offset must
    /// meet the device's storage-offset alignment (256 on most GPUs).
    pub fn narrow(&self, ctx: &GpuContext, start: usize, len: usize) -> Result<Tensor> {
        let d0 = *self
            .shape
            .first()
            .ok_or_else(|| shape_err("narrow", "scalar tensor"))?;
        if start + len > d0 {
            return Err(shape_err(
                "narrow",
                format!("rows {start}..{} of {d0}", start + len),
            ));
        }
        let row_bytes = (self.numel() / d0.max(1) * self.dtype.size()) as u64;
        let offset = self.offset + start as u64 * row_bytes;
        let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
        if !offset.is_multiple_of(align) {
            return Err(shape_err(
                "narrow",
                format!(
                    "byte offset {offset} is not a multiple of the device's {align}-byte alignment"
                ),
            ));
        }
        let mut shape = self.shape.clone();
        shape[0] = len;
        Ok(Tensor {
            buf: self.buf.clone(),
            offset,
            shape,
            dtype: self.dtype,
        })
    }

    /// Overwrites the tensor with a NaN pattern (0xFF bytes), so tests catch unwritten output.
    pub fn poison(&self, ctx: &GpuContext) {
        let n = self.nbytes().next_multiple_of(4) as usize;
        ctx.queue
            .write_buffer(self.buf.raw(), self.offset, &vec![0xFFu8; n]);
    }

    pub fn write_bytes(&self, ctx: &GpuContext, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 != self.nbytes() {
            return Err(shape_err(
                "write",
                format!("{} bytes into a tensor of {}", bytes.len(), self.nbytes()),
            ));
        }
        if bytes.len().is_multiple_of(4) {
            ctx.queue.write_buffer(self.buf.raw(), self.offset, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().next_multiple_of(4), 0);
            ctx.queue.write_buffer(self.buf.raw(), self.offset, &padded);
        }
        Ok(())
    }

    pub fn write_f32(&self, ctx: &GpuContext, values: &[f32]) -> Result<()> {
        self.write_bytes(ctx, &self.dtype.encode_f32(values))
    }

    pub fn write_u32(&self, ctx: &GpuContext, values: &[u32]) -> Result<()> {
        if !matches!(self.dtype, DType::U32 | DType::I32) {
            return Err(OpsError::DType {
                op: "write_u32",
                expected: "u32".into(),
                got: self.dtype.to_string(),
            });
        }
        self.write_bytes(ctx, bytemuck::cast_slice(values))
    }

    /// Copies the tensor back to the CPU (waits for the GPU).
    pub fn to_bytes(&self, ctx: &GpuContext) -> Result<Vec<u8>> {
        let size = self.nbytes().next_multiple_of(4);
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("download"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(self.buf.raw(), self.offset, &staging, 0, size);
        ctx.queue.submit([enc.finish()]);
        let mut out = read_mapped(ctx, &staging)?;
        out.truncate(self.nbytes() as usize);
        Ok(out)
    }

    pub fn to_f32_vec(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        Ok(self.dtype.decode_f32(&self.to_bytes(ctx)?))
    }

    pub fn to_u32_vec(&self, ctx: &GpuContext) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.to_bytes(ctx)?))
    }
}

impl GpuContext {
    fn check_size(&self, what: &str, bytes: u64) -> Result<()> {
        let limit = self.limits.max_buffer_size;
        if bytes > limit {
            return Err(OpsError::TooLarge {
                what: what.to_string(),
                needed: bytes,
                limit,
                hint: "split the tensor (weights are split automatically) or use a smaller batch",
            });
        }
        Ok(())
    }

    /// An uninitialised tensor from the buffer pool.
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = (shape.iter().product::<usize>() * dtype.size()) as u64;
        self.check_size("tensor", bytes)?;
        Ok(Tensor {
            buf: Arc::new(self.pool.take(&self.device, bytes)),
            offset: 0,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// A tensor in its own buffer, outside the pool (weights, caches: they live for the run).
    pub fn persistent(&self, label: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = (shape.iter().product::<usize>() * dtype.size()) as u64;
        self.check_size(label, bytes)?;
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16).next_multiple_of(16),
            usage: USAGE,
            mapped_at_creation: false,
        });
        Ok(Tensor {
            buf: Arc::new(PooledBuffer {
                buffer: Some(buffer),
                pool: None,
                serial: 0,
                bind_groups: Some(self.bind_groups.clone()),
            }),
            offset: 0,
            shape: shape.to_vec(),
            dtype,
        })
    }

    pub fn upload_f32(&self, shape: &[usize], dtype: DType, values: &[f32]) -> Result<Tensor> {
        if values.len() != shape.iter().product::<usize>() {
            return Err(shape_err(
                "upload",
                format!("{} values for shape {shape:?}", values.len()),
            ));
        }
        let t = self.empty(shape, dtype)?;
        t.write_f32(self, values)?;
        Ok(t)
    }

    /// Several small 32-bit arrays (`(shape, dtype, words)`) uploaded as one buffer with a
    /// single queue write, each returned as a view at an aligned offset. Every queue write
    /// costs wgpu a staging buffer, mapped and unmapped (kernel calls on NVIDIA's driver),
    /// so a step's metadata goes up in one. Only for arrays that kernels read: wgpu tracks
    /// usage per buffer, so a dispatch may not write one view and read another of it.
    pub fn upload_packed<const N: usize>(
        &self,
        parts: [(&[usize], DType, &[u32]); N],
    ) -> Result<[Tensor; N]> {
        let align = (self.limits.min_storage_buffer_offset_alignment as usize).max(16) / 4;
        let mut words: Vec<u32> = Vec::new();
        let mut offsets = [0usize; N];
        for ((shape, dtype, values), off) in parts.iter().zip(&mut offsets) {
            if dtype.size() != 4 || values.len() != shape.iter().product::<usize>() {
                return Err(shape_err(
                    "upload",
                    format!("{} 32-bit values for {dtype} {shape:?}", values.len()),
                ));
            }
            *off = words.len();
            words.extend_from_slice(values);
            // At least 16 bytes (the rounding of `binding`), up to the next aligned start.
            let end = words.len().max(*off + 4).next_multiple_of(align);
            words.resize(end, 0);
        }
        let all = self.empty(&[words.len()], DType::U32)?;
        all.write_u32(self, &words)?;
        Ok(std::array::from_fn(|i| Tensor {
            buf: all.buf.clone(),
            offset: all.offset + 4 * offsets[i] as u64,
            shape: parts[i].0.to_vec(),
            dtype: parts[i].1,
        }))
    }

    pub fn upload_u32(&self, shape: &[usize], values: &[u32]) -> Result<Tensor> {
        if values.len() != shape.iter().product::<usize>() {
            return Err(shape_err(
                "upload",
                format!("{} values for shape {shape:?}", values.len()),
            ));
        }
        let t = self.empty(shape, DType::U32)?;
        t.write_u32(self, values)?;
        Ok(t)
    }
}

/// Maps a `MAP_READ` buffer whose copy has been submitted, waits for the GPU, and returns
/// its bytes.
pub(crate) fn read_mapped(ctx: &GpuContext, buffer: &wgpu::Buffer) -> Result<Vec<u8>> {
    map_and_read(ctx, buffer, None)
}

/// `read_mapped` waiting only for submission `idx`.
pub(crate) fn read_mapped_after(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    idx: wgpu::SubmissionIndex,
) -> Result<Vec<u8>> {
    map_and_read(ctx, buffer, Some(idx))
}

fn map_and_read(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    idx: Option<wgpu::SubmissionIndex>,
) -> Result<Vec<u8>> {
    let slice = buffer.slice(..);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    match idx {
        None => ctx.wait_idle()?,
        Some(i) => {
            ctx.device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(i),
                    timeout: None,
                })
                .map_err(|e| OpsError::Gpu(e.to_string()))?;
            ctx.take_gpu_error()?;
        }
    }
    rx.recv()
        .map_err(|e| OpsError::Gpu(e.to_string()))?
        .map_err(|e| OpsError::Gpu(e.to_string()))?;
    let out = slice
        .get_mapped_range()
        .map_err(|e| OpsError::Gpu(e.to_string()))?
        .to_vec();
    buffer.unmap();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_and_bound_waste() {
        for b in [
            1u64,
            255,
            256,
            257,
            65536,
            65537,
            1 << 20,
            (1 << 20) + 1,
            622_329_856,
        ] {
            let c = size_class(b);
            assert!(c >= b, "{b} -> {c}");
            assert!(c.is_multiple_of(16));
            assert!(
                (c as f64) <= (b.max(256) as f64) * 1.125 + 256.0,
                "{b} -> {c}"
            );
        }
    }
}
