//! GGUF, llama.cpp's single-file model format: a header, typed metadata (architecture
//! hyper-parameters, tokenizer, chat template), tensor descriptors, then aligned tensor data.
//! The parser reads from a byte slice (the file is memory-mapped) and checks every length
//! and offset against what is there, so a truncated or corrupt file is an error naming the
//! problem, never a panic or an allocation the file cannot back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::dequant::{dequantize, DequantError, GgmlType};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 8;

#[derive(Debug, Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a GGUF file (magic {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    UnsupportedVersion(u32),
    #[error("GGUF file truncated: {what} at byte {offset} runs past the end ({len} bytes)")]
    Truncated {
        what: String,
        offset: usize,
        len: usize,
    },
    #[error("GGUF {what} is implausible: {value}")]
    Implausible { what: String, value: u64 },
    #[error("GGUF string at byte {0} is not UTF-8")]
    BadUtf8(usize),
    #[error("GGUF metadata value type {0} is unknown")]
    UnknownValueType(u32),
    #[error("tensor '{name}' has ggml type {id}, which vllm-apple cannot load (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K)")]
    UnsupportedTensorType { name: String, id: u32 },
    #[error("tensor '{name}' ({bytes} bytes at data offset {offset}) lies outside the file's data section")]
    TensorOutOfBounds {
        name: String,
        offset: u64,
        bytes: usize,
    },
    #[error("tensor '{0}' appears twice")]
    DuplicateTensor(String),
    #[error("tensor '{name}': {source}")]
    Tensor { name: String, source: DequantError },
    #[error("{path}: no tensor named '{name}'")]
    MissingTensor { path: String, name: String },
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any non-negative integer value as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value as i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor's descriptor. `dims` are in GGUF order, fastest-varying first: a linear
/// weight of Hugging Face shape `[n, k]` is `[k, n]` here.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub nbytes: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// The parsed header of a GGUF file.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Byte offset of the data section in the file.
    pub data_offset: usize,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos,
                len: self.buf.len(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// A count of items each at least `min_item` bytes long: checked against what is left,
    /// so a corrupt count cannot make us allocate more than the file could hold.
    fn count(&mut self, what: &str, min_item: usize) -> Result<usize> {
        let n = self.u64(what)?;
        if n > (self.remaining() / min_item.max(1)) as u64 {
            return Err(GgufError::Implausible {
                what: what.to_string(),
                value: n,
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let at = self.pos;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::BadUtf8(at))
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>("u8")?[0]),
            1 => Value::I8(self.array::<1>("i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array("u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.array("i16")?)),
            4 => Value::U32(self.u32("u32")?),
            5 => Value::I32(i32::from_le_bytes(self.array("i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.array("f32")?)),
            7 => Value::Bool(self.array::<1>("bool")?[0] != 0),
            8 => Value::String(self.string("string")?),
            9 => {
                if depth > 2 {
                    return Err(GgufError::Implausible {
                        what: "array nesting".into(),
                        value: depth as u64,
                    });
                }
                let elem = self.u32("array type")?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => return Err(GgufError::UnknownValueType(other)),
                };
                let n = self.count("array length", min)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(i64::from_le_bytes(self.array("i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.array("f64")?)),
            other => return Err(GgufError::UnknownValueType(other)),
        })
    }
}

/// Parses a whole GGUF file held in memory.
pub fn parse(buf: &[u8]) -> Result<Gguf> {
    let mut r = Reader { buf, pos: 0 };
    let magic: [u8; 4] = r.array("magic")?;
    if &magic != MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    // Smallest tensor descriptor: name length, n_dims, one dim, type, offset.
    let n_tensors = r.count("tensor count", 8 + 4 + 8 + 4 + 8)?;
    let n_kv = r.count("metadata count", 8 + 4)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let ty = r.u32("metadata type")?;
        let v = r.value(ty, 0)?;
        metadata.insert(key, v);
    }
    let mut infos = Vec::with_capacity(n_tensors);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let n_dims = r.u32("tensor dims")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::Implausible {
                what: format!("dimension count of tensor '{name}'"),
                value: n_dims as u64,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64("tensor dim")?);
        }
        let type_id = r.u32("tensor type")?;
        let offset = r.u64("tensor offset")?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedTensorType {
            name: name.clone(),
            id: type_id,
        })?;
        let numel = dims
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d))
            .filter(|n| *n <= usize::MAX as u64)
            .ok_or_else(|| GgufError::Implausible {
                what: format!("element count of tensor '{name}'"),
                value: u64::MAX,
            })?;
        let nbytes = ty
            .bytes_for(numel as usize)
            .map_err(|source| GgufError::Tensor {
                name: name.clone(),
                source,
            })?;
        if !seen.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor(name));
        }
        infos.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            nbytes,
        });
    }
    let alignment = metadata
        .get("general.alignment")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_ALIGNMENT);
    if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
        return Err(GgufError::Implausible {
            what: "general.alignment".into(),
            value: alignment,
        });
    }
    let data_offset = (r.pos as u64).next_multiple_of(alignment) as usize;
    let data_len = buf.len().saturating_sub(data_offset);
    for t in &infos {
        let end = t.offset.checked_add(t.nbytes as u64);
        if data_offset > buf.len()
            || end.is_none_or(|e| e > data_len as u64)
            || t.offset % alignment != 0
        {
            return Err(GgufError::TensorOutOfBounds {
                name: t.name.clone(),
                offset: t.offset,
                bytes: t.nbytes,
            });
        }
    }
    Ok(Gguf {
        version,
        metadata,
        tensors: infos,
        data_offset,
    })
}

impl Gguf {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// `general.architecture` (e.g. "llama", "qwen3", "qwen3moe").
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    pub gguf: Gguf,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process; a file truncated under
        // us by another process is outside what a model loader can defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let gguf = parse(&map)?;
        Ok(GgufFile { path, map, gguf })
    }

    /// The raw bytes of a tensor.
    pub fn tensor_data(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let t = self
            .gguf
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.display().to_string(),
                name: name.to_string(),
            })?;
        let start = self.gguf.data_offset + t.offset as usize;
        Ok((t, &self.map[start..start + t.nbytes]))
    }

    /// A tensor dequantized to f32, in GGUF element order.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (t, data) = self.tensor_data(name)?;
        dequantize(t.ty, data, t.numel()).map_err(|source| GgufError::Tensor {
            name: name.to_string(),
            source,
        })
    }
}
