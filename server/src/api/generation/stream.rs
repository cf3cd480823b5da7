//! A generation streamed as server-sent events, in OpenAI's chunk shapes.

use super::logprobs::{logprob_entry, logprobs_json};
use super::types::{ChunkChoice, CompletionBody, Delta, Usage};
use super::{count_tokens, ended, usage, Job, Merged};
use crate::api::Data;
use crate::errors::ApiError;
use actix_web::web::Bytes;
use actix_web::{HttpResponse, HttpResponseBuilder};
use futures_util::StreamExt;
use retune_engine::Event;
use std::time::Instant;

pub(super) fn sse(
    state: Data,
    job: Job,
    events: Merged,
    mut resp: HttpResponseBuilder,
    object: &'static str,
    created: u64,
    started: Instant,
) -> HttpResponse {
    let n = job.n;
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
    resp.content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(sse)
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
