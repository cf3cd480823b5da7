//! HTTP handlers.

use crate::errors::ApiError;
use crate::extract::{LimitedBody, Tenant};
use crate::openai::*;
use crate::AppState;
use crate::RequestId;
use actix_web::web::{self, Bytes};
use actix_web::{HttpMessage, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use retune_adapters::AdapterRef;
use retune_engine::guide::Constraint;
use retune_engine::{ChatMessage, Completion, Event, Health, SamplingParams, ValidRequest};
use retune_registry::RegistryError;
use std::sync::atomic::Ordering;
use std::time::Instant;

type Data = web::Data<AppState>;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/metrics", web::get().to(crate::metrics::scrape))
        .route("/v1/models", web::get().to(models))
        .route("/v1/chat/completions", web::post().to(chat))
        .route("/v1/completions", web::post().to(completions))
        .route("/tokenize", web::post().to(tokenize));
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    /// Accepted for vLLM's shape; one base model serves every adapter.
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
    prompt: String,
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

/// `POST /tokenize` (as vLLM's): a prompt's token ids under the base model's
/// tokenizer, for counting tokens and for `logit_bias`.
async fn tokenize(
    state: Data,
    _: Tenant,
    LimitedBody(raw): LimitedBody,
) -> Result<HttpResponse, ApiError> {
    let r: TokenizeRequest = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::BadRequest(format!("invalid request: {e}")))?;
    let backend = state.backend.clone();
    let ids = web::block(move || backend.tokenizer().encode(&r.prompt, r.add_special_tokens))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "count": ids.len(),
        "tokens": ids,
        "max_model_len": state.backend.context(),
    })))
}

/// Liveness: fails when the engine has stopped (its scheduler panicked), so the
/// container is restarted even if the process could not exit; a drain is alive.
async fn health(state: Data) -> HttpResponse {
    match state.backend.health() {
        Health::Ready => HttpResponse::Ok().json(serde_json::json!({"status": "ok"})),
        Health::Unavailable(why) => {
            tracing::error!(reason = %why, "not alive");
            HttpResponse::ServiceUnavailable().json(serde_json::json!({"status": "engine stopped"}))
        }
    }
}

/// Readiness: the engine serves and the server is not draining.
async fn ready(state: Data) -> HttpResponse {
    if state.draining.load(Ordering::SeqCst) {
        return HttpResponse::ServiceUnavailable().json(serde_json::json!({"status": "draining"}));
    }
    match state.backend.health() {
        Health::Ready => HttpResponse::Ok().json(serde_json::json!({"status": "ready"})),
        Health::Unavailable(why) => {
            tracing::warn!(reason = %why, "not ready");
            HttpResponse::ServiceUnavailable().json(serde_json::json!({"status": "unavailable"}))
        }
    }
}

/// The client's socket, to notice a client that left while its non-streaming
/// completion generates (a streaming one notices when a write fails).
#[derive(Clone, Copy, Debug)]
pub struct PeerFd(std::os::fd::RawFd);

/// `HttpServer::on_connect`: remember each plain TCP connection's socket.
pub fn remember_peer(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    use std::os::fd::AsRawFd;
    if let Some(s) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        ext.insert(PeerFd(s.as_raw_fd()));
    }
}

