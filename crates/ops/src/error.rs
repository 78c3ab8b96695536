use thiserror::Error;

/// Everything that can go wrong below the model layer. Messages name the cause and the fix,
/// because they end up in front of users (`vllm-apple env`, server start-up).
#[derive(Debug, Error)]
pub enum OpsError {
    #[error("no usable GPU adapter was found ({detail}). {hint}")]
    NoAdapter { detail: String, hint: &'static str },

    #[error("the GPU adapter '{adapter}' lacks required feature(s) {missing}. {hint}")]
    MissingFeatures {
        adapter: String,
        missing: String,
        hint: &'static str,
    },

    #[error("could not open the GPU device: {0}")]
    RequestDevice(String),

    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },

    #[error("dtype mismatch in {op}: expected {expected}, got {got}")]
    DType {
        op: &'static str,
        expected: String,
        got: String,
    },

    #[error("{what} needs {needed} bytes, more than this GPU allows ({limit} bytes); {hint}")]
    TooLarge {
        what: String,
        needed: u64,
        limit: u64,
        hint: &'static str,
    },

    #[error("kernel '{kernel}' failed to compile: {message}")]
    Shader { kernel: String, message: String },

    #[error("{0}")]
    KvCache(String),

    #[error("invalid setting: {0}")]
    Config(String),

    #[error("GPU error: {0}")]
    Gpu(String),
}

pub type Result<T, E = OpsError> = std::result::Result<T, E>;

pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> OpsError {
    OpsError::Shape {
        op,
        detail: detail.into(),
    }
}
