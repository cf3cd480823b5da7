//! Emission: choosing each row's next token, answering a classifier's label,
//! streaming tokens and finishing sequences.

use super::*;

/// Draw row `s`'s next token from its logits `l`, among what `mask` allows
/// (narrowed near the budget's end to close JSON).
pub(super) fn choose(
    s: &mut Seq,
    l: &[f32],
    mask: Option<&Mask>,
) -> std::result::Result<Sampled, GenError> {
    if mask.is_some_and(Mask::is_empty) {
        return Err(GenError::internal("the grammar allows no token here"));
    }
    let left = s.sampler.params().max_tokens.saturating_sub(s.output.len());
    let narrowed = match (&mut s.guide, mask) {
        (Some(g), Some(m)) => g.wrap_up(m, left),
        _ => None,
    };
    Ok(s.sampler.sample_masked(l, narrowed.as_ref().or(mask)))
}

/// The classifier head of row `s`'s adapter, if it has one.
pub(super) fn head_of(s: &Seq) -> Option<&retune_adapters::ClassHead> {
    s.adapter.as_ref().and_then(|a| a.0.head.as_ref())
}

/// A classifier's answer: its most probable label (under the head, times its
/// classical prior's probability of the request's text when it has one),
/// emitted as that label's tokens (cut by `max_tokens` or a stop string like
/// any answer), the first carrying the label's log-probability and the rest 0, so the
/// answer's token log-probabilities sum to the label's. The row then ends.
pub(super) fn answer_label(
    s: &mut Seq,
    scores: &[f32],
    tok: &Tok,
    context: usize,
    stats: &EngineStats,
) {
    let Some(head) = head_of(s) else { return };
    let lp = head.log_probs(scores, s.text.as_deref());
    let best = lp
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    let logprob = lp.get(best).copied().unwrap_or(0.0);
    let ids = match head.labels.get(best).map(|l| tok.encode(l, false)) {
        Some(Ok(ids)) if !ids.is_empty() => ids,
        Some(Err(e)) => {
            let _ = s.tx.send(Event::Error(GenError::internal(format!(
                "the classifier's label does not tokenize: {e}"
            ))));
            return;
        }
        _ => {
            let _ = s.tx.send(Event::Error(GenError::internal(
                "the classifier's scores do not match its labels",
            )));
            return;
        }
    };
    // the label is the whole answer (no grammar), then the end of turn
    s.guide = None;
    let end = tok
        .eos
        .first()
        .copied()
        .filter(|_| s.sampler.params().stop_on_eos);
    for (k, id) in ids.into_iter().chain(end).enumerate() {
        let sampled = Sampled {
            token: id,
            logprob: Some(if k == 0 { logprob } else { 0.0 }),
            top: Vec::new(),
        };
        if !advance(s, tok, sampled, context, stats) {
            return;
        }
    }
    let tail = s.stop.flush();
    done(s, FinishReason::Stop, tail);
}

/// Advance row `s` past its drawn token: its grammar, the token event, or
/// the ending. Returns whether it goes on.
pub(super) fn advance(
    s: &mut Seq,
    tok: &Tok,
    sampled: Sampled,
    context: usize,
    stats: &EngineStats,
) -> bool {
    stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let id = sampled.token;
    let p = s.sampler.params();
    let is_stop_token = p.stop_token_ids.contains(&id) || (p.stop_on_eos && tok.eos.contains(&id));
    if let (Some(g), false) = (&mut s.guide, is_stop_token) {
        if let Err(e) = g.commit(id) {
            let _ = s.tx.send(Event::Error(GenError::internal(e.to_string())));
            return false;
        }
    }
    let mut reason = emit(s, tok, sampled, context);
    if let Some(g) = &s.guide {
        if reason.is_none() && g.is_done() {
            // the grammar is complete and allows nothing more
            reason = Some((FinishReason::Stop, false));
        }
        if g.wrapped() {
            // closed early to fit max_tokens: it ended for length
            if let Some(r) = &mut reason {
                r.0 = FinishReason::Length;
            }
        }
    }
    let Some(reason) = reason else {
        return true;
    };
    let tail = s.stop.flush();
    let tail = if reason.1 { String::new() } else { tail };
    done(s, reason.0, tail);
    false
}

/// End row `s`: its completion record goes to the reader.
pub(super) fn done(s: &mut Seq, finish: FinishReason, tail: String) {
    let record = Completion {
        finish,
        prompt: std::mem::take(&mut s.prompt),
        output: std::mem::take(&mut s.output),
        adapter: s.adapter.as_ref().map(|a| a.1.clone()),
        params: s.sampler.params().clone(),
        timings: s.clock.timings(),
        tail,
        cached_tokens: s.cached,
    };
    let _ = s.tx.send(Event::Done(Box::new(record)));
}

/// Record one sampled token; returns the finish reason (and whether a stop string
/// ended it) when the sequence is done.
pub(super) fn emit(
    s: &mut Seq,
    tok: &Tok,
    sampled: Sampled,
    context: usize,
) -> Option<(FinishReason, bool)> {
    let id = sampled.token;
    s.output.push(id);
    s.clock
        .first_token
        .get_or_insert_with(std::time::Instant::now);
    s.last = Some(id);
    let p = s.sampler.params();
    let is_stop_token = p.stop_token_ids.contains(&id) || (p.stop_on_eos && tok.eos.contains(&id));
    let (text, hit) = if is_stop_token {
        (String::new(), false)
    } else {
        s.stop.push(&s.detok.push(tok, id))
    };
    let max_tokens = p.max_tokens;
    let _ = s.tx.send(Event::Token(TokenEvent {
        id,
        text,
        logprob: sampled.logprob,
        top: sampled.top,
        at: std::time::Instant::now(),
    }));
    if is_stop_token {
        Some((FinishReason::Stop, false))
    } else if hit {
        Some((FinishReason::Stop, true))
    } else if s.output.len() >= max_tokens || s.kv.len() + 1 >= context {
        Some((FinishReason::Length, false))
    } else {
        None
    }
}
