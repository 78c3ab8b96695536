use half::{bf16, f16};

/// Element types of GPU tensors. WGSL has no bf16, so bf16 data stays as raw bf16 bits and
/// kernels widen it with a shift; f16 is read packed (`unpack2x16float`) for bandwidth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    U32,
    I32,
}

impl DType {
    pub const fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::U32 | DType::I32 => 4,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
            DType::I32 => "i32",
        }
    }

    /// A floating-point dtype by the names vLLM and PyTorch use ("float16", "f16", "half",
    /// "bfloat16", "bf16", "float32", "f32", "float").
    pub fn parse_float(name: &str) -> Option<DType> {
        match name {
            "float16" | "f16" | "half" => Some(DType::F16),
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float32" | "f32" | "float" => Some(DType::F32),
            _ => None,
        }
    }

    pub const fn is_half(self) -> bool {
        matches!(self, DType::F16 | DType::BF16)
    }

    /// The code kernels branch on (`W_DTYPE` in WGSL): 0 = f32, 1 = f16, 2 = bf16.
    pub(crate) const fn float_code(self) -> u32 {
        match self {
            DType::F16 => 1,
            DType::BF16 => 2,
            _ => 0,
        }
    }

    /// Encodes f32 values into this dtype's little-endian bytes.
    pub fn encode_f32(self, values: &[f32]) -> Vec<u8> {
        match self {
            DType::F32 => bytemuck::cast_slice(values).to_vec(),
            DType::F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
            DType::BF16 => values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
            DType::U32 => values
                .iter()
                .flat_map(|v| (*v as u32).to_le_bytes())
                .collect(),
            DType::I32 => values
                .iter()
                .flat_map(|v| (*v as i32).to_le_bytes())
                .collect(),
        }
    }

    /// Decodes little-endian bytes of this dtype into f32 values.
    pub fn decode_f32(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::U32 => bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
            DType::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
        }
    }

    /// Rounds f32 values through this dtype, which is what a kernel that reads them sees.
    pub fn round_trip(self, values: &[f32]) -> Vec<f32> {
        self.decode_f32(&self.encode_f32(values))
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
