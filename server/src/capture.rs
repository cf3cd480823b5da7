//! Capture: the completions a tenant's settings record (sampled), as the
//! client received them, scrubbed of personal data when the tenant asks,
//! queued to the datasets store without ever blocking a request.

use crate::AppState;
use retune_config::now_ms;
use retune_datasets::{CapturedCompletion, Finish};
use retune_engine::{Completion, FinishReason};
use std::time::Instant;

/// What a captured record needs beyond the completion itself.
pub(crate) struct CaptureCtx {
    pub(crate) tenant: String,
    /// The messages or prompt as sent.
    pub(crate) request: serde_json::Value,
    pub(crate) user: Option<String>,
    /// Scrub personal data before storing (tenant setting).
    pub(crate) scrub: bool,
    /// The adapter version serving it (set when it is submitted).
    pub(crate) adapter: Option<retune_adapters::AdapterRef>,
    /// The declared task it is captured under when no version serves it yet.
    pub(crate) declared: Option<String>,
}

pub(crate) fn settings_of<'a>(
    state: &'a AppState,
    tenant: &str,
) -> Option<&'a retune_config::CaptureSettings> {
    state
        .settings
        .tenants
        .iter()
        .find(|t| t.name == tenant)
        .map(|t| &t.capture)
}

/// Whether the tenant's capture settings record this completion.
pub(crate) fn sampled(c: &retune_config::CaptureSettings) -> bool {
    c.enabled && (c.sample_rate >= 1.0 || rand::random::<f64>() < c.sample_rate)
}

/// Queue a captured record (never blocks; a full queue drops it): what every
/// record holds, then `fill` sets what this one adds.
fn queue_record(
    state: &AppState,
    id: &str,
    ctx: Option<&CaptureCtx>,
    fill: impl FnOnce(&mut CapturedCompletion),
) {
    let (Some(ctx), Some(w)) = (ctx, &state.capture) else {
        return;
    };
    let mut record = CapturedCompletion {
        id: id.to_string(),
        tenant: ctx.tenant.clone(),
        adapter: ctx
            .adapter
            .as_ref()
            .map(|a| a.name().to_string())
            .or_else(|| ctx.declared.clone()),
        version: ctx.adapter.as_ref().map(|a| a.version().to_string()),
        base_fingerprint: state.base.fingerprint.clone(),
        request: ctx.request.clone(),
        params: serde_json::Value::Null,
        output_text: String::new(),
        output_ids: Vec::new(),
        finish: Finish::Error,
        prompt_tokens: 0,
        completion_tokens: 0,
        ttft_ms: 0.0,
        total_ms: 0.0,
        user: ctx.user.clone(),
        created_at: now_ms(),
    };
    fill(&mut record);
    if ctx.scrub {
        scrub_record(&mut record);
    }
    w.capture(record);
}

/// The record of a finished completion: exactly the text the client received.
/// Sample `index` of `n` is recorded as `{id}-{index}` (sample 0 as `{id}`).
pub(crate) fn completion(
    state: &AppState,
    id: &str,
    ctx: Option<&CaptureCtx>,
    index: usize,
    c: &Completion,
    text: String,
) {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    queue_record(state, id, ctx, |r| {
        if index > 0 {
            r.id = format!("{id}-{index}");
        }
        if let Some(a) = &c.adapter {
            r.adapter = Some(a.name().to_string());
            r.version = Some(a.version().to_string());
        }
        r.params = serde_json::to_value(&c.params).unwrap_or_default();
        r.output_text = text;
        r.output_ids = c.output.clone();
        r.finish = match c.finish {
            FinishReason::Stop => Finish::Stop,
            FinishReason::Length => Finish::Length,
        };
        r.prompt_tokens = c.prompt_tokens();
        r.completion_tokens = c.completion_tokens();
        r.ttft_ms = ms(c.timings.first_token);
        r.total_ms = ms(c.timings.total);
    });
}

/// A completion that failed (finish `error`, no output): the watch after a
/// rollout counts a version's errors from these.
pub(crate) fn failure(state: &AppState, id: &str, ctx: Option<&CaptureCtx>, started: Instant) {
    queue_record(state, id, ctx, |r| {
        r.total_ms = started.elapsed().as_secs_f64() * 1e3
    });
}

/// Personal data out of a record before it is stored: text scrubbed, token ids
/// (which would still spell it) dropped.
fn scrub_record(r: &mut CapturedCompletion) {
    use retune_datasets::curate::scrub;
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => *s = scrub(s).0,
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            serde_json::Value::Object(o) => o.values_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut r.request);
    r.output_text = scrub(&r.output_text).0;
    r.output_ids.clear();
}
