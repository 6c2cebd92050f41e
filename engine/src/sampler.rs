//! Per-request token sampling on the CPU: pure logic over one row of logits, no tensors.
//!
//! A [`SequenceSampler`] is created when a request enters the engine and lives as long as the
//! request, preemption included. It owns the request's random generator (a `ChaCha8Rng` seeded
//! from `SamplingParams::seed`, or from OS entropy when there is none) and its output-token
//! counts, so a token depends only on this request's logits, parameters and history, never on
//! what else shares the batch.
//!
//! # Processing order
//!
//! [`SequenceSampler::sample`] rewrites the logits in place, in this order:
//!
//! 0. NaN logits become `-inf` (never sampled); `+inf` is clamped to `f32::MAX`.
//! 1. `logit_bias` is added.
//! 2. `min_tokens`: while fewer than `min_tokens` tokens were generated, the model's EOS ids
//!    (unless `ignore_eos`: then EOS ends nothing and is left alone) and `stop_token_ids` get
//!    `-inf`.
//! 3. `repetition_penalty` (HF semantics) on every distinct token of prompt and output:
//!    a positive logit is divided by the penalty, a negative one multiplied.
//! 4. `presence_penalty` and `frequency_penalty` (OpenAI semantics) on the output tokens:
//!    `logit -= presence + frequency * count`.
//! 5. Logprobs, when `logprobs` is `Some`, are `log_softmax` of these processed logits: they
//!    include bias, masking and penalties but NOT temperature, top-k, top-p or min-p.
//! 6. `temperature == 0`: argmax, ties to the lowest id. Otherwise `softmax(logits / T)`,
//!    restricted by `top_k`, then `top_p` (the smallest set of most likely tokens whose mass
//!    reaches `top_p`), then `min_p` (drop tokens less likely than `min_p` times the most
//!    likely one), renormalised and sampled with the request's generator. Ties in rank are
//!    broken by the lower id.
//!
//! If every logit is `-inf` (all masked or NaN) the result is token 0 with logprob `-inf`.
//!
//! # Cost
//!
//! A handful of O(vocab) passes and no full sort: top-k keeps a buffer of at most `2k`
//! candidates trimmed with `select_nth_unstable`; top-p without top-k first drops tokens too
//! unlikely to be in any nucleus (probability below `(1 - top_p) / vocab`), then sorts the
//! survivors chunk by chunk until the nucleus is complete. Weights below `e^-87` of the best
//! token's count as 0 (skips slow subnormal `exp`). Scratch buffers are reused across steps.

use std::cmp::Ordering;
use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::sampling_params::{SamplingParams, MAX_TOP_LOGPROBS};

const NEG_INF: f32 = f32::NEG_INFINITY;

/// First chunk of the candidates sorted while searching the top-p nucleus (grows 4x).
const NUCLEUS_FIRST_CHUNK: usize = 256;

/// One sampled token and, when asked for, its logprobs.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    /// Logprob of `token` under the processed logits (see the module docs). NaN when
    /// `params.logprobs` is `None`: then it is not computed.
    pub logprob: f32,
    /// The most likely tokens with their logprobs, most likely first (ties: lower id first);
    /// `min(params.logprobs, MAX_TOP_LOGPROBS, vocab)` entries.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Per-request sampling state, created when the request enters the engine and kept across
/// steps (and across preemption).
#[derive(Debug)]
pub struct SequenceSampler {
    rng: ChaCha8Rng,
    /// Whether `prompt_ids` was filled (only needed for the repetition penalty).
    tracks_prompt: bool,
    /// Distinct prompt token ids, sorted.
    prompt_ids: Vec<u32>,
    /// Occurrences of each token in the first `num_counted_outputs` output tokens.
    output_counts: HashMap<u32, u32>,
    /// Distinct output ids that are not in `prompt_ids`, in order of first appearance.
    output_only_ids: Vec<u32>,
    num_counted_outputs: usize,
    /// Scratch: `(token, processed logit)` candidates for top-k / top-p.
    candidates: Vec<(u32, f32)>,
}

