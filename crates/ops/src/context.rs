//! The GPU context: adapter choice, required and optional features, limits, and the
//! pipeline cache. One per process; everything else borrows it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::bind_cache::BindGroupCache;
use crate::dtype::DType;
use crate::error::{OpsError, Result};
use crate::pipeline::{Kernel, PipelineCache};
use crate::tensor::{BufferPool, Tensor};

/// Features every kernel relies on. Immediates carry per-dispatch parameters so that no
/// uniform buffer is written per dispatch.
pub const REQUIRED_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::IMMEDIATES);

/// Bytes of immediate data a kernel may use; Vulkan guarantees 128.
pub const IMMEDIATE_BYTES: u32 = 128;

#[cfg(target_os = "macos")]
const INSTALL_HINT: &str =
    "vllm-apple needs macOS 13 or newer on an Apple7+ GPU (M1 or later) with Metal.";
#[cfg(not(target_os = "macos"))]
const INSTALL_HINT: &str = "Install a Vulkan driver: on Debian/Ubuntu `apt-get install -y libvulkan1 mesa-vulkan-drivers` (lavapipe runs on the CPU), or your GPU vendor's driver; set WGPU_BACKEND=vulkan.";

/// The cooperative-matrix shape the coop GEMM uses: f16 A/B with f32 accumulators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopShape {
    pub m: u32,
    pub n: u32,
    pub k: u32,
}

#[derive(Clone, Debug, Default)]
pub struct ContextOptions {
    /// Overrides `WGPU_BACKEND` (e.g. "vulkan", "metal").
    pub backend: Option<String>,
    /// Forbid the cooperative-matrix path even where offered (tests of the subgroup path).
    pub disable_coop_matrix: bool,
    /// Compile kernels with every runtime check wgpu offers (loop bounding, division
    /// guards), not only buffer bounds checks. Also `VLLM_APPLE_SHADER_CHECKS=full`.
    pub full_shader_checks: bool,
}

pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    /// Every f16-input / f32-accumulator cooperative-matrix shape the adapter offers.
    pub coop_shapes_offered: Vec<wgpu::CooperativeMatrixProperties>,
    /// The shape our coop GEMM will use, if any.
    pub coop: Option<CoopShape>,
    /// Memory the GPU can use, where the platform tells us: the largest device-local
    /// Vulkan heap, or the machine's RAM on Apple's unified memory.
    pub memory_bytes: Option<u64>,
    pub(crate) pipelines: PipelineCache,
    full_shader_checks: bool,
    pub(crate) pool: BufferPool,
    pub(crate) bind_groups: Arc<BindGroupCache>,
    dummy: OnceLock<Tensor>,
    gpu_error: Arc<Mutex<Option<String>>>,
}

fn backends_from(opts: &ContextOptions) -> wgpu::Backends {
    match &opts.backend {
        Some(name) => wgpu::Backends::from_comma_list(name),
        None => wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY),
    }
}

fn device_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

fn pick_coop(props: &[wgpu::CooperativeMatrixProperties]) -> Option<CoopShape> {
    use wgpu::CooperativeScalarType as S;
    props
        .iter()
        .filter(|p| p.ab_type == S::F16 && p.cr_type == S::F32)
        .filter(|p| p.m_size == p.n_size && p.n_size == p.k_size && matches!(p.m_size, 8 | 16))
        .max_by_key(|p| p.m_size)
        .map(|p| CoopShape {
            m: p.m_size,
            n: p.n_size,
            k: p.k_size,
        })
}

