//! `POST /v1/feedback` and `GET /v1/feedback/{completion_id}`: a tenant rates or
//! corrects one of its completions. A write is answered 200 only once it is on
//! disk; an unknown id and another tenant's id get the same 404.

use crate::api::Data;
use crate::errors::ApiError;
use crate::extract::{datasets, LimitedBody, Tenant};
use crate::AppState;
use actix_web::{web, HttpResponse};
use retune_datasets::{DataError, DatasetStore, Feedback, Rating};
use serde_json::Value;
use std::time::Duration;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/feedback", web::post().to(post))
        .route("/v1/feedback/{completion_id}", web::get().to(get));
}

fn invalid(param: &str, message: &str) -> ApiError {
    ApiError::InvalidParam {
        param: param.into(),
        message: message.into(),
    }
}

fn opt_string(v: &Value, field: &str) -> Result<Option<String>, ApiError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(field, "must be a string")),
    }
}

/// The request body, checked field by field so an error names its field.
fn parse(raw: &[u8]) -> Result<Feedback, ApiError> {
    let v: Value = serde_json::from_slice(raw)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    let known = [
        "completion_id",
        "rating",
        "correction",
        "labels",
        "subject_id",
        "comment",
    ];
    if let Some(k) = v
        .as_object()
        .and_then(|o| o.keys().find(|k| !known.contains(&k.as_str())))
    {
        return Err(invalid(k, "unknown field"));
    }
    let completion_id =
        opt_string(&v, "completion_id")?.ok_or_else(|| invalid("completion_id", "is required"))?;
    let rating = match v.get("rating") {
        None | Some(Value::Null) => None,
        Some(r) => Some(
            r.as_i64()
                .ok_or(())
                .and_then(|n| Rating::from_i64(n).map_err(|_| ()))
                .map_err(|_| invalid("rating", "must be 1 or -1"))?,
        ),
    };
    let correction = match v.get("correction") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(m @ Value::Object(_)) => {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some("assistant"), Some(c)) => Some(c.to_string()),
                _ => {
                    return Err(invalid(
                        "correction",
                        "must be a string or {\"role\": \"assistant\", \"content\": string}",
                    ))
                }
            }
        }
        Some(_) => {
            return Err(invalid(
                "correction",
                "must be a string or an assistant message",
            ))
        }
    };
    let labels = match v.get("labels") {
        None | Some(Value::Null) => Default::default(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(invalid("labels", "values must be strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("labels", "must be an object of strings")),
    };
    let fb = Feedback {
        completion_id,
        rating,
        correction,
        labels,
        subject_id: opt_string(&v, "subject_id")?,
        comment: opt_string(&v, "comment")?,
    };
    fb.validate()?;
    Ok(fb)
}

/// Run `op`; when the completion is not found, wait for the capture writer to
/// catch up once (the completion may have just finished) and try again.
async fn with_catch_up<T: Send + 'static>(
    state: &AppState,
    op: impl Fn(&dyn DatasetStore) -> Result<T, DataError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = datasets(state)?;
    let writer = state.capture.clone();
    web::block(move || match (op(store.as_ref()), &writer) {
        (Err(DataError::NotFound(_)), Some(w)) => {
            w.flush(Duration::from_secs(2));
            op(store.as_ref())
        }
        (other, _) => other,
    })
    .await
    .map_err(|e| ApiError::Internal(format!("datasets task: {e}")))?
    .map_err(ApiError::from)
}

async fn post(
    state: Data,
    Tenant(t): Tenant,
    LimitedBody(raw): LimitedBody,
) -> Result<HttpResponse, ApiError> {
    let fb = parse(&raw)?;
    let kind = if fb.correction.is_some() {
        "correction"
    } else if fb.rating.is_some() {
        "rating"
    } else {
        "other"
    };
    let st = with_catch_up(&state, move |s| s.add_feedback(&t, &fb)).await?;
    state.metrics.feedback.with_label_values(&[kind]).inc();
    Ok(HttpResponse::Ok().json(st))
}

async fn get(
    state: Data,
    Tenant(t): Tenant,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let st = with_catch_up(&state, move |s| s.feedback(&t, &id)).await?;
    Ok(HttpResponse::Ok().json(st))
}
