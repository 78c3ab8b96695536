//! Incremental detokenization, as vLLM's `detokenize_incrementally`
//! (`vllm/transformers_utils/detokenizer_utils.py`).
//!
//! Each new token is decoded together with a few tokens before it: the text of the window
//! `ids[prefix_offset..read_offset]` (already emitted) is compared with the text of
//! `ids[prefix_offset..]`, and the difference is the new text. Decoding with context keeps
//! what depends on neighbours right (a leading space, byte-level pieces of one character),
//! and text ending in U+FFFD (an incomplete UTF-8 sequence) is held back until the tokens
//! that complete it arrive.

use vllm_apple_model::tokenizer::GgufTokenizer;

/// How many prompt tokens before the first generated one serve as decoding context
/// (vLLM's `INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET`).
pub const INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: usize = 5;

/// The replacement character a decoder emits for invalid or incomplete UTF-8.
const REPLACEMENT: char = '\u{FFFD}';

/// Turns one sequence's generated token ids into text, one token at a time.
#[derive(Debug, Clone)]
pub struct Detokenizer {
    /// The last few prompt ids (decoding context), then every generated id.
    ids: Vec<u32>,
    /// How many of `ids` come from the prompt.
    prompt_context: usize,
    /// Start of the decoding window in `ids`.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
    /// Leave special tokens out of the text.
    skip_special_tokens: bool,
    /// All text emitted so far.
    text: String,
}

impl Detokenizer {
    /// Starts a sequence after `prompt`, whose last
    /// [`INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET`] ids are kept as context for the first
    /// generated tokens (vLLM's `prefix_offset = max(len(prompt) - 5, 0)`,
    /// `read_offset = len(prompt)`).
    pub fn new(prompt: &[u32], skip_special_tokens: bool) -> Self {
        let context_start = prompt
            .len()
            .saturating_sub(INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET);
        let ids = prompt[context_start..].to_vec();
        Detokenizer {
            prompt_context: ids.len(),
            prefix_offset: 0,
            read_offset: ids.len(),
            ids,
            skip_special_tokens,
            text: String::new(),
        }
    }

