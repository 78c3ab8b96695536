//! The step recorder: kernel dispatches of one engine step encoded into a single compute
//! pass of a single command buffer, submitted once. wgpu inserts the barriers between
//! dependent dispatches; nothing here waits on the GPU until the caller asks.
//!
//! A step keeps a handle on every tensor it binds until the GPU has finished it, so a
//! pooled buffer dropped by its owner right after `submit` (or a launcher's scratch) can
//! never be handed to someone else while the GPU still reads or writes it.

use crate::context::GpuContext;
use crate::error::{OpsError, Result};
use crate::pipeline::Kernel;
use crate::tensor::Tensor;

pub struct Step<'c> {
    pub ctx: &'c GpuContext,
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    dispatches: usize,
    keep: Vec<Tensor>,
    profile: Option<Profile>,
    /// `flush` submits (false: the step stays one submission; see `hold_parts`).
    flushes: bool,
}

/// Per-dispatch GPU timestamps of a profiled step.
struct Profile {
    queries: wgpu::QuerySet,
    /// One label per timestamp; the first marks the start.
    labels: Vec<String>,
    capacity: u32,
}

/// A short label of a kernel variant: entry point and prelude constants.
fn profile_label(k: &Kernel) -> String {
    let mut s = k.entry.to_string();
    for (n, v) in &k.consts {
        let v = match v {
            crate::pipeline::ConstVal::U32(x) => x.to_string(),
            crate::pipeline::ConstVal::Bool(b) => b.to_string(),
        };
        s.push_str(&format!(" {n}={v}"));
    }
    s
}

/// Splits a 1-D workgroup count over x and y when it exceeds the per-dimension limit;
/// kernels recover the flat index with `flat_group`.
pub fn grid(ctx: &GpuContext, groups: usize) -> [u32; 3] {
    let max = ctx.limits.max_compute_workgroups_per_dimension as usize;
    if groups <= max {
        [groups.max(1) as u32, 1, 1]
    } else {
        let y = groups.div_ceil(max);
        [groups.div_ceil(y) as u32, y as u32, 1]
    }
}

