//! What chat and text completions share: admitting a request (its body parsed,
//! its caller's adapter resolved, capture decided), its sampling parameters
//! ([`validate`]), and running it ([`run`]): answered whole ([`whole`]) or
//! streamed ([`stream`]).

pub(crate) mod fields;
pub(crate) mod logprobs;
pub(crate) mod peer;
mod stream;
pub(crate) mod types;
mod validate;
mod whole;

use validate::{fit_context, params, validated};

use super::Data;
use crate::errors::ApiError;
use crate::extract::{LimitedBody, Tenant};
use crate::AppState;
use crate::RequestId;
use actix_web::web;
use actix_web::{HttpMessage, HttpRequest, HttpResponse};
use peer::PeerFd;
use retune_adapters::AdapterRef;
use retune_engine::guide::Constraint;
use retune_engine::{Event, Health, SamplingParams, ValidRequest};
use retune_registry::RegistryError;
use std::time::Instant;
use types::{Common, PromptTokensDetails, Usage};

/// The samples' streams as one.
pub(crate) type Merged = futures_util::stream::SelectAll<Indexed>;

#[derive(Clone, Debug)]
pub(crate) struct Declared {
    pub(crate) name: String,
    pub(crate) system_prompt: Option<String>,
}

/// `model` → the adapter version it names for `tenant` (`None` = the base).
/// `request_id` (the completion id) picks the canary bucket, stable per request.
fn resolve(
    state: &AppState,
    tenant: &str,
    model: &str,
    request_id: &str,
) -> Result<Option<AdapterRef>, ApiError> {
    if model == state.settings.model.id {
        return Ok(None);
    }
    let not_found = || ApiError::NotFound(format!("model `{model}` does not exist"));
    // from memory: no database read, no wait behind an admin write
    let aliases = state.aliases.as_ref().ok_or_else(not_found)?;
    let bucket = (request_id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
        % 100) as u8;
    match aliases.resolve(tenant, model, bucket) {
        Ok(r) => {
            // gc keeps what was served recently (a queued request needs it)
            let key = (
                r.tenant().to_string(),
                r.name().to_string(),
                r.version().to_string(),
            );
            let mut served = state.served.lock().unwrap_or_else(|p| p.into_inner());
            if served.len() < 100_000 {
                served.insert(key);
            }
            Ok(Some(r))
        }
        Err(RegistryError::NotFound(_)) => Err(not_found()),
        Err(e) => Err(e.into()),
    }
}

/// A task the tenant declared in `[[trainer.adapters]]` that has no live version
/// yet: the base model with the task's system prompt serves it (the baseline the
/// gate measures), and its completions are captured under the task's name, so
/// corrections to them train its first version.
fn declared(state: &AppState, tenant: &str, model: &str) -> Option<Declared> {
    let t = &state.settings.trainer;
    t.adapters
        .iter()
        .find(|a| a.enabled && a.tenant == tenant && a.name == model)
        .map(|a| Declared {
            name: a.name.clone(),
            system_prompt: a.resolve(&t.defaults).gate.system_prompt,
        })
}

/// The label set of the tenant's declared label task `model` (`name` or
/// `name@version`), if it declares one.
pub(crate) fn declared_labels(state: &AppState, tenant: &str, model: &str) -> Option<Vec<String>> {
    let name = model.split('@').next().unwrap_or(model);
    let t = &state.settings.trainer;
    t.adapters
        .iter()
        .find(|a| a.enabled && a.tenant == tenant && a.name == name)
        .and_then(|a| a.labels(&t.defaults))
        .map(<[String]>::to_vec)
}

