//! Parity with Hugging Face transformers on tiny random Qwen3, Qwen2, Llama and Qwen3-MoE
//! models (made by scripts/make_tiny_models.py: bf16 safetensors + config.json, reference
//! logits at every position and 16-token greedy continuations computed in float32): loaded
//! from the Hugging Face folder in float32, bfloat16 and float16, and from GGUF.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use vllm_apple_model::decoder::DecoderModel;
use vllm_apple_model::gguf::GgufFile;
use vllm_apple_model::runner::{generate, Sampling};
use vllm_apple_model::safetensors_dir::SafetensorsDir;
use vllm_apple_ops::kernels::attention::{AttentionOptions, HostMetadata, SeqSlice};
use vllm_apple_ops::kv_cache::KvCache;
use vllm_apple_ops::{ContextOptions, DType, GpuContext, Step};

fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        GpuContext::new(&ContextOptions::default()).expect("a GPU adapter (lavapipe on CI)")
    })
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Logits of every position of `prompt`, one prefill step.
fn all_logits(m: &DecoderModel, prompt: &[u32]) -> Vec<f32> {
    let ctx = ctx();
    let blocks = prompt.len().div_ceil(16);
    let kv = KvCache::new(ctx, m.kv_spec(16), blocks).unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let seq = SeqSlice {
        block_table: &table,
        num_cached: 0,
        num_new: prompt.len(),
    };
    let meta = HostMetadata::build(&[seq], 16, 0)
        .unwrap()
        .upload(ctx, 16)
        .unwrap();
    let t = ctx.upload_u32(&[prompt.len()], prompt).unwrap();
    let rows: Vec<u32> = (0..prompt.len() as u32).collect();
    let rows = ctx.upload_u32(&[rows.len()], &rows).unwrap();
    let mut step = Step::new(ctx);
    let logits = m
        .forward(
            &mut step,
            &t,
            &meta,
            &kv,
            &rows,
            &AttentionOptions::default(),
        )
        .unwrap();
    step.submit_and_wait().unwrap();
    logits.to_f32_vec(ctx).unwrap()
}

fn check(name: &str, dtype: DType) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name);
    let st = SafetensorsDir::open(&dir).unwrap();
    check_model(
        name,
        &DecoderModel::from_hf_dir(ctx(), &st, dtype).unwrap(),
        dtype,
    );
}

/// The same weights written as GGUF the way llama.cpp lays them out (scripts/make_tiny_gguf.py).
fn check_gguf(name: &str, dtype: DType) {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/tiny/{name}.gguf"));
    let file = GgufFile::open(&path).unwrap();
    check_model(
        name,
        &DecoderModel::from_gguf(ctx(), &file, dtype).unwrap(),
        dtype,
    );
}

fn check_model(name: &str, m: &DecoderModel, dtype: DType) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let vocab = m.cfg.vocab;
    // A MoE model's one-token steps route from the router fold (two MoE dispatches, the
    // router's logits from the attention's GEMVs): the greedy continuations below go
    // through it.
    if name.starts_with("qwen3moe") {
        assert_eq!(m.moe_layer_dispatches(), Some((2, true)), "{name} {dtype}");
    }
    for case in reference["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let got = all_logits(m, &prompt);
        let want = case["logits"].as_array().unwrap();
        let mut worst = 0f64;
        let mut scale = 0f64;
        for (p, row) in want.iter().enumerate() {
            for (j, w) in row.as_array().unwrap().iter().enumerate() {
                let w = w.as_f64().unwrap();
                scale = scale.max(w.abs());
                worst = worst.max((got[p * vocab + j] as f64 - w).abs());
            }
        }
        // The reference is rounded to 1e-5; f16 weights round bf16 values below f16's
        // normal range.
        let tol = if dtype == DType::F16 { 5e-3 } else { 1e-3 };
        assert!(
            worst <= tol * scale,
            "{name} {dtype}: logits differ by {worst:.2e} (scale {scale:.2})"
        );
        let want_ids = ids(&case["greedy_ids"]);
        let out = generate(
            ctx(),
            m,
            &prompt,
            want_ids.len(),
            &[],
            &AttentionOptions::default(),
            Sampling::greedy(),
        )
        .unwrap();
        assert_eq!(
            out.ids, want_ids,
            "{name} {dtype}: greedy continuation of {prompt:?}"
        );
    }
}

#[test]
fn qwen3_float32() {
    check("qwen3", DType::F32);
}

#[test]
fn qwen3_bfloat16() {
    check("qwen3", DType::BF16);
}

#[test]
fn qwen3_float16() {
    check("qwen3", DType::F16);
}

#[test]
fn llama_float32() {
    check("llama", DType::F32);
}

#[test]
fn llama_bfloat16() {
    check("llama", DType::BF16);
}

#[test]
fn llama_float16() {
    check("llama", DType::F16);
}

#[test]
fn qwen2_with_qkv_bias() {
    check("qwen2", DType::F32);
    check("qwen2", DType::BF16);
}

#[test]
fn qwen3_gguf() {
    check_gguf("qwen3", DType::F16);
}

#[test]
fn llama_gguf_with_permuted_qk() {
    check_gguf("llama", DType::F32);
}

#[test]
fn qwen3_moe_with_a_dense_layer() {
    // Layers 0 and 2 MoE (16 experts, top-4, renormalised), layer 1 dense (mlp_only_layers).
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        check("qwen3moe", dtype);
    }
}

#[test]
fn qwen3_moe_all_sparse_and_tied() {
    check("qwen3moe_all", DType::BF16);
}

#[test]
fn qwen3_moe_gguf() {
    check_gguf("qwen3moe_all", DType::F16);
}

#[test]
fn missing_or_mismatched_files_are_errors() {
    let e = SafetensorsDir::open("/nonexistent/model")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/nonexistent/model"), "{e}");
    let dir = std::env::temp_dir().join(format!("vllm-apple-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("model.safetensors"),
        b"\\x10\\x00\\x00\\x00\\x00\\x00\\x00\\x00{not json}",
    )
    .unwrap();
    let e = SafetensorsDir::open(&dir).err().unwrap().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn corrupt_safetensors_are_errors_not_panics() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/qwen3");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let dir = std::env::temp_dir().join(format!("vllm-apple-st-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + 8;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut errors = 0;
    for round in 0..300 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut b = bytes.clone();
        if round % 2 == 0 {
            b.truncate((state as usize) % header_len.max(1) + 1);
        } else {
            let i = (state as usize) % header_len;
            b[i] = (state >> 32) as u8;
        }
        std::fs::write(dir.join("model.safetensors"), &b).unwrap();
        match SafetensorsDir::open(&dir) {
            Err(_) => errors += 1,
            Ok(st) => {
                for name in ["model.embed_tokens.weight", "model.norm.weight"] {
                    let _ = st.f32(name);
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        errors > 100,
        "corrupt headers should mostly be rejected ({errors})"
    );
}
