//! HTTP handlers.

use crate::errors::ApiError;
use crate::openai::*;
use crate::AppState;
use actix_web::web::{self, Bytes};
use actix_web::{HttpMessage, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use retune_engine::{ChatMessage, Event, FinishReason, GenerateRequest, SamplingParams};
use std::sync::atomic::Ordering;
use std::time::Instant;

type Data = web::Data<AppState>;

/// The authenticated tenant, for the request metrics middleware.
pub struct TenantLabel(pub String);

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/metrics", web::get().to(metrics))
        .route("/v1/models", web::get().to(models))
        .route("/v1/chat/completions", web::post().to(chat))
        .route("/v1/completions", web::post().to(completions));
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn ready() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))
}

async fn metrics(state: Data) -> HttpResponse {
    let m = &state.metrics;
    let s = state.engine.stats();
    m.queue_depth.set(s.queued.load(Ordering::Relaxed) as i64);
    m.running.set(s.running.load(Ordering::Relaxed) as i64);
    m.step_tokens
        .set(s.last_step_tokens.load(Ordering::Relaxed) as i64);
    if let Some(p) = &state.pool {
        let ps = p.stats();
        m.adapters_resident
            .set(ps.resident.load(Ordering::Relaxed) as i64);
        m.adapter_bytes.set(ps.bytes.load(Ordering::Relaxed) as i64);
        m.adapter_loads.set(ps.loads.load(Ordering::Relaxed) as i64);
        m.adapter_evictions
            .set(ps.evictions.load(Ordering::Relaxed) as i64);
        m.adapter_load_seconds
            .set(ps.load_micros.load(Ordering::Relaxed) as f64 / 1e6);
    }
    let mut out = Vec::new();
    use prometheus::Encoder;
    match prometheus::TextEncoder::new().encode(&m.registry.gather(), &mut out) {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(out),
        Err(e) => actix_web::ResponseError::error_response(&ApiError::Internal(e.to_string())),
    }
}

fn tenant<'a>(state: &'a AppState, req: &HttpRequest) -> Result<&'a str, ApiError> {
    let key = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::Unauthorized("missing `Authorization: Bearer <key>`".into()))?;
    let t = state
        .keys
        .tenant(key)
        .ok_or_else(|| ApiError::Unauthorized("invalid API key".into()))?;
    req.extensions_mut().insert(TenantLabel(t.to_string()));
    Ok(t)
}

