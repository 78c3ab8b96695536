//! A Hugging Face model folder: config.json plus one `model.safetensors` or the shards named
//! in `model.safetensors.index.json`, memory-mapped. Tensors are read by their Hugging Face
//! names and widened to f32 for the loader.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("{dir}: no tensor named '{name}'")]
    Missing { dir: PathBuf, name: String },
    #[error("tensor '{name}' in {path} has dtype {dtype}; vllm-apple loads F32, F16 and BF16")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
}

pub struct SafetensorsDir {
    dir: PathBuf,
    shards: Vec<(PathBuf, memmap2::Mmap)>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
}

fn read(path: &Path) -> Result<String, SafetensorsError> {
    std::fs::read_to_string(path).map_err(|source| SafetensorsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl SafetensorsDir {
    pub fn open(dir: impl AsRef<Path>) -> Result<SafetensorsDir, SafetensorsError> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index_path.exists() {
            let v: serde_json::Value = serde_json::from_str(&read(&index_path)?).map_err(|e| {
                SafetensorsError::Format {
                    path: index_path.clone(),
                    detail: e.to_string(),
                }
            })?;
            let mut f: Vec<String> = v["weight_map"]
                .as_object()
                .ok_or_else(|| SafetensorsError::Format {
                    path: index_path.clone(),
                    detail: "no weight_map".into(),
                })?
                .values()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect();
            f.sort();
            f.dedup();
            f
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for name in files {
            let path = dir.join(&name);
            let io = |source| SafetensorsError::Io {
                path: path.clone(),
                source,
            };
            let file = std::fs::File::open(&path).map_err(io)?;
            // SAFETY: read-only private map; see GgufFile::open.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            let st = SafeTensors::deserialize(&map).map_err(|e| SafetensorsError::Format {
                path: path.clone(),
                detail: e.to_string(),
            })?;
            for t in st.names() {
                index.insert(t.to_string(), shards.len());
            }
            shards.push((path, map));
        }
        Ok(SafetensorsDir { dir, shards, index })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// A tensor widened to f32, with its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), SafetensorsError> {
        let i = *self
            .index
            .get(name)
            .ok_or_else(|| SafetensorsError::Missing {
                dir: self.dir.clone(),
                name: name.into(),
            })?;
        let (path, map) = &self.shards[i];
        let fmt = |e: safetensors::SafeTensorError| SafetensorsError::Format {
            path: path.clone(),
            detail: e.to_string(),
        };
        let st = SafeTensors::deserialize(map).map_err(fmt)?;
        let t = st.tensor(name).map_err(fmt)?;
        let b = t.data();
        let v: Vec<f32> = match t.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(SafetensorsError::Dtype {
                    path: path.clone(),
                    name: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok((t.shape().to_vec(), v))
    }
}