fn completion_id(prefix: &str) -> String {
    let n: u128 = rand::random();
    format!("{prefix}-{n:032x}")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the response needs to know about one generation.
pub(crate) struct Job {
    pub(crate) id: String,
    pub(crate) tenant: String,
    /// The client's socket, for cancelling a non-streaming generation it left.
    pub(crate) peer: Option<PeerFd>,
    pub(crate) request_id: String,
    /// The model name reported: the base id or `name@version`.
    pub(crate) model: String,
    pub(crate) chat: bool,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) logprobs: bool,
    /// Samples of the prompt (`n`).
    pub(crate) n: usize,
    /// Unknown request fields, named in `x-retune-ignored-params`.
    pub(crate) ignored: Vec<String>,
    /// Set when this completion is to be captured.
    pub(crate) capture: Option<crate::capture::CaptureCtx>,
    /// The request's text as the classical classifier reads it (its user
    /// turns, as `retune_datasets::snapshot::classifier_text` takes them from
    /// a training row): a classifier adapter's classical prior weighs it.
    pub(crate) text: Option<String>,
}

/// A parsed, authenticated request with its adapter resolved: the part chat and
/// text completions share.
pub(crate) struct Admitted<T> {
    pub(crate) body: T,
    pub(crate) job: Job,
    pub(crate) params: SamplingParams,
    pub(crate) adapter: Option<AdapterRef>,
    /// A declared task served by the base model with its prompt.
    pub(crate) declared: Option<Declared>,
}

pub(crate) async fn admit<T: serde::de::DeserializeOwned>(
    state: &AppState,
    req: &HttpRequest,
    (Tenant(t), LimitedBody(raw)): (Tenant, LimitedBody),
    id_prefix: &str,
    common: impl Fn(&T) -> &Common,
    logprobs: impl Fn(&T) -> Option<usize>,
    chat: bool,
) -> Result<Admitted<T>, ApiError> {
    let settings = crate::capture::settings_of(state, &t).filter(|_| state.capture.is_some());
    let capture = settings.is_some_and(crate::capture::sampled);
    let scrub = settings.is_some_and(|c| c.scrub);
    let value: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    let ignored = fields::check(&value, chat)?;
    let r: T = serde_json::from_value(value)
        .map_err(|e| ApiError::BadRequest(format!("invalid request: {e}")))?;
    let c = common(&r);
    let lp = logprobs(&r);
    let mut params = params(state, c, lp)?;
    // a declared label task answers one of its labels, whatever the adapter's
    // weights, unless the client constrains the output itself
    if params.constraint.is_none() {
        if let Some(labels) = declared_labels(state, &t, &c.model) {
            params.constraint = Some(Constraint::Choice { choices: labels });
        }
    }
    let id = completion_id(id_prefix);
    let (adapter, declared) = match resolve(state, &t, &c.model, &id) {
        Ok(a) => (a, None),
        Err(ApiError::NotFound(m)) => match declared(state, &t, &c.model) {
            Some(d) => (None, Some(d)),
            None => return Err(ApiError::NotFound(m)),
        },
        Err(e) => return Err(e),
    };
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let job = Job {
        id,
        tenant: t.clone(),
        peer: req.conn_data::<PeerFd>().copied(),
        request_id,
        model: adapter
            .as_ref()
            .map(AdapterRef::model)
            .unwrap_or_else(|| c.model.clone()),
        chat,
        stream: c.stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs: lp.is_some(),
        n: c.n.unwrap_or(1),
        ignored,
        capture: capture.then(|| crate::capture::CaptureCtx {
            tenant: t,
            request: serde_json::Value::Null,
            user: c.user.clone(),
            scrub,
            adapter: None,
            declared: declared.as_ref().map(|d| d.name.clone()),
        }),
        text: None,
    };
    Ok(Admitted {
        body: r,
        job,
        params,
        adapter,
        declared,
    })
}

