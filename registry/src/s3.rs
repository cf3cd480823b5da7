//! The shared version store: an S3-compatible bucket (AWS S3, Garage, MinIO,
//! s3s-fs), read through a local cache on each replica.
//!
//! - Versions stay content-addressed and immutable: a key is
//!   `tenant/name/<content id>`, written once (a put, then a check that every file
//!   is there with its size; a second writer of the same key writes the same bytes).
//! - Reads go through the local cache (a [`LocalStore`] directory): a version is
//!   downloaded once per replica, into a temporary directory, and enters the cache
//!   only when its content id — sha256 over the files, the id in its key — matches.
//!   An object that does not match is refused, counted ([`BlobStore::refused`])
//!   and never served.
//! - A bucket that cannot be reached makes the call fail with
//!   [`RegistryError::Unavailable`] within a few seconds (HTTP 503 for a cold
//!   adapter's requests); versions already in the cache keep serving.
//! - Derived files (the compute form) stay in the local cache: each replica
//!   builds its own from verified files, so nothing unverified is ever loaded.

use crate::error::RegistryError;
use crate::store::{content_id_of, BlobStore, LocalStore, FILES};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, RetryConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

type R<T> = Result<T, RegistryError>;

/// Where the bucket is and how to reach it.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// The endpoint of an S3-compatible server (`http://host:port`); unset: AWS.
    pub endpoint: Option<String>,
    /// Unset: `AWS_REGION`, else `us-east-1`.
    pub region: Option<String>,
}

pub struct S3Store {
    s3: Arc<dyn ObjectStore>,
    prefix: String,
    cache: LocalStore,
    cache_root: PathBuf,
    rt: tokio::runtime::Runtime,
    refused: AtomicU64,
    /// `s3://bucket/prefix` at the endpoint, for messages (no credentials).
    at: String,
}

fn unavailable(at: &str) -> impl Fn(object_store::Error) -> RegistryError + '_ {
    move |e| match e {
        object_store::Error::NotFound { path, .. } => {
            RegistryError::NotFound(format!("object {path} in {at}"))
        }
        other => RegistryError::Unavailable(format!("object store {at}: {other}")),
    }
}

