//! CPU sampling of one logits row with vLLM v1's semantics (`vllm/v1/sample/sampler.py`).
//!
//! The steps, in vLLM's order:
//! 1. Raw logprobs (log-softmax of the unprocessed row) for the returned logprobs.
//! 2. Logits processors that can change the argmax: `min_tokens` (eos and the stop token
//!    ids to -inf while the output is shorter), then `logit_bias`.
//! 3. Penalties: repetition (prompt and output tokens), frequency, presence (output).
//! 4. Greedy: argmax, ties to the lowest id. Otherwise: temperature, min-p, top-k, top-p,
//!    and a draw with the sequence's own generator.
//!
//! vLLM draws with an exponential race (`probs / Exp(1)` then argmax), which costs one
//! random number per vocabulary entry; here the draw is an inverse-CDF walk with a single
//! uniform number, which has the same distribution. Tokens therefore differ from vLLM's for
//! a given seed, but a given seed, parameter set and sequence of rows always gives the same
//! tokens.
//!
//! Cost on a 151,936-entry row: a few linear passes. Top-k uses `select_nth_unstable`, and
//! top-p sorts only as many of the most likely candidates as its nucleus needs (growing the
//! sorted prefix geometrically), not the whole vocabulary.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::params::{SamplingParams, MIN_TEMPERATURE};
use vllm_apple_ops::kernels::logprobs::RowLogprobs;
use vllm_apple_ops::kernels::sample::LogitAdjust;

/// The first top-p prefix sorted; it grows by at least this much (and at least doubles)
/// until it holds the nucleus.
const TOP_P_FIRST_PREFIX: usize = 256;

/// Per-sequence sampling state, owned by the engine (one per sequence).
#[derive(Debug, Clone)]
pub struct SeqSampling {
    /// This sequence's random generator; consumed once per non-greedy sample.
    rng: StdRng,
}

impl SeqSampling {
    /// The one uniform draw in [0, 1) a GPU-sampled token takes from this sequence's
    /// generator (as a CPU sample takes one), as f32 strictly below 1.
    pub fn uniform_f32(&mut self) -> f32 {
        let u: f64 = self.rng.random();
        (u as f32).min(1.0 - f32::EPSILON / 2.0)
    }

    /// Seeds the generator from `params.seed`, or else from `fallback_seed`, which the
    /// engine derives from its own seed and a per-sequence counter.
    pub fn new(params: &SamplingParams, fallback_seed: u64) -> Self {
        SeqSampling {
            rng: StdRng::seed_from_u64(params.seed.unwrap_or(fallback_seed)),
        }
    }
}

/// A token with its log-probability under the raw logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogprob {
    /// The token id.
    pub token: u32,
    /// Log-softmax of the raw logits at this token.
    pub logprob: f32,
    /// 1-based rank in the vocabulary. For a sampled or prompt token: one more than the
    /// number of tokens with a strictly larger logprob. For entries of a top-N list: their
    /// position in it (as vLLM's `1..=N`).
    pub rank: usize,
}

/// One sampled token and its logprobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The sampled token id.
    pub token: u32,
    /// Log-softmax of the raw logits (vLLM's default `raw_logprobs`) at the sampled token,
    /// with its rank.
    pub logprob: TokenLogprob,
    /// The top-N (`params.logprobs`) tokens by raw logprob, best first (ties to the lower
    /// id); empty when `logprobs` is `None`.
    pub top: Vec<TokenLogprob>,
}

/// Samples one token from `logits`, the raw row over the vocabulary.
///
/// `prompt` and `output` are the sequence's token ids so far: the repetition penalty looks
/// at both, the presence and frequency penalties at `output` only, as vLLM. `eos` is the
/// model's end-of-sequence id: while `output.len() < params.min_tokens`, it and
/// `params.stop_token_ids` are masked (vLLM's `MinTokensLogitsProcessor`, which masks eos
/// even with `ignore_eos`). Token ids outside the row are ignored. Never panics: an empty
/// row gives token 0 with logprob -inf, and rows without any finite logit after
/// processing fall back to the argmax.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    prompt: &[u32],
    output: &[u32],
    eos: Option<u32>,
    state: &mut SeqSampling,
) -> Sampled {
    let processed = apply_logits_processors(logits, params, prompt, output, eos);
    let token = if params.is_greedy() {
        argmax(&processed)
    } else {
        random_sample(processed.into_owned(), params, &mut state.rng)
    };
    let (logprob, top) = logprobs_of(logits, token, params.logprobs.unwrap_or(0));
    Sampled {
        token,
        logprob,
        top,
    }
}

