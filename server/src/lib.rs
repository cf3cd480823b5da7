//! retune's HTTP server: OpenAI-compatible API over the engine, per-tenant
//! adapter routing through the registry, Prometheus metrics.

pub mod api;
pub mod auth;
mod capture;
pub mod erasure;
pub mod errors;
pub mod extract;
pub mod metrics;

use actix_web::{web, App, HttpServer, ResponseError};
use errors::ApiError;
use retune_adapters::{AdapterPool, LoadLimits, PoolConfig};
use retune_config::Settings;
use retune_datasets::{CaptureWriter, DatasetStore};
use retune_engine::Health;
use retune_engine::{load, Backend, Engine, EngineConfig};
use retune_registry::{AliasCache, Registry, ServedBase};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading the model: {0}")]
    Model(#[from] retune_engine::EngineError),
    #[error("opening the adapter registry: {0}")]
    Registry(#[from] retune_registry::RegistryError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("opening the datasets store: {0}")]
    Datasets(#[from] retune_datasets::DataError),
    #[error("starting the capture writer: {0}")]
    Capture(std::io::Error),
    #[error("setting `{field}`: {reason}")]
    Settings { field: String, reason: String },
}

/// Load the pinned adapters' routed versions before serving; refuse to start
/// when they do not fit the resident limits (naming the setting). One that
/// fails to load is logged and fails only its own requests.
fn pin_at_start(pool: &AdapterPool, settings: &Settings) -> Result<(), StartError> {
    let a = &settings.adapters;
    if a.pinned.is_empty() {
        return Ok(());
    }
    let (bytes, count, failed) = pool.load_pinned(std::time::Duration::from_secs(120));
    for f in &failed {
        tracing::warn!(error = %f, "a pinned adapter did not load");
    }
    if bytes > a.max_resident_bytes || count >= a.max_resident {
        return Err(StartError::Settings {
            field: "adapters.pinned".into(),
            reason: format!(
                "the pinned adapters' {count} versions (live and canary) take {bytes} bytes \
                 resident, beyond adapters.max_resident = {} (one left for the others) / \
                 adapters.max_resident_bytes = {}",
                a.max_resident, a.max_resident_bytes
            ),
        });
    }
    tracing::info!(versions = count, bytes, "pinned adapters resident");
    Ok(())
}

/// Everything a request handler needs.
pub struct AppState {
    pub settings: Settings,
    pub backend: Arc<dyn Backend>,
    pub keys: auth::Keys,
    pub registry: Option<Arc<Registry>>,
    /// The registry's aliases in memory: what the request path resolves against.
    pub aliases: Option<Arc<AliasCache>>,
    pub pool: Option<Arc<AdapterPool>>,
    pub metrics: metrics::Metrics,
    /// The served base, for validating registered adapters.
    pub base: ServedBase,
    /// Captured completions and feedback (none: capture off, no feedback API).
    pub data: Option<Arc<dyn DatasetStore>>,
    pub capture: Option<CaptureWriter>,
    /// Set when shutdown began: `/ready` answers 503, load balancers move away.
    pub draining: std::sync::atomic::AtomicBool,
    /// Versions served since the last flush to the registry (gc keeps them).
    pub served: std::sync::Mutex<std::collections::HashSet<(String, String, String)>>,
}

impl AppState {
    pub fn new(
        settings: Settings,
        backend: Arc<dyn Backend>,
        registry: Option<Arc<Registry>>,
        pool: Option<Arc<AdapterPool>>,
        base: ServedBase,
    ) -> Result<Self, StartError> {
        let metrics = metrics::Metrics::new(settings.server.max_metric_adapters)
            .map_err(|e| StartError::Metrics(e.to_string()))?;
        let poll = std::time::Duration::from_millis(settings.adapters.alias_poll_ms.max(10));
        let aliases = match &registry {
            Some(r) => Some(AliasCache::attach(r, poll)?),
            None => None,
        };
        if let (Some(pool), Some(a)) = (&pool, &aliases) {
            pool.set_servable(a.clone());
            pin_at_start(pool, &settings)?;
        }
        Ok(Self {
            aliases,
            keys: auth::Keys::new(&settings),
            settings,
            backend,
            registry,
            pool,
            metrics,
            base,
            data: None,
            capture: None,
            draining: std::sync::atomic::AtomicBool::new(false),
            served: Default::default(),
        })
    }

    /// Record completions into `store` (through a bounded writer) and serve feedback on it.
    pub fn with_datasets(mut self, store: Arc<dyn DatasetStore>) -> Result<Self, StartError> {
        let writer = CaptureWriter::start(store.clone(), self.settings.datasets.capture_queue)
            .map_err(StartError::Capture)?;
        self.data = Some(store);
        self.capture = Some(writer);
        Ok(self)
    }
}

/// The id of one HTTP request: taken from a well-formed `x-request-id` header or
/// drawn, echoed in the response header and in the message of every server fault.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

impl RequestId {
    fn of(req: &actix_web::dev::ServiceRequest) -> Self {
        let given = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 64
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            });
        Self(match given {
            Some(v) => v.to_string(),
            None => format!("req-{:016x}", rand::random::<u64>()),
        })
    }
}

