//! What every endpoint takes from a request before its own work, as actix
//! extractors: the calling tenant (an API key), the calling operator (an admin
//! key, scoped to the tenant the route names) and the body within the size
//! limit. Extractors run in the order a handler lists them: list the caller
//! before the body, so an unauthenticated request is refused before its body
//! is read.

use crate::auth::Admin;
use crate::errors::ApiError;
use crate::AppState;
use actix_web::dev::Payload;
use actix_web::web::{self, Bytes};
use actix_web::{FromRequest, HttpMessage, HttpRequest};
use futures_util::future::{ready, LocalBoxFuture, Ready};
use futures_util::StreamExt;
use retune_datasets::DatasetStore;
use retune_registry::Registry;
use std::sync::Arc;

/// The authenticated tenant, for the request metrics middleware.
pub struct TenantLabel(pub String);

fn state(req: &HttpRequest) -> Result<&AppState, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .map(|d| d.get_ref())
        .ok_or_else(|| ApiError::Internal("the application state is not registered".into()))
}

/// The key of an `Authorization: Bearer <key>` header.
fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

fn missing(what: &str) -> ApiError {
    ApiError::Unauthorized(format!("missing `Authorization: Bearer <{what}>`"))
}

/// The tenant whose API key the request carries.
pub struct Tenant(pub String);

impl Tenant {
    fn of(req: &HttpRequest) -> Result<Self, ApiError> {
        let key = bearer(req).ok_or_else(|| missing("key"))?;
        let t = state(req)?
            .keys
            .tenant(key)
            .ok_or_else(|| ApiError::Unauthorized("invalid API key".into()))?
            .to_string();
        req.extensions_mut().insert(TenantLabel(t.clone()));
        Ok(Self(t))
    }
}

impl FromRequest for Tenant {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Self::of(req))
    }
}

/// The operator whose admin key the request carries. For a route naming a
/// `{tenant}`, the key manages that tenant and the tenant is configured.
pub struct AdminCaller(pub Admin);

impl AdminCaller {
    fn of(req: &HttpRequest) -> Result<Self, ApiError> {
        let key = bearer(req).ok_or_else(|| missing("admin key"))?;
        let state = state(req)?;
        let who = state
            .keys
            .admin(key)
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("admin key required".into()))?;
        if let Some(t) = req.match_info().get("tenant") {
            if !who.may(t) {
                return Err(ApiError::Forbidden(format!(
                    "this key does not manage tenant `{t}`"
                )));
            }
            if !state.settings.tenants.iter().any(|x| x.name == t) {
                return Err(ApiError::Missing(format!("tenant `{t}` is not configured")));
            }
        }
        Ok(Self(who))
    }
}

impl FromRequest for AdminCaller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Self::of(req))
    }
}

/// A caller allowed to scrape `/metrics`: anyone under `auth.public_metrics`,
/// else the holder of the metrics key (or an operator's admin key).
pub struct MetricsCaller;

impl MetricsCaller {
    fn of(req: &HttpRequest) -> Result<Self, ApiError> {
        let state = state(req)?;
        if state.settings.auth.public_metrics {
            return Ok(Self);
        }
        let key = bearer(req).ok_or_else(|| {
            ApiError::Unauthorized("`/metrics` needs `Authorization: Bearer <metrics key>`".into())
        })?;
        if !state.keys.may_scrape(key) {
            return Err(ApiError::Unauthorized("not a metrics key".into()));
        }
        Ok(Self)
    }
}

impl FromRequest for MetricsCaller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Self::of(req))
    }
}

/// The adapter registry, for an admin caller (503 when none is configured).
pub fn registry(state: &AppState) -> Result<Arc<Registry>, ApiError> {
    state
        .registry
        .clone()
        .ok_or_else(|| ApiError::Unavailable("no adapter registry configured".into()))
}

/// The datasets store (503 when none is configured).
pub fn datasets(state: &AppState) -> Result<Arc<dyn DatasetStore>, ApiError> {
    state
        .data
        .clone()
        .ok_or_else(|| ApiError::Unavailable("no datasets store is configured".into()))
}

/// The request body, read up to `server.max_body_bytes` (413 beyond).
pub struct LimitedBody(pub Bytes);

impl FromRequest for LimitedBody {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limit = state(req).map(|s| s.settings.server.max_body_bytes);
        let mut payload = payload.take();
        Box::pin(async move {
            let limit = limit?;
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
            Ok(Self(buf.freeze()))
        })
    }
}

/// Run blocking store work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
}