/// [`logprobs_of`] from what the GPU returns for a row (`kernels::logprobs`): the sampled
/// token's logprob and rank, and the top `n` of the candidates, best first (ties to the
/// lower id).
pub fn logprobs_from_gpu(
    token: u32,
    row: &RowLogprobs,
    n: usize,
) -> (TokenLogprob, Vec<TokenLogprob>) {
    let mut top: Vec<(u32, f32)> = row
        .top
        .iter()
        .map(|&(id, x)| (id, if x.is_nan() { f32::NEG_INFINITY } else { x }))
        .collect();
    top.sort_unstable_by(best_first);
    top.truncate(n);
    (
        TokenLogprob {
            token,
            logprob: row.logit - row.lse,
            rank: row.rank as usize,
        },
        top.into_iter()
            .enumerate()
            .map(|(position, (id, x))| TokenLogprob {
                token: id,
                logprob: x - row.lse,
                rank: position + 1,
            })
            .collect(),
    )
}

/// The raw logprob and rank of `token` in `logits`, and the top `n` tokens by logprob, best
/// first (ties to the lower id); used for sampled tokens and for prompt logprobs. NaN
/// logits count as -inf; a token outside the row has logprob -inf.
pub fn logprobs_of(logits: &[f32], token: u32, n: usize) -> (TokenLogprob, Vec<TokenLogprob>) {
    let log_norm = log_sum_exp(logits);
    let logprob_at = |i: usize| logits.get(i).map_or(f32::NEG_INFINITY, |&x| x - log_norm);
    let own = logprob_at(token as usize);
    // Compare logprobs rather than logits, as vLLM's `batched_count_greater_than` does.
    let rank = 1 + logits.iter().filter(|&&x| x - log_norm > own).count();
    let top = top_n(logits, n)
        .into_iter()
        .enumerate()
        .map(|(position, id)| TokenLogprob {
            token: id,
            logprob: logprob_at(id as usize),
            rank: position + 1,
        })
        .collect();
    (
        TokenLogprob {
            token,
            logprob: own,
            rank,
        },
        top,
    )
}

/// `ln Σ exp(x)` over the row, skipping NaN; -inf for an empty or all -inf row.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = max_value(row);
    if !max.is_finite() {
        return max;
    }
    let total: f64 = block_sums_of_exp(row, max).iter().sum();
    max + total.ln() as f32
}

/// Lanes of the vectorizable reductions over a row.
const LANES: usize = 8;

/// The largest non-NaN value of the row (-inf when there is none; +inf if present).
fn max_value(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            // NaN compares false and is skipped.
            if x > *lane {
                *lane = x;
            }
        }
    }
    lanes
        .iter()
        .chain(chunks.remainder())
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `exp(x)` for `x <= 0` (Cephes' `expf`: `x = n ln 2 + r`, a degree-6 polynomial in `r`,
/// `2^n` from exponent bits), about 1 ulp from `f32::exp`. Branch-free so that loops over
/// a row vectorize, unlike calls into libm. Below `ln(f32::MIN_POSITIVE)` (including -inf)
/// and for NaN it returns 0; positive `x` is treated as 0.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const MIN_ARG: f32 = -87.33;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUNDING: f32 = 12_582_912.0;
    let clamped = x.clamp(MIN_ARG, 0.0);
    let rounded = clamped * std::f32::consts::LOG2_E + ROUNDING;
    let n = rounded - ROUNDING;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let exp_r = p * r * r + r + 1.0;
    // 2^n: the biased exponent n + 127 (in 1..=127 here) shifted into place.
    let biased = rounded
        .to_bits()
        .wrapping_sub(ROUNDING.to_bits())
        .wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    if x >= MIN_ARG {
        exp_r * scale
    } else {
        0.0
    }
}

/// Entries per block of [`block_sums_of_exp`].
const SUM_BLOCK: usize = 1024;

/// `Σ exp(x - shift)` over consecutive blocks of [`SUM_BLOCK`] entries (NaN and -inf count
/// as 0): [`LANES`] f32 lanes inside a block, so that the loop vectorizes, and f64 per block.
/// `shift` must be at least the row's largest value.
fn block_sums_of_exp(row: &[f32], shift: f32) -> Vec<f64> {
    row.chunks(SUM_BLOCK)
        .map(|block| {
            let mut lanes = [0.0f32; LANES];
            let mut eights = block.chunks_exact(LANES);
            for eight in &mut eights {
                for (lane, &x) in lanes.iter_mut().zip(eight) {
                    *lane += exp_nonpositive(x - shift);
                }
            }
            let tail: f32 = eights
                .remainder()
                .iter()
                .map(|&x| exp_nonpositive(x - shift))
                .sum();
            lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + f64::from(tail)
        })
        .collect()
}

