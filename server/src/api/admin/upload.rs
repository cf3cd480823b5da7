//! Adapter uploads. `multipart/form-data` (what `curl -F` sends) is streamed to
//! a private directory on disk under the size limit, validated there, then
//! stored: memory stays flat whatever the size. A JSON body with the weights in
//! base64 is still accepted for small adapters (up to [`JSON_MAX`]).

use crate::errors::ApiError;
use crate::extract::{blocking, registry, AdminCaller};
use crate::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use retune_registry::NewVersion;
use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// JSON uploads are read whole (the weights are one base64 string): bounded so.
pub const JSON_MAX: usize = 64 << 20;
/// `adapter_config.json` (the loader's own cap is the same).
const CONFIG_MAX: usize = 1 << 20;
/// `metadata` (JSON) and the short text parts.
const METADATA_MAX: usize = 64 << 10;
const TEXT_MAX: usize = 256;
/// Bytes gathered before one write to disk (off the async workers).
const WRITE_CHUNK: usize = 1 << 20;

/// A private directory under `<adapter root>/uploads`, removed when dropped
/// (after the registry has stored what it needs).
pub(crate) struct UploadDir(PathBuf);

impl UploadDir {
    fn new(root: &Path) -> Result<Self, ApiError> {
        let nonce: u64 = rand::random();
        let dir = root.join("uploads").join(format!("{nonce:016x}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::Internal(format!("upload dir {}: {e}", dir.display())))?;
        Ok(Self(dir))
    }
}

impl Drop for UploadDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl UploadDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

/// The version's files under `from` copied into a private upload directory,
/// refused (before copying) when they are not regular files or exceed `limit`.
pub(crate) fn private_copy(root: &Path, from: &Path, limit: u64) -> Result<UploadDir, ApiError> {
    let dir = UploadDir::new(root)?;
    let mut total = 0u64;
    for f in retune_registry::store::FILES {
        let src = from.join(f);
        let meta = std::fs::symlink_metadata(&src)
            .map_err(|_| ApiError::Missing(format!("the version's {f} is missing")))?;
        if !meta.file_type().is_file() {
            return Err(ApiError::Forbidden(format!("{f} is not a regular file")));
        }
        total += meta.len();
        if total > limit {
            return Err(ApiError::TooLarge(format!(
                "the version's files exceed {limit} bytes"
            )));
        }
        std::fs::copy(&src, dir.0.join(f))
            .map_err(|e| ApiError::Internal(format!("copying {f}: {e}")))?;
    }
    Ok(dir)
}

/// What the upload says besides its two files.
#[derive(Default)]
struct Meta {
    parent: Option<String>,
    metadata: serde_json::Value,
    base_fingerprint: Option<String>,
}

/// `POST /admin/adapters/{tenant}/{name}/upload`.
pub(crate) async fn upload(
    state: web::Data<AppState>,
    req: HttpRequest,
    AdminCaller(who): AdminCaller,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let reg = registry(&state)?;
    let root = state
        .settings
        .adapters
        .root
        .clone()
        .ok_or_else(|| ApiError::Unavailable("no adapter root".into()))?;
    let limit = state.settings.adapters.max_version_bytes;
    let dir = UploadDir::new(&root)?;
    let multipart = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    let meta = if multipart {
        receive_multipart(&req, payload, &dir.0, limit).await?
    } else {
        receive_json(payload, &dir.0, limit).await?
    };
    let (t, n) = path.into_inner();
    let base = state.base.clone();
    let info = blocking(move || {
        let dir = dir; // removed once the registry is done with it
        let v = NewVersion {
            tenant: &t,
            name: &n,
            dir: &dir.0,
            source: "upload",
            parent: meta.parent.as_deref(),
            metadata: meta.metadata,
            claimed_base: meta.base_fingerprint.as_deref(),
            actor: &who.name,
        };
        Ok(reg.register(v, &base)?)
    })
    .await?;
    Ok(HttpResponse::Created().json(info))
}

/// A file being written in [`WRITE_CHUNK`] pieces on the blocking pool.
struct Sink {
    file: Option<std::fs::File>,
    buf: Vec<u8>,
    written: u64,
}

impl Sink {
    fn create(path: &Path) -> Result<Self, ApiError> {
        let file = std::fs::File::create(path)
            .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
        Ok(Self {
            file: Some(file),
            buf: Vec::with_capacity(WRITE_CHUNK),
            written: 0,
        })
    }

    async fn push(&mut self, bytes: &[u8]) -> Result<(), ApiError> {
        self.buf.extend_from_slice(bytes);
        self.written += bytes.len() as u64;
        if self.buf.len() >= WRITE_CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ApiError> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| ApiError::Internal("upload file lost after a failed write".into()))?;
        let buf = std::mem::take(&mut self.buf);
        let (file, mut buf) = blocking(move || {
            file.write_all(&buf)
                .map_err(|e| ApiError::Internal(format!("writing the upload: {e}")))?;
            Ok((file, buf))
        })
        .await?;
        buf.clear();
        self.file = Some(file);
        self.buf = buf;
        Ok(())
    }
}

async fn receive_multipart(
    req: &HttpRequest,
    payload: web::Payload,
    dir: &Path,
    limit: u64,
) -> Result<Meta, ApiError> {
    let mut form = actix_multipart::Multipart::new(req.headers(), payload);
    let mut meta = Meta::default();
    let mut seen: Vec<String> = Vec::new();
    let mut total = 0u64;
    while let Some(field) = form.next().await {
        let mut field = field.map_err(|e| ApiError::BadRequest(format!("multipart body: {e}")))?;
        let name = field
            .name()
            .map(str::to_string)
            .ok_or_else(|| ApiError::BadRequest("a multipart part without a name".into()))?;
        if seen.contains(&name) {
            return Err(ApiError::BadRequest(format!("part `{name}` given twice")));
        }
        seen.push(name.clone());
        let file = match name.as_str() {
            "adapter_model" => "adapter_model.safetensors",
            "adapter_config" => "adapter_config.json",
            "parent" | "base_fingerprint" | "metadata" => {
                let max = if name == "metadata" {
                    METADATA_MAX
                } else {
                    TEXT_MAX
                };
                let mut text = Vec::new();
                while let Some(chunk) = field.next().await {
                    let chunk =
                        chunk.map_err(|e| ApiError::BadRequest(format!("multipart body: {e}")))?;
                    if text.len() + chunk.len() > max {
                        return Err(ApiError::InvalidParam {
                            param: name,
                            message: format!("over {max} bytes"),
                        });
                    }
                    text.extend_from_slice(&chunk);
                }
                let text = String::from_utf8(text).map_err(|_| ApiError::InvalidParam {
                    param: name.clone(),
                    message: "not UTF-8".into(),
                })?;
                match name.as_str() {
                    "parent" => meta.parent = Some(text.trim().to_string()),
                    "base_fingerprint" => meta.base_fingerprint = Some(text.trim().to_string()),
                    _ => {
                        meta.metadata =
                            serde_json::from_str(&text).map_err(|e| ApiError::InvalidParam {
                                param: "metadata".into(),
                                message: format!("not JSON: {e}"),
                            })?
                    }
                }
                continue;
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown part `{other}` (the parts are adapter_config, adapter_model, \
                     parent, metadata, base_fingerprint)"
                )))
            }
        };
        let mut sink = Sink::create(&dir.join(file))?;
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("multipart body: {e}")))?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(ApiError::TooLarge(format!(
                    "the version's files exceed {limit} bytes"
                )));
            }
            if file == "adapter_config.json" && sink.written as usize + chunk.len() > CONFIG_MAX {
                return Err(ApiError::InvalidParam {
                    param: "adapter_config".into(),
                    message: format!("over {CONFIG_MAX} bytes"),
                });
            }
            sink.push(&chunk).await?;
        }
        sink.flush().await?;
    }
    for need in ["adapter_config", "adapter_model"] {
        if !seen.iter().any(|s| s == need) {
            return Err(ApiError::InvalidParam {
                param: need.into(),
                message: "missing part".into(),
            });
        }
    }
    Ok(meta)
}