impl SequenceSampler {
    /// `params` must be the request's parameters, the same ones later passed to `sample`.
    pub fn new(params: &SamplingParams, prompt_tokens: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        let tracks_prompt = params.repetition_penalty != 1.0;
        let mut prompt_ids = Vec::new();
        if tracks_prompt {
            prompt_ids.extend_from_slice(prompt_tokens);
            prompt_ids.sort_unstable();
            prompt_ids.dedup();
        }
        Self {
            rng,
            tracks_prompt,
            prompt_ids,
            output_counts: HashMap::new(),
            output_only_ids: Vec::new(),
            num_counted_outputs: 0,
            candidates: Vec::new(),
        }
    }

    /// Picks the next token.
    ///
    /// `logits`: the model's raw logits for this sequence's next token (len = vocab); used as
    /// scratch. `output_tokens`: every token generated so far (it only ever grows; counts are
    /// synced by length and rebuilt if it shrank). `eos_token_ids`: the model's end ids,
    /// masked while fewer than `min_tokens` tokens were generated unless `ignore_eos`.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        params: &SamplingParams,
        output_tokens: &[u32],
        eos_token_ids: &[u32],
    ) -> SampledToken {
        debug_assert!(!logits.is_empty(), "sampling from an empty vocabulary");
        self.sync_output_counts(output_tokens);

        sanitize(logits);
        for &(token, bias) in params.logit_bias.iter().filter(|(_, b)| !b.is_nan()) {
            if let Some(x) = logits.get_mut(token as usize) {
                *x = clean(*x + bias);
            }
        }
        if output_tokens.len() < params.min_tokens {
            if !params.ignore_eos {
                mask(logits, eos_token_ids);
            }
            mask(logits, &params.stop_token_ids);
        }
        self.apply_repetition_penalty(logits, params.repetition_penalty);
        self.apply_presence_frequency(logits, params.presence_penalty, params.frequency_penalty);

        let norm = params.logprobs.map(|_| LogNorm::new(logits));
        let mut top_logprobs = Vec::new();
        if let (Some(num_top), Some(norm)) = (params.logprobs, &norm) {
            top_logprobs = top_n(logits, num_top.min(MAX_TOP_LOGPROBS));
            top_logprobs
                .iter_mut()
                .for_each(|e| e.1 = norm.logprob(e.1));
        }

        let token = if params.is_greedy() {
            argmax(logits)
        } else {
            self.sample_random(logits, params)
        };
        let logprob = match &norm {
            Some(norm) => norm.logprob(logits.get(token as usize).copied().unwrap_or(NEG_INF)),
            None => f32::NAN,
        };
        SampledToken {
            token,
            logprob,
            top_logprobs,
        }
    }

    fn sync_output_counts(&mut self, output_tokens: &[u32]) {
        if output_tokens.len() < self.num_counted_outputs {
            self.output_counts.clear();
            self.output_only_ids.clear();
            self.num_counted_outputs = 0;
        }
        for &token in &output_tokens[self.num_counted_outputs..] {
            let count = self.output_counts.entry(token).or_insert(0);
            if *count == 0 && self.prompt_ids.binary_search(&token).is_err() {
                self.output_only_ids.push(token);
            }
            *count += 1;
        }
        self.num_counted_outputs = output_tokens.len();
    }

    fn apply_repetition_penalty(&self, logits: &mut [f32], penalty: f32) {
        // The validator rejects NaN and non-positive penalties; skip them anyway.
        if penalty == 1.0 || penalty.is_nan() || penalty <= 0.0 {
            return;
        }
        debug_assert!(self.tracks_prompt, "penalty was off in new()");
        for &token in self.prompt_ids.iter().chain(&self.output_only_ids) {
            if let Some(x) = logits.get_mut(token as usize) {
                *x = clean(if *x > 0.0 { *x / penalty } else { *x * penalty });
            }
        }
    }

    fn apply_presence_frequency(&self, logits: &mut [f32], presence: f32, frequency: f32) {
        if presence == 0.0 && frequency == 0.0 {
            return;
        }
        for (&token, &count) in &self.output_counts {
            if let Some(x) = logits.get_mut(token as usize) {
                *x = clean(*x - (presence + frequency * count as f32));
            }
        }
    }

    /// Temperature, top-k, top-p, min-p, then one draw. `logits` is left unchanged.
    fn sample_random(&mut self, logits: &[f32], params: &SamplingParams) -> u32 {
        let max = max_logit(logits);
        if max == NEG_INF {
            return argmax(logits);
        }
        let inv_t = (1.0 / params.temperature).min(f32::MAX);
        // Scaled logit relative to the best token: ln(p / p_max).
        let scaled = |x: f32| (x - max) * inv_t;
        let weight = |x: f32| exp_or_zero(scaled(x));
        // min_p off (0) gives ln 0 = -inf: every finite logit passes.
        let ln_min_p = params.min_p.clamp(0.0, 1.0).ln();
        let keep_min_p = |x: f32| x > NEG_INF && scaled(x) >= ln_min_p;
        let use_top_k = params.top_k > 0 && params.top_k < logits.len();
        let use_top_p = params.top_p < 1.0;

        if !use_top_k && !use_top_p {
            // The whole vocabulary is the candidate set: no buffer needed.
            let kept = || (0..).zip(logits).filter(|&(_, &x)| keep_min_p(x));
            let z = kept().map(|(_, &x)| weight(x)).sum();
            let weighted = kept().map(|(i, &x)| (i, weight(x)));
            return draw(&mut self.rng, z, weighted).unwrap_or_else(|| argmax(logits));
        }

        let candidates = &mut self.candidates;
        candidates.clear();
        // Normaliser of the distribution top-p works on (after top-k, before min-p).
        let z_top_k: f64;
        if use_top_k {
            collect_top_k(logits, params.top_k, candidates);
            z_top_k = candidates.iter().map(|&(_, x)| weight(x)).sum();
            candidates.retain(|&(_, x)| keep_min_p(x));
        } else {
            z_top_k = logits.iter().map(|&x| weight(x)).sum();
            // A token with probability below (1 - top_p) / vocab is in no nucleus: the tokens
            // ranked before it hold more than top_p. Halved to stay clear of rounding.
            let min_prob = f64::from(1.0 - params.top_p) / logits.len() as f64 * 0.5;
            let ln_floor = (min_prob * z_top_k).ln() as f32;
            for (token, &x) in (0..).zip(logits) {
                if keep_min_p(x) && scaled(x) >= ln_floor {
                    candidates.push((token, x));
                }
            }
        }
        if use_top_p {
            let num_nucleus = nucleus_len(candidates, params.top_p, |x| weight(x) / z_top_k);
            candidates.truncate(num_nucleus);
        }

        let z = candidates.iter().map(|&(_, x)| weight(x)).sum();
        let weighted = candidates.iter().map(|&(token, x)| (token, weight(x)));
        draw(&mut self.rng, z, weighted).unwrap_or_else(|| argmax(logits))
    }
}

