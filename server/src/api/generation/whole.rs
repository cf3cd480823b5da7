//! A generation answered whole: every sample collected, the client's socket
//! watched so that a client who left cancels it.

use super::logprobs::{logprob_entry, logprobs_json};
use super::peer::PeerFd;
use super::types::{AssistantMessage, CompletionBody, CompletionChoice, TokenLogprob};
use super::{count_tokens, ended, usage, Job, Merged};
use crate::api::Data;
use crate::errors::ApiError;
use actix_web::{HttpResponse, HttpResponseBuilder};
use futures_util::StreamExt;
use retune_engine::{Completion, Event};
use std::time::Instant;

/// One finished sample of a non-streaming response.
struct Choice {
    text: String,
    logprobs: Vec<TokenLogprob>,
    completion: Completion,
}

pub(super) async fn whole(
    state: Data,
    job: Job,
    mut events: Merged,
    mut resp: HttpResponseBuilder,
    object: &'static str,
    created: u64,
    started: Instant,
) -> Result<HttpResponse, ApiError> {
    let n = job.n;
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
    Ok(resp.json(CompletionBody {
        id: &job.id,
        object,
        created,
        model: &job.model,
        choices,
        usage: Some(usage(prompt, generated, cached)),
    }))
}