    /// Appends one generated id and returns the text it completes: possibly empty (a
    /// character split across tokens is held back until complete, so no returned chunk
    /// ends in U+FFFD; a special token with `skip_special_tokens` adds nothing). On a
    /// tokenizer error the id is not appended and the state is unchanged.
    pub fn push(&mut self, tok: &GgufTokenizer, id: u32) -> Result<String, String> {
        self.ids.push(id);
        match self.decode_new_text(tok) {
            Ok(new_text) => Ok(new_text),
            Err(e) => {
                self.ids.pop();
                Err(e)
            }
        }
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The generated ids pushed so far.
    pub fn output_ids(&self) -> &[u32] {
        &self.ids[self.prompt_context..]
    }

    /// How many generated ids were pushed.
    pub fn num_output_tokens(&self) -> usize {
        self.ids.len() - self.prompt_context
    }

    /// One step of `detokenize_incrementally` for the id just appended to `ids`.
    fn decode_new_text(&mut self, tok: &GgufTokenizer) -> Result<String, String> {
        let skip = self.skip_special_tokens;
        let prefix_text = tok
            .decode(&self.ids[self.prefix_offset..self.read_offset], skip)
            .map_err(|e| e.to_string())?;
        let full_text = tok
            .decode(&self.ids[self.prefix_offset..], skip)
            .map_err(|e| e.to_string())?;
        // Lengths in characters, as Python's `len` on str.
        let prefix_chars = prefix_text.chars().count();
        if full_text.chars().count() <= prefix_chars || full_text.ends_with(REPLACEMENT) {
            // Nothing new yet, or a UTF-8 sequence still incomplete: wait for more tokens.
            return Ok(String::new());
        }
        let start = full_text
            .char_indices()
            .nth(prefix_chars)
            .map_or(full_text.len(), |(byte, _)| byte);
        let new_text = full_text[start..].to_string();
        self.text.push_str(&new_text);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(new_text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn qwen3() -> GgufTokenizer {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../.cache/tokenizers/qwen3"
        ));
        GgufTokenizer::from_hf_dir(dir)
            .expect("the Qwen3 tokenizer (scripts/fetch-assets.sh --tests)")
    }

    /// Pushes `generated` one id at a time after `prompt`; checks every chunk is free of
    /// U+FFFD and that the chunks add up to `text()`. Returns the chunks.
    fn stream(tok: &GgufTokenizer, prompt: &[u32], generated: &[u32], skip: bool) -> Vec<String> {
        let mut detok = Detokenizer::new(prompt, skip);
        let chunks: Vec<String> = generated
            .iter()
            .map(|&id| detok.push(tok, id).expect("decodes"))
            .collect();
        for chunk in &chunks {
            assert!(
                !chunk.contains(REPLACEMENT),
                "chunk {chunk:?} of {chunks:?}"
            );
        }
        assert_eq!(chunks.concat(), detok.text());
        assert_eq!(detok.output_ids(), generated);
        assert_eq!(detok.num_output_tokens(), generated.len());
        chunks
    }

    #[test]
    fn multibyte_text_streams_without_broken_characters() {
        let tok = qwen3();
        let text = "héllo wörld 日本語 🙂 end 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦀🫠 ok";
        let ids = tok.encode(text).unwrap();
        // The test must exercise held-back text: some single id is not valid UTF-8 alone.
        assert!(
            ids.iter()
                .any(|&id| tok.decode(&[id], true).unwrap().contains(REPLACEMENT)),
            "expected a character split across tokens in {ids:?}"
        );
        let chunks = stream(&tok, &[], &ids, true);
        assert!(chunks.iter().any(String::is_empty));
        assert_eq!(chunks.concat(), tok.decode(&ids, true).unwrap());
        assert_eq!(chunks.concat(), text);
    }

    #[test]
    fn prompt_context_keeps_leading_spaces() {
        let tok = qwen3();
        let prompt = tok.encode("The answer, in one word, is").unwrap();
        let generated = tok.encode(" yes, 日本語 indeed").unwrap();
        let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
        let chunks = stream(&tok, &prompt, &generated, true);
        let full = tok.decode(&all, true).unwrap();
        let prompt_text = tok.decode(&prompt, true).unwrap();
        assert_eq!(chunks.concat(), full[prompt_text.len()..]);
        assert!(chunks[0].starts_with(' '), "{chunks:?}");
    }

    #[test]
    fn special_tokens_are_skipped_or_kept() {
        let tok = qwen3();
        let text = "first part<|im_end|>second 🙂 part";
        let ids = tok.encode(text).unwrap();
        let im_end = tok.encode("<|im_end|>").unwrap();
        assert_eq!(im_end.len(), 1);
        assert!(ids.contains(&im_end[0]));

        let skipped = stream(&tok, &[], &ids, true).concat();
        assert_eq!(skipped, tok.decode(&ids, true).unwrap());
        assert_eq!(skipped, "first partsecond 🙂 part");

        let kept = stream(&tok, &[], &ids, false).concat();
        assert_eq!(kept, tok.decode(&ids, false).unwrap());
        assert_eq!(kept, text);

        // A special token in the prompt context does not leak into the output.
        let prompt = tok.encode("<|im_start|>assistant\n").unwrap();
        let generated = tok.encode("Hi").unwrap();
        assert_eq!(stream(&tok, &prompt, &generated, true).concat(), "Hi");
    }

    #[test]
    fn out_of_vocabulary_ids_add_nothing() {
        let tok = qwen3();
        let mut detok = Detokenizer::new(&[], true);
        let hello = tok.encode("Hello").unwrap();
        assert_eq!(detok.push(&tok, hello[0]).unwrap(), "Hello");
        assert_eq!(detok.push(&tok, u32::MAX).unwrap(), "");
        let world = tok.encode(" world").unwrap();
        assert_eq!(detok.push(&tok, world[0]).unwrap(), " world");
        assert_eq!(detok.text(), "Hello world");
    }
}
