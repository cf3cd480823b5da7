//! Sampling: greedy, temperature, top-k, top-p, seeded; optional logprobs.

use crate::error::{EngineError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, serde::Serialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Also stop on the model's eos ids (default true).
    pub stop_on_eos: bool,
    /// Number of top alternatives to report per token (`None` = no logprobs).
    pub logprobs: Option<usize>,
    /// Added to a token's logit before sampling (OpenAI's `logit_bias`: −100
    /// bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
    /// Subtracted from a generated token's logit once per time it appeared.
    pub frequency_penalty: f32,
    /// Subtracted from a generated token's logit once it appeared.
    pub presence_penalty: f32,
    /// Drop tokens less likely than `min_p` × the likeliest one's probability
    /// (after temperature; 0 = off), as vLLM and llama.cpp define it.
    pub min_p: f32,
    /// What the output must be (structured output); compiled when the request
    /// is validated.
    pub constraint: Option<crate::guide::Constraint>,
    /// Divides a positive logit (multiplies a negative one) of every token in
    /// the prompt or the output so far (1 = off), as HF, vLLM and llama.cpp.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            stop_on_eos: true,
            logprobs: None,
            logit_bias: Vec::new(),
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            min_p: 0.0,
            constraint: None,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(EngineError::InvalidRequest(m.into()));
        if !(0.0..=100.0).contains(&self.temperature) || self.temperature.is_nan() {
            return bad("temperature must be in [0, 100]");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1");
        }
        if self.logprobs.is_some_and(|n| n > 20) {
            return bad("at most 20 top logprobs");
        }
        if self.logit_bias.len() > 300
            || self
                .logit_bias
                .iter()
                .any(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad("logit_bias: at most 300 tokens, each bias in [-100, 100]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return bad("repetition_penalty must be in (0, 10]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        for p in [self.frequency_penalty, self.presence_penalty] {
            if !(-2.0..=2.0).contains(&p) {
                return bad("penalties must be in [-2, 2]");
            }
        }
        if self.stop.len() > MAX_STOPS
            || self
                .stop
                .iter()
                .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            // matching holds back a possible stop prefix per token: its cost grows
            // with the strings' lengths, so they are capped
            return bad("at most 16 stop strings, each 1 to 256 bytes");
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of the chosen token under the model's (unscaled) distribution.
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// Stop strings a request may give, and their longest length in bytes.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
/// Temperatures below this sample greedily: dividing logits by them overflows
/// (3e-39 made every probability NaN and picked the least likely token).
pub const GREEDY_BELOW: f32 = 1e-5;

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each generated token appeared (for the penalties).
    counts: std::collections::HashMap<u32, u32>,
    /// The logits after bias and penalties (reused buffer).
    adjusted: Vec<f32>,
    /// Temperature weights of a draw (reused buffer).
    weights: Vec<f32>,
    /// The nucleus's histogram and each weight's bucket (reused buffers).
    hist: Vec<f64>,
    buckets: Vec<u16>,
    /// Weight per chunk of ids (reused buffer).
    chunks: Vec<f64>,
    /// Prompt tokens, for the repetition penalty (empty when it is off).
    prompt_seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Self {
            params,
            rng,
            counts: std::collections::HashMap::new(),
            adjusted: Vec::new(),
            weights: Vec::new(),
            hist: Vec::new(),
            buckets: Vec::new(),
            chunks: Vec::new(),
            prompt_seen: std::collections::HashSet::new(),
        }
    }

    /// A sampler for a sequence with this prompt (the repetition penalty counts it).
    pub fn with_prompt(params: SamplingParams, prompt: &[u32]) -> Self {
        let mut s = Self::new(params);
        if s.params.repetition_penalty != 1.0 {
            s.prompt_seen = prompt.iter().copied().collect();
        }
        s
    }

    fn adjusts(&self) -> bool {
        let p = &self.params;
        !p.logit_bias.is_empty()
            || p.frequency_penalty != 0.0
            || p.presence_penalty != 0.0
            || p.repetition_penalty != 1.0
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn sample(&mut self, raw: &[f32]) -> Sampled {
        self.sample_masked(raw, None)
    }

    /// Sample among the tokens `mask` allows (all when `None`); logprobs are
    /// those of the distribution sampled from.
    pub fn sample_masked(&mut self, raw: &[f32], mask: Option<&crate::guide::Mask>) -> Sampled {
        if !self.adjusts() && mask.is_none() {
            return self.sample_from(raw);
        }
        let mut adjusted = std::mem::take(&mut self.adjusted);
        adjusted.clear();
        adjusted.extend_from_slice(raw);
        if let Some(m) = mask {
            m.apply(&mut adjusted);
        }
        // OpenAI's order: bias, then frequency and presence penalties on what
        // this sequence generated so far
        for &(id, b) in &self.params.logit_bias {
            if let Some(l) = adjusted.get_mut(id as usize) {
                *l += b;
            }
        }
        let (f, pr) = (self.params.frequency_penalty, self.params.presence_penalty);
        for (&id, &n) in &self.counts {
            if let Some(l) = adjusted.get_mut(id as usize) {
                *l -= n as f32 * f + pr;
            }
        }
        let rp = self.params.repetition_penalty;
        if rp != 1.0 {
            let penalise = |l: &mut f32| *l = if *l > 0.0 { *l / rp } else { *l * rp };
            for &id in &self.prompt_seen {
                if let Some(l) = adjusted.get_mut(id as usize) {
                    penalise(l);
                }
            }
            for &id in self.counts.keys() {
                if self.prompt_seen.contains(&id) {
                    continue;
                }
                if let Some(l) = adjusted.get_mut(id as usize) {
                    penalise(l);
                }
            }
        }
        let out = self.sample_from(&adjusted);
        self.adjusted = adjusted;
        *self.counts.entry(out.token).or_insert(0) += 1;
        out
    }

    fn sample_from(&mut self, logits: &[f32]) -> Sampled {
        let token = if self.params.temperature < GREEDY_BELOW || self.params.top_k == 1 {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        let (logprob, top) = match self.params.logprobs {
            Some(n) => {
                let lse = log_sum_exp(logits);
                // `top_logprobs: 0`: the token's own logprob, no alternatives
                let mut idx: Vec<u32> = if n == 0 {
                    Vec::new()
                } else {
                    top_k_indices(logits, n)
                };
                idx.sort_by(|&a, &b| {
                    logits[b as usize]
                        .total_cmp(&logits[a as usize])
                        .then(a.cmp(&b))
                });
                let top = idx
                    .into_iter()
                    .map(|i| (i, logits[i as usize] - lse))
                    .collect();
                (Some(logits[token as usize] - lse), top)
            }
            None => (None, Vec::new()),
        };
        Sampled {
            token,
            logprob,
            top,
        }
    }

    /// Sample with temperature, top-k, min-p and top-p without sorting the
    /// vocabulary: each weight is computed once (a vectorised exp) into a
    /// reused buffer; min-p is a threshold on it; top-p finds the nucleus's
    /// edge in a histogram of the weights and sorts only the tokens at that
    /// edge. A top-k cut sorts its k (its own size bounds the work).
    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        if p.top_k > 0 && p.top_k < logits.len() {
            return self.sample_top_k(logits, max, inv_t);
        }
        let mut w = std::mem::take(&mut self.weights);
        w.clear();
        w.resize(logits.len(), 0.0);
        for (o, &l) in w.iter_mut().zip(logits) {
            *o = exp_neg((l - max) * inv_t);
        }
        if p.min_p > 0.0 {
            // the likeliest token's weight is exactly 1
            let floor = p.min_p;
            w.iter_mut()
                .for_each(|x| *x = if *x < floor { 0.0 } else { *x });
        }
        let mut chunks = std::mem::take(&mut self.chunks);
        let total = chunk_sums(&w, &mut chunks);
        let pick = if p.top_p >= 1.0 {
            draw_chunked(&w, &chunks, self.rng.gen::<f64>() * total)
        } else {
            self.nucleus_draw(&mut w, total, &mut chunks)
        };
        self.weights = w;
        self.chunks = chunks;
        pick
    }

    /// Draw from the smallest set of likeliest tokens holding `top_p` of the
    /// mass (ties by id), as a full sort would pick it: the nucleus's edge is
    /// found in a histogram of the weights, only the tokens in the edge's
    /// bucket are sorted, and everything past it is zeroed before the draw.
    fn nucleus_draw(&mut self, w: &mut [f32], total: f64, chunks: &mut Vec<f64>) -> u32 {
        let target = self.params.top_p as f64 * total;
        let mut buckets = std::mem::take(&mut self.buckets);
        buckets.clear();
        buckets.extend(w.iter().map(|&x| bucket(x)));
        let mut hist = std::mem::take(&mut self.hist);
        hist.clear();
        hist.resize(BUCKETS + 1, 0.0);
        // the last bucket (weights below 2^-40, usually most of the
        // vocabulary) is left out: adding them all to one cell is a long
        // dependency chain, and the nucleus rarely reaches them
        for (&b, &x) in buckets.iter().zip(w.iter()) {
            if (b as usize) < BUCKETS - 1 {
                hist[b as usize] += x as f64;
            }
        }
        // the bucket where the running mass (likeliest first) reaches the target
        let mut above = 0.0f64;
        let mut edge = BUCKETS as u16 - 1;
        for (b, &m) in hist[..BUCKETS - 1].iter().enumerate() {
            if m > 0.0 && above + m >= target {
                edge = b as u16;
                break;
            }
            above += m;
        }
        self.hist = hist;
        let mut border: Vec<u32> = Vec::new();
        for (i, (&b, x)) in buckets.iter().zip(w.iter_mut()).enumerate() {
            if b > edge {
                *x = 0.0;
            } else if b == edge {
                border.push(i as u32);
            }
        }
        self.buckets = buckets;
        border.sort_by(|&a, &b| w[b as usize].total_cmp(&w[a as usize]).then(a.cmp(&b)));
        let mut mass = above;
        let mut cut = border.len();
        for (k, &i) in border.iter().enumerate() {
            mass += w[i as usize] as f64;
            if mass >= target {
                cut = k + 1;
                break;
            }
        }
        for &i in &border[cut..] {
            w[i as usize] = 0.0;
        }
        let kept = chunk_sums(w, chunks);
        draw_chunked(w, chunks, self.rng.gen::<f64>() * kept)
    }

    /// The top-k cut: its k likeliest sorted, then min-p and top-p among them.
    fn sample_top_k(&mut self, logits: &[f32], max: f32, inv_t: f32) -> u32 {
        let p = &self.params;
        let mut cand = sorted_top(logits, p.top_k);
        let mut probs: Vec<f32> = cand
            .iter()
            .map(|&i| exp_neg((logits[i as usize] - max) * inv_t))
            .collect();
        let norm: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= norm);
        if p.min_p > 0.0 {
            // sorted: the first is the likeliest, and it always stays
            let floor = p.min_p * probs[0];
            let keep = probs.iter().take_while(|&&x| x >= floor).count().max(1);
            probs.truncate(keep);
            cand.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let s: f32 = probs.iter().sum();
        let r: f32 = self.rng.gen::<f32>() * s;
        let mut acc = 0.0;
        for (i, pr) in probs.iter().enumerate() {
            acc += pr;
            if r < acc {
                return cand[i];
            }
        }
        cand[cand.len() - 1]
    }
}

/// Weights per [`CHUNK`] ids are summed (eight lanes, so it vectorises)
/// into `chunks`; returns the total.
fn chunk_sums(w: &[f32], chunks: &mut Vec<f64>) -> f64 {
    chunks.clear();
    for c in w.chunks(CHUNK) {
        let mut lanes = [0.0f64; 8];
        let mut it = c.chunks_exact(8);
        for x in &mut it {
            for (l, &v) in lanes.iter_mut().zip(x) {
                *l += v as f64;
            }
        }
        let rest: f64 = it.remainder().iter().map(|&v| v as f64).sum();
        chunks.push(lanes.iter().sum::<f64>() + rest);
    }
    chunks.iter().sum()
}

const CHUNK: usize = 64;

/// The token at running weight `r` in id order: whole chunks first, then
/// the ids inside the chunk that holds `r`.
fn draw_chunked(w: &[f32], chunks: &[f64], r: f64) -> u32 {
    let mut acc = 0.0f64;
    for (c, &m) in chunks.iter().enumerate() {
        if m > 0.0 && r < acc + m {
            let start = c * CHUNK;
            let end = (start + CHUNK).min(w.len());
            return draw_from(w, r - acc, start as u32..end as u32);
        }
        acc += m;
    }
    // rounding left `r` past the end: the last token with weight
    draw_from(w, f64::INFINITY, 0..w.len() as u32)
}

/// The token at running weight `r` walking `ids` (the last with weight when
/// rounding leaves `r` past the end).
fn draw_from(w: &[f32], r: f64, ids: impl IntoIterator<Item = u32>) -> u32 {
    let mut acc = 0.0f64;
    let mut last = None;
    for i in ids {
        let x = w[i as usize];
        if x <= 0.0 {
            continue;
        }
        acc += x as f64;
        last = Some(i);
        if r < acc {
            return i;
        }
    }
    last.unwrap_or_else(|| argmax(w))
}

/// Histogram buckets of weights in (0, 1]: 32 per octave over 40 octaves,
/// the last holding everything smaller but not zero.
const BUCKETS: usize = 40 * 32 + 1;

/// A weight's bucket, 0 for the likeliest (positive floats order as their
/// bits); zero weights go to `BUCKETS`, past every bucket.
fn bucket(x: f32) -> u16 {
    let top = 1.0f32.to_bits() >> 18;
    let key = x.to_bits() >> 18;
    let b = top.saturating_sub(key).min(BUCKETS as u32 - 1);
    if x > 0.0 {
        b as u16
    } else {
        BUCKETS as u16
    }
}

/// e^x for x ≤ 0, within 3e-7 relative; 0 below −87 (and for −∞). Plain
/// arithmetic, so loops over it vectorise.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    let c = x.max(-87.0);
    let n = (c * std::f32::consts::LOG2_E + 0.5).floor();
    // c - n ln2 in two steps (Cody and Waite): |f| <= ln2 / 2, no error from
    // rounding c log2(e)
    let f = (c - n * 0.693_145_751_953_125) - n * 1.428_606_765_330_187e-6;
    let e = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    // n is in [-126, 0] (c was clamped), so the unchecked conversion is exact
    // and, unlike `as`, vectorises
    // SAFETY: n is finite and within i32's range
    let n = unsafe { n.to_int_unchecked::<i32>() };
    let scale = f32::from_bits(((n + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        e * scale
    }
}

/// The `k` largest logits' ids, likeliest first (ties by id).
fn sorted_top(logits: &[f32], k: usize) -> Vec<u32> {
    let mut cand = top_k_indices(logits, k);
    cand.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    cand
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    max + logits.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}

/// Indices of the `k` largest values (unordered).
fn top_k_indices(logits: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.clamp(1, logits.len().max(1));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        idx.truncate(k);
    }
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logit_bias_bans_and_forces_and_penalties_discourage_repeats() {
        let logits = vec![0.0, 3.0, 1.0, 2.5];
        let with = |p: SamplingParams| Sampler::new(p);
        // -100 bans the likeliest token; +100 forces an unlikely one
        let mut s = with(SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..SamplingParams::greedy(4)
        });
        assert_eq!(s.sample(&logits).token, 3);
        let mut s = with(SamplingParams {
            logit_bias: vec![(0, 100.0)],
            temperature: 1.0,
            seed: Some(3),
            ..SamplingParams::greedy(4)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits).token, 0);
        }
        // presence 1: after token 1, 3 (2.5) beats it (3 - 1); then both are
        // penalised once and 1 (2.0) beats 3 (1.5). Frequency 0.3 grows per use
        let mut s = with(SamplingParams {
            presence_penalty: 1.0,
            ..SamplingParams::greedy(4)
        });
        let seq: Vec<u32> = (0..3).map(|_| s.sample(&logits).token).collect();
        assert_eq!(seq, vec![1, 3, 1]);
        let mut s = with(SamplingParams {
            frequency_penalty: 0.3,
            ..SamplingParams::greedy(4)
        });
        let seq: Vec<u32> = (0..4).map(|_| s.sample(&logits).token).collect();
        assert_eq!(
            seq,
            vec![1, 1, 3, 1],
            "3.0, 2.7, then 2.5 > 2.4, then 2.4 > 2.2"
        );
        // out of range
        for p in [
            SamplingParams {
                logit_bias: vec![(0, 101.0)],
                ..SamplingParams::greedy(4)
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..SamplingParams::greedy(4)
            },
            SamplingParams {
                frequency_penalty: -3.0,
                ..SamplingParams::greedy(4)
            },
        ] {
            assert!(p.validate().is_err());
        }
    }

    /// The cuts by a full sort of the vocabulary (the definition).
    fn allowed_by_full_sort(logits: &[f32], p: &SamplingParams) -> std::collections::HashSet<u32> {
        let cand = sorted_top(logits, logits.len());
        let max = logits[cand[0] as usize];
        let w: Vec<f32> = cand
            .iter()
            .map(|&i| ((logits[i as usize] - max) / p.temperature).exp())
            .collect();
        let mut keep = cand.len();
        if p.min_p > 0.0 {
            keep = w.iter().take_while(|&&x| x >= p.min_p * w[0]).count();
        }
        if p.top_p < 1.0 {
            let s: f32 = w[..keep].iter().sum();
            let mut acc = 0.0;
            for (i, x) in w[..keep].iter().enumerate() {
                acc += x / s;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        cand[..keep].iter().copied().collect()
    }

    #[test]
    fn fast_cuts_keep_exactly_the_tokens_a_full_sort_keeps() {
        let mut rng = StdRng::seed_from_u64(5);
        for case in 0..40 {
            // a vocabulary of 5,000 with a peaked or a flat distribution: the
            // nucleus closes inside the first candidates or reaches past them
            let spread = if case % 2 == 0 { 8.0 } else { 0.5 };
            let logits: Vec<f32> = (0..5000).map(|_| rng.gen::<f32>() * spread).collect();
            for (top_p, min_p) in [(0.9, 0.0), (0.5, 0.0), (1.0, 0.2), (0.95, 0.05)] {
                let p = SamplingParams {
                    temperature: 0.8,
                    top_p,
                    min_p,
                    seed: Some(case),
                    ..SamplingParams::greedy(4)
                };
                let allowed = allowed_by_full_sort(&logits, &p);
                let mut s = Sampler::new(p);
                for _ in 0..50 {
                    let t = s.sample(&logits).token;
                    assert!(
                        allowed.contains(&t),
                        "case {case} top_p {top_p} min_p {min_p}: {t}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_vectorised_exp_matches_the_library_one() {
        let mut x = 0.0f32;
        while x > -90.0 {
            let (got, want) = (exp_neg(x), x.exp());
            if x >= -87.0 {
                assert!((got - want).abs() <= 3e-7 * want, "{x}: {got} vs {want}");
            } else {
                assert_eq!(got, 0.0, "{x}");
            }
            x -= 0.001_37;
        }
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn temperature_draws_follow_the_softmax() {
        let logits = vec![0.0, 1.0, 2.0, 0.5];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: Some(11),
            ..SamplingParams::greedy(4)
        });
        let n = 20_000;
        let mut count = [0usize; 4];
        for _ in 0..n {
            count[s.sample(&logits).token as usize] += 1;
        }
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for (i, c) in count.iter().enumerate() {
            let want = logits[i].exp() / z;
            let got = *c as f32 / n as f32;
            assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn min_p_keeps_only_tokens_near_the_likeliest() {
        // probabilities ∝ e^l: token 1 and 3 within half of the best, 0 and 2 not
        let logits = vec![0.0, 3.0, 1.0, 2.6];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: Some(9),
            ..SamplingParams::greedy(4)
        });
        let seen: std::collections::HashSet<u32> =
            (0..400).map(|_| s.sample(&logits).token).collect();
        assert_eq!(seen, [1, 3].into_iter().collect());
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: Some(9),
            ..SamplingParams::greedy(4)
        });
        let seen: std::collections::HashSet<u32> =
            (0..400).map(|_| s.sample(&logits).token).collect();
        assert_eq!(seen.len(), 4, "without min_p every token turns up");
        assert!(SamplingParams {
            min_p: 1.5,
            ..SamplingParams::greedy(4)
        }
        .validate()
        .is_err());
    }

    #[test]
    fn greedy_and_logprobs() {
        let logits = [0.0, 3.0, 1.0, 3.0];
        let mut s = Sampler::new(SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy(4)
        });
        let out = s.sample(&logits);
        assert_eq!(out.token, 1, "ties resolve to the lowest id");
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
        let total: f32 = logits
            .iter()
            .map(|l| (l - log_sum_exp(&logits)).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            seed: Some(42),
            ..SamplingParams::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..50).map(|_| s.sample(&logits).token).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params);
            (0..50).map(|_| s.sample(&logits).token).collect()
        };
        assert_eq!(a, b);
        let mut top3: Vec<u32> = top_k_indices(&logits, 3);
        top3.sort();
        assert!(a.iter().all(|t| top3.contains(t)), "{a:?} outside {top3:?}");
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let logits = [10.0, 0.0, 0.0, 0.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params);
        assert!((0..100).all(|_| s.sample(&logits).token == 0));
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        let logits = [1.0, 5.0, 0.0, 4.99];
        for t in [3e-39f32, 1e-30, 1e-6] {
            let mut s = Sampler::new(SamplingParams {
                temperature: t,
                seed: Some(3),
                ..SamplingParams::default()
            });
            assert!(
                (0..50).all(|_| s.sample(&logits).token == 1),
                "temperature {t}"
            );
        }
    }

    #[test]
    fn stop_strings_are_capped() {
        let with = |stop: Vec<String>| {
            SamplingParams {
                stop,
                ..SamplingParams::default()
            }
            .validate()
        };
        assert!(with(vec!["x".repeat(256); 16]).is_ok());
        assert!(with(vec!["x".repeat(257)]).is_err());
        assert!(with(vec!["x".into(); 17]).is_err());
        assert!(with(vec![String::new()]).is_err());
    }

    #[test]
    fn validation_rejects_bad_params() {
        assert!(SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            max_tokens: 0,
            ..SamplingParams::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
