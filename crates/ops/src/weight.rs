//! Weight matrices `[N, K]` (Hugging Face layout). A matrix larger than one storage binding
//! (128 MiB on lavapipe; a 151936 x 2048 f16 lm_head is 622 MB) is split by rows into chunks,
//! each its own buffer, and kernels run once per chunk with the chunk's row offset.

use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{shape_err, OpsError, Result};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct WeightChunk {
    pub row_start: usize,
    pub rows: usize,
    pub tensor: Tensor,
}

#[derive(Clone, Debug)]
pub struct Weight {
    pub n: usize,
    pub k: usize,
    pub dtype: DType,
    pub chunks: Vec<WeightChunk>,
}

impl Weight {
    pub fn nbytes(&self) -> u64 {
        (self.n * self.k * self.dtype.size()) as u64
    }

    /// Uploads `[n, k]` raw little-endian data of `dtype`.
    pub fn upload(
        ctx: &GpuContext,
        label: &str,
        n: usize,
        k: usize,
        dtype: DType,
        bytes: &[u8],
    ) -> Result<Weight> {
        Self::upload_chunked(ctx, label, n, k, dtype, bytes, ctx.max_binding_bytes())
    }

    /// Like `upload`, with chunks of at most `max_chunk_bytes` (tests use small values to
    /// exercise the split path on small shapes).
    pub fn upload_chunked(
        ctx: &GpuContext,
        label: &str,
        n: usize,
        k: usize,
        dtype: DType,
        bytes: &[u8],
        max_chunk_bytes: u64,
    ) -> Result<Weight> {
        Self::upload_grouped(ctx, label, n, k, dtype, bytes, 64, max_chunk_bytes)
    }

    /// Like `upload`, for a stack of `n / group_rows` matrices of `group_rows` rows each
    /// (experts): chunks hold whole groups, so a kernel finds each group in one binding
    /// (plain matrices use groups of 64 rows, so GEMM tiles never straddle chunks).
    #[allow(clippy::too_many_arguments)]
    pub fn upload_grouped(
        ctx: &GpuContext,
        label: &str,
        n: usize,
        k: usize,
        dtype: DType,
        bytes: &[u8],
        group_rows: usize,
        max_chunk_bytes: u64,
    ) -> Result<Weight> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(OpsError::DType {
                op: "weight upload",
                expected: "f32, f16 or bf16".into(),
                got: dtype.to_string(),
            });
        }
        let row_bytes = (k * dtype.size()) as u64;
        if bytes.len() as u64 != n as u64 * row_bytes {
            return Err(shape_err(
                "weight upload",
                format!("{label}: {} bytes for [{n}, {k}] {dtype}", bytes.len()),
            ));
        }
        let cap = max_chunk_bytes.min(ctx.max_binding_bytes());
        let rows_per_chunk = rows_per_chunk(label, n, row_bytes, cap, group_rows)?;
        let mut chunks = Vec::new();
        let mut row_start = 0;
        while row_start < n {
            let rows = rows_per_chunk.min(n - row_start);
            let tensor = ctx.persistent(label, &[rows, k], dtype)?;
            let lo = row_start * row_bytes as usize;
            let hi = lo + rows * row_bytes as usize;
            tensor.write_bytes(ctx, &bytes[lo..hi])?;
            chunks.push(WeightChunk {
                row_start,
                rows,
                tensor,
            });
            row_start += rows;
        }
        Ok(Weight {
            n,
            k,
            dtype,
            chunks,
        })
    }

    pub fn upload_f32(
        ctx: &GpuContext,
        label: &str,
        n: usize,
        k: usize,
        dtype: DType,
        values: &[f32],
    ) -> Result<Weight> {
        Self::upload(ctx, label, n, k, dtype, &dtype.encode_f32(values))
    }
}

impl Weight {
    /// `[n, k]` random weights uniform in [-scale, scale), generated on the GPU (dummy
    /// weights for benchmarks; the step is submitted here).
    pub fn random(
        ctx: &GpuContext,
        label: &str,
        n: usize,
        k: usize,
        dtype: DType,
        scale: f32,
        seed: u32,
    ) -> Result<Weight> {
        Self::random_grouped(ctx, label, n, k, dtype, scale, seed, 64)
    }

    /// `random` for a stack of matrices of `group_rows` rows each (see `upload_grouped`).
    #[allow(clippy::too_many_arguments)]
    pub fn random_grouped(
        ctx: &GpuContext,
        label: &str,
        n: usize,
        k: usize,
        dtype: DType,
        scale: f32,
        seed: u32,
        align: usize,
    ) -> Result<Weight> {
        let row_bytes = (k * dtype.size()) as u64;
        if !row_bytes.is_multiple_of(4) {
            return Err(shape_err(
                "random weight",
                format!("{label}: rows of {row_bytes} bytes"),
            ));
        }
        let rows_per_chunk = rows_per_chunk(label, n, row_bytes, ctx.max_binding_bytes(), align)?;
        let mut chunks = Vec::new();
        let mut step = crate::recorder::Step::new(ctx);
        let mut row_start = 0;
        while row_start < n {
            let rows = rows_per_chunk.min(n - row_start);
            let tensor = ctx.persistent(label, &[rows, k], dtype)?;
            crate::kernels::fill::fill_uniform(
                &mut step,
                &tensor,
                scale,
                seed.wrapping_add(row_start as u32),
            )?;
            chunks.push(WeightChunk {
                row_start,
                rows,
                tensor,
            });
            row_start += rows;
        }
        step.submit()?;
        Ok(Weight {
            n,
            k,
            dtype,
            chunks,
        })
    }
}

/// Rows per chunk: whole multiples of `align` (64 for plain matrices, so GEMM tiles never
/// straddle chunks; an expert's row count for expert stacks) that fit `cap` bytes.
fn rows_per_chunk(label: &str, n: usize, row_bytes: u64, cap: u64, align: usize) -> Result<usize> {
    let fit = (cap / row_bytes.max(1)) as usize;
    if fit >= n {
        return Ok(n.max(1));
    }
    let rows = fit / align.max(1) * align.max(1);
    if rows == 0 {
        return Err(OpsError::TooLarge {
            what: format!("{} rows of {label}", align.max(1)),
            needed: row_bytes * align.max(1) as u64,
            limit: cap,
            hint: "this GPU's storage bindings are too small for one block of this weight",
        });
    }
    Ok(rows)
}