/// The whole HTTP application on `state`: routes, the request id, request
/// metrics, and server faults logged with their detail and answered without it.
pub fn app(
    state: web::Data<AppState>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(state)
        .wrap_fn(|req, srv| {
            use actix_web::dev::Service;
            use actix_web::HttpMessage;
            let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
            let state = req.app_data::<web::Data<AppState>>().cloned();
            let rid = RequestId::of(&req);
            req.extensions_mut().insert(rid.clone());
            let start = std::time::Instant::now();
            let fut = srv.call(req);
            async move {
                let res = fut.await?;
                let res = match res.response().error().and_then(|e| e.as_error::<ApiError>()) {
                    Some(err) if err.hidden_detail().is_some() => {
                        tracing::error!(request_id = %rid.0, route = %route, status = err.status_code().as_u16(),
                            detail = err.hidden_detail().unwrap_or_default(), "request failed");
                        let fresh = err.response(Some(&rid.0));
                        res.into_response(fresh.map_into_boxed_body())
                    }
                    _ => res.map_into_boxed_body(),
                };
                let mut res = res;
                if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&rid.0) {
                    res.headers_mut().insert(
                        actix_web::http::header::HeaderName::from_static("x-request-id"),
                        v,
                    );
                }
                if let Some(st) = state {
                    let tenant = res
                        .request()
                        .extensions()
                        .get::<extract::TenantLabel>()
                        .map(|t| t.0.clone());
                    let tenant = tenant.unwrap_or_else(|| "-".into());
                    let status = res.status().as_u16().to_string();
                    st.metrics
                        .requests
                        .with_label_values(&[&route, &status, &tenant])
                        .inc();
                    st.metrics
                        .duration
                        .with_label_values(&[&route])
                        .observe(start.elapsed().as_secs_f64());
                }
                Ok(res)
            }
        })
        .configure(api::configure)
}

/// Every few seconds, tell the registry which versions were served (gc keeps
/// versions served within its idle window).
fn spawn_served_flush(state: web::Data<AppState>) {
    if state.registry.is_none() {
        return;
    }
    let every = std::time::Duration::from_millis(state.settings.adapters.served_flush_ms.max(10));
    // a weak handle: the thread ends with the server ([`flush_on_exit`] does the last flush)
    let weak = std::sync::Arc::downgrade(&state.into_inner());
    let spawned = std::thread::Builder::new()
        .name("retune-served".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let Some(state) = weak.upgrade() else {
                return;
            };
            flush_served(&state);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot record served versions: gc relies on its other rules");
    }
}