/// Tokenise off the async runtime.
pub(crate) async fn encode(state: &AppState, text: String) -> Result<Vec<u32>, ApiError> {
    let backend = state.backend.clone();
    web::block(move || backend.tokenizer().encode(&text, true))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Tokenise a rendered chat off the async runtime.
pub(crate) async fn encode_rendered(
    state: &AppState,
    r: retune_engine::Rendered,
) -> Result<Vec<u32>, ApiError> {
    let backend = state.backend.clone();
    web::block(move || backend.tokenizer().encode_chat(&r, true))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// A tokenized prompt to its answer, as both endpoints finish: fitted to the
/// context, validated, queued under its tenant (the engine's fair shares), run.
pub(crate) async fn respond(
    state: Data,
    prompt: Vec<u32>,
    mut params: SamplingParams,
    adapter: Option<AdapterRef>,
    c: &Common,
    job: Job,
) -> Result<HttpResponse, ApiError> {
    fit_context(&state, &mut params, prompt.len(), c)?;
    let mut valid = validated(&state, prompt, params, adapter, c)
        .await?
        .with_tenant(&job.tenant);
    if let Some(t) = &job.text {
        valid = valid.with_text(t);
    }
    run(state, valid, job).await
}

/// Prompt tokens once, and every sample's generated tokens.
fn count_tokens(state: &AppState, prompt: usize, completion: usize) {
    let t = &state.metrics.tokens;
    t.with_label_values(&["prompt"]).inc_by(prompt as u64);
    t.with_label_values(&["completion"])
        .inc_by(completion as u64);
}

/// The prompt counts once however many samples were drawn from it.
fn usage(prompt: usize, completion: usize, cached: usize) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: cached,
        },
    }
}

/// A generation that ended without a last event: the backend stopped (503) or lost it (500).
fn ended(state: &AppState) -> ApiError {
    match state.backend.health() {
        Health::Ready => ApiError::Internal("generation ended without a result".into()),
        Health::Unavailable(why) => {
            tracing::warn!(reason = %why, "generation ended: backend unavailable");
            ApiError::Unavailable("the server is shutting down".into())
        }
    }
}

/// The samples' streams as one: `(index, event)`, and `(index, None)` once
/// when a stream ends.
type Indexed = std::pin::Pin<Box<dyn futures_util::Stream<Item = (usize, Option<Event>)> + Send>>;

fn merged(streams: Vec<retune_engine::GenerationStream>) -> Merged {
    futures_util::stream::select_all(streams.into_iter().enumerate().map(|(k, s)| {
        // a stream ends after its last event; `(k, None)` only when it ends without one
        let s = futures_util::stream::unfold(Some(s), move |s| async move {
            let mut s = s?;
            match s.next().await {
                Some(ev @ (Event::Done(_) | Event::Error(_))) => Some(((k, Some(ev)), None)),
                Some(ev) => Some(((k, Some(ev)), Some(s))),
                None => Some(((k, None), None)),
            }
        });
        Box::pin(s) as Indexed
    }))
}

/// Run a validated request: submit its samples, then answer whole or streamed.
async fn run(state: Data, valid: ValidRequest, mut job: Job) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let adapter = valid.adapter().cloned();
    if let Some(ctx) = &mut job.capture {
        ctx.adapter = adapter.clone();
    }
    let n = job.n;
    let streams = state.backend.submit_n(valid, n)?;
    let mut resp = HttpResponse::Ok();
    if !job.ignored.is_empty() {
        resp.insert_header(("x-retune-ignored-params", job.ignored.join(",")));
    }
    if let Some(a) = &adapter {
        state
            .metrics
            .count_version(a.tenant(), a.name(), a.version());
        resp.insert_header(("x-retune-adapter-version", a.version().to_string()));
    }
    let created = now();
    let object = match (job.chat, job.stream) {
        (true, false) => "chat.completion",
        (true, true) => "chat.completion.chunk",
        (false, _) => "text_completion",
    };
    let events = merged(streams);
    if job.stream {
        Ok(stream::sse(
            state, job, events, resp, object, created, started,
        ))
    } else {
        whole::whole(state, job, events, resp, object, created, started).await
    }
}