/// Walks `(token, weight)` pairs until their running sum passes a uniform draw in `[0, z)`.
/// `None` only when no weight is positive.
fn draw(rng: &mut ChaCha8Rng, z: f64, weighted: impl Iterator<Item = (u32, f64)>) -> Option<u32> {
    let u = rng.random::<f64>() * z;
    let mut cum = 0.0;
    let mut last = None;
    for (token, w) in weighted {
        if w > 0.0 {
            last = Some(token);
        }
        cum += w;
        if cum > u {
            return Some(token);
        }
    }
    // Rounding left the draw at the very end: the last possible token.
    last
}

/// `log_softmax` of the processed logits, kept as `(max, ln sum exp(x - max))`.
struct LogNorm {
    max: f32,
    ln_sum: f32,
}

impl LogNorm {
    fn new(logits: &[f32]) -> Self {
        let max = max_logit(logits);
        if max == NEG_INF {
            return Self { max, ln_sum: 0.0 };
        }
        let sum: f64 = logits.iter().map(|&x| exp_or_zero(x - max)).sum();
        let ln_sum = sum.ln() as f32;
        Self { max, ln_sum }
    }

    fn logprob(&self, x: f32) -> f32 {
        if self.max == NEG_INF || x == NEG_INF {
            NEG_INF
        } else {
            (x - self.max) - self.ln_sum
        }
    }
}