impl PeerFd {
    /// The peer closed its end (end of file) or the connection failed. The socket
    /// stays open while the request is handled, so the descriptor is still ours.
    fn gone(self) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: a one-byte peek into a live buffer; the descriptor belongs to the
        // connection that is serving this request and is not closed before it ends.
        let n = unsafe {
            libc::recv(
                self.0,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => true,
            n if n > 0 => false, // a pipelined next request: still there
            _ => !matches!(
                std::io::Error::last_os_error().kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
        }
    }
}

async fn models(state: Data, Tenant(t): Tenant) -> Result<HttpResponse, ApiError> {
    let t = t.as_str();
    let mut data = vec![ModelCard {
        id: state.settings.model.id.clone(),
        object: "model",
        owned_by: "retune".into(),
        version: None,
    }];
    if let Some(aliases) = &state.aliases {
        for (name, st) in aliases.snapshot().of_tenant(t) {
            if let Some(live) = st.live {
                data.push(ModelCard {
                    id: name.to_string(),
                    object: "model",
                    owned_by: t.to_string(),
                    version: Some(live.to_string()),
                });
            }
        }
    }
    Ok(HttpResponse::Ok().json(ModelList {
        object: "list",
        data,
    }))
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
fn declared<'a>(state: &'a AppState, tenant: &str, model: &str) -> Option<Declared> {
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
fn declared_labels(state: &AppState, tenant: &str, model: &str) -> Option<Vec<String>> {
    let name = model.split('@').next().unwrap_or(model);
    let t = &state.settings.trainer;
    t.adapters
        .iter()
        .find(|a| a.enabled && a.tenant == tenant && a.name == name)
        .and_then(|a| a.labels(&t.defaults))
        .map(<[String]>::to_vec)
}

#[derive(Clone, Debug)]
struct Declared {
    name: String,
    system_prompt: Option<String>,
}

/// The task's system prompt first (joined with the request's own system
/// message), then the request's other messages — as the gate's base+prompt arm
/// renders them.
fn with_system_prompt(prompt: &str, msgs: Vec<ChatMessage>) -> Vec<ChatMessage> {
    let mut system = prompt.to_string();
    let mut rest = Vec::with_capacity(msgs.len() + 1);
    let mut joined = false;
    for m in msgs {
        if m.role == "system" && !joined {
            system = format!("{system}\n\n{}", m.content);
            joined = true;
        } else {
            rest.push(m);
        }
    }
    let mut out = vec![ChatMessage::new("system", &system)];
    out.extend(rest);
    out
}

/// Sampling parameters from the request, checked before any expensive work.
fn params(
    state: &AppState,
    c: &Common,
    logprobs: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let max_n = state.settings.engine.max_n;
    if c.n.is_some_and(|n| n == 0 || n > max_n) {
        return Err(ApiError::InvalidParam {
            param: "n".into(),
            message: format!("must be 1 to {max_n} (the server's `engine.max_n`)"),
        });
    }
    let cap = state.settings.engine.max_tokens_cap;
    let max_tokens = c
        .max_completion_tokens
        .or(c.max_tokens)
        .unwrap_or(cap.min(256));
    if max_tokens > cap {
        return Err(ApiError::BadRequest(format!(
            "max_tokens {max_tokens} is above the cap {cap}"
        )));
    }
    let bad = |param: &str, message: String| ApiError::InvalidParam {
        param: param.into(),
        message,
    };
    let vocab = state.backend.tokenizer().vocab_size();
    let mut logit_bias = Vec::new();
    for (k, &b) in c.logit_bias.iter().flatten() {
        let id: u32 = k
            .parse()
            .ok()
            .filter(|&id: &u32| (id as usize) < vocab)
            .ok_or_else(|| {
                bad(
                    "logit_bias",
                    format!(
                        "`{k}` is not a token id of this model (0 to {})",
                        vocab.saturating_sub(1)
                    ),
                )
            })?;
        if !(-100.0..=100.0).contains(&b) {
            return Err(bad(
                "logit_bias",
                format!("bias {b} of token {id} is outside [-100, 100]"),
            ));
        }
        logit_bias.push((id, b));
    }
    logit_bias.sort_by_key(|x| x.0);
    for (name, v) in [
        ("frequency_penalty", c.frequency_penalty),
        ("presence_penalty", c.presence_penalty),
    ] {
        if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(bad(name, "must be in [-2, 2]".into()));
        }
    }
    if c.min_p.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
        return Err(bad("min_p", "must be in [0, 1]".into()));
    }
    if c.repetition_penalty
        .is_some_and(|r| !(r > 0.0 && r <= 10.0))
    {
        return Err(bad("repetition_penalty", "must be in (0, 10]".into()));
    }
    let (constraint, _) = constraint(c)?;
    let p = SamplingParams {
        constraint,
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        min_p: c.min_p.unwrap_or(0.0),
        logit_bias,
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        seed: c.seed,
        max_tokens,
        stop: c
            .stop
            .as_ref()
            .map(|s| match s {
                Stop::One(x) => vec![x.clone()],
                Stop::Many(v) => v.clone(),
            })
            .unwrap_or_default(),
        logprobs,
        top_k: c.top_k.unwrap_or(0),
        stop_on_eos: !c.ignore_eos,
        ..SamplingParams::default()
    };
    p.validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(p)
}

