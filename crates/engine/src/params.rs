//! Per-request sampling parameters with vLLM's defaults and checks (`vllm/sampling_params.py`),
//! and the reasons a sequence finishes.

use std::fmt;

/// Temperatures below this mean greedy sampling (vLLM's `_SAMPLING_EPS`).
pub const SAMPLING_EPS: f32 = 1e-5;

/// Positive temperatures below this are raised to it before sampling, to keep the scaled
/// logits finite (vLLM's `_MAX_TEMP`, applied in `SamplingParams.__post_init__`).
pub const MIN_TEMPERATURE: f32 = 1e-2;

/// The most top logprobs a request may ask for, per generated or prompt token (vLLM's
/// default `max_logprobs`).
pub const MAX_LOGPROBS: usize = 20;

/// How one request is sampled and when it stops, as vLLM's `SamplingParams`.
///
/// Fields are public; [`SamplingParams::validate`] checks them the way vLLM does on
/// construction. The sampler tolerates unchecked values without panicking, but only
/// validated parameters have vLLM's semantics.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Number of output sequences for the prompt (at least 1; greedy sampling needs 1).
    pub n: usize,
    /// Softmax temperature in `[0, 2]`; below [`SAMPLING_EPS`] means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose cumulative probability reaches
    /// `top_p`, in `(0, 1]`; 1 disables it.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (ties at the boundary included); 0 or -1
    /// disables it.
    pub top_k: i32,
    /// Drop tokens whose probability is below `min_p` times the most likely token's, in
    /// `[0, 1]`; 0 disables it.
    pub min_p: f32,
    /// Subtracted once from the logit of every token already generated, in `[-2, 2]`.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated, in `[-2, 2]`.
    pub frequency_penalty: f32,
    /// Divides positive (multiplies non-positive) logits of tokens seen in the prompt or
    /// the output; must be > 0, 1 disables it.
    pub repetition_penalty: f32,
    /// Seed of this request's random generator; `None` lets the engine pick one.
    pub seed: Option<u64>,
    /// Strings that stop generation when they appear in the output text (not included in
    /// the output unless `include_stop_str_in_output`).
    pub stop: Vec<String>,
    /// Token ids that stop generation when sampled.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating after the end-of-sequence token.
    pub ignore_eos: bool,
    /// Most tokens to generate; `None` means up to the model's context length.
    pub max_tokens: Option<usize>,
    /// Fewest tokens to generate before eos or a stop token id may be sampled.
    pub min_tokens: usize,
    /// Number of top logprobs to return for each generated token (the sampled token's own
    /// is always returned when this is set).
    pub logprobs: Option<usize>,
    /// Number of top logprobs to return for each prompt token.
    pub prompt_logprobs: Option<usize>,
    /// Added to the logits of the given token ids before sampling; a token listed twice
    /// takes its last bias, as a Python dict built from the pairs would.
    pub logit_bias: Vec<(u32, f32)>,
    /// Leave special tokens out of the output text.
    pub skip_special_tokens: bool,
    /// Keep the matched stop string at the end of the output text.
    pub include_stop_str_in_output: bool,
}

impl Default for SamplingParams {
    /// vLLM's defaults: one sequence, temperature 1, no truncation or penalties, 16 tokens.
    fn default() -> Self {
        SamplingParams {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            max_tokens: Some(16),
            min_tokens: 0,
            logprobs: None,
            prompt_logprobs: None,
            logit_bias: Vec::new(),
            skip_special_tokens: true,
            include_stop_str_in_output: false,
        }
    }
}

impl SamplingParams {
    /// The defaults with temperature 0: always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether the temperature means argmax sampling (below [`SAMPLING_EPS`]); top-k, top-p
    /// and min-p are then ignored, as vLLM resets them.
    pub fn is_greedy(&self) -> bool {
        self.temperature < SAMPLING_EPS
    }