impl<'c> Step<'c> {
    pub fn new(ctx: &'c GpuContext) -> Self {
        let encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            });
        Step {
            ctx,
            encoder: Some(encoder),
            pass: None,
            dispatches: 0,
            keep: Vec::new(),
            profile: None,
            flushes: true,
        }
    }

    /// Makes `flush` a no-op: the step is submitted whole. For a caller that records this
    /// step while the GPU still runs the previous one (a pipelined decode), where the
    /// early start buys nothing and every extra submission costs GPU time between parts.
    pub fn hold_parts(&mut self) {
        self.flushes = false;
    }

    /// A step that writes a GPU timestamp after each of its first `capacity` dispatches, for
    /// per-kernel profiles (`finish_profile`; capacity 0: only the whole step's span);
    /// needs TIMESTAMP_QUERY_INSIDE_PASSES.
    pub fn profiled(ctx: &'c GpuContext, capacity: u32) -> Result<Self> {
        if !ctx
            .features
            .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
        {
            return Err(OpsError::Config(
                "this adapter cannot write timestamps inside compute passes".into(),
            ));
        }
        // wgpu's limit on one query set.
        let capacity = capacity.min(4094);
        let mut step = Step::new(ctx);
        let queries = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: capacity + 2,
        });
        step.pass()?.write_timestamp(&queries, 0);
        step.profile = Some(Profile {
            queries,
            labels: vec!["start".into()],
            capacity,
        });
        Ok(step)
    }

    /// Submits a profiled step, waits, and returns each dispatch's label and GPU seconds
    /// (from the previous timestamp to its own, so barriers count to the later dispatch),
    /// then "end": from the last timestamp to the end of the step.
    pub fn finish_profile(mut self) -> Result<Vec<(String, f64)>> {
        let ctx = self.ctx;
        let mut p = self
            .profile
            .take()
            .ok_or_else(|| OpsError::Config("step is not profiled".into()))?;
        self.pass()?
            .write_timestamp(&p.queries, p.labels.len() as u32);
        p.labels.push("end".into());
        let n = p.labels.len() as u32;
        self.pass = None;
        let ticks = read_timestamps(ctx, &mut self, &p.queries, n)?;
        let period = ctx.queue.get_timestamp_period() as f64 * 1e-9;
        Ok(p.labels
            .into_iter()
            .skip(1)
            .zip(ticks.windows(2))
            .map(|(l, w)| (l, w[1].saturating_sub(w[0]) as f64 * period))
            .collect())
    }

    /// Dispatches recorded so far.
    pub fn dispatch_count(&self) -> usize {
        self.dispatches
    }

    fn encoder(&mut self) -> Result<&mut wgpu::CommandEncoder> {
        self.pass = None;
        self.encoder
            .as_mut()
            .ok_or_else(|| OpsError::Gpu("step already finished".into()))
    }

    fn open_pass(&mut self, timestamps: Option<wgpu::ComputePassTimestampWrites>) -> Result<()> {
        self.pass = None;
        let enc = self
            .encoder
            .as_mut()
            .ok_or_else(|| OpsError::Gpu("step already finished".into()))?;
        let pass = enc
            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("step"),
                timestamp_writes: timestamps,
            })
            .forget_lifetime();
        self.pass = Some(pass);
        Ok(())
    }

    fn pass(&mut self) -> Result<&mut wgpu::ComputePass<'static>> {
        if self.pass.is_none() {
            self.open_pass(None)?;
        }
        self.pass
            .as_mut()
            .ok_or_else(|| OpsError::Gpu("no compute pass".into()))
    }

    /// Ends the current compute pass and opens one whose start and end are written to
    /// `queries[index]` and `queries[index + 1]` (benchmarks; needs TIMESTAMP_QUERY).
    pub fn begin_timed_pass(&mut self, queries: &wgpu::QuerySet, index: u32) -> Result<()> {
        self.open_pass(Some(wgpu::ComputePassTimestampWrites {
            query_set: queries,
            beginning_of_pass_write_index: Some(index),
            end_of_pass_write_index: Some(index + 1),
        }))
    }

    /// Closes the current compute pass (the next dispatch opens a fresh, untimed one).
    pub fn end_pass(&mut self) {
        self.pass = None;
    }

    /// Records one dispatch: storage bindings in order at group 0, parameters as immediates.
    pub fn dispatch(
        &mut self,
        kernel: &Kernel,
        bindings: &[&Tensor],
        params: &[u32],
        groups: [u32; 3],
    ) -> Result<()> {
        let numbered: Vec<(u32, &Tensor)> = bindings
            .iter()
            .enumerate()
            .map(|(i, t)| (i as u32, *t))
            .collect();
        self.dispatch_at(kernel, &numbered, params, groups)
    }

    /// Like `dispatch`, with explicit binding numbers (entry points that share a module
    /// but use different subsets of its bindings).
    pub fn dispatch_at(
        &mut self,
        kernel: &Kernel,
        bindings: &[(u32, &Tensor)],
        params: &[u32],
        groups: [u32; 3],
    ) -> Result<()> {
        let limit = self.ctx.max_binding_bytes();
        if let Some((_, t)) = bindings.iter().find(|(_, t)| t.nbytes() > limit) {
            return Err(OpsError::TooLarge {
                what: format!(
                    "a {:?} {} binding of {}",
                    t.shape(),
                    t.dtype(),
                    kernel.entry
                ),
                needed: t.nbytes(),
                limit,
                hint: "split the work (smaller batch or chunk) so each buffer fits one binding",
            });
        }
        let pipeline = self.ctx.pipeline(kernel)?;
        let bind_group =
            self.ctx
                .bind_groups
                .get(&self.ctx.device, &pipeline, kernel.entry, bindings);
        let pass = self.pass()?;
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        if !params.is_empty() {
            pass.set_immediates(0, bytemuck::cast_slice(params));
        }
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        if let (Some(pass), Some(p)) = (self.pass.as_mut(), self.profile.as_mut()) {
            if (p.labels.len() as u32) <= p.capacity {
                pass.write_timestamp(&p.queries, p.labels.len() as u32);
                p.labels.push(profile_label(kernel));
            }
        }
        self.dispatches += 1;
        self.keep.extend(bindings.iter().map(|(_, t)| (*t).clone()));
        Ok(())
    }

    /// Buffer-to-buffer copy (ends the current compute pass).
    pub fn copy(&mut self, src: &Tensor, dst: &Tensor) -> Result<()> {
        if src.nbytes() != dst.nbytes() {
            return Err(crate::error::shape_err(
                "copy",
                format!("{} bytes into {}", src.nbytes(), dst.nbytes()),
            ));
        }
        let size = src.nbytes().next_multiple_of(4);
        self.encoder()?.copy_buffer_to_buffer(
            src.buffer(),
            src.offset(),
            dst.buffer(),
            dst.offset(),
            size,
        );
        self.keep.push(src.clone());
        self.keep.push(dst.clone());
        Ok(())
    }

    /// Access to the raw encoder for timestamp queries and other one-off commands.
    pub fn raw_encoder(&mut self) -> Result<&mut wgpu::CommandEncoder> {
        self.encoder()
    }

    /// Submits what is recorded so far and waits for it, then goes on recording into a new
    /// command buffer (the `VLLM_METAL_FUSED_KV=0` path: KV written and complete before
    /// attention reads it).
    pub fn sync(&mut self) -> Result<()> {
        self.submit_part()?;
        self.ctx.wait_idle()
    }

    /// Submits what is recorded so far without waiting and goes on recording into a new
    /// command buffer, so the GPU starts on the first part of a long step while the host
    /// records the rest (the queue keeps the order). A profiled step stays one submission.
    pub fn flush(&mut self) -> Result<()> {
        if self.profile.is_some() || !self.flushes {
            return Ok(());
        }
        self.submit_part()
    }

    fn submit_part(&mut self) -> Result<()> {
        self.pass = None;
        let enc = self
            .encoder
            .replace(
                self.ctx
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("step"),
                    }),
            )
            .ok_or_else(|| OpsError::Gpu("step already finished".into()))?;
        self.ctx.queue.submit([enc.finish()]);
        let keep = std::mem::take(&mut self.keep);
        self.ctx.queue.on_submitted_work_done(move || drop(keep));
        Ok(())
    }

    /// Submits the step; returns without waiting.
    pub fn submit(mut self) -> Result<wgpu::SubmissionIndex> {
        self.pass = None;
        let enc = self
            .encoder
            .take()
            .ok_or_else(|| OpsError::Gpu("step already finished".into()))?;
        let idx = self.ctx.queue.submit([enc.finish()]);
        let keep = std::mem::take(&mut self.keep);
        self.ctx.queue.on_submitted_work_done(move || drop(keep));
        self.ctx.take_gpu_error()?;
        Ok(idx)
    }

    /// Records a copy of `t` into a new host-readable buffer at this point of the step, to
    /// be read after the step's submission completes (`Readback::read`), without waiting
    /// for later submissions.
    pub fn readback(&mut self, t: &Tensor) -> Result<Readback> {
        let rb = Readback::new(self.ctx, t.nbytes() as usize);
        self.readback_into(t, &rb)?;
        Ok(rb)
    }

    /// `readback` into an existing buffer (read, hence unmapped, since its last use), so a
    /// loop can reuse a few instead of creating one per step.
    pub fn readback_into(&mut self, t: &Tensor, rb: &Readback) -> Result<()> {
        if t.nbytes() as usize != rb.len {
            return Err(OpsError::Config(format!(
                "readback of {} bytes into a buffer of {}",
                t.nbytes(),
                rb.len
            )));
        }
        let size = t.nbytes().next_multiple_of(4);
        let offset = t.offset();
        let src = t.buffer().clone();
        self.encoder()?
            .copy_buffer_to_buffer(&src, offset, &rb.buffer, 0, size);
        self.keep.push(t.clone());
        Ok(())
    }

    /// Submits and waits for completion, surfacing any GPU validation error.
    pub fn submit_and_wait(self) -> Result<()> {
        let ctx = self.ctx;
        self.submit()?;
        ctx.wait_idle()
    }
}