/// Index of the largest value, ties to the lowest index, NaN skipped; 0 when no value is
/// larger than -inf (as `torch.argmax` of an all -inf row).
fn argmax(row: &[f32]) -> u32 {
    // Each lane keeps its first maximum; lanes are merged by value, then by index.
    let mut values = [f32::NEG_INFINITY; LANES];
    let mut indices = [u32::MAX; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for (c, chunk) in (&mut chunks).enumerate() {
        for (lane, &x) in chunk.iter().enumerate() {
            if x > values[lane] {
                values[lane] = x;
                indices[lane] = (c * LANES + lane) as u32;
            }
        }
    }
    let tail_start = row.len() - chunks.remainder().len();
    let tail = chunks
        .remainder()
        .iter()
        .enumerate()
        .map(|(i, &x)| ((tail_start + i) as u32, x));
    let mut best = (0u32, f32::NEG_INFINITY);
    for (index, value) in indices.into_iter().zip(values).chain(tail) {
        if value > best.1 || (value == best.1 && value > f32::NEG_INFINITY && index < best.0) {
            best = (index, value);
        }
    }
    best.0
}

/// Orders `(id, value)` pairs best first: larger value, then lower id.
fn best_first(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Up to this many top entries are found by one scan keeping a sorted list; more by
/// `select_nth_unstable`.
const SCAN_TOP_N: usize = 64;

/// Ids of the `n` largest values of the row, best first, ties to the lower id, NaN last.
fn top_n(row: &[f32], n: usize) -> Vec<u32> {
    let n = n.min(row.len());
    if n == 0 {
        return Vec::new();
    }
    let pair = |(i, &x): (usize, &f32)| (i as u32, if x.is_nan() { f32::NEG_INFINITY } else { x });
    let mut best: Vec<(u32, f32)>;
    if n <= SCAN_TOP_N {
        best = Vec::with_capacity(n + 1);
        for candidate in row.iter().enumerate().map(pair) {
            if best.len() == n && best_first(&candidate, &best[n - 1]) != Ordering::Less {
                continue;
            }
            let position = best.partition_point(|e| best_first(e, &candidate) == Ordering::Less);
            best.insert(position, candidate);
            best.truncate(n);
        }
    } else {
        best = row.iter().enumerate().map(pair).collect();
        if n < best.len() {
            best.select_nth_unstable_by(n - 1, best_first);
            best.truncate(n);
        }
        best.sort_unstable_by(best_first);
    }
    best.into_iter().map(|(id, _)| id).collect()
}

/// The logits processors that can change the argmax, then the penalties (steps 2 and 3 of
/// the module documentation). Borrows the row when none applies.
pub fn apply_logits_processors<'a>(
    logits: &'a [f32],
    params: &SamplingParams,
    prompt: &[u32],
    output: &[u32],
    eos: Option<u32>,
) -> Cow<'a, [f32]> {
    let mask_stop_tokens = output.len() < params.min_tokens;
    if !mask_stop_tokens && params.logit_bias.is_empty() && !params.has_penalties() {
        return Cow::Borrowed(logits);
    }
    let mut row = logits.to_vec();
    if mask_stop_tokens {
        for &id in params.stop_token_ids.iter().chain(eos.iter()) {
            if let Some(x) = row.get_mut(id as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    apply_logit_bias(&mut row, &params.logit_bias);
    if params.has_penalties() {
        apply_penalties(&mut row, params, prompt, output);
    }
    Cow::Owned(row)
}

/// What [`apply_logits_processors`] does to row `row` of a batch, as per-token entries
/// for the GPU (`kernels::sample::adjust`), which applies the same f32 operations in the
/// same order: the processed logits come out the same, within one rounding where a driver
/// fuses the penalty's multiply and the subtraction after it.
pub fn logit_adjustments(
    row: u32,
    vocab: usize,
    params: &SamplingParams,
    prompt: &[u32],
    output: &[u32],
    eos: Option<u32>,
) -> Vec<LogitAdjust> {
    let mut by_token: HashMap<u32, LogitAdjust> = HashMap::new();
    let blank = |token| LogitAdjust {
        row,
        token,
        mask: false,
        bias: 0.0,
        inv_repetition: 1.0,
        repetition: 1.0,
        frequency: 0.0,
        presence: 0.0,
    };
    let in_vocab = |id: &u32| (*id as usize) < vocab;
    if output.len() < params.min_tokens {
        for &id in params
            .stop_token_ids
            .iter()
            .chain(eos.iter())
            .filter(|id| in_vocab(id))
        {
            by_token.entry(id).or_insert_with(|| blank(id)).mask = true;
        }
    }
    for (&id, &bias) in params
        .logit_bias
        .iter()
        .map(|(id, b)| (id, b))
        .collect::<HashMap<_, _>>()
        .iter()
    {
        if in_vocab(id) {
            by_token.entry(*id).or_insert_with(|| blank(*id)).bias = *bias;
        }
    }
    if params.has_penalties() {
        let mut output_counts: HashMap<u32, u32> = HashMap::new();
        for &id in output.iter().filter(|id| in_vocab(id)) {
            *output_counts.entry(id).or_insert(0) += 1;
        }
        if params.repetition_penalty != 1.0 {
            let penalty = params.repetition_penalty;
            for id in prompt
                .iter()
                .copied()
                .filter(in_vocab)
                .chain(output_counts.keys().copied())
            {
                let a = by_token.entry(id).or_insert_with(|| blank(id));
                a.inv_repetition = 1.0 / penalty;
                a.repetition = penalty;
            }
        }
        for (id, count) in output_counts {
            let a = by_token.entry(id).or_insert_with(|| blank(id));
            a.frequency = params.frequency_penalty * count as f32;
            a.presence = params.presence_penalty;
        }
    }
    let mut v: Vec<LogitAdjust> = by_token.into_values().collect();
    v.sort_by_key(|a| a.token);
    v
}

/// Adds each token's bias; a token listed more than once takes its last bias.
fn apply_logit_bias(row: &mut [f32], logit_bias: &[(u32, f32)]) {
    let biases: HashMap<u32, f32> = logit_bias.iter().copied().collect();
    for (id, bias) in biases {
        if let Some(x) = row.get_mut(id as usize) {
            *x += bias;
        }
    }
}

/// vLLM's `apply_penalties`: the repetition penalty on tokens of the prompt or the output
/// (positive logits divided by it, others multiplied), then `frequency_penalty` times the
/// output count and `presence_penalty` once for tokens of the output.
fn apply_penalties(row: &mut [f32], params: &SamplingParams, prompt: &[u32], output: &[u32]) {
    let in_vocab = |id: &u32| (*id as usize) < row.len();
    let mut output_counts: HashMap<u32, u32> = HashMap::new();
    for &id in output.iter().filter(|id| in_vocab(id)) {
        *output_counts.entry(id).or_insert(0) += 1;
    }
    if params.repetition_penalty != 1.0 {
        let penalty = params.repetition_penalty;
        let seen: HashSet<u32> = prompt
            .iter()
            .copied()
            .filter(in_vocab)
            .chain(output_counts.keys().copied())
            .collect();
        for id in seen {
            let x = &mut row[id as usize];
            *x *= if *x > 0.0 { 1.0 / penalty } else { penalty };
        }
    }
    for (id, count) in output_counts {
        let x = &mut row[id as usize];
        *x -= params.frequency_penalty * count as f32;
        *x -= params.presence_penalty;
    }
}

/// Step 4 for non-greedy parameters: temperature, min-p, top-k, top-p, then one draw.
fn random_sample(mut row: Vec<f32>, params: &SamplingParams, rng: &mut StdRng) -> u32 {
    let temperature = params.temperature.max(MIN_TEMPERATURE);
    for x in &mut row {
        *x /= temperature;
    }
    let max = max_value(&row);
    if !max.is_finite() {
        // Nothing finite to sample from (or an infinite logit): as argmax would pick.
        return argmax(&row);
    }
    // Always one draw per random sample, so later draws do not depend on the row.
    let u: f64 = rng.random();
    let truncates = params.min_p > 0.0
        || (params.top_k > 0 && (params.top_k as usize) < row.len())
        || params.top_p < 1.0;
    let drawn = if truncates {
        let weights: Vec<f32> = row.iter().map(|&x| exp_nonpositive(x - max)).collect();
        let candidates = truncated_candidates(&row, &weights, params);
        draw(
            candidates.iter().map(|&(id, _)| (id, weights[id as usize])),
            u,
        )
    } else {
        draw_from_row(&row, max, u)
    };
    drawn.unwrap_or_else(|| argmax(&row))
}

/// Inverse-CDF draw over `(id, weight)` pairs with `u` in `[0, 1)`; `None` when all weights
/// are 0.
fn draw(weights: impl Iterator<Item = (u32, f32)> + Clone, u: f64) -> Option<u32> {
    let total: f64 = weights.clone().map(|(_, w)| f64::from(w)).sum();
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last_positive = None;
    for (id, w) in weights {
        if w > 0.0 {
            cumulative += f64::from(w);
            last_positive = Some(id);
            if cumulative > target {
                return Some(id);
            }
        }
    }
    // Rounding can leave the target at the very end.
    last_positive
}

/// [`draw`] over the whole row with weights `exp(x - max)`, finding the block by its sum
/// first so that only one block is walked entry by entry.
fn draw_from_row(row: &[f32], max: f32, u: f64) -> Option<u32> {
    let block_sums = block_sums_of_exp(row, max);
    let total: f64 = block_sums.iter().sum();
    let mut target = u * total;
    let last_block = block_sums.iter().rposition(|&s| s > 0.0)?;
    let block = block_sums
        .iter()
        .position(|&s| {
            if target < s {
                true
            } else {
                target -= s;
                false
            }
        })
        .unwrap_or(last_block);
    let start = block * SUM_BLOCK;
    let end = (start + SUM_BLOCK).min(row.len());
    let weights = row[start..end]
        .iter()
        .enumerate()
        .map(|(i, &x)| ((start + i) as u32, exp_nonpositive(x - max)));
    // The chosen block has positive mass; the target becomes a share of it.
    draw(weights, (target / block_sums[block]).clamp(0.0, 1.0))
}

/// The `(id, scaled logit)` pairs left after min-p, top-k and top-p (vLLM's order: min-p
/// is an argmax-invariant logits processor applied before `apply_top_k_top_p`).
/// `weights[i]` is `exp(row[i] - max)`; -inf entries are never candidates.
fn truncated_candidates(row: &[f32], weights: &[f32], params: &SamplingParams) -> Vec<(u32, f32)> {
    // min-p: p_i >= min_p * p_max  <=>  exp(x_i - max) >= min_p.
    let min_p = params.min_p;
    let mut candidates: Vec<(u32, f32)> = row
        .iter()
        .zip(weights)
        .enumerate()
        .filter(|&(_, (&x, &w))| x > f32::NEG_INFINITY && (min_p <= 0.0 || w >= min_p))
        .map(|(i, (&x, _))| (i as u32, x))
        .collect();

    // top-k: keep every value >= the k-th largest (ties at the boundary included), as
    // vLLM's `logits < kth_value` mask. 0, -1 and k >= vocab disable it.
    if params.top_k > 0 && (params.top_k as usize) < candidates.len() {
        let k = params.top_k as usize;
        let (_, &mut (_, kth_value), _) = candidates.select_nth_unstable_by(k - 1, best_first);
        candidates.retain(|&(_, x)| x >= kth_value);
    }

    if params.top_p < 1.0 {
        apply_top_p(&mut candidates, weights, params.top_p);
    }
    candidates
}

/// vLLM's top-p: sorted ascending, a token is masked when the cumulative probability up to
/// and including it is <= 1 - p, the most likely token never. Equivalently, best first, a
/// token is kept while the probability mass before it is < p. Only the best-first prefix
/// that reaches mass p is sorted; `candidates` is left as that kept prefix.
fn apply_top_p(candidates: &mut Vec<(u32, f32)>, weights: &[f32], top_p: f32) {
    let weight = |id: u32| f64::from(weights[id as usize]);
    let total: f64 = candidates.iter().map(|&(id, _)| weight(id)).sum();
    let threshold = f64::from(top_p) * total;
    let mut mass_before = 0.0;
    let mut sorted = 0;
    while sorted < candidates.len() {
        let grow = sorted.max(TOP_P_FIRST_PREFIX);
        let end = sorted.saturating_add(grow).min(candidates.len());
        let rest = &mut candidates[sorted..];
        let chunk = end - sorted;
        if chunk < rest.len() {
            rest.select_nth_unstable_by(chunk - 1, best_first);
        }
        rest[..chunk].sort_unstable_by(best_first);
        for position in sorted..end {
            if position > 0 && mass_before >= threshold {
                candidates.truncate(position);
                return;
            }
            mass_before += weight(candidates[position].0);
        }
        sorted = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(edit: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        edit(&mut p);
        p.validate().expect("test parameters are valid");
        p
    }

    /// Logits whose softmax is `probs` (which sum to 1).
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    /// Counts how often each token is drawn in `draws` samples.
    fn histogram(logits: &[f32], p: &SamplingParams, draws: usize) -> Vec<usize> {
        let mut state = SeqSampling::new(p, 7);
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            counts[sample(logits, p, &[], &[], None, &mut state).token as usize] += 1;
        }
        counts
    }

    /// A reproducible pseudo-random row.
    fn random_row(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..len)
            .map(|_| rng.random::<f32>() * scale - scale / 2.0)
            .collect()
    }

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0.0f32;
        for i in 0..200_000 {
            let x = -(i as f32) * 4.35e-4;
            let (fast, exact) = (exp_nonpositive(x), x.exp());
            worst = worst.max((fast - exact).abs() / exact);
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(f32::NAN), 0.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
    }

    #[test]
    fn draws_across_blocks_follow_the_softmax() {
        // Mass in three blocks: ids 5 (1/2), 2000 (1/4) and 2999 (1/4), the rest ~0.
        let mut row = vec![-40.0f32; 3000];
        row[5] = 2f32.ln();
        row[2000] = 0.0;
        row[2999] = 0.0;
        let counts = histogram(&row, &SamplingParams::default(), 8000);
        let share = |id: usize| counts[id] as f64 / 8000.0;
        assert!((share(5) - 0.5).abs() < 0.03, "{}", share(5));
        assert!((share(2000) - 0.25).abs() < 0.03, "{}", share(2000));
        assert!((share(2999) - 0.25).abs() < 0.03, "{}", share(2999));
    }

    #[test]
    fn greedy_is_argmax_with_ties_to_lowest_id() {
        let p = SamplingParams::greedy();
        let mut state = SeqSampling::new(&p, 0);
        let row = [0.5, 3.0, -1.0, 3.0, f32::NAN];
        assert_eq!(sample(&row, &p, &[], &[], None, &mut state).token, 1);
        let row = [f32::NEG_INFINITY; 4];
        assert_eq!(sample(&row, &p, &[], &[], None, &mut state).token, 0);
    }

    #[test]
    fn temperature_one_follows_the_softmax() {
        let row = logits_of(&[0.25, 0.75]);
        let counts = histogram(&row, &SamplingParams::default(), 8000);
        let share = counts[1] as f64 / 8000.0;
        assert!((share - 0.75).abs() < 0.03, "share {share}");
    }

    #[test]
    fn low_temperature_sharpens() {
        let row = logits_of(&[0.4, 0.6]);
        let counts = histogram(&row, &params(|p| p.temperature = 0.05), 2000);
        // (0.6/0.4)^20 ≈ 3325 : 1.
        assert!(counts[1] >= 1990, "{counts:?}");
    }

    #[test]
    fn top_k_never_picks_beyond_k() {
        let row = [2.0, 1.9, 1.8, 1.7, 1.6];
        let counts = histogram(&row, &params(|p| p.top_k = 2), 3000);
        assert!(counts[0] > 1000 && counts[1] > 1000, "{counts:?}");
        assert_eq!(counts[2..].iter().sum::<usize>(), 0, "{counts:?}");
    }

    #[test]
    fn top_k_keeps_ties_at_the_boundary() {
        let row = [1.0, 3.0, 2.0, 2.0, 0.0];
        let counts = histogram(&row, &params(|p| p.top_k = 2), 3000);
        assert!(
            counts[1] > 0 && counts[2] > 0 && counts[3] > 0,
            "{counts:?}"
        );
        assert_eq!(counts[0] + counts[4], 0, "{counts:?}");
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let row = logits_of(&[0.05, 0.5, 0.15, 0.3]);
        // Best first: 0.5, 0.3 (mass before 0.5 < 0.7), 0.15 (mass before 0.8 >= 0.7).
        let counts = histogram(&row, &params(|p| p.top_p = 0.7), 3000);
        assert!(counts[1] > 0 && counts[3] > 0, "{counts:?}");
        assert_eq!(counts[0] + counts[2], 0, "{counts:?}");
        // Renormalised over the nucleus: 0.5 / 0.8.
        let share = counts[1] as f64 / 3000.0;
        assert!((share - 0.625).abs() < 0.04, "share {share}");

        let counts = histogram(&row, &params(|p| p.top_p = 0.85), 3000);
        assert!(counts[2] > 0 && counts[0] == 0, "{counts:?}");

        // A tiny top_p keeps only the most likely token.
        let counts = histogram(&row, &params(|p| p.top_p = 1e-6), 200);
        assert_eq!(counts[1], 200, "{counts:?}");
    }

    #[test]
    fn min_p_drops_tokens_below_its_share_of_the_best() {
        let row = logits_of(&[0.6, 0.25, 0.1, 0.05]);
        // Threshold 0.2 * 0.6 = 0.12.
        let counts = histogram(&row, &params(|p| p.min_p = 0.2), 3000);
        assert!(counts[0] > 0 && counts[1] > 0, "{counts:?}");
        assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
    }

    #[test]
    fn min_p_applies_after_temperature() {
        // At temperature 0.5 the shares become 0.36 : 0.0625 : 0.01 (relative), so with
        // min_p 0.1 token 1 (0.0625/0.36 = 0.17) stays and token 2 (0.028) goes.
        let row = logits_of(&[0.6, 0.25, 0.1, 0.05]);
        let counts = histogram(
            &row,
            &params(|p| {
                p.temperature = 0.5;
                p.min_p = 0.1
            }),
            4000,
        );
        assert!(counts[1] > 0, "{counts:?}");
        assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
    }

    /// vLLM's masks computed the literal way (full ascending sort and cumulative sum).
    fn reference_kept(row: &[f32], p: &SamplingParams) -> Vec<u32> {
        let scaled: Vec<f32> = row.iter().map(|x| x / p.temperature).collect();
        let max = max_value(&scaled);
        let mut masked: Vec<f32> = scaled
            .iter()
            .map(|&x| {
                if p.min_p > 0.0 && (x - max).exp() < p.min_p {
                    f32::NEG_INFINITY
                } else {
                    x
                }
            })
            .collect();
        let mut ascending: Vec<u32> = (0..row.len() as u32).collect();
        ascending.sort_by(|&a, &b| masked[a as usize].total_cmp(&masked[b as usize]));
        if p.top_k > 0 {
            let kth = masked[ascending[row.len() - p.top_k as usize] as usize];
            for x in &mut masked {
                if *x < kth {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        let total: f64 = masked.iter().map(|&x| f64::from((x - max).exp())).sum();
        let mut cumulative = 0.0;
        let mut kept = Vec::new();
        for (position, &id) in ascending.iter().enumerate() {
            cumulative += f64::from((masked[id as usize] - max).exp()) / total;
            let last = position == ascending.len() - 1;
            if masked[id as usize] > f32::NEG_INFINITY
                && (last || cumulative > 1.0 - f64::from(p.top_p))
            {
                kept.push(id);
            }
        }
        kept.sort_unstable();
        kept
    }

    #[test]
    fn truncation_matches_the_literal_vllm_masks_on_a_full_vocabulary() {
        let row = random_row(151_936, 11, 20.0);
        for (top_k, top_p, min_p, temperature) in [
            (0, 0.9, 0.0, 1.0),
            (0, 0.999, 0.0, 2.0),
            (50, 0.9, 0.0, 1.0),
            (1000, 0.95, 0.0, 0.7),
            (0, 1.0, 0.05, 1.0),
            (40, 1.0, 0.0, 1.0),
            (0, 0.5, 0.01, 0.3),
        ] {
            let p = params(|p| {
                p.top_k = top_k;
                p.top_p = top_p;
                p.min_p = min_p;
                p.temperature = temperature;
            });
            let scaled: Vec<f32> = row.iter().map(|x| x / temperature).collect();
            let max = max_value(&scaled);
            let weights: Vec<f32> = scaled.iter().map(|&x| exp_nonpositive(x - max)).collect();
            let mut kept: Vec<u32> = truncated_candidates(&scaled, &weights, &p)
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            kept.sort_unstable();
            let expected = reference_kept(&row, &p);
            assert_eq!(
                kept.len(),
                expected.len(),
                "k={top_k} p={top_p} min_p={min_p}"
            );
            assert_eq!(kept, expected, "k={top_k} p={top_p} min_p={min_p}");
        }
    }

    #[test]
    fn penalties_follow_vllm_formulas() {
        let p = params(|p| {
            p.repetition_penalty = 2.0;
            p.frequency_penalty = 0.5;
            p.presence_penalty = 0.25;
        });
        let row = [2.0, -1.0, 0.5, 3.0, 1.0];
        let prompt = [0, 99];
        let output = [1, 2, 2, 1000];
        let out = apply_logits_processors(&row, &p, &prompt, &output, None);
        // Token 0: prompt only, repetition only: 2.0 / 2.
        // Token 1: output once: -1 * 2 - 0.5 * 1 - 0.25.
        // Token 2: output twice: 0.5 / 2 - 0.5 * 2 - 0.25.
        // Tokens 3 and 4: untouched; ids 99 and 1000 are outside the row.
        assert_eq!(&*out, &[1.0, -2.75, -1.0, 3.0, 1.0]);
    }

    #[test]
    fn negative_penalties_encourage_repeats() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = -2.0;
        });
        let mut state = SeqSampling::new(&p, 0);
        let row = [1.0, 0.0];
        assert_eq!(sample(&row, &p, &[], &[1], None, &mut state).token, 1);
        assert_eq!(sample(&row, &p, &[], &[], None, &mut state).token, 0);
    }

    #[test]
    fn logit_bias_shifts_logits_last_entry_wins() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.logit_bias = vec![(2, -100.0), (2, 5.0), (7, 100.0)];
        });
        let mut state = SeqSampling::new(&p, 0);
        let row = [1.0, 4.0, 0.0];
        assert_eq!(sample(&row, &p, &[], &[], None, &mut state).token, 2);
        let out = apply_logits_processors(&row, &p, &[], &[], None);
        assert_eq!(&*out, &[1.0, 4.0, 5.0]);
    }

    #[test]
    fn min_tokens_masks_eos_and_stop_tokens() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.min_tokens = 2;
            p.stop_token_ids = vec![1];
            p.ignore_eos = true; // vLLM masks eos for min_tokens regardless.
        });
        let mut state = SeqSampling::new(&p, 0);
        let row = [0.0, 5.0, 1.0, 9.0];
        let eos = Some(3);
        assert_eq!(sample(&row, &p, &[], &[], eos, &mut state).token, 2);
        assert_eq!(sample(&row, &p, &[], &[2], eos, &mut state).token, 2);
        assert_eq!(sample(&row, &p, &[], &[2, 2], eos, &mut state).token, 3);
        // An eos outside the row is ignored.
        assert_eq!(sample(&row, &p, &[], &[], Some(50), &mut state).token, 3);
        // Masked tokens are never drawn at random either.
        let p = params(|p| {
            p.min_tokens = 1;
            p.stop_token_ids = vec![1];
        });
        let mut state = SeqSampling::new(&p, 0);
        for _ in 0..300 {
            let token = sample(&row, &p, &[], &[], eos, &mut state).token;
            assert!(token != 1 && token != 3);
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let rows: Vec<Vec<f32>> = (0..40).map(|i| random_row(500, i, 6.0)).collect();
        let run = |seed: Option<u64>, fallback: u64| {
            let p = params(|p| {
                p.seed = seed;
                p.top_k = 50;
                p.top_p = 0.9;
            });
            let mut state = SeqSampling::new(&p, fallback);
            let mut output = Vec::new();
            for row in &rows {
                let token = sample(row, &p, &[], &output, None, &mut state).token;
                output.push(token);
            }
            output
        };
        // The request seed wins over the engine's fallback.
        assert_eq!(run(Some(42), 1), run(Some(42), 2));
        assert_ne!(run(Some(42), 1), run(Some(43), 1));
        // Without a seed, the fallback seeds the sequence.
        assert_eq!(run(None, 5), run(None, 5));
        assert_ne!(run(None, 5), run(None, 6));
    }

    #[test]
    fn logprobs_are_raw_log_softmax_with_ranks() {
        let row = [1.0, 3.0, 2.0, 3.0, -1.0];
        let (own, top) = logprobs_of(&row, 2, 5);
        let total: f32 = top.iter().map(|t| t.logprob.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        let ids: Vec<u32> = top.iter().map(|t| t.token).collect();
        assert_eq!(ids, [1, 3, 2, 0, 4]);
        let ranks: Vec<usize> = top.iter().map(|t| t.rank).collect();
        assert_eq!(ranks, [1, 2, 3, 4, 5]);
        assert_eq!(own.token, 2);
        assert_eq!(own.rank, 3);
        let lse = (row.iter().map(|x: &f32| x.exp()).sum::<f32>()).ln();
        assert!((own.logprob - (2.0 - lse)).abs() < 1e-6);
        // A tied token's rank counts only strictly better ones.
        assert_eq!(logprobs_of(&row, 3, 0).0.rank, 1);
        assert!(logprobs_of(&row, 3, 0).1.is_empty());
        // Out of range: -inf, ranked last.
        let (far, _) = logprobs_of(&row, 99, 1);
        assert_eq!(far.logprob, f32::NEG_INFINITY);
        assert_eq!(far.rank, 6);
    }

    #[test]
    fn sampled_logprobs_ignore_processing() {
        let p = params(|p| {
            p.temperature = 0.5;
            p.repetition_penalty = 1.5;
            p.logit_bias = vec![(0, 3.0)];
            p.logprobs = Some(2);
        });
        let row = random_row(1000, 3, 8.0);
        let mut state = SeqSampling::new(&p, 9);
        let sampled = sample(&row, &p, &[1, 2, 3], &[4], None, &mut state);
        let (own, top) = logprobs_of(&row, sampled.token, 2);
        assert_eq!(sampled.logprob, own);
        assert_eq!(sampled.top, top);
        assert_eq!(sampled.top.len(), 2);
        assert!(sampled.top[0].logprob >= sampled.top[1].logprob);
        // Without logprobs, no top list, but the sampled token's own logprob is there.
        let p = params(|p| p.temperature = 0.0);
        let sampled = sample(&row, &p, &[], &[], None, &mut state);
        assert!(sampled.top.is_empty());
        assert_eq!(sampled.logprob.rank, 1);
    }

    #[test]
    fn degenerate_rows_do_not_panic() {
        let p = SamplingParams::default();
        let mut state = SeqSampling::new(&p, 0);
        let empty = sample(&[], &p, &[], &[], Some(0), &mut state);
        assert_eq!(empty.token, 0);
        assert_eq!(empty.logprob.logprob, f32::NEG_INFINITY);
        let nan = [f32::NAN, f32::NAN];
        assert!(sample(&nan, &p, &[], &[], None, &mut state).token < 2);
        let inf = [0.0, f32::INFINITY, 1.0];
        assert_eq!(sample(&inf, &p, &[], &[], None, &mut state).token, 1);
        let masked = [f32::NEG_INFINITY, 0.5];
        for _ in 0..50 {
            assert_eq!(sample(&masked, &p, &[], &[], None, &mut state).token, 1);
        }
        // Unvalidated parameters are tolerated.
        let wild = SamplingParams {
            temperature: f32::NAN,
            top_k: 1_000_000,
            top_p: 7.0,
            min_p: -1.0,
            repetition_penalty: 0.0,
            ..SamplingParams::default()
        };
        let row = [0.1, 0.2, 0.3];
        assert!(sample(&row, &wild, &[0], &[1], None, &mut state).token < 3);
    }
}
