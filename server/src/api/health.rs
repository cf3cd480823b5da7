//! `GET /health` (liveness) and `GET /ready` (readiness).

use super::Data;
use actix_web::HttpResponse;
use retune_engine::Health;
use std::sync::atomic::Ordering;

/// Liveness: fails when the engine has stopped (its scheduler panicked), so the
/// container is restarted even if the process could not exit; a drain is alive.
pub(crate) async fn health(state: Data) -> HttpResponse {
    match state.backend.health() {
        Health::Ready => HttpResponse::Ok().json(serde_json::json!({"status": "ok"})),
        Health::Unavailable(why) => {
            tracing::error!(reason = %why, "not alive");
            HttpResponse::ServiceUnavailable().json(serde_json::json!({"status": "engine stopped"}))
        }
    }
}

/// Readiness: the engine serves and the server is not draining.
pub(crate) async fn ready(state: Data) -> HttpResponse {
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
