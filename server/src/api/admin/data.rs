//! Admin API for the datasets store (admin key): import JSONL for an adapter,
//! curate a snapshot, read and export snapshots, erase a subject.

use crate::api::Data;
use crate::errors::ApiError;
use crate::extract::{blocking, datasets, AdminCaller, LimitedBody};
use actix_web::{web, HttpResponse};
use retune_datasets::{parse_jsonl_for, Policy};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/admin/data/{tenant}/{adapter}/import",
        web::post().to(import),
    )
    .route(
        "/admin/data/{tenant}/{adapter}/snapshots",
        web::post().to(snapshot),
    )
    .route(
        "/admin/data/{tenant}/snapshots/{id}",
        web::get().to(manifest),
    )
    .route(
        "/admin/data/{tenant}/snapshots/{id}/export",
        web::get().to(export),
    )
    .route(
        "/admin/data/{tenant}/{adapter}/review",
        web::get().to(review_queue),
    )
    .route(
        "/admin/data/{tenant}/{adapter}/review",
        web::post().to(review),
    )
    .route("/admin/data/{tenant}/erase", web::post().to(erase));
}

/// The declared label set of `tenant/adapter`, if any.
fn declared_labels(state: &Data, t: &str, a: &str) -> Option<Vec<String>> {
    state
        .settings
        .trainer
        .adapters
        .iter()
        .find(|d| d.tenant == t && d.name == a)
        .and_then(|d| d.labels(&state.settings.trainer.defaults))
        .map(<[String]>::to_vec)
}

/// The suspect rows of the adapter's latest snapshot no person has ruled on.
async fn review_queue(
    state: Data,
    AdminCaller(_): AdminCaller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let s = datasets(&state)?;
    let (t, a) = path.into_inner();
    let q = blocking(move || Ok(retune_datasets::review::queue(s.as_ref(), &t, &a)?)).await?;
    Ok(HttpResponse::Ok().json(q))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewBody {
    input_key: String,
    label: String,
}

/// A person's label for one row (durable before the answer): it trains with
/// that label from the next snapshot on and is never suspect again.
async fn review(
    state: Data,
    AdminCaller(_): AdminCaller,
    path: web::Path<(String, String)>,
    LimitedBody(raw): LimitedBody,
) -> Result<HttpResponse, ApiError> {
    let s = datasets(&state)?;
    let (t, a) = path.into_inner();
    let b: ReviewBody = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))?;
    let labels = declared_labels(&state, &t, &a);
    let done = blocking(move || {
        Ok(retune_datasets::review::review(
            s.as_ref(),
            &t,
            &a,
            &b.input_key,
            &b.label,
            labels.as_deref(),
        )?)
    })
    .await?;
    Ok(HttpResponse::Ok().json(done))
}

/// The body is JSONL; the answer lists every bad line by number (the rest is imported).
async fn import(
    state: Data,
    AdminCaller(_): AdminCaller,
    path: web::Path<(String, String)>,
    LimitedBody(raw): LimitedBody,
) -> Result<HttpResponse, ApiError> {
    let s = datasets(&state)?;
    let (t, a) = path.into_inner();
    let text = String::from_utf8(raw.to_vec())
        .map_err(|_| ApiError::BadRequest("the body must be UTF-8 JSONL".into()))?;
    // a declared label task refuses examples outside its label set, by line
    let labels = declared_labels(&state, &t, &a);
    let (imported, errors) = blocking(move || {
        let (rows, errors) = parse_jsonl_for(&text, labels.as_deref());
        Ok((s.import(&t, &a, "import:admin", &rows)?, errors))
    })
    .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"imported": imported, "errors": errors})))
}

async fn snapshot(
    state: Data,
    AdminCaller(_): AdminCaller,
    path: web::Path<(String, String)>,
    LimitedBody(raw): LimitedBody,
) -> Result<HttpResponse, ApiError> {
    let s = datasets(&state)?;
    let (t, a) = path.into_inner();
    let policy: Policy = if raw.iter().all(u8::is_ascii_whitespace) {
        Policy::default()
    } else {
        serde_json::from_slice(&raw)
            .map_err(|e| ApiError::BadRequest(format!("invalid policy: {e}")))?
    };
    if policy.eval_percent > 100 {
        return Err(ApiError::InvalidParam {
            param: "eval_percent".into(),
            message: "must be 0..=100".into(),
        });
    }
    let m = blocking(move || {
        Ok(retune_datasets::snapshot_with_suspects(
            s.as_ref(),
            &t,
            &a,
            &policy,
        )?)
    })
    .await?;
    state
        .metrics
        .snapshot_examples
        .observe((m.train + m.eval) as f64);
    Ok(HttpResponse::Ok().json(m))
}

async fn manifest(
    state: Data,
    AdminCaller(_): AdminCaller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let s = datasets(&state)?;
    let (t, id) = path.into_inner();
    let m = blocking(move || Ok(s.manifest(&t, &id)?)).await?;
    Ok(HttpResponse::Ok().json(m))
}

async fn export(
    state: Data,
    AdminCaller(_): AdminCaller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let s = datasets(&state)?;
    let (t, id) = path.into_inner();
    let text = blocking(move || {
        let mut out = String::new();
        for r in s.snapshot_rows(&t, &id)? {
            out.push_str(&retune_datasets::import::to_line(&r.body));
            out.push('\n');
        }
        Ok(out)
    })
    .await?;
    Ok(HttpResponse::Ok()
        .content_type("application/jsonl")
        .body(text))
}

#[derive(serde::Deserialize)]
struct EraseBody {
    subject_id: String,
}

async fn erase(
    state: Data,
    AdminCaller(who): AdminCaller,
    path: web::Path<String>,
    LimitedBody(raw): LimitedBody,
) -> Result<HttpResponse, ApiError> {
    let s = datasets(&state)?;
    let t = path.into_inner();
    let b: EraseBody = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))?;
    if b.subject_id.is_empty() {
        return Err(ApiError::InvalidParam {
            param: "subject_id".into(),
            message: "must not be empty".into(),
        });
    }
    let reg = state.registry.clone();
    let policy = state
        .settings
        .tenants
        .iter()
        .find(|x| x.name == t)
        .and_then(|x| x.on_tainted_live.parse().ok())
        .unwrap_or(crate::erasure::OnTaintedLive::Report);
    let report = blocking(move || {
        let actor = who.name;
        crate::erasure::erase(
            s.as_ref(),
            reg.as_deref(),
            &t,
            &b.subject_id,
            &actor,
            policy,
        )
        .map_err(|e| match e {
            crate::erasure::ErasureError::Data(d) => ApiError::from(d),
            crate::erasure::ErasureError::Registry(r) => ApiError::from(r),
        })
    })
    .await?;
    Ok(HttpResponse::Ok().json(report))
}