/// Record the versions served since the last call in the registry; on failure
/// they are kept for the next call. False when that failed.
fn flush_served(state: &AppState) -> bool {
    let Some(reg) = &state.registry else {
        return true;
    };
    let batch: Vec<(String, String, String)> = {
        let mut s = state.served.lock().unwrap_or_else(|p| p.into_inner());
        s.drain().collect()
    };
    if batch.is_empty() {
        return true;
    }
    if let Err(e) = reg.mark_served(&batch) {
        tracing::warn!(error = %e, "recording served versions failed (retried)");
        let mut s = state.served.lock().unwrap_or_else(|p| p.into_inner());
        s.extend(batch);
        return false;
    }
    true
}

/// How long a stopping server waits, once its connections are closed, for the
/// captured completions still queued (or held for an unavailable store) to
/// reach the store. The k8s base's grace period (40 s) covers the drain (20 s)
/// plus this.
pub const EXIT_FLUSH: std::time::Duration = std::time::Duration::from_secs(10);

/// The last writes of a stopping server: the capture queue, waited for up to
/// [`EXIT_FLUSH`], and the versions served since the last flush (gc keeps
/// them). Blocks.
fn flush_on_exit(state: &AppState) {
    if let Some(w) = &state.capture {
        let t = std::time::Instant::now();
        let before = w.stats().captured.load(Ordering::Relaxed);
        if w.flush(EXIT_FLUSH) {
            tracing::info!(
                written = w.stats().captured.load(Ordering::Relaxed) - before,
                ms = t.elapsed().as_millis() as u64,
                "captured completions written before exit"
            );
        } else {
            tracing::error!(
                seconds = EXIT_FLUSH.as_secs(),
                "captured completions still queued after waiting for the store: they are lost"
            );
        }
    }
    if !flush_served(state) {
        tracing::warn!(
            "versions served since the last flush were not recorded: gc relies on its other rules"
        );
    }
}

