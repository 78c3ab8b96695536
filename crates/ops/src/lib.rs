//! The ops layer of vllm-apple: GPU context, tensors, the step recorder and our WGSL
//! kernels, each with a plain-Rust reference. Kernels run on Metal (macOS), Vulkan
//! (Linux/Windows GPUs) and lavapipe (CPU, for CI) through wgpu.

mod bind_cache;
pub mod context;
pub mod dtype;
pub mod error;
pub mod kernels;
pub mod kv_cache;
pub mod pipeline;
pub mod recorder;
pub mod tensor;
pub mod weight;

pub use context::{ContextOptions, CoopShape, GpuContext};
pub use dtype::DType;
pub use error::{OpsError, Result};
pub use pipeline::Kernel;
pub use recorder::Step;
pub use tensor::Tensor;
pub use weight::Weight;
/// A queue submission, for waiting on one step's results (`recorder::Readback::read`).
pub use wgpu::SubmissionIndex;
