//! The tokenizer and chat template a GGUF file carries: a byte-level BPE
//! (`tokenizer.ggml.model = "gpt2"`) rebuilt as a Hugging Face `tokenizers` pipeline, the
//! control tokens as special tokens, and the Jinja chat template rendered with minijinja.

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::gguf::{Gguf, Value};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the model file has no tokenizer metadata ('{0}')")]
    Missing(String),
    #[error("tokenizer model '{0}' is not supported yet (byte-level BPE 'gpt2' is)")]
    UnsupportedModel(String),
    #[error(
        "pre-tokenizer '{0}' is not supported yet (supported: gpt2, smollm, qwen2, llama-bpe)"
    )]
    UnsupportedPre(String),
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("the model has no chat template")]
    NoTemplate,
    #[error("cannot read {path}: {detail}")]
    File { path: String, detail: String },
}

#[derive(Clone)]
pub struct GgufTokenizer {
    inner: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    bos_text: String,
    eos_text: String,
}

fn strings(g: &Gguf, key: &str) -> Result<Vec<String>, TokenizerError> {
    g.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| TokenizerError::Missing(key.into()))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| TokenizerError::Missing(key.into()))
        })
        .collect()
}

impl GgufTokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<GgufTokenizer, TokenizerError> {
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| TokenizerError::Missing("tokenizer.ggml.model".into()))?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.into()));
        }
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings(g, "tokenizer.ggml.merges")?
            .iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("gpt2");
        // The regex splits of llama.cpp's pre-tokenizer names (as the models' tokenizer.json
        // have them), then the byte-level mapping without GPT-2's own regex.
        let split_then_bytes = |pattern: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
            let split = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
            Ok(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into())
        };
        let pre_tok: PreTokenizerWrapper = match pre {
            // SmolLM's tokenizer.json: single digits, then GPT-2's byte-level split.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "gpt2" | "default" => byte_level.into(),
            // Qwen2 / Qwen2.5 / Qwen3: digits one at a time.
            "qwen2" => split_then_bytes(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            )?,
            // Llama 3: digits in groups of up to three.
            "llama-bpe" | "llama3" | "smaug-bpe" => split_then_bytes(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            )?,
            other => return Err(TokenizerError::UnsupportedPre(other.into())),
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevel::default()));
        // Control (3) and user-defined (4) tokens match whole in the input text.
        if let Some(types) = g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            let special: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| matches!(t.as_i64(), Some(3) | Some(4)))
                .map(|(_, tok)| AddedToken::from(tok.clone(), true))
                .collect();
            inner.add_special_tokens(&special);
        }
        let id = |k: &str| g.get(k).and_then(Value::as_u64).map(|v| v as u32);
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let text = |i: Option<u32>| {
            i.and_then(|i| tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        Ok(GgufTokenizer {
            bos_text: text(bos),
            eos_text: text(eos),
            inner,
            bos,
            eos,
            add_bos: matches!(
                g.get("tokenizer.ggml.add_bos_token"),
                Some(Value::Bool(true))
            ),
            chat_template: g
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// From a Hugging Face folder: tokenizer.json, with the chat template and the bos/eos
    /// tokens from tokenizer_config.json (or chat_template.jinja) and generation_config.json.
    pub fn from_hf_dir(dir: &std::path::Path) -> Result<GgufTokenizer, TokenizerError> {
        let file_err = |p: &std::path::Path, e: String| TokenizerError::File {
            path: p.display().to_string(),
            detail: e,
        };
        let tj = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&tj).map_err(|e| file_err(&tj, e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| file_err(&cfg_path, e.to_string()))?,
            Err(_) => serde_json::Value::Null,
        };
        let token_text = |v: &serde_json::Value| -> Option<String> {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v["content"].as_str().map(str::to_string))
        };
        let bos_text = token_text(&cfg["bos_token"]);
        let eos_text = token_text(&cfg["eos_token"]);
        let gen: serde_json::Value = std::fs::read_to_string(dir.join("generation_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
        let first_id = |v: &serde_json::Value| {
            v.as_u64()
                .or_else(|| v.as_array().and_then(|a| a.first()?.as_u64()))
        };
        let eos = first_id(&gen["eos_token_id"])
            .map(|x| x as u32)
            .or_else(|| eos_text.as_deref().and_then(|t| inner.token_to_id(t)));
        let bos = bos_text.as_deref().and_then(|t| inner.token_to_id(t));
        let chat_template = cfg["chat_template"]
            .as_str()
            .map(str::to_string)
            .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        Ok(GgufTokenizer {
            inner,
            bos,
            eos,
            add_bos: cfg["add_bos_token"].as_bool().unwrap_or(false),
            chat_template,
            bos_text: bos_text.unwrap_or_default(),
            eos_text: eos_text.unwrap_or_default(),
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders the chat template for `(role, content)` messages, as transformers'
    /// `apply_chat_template(..., tokenize=False)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let msgs: Vec<serde_json::Value> = messages
            .iter()
            .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
            .collect();
        self.render_chat(
            &serde_json::Value::Array(msgs),
            add_generation_prompt,
            &serde_json::Map::new(),
        )
    }

    /// The general form: OpenAI-style message objects (tool calls and all) and extra template
    /// variables such as Qwen3's `enable_thinking` or `tools`.
    pub fn render_chat(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, TokenizerError> {
        let source = self
            .chat_template
            .as_deref()
            .ok_or(TokenizerError::NoTemplate)?;
        let mut env = minijinja::Environment::new();
        // Hugging Face templates are written for Jinja2 in Python: str methods and all.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", source)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let mut vars = extra.clone();
        vars.insert("messages".into(), messages.clone());
        vars.insert("add_generation_prompt".into(), add_generation_prompt.into());
        vars.entry("bos_token")
            .or_insert_with(|| self.bos_text.clone().into());
        vars.entry("eos_token")
            .or_insert_with(|| self.eos_text.clone().into());
        env.get_template("chat")
            .and_then(|t| t.render(minijinja::Value::from_serialize(&vars)))
            .map_err(|e| TokenizerError::Template(format!("{e:#}")))
    }
}
