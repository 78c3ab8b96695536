//! `cargo fuzz run safetensors_header`: a safetensors file of arbitrary bytes must load or be
//! refused, never panic, and every tensor it offers must read or fail cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("vllm-apple-fuzz-st-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    if std::fs::write(dir.join("model.safetensors"), data).is_err() {
        return;
    }
    if let Ok(st) = vllm_apple_model::safetensors_dir::SafetensorsDir::open(&dir) {
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            let _ = st.f32(name);
        }
    }
});