/// GPU start and end of a run of steps (a decode), two timestamps per step: how long the
/// GPU spent inside steps and between them, whatever the host did meanwhile.
pub struct StepTimeline {
    queries: wgpu::QuerySet,
    capacity: u32,
    used: std::cell::Cell<u32>,
}

/// What a `StepTimeline` saw: the steps timed, the GPU time inside them, and the span from
/// the first one's start to the last one's end (the rest of it between steps).
#[derive(Clone, Copy, Debug)]
pub struct TimelineSpans {
    pub steps: usize,
    pub busy_seconds: f64,
    pub span_seconds: f64,
}

impl StepTimeline {
    /// Room for `steps` steps; None where the device has no timestamp queries.
    pub fn new(ctx: &GpuContext, steps: usize) -> Option<StepTimeline> {
        let capacity = (2 * steps).min(wgpu::QUERY_SET_MAX_QUERIES as usize) as u32;
        (ctx.has_timestamps() && capacity >= 2).then(|| StepTimeline {
            queries: ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("step timeline"),
                ty: wgpu::QueryType::Timestamp,
                count: capacity,
            }),
            capacity,
            used: std::cell::Cell::new(0),
        })
    }

    /// Times `step` (before anything is recorded into it), which then goes in one
    /// submission (`Step::hold_parts`: its pass must span the whole step). Past the
    /// capacity, steps go untimed.
    pub fn time(&self, step: &mut Step) -> Result<()> {
        let i = self.used.get();
        if i + 2 > self.capacity {
            return Ok(());
        }
        self.used.set(i + 2);
        step.hold_parts();
        step.begin_timed_pass(&self.queries, i)
    }

    /// Reads the timestamps back once every timed step has been submitted.
    pub fn finish(&self, ctx: &GpuContext) -> Result<Option<TimelineSpans>> {
        let n = self.used.get();
        if n < 2 {
            return Ok(None);
        }
        let mut step = Step::new(ctx);
        let ticks = read_timestamps(ctx, &mut step, &self.queries, n)?;
        let period = ctx.queue.get_timestamp_period() as f64 * 1e-9;
        let busy: u64 = ticks
            .chunks_exact(2)
            .map(|p| p[1].saturating_sub(p[0]))
            .sum();
        Ok(Some(TimelineSpans {
            steps: (n / 2) as usize,
            busy_seconds: busy as f64 * period,
            span_seconds: ticks[n as usize - 1].saturating_sub(ticks[0]) as f64 * period,
        }))
    }
}

