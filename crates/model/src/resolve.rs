//! What `--model` names: a GGUF file, a Hugging Face folder, or a hub id found in the local
//! Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub) or,
//! when online, downloaded into it with `hf-hub` (config, tokenizer files, safetensors).

use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelLocation {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0}: neither a .gguf file nor a folder with config.json")]
    NotAModel(PathBuf),
    #[error(
        "model '{id}' is not in the local Hugging Face cache (looked in {looked}) and \
         HF_HUB_OFFLINE is set; fetch it with `huggingface-cli download {id}` or pass a \
         local path"
    )]
    NotCached { id: String, looked: PathBuf },
    #[error(
        "model '{id}' is not in the local Hugging Face cache (looked in {looked}) and \
         downloading it failed: {detail}"
    )]
    Download {
        id: String,
        looked: PathBuf,
        detail: String,
    },
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
}

/// `resolve`, downloading a hub id that is not cached (unless HF_HUB_OFFLINE is set) from
/// HF_ENDPOINT (default the public hub).
pub fn resolve_or_download(spec: &str, cache: &Path) -> Result<ModelLocation, ResolveError> {
    match resolve(spec, cache) {
        Err(ResolveError::NotCached { id, looked }) if !offline() && id.contains('/') => {
            let endpoint = std::env::var("HF_ENDPOINT").ok();
            download(&id, cache, endpoint).map_err(|detail| ResolveError::Download {
                id,
                looked,
                detail,
            })
        }
        other => other,
    }
}

/// Downloads the files a model needs into the hub cache: config.json, the tokenizer files
/// that exist, and the safetensors (every shard of the index, or the single file).
pub fn download(id: &str, cache: &Path, endpoint: Option<String>) -> Result<ModelLocation, String> {
    let mut b = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(true)
        .with_retries(1);
    if let Some(e) = endpoint {
        b = b.with_endpoint(e);
    }
    let api = b.build().map_err(|e| e.to_string())?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json").map_err(|e| e.to_string())?;
    for optional in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        // Absent files are fine (not every model has a chat template).
        let _ = repo.get(optional);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| e.to_string())?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let mut shards: Vec<&str> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|f| f.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                repo.get(shard).map_err(|e| format!("{shard}: {e}"))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| format!("model.safetensors: {e}"))?;
        }
    }
    let dir = config
        .parent()
        .ok_or_else(|| "the downloaded config has no folder".to_string())?;
    Ok(ModelLocation::HfDir(dir.to_path_buf()))
}

/// The hub cache folder, as huggingface_hub finds it.
pub fn hub_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

fn classify(path: &Path) -> Option<ModelLocation> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        return Some(ModelLocation::Gguf(path.to_path_buf()));
    }
    if path.join("config.json").is_file() {
        return Some(ModelLocation::HfDir(path.to_path_buf()));
    }
    None
}

pub fn resolve(spec: &str, cache: &Path) -> Result<ModelLocation, ResolveError> {
    let path = Path::new(spec);
    if path.exists() {
        return classify(path).ok_or_else(|| ResolveError::NotAModel(path.to_path_buf()));
    }
    let repo = cache.join(format!("models--{}", spec.replace('/', "--")));
    let snapshot = std::fs::read_to_string(repo.join("refs").join("main"))
        .ok()
        .map(|rev| repo.join("snapshots").join(rev.trim()));
    match snapshot.as_deref().and_then(classify) {
        Some(m) => Ok(m),
        None => Err(ResolveError::NotCached {
            id: spec.to_string(),
            looked: repo,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_files_folders_and_cached_ids() {
        let root = std::env::temp_dir().join(format!("vllm-apple-resolve-{}", std::process::id()));
        let snap = root
            .join("models--Org--Tiny")
            .join("snapshots")
            .join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(root.join("models--Org--Tiny").join("refs")).unwrap();
        std::fs::write(
            root.join("models--Org--Tiny").join("refs").join("main"),
            "abc123\n",
        )
        .unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(root.join("m.gguf"), b"GGUF").unwrap();
        assert_eq!(
            resolve("Org/Tiny", &root).unwrap(),
            ModelLocation::HfDir(snap.clone())
        );
        assert_eq!(
            resolve(snap.to_str().unwrap(), &root).unwrap(),
            ModelLocation::HfDir(snap)
        );
        let g = root.join("m.gguf");
        assert_eq!(
            resolve(g.to_str().unwrap(), &root).unwrap(),
            ModelLocation::Gguf(g)
        );
        let e = resolve("Org/Missing", &root).unwrap_err().to_string();
        assert!(
            e.contains("models--Org--Missing") && e.contains("huggingface-cli download"),
            "{e}"
        );
        // Online but the hub unreachable: an error naming where we looked, no panic.
        let e = download("Org/Missing", &root, Some("http://127.0.0.1:9".into())).unwrap_err();
        assert!(!e.is_empty());
        assert!(matches!(
            resolve(root.to_str().unwrap(), &root),
            Err(ResolveError::NotAModel(_))
        ));
        std::fs::remove_dir_all(&root).ok();
    }
}