async fn models(state: Data, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let t = tenant(&state, &req)?;
    let mut data = vec![
        serde_json::json!({"id": state.settings.model.id, "object": "model", "owned_by": "retune"}),
    ];
    if let Some(reg) = &state.registry {
        for (_, name, st) in reg
            .list(Some(t))
            .map_err(|e| ApiError::Internal(e.to_string()))?
        {
            if let Some(live) = st.live {
                data.push(serde_json::json!({"id": name, "object": "model", "owned_by": t, "version": live}));
            }
        }
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": data})))
}

/// Read the body up to the configured limit.
async fn body(state: &AppState, mut payload: web::Payload) -> Result<Bytes, ApiError> {
    let limit = state.settings.server.max_body_bytes;
    let mut buf = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(format!(
                "request body over {limit} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// `model` → (adapter handle, the model name to report).
fn resolve(
    state: &AppState,
    tenant: &str,
    model: &str,
    request_id: &str,
) -> Result<(Option<String>, String), ApiError> {
    if model == state.settings.model.id {
        return Ok((None, model.to_string()));
    }
    let not_found = || ApiError::NotFound(format!("model `{model}` does not exist"));
    let reg = state.registry.as_ref().ok_or_else(not_found)?;
    let (name, version) = match model.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (model, None),
    };
    let version = match version {
        Some(v) => {
            let info = reg.version(tenant, name, v).map_err(|_| not_found())?;
            if info.retired {
                return Err(not_found());
            }
            v.to_string()
        }
        None => {
            let st = reg.state(tenant, name).map_err(|_| not_found())?;
            let bucket = request_id
                .bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
                % 100;
            match (st.canary, st.live) {
                (Some((c, pct)), _) if bucket < pct as u32 => c,
                (_, Some(live)) => live,
                _ => return Err(not_found()),
            }
        }
    };
    Ok((
        Some(retune_adapters::Registry::handle(tenant, name, &version)),
        format!("{name}@{version}"),
    ))
}

fn params(
    state: &AppState,
    c: &Common,
    logprobs: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::BadRequest("only n=1 is supported".into()));
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
    let p = SamplingParams {
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
        stop_on_eos: !c.ignore_eos,
        ..SamplingParams::default()
    };
    p.validate()?;
    Ok(p)
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

fn finish(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

struct Job {
    id: String,
    model: String,
    version: Option<String>,
    chat: bool,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

/// Authenticate, read and parse the body, and resolve the model: the part chat
/// and text completions share.
async fn admit<T: serde::de::DeserializeOwned>(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    id_prefix: &str,
    model_of: impl Fn(&T) -> &str,
) -> Result<(T, String, Option<String>, String), ApiError> {
    let t = tenant(state, req)?.to_string();
    let raw = body(state, payload).await?;
    let r: T = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    let id = completion_id(id_prefix);
    let (adapter, model) = resolve(state, &t, model_of(&r), &id)?;
    Ok((r, id, adapter, model))
}

impl Job {
    fn new(
        id: String,
        adapter: &Option<String>,
        model: String,
        chat: bool,
        common: &Common,
        logprobs: bool,
    ) -> Self {
        Self {
            id,
            version: adapter.as_ref().map(|_| model.clone()),
            model,
            chat,
            stream: common.stream,
            include_usage: common
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            logprobs,
        }
    }
}

async fn chat(
    state: Data,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (r, id, adapter, model) = admit(&state, &req, payload, "chatcmpl", |r: &ChatRequest| {
        &r.common.model
    })
    .await?;
    let msgs: Vec<ChatMessage> = r
        .messages
        .iter()
        .map(|m| ChatMessage::new(&m.role, &m.content))
        .collect();
    let text = state.template.render(&msgs, true)?;
    let prompt = state.engine.tokenizer().encode(&text, true)?;
    let top = r.logprobs.then(|| r.top_logprobs.unwrap_or(0));
    let params = params(&state, &r.common, top)?;
    let job = Job::new(id, &adapter, model, true, &r.common, r.logprobs);
    generate(
        state,
        GenerateRequest {
            prompt,
            params,
            adapter,
        },
        job,
    )
    .await
}

async fn completions(
    state: Data,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (r, id, adapter, model) = admit(&state, &req, payload, "cmpl", |r: &CompletionRequest| {
        &r.common.model
    })
    .await?;
    let prompt = state.engine.tokenizer().encode(&r.prompt, true)?;
    let params = params(&state, &r.common, r.logprobs)?;
    let job = Job::new(id, &adapter, model, false, &r.common, r.logprobs.is_some());
    generate(
        state,
        GenerateRequest {
            prompt,
            params,
            adapter,
        },
        job,
    )
    .await
}

fn logprob_entry(state: &AppState, t: &retune_engine::TokenEvent) -> Option<TokenLogprob> {
    let tok = state.engine.tokenizer();
    let top = |id: u32, logprob: f32| {
        let token = tok.decode(&[id], false).unwrap_or_default();
        TopLogprob {
            bytes: token.clone().into_bytes(),
            token,
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

async fn generate(state: Data, greq: GenerateRequest, job: Job) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let prompt_tokens = greq.prompt.len();
    let adapter_name = greq.adapter.clone();
    let mut stream = state.engine.submit(greq)?;
    if let (Some(v), Some(h)) = (&job.version, &adapter_name) {
        let name = h.split('/').nth(1).unwrap_or("");
        state
            .metrics
            .count_version(name, v.rsplit('@').next().unwrap_or(""));
    }
    let mut resp = HttpResponse::Ok();
    if let Some(v) = &job.version {
        resp.insert_header((
            "x-retune-adapter-version",
            v.rsplit('@').next().unwrap_or("").to_string(),
        ));
    }
    let created = now();
    if !job.stream {
        let mut text = String::new();
        let mut lps = Vec::new();
        let mut first = true;
        loop {
            match stream.next().await {
                Some(Event::Token(t)) => {
                    if first {
                        state.metrics.ttft.observe(started.elapsed().as_secs_f64());
                        first = false;
                    }
                    text.push_str(&t.text);
                    if job.logprobs {
                        lps.extend(logprob_entry(&state, &t));
                    }
                }
                Some(Event::Done(c)) => {
                    text.push_str(&c.tail);
                    let usage = Usage {
                        prompt_tokens,
                        completion_tokens: c.completion_tokens,
                        total_tokens: prompt_tokens + c.completion_tokens,
                    };
                    state
                        .metrics
                        .tokens
                        .with_label_values(&["prompt"])
                        .inc_by(prompt_tokens as u64);
                    state
                        .metrics
                        .tokens
                        .with_label_values(&["completion"])
                        .inc_by(c.completion_tokens as u64);
                    let logprobs = job.logprobs.then(|| serde_json::json!({"content": lps}));
                    let choice = if job.chat {
                        serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text},
                            "finish_reason": finish(&c.finish), "logprobs": logprobs})
                    } else {
                        serde_json::json!({"index": 0, "text": text, "finish_reason": finish(&c.finish), "logprobs": logprobs})
                    };
                    let object = if job.chat {
                        "chat.completion"
                    } else {
                        "text_completion"
                    };
                    return Ok(resp.json(
                        serde_json::json!({"id": job.id, "object": object, "created": created,
                        "model": job.model, "choices": [choice], "usage": usage}),
                    ));
                }
                Some(Event::Error(e)) => return Err(ApiError::BadRequest(e)),
                None => return Err(ApiError::Unavailable("engine stopped".into())),
            }
        }
    }
    // SSE: dropping this stream (client gone) drops the engine stream and cancels.
    let st = state.clone();
    let sse = futures_util::stream::unfold(
        (stream, job, true, false),
        move |(mut s, job, first, done)| {
            let st = st.clone();
            async move {
                if done {
                    return None;
                }
                let object = if job.chat {
                    "chat.completion.chunk"
                } else {
                    "text_completion"
                };
                let chunk = |choice: serde_json::Value| serde_json::json!({"id": job.id, "object": object, "created": created, "model": job.model, "choices": [choice]});
                let mut out = String::new();
                let mut finished = false;
                match s.next().await {
                    Some(Event::Token(t)) => {
                        if first {
                            st.metrics.ttft.observe(started.elapsed().as_secs_f64());
                        }
                        let lp = if job.logprobs {
                            logprob_entry(&st, &t).map(|e| serde_json::json!({"content": [e]}))
                        } else {
                            None
                        };
                        let choice = if job.chat {
                            let mut delta = serde_json::json!({"content": t.text});
                            if first {
                                delta["role"] = "assistant".into();
                            }
                            serde_json::json!({"index": 0, "delta": delta, "finish_reason": null, "logprobs": lp})
                        } else {
                            serde_json::json!({"index": 0, "text": t.text, "finish_reason": null, "logprobs": lp})
                        };
                        out.push_str(&format!("data: {}\n\n", chunk(choice)));
                    }
                    Some(Event::Done(c)) => {
                        let choice = if job.chat {
                            serde_json::json!({"index": 0, "delta": {"content": c.tail}, "finish_reason": finish(&c.finish)})
                        } else {
                            serde_json::json!({"index": 0, "text": c.tail, "finish_reason": finish(&c.finish)})
                        };
                        out.push_str(&format!("data: {}\n\n", chunk(choice)));
                        if job.include_usage {
                            let usage = Usage {
                                prompt_tokens,
                                completion_tokens: c.completion_tokens,
                                total_tokens: prompt_tokens + c.completion_tokens,
                            };
                            let u = serde_json::json!({"id": job.id, "object": object, "created": created, "model": job.model, "choices": [], "usage": usage});
                            out.push_str(&format!("data: {u}\n\n"));
                        }
                        st.metrics
                            .tokens
                            .with_label_values(&["prompt"])
                            .inc_by(prompt_tokens as u64);
                        st.metrics
                            .tokens
                            .with_label_values(&["completion"])
                            .inc_by(c.completion_tokens as u64);
                        out.push_str("data: [DONE]\n\n");
                        finished = true;
                    }
                    Some(Event::Error(e)) => {
                        let err = serde_json::json!({"error": {"message": e, "type": "server_error", "param": null, "code": "generation_failed"}});
                        out.push_str(&format!("data: {err}\n\ndata: [DONE]\n\n"));
                        finished = true;
                    }
                    None => return None,
                }
                Some((
                    Ok::<Bytes, actix_web::Error>(Bytes::from(out)),
                    (s, job, false, finished),
                ))
            }
        },
    );
    Ok(resp
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(sse))
}
