//! `POST /v1/completions` (text completions).

pub(crate) mod types;

use super::generation::{admit, encode, respond};
use super::Data;
use crate::errors::ApiError;
use crate::extract::{LimitedBody, Tenant};
use actix_web::{HttpRequest, HttpResponse};
use types::CompletionRequest;

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
        "cmpl",
        |r: &CompletionRequest| &r.common,
        |r| r.logprobs,
        false,
    )
    .await?;
    if let Some(ctx) = &mut a.job.capture {
        ctx.request = serde_json::json!({ "prompt": a.body.prompt });
    }
    a.job.text = Some(a.body.prompt.clone());
    let prompt = encode(&state, a.body.prompt).await?;
    respond(state, prompt, a.params, a.adapter, &a.body.common, a.job).await
}