    /// Whether any of the presence, frequency or repetition penalties is active.
    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }

    /// vLLM's checks of `SamplingParams._verify_args` and `_verify_greedy_sampling`, plus
    /// the engine's `max_logprobs` limit, with vLLM's messages. Parameters that depend on
    /// the vocabulary are checked by [`SamplingParams::validate_token_ids`].
    pub fn validate(&self) -> Result<(), String> {
        if self.n < 1 {
            return Err(format!("n must be at least 1, got {}.", self.n));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(format!(
                "presence_penalty must be in [-2, 2], got {:?}.",
                self.presence_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(format!(
                "frequency_penalty must be in [-2, 2], got {:?}.",
                self.frequency_penalty
            ));
        }
        if !self.repetition_penalty.is_finite() {
            return Err(format!(
                "repetition_penalty must be a finite number, got {:?}.",
                self.repetition_penalty
            ));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(format!(
                "repetition_penalty must be greater than zero, got {:?}.",
                self.repetition_penalty
            ));
        }
        if !self.temperature.is_finite() {
            return Err(format!(
                "temperature must be a finite number, got {:?}.",
                self.temperature
            ));
        }
        if self.temperature < 0.0 {
            return Err(format!(
                "temperature must be non-negative, got {:?}.",
                self.temperature
            ));
        }
        if self.temperature > 2.0 {
            return Err(format!(
                "temperature must be in [0, 2], got {:?}.",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {:?}.", self.top_p));
        }
        if self.top_k < -1 {
            return Err(format!(
                "top_k must be 0 (disable), or at least 1, got {}.",
                self.top_k
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {:?}.", self.min_p));
        }
        if let Some(max_tokens) = self.max_tokens {
            if max_tokens < 1 {
                return Err(format!("max_tokens must be at least 1, got {max_tokens}."));
            }
            if self.min_tokens > max_tokens {
                return Err(format!(
                    "min_tokens must be less than or equal to max_tokens={max_tokens}, got {}.",
                    self.min_tokens
                ));
            }
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return Err(format!(
                "Requested sample logprobs of {n}, which is greater than max allowed: {MAX_LOGPROBS}"
            ));
        }
        if let Some(n) = self.prompt_logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return Err(format!(
                "Requested prompt logprobs of {n}, which is greater than max allowed: {MAX_LOGPROBS}"
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err("stop cannot contain an empty string.".to_string());
        }
        if let Some((token, bias)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return Err(format!(
                "logit_bias must be finite, got {bias:?} for token {token}."
            ));
        }
        if self.is_greedy() && self.n > 1 {
            return Err(format!(
                "n must be 1 when using greedy sampling, got {}.",
                self.n
            ));
        }
        Ok(())
    }

    /// The vocabulary checks vLLM's input processor makes: every `logit_bias` token id must
    /// be below `vocab_size`.
    pub fn validate_token_ids(&self, vocab_size: usize) -> Result<(), String> {
        let invalid: Vec<u32> = self
            .logit_bias
            .iter()
            .map(|&(token, _)| token)
            .filter(|&token| token as usize >= vocab_size)
            .collect();
        if invalid.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "token_id(s) {invalid:?} in logit_bias contain out-of-vocab token ids. \
                 Vocabulary size: {vocab_size}"
            ))
        }
    }

    /// Whether sampling needs the full logits row on the host: only for more top logprobs
    /// than the GPU returns (`kernels::logprobs::MAX_TOP`); the GPU does every other step
    /// (`kernels::sample`, `kernels::logprobs`). Prompt logprobs are a separate matter and
    /// not counted here.
    pub fn needs_logits(&self) -> bool {
        self.logprobs
            .is_some_and(|n| n > vllm_apple_ops::kernels::logprobs::MAX_TOP)
    }

    /// Whether the GPU draws this request's tokens at random (`kernels::sample`:
    /// temperature, min-p, top-k, top-p, after penalties, logit bias and min_tokens
    /// applied on the GPU too). Greedy requests take the GPU argmax; either way only the
    /// token comes back unless logprobs are asked for, which need the raw logits.
    pub fn sampled_on_gpu(&self) -> bool {
        !self.is_greedy() && !self.needs_logits()
    }

    /// The most characters (Unicode scalar values, as Python's `len`) a stop string spans;
    /// 0 without stop strings. Streaming must hold back `max_stop_len() - 1` characters
    /// unless `include_stop_str_in_output` (see [`SamplingParams::output_text_buffer_length`]).
    pub fn max_stop_len(&self) -> usize {
        self.stop
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0)
    }

    /// How many trailing characters of the output text to hold back from streaming until
    /// the sequence finishes, so that a stop string split across steps is never shown
    /// (vLLM's `output_text_buffer_length`).
    pub fn output_text_buffer_length(&self) -> usize {
        if self.include_stop_str_in_output {
            0
        } else {
            self.max_stop_len().saturating_sub(1)
        }
    }
}

/// Why a sequence finished (vLLM's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// Stopped by eos, a stop token id or a stop string.
    Stop,
    /// Reached `max_tokens` or the model's context length.
    Length,
    /// Aborted by the client or the engine.
    Abort,
}

impl FinishReason {
    /// The OpenAI / vLLM string: `"stop"`, `"length"` or `"abort"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What stopped a sequence that finished with [`FinishReason::Stop`] (vLLM's
/// `stop_reason`); eos is represented by the absence of one (`None`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// One of `stop_token_ids` was sampled.
    Token(u32),
    /// One of the `stop` strings appeared in the text.
    Text(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_vllm() {
        let p = SamplingParams::default();
        assert_eq!(p.n, 1);
        assert_eq!(p.temperature, 1.0);
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.top_k, 0);
        assert_eq!(p.min_p, 0.0);
        assert_eq!(p.repetition_penalty, 1.0);
        assert_eq!(p.max_tokens, Some(16));
        assert_eq!(p.min_tokens, 0);
        assert!(p.skip_special_tokens);
        assert!(!p.include_stop_str_in_output);
        assert!(!p.ignore_eos);
        assert!(p.validate().is_ok());
        assert!(!p.is_greedy());
        assert!(SamplingParams::greedy().is_greedy());
        assert!(SamplingParams::greedy().validate().is_ok());
    }

    #[test]
    fn greedy_threshold_is_sampling_eps() {
        let mut p = SamplingParams::greedy();
        p.temperature = 0.9e-5;
        assert!(p.is_greedy());
        p.temperature = 1e-5;
        assert!(!p.is_greedy());
    }

    fn err(edit: impl FnOnce(&mut SamplingParams)) -> String {
        let mut p = SamplingParams::default();
        edit(&mut p);
        p.validate().expect_err("should be rejected")
    }

    #[test]
    fn validate_messages_follow_vllm() {
        assert_eq!(
            err(|p| p.temperature = -1.0),
            "temperature must be non-negative, got -1.0."
        );
        assert_eq!(
            err(|p| p.temperature = 2.5),
            "temperature must be in [0, 2], got 2.5."
        );
        assert_eq!(
            err(|p| p.temperature = f32::NAN),
            "temperature must be a finite number, got NaN."
        );
        assert_eq!(err(|p| p.n = 0), "n must be at least 1, got 0.");
        assert_eq!(err(|p| p.top_p = 0.0), "top_p must be in (0, 1], got 0.0.");
        assert_eq!(err(|p| p.top_p = 1.5), "top_p must be in (0, 1], got 1.5.");
        assert_eq!(
            err(|p| p.top_k = -2),
            "top_k must be 0 (disable), or at least 1, got -2."
        );
        assert_eq!(err(|p| p.min_p = 1.1), "min_p must be in [0, 1], got 1.1.");
        assert_eq!(
            err(|p| p.presence_penalty = 2.5),
            "presence_penalty must be in [-2, 2], got 2.5."
        );
        assert_eq!(
            err(|p| p.frequency_penalty = -3.0),
            "frequency_penalty must be in [-2, 2], got -3.0."
        );
        assert_eq!(
            err(|p| p.repetition_penalty = 0.0),
            "repetition_penalty must be greater than zero, got 0.0."
        );
        assert_eq!(
            err(|p| p.max_tokens = Some(0)),
            "max_tokens must be at least 1, got 0."
        );
        assert_eq!(
            err(|p| p.min_tokens = 17),
            "min_tokens must be less than or equal to max_tokens=16, got 17."
        );
        assert_eq!(
            err(|p| p.logprobs = Some(21)),
            "Requested sample logprobs of 21, which is greater than max allowed: 20"
        );
        assert_eq!(
            err(|p| p.prompt_logprobs = Some(100)),
            "Requested prompt logprobs of 100, which is greater than max allowed: 20"
        );
        assert_eq!(
            err(|p| p.stop = vec!["ok".into(), String::new()]),
            "stop cannot contain an empty string."
        );
        assert_eq!(
            err(|p| {
                p.temperature = 0.0;
                p.n = 2
            }),
            "n must be 1 when using greedy sampling, got 2."
        );
        assert!(err(|p| p.logit_bias = vec![(3, f32::INFINITY)]).contains("logit_bias"));
    }

    #[test]
    fn validate_accepts_edges() {
        let ok = |edit: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            edit(&mut p);
            p.validate()
        };
        assert!(ok(|p| p.top_k = -1).is_ok());
        assert!(ok(|p| p.top_k = 1).is_ok());
        assert!(ok(|p| p.top_p = 1.0).is_ok());
        assert!(ok(|p| p.min_p = 1.0).is_ok());
        assert!(ok(|p| p.temperature = 2.0).is_ok());
        assert!(ok(|p| p.logprobs = Some(20)).is_ok());
        assert!(ok(|p| p.logprobs = Some(0)).is_ok());
        assert!(ok(|p| {
            p.max_tokens = None;
            p.min_tokens = 1000
        })
        .is_ok());
        assert!(ok(|p| p.min_tokens = 16).is_ok());
    }

    #[test]
    fn token_ids_are_checked_against_the_vocabulary() {
        let p = SamplingParams {
            logit_bias: vec![(5, 1.0), (10, -1.0), (12, 2.0)],
            ..SamplingParams::default()
        };
        assert!(p.validate_token_ids(13).is_ok());
        assert_eq!(
            p.validate_token_ids(10).unwrap_err(),
            "token_id(s) [10, 12] in logit_bias contain out-of-vocab token ids. \
             Vocabulary size: 10"
        );
    }

    #[test]
    fn needs_logits_only_beyond_plain_greedy() {
        let greedy = SamplingParams::greedy();
        assert!(!greedy.needs_logits());
        // Temperature, min-p, top-k and top-p: drawn on the GPU.
        let p = SamplingParams {
            min_p: 0.1,
            top_k: 40,
            top_p: 0.9,
            ..Default::default()
        };
        assert!(p.sampled_on_gpu() && !p.needs_logits());
        // More top logprobs than the GPU returns: the CPU sampler.
        let p = SamplingParams {
            repetition_penalty: 1.2,
            logprobs: Some(40),
            ..Default::default()
        };
        assert!(!p.sampled_on_gpu() && p.needs_logits());
        assert!(!greedy.sampled_on_gpu());
        let with = |edit: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::greedy();
            edit(&mut p);
            p.needs_logits()
        };
        // Logprobs come from the GPU up to its limit, beyond it from the host.
        assert!(!with(|p| p.logprobs = Some(20)));
        assert!(with(|p| p.logprobs = Some(33)));
        // Penalties, bias and min_tokens are applied on the GPU.
        assert!(!with(|p| p.repetition_penalty = 1.1));
        assert!(!with(|p| p.presence_penalty = 0.5));
        assert!(!with(|p| p.frequency_penalty = -0.5));
        assert!(!with(|p| p.logit_bias = vec![(1, 1.0)]));
        assert!(!with(|p| p.min_tokens = 2));
        // Truncation settings do not matter for argmax.
        assert!(!with(|p| p.top_k = 5));
        assert!(!with(|p| p.prompt_logprobs = Some(1)));
    }

    #[test]
    fn stop_lengths_count_characters() {
        let mut p = SamplingParams::default();
        assert_eq!(p.max_stop_len(), 0);
        assert_eq!(p.output_text_buffer_length(), 0);
        p.stop = vec!["ab".into(), "日本語!".into()];
        assert_eq!(p.max_stop_len(), 4);
        assert_eq!(p.output_text_buffer_length(), 3);
        p.include_stop_str_in_output = true;
        assert_eq!(p.output_text_buffer_length(), 0);
    }

    #[test]
    fn finish_reasons_as_strings() {
        assert_eq!(FinishReason::Stop.as_str(), "stop");
        assert_eq!(FinishReason::Length.as_str(), "length");
        assert_eq!(FinishReason::Abort.to_string(), "abort");
        assert_ne!(StopReason::Token(3), StopReason::Text("3".into()));
    }
}