/// Apply each tenant's capture retention now and then every hour, on its own thread.
fn spawn_retention(store: Arc<dyn DatasetStore>, settings: &Settings) {
    let rules: Vec<(String, u32)> = settings
        .tenants
        .iter()
        .filter_map(|t| t.capture.retention_days.map(|d| (t.name.clone(), d)))
        .collect();
    if rules.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("retune-retention".into())
        .spawn(move || loop {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            for (tenant, days) in &rules {
                let before = now - i64::from(*days) * 86_400_000;
                match store.purge_before(tenant, before) {
                    Ok(n) if n > 0 => {
                        tracing::info!(tenant = %tenant, purged = n, "capture retention")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(tenant = %tenant, error = %e, "capture retention failed")
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_secs(3600));
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the retention thread: retention is not applied");
    }
}

pub struct Application {
    server: actix_web::dev::Server,
    port: u16,
    state: web::Data<AppState>,
    fatal: Arc<AtomicBool>,
}

impl Application {
    /// Load the model, open the registry, bind (port 0 picks a free port).
    pub fn build(settings: Settings) -> Result<Self, StartError> {
        // the kernel path before the model becomes the host backend: the int8
        // paths repack its weights then
        let kernels = if settings.engine.device == "cpu" {
            let k = retune_engine::kernels_f32::Kernels::choose(&settings.engine.kernels).map_err(
                |reason| StartError::Settings {
                    field: "engine.kernels".into(),
                    reason,
                },
            )?;
            tracing::info!(
                kernels = k.path().key(),
                "{}",
                retune_engine::cpu::describe_for(k)
            );
            Some(k)
        } else {
            None
        };
        let mut loaded = load(&settings.model.path)?;
        if let Some(k) = kernels {
            loaded.model.set_kernels(k);
        }
        let base = ServedBase {
            shapes: loaded.model.base_shapes(),
            fingerprint: loaded.model.fingerprint(),
        };
        let (registry, pool) = match &settings.adapters.root {
            Some(root) => {
                let store = retune_registry::open_store(
                    &root.join("store"),
                    settings.adapters.store_url.as_deref(),
                    settings.adapters.store_endpoint.as_deref(),
                )?;
                // a tensor backend's adapter slots hold ranks up to device_max_rank:
                // versions above it are refused at register, promote and load
                let max_rank = if settings.engine.device == "cpu" {
                    settings.adapters.max_rank
                } else {
                    settings
                        .adapters
                        .max_rank
                        .min(settings.engine.device_max_rank)
                };
                let limits = LoadLimits {
                    max_rank,
                    max_file_bytes: settings.adapters.max_version_bytes,
                };
                let reg = Arc::new(
                    Registry::open_at(
                        &settings.adapters.registry_location(root),
                        store,
                        settings.adapters.max_version_bytes,
                    )?
                    .with_limits(limits.clone()),
                );
                let cfg = PoolConfig {
                    max_adapters: settings.adapters.max_resident,
                    max_bytes: settings.adapters.max_resident_bytes,
                    limits,
                    loaders: settings.adapters.loaders,
                    pinned: settings
                        .adapters
                        .pinned
                        .iter()
                        .filter_map(|p| p.split_once('/'))
                        .map(|(t, n)| (t.to_string(), n.to_string()))
                        .collect(),
                };
                let pool = AdapterPool::new(reg.clone(), base.shapes.clone(), cfg);
                (Some(reg), Some(pool))
            }
            None => (None, None),
        };
        let e = &settings.engine;
        let cfg = EngineConfig {
            sparse_head: true,
            max_batch: e.max_batch,
            max_queue: e.max_queue,
            prefill_chunk: e.prefill_chunk,
            prefill_chunk_decoding: e.prefill_chunk_decoding,
            max_kv_tokens: e.max_kv_tokens,
            threads: e.threads,
            tenant_weights: settings
                .tenants
                .iter()
                .map(|t| (t.name.clone(), t.weight))
                .collect(),
            prefix_cache: retune_engine::PrefixConfig {
                max_tokens: e.prefix_cache_tokens,
                block: e.prefix_cache_block,
                scope_share: f64::from(e.prefix_cache_tenant_percent) / 100.0,
                public_tenants: settings
                    .tenants
                    .iter()
                    .filter(|t| t.public_prefixes)
                    .map(|t| t.name.clone())
                    .collect(),
            },
        };
        let compute = retune_engine::device::build_backend(
            loaded.model,
            &e.device,
            &retune_engine::device::options_from_settings(e)?,
        )?;
        let engine = Engine::start_with_pool(compute, loaded.tok, cfg, pool.clone())?
            .with_template(loaded.template);
        let data = settings.datasets.location(&settings.adapters);
        let mut state = AppState::new(settings, Arc::new(engine), registry, pool, base)?;
        if let Some(k) = kernels {
            state
                .metrics
                .kernels_info
                .with_label_values(&[k.path().key()])
                .set(1);
        }
        if let Some(at) = data {
            let store: Arc<dyn DatasetStore> = retune_datasets::open(&at)?;
            spawn_retention(store.clone(), &state.settings);
            state = state.with_datasets(store)?;
        }
        Self::serve(state)
    }

    /// Bind and serve `state` (any backend).
    pub fn serve(state: AppState) -> Result<Self, StartError> {
        let addr = format!(
            "{}:{}",
            state.settings.server.host, state.settings.server.port
        );
        let bind = |e: std::io::Error| StartError::Bind {
            addr: addr.clone(),
            source: e,
        };
        let listener = TcpListener::bind(&addr).map_err(bind)?;
        let port = listener.local_addr().map_err(bind)?.port();
        let drain = state.settings.server.drain_seconds;
        let state = web::Data::new(state);
        spawn_served_flush(state.clone());
        // the grammar engine's view of the vocabulary, built once before the
        // first structured-output request needs it
        let warm = state.backend.clone();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            match warm.tokenizer().grammars() {
                Ok(_) => tracing::info!(
                    ms = t.elapsed().as_millis() as u64,
                    "structured output ready"
                ),
                Err(e) => tracing::warn!(error = %e, "structured output unavailable"),
            }
        });
        let app_state = state.clone();
        let server = HttpServer::new(move || app(app_state.clone()))
            .on_connect(api::remember_peer)
            .listen(listener)
            .map_err(bind)?
            // our own signal handling: the drain ends generations before the deadline
            .disable_signals()
            .shutdown_timeout(drain)
            .run();
        Ok(Self {
            server,
            port,
            state,
            fatal: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Begins the same shutdown as SIGTERM (for embedding and tests).
    pub fn shutdown_handle(&self) -> Shutdown {
        Shutdown {
            state: self.state.clone(),
            handle: self.server.handle(),
        }
    }

    /// Serve until SIGTERM/SIGINT, or until the engine stops. A signal drains:
    /// `/ready` turns 503, no new connections are taken, in-flight requests run
    /// until shortly before `drain_seconds`, and what still runs then ends with an
    /// error event and `[DONE]` (streams) or a 503. An engine that stopped (its
    /// scheduler panicked) ends every request the same way at once, and the result
    /// is an error, so the process exits non-zero and Kubernetes restarts it.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let shutdown = self.shutdown_handle();
        let sig = shutdown.clone();
        actix_web::rt::spawn(async move {
            use actix_web::rt::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers: SIGTERM will not drain");
                return;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: draining"),
                _ = int.recv() => tracing::info!("SIGINT: draining"),
            }
            sig.begin();
        });
        let watch = shutdown.clone();
        let fatal = self.fatal.clone();
        actix_web::rt::spawn(async move {
            loop {
                actix_web::rt::time::sleep(std::time::Duration::from_millis(250)).await;
                if let Health::Unavailable(why) = watch.state.backend.health() {
                    if !watch.state.draining.load(Ordering::SeqCst) {
                        tracing::error!(reason = %why, "the engine stopped: ending requests and exiting");
                        fatal.store(true, Ordering::SeqCst);
                        watch.fail(&why);
                    }
                    return;
                }
            }
        });
        let served = self.server.await;
        // what the handlers queued is written before the process ends
        let state = self.state.clone();
        if let Err(e) = actix_web::rt::task::spawn_blocking(move || flush_on_exit(&state)).await {
            tracing::error!(error = %e, "the last writes before exit failed");
        }
        served?;
        if self.fatal.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("the engine stopped"));
        }
        Ok(())
    }
}

