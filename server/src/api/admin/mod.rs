//! Admin API (admin key): register, promote (compare-and-set), rollback, canary,
//! retire, list and show adapter versions. Registry calls run off the async runtime.

pub(crate) mod data;
mod upload;

use crate::api::Data;
use crate::errors::ApiError;
use crate::extract::{blocking, registry, AdminCaller};
use actix_web::{web, HttpResponse};
use retune_registry::{Expect, NewVersion};
use serde::Deserialize;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/adapters", web::get().to(list))
        .route("/admin/adapters/{tenant}/{name}", web::get().to(show))
        .route(
            "/admin/adapters/{tenant}/{name}/versions",
            web::post().to(register),
        )
        .route(
            "/admin/adapters/{tenant}/{name}/upload",
            web::post().to(upload::upload),
        )
        .route(
            "/admin/adapters/{tenant}/{name}/promote",
            web::post().to(promote),
        )
        .route(
            "/admin/adapters/{tenant}/{name}/rollback",
            web::post().to(rollback),
        )
        .route(
            "/admin/adapters/{tenant}/{name}/canary",
            web::post().to(canary),
        )
        .route(
            "/admin/adapters/{tenant}/{name}/retire",
            web::post().to(retire),
        )
        .route("/admin/adapters/{tenant}/{name}/runs", web::get().to(runs))
        .route("/admin/adapters/{tenant}/{name}/gate", web::get().to(gate))
        .route(
            "/admin/adapters/{tenant}/{name}/watch",
            web::get().to(watch),
        );
}

#[derive(Deserialize)]
struct ListQuery {
    tenant: Option<String>,
}

async fn list(
    state: Data,
    AdminCaller(who): AdminCaller,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let reg = registry(&state)?;
    let tenant = q.into_inner().tenant;
    if let Some(t) = &tenant {
        if !who.may(t) {
            return Err(ApiError::Forbidden(format!(
                "this key does not manage tenant `{t}`"
            )));
        }
    }
    let rows = blocking(move || Ok(reg.list(tenant.as_deref())?)).await?;
    let data: Vec<_> = rows
        .into_iter()
        .filter(|(t, _, _)| who.may(t))
        .map(|(t, n, s)| serde_json::json!({"tenant": t, "name": n, "state": s}))
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({"data": data})))
}

async fn show(
    state: Data,
    AdminCaller(_): AdminCaller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let reg = registry(&state)?;
    let (t, n) = path.into_inner();
    let v = blocking(move || {
        let state = reg.state(&t, &n)?;
        let tainted = reg.tainted(&t, &n)?;
        let live_tainted = state.live.as_ref().is_some_and(|l| tainted.contains(l));
        Ok(serde_json::json!({"state": state, "versions": reg.versions(&t, &n)?, "journal": reg.journal(&t, &n)?,
            "tainted": tainted, "live_tainted": live_tainted}))
    })
    .await?;
    Ok(HttpResponse::Ok().json(v))
}

/// The trainer's runs of an adapter, newest first (what triggered each, its
/// snapshot, training record, gate report and outcome).
async fn runs(
    state: Data,
    AdminCaller(_): AdminCaller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let reg = registry(&state)?;
    let (t, n) = path.into_inner();
    let v = blocking(move || Ok(reg.runs(&t, &n, 50)?)).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"data": v})))
}

/// The gate's verdict on every version it judged (passed ones and rejected,
/// retired ones), oldest first.
async fn gate(
    state: Data,
    AdminCaller(_): AdminCaller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let reg = registry(&state)?;
    let (t, n) = path.into_inner();
    let v = blocking(move || {
        Ok(reg
            .versions(&t, &n)?
            .into_iter()
            .filter(|v| v.metadata.get("gate").is_some())
            .map(|v| {
                serde_json::json!({"version": v.id, "created_at": v.created_at, "retired": v.retired,
                                   "run": v.metadata.get("run"), "gate": v.metadata["gate"]})
            })
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"data": v})))
}

/// Watches after rollouts, newest first, with their latest figures.
async fn watch(
    state: Data,
    AdminCaller(_): AdminCaller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let reg = registry(&state)?;
    let (t, n) = path.into_inner();
    let v = blocking(move || Ok(reg.watches(&t, &n)?)).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"data": v})))
}

#[derive(Deserialize)]
struct RegisterBody {
    /// A directory on the server's filesystem (the trainer sidecar's shared volume).
    path: String,
    parent: Option<String>,
    #[serde(default)]
    metadata: serde_json::Value,
    source: Option<String>,
    base_fingerprint: Option<String>,
}

