//! What `--model` names: a GGUF file, a Hugging Face folder, or a hub id found in the local
//! Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub).

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
        "model '{id}' is not in the local Hugging Face cache (looked in {looked}); fetch it \
         with `huggingface-cli download {id}` (vllm-apple does not download models yet) or \
         pass a local path"
    )]
    NotCached { id: String, looked: PathBuf },
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
        assert!(matches!(
            resolve(root.to_str().unwrap(), &root),
            Err(ResolveError::NotAModel(_))
        ));
        std::fs::remove_dir_all(&root).ok();
    }
}