/// The structured-output constraint a request asks for, and the field that
/// asked: `response_format` (OpenAI) or vLLM's `guided_*`; at most one.
pub(crate) fn constraint(c: &Common) -> Result<(Option<Constraint>, &'static str), ApiError> {
    let bad = |param: &str, message: &str| ApiError::InvalidParam {
        param: param.into(),
        message: message.into(),
    };
    let mut found: Vec<(Constraint, &'static str)> = Vec::new();
    if let Some(rf) = c.response_format.as_ref().filter(|v| !v.is_null()) {
        match rf.get("type").and_then(serde_json::Value::as_str) {
            Some("text") => {}
            Some("json_object") => found.push((Constraint::JsonObject, "response_format")),
            Some("json_schema") => {
                let schema = rf
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .filter(|s| !s.is_null())
                    .ok_or_else(|| {
                        bad(
                            "response_format.json_schema.schema",
                            "a `json_schema` response format needs `json_schema.schema`",
                        )
                    })?;
                found.push((
                    Constraint::JsonSchema {
                        schema: schema.clone(),
                    },
                    "response_format",
                ));
            }
            Some(other) => {
                return Err(bad(
                    "response_format.type",
                    &format!("unknown type `{other}` (text, json_object, json_schema)"),
                ))
            }
            None => return Err(bad("response_format.type", "`type` is required")),
        }
    }
    if let Some(choices) = &c.guided_choice {
        found.push((
            Constraint::Choice {
                choices: choices.clone(),
            },
            "guided_choice",
        ));
    }
    if let Some(pattern) = &c.guided_regex {
        found.push((
            Constraint::Regex {
                pattern: pattern.clone(),
            },
            "guided_regex",
        ));
    }
    if let Some(schema) = c.guided_json.as_ref().filter(|s| !s.is_null()) {
        found.push((
            Constraint::JsonSchema {
                schema: schema.clone(),
            },
            "guided_json",
        ));
    }
    match found.len() {
        0 => Ok((None, "response_format")),
        1 => {
            let (c, field) = found.remove(0);
            Ok((Some(c), field))
        }
        _ => Err(bad(
            found[1].1,
            &format!("give one output constraint; `{}` is set too", found[0].1),
        )),
    }
}

/// A constraint that does not compile is named by the field that carried it;
/// compiling one (a grammar, the vocabulary's trie the first time) runs off
/// the async runtime.
async fn validated(
    state: &AppState,
    prompt: Vec<u32>,
    params: SamplingParams,
    adapter: Option<AdapterRef>,
    c: &Common,
) -> Result<ValidRequest, ApiError> {
    let r = if params.constraint.is_some() {
        let backend = state.backend.clone();
        web::block(move || backend.validate(prompt, params, adapter))
            .await
            .map_err(|e| ApiError::Internal(format!("validation task: {e}")))?
    } else {
        state.backend.validate(prompt, params, adapter)
    };
    r.map_err(|mut e| {
        if e.param.as_deref() == Some("constraint") {
            // (parsed again only here, on the error path)
            e.param = constraint(c).ok().map(|(_, f)| f.to_string());
        }
        e.into()
    })
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
struct Job {
    id: String,
    tenant: String,
    /// The client's socket, for cancelling a non-streaming generation it left.
    peer: Option<PeerFd>,
    request_id: String,
    /// The model name reported: the base id or `name@version`.
    model: String,
    chat: bool,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    /// Samples of the prompt (`n`).
    n: usize,
    /// Unknown request fields, named in `x-retune-ignored-params`.
    ignored: Vec<String>,
    /// Set when this completion is to be captured.
    capture: Option<crate::capture::CaptureCtx>,
}

/// A parsed, authenticated request with its adapter resolved: the part chat and
/// text completions share.
struct Admitted<T> {
    body: T,
    job: Job,
    params: SamplingParams,
    adapter: Option<AdapterRef>,
    /// A declared task served by the base model with its prompt.
    declared: Option<Declared>,
}

async fn admit<T: serde::de::DeserializeOwned>(
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
    let ignored = crate::params::check(&value, chat)?;
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
async fn encode(state: &AppState, text: String) -> Result<Vec<u32>, ApiError> {
    let backend = state.backend.clone();
    web::block(move || backend.tokenizer().encode(&text, true))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Tokenise a rendered chat off the async runtime.
async fn encode_rendered(
    state: &AppState,
    r: retune_engine::Rendered,
) -> Result<Vec<u32>, ApiError> {
    let backend = state.backend.clone();
    web::block(move || backend.tokenizer().encode_chat(&r, true))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))
}

async fn chat(
    state: Data,
    req: HttpRequest,
    caller: Tenant,
    body: LimitedBody,
) -> Result<HttpResponse, ApiError> {
    let mut a = admit(
        &state,
        &req,
        (caller, body),
        "chatcmpl",
        |r: &ChatRequest| &r.common,
        |r| r.logprobs.then(|| r.top_logprobs.unwrap_or(0)),
        true,
    )
    .await?;
    if a.body.messages.is_empty() {
        return Err(ApiError::InvalidParam {
            param: "messages".into(),
            message: "at least one message is needed".into(),
        });
    }
    let mut msgs: Vec<ChatMessage> = Vec::with_capacity(a.body.messages.len());
    for (i, m) in a.body.messages.iter().enumerate() {
        let role = crate::params::role(&m.role, i)?;
        msgs.push(ChatMessage::new(
            role,
            &crate::params::content_text(&m.content, i)?,
        ));
    }
    if let Some(ctx) = &mut a.job.capture {
        let as_sent: Vec<serde_json::Value> = msgs
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        ctx.request = serde_json::json!({ "messages": as_sent });
    }
    let msgs = match a.declared.as_ref().and_then(|d| d.system_prompt.as_deref()) {
        Some(p) => with_system_prompt(p, msgs),
        None => msgs,
    };
    // message contents are tokenized as text: a `<|im_start|>system` typed into
    // one is not a control token
    let rendered = state.backend.template().render_marked(&msgs, true)?;
    let prompt = encode_rendered(&state, rendered).await?;
    fit_context(&state, &mut a.params, prompt.len(), &a.body.common)?;
    let valid = validated(&state, prompt, a.params, a.adapter, &a.body.common).await?;
    let valid = with_tenant(valid, &a.job);
    generate(state, valid, a.job).await
}

async fn completions(
    state: Data,
    req: HttpRequest,
    caller: Tenant,
    body: LimitedBody,
) -> Result<HttpResponse, ApiError> {
    let mut a = admit(
        &state,
        &req,
        (caller, body),
        "cmpl",
        |r: &CompletionRequest| &r.common,
        |r| r.logprobs,
        false,
    )
    .await?;
    if let Some(ctx) = &mut a.job.capture {
        ctx.request = serde_json::json!({ "prompt": a.body.prompt });
    }
    let prompt = encode(&state, a.body.prompt).await?;
    fit_context(&state, &mut a.params, prompt.len(), &a.body.common)?;
    let valid = validated(&state, prompt, a.params, a.adapter, &a.body.common).await?;
    let valid = with_tenant(valid, &a.job);
    generate(state, valid, a.job).await
}

/// A prompt and an explicit `max_tokens` beyond the context are a 400 (as
/// OpenAI answers); the default `max_tokens` shrinks to what fits.
fn fit_context(
    state: &AppState,
    params: &mut SamplingParams,
    prompt: usize,
    c: &Common,
) -> Result<(), ApiError> {
    let context = state.backend.context();
    let room = context.saturating_sub(prompt);
    if params.max_tokens <= room || room == 0 {
        return Ok(()); // a prompt that fills the context is the engine's 400
    }
    match (c.max_completion_tokens, c.max_tokens) {
        (Some(_), _) | (None, Some(_)) => Err(ApiError::InvalidParam {
            param: if c.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            }
            .into(),
            message: format!(
                "this model's context is {context} tokens: the prompt has {prompt} and {} more were asked for",
                params.max_tokens
            ),
        }),
        (None, None) => {
            params.max_tokens = room;
            Ok(())
        }
    }
}

/// The request queued under its tenant (the engine's fair shares).
fn with_tenant(valid: ValidRequest, job: &Job) -> ValidRequest {
    valid.with_tenant(&job.tenant)
}

/// A token's logprob entry (chat shape): its text and alternatives read off
/// the tokenizer's byte table, no decoding; `bytes` are the token's own bytes,
/// part of a UTF-8 character for a token that splits one.
fn logprob_entry(state: &AppState, t: &retune_engine::TokenEvent) -> Option<TokenLogprob> {
    let tok = state.backend.tokenizer();
    let top = |id: u32, logprob: f32| {
        let bytes = tok.token_bytes(id).to_vec();
        TopLogprob {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob,
        }
    };
    t.logprob.map(|lp| {
        let own = top(t.id, lp);
        TokenLogprob {
            token: own.token,
            logprob: lp,
            bytes: own.bytes,
            top_logprobs: t.top.iter().map(|&(id, l)| top(id, l)).collect(),
        }
    })
}

/// Logprobs in the shape of the endpoint: chat's `{"content": [...]}`, or the
/// legacy completions' parallel lists, `text_offset` counting characters of
/// the completion from `offset`.
fn logprobs_json(chat: bool, entries: &[TokenLogprob], offset: &mut usize) -> serde_json::Value {
    if chat {
        return serde_json::json!({ "content": entries });
    }
    let mut text_offset = Vec::with_capacity(entries.len());
    for e in entries {
        text_offset.push(*offset);
        *offset += e.token.chars().count();
    }
    let top: Vec<serde_json::Map<String, serde_json::Value>> = entries
        .iter()
        .map(|e| {
            e.top_logprobs
                .iter()
                .map(|t| (t.token.clone(), serde_json::json!(t.logprob)))
                .collect()
        })
        .collect();
    serde_json::json!({
        "tokens": entries.iter().map(|e| e.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
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

/// The SSE error event of a failed stream: the client sees a kind's public
/// message; a server fault's detail goes to the log with the request id.
fn stream_error(job: &Job, err: ApiError) -> String {
    if let Some(detail) = err.hidden_detail() {
        tracing::error!(request_id = %job.request_id, completion_id = %job.id, detail, "stream failed");
    }
    format!(
        "data: {}\n\ndata: [DONE]\n\n",
        err.body(Some(&job.request_id))
    )
}

/// One finished sample of a non-streaming response.
struct Choice {
    text: String,
    logprobs: Vec<TokenLogprob>,
    completion: Completion,
}

/// The samples' streams as one: `(index, event)`, and `(index, None)` once
/// when a stream ends.
type Indexed = std::pin::Pin<Box<dyn futures_util::Stream<Item = (usize, Option<Event>)> + Send>>;

fn merged(
    streams: Vec<retune_engine::GenerationStream>,
) -> futures_util::stream::SelectAll<Indexed> {
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

async fn generate(
    state: Data,
    valid: ValidRequest,
    mut job: Job,
) -> Result<HttpResponse, ApiError> {
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
    let mut events = merged(streams);
    if !job.stream {
        let mut texts: Vec<String> = vec![String::new(); n];
        let mut lps: Vec<Vec<TokenLogprob>> = (0..n).map(|_| Vec::new()).collect();
        let mut done: Vec<Option<Choice>> = (0..n).map(|_| None).collect();
        let mut first = true;
        let mut tick = actix_web::rt::time::interval(std::time::Duration::from_millis(100));
        while done.iter().any(Option::is_none) {
            let ev = tokio::select! {
                ev = events.next() => ev,
                _ = tick.tick() => {
                    if job.peer.is_some_and(PeerFd::gone) {
                        // dropping the streams cancels the generations and frees their KV
                        drop(events);
                        tracing::info!(request_id = %job.request_id, completion_id = %job.id, "client left: generation cancelled");
                        state.metrics.cancelled.inc();
                        crate::capture::failure(&state, &job.id, job.capture.as_ref(), started);
                        return Err(ApiError::ClientGone);
                    }
                    continue;
                }
            };
            match ev {
                Some((k, Some(Event::Token(t)))) => {
                    if first {
                        state.metrics.ttft.observe(started.elapsed().as_secs_f64());
                        first = false;
                    }
                    texts[k].push_str(&t.text);
                    if job.logprobs {
                        lps[k].extend(logprob_entry(&state, &t));
                    }
                }
                Some((k, Some(Event::Done(c)))) => {
                    let mut text = std::mem::take(&mut texts[k]);
                    text.push_str(&c.tail);
                    crate::capture::completion(
                        &state,
                        &job.id,
                        job.capture.as_ref(),
                        k,
                        &c,
                        text.clone(),
                    );
                    done[k] = Some(Choice {
                        text,
                        logprobs: std::mem::take(&mut lps[k]),
                        completion: *c,
                    });
                }
                Some((_, Some(Event::Error(e)))) => {
                    crate::capture::failure(&state, &job.id, job.capture.as_ref(), started);
                    return Err(e.into());
                }
                Some((_, None)) | None => {
                    crate::capture::failure(&state, &job.id, job.capture.as_ref(), started);
                    return Err(ended(&state));
                }
            }
        }
        let done: Vec<Choice> = done.into_iter().flatten().collect();
        let prompt = done.first().map_or(0, |c| c.completion.prompt_tokens());
        let generated: usize = done.iter().map(|c| c.completion.completion_tokens()).sum();
        let cached = done.first().map_or(0, |c| c.completion.cached_tokens);
        count_tokens(&state, prompt, generated);
        let choices: Vec<CompletionChoice> = done
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let logprobs = job
                    .logprobs
                    .then(|| logprobs_json(job.chat, &c.logprobs, &mut 0));
                let finish_reason = c.completion.finish.as_str();
                if job.chat {
                    CompletionChoice::Chat {
                        index,
                        message: AssistantMessage {
                            role: "assistant",
                            content: c.text,
                        },
                        finish_reason,
                        logprobs,
                    }
                } else {
                    CompletionChoice::Text {
                        index,
                        text: c.text,
                        finish_reason,
                        logprobs,
                    }
                }
            })
            .collect();
        return Ok(resp.json(CompletionBody {
            id: &job.id,
            object,
            created,
            model: &job.model,
            choices,
            usage: Some(usage(prompt, generated, cached)),
        }));
    }
    // SSE: dropping this stream (client gone) drops the engine streams and cancels.
    let st = state.clone();
    let per = SseState {
        first: vec![true; n],
        sent: vec![String::new(); n],
        offset: vec![0; n],
        left: n,
        prompt: 0,
        generated: 0,
        cached: 0,
        over: false,
    };
    let sse =
        futures_util::stream::unfold((events, job, per), move |(mut events, job, mut per)| {
            let st = st.clone();
            async move {
                if per.over {
                    return None;
                }
                let body = |choices: Vec<ChunkChoice>, usage: Option<Usage>| {
                    let b = CompletionBody {
                        id: &job.id,
                        object,
                        created,
                        model: &job.model,
                        choices,
                        usage,
                    };
                    format!(
                        "data: {}\n\n",
                        serde_json::to_string(&b).unwrap_or_default()
                    )
                };
                let mut out = String::new();
                match events.next().await {
                    Some((k, Some(Event::Token(t)))) => {
                        if per.first.iter().all(|&f| f) {
                            st.metrics.ttft.observe(started.elapsed().as_secs_f64());
                        }
                        let lp = if job.logprobs {
                            logprob_entry(&st, &t)
                                .map(|e| logprobs_json(job.chat, &[e], &mut per.offset[k]))
                        } else {
                            None
                        };
                        let choice = if job.chat {
                            ChunkChoice::Chat {
                                index: k,
                                delta: Delta {
                                    role: per.first[k].then_some("assistant"),
                                    content: &t.text,
                                },
                                finish_reason: None,
                                logprobs: lp,
                            }
                        } else {
                            ChunkChoice::Text {
                                index: k,
                                text: &t.text,
                                finish_reason: None,
                                logprobs: lp,
                            }
                        };
                        per.first[k] = false;
                        out.push_str(&body(vec![choice], None));
                        if job.capture.is_some() {
                            per.sent[k].push_str(&t.text);
                        }
                    }
                    Some((k, Some(Event::Done(c)))) => {
                        let finish_reason = Some(c.finish.as_str());
                        let choice = if job.chat {
                            ChunkChoice::Chat {
                                index: k,
                                delta: Delta {
                                    role: None,
                                    content: &c.tail,
                                },
                                finish_reason,
                                logprobs: None,
                            }
                        } else {
                            ChunkChoice::Text {
                                index: k,
                                text: &c.tail,
                                finish_reason,
                                logprobs: None,
                            }
                        };
                        out.push_str(&body(vec![choice], None));
                        per.prompt = c.prompt_tokens();
                        if per.left == per.first.len() {
                            per.cached = c.cached_tokens;
                        }
                        per.generated += c.completion_tokens();
                        if job.capture.is_some() {
                            per.sent[k].push_str(&c.tail);
                            crate::capture::completion(
                                &st,
                                &job.id,
                                job.capture.as_ref(),
                                k,
                                &c,
                                std::mem::take(&mut per.sent[k]),
                            );
                        }
                        per.left -= 1;
                        if per.left == 0 {
                            count_tokens(&st, per.prompt, per.generated);
                            if job.include_usage {
                                out.push_str(&body(
                                    Vec::new(),
                                    Some(usage(per.prompt, per.generated, per.cached)),
                                ));
                            }
                            out.push_str("data: [DONE]\n\n");
                            per.over = true;
                        }
                    }
                    Some((_, Some(Event::Error(e)))) => {
                        crate::capture::failure(&st, &job.id, job.capture.as_ref(), started);
                        out.push_str(&stream_error(&job, e.into()));
                        per.over = true;
                    }
                    Some((_, None)) | None => {
                        crate::capture::failure(&st, &job.id, job.capture.as_ref(), started);
                        out.push_str(&stream_error(&job, ended(&st)));
                        per.over = true;
                    }
                }
                Some((
                    Ok::<Bytes, actix_web::Error>(Bytes::from(out)),
                    (events, job, per),
                ))
            }
        });
    Ok(resp
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(sse))
}

/// Where a streamed response with `n` samples stands.
struct SseState {
    first: Vec<bool>,
    /// Text sent per sample, for its captured record.
    sent: Vec<String>,
    /// Characters sent per sample (legacy logprobs' `text_offset`).
    offset: Vec<usize>,
    /// Samples not finished yet.
    left: usize,
    prompt: usize,
    generated: usize,
    /// Prompt positions the first finished sample took from the prefix cache.
    cached: usize,
    over: bool,
}