impl GpuContext {
    pub fn new(opts: &ContextOptions) -> Result<Arc<Self>> {
        let backends = backends_from(opts);
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends = backends;
        let instance = wgpu::Instance::new(desc);
        let adapters = pollster::block_on(instance.enumerate_adapters(backends));
        if adapters.is_empty() {
            return Err(OpsError::NoAdapter {
                detail: format!("wgpu found no adapter for backends {backends:?}"),
                hint: INSTALL_HINT,
            });
        }
        // Prefer a real GPU with every required feature; report the best one's gaps if none has them.
        let mut ranked: Vec<_> = adapters.into_iter().collect();
        ranked.sort_by_key(|a| device_rank(a.get_info().device_type));
        let usable = |a: &wgpu::Adapter| {
            a.features().contains(REQUIRED_FEATURES)
                && a.get_downlevel_capabilities()
                    .flags
                    .contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32)
        };
        let adapter = match ranked.iter().position(usable) {
            Some(i) => ranked.swap_remove(i),
            None => {
                let best = &ranked[0];
                let missing = REQUIRED_FEATURES - best.features();
                return Err(OpsError::MissingFeatures {
                    adapter: format!("{} ({:?})", best.get_info().name, best.get_info().backend),
                    missing: format!("{missing:?}"),
                    hint: INSTALL_HINT,
                });
            }
        };
        let info = adapter.get_info();
        let offered = adapter.features();
        let mut wanted = REQUIRED_FEATURES;
        for optional in [
            wgpu::Features::TIMESTAMP_QUERY,
            wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
            wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES,
            wgpu::Features::SUBGROUP_BARRIER,
        ] {
            if offered.contains(optional) {
                wanted |= optional;
            }
        }
        let coop_offered = !opts.disable_coop_matrix
            && offered.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        let coop_shapes_offered = if coop_offered {
            adapter.cooperative_matrix_properties()
        } else {
            Vec::new()
        };
        let coop = pick_coop(&coop_shapes_offered);
        if coop.is_some() {
            wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let memory_bytes = device_memory(&adapter);
        let limits = adapter.limits();
        if limits.max_immediate_size < IMMEDIATE_BYTES {
            return Err(OpsError::MissingFeatures {
                adapter: info.name.clone(),
                missing: format!(
                    "{IMMEDIATE_BYTES} bytes of immediate data (offers {})",
                    limits.max_immediate_size
                ),
                hint: INSTALL_HINT,
            });
        }
        let device_desc = wgpu::DeviceDescriptor {
            label: Some("vllm-apple"),
            required_features: wanted,
            required_limits: limits.clone(),
            // SAFETY: the only experimental feature we enable is cooperative matrices, used by
            // one kernel that is checked against the CPU reference wherever it is enabled.
            experimental_features: if coop.is_some() {
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&device_desc))
            .map_err(|e| OpsError::RequestDevice(e.to_string()))?;
        let gpu_error = Arc::new(Mutex::new(None::<String>));
        let sink = gpu_error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::error!("uncaptured GPU error: {e}");
            if let Ok(mut slot) = sink.lock() {
                slot.get_or_insert_with(|| e.to_string());
            }
        }));
        tracing::info!(
            adapter = %info.name,
            backend = ?info.backend,
            subgroup = ?(info.subgroup_min_size, info.subgroup_max_size),
            coop = ?coop,
            "GPU context ready"
        );
        Ok(Arc::new(GpuContext {
            device,
            queue,
            info,
            features: wanted,
            limits,
            coop_shapes_offered,
            coop,
            memory_bytes,
            pipelines: PipelineCache::default(),
            full_shader_checks: opts.full_shader_checks
                || std::env::var("VLLM_APPLE_SHADER_CHECKS").is_ok_and(|v| v == "full"),
            pool: BufferPool::default(),
            bind_groups: Arc::default(),
            dummy: OnceLock::new(),
            gpu_error,
        }))
    }

    /// The largest storage binding a kernel can see, also capped by the largest buffer.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// A small buffer bound where a kernel variant ignores a binding (e.g. no q/k norm).
    pub fn dummy(&self) -> Result<&Tensor> {
        if let Some(t) = self.dummy.get() {
            return Ok(t);
        }
        let t = self.persistent("dummy", &[4], DType::F32)?;
        Ok(self.dummy.get_or_init(|| t))
    }

    /// True where the adapter runs subgroups of exactly `n` invocations.
    pub fn subgroup_is(&self, n: u32) -> bool {
        self.info.subgroup_min_size == n && self.info.subgroup_max_size == n
    }

    /// Whether `subgroupBarrier()` orders workgroup memory between a subgroup's invocations
    /// here. On Metal naga emits `simdgroup_barrier(mem_threadgroup)`, which does. On
    /// Vulkan naga's barrier carries subgroup scope but only SubgroupMemory semantics, which
    /// the Vulkan memory model ignores: NVIDIA's driver still orders shared memory at a warp
    /// barrier (the kernels test checks it on the H100); other drivers are not trusted.
    pub fn subgroup_barrier_orders_shared(&self) -> bool {
        const NVIDIA: u32 = 0x10de;
        self.features.contains(wgpu::Features::SUBGROUP_BARRIER)
            && (self.info.backend == wgpu::Backend::Metal
                || (self.info.backend == wgpu::Backend::Vulkan && self.info.vendor == NVIDIA))
    }

    /// Bind-group cache lookups so far: (hits, misses).
    pub fn bind_group_stats(&self) -> (u64, u64) {
        self.bind_groups.stats()
    }

    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Returns (and clears) the first GPU validation error seen since the last check.
    pub fn take_gpu_error(&self) -> Result<()> {
        match self.gpu_error.lock().ok().and_then(|mut e| e.take()) {
            Some(msg) => Err(OpsError::Gpu(msg)),
            None => Ok(()),
        }
    }

    /// Waits for every submitted command buffer to finish.
    pub fn wait_idle(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| OpsError::Gpu(e.to_string()))?;
        self.take_gpu_error()
    }

    /// The compiled pipeline for a kernel variant; compiled on first use, then cached.
    pub fn pipeline(&self, kernel: &Kernel) -> Result<Arc<wgpu::ComputePipeline>> {
        self.pipelines
            .get_or_create(&self.device, kernel, self.full_shader_checks)
    }

    /// A human-readable description for `vllm-apple env`.
    pub fn describe(&self) -> Vec<(String, String)> {
        let l = &self.limits;
        let mut rows: Vec<(String, String)> = vec![
            ("adapter".into(), self.info.name.clone()),
            ("backend".into(), format!("{:?}", self.info.backend)),
            ("device type".into(), format!("{:?}", self.info.device_type)),
            (
                "driver".into(),
                format!("{} {}", self.info.driver, self.info.driver_info),
            ),
            (
                "subgroup size".into(),
                format!(
                    "{}..{}",
                    self.info.subgroup_min_size, self.info.subgroup_max_size
                ),
            ),
            ("features".into(), format!("{:?}", self.features)),
            (
                "memory".into(),
                match self.memory_bytes {
                    Some(b) => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
                    None => "unknown (set --gpu-memory-bytes)".into(),
                },
            ),
            (
                "cooperative matrix".into(),
                match self.coop {
                    Some(c) => format!(
                        "{}x{}x{} f16->f32 (offered: {})",
                        c.m,
                        c.n,
                        c.k,
                        self.coop_shapes_offered
                            .iter()
                            .map(|p| format!(
                                "{}x{}x{} {:?}->{:?}",
                                p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None => "not available (subgroup kernels only)".into(),
                },
            ),
        ];
        let mut lim: HashMap<&str, u64> = HashMap::new();
        lim.insert("max_buffer_size", l.max_buffer_size);
        lim.insert(
            "max_storage_buffer_binding_size",
            l.max_storage_buffer_binding_size,
        );
        lim.insert(
            "max_compute_workgroup_storage_size",
            l.max_compute_workgroup_storage_size as u64,
        );
        lim.insert(
            "max_compute_invocations_per_workgroup",
            l.max_compute_invocations_per_workgroup as u64,
        );
        lim.insert(
            "max_compute_workgroups_per_dimension",
            l.max_compute_workgroups_per_dimension as u64,
        );
        lim.insert(
            "max_storage_buffers_per_shader_stage",
            l.max_storage_buffers_per_shader_stage as u64,
        );
        lim.insert("max_immediate_size", l.max_immediate_size as u64);
        let mut keys: Vec<_> = lim.keys().copied().collect();
        keys.sort();
        for k in keys {
            rows.push((format!("limit {k}"), lim[k].to_string()));
        }
        rows
    }
}

/// The memory the adapter can use: the largest device-local heap on Vulkan, physical RAM on
/// macOS (Apple GPUs share it). `None` where neither applies.
fn device_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    #[cfg(target_os = "macos")]
    {
        let _ = adapter;
        let mut bytes: u64 = 0;
        let mut len = std::mem::size_of::<u64>();
        // SAFETY: sysctlbyname writes at most `len` bytes into `bytes`; the name is NUL-terminated.
        let rc = unsafe {
            libc::sysctlbyname(
                c"hw.memsize".as_ptr(),
                (&mut bytes as *mut u64).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        (rc == 0 && bytes > 0).then_some(bytes)
    }
    #[cfg(not(target_os = "macos"))]
    {
        // SAFETY: the hal adapter is only read, while `adapter` is alive and before any device
        // is created from it.
        unsafe {
            let hal = adapter.as_hal::<wgpu::hal::api::Vulkan>()?;
            let instance = hal.shared_instance().raw_instance();
            let props = instance.get_physical_device_memory_properties(hal.raw_physical_device());
            const DEVICE_LOCAL: u32 = 0x1; // VK_MEMORY_HEAP_DEVICE_LOCAL_BIT
            props
                .memory_heaps_as_slice()
                .iter()
                .filter(|h| h.flags.as_raw() & DEVICE_LOCAL != 0)
                .map(|h| h.size)
                .max()
        }
    }
}