/// Resolves `n` timestamps of `queries` at the end of `step`, submits it, waits, and returns
/// the raw ticks (multiply by the queue's timestamp period for nanoseconds).
pub fn read_timestamps(
    ctx: &GpuContext,
    step: &mut Step,
    queries: &wgpu::QuerySet,
    n: u32,
) -> Result<Vec<u64>> {
    let bytes = 8 * n as u64;
    let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("timestamps-resolve"),
        size: bytes,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let read = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("timestamps-read"),
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let enc = step.raw_encoder()?;
    enc.resolve_query_set(queries, 0..n, &resolve, 0);
    enc.copy_buffer_to_buffer(&resolve, 0, &read, 0, bytes);
    step.sync()?;
    let ticks = crate::tensor::read_mapped(ctx, &read)?
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    Ok(ticks)
}

/// A copy of a tensor recorded by `Step::readback`.
pub struct Readback {
    buffer: wgpu::Buffer,
    len: usize,
}

impl Readback {
    /// A host-readable buffer for `len` bytes.
    pub fn new(ctx: &GpuContext, len: usize) -> Readback {
        let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: (len as u64).next_multiple_of(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Readback { buffer, len }
    }

    /// Bytes it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, once submission `idx` (the step that recorded the copy) has completed;
    /// later submissions may still be running. The buffer is unmapped again after.
    pub fn read(&self, ctx: &GpuContext, idx: wgpu::SubmissionIndex) -> Result<Vec<u8>> {
        let mut out = crate::tensor::read_mapped_after(ctx, &self.buffer, idx)?;
        out.truncate(self.len);
        Ok(out)
    }
}