#[derive(Deserialize)]
struct JsonUpload {
    adapter_config: serde_json::Value,
    /// `adapter_model.safetensors`, base64.
    adapter_model_base64: String,
    parent: Option<String>,
    #[serde(default)]
    metadata: serde_json::Value,
    base_fingerprint: Option<String>,
}

async fn receive_json(mut payload: web::Payload, dir: &Path, limit: u64) -> Result<Meta, ApiError> {
    use base64::Engine as _;
    let max = ((limit as usize).saturating_mul(4) / 3 + (1 << 20)).min(JSON_MAX);
    let mut raw = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if raw.len() + chunk.len() > max {
            return Err(ApiError::TooLarge(format!(
                "JSON upload over {max} bytes: send multipart/form-data \
                 (parts adapter_config and adapter_model), which is streamed to disk"
            )));
        }
        raw.extend_from_slice(&chunk);
    }
    let b: JsonUpload = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::BadRequest(format!("invalid upload body: {e}")))?;
    drop(raw);
    let weights = base64::engine::general_purpose::STANDARD
        .decode(b.adapter_model_base64.as_bytes())
        .map_err(|e| ApiError::InvalidParam {
            param: "adapter_model_base64".into(),
            message: e.to_string(),
        })?;
    if weights.len() as u64 > limit {
        return Err(ApiError::TooLarge(format!(
            "the version's files exceed {limit} bytes"
        )));
    }
    let (config, to) = (b.adapter_config.to_string(), dir.to_path_buf());
    blocking(move || {
        std::fs::write(to.join("adapter_config.json"), config)
            .and_then(|()| std::fs::write(to.join("adapter_model.safetensors"), &weights))
            .map_err(|e| ApiError::Internal(format!("writing the upload: {e}")))
    })
    .await?;
    Ok(Meta {
        parent: b.parent,
        metadata: b.metadata,
        base_fingerprint: b.base_fingerprint,
    })
}