async fn register(
    state: Data,
    AdminCaller(who): AdminCaller,
    path: web::Path<(String, String)>,
    body: web::Json<RegisterBody>,
) -> Result<HttpResponse, ApiError> {
    let reg = registry(&state)?;
    let (t, n) = path.into_inner();
    let b = body.into_inner();
    let base = state.base.clone();
    let import = state.settings.adapters.import_dir.clone().ok_or_else(|| {
        ApiError::Forbidden(
            "register-from-path is off: the server has no `adapters.import_dir` (upload instead)"
                .into(),
        )
    })?;
    let root = state.settings.adapters.root.clone();
    let limit = state.settings.adapters.max_version_bytes;
    let info = blocking(move || {
        let dir = under_import_dir(&import, &b.path)?;
        // copied (size-checked) into a private directory first: what is
        // validated and hashed is what is stored, whatever happens to the
        // import directory meanwhile
        let private = match &root {
            Some(root) => Some(upload::private_copy(root, &dir, limit)?),
            None => None,
        };
        let dir = private
            .as_ref()
            .map(|p| p.path().to_path_buf())
            .unwrap_or(dir);
        let source = b.source.unwrap_or_else(|| format!("path:{}", b.path));
        let v = NewVersion {
            tenant: &t,
            name: &n,
            dir: &dir,
            source: &source,
            parent: b.parent.as_deref(),
            metadata: b.metadata,
            claimed_base: b.base_fingerprint.as_deref(),
            actor: &who.name,
        };
        Ok(reg.register(v, &base)?)
    })
    .await?;
    Ok(HttpResponse::Created().json(info))
}

/// `path` (relative to the import directory, or absolute inside it) with every
/// symlink resolved, refused unless it stays inside. Errors name only `path`.
fn under_import_dir(import: &std::path::Path, path: &str) -> Result<std::path::PathBuf, ApiError> {
    let outside = || {
        ApiError::Forbidden(format!(
            "`{path}` is not a directory inside the import directory"
        ))
    };
    let root = import
        .canonicalize()
        .map_err(|e| ApiError::Internal(format!("import dir {}: {e}", import.display())))?;
    let given = std::path::Path::new(path);
    let joined = if given.is_absolute() {
        given.to_path_buf()
    } else {
        root.join(given)
    };
    let lexically_inside = joined.starts_with(&root)
        && !given
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    let real = joined.canonicalize().map_err(|_| {
        if lexically_inside {
            ApiError::Missing(format!("no directory `{path}` in the import directory"))
        } else {
            outside()
        }
    })?;
    if !real.starts_with(&root) || !real.is_dir() {
        return Err(outside());
    }
    Ok(real)
}

#[derive(Deserialize)]
struct Change {
    version: Option<String>,
    /// Promote: the live version the caller saw (`"none"` for no live version).
    expected: Option<String>,
    /// Rollback target (default: previous).
    to: Option<String>,
    percent: Option<u8>,
    #[serde(default)]
    clear: bool,
    #[serde(default)]
    reason: String,
}

async fn change(
    state: Data,
    AdminCaller(who): AdminCaller,
    path: web::Path<(String, String)>,
    body: web::Json<Change>,
    op: &'static str,
) -> Result<HttpResponse, ApiError> {
    let reg = registry(&state)?;
    let (t, n) = path.into_inner();
    let c = body.into_inner();
    let metrics = state.clone();
    let base = state.base.clone();
    let st = blocking(move || {
        // a version registered under other limits (another device) is refused
        // before it reaches a batch
        if let (Some(v), "promote" | "canary") = (c.version.as_deref(), op) {
            if !(op == "canary" && c.clear) {
                reg.check_servable(&t, &n, v, &base)?;
            }
        }
        let actor = who.name.as_str();
        let need = |v: &Option<String>| {
            v.clone()
                .ok_or_else(|| ApiError::BadRequest("`version` is required".into()))
        };
        Ok(match op {
            "promote" => {
                let expect = match c.expected.as_deref() {
                    None => Expect::Any,
                    Some("none") => Expect::NoLive,
                    Some(v) => Expect::Version(v.into()),
                };
                reg.promote(&t, &n, &need(&c.version)?, expect, actor, &c.reason)?
            }
            "rollback" => reg.rollback(&t, &n, c.to.as_deref(), actor, &c.reason)?,
            "canary" if c.clear => reg.set_canary(&t, &n, None, actor, &c.reason)?,
            "canary" => {
                let pct = c
                    .percent
                    .ok_or_else(|| ApiError::BadRequest("`percent` is required".into()))?;
                reg.set_canary(&t, &n, Some((&need(&c.version)?, pct)), actor, &c.reason)?
            }
            _ => reg.retire(&t, &n, &need(&c.version)?, actor, &c.reason)?,
        })
    })
    .await?;
    metrics.metrics.swaps.with_label_values(&[op]).inc();
    Ok(HttpResponse::Ok().json(st))
}

async fn promote(
    s: Data,
    r: AdminCaller,
    p: web::Path<(String, String)>,
    b: web::Json<Change>,
) -> Result<HttpResponse, ApiError> {
    change(s, r, p, b, "promote").await
}
async fn rollback(
    s: Data,
    r: AdminCaller,
    p: web::Path<(String, String)>,
    b: web::Json<Change>,
) -> Result<HttpResponse, ApiError> {
    change(s, r, p, b, "rollback").await
}
async fn canary(
    s: Data,
    r: AdminCaller,
    p: web::Path<(String, String)>,
    b: web::Json<Change>,
) -> Result<HttpResponse, ApiError> {
    change(s, r, p, b, "canary").await
}
async fn retire(
    s: Data,
    r: AdminCaller,
    p: web::Path<(String, String)>,
    b: web::Json<Change>,
) -> Result<HttpResponse, ApiError> {
    change(s, r, p, b, "retire").await
}