/// NaN → `-inf`, `+inf` → `f32::MAX`: keeps every later step free of NaN.
fn clean(x: f32) -> f32 {
    (if x.is_nan() { NEG_INF } else { x }).min(f32::MAX)
}

fn sanitize(logits: &mut [f32]) {
    logits.iter_mut().for_each(|x| *x = clean(*x));
}

fn mask(logits: &mut [f32], tokens: &[u32]) {
    for &token in tokens {
        if let Some(x) = logits.get_mut(token as usize) {
            *x = NEG_INF;
        }
    }
}

/// `e^x` for `x <= 0`, flushed to 0 below -87 (where f32 goes subnormal and `exp` gets slow):
/// a token that unlikely relative to the best one weighs nothing, even summed over 10^6 of them.
fn exp_or_zero(x: f32) -> f64 {
    f64::from(if x < -87.0 { 0.0 } else { x.exp() })
}

fn max_logit(logits: &[f32]) -> f32 {
    logits.iter().copied().fold(NEG_INF, f32::max)
}

/// Index of the largest logit, the lowest one on ties (0 when all are `-inf`).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_x = NEG_INF;
    for (i, &x) in logits.iter().enumerate() {
        if x > best_x {
            best = i;
            best_x = x;
        }
    }
    best as u32
}

