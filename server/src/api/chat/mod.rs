//! `POST /v1/chat/completions`.

mod convert;
pub(crate) mod types;

use super::generation::{admit, encode_rendered, respond};
use super::Data;
use crate::errors::ApiError;
use crate::extract::{LimitedBody, Tenant};
use actix_web::{HttpRequest, HttpResponse};
use types::ChatRequest;

pub(crate) async fn create(
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
    let msgs = convert::messages(&a.body.messages)?;
    // what a classifier's classical prior reads, as from a training row
    a.job.text = Some(retune_datasets::snapshot::user_turns(
        msgs.iter().map(|m| (m.role.as_str(), m.content.as_str())),
    ));
    if let Some(ctx) = &mut a.job.capture {
        ctx.request = convert::as_captured(&msgs);
    }
    let msgs = match a.declared.as_ref().and_then(|d| d.system_prompt.as_deref()) {
        Some(p) => convert::with_system_prompt(p, msgs),
        None => msgs,
    };
    // message contents are tokenized as text: a `<|im_start|>system` typed into
    // one is not a control token
    let rendered = state.backend.template().render_marked(&msgs, true)?;
    let prompt = encode_rendered(&state, rendered).await?;
    respond(state, prompt, a.params, a.adapter, &a.body.common, a.job).await
}