impl S3Store {
    /// Credentials come from the environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), never from settings files.
    /// `cache` is this replica's local directory for downloaded versions.
    pub fn open(opts: &S3Options, cache: &Path) -> R<Self> {
        let (bucket, prefix) = opts
            .url
            .strip_prefix("s3://")
            .map(|rest| rest.split_once('/').unwrap_or((rest, "")))
            .filter(|(b, _)| !b.is_empty())
            .ok_or_else(|| {
                RegistryError::Invalid(format!(
                    "adapters.store_url `{}`: expected s3://bucket[/prefix]",
                    opts.url
                ))
            })?;
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(30))
                    .with_allow_http(true),
            )
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(3),
                ..RetryConfig::default()
            });
        if let Some(e) = &opts.endpoint {
            b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
        }
        let region = opts
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        let s3 = b
            .with_region(region)
            .build()
            .map_err(|e| RegistryError::Invalid(format!("adapters.store_url: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("retune-s3")
            .enable_all()
            .build()
            .map_err(|e| RegistryError::Io(format!("object store runtime: {e}")))?;
        let at = match &opts.endpoint {
            Some(e) => format!("{} at {e}", opts.url),
            None => opts.url.clone(),
        };
        Ok(Self {
            s3: Arc::new(s3),
            prefix: prefix.trim_matches('/').to_string(),
            cache: LocalStore::new(cache)?,
            cache_root: cache.to_path_buf(),
            rt,
            refused: AtomicU64::new(0),
            at,
        })
    }

    fn object(&self, key: &str, file: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(format!("{key}/{file}"))
        } else {
            ObjectPath::from(format!("{}/{key}/{file}", self.prefix))
        }
    }

    /// Run `f` on the store's runtime from any thread (an async one included)
    /// and wait for it.
    fn block<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> R<T> {
        futures::executor::block_on(self.rt.spawn(f))
            .map_err(|e| RegistryError::Io(format!("object store task: {e}")))
    }

    /// Upload `from` as `to`, streamed in parts.
    fn upload(&self, from: &Path, to: ObjectPath) -> R<()> {
        let s3 = self.s3.clone();
        let from = from.to_path_buf();
        let at = self.at.clone();
        self.block(async move {
            use tokio::io::AsyncWriteExt;
            let mut file = tokio::fs::File::open(&from)
                .await
                .map_err(|e| RegistryError::Io(format!("{}: {e}", from.display())))?;
            let mut w = object_store::buffered::BufWriter::new(s3, to);
            let copied = tokio::io::copy(&mut file, &mut w).await;
            match copied {
                Ok(_) => w
                    .shutdown()
                    .await
                    .map_err(|e| RegistryError::Unavailable(format!("object store {at}: {e}"))),
                Err(e) => {
                    let _ = w.abort().await;
                    Err(RegistryError::Unavailable(format!(
                        "object store {at}: {e}"
                    )))
                }
            }
        })?
    }

    /// The object's size, or None when it is not there.
    fn size(&self, path: ObjectPath) -> R<Option<u64>> {
        let s3 = self.s3.clone();
        let at = self.at.clone();
        self.block(async move {
            match s3.head(&path).await {
                Ok(m) => Ok(Some(m.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(unavailable(&at)(e)),
            }
        })?
    }

    /// Download `from` into the file `to`.
    fn download(&self, from: ObjectPath, to: &Path) -> R<()> {
        let s3 = self.s3.clone();
        let to = to.to_path_buf();
        let at = self.at.clone();
        self.block(async move {
            use futures::StreamExt;
            use tokio::io::AsyncWriteExt;
            let got = s3.get(&from).await.map_err(unavailable(&at))?;
            let io = |e: std::io::Error| RegistryError::Io(format!("{}: {e}", to.display()));
            let mut f = tokio::fs::File::create(&to).await.map_err(io)?;
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(unavailable(&at))?;
                f.write_all(&chunk).await.map_err(io)?;
            }
            f.sync_all().await.map_err(io)?;
            Ok(())
        })?
    }

    fn id_of(key: &str) -> R<&str> {
        key.rsplit('/')
            .next()
            .filter(|id| !id.is_empty())
            .ok_or_else(|| RegistryError::Forbidden(format!("bad version key `{key}`")))
    }
}

impl BlobStore for S3Store {
    fn put(&self, key: &str, files: &[(&str, &Path)]) -> R<()> {
        // the local copy first: this replica serves it without a download
        self.cache.put(key, files)?;
        for (name, from) in files {
            let want = std::fs::metadata(from)
                .map_err(|e| RegistryError::Io(format!("{name}: {e}")))?
                .len();
            let obj = self.object(key, name);
            // written once: the same key holds the same bytes
            if self.size(obj.clone())? == Some(want) {
                continue;
            }
            self.upload(from, obj.clone())?;
            if self.size(obj)? != Some(want) {
                return Err(RegistryError::Unavailable(format!(
                    "object store {}: {key}/{name} is not there after its upload",
                    self.at
                )));
            }
        }
        Ok(())
    }

    fn local_dir(&self, key: &str) -> R<PathBuf> {
        if let Ok(dir) = self.cache.local_dir(key) {
            return Ok(dir);
        }
        let id = Self::id_of(key)?;
        let tmp = self.cache_root.join(".tmp").join(format!(
            "dl-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&tmp)
            .map_err(|e| RegistryError::Io(format!("{}: {e}", tmp.display())))?;
        let got = (|| {
            for f in FILES {
                self.download(self.object(key, f), &tmp.join(f))?;
            }
            let paths: Vec<(&str, PathBuf)> = FILES.iter().map(|f| (*f, tmp.join(f))).collect();
            let paths: Vec<(&str, &Path)> = paths.iter().map(|(f, p)| (*f, p.as_path())).collect();
            let found = content_id_of(&paths)
                .map_err(|e| RegistryError::Io(format!("hashing {key}: {e}")))?;
            if found != id {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(RegistryError::Invalid(format!(
                    "the stored objects of {key} do not match its content id \
                     (they hash to {found}): refused"
                )));
            }
            self.cache.put(key, &paths)
        })();
        let _ = std::fs::remove_dir_all(&tmp);
        got?;
        self.cache.local_dir(key)
    }

    fn delete(&self, key: &str) -> R<()> {
        for f in FILES {
            let s3 = self.s3.clone();
            let path = self.object(key, f);
            let at = self.at.clone();
            self.block(async move {
                match s3.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(unavailable(&at)(e)),
                }
            })??;
        }
        self.cache.delete(key)
    }

    fn put_derived(&self, key: &str, name: &str, bytes: &[u8]) -> R<()> {
        self.cache.put_derived(key, name, bytes)
    }

    fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}
