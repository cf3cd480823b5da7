//! `POST /tokenize`.

use super::Data;
use crate::errors::ApiError;
use crate::extract::{LimitedBody, Tenant};
use actix_web::{web, HttpResponse};

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
pub(crate) async fn tokenize(
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