/// Starts a drain (see [`Application::run_until_stopped`]).
#[derive(Clone)]
pub struct Shutdown {
    state: web::Data<AppState>,
    handle: actix_web::dev::ServerHandle,
}

impl Shutdown {
    /// Drain: not ready, no new connections, generations cut shortly before the
    /// deadline. Needs no async runtime (a signal task or a test calls it).
    pub fn begin(&self) {
        if self.state.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        let drain = std::time::Duration::from_secs(self.state.settings.server.drain_seconds);
        // end generations before actix closes connections at the deadline, so
        // each client gets an ending: a second (or a quarter of a short drain) early
        let cut = drain
            .saturating_sub(std::time::Duration::from_secs(1))
            .max(drain * 3 / 4);
        // the stop command is sent when `stop` is called; its future only waits
        drop(self.handle.stop(true));
        let state = self.state.clone();
        let spawned = std::thread::Builder::new()
            .name("retune-drain".into())
            .spawn(move || {
                std::thread::sleep(cut);
                state
                    .backend
                    .abort_all("the server is shutting down: the drain deadline was reached");
            });
        if spawned.is_err() {
            self.state.backend.abort_all("the server is shutting down");
        }
    }

    /// The engine is gone: end everything now and stop.
    pub fn fail(&self, why: &str) {
        self.state.draining.store(true, Ordering::SeqCst);
        self.state
            .backend
            .abort_all(&format!("the server cannot serve: {why}"));
        drop(self.handle.stop(true));
    }
}