/// Rank order: higher logit first, then lower id. A total order on NaN-free candidates.
fn by_rank(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `num_top` best `(token, logit)` pairs, best first, in one pass with a tiny sorted buffer.
fn top_n(logits: &[f32], num_top: usize) -> Vec<(u32, f32)> {
    if num_top == 0 {
        return Vec::new();
    }
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(num_top + 1);
    for (i, &x) in logits.iter().enumerate() {
        // Scanning ids upwards, an equal logit ranks after the ones already kept.
        if top.len() == num_top && x <= top[num_top - 1].1 {
            continue;
        }
        let pos = top.partition_point(|&(_, y)| y >= x);
        top.insert(pos, (i as u32, x));
        top.truncate(num_top);
    }
    top
}

/// Fills `out` with the `top_k` best finite-logit tokens (unordered), holding at most `2 * top_k`.
fn collect_top_k(logits: &[f32], top_k: usize, out: &mut Vec<(u32, f32)>) {
    let max_buffered = top_k.saturating_mul(2).max(64);
    // Logit of the worst token kept after a trim: only strictly better ones can still enter,
    // since later ids lose ties.
    let mut floor = NEG_INF;
    for (i, &x) in logits.iter().enumerate() {
        if x <= floor {
            continue;
        }
        out.push((i as u32, x));
        if out.len() >= max_buffered {
            out.select_nth_unstable_by(top_k - 1, by_rank);
            out.truncate(top_k);
            floor = out[top_k - 1].1;
        }
    }
    if out.len() > top_k {
        out.select_nth_unstable_by(top_k - 1, by_rank);
        out.truncate(top_k);
    }
}

/// Sorts the best candidates (chunk by chunk, never more than needed) and returns how many
/// form the nucleus: the fewest whose summed `prob` reaches `top_p`. All of them when the
/// mass never gets there.
fn nucleus_len(candidates: &mut [(u32, f32)], top_p: f32, prob: impl Fn(f32) -> f64) -> usize {
    let top_p = f64::from(top_p);
    let mut num_sorted = 0;
    let mut chunk = NUCLEUS_FIRST_CHUNK;
    let mut cum = 0.0;
    while num_sorted < candidates.len() {
        let rest = &mut candidates[num_sorted..];
        let num_chunk = chunk.min(rest.len());
        if num_chunk < rest.len() {
            rest.select_nth_unstable_by(num_chunk - 1, by_rank);
        }
        rest[..num_chunk].sort_unstable_by(by_rank);
        for (i, &(_, x)) in rest[..num_chunk].iter().enumerate() {
            cum += prob(x);
            if cum >= top_p {
                return num_sorted + i + 1;
            }
        }
        num_sorted += num_chunk;
        chunk = chunk.saturating_mul(4);
    }
    candidates.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded parameters at `temperature`, adjusted by `edit`.
    fn with(temperature: f32, edit: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        (p.temperature, p.seed) = (temperature, Some(7));
        edit(&mut p);
        p
    }

    fn pick(s: &mut SequenceSampler, logits: &[f32], p: &SamplingParams, out: &[u32]) -> u32 {
        s.sample(&mut logits.to_vec(), p, out, &[0]).token
    }

    /// The greedy pick of a fresh sampler (EOS id 0) after `prompt` and `output`.
    fn greedy(logits: &[f32], p: &SamplingParams, prompt: &[u32], output: &[u32]) -> u32 {
        pick(&mut SequenceSampler::new(p, prompt), logits, p, output)
    }

    /// `num_draws` tokens from one sampler with no output history.
    fn draws(logits: &[f32], p: &SamplingParams, n: usize) -> Vec<u32> {
        let mut s = SequenceSampler::new(p, &[]);
        (0..n).map(|_| pick(&mut s, logits, p, &[])).collect()
    }

    fn ramp(vocab: usize, logit: impl Fn(usize) -> f32) -> Vec<f32> {
        (0..vocab).map(logit).collect()
    }

    fn frequencies(tokens: &[u32], vocab: usize) -> Vec<f64> {
        let mut counts = vec![0.0; vocab];
        tokens.iter().for_each(|&t| counts[t as usize] += 1.0);
        counts.iter().map(|c| c / tokens.len() as f64).collect()
    }

    fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
        let exps: Vec<f64> = logits.iter().map(|&x| f64::from(x / t).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|e| e / sum).collect()
    }

    /// Naive reference for the tokens `sample` may return: full sort, top-k, top-p, min-p.
    fn reference_support(logits: &[f32], p: &SamplingParams) -> Vec<u32> {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| by_rank(&(a, logits[a as usize]), &(b, logits[b as usize])));
        order.truncate(if p.top_k > 0 { p.top_k } else { order.len() });
        let ranked: Vec<f32> = order.iter().map(|&t| logits[t as usize]).collect();
        let probs = softmax(&ranked, p.temperature);
        let mut cum = 0.0;
        let nucleus = probs.iter().position(|q| {
            cum += q;
            cum >= f64::from(p.top_p)
        });
        if p.top_p < 1.0 {
            order.truncate(nucleus.map_or(order.len(), |i| i + 1));
        }
        let min_prob = probs[0] * f64::from(p.min_p);
        order.truncate(probs.iter().take_while(|&&q| q >= min_prob).count());
        order
    }

    #[test]
    fn greedy_is_argmax_with_ties_to_lowest_id() {
        let p = with(0.0, |_| {});
        assert_eq!(greedy(&[0.1, 3.0, -2.0, 2.9], &p, &[], &[]), 1);
        assert_eq!(greedy(&[0.1, 3.0, -2.0, 3.0], &p, &[], &[]), 1);
        assert_eq!(greedy(&[-5.0, -4.0, -4.5], &p, &[], &[]), 1);
    }

    #[test]
    fn seeds_reproduce_and_differ() {
        let logits = ramp(100, |i| (i % 7) as f32 * 0.3);
        let a = draws(&logits, &with(1.0, |_| {}), 50);
        assert_eq!(a, draws(&logits, &with(1.0, |_| {}), 50));
        assert_ne!(a, draws(&logits, &with(1.0, |p| p.seed = Some(8)), 50));
        let unseeded = with(1.0, |p| p.seed = None);
        assert_ne!(draws(&logits, &unseeded, 50), draws(&logits, &unseeded, 50));
    }

    #[test]
    fn temperature_sets_sharpness() {
        let logits = [0.0, 1.0, 2.0, 3.0];
        for temperature in [0.5, 1.0, 2.0] {
            let freq = frequencies(&draws(&logits, &with(temperature, |_| {}), 20_000), 4);
            let expected = softmax(&logits, temperature);
            for (f, e) in freq.iter().zip(&expected) {
                assert!((f - e).abs() < 0.015, "T={temperature}: {freq:?}");
            }
        }
    }

    #[test]
    fn top_k_never_leaves_the_top_k() {
        let logits = ramp(200, |i| (i * 37 % 101) as f32 * 0.01);
        let p = with(1.0, |p| p.top_k = 5);
        let top = reference_support(&logits, &p);
        let tokens = draws(&logits, &p, 3000);
        assert!(tokens.iter().all(|t| top.contains(t)));
        let freq = frequencies(&tokens, 200);
        assert!(top.iter().all(|&t| freq[t as usize] > 0.1), "{top:?}");
        // 7919 is coprime with 50_000: a permutation of 0.000..=49.999, trimmed many times.
        let big = ramp(50_000, |i| (i * 7919 % 50_000) as f32 * 1e-3);
        let tokens = draws(&big, &with(1.0, |p| p.top_k = 3), 500);
        assert!(tokens.iter().all(|&t| big[t as usize] > 49.9965));
    }

    #[test]
    fn top_p_keeps_exactly_the_nucleus() {
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|q| q.ln()).collect();
        let freq = frequencies(&draws(&logits, &with(1.0, |p| p.top_p = 0.7), 10_000), 4);
        assert_eq!((freq[2], freq[3]), (0.0, 0.0));
        assert!((freq[1] - 0.3 / 0.8).abs() < 0.02, "{freq:?}");
        // Flat 20k vocabulary: the nucleus (~10k tokens) spans several sorting chunks.
        let logits = ramp(20_000, |i| (i * 7 % 20_000) as f32 * -1e-4);
        let p = with(1.0, |p| p.top_p = 0.5);
        let nucleus = reference_support(&logits, &p);
        let edge_logit = logits[nucleus[nucleus.len() * 3 / 4] as usize];
        let mut s = SequenceSampler::new(&p, &[]);
        let tokens: Vec<u32> = (0..2000).map(|_| pick(&mut s, &logits, &p, &[])).collect();
        assert_eq!(s.candidates.len(), nucleus.len());
        let min_logit = logits[*nucleus.last().unwrap() as usize];
        assert!(tokens.iter().all(|&t| logits[t as usize] >= min_logit));
        // Enough included: tokens near the nucleus edge do get sampled.
        assert!(tokens.iter().any(|&t| logits[t as usize] <= edge_logit));
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|q| q.ln()).collect();
        let freq = frequencies(&draws(&logits, &with(1.0, |p| p.min_p = 0.2), 10_000), 4);
        assert_eq!(freq[3], 0.0);
        assert!((freq[2] - 0.15 / 0.95).abs() < 0.02, "{freq:?}");
        // Relative to the tempered distribution: at T=0.5 token 2 is (0.3)^2 of token 0.
        let freq = frequencies(&draws(&logits, &with(0.5, |p| p.min_p = 0.2), 5000), 4);
        assert_eq!((freq[2], freq[3]), (0.0, 0.0));
    }

    #[test]
    fn filters_match_the_naive_reference_on_a_large_vocab() {
        let vocab = 128 * 1024;
        let logits = ramp(vocab, |i| (i * 2_654_435 % 1009) as f32 * 0.011);
        for (top_k, top_p, min_p) in [(50, 1.0, 0.0), (0, 0.9, 0.2), (400, 0.9, 0.1)] {
            let p = with(0.8, |p| (p.top_k, p.top_p, p.min_p) = (top_k, top_p, min_p));
            let mut support = reference_support(&logits, &p);
            let mut sampler = SequenceSampler::new(&p, &[]);
            for _ in 0..20 {
                let token = pick(&mut sampler, &logits, &p, &[]);
                assert!(support.contains(&token), "{top_k} {top_p} {min_p}");
            }
            let mut kept: Vec<u32> = sampler.candidates.iter().map(|c| c.0).collect();
            kept.sort_unstable();
            support.sort_unstable();
            assert_eq!(kept, support, "{top_k} {top_p} {min_p}");
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let p = with(0.0, |p| p.repetition_penalty = 2.0);
        let logits = [2.0, 1.5, -1.0];
        assert_eq!(greedy(&logits, &with(0.0, |_| {}), &[0], &[]), 0);
        assert_eq!(greedy(&logits, &p, &[0], &[]), 1, "prompt token penalised");
        assert_eq!(greedy(&logits, &p, &[], &[0]), 1, "output token penalised");
        // Negative logits are multiplied, once per distinct token.
        assert_eq!(greedy(&[-1.0, -1.5], &p, &[0], &[0]), 1);
        assert_eq!(greedy(&[-1.0, -2.5], &p, &[0], &[0, 0]), 0);
    }

    #[test]
    fn presence_penalty_applies_once() {
        let p = with(0.0, |p| p.presence_penalty = 0.6);
        assert_eq!(greedy(&[1.0, 0.5], &with(0.0, |_| {}), &[], &[0]), 0);
        assert_eq!(greedy(&[1.0, 0.5], &p, &[], &[0]), 1);
        // Not per occurrence, and prompt tokens do not count.
        assert_eq!(greedy(&[1.0, 0.3], &p, &[], &[0, 0, 0]), 0);
        assert_eq!(greedy(&[1.0, 0.5], &p, &[0], &[]), 0);
    }

    #[test]
    fn frequency_penalty_grows_with_count_incrementally() {
        let p = with(0.0, |p| p.frequency_penalty = 0.2);
        let mut sampler = SequenceSampler::new(&p, &[]);
        let (mut output, mut picks) = (vec![], vec![]);
        for _ in 0..4 {
            picks.push(pick(&mut sampler, &[1.0, 0.5], &p, &output));
            output.push(0);
        }
        // Token 0 seen 0..3 times: 1.0, 0.8, 0.6 beat 0.5; 0.4 does not.
        assert_eq!(picks, [0, 0, 0, 1]);
        // Shrinking output (a rollback) rebuilds the counts.
        assert_eq!(pick(&mut sampler, &[1.0, 0.5], &p, &[0]), 0);
    }

    #[test]
    fn logit_bias_forces_and_forbids() {
        let logits = [3.0, 0.0, 1.0, -1.0];
        let forced = with(1.0, |p| p.logit_bias = vec![(3, 100.0), (99, 5.0)]);
        assert!(draws(&logits, &forced, 200).iter().all(|&t| t == 3));
        let forbidden = with(1.0, |p| p.logit_bias = vec![(0, f32::NEG_INFINITY)]);
        assert!(draws(&logits, &forbidden, 2000).iter().all(|&t| t != 0));
        let greedy_forbidden = with(0.0, |p| p.logit_bias = forbidden.logit_bias.clone());
        assert_eq!(greedy(&logits, &greedy_forbidden, &[], &[]), 2);
    }

    #[test]
    fn min_tokens_suppresses_eos_and_stop_ids() {
        let p = with(0.0, |p| (p.min_tokens, p.stop_token_ids) = (3, vec![1]));
        let logits = [5.0, 4.0, 3.0, 0.0];
        let mut sampler = SequenceSampler::new(&p, &[]);
        let mut output = vec![];
        for _ in 0..3 {
            assert_eq!(pick(&mut sampler, &logits, &p, &output), 2);
            output.push(2);
        }
        assert_eq!(pick(&mut sampler, &logits, &p, &output), 0);
        // ignore_eos: EOS ends nothing so it is not masked; stop ids still are.
        let mut ignore = p.clone();
        ignore.ignore_eos = true;
        assert_eq!(greedy(&logits, &ignore, &[], &[]), 0);
        assert_eq!(greedy(&[0.0, 4.0, 3.0], &ignore, &[], &[]), 2);
    }

    #[test]
    fn logprobs_are_log_softmax_of_processed_logits() {
        let logits = ramp(100, |i| (i * 13 % 17) as f32 * 0.25);
        let mut p = with(0.7, |p| p.logit_bias = vec![(5, 2.0)]);
        p.logprobs = Some(3);
        let mut processed = logits.clone();
        processed[5] += 2.0;
        let expected: Vec<f64> = softmax(&processed, 1.0).iter().map(|q| q.ln()).collect();
        let mut sampler = SequenceSampler::new(&p, &[]);
        let mut sample =
            |p: &SamplingParams, logits: &[f32]| sampler.sample(&mut logits.to_vec(), p, &[], &[]);
        let out = sample(&p, &logits);
        assert!((f64::from(out.logprob) - expected[out.token as usize]).abs() < 1e-5);
        for &(t, lp) in &out.top_logprobs {
            assert!((f64::from(lp) - expected[t as usize]).abs() < 1e-5);
        }
        // Sorted, ties by id: 16 * 0.25 is reached by ids 13, 30, 47, ...
        let ids: Vec<u32> = out.top_logprobs.iter().map(|e| e.0).collect();
        assert_eq!(ids, [5, 13, 30]);
        assert!(out.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        p.logprobs = Some(50);
        assert_eq!(sample(&p, &logits).top_logprobs.len(), MAX_TOP_LOGPROBS);
        p.logprobs = Some(10);
        assert_eq!(sample(&p, &[0.0; 4]).top_logprobs.len(), 4);
        p.logprobs = Some(0);
        let out = sample(&p, &logits);
        assert!(out.top_logprobs.is_empty() && out.logprob.is_finite());
        p.logprobs = None;
        let out = sample(&p, &logits);
        assert!(out.top_logprobs.is_empty() && out.logprob.is_nan());
    }

    #[test]
    fn nan_and_inf_logits_do_not_panic() {
        let logits = [f32::NAN, 1.0, f32::NAN, 2.0, f32::NAN];
        assert_eq!(greedy(&logits, &with(0.0, |_| {}), &[], &[]), 3);
        let p = with(1.0, |p| p.logprobs = Some(5));
        let mut sampler = SequenceSampler::new(&p, &[]);
        for _ in 0..500 {
            let out = sampler.sample(&mut logits.to_vec(), &p, &[], &[]);
            assert!((out.token == 1 || out.token == 3) && out.logprob.is_finite());
            assert!(out.top_logprobs[2..].iter().all(|e| e.1 == NEG_INF));
        }
        for (top_k, top_p) in [(0, 1.0), (2, 1.0), (0, 0.9)] {
            let p = with(1.0, |p| {
                (p.top_k, p.top_p, p.min_p, p.logprobs) = (top_k, top_p, 0.1, Some(5));
                p.repetition_penalty = 0.5;
            });
            let mut sampler = SequenceSampler::new(&p, &[1, 3]);
            let out = sampler.sample(&mut [f32::NAN; 8], &p, &[1], &[]);
            assert_eq!((out.token, out.logprob), (0, NEG_INF));
            let out = sampler.sample(&mut [f32::INFINITY, 1.0, f32::NAN], &p, &[1], &[]);
            assert!(out.token == 0 && !out.logprob.is_nan());
        }
    }
}
