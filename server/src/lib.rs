//! retune's HTTP server: OpenAI-compatible API over the engine, per-tenant
//! adapter routing through the registry, Prometheus metrics.

pub mod admin;
pub mod auth;
pub mod errors;
pub mod metrics;
pub mod openai;
pub mod routes;

use actix_web::{web, App, HttpServer};
use retune_adapters::{AdapterPool, LoadLimits, LocalStore, PoolConfig, Registry, ServedBase};
use retune_config::Settings;
use retune_engine::{load, ChatTemplate, Engine, EngineConfig};
use std::net::TcpListener;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading the model: {0}")]
    Model(#[from] retune_engine::EngineError),
    #[error("opening the adapter registry: {0}")]
    Registry(#[from] retune_adapters::RegistryError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(String),
}

/// Everything a request handler needs.
pub struct AppState {
    pub settings: Settings,
    pub engine: Engine,
    pub template: ChatTemplate,
    pub keys: auth::Keys,
    pub registry: Option<Arc<Registry>>,
    pub pool: Option<Arc<AdapterPool>>,
    pub metrics: metrics::Metrics,
    /// The served base, for validating registered adapters.
    pub base: ServedBase,
}

pub struct Application {
    server: actix_web::dev::Server,
    port: u16,
}

impl Application {
    /// Load the model, open the registry, bind (port 0 picks a free port).
    pub fn build(settings: Settings) -> Result<Self, StartError> {
        let loaded = load(&settings.model.path)?;
        let base = ServedBase {
            shapes: loaded.model.base_shapes(),
            fingerprint: loaded.model.fingerprint(),
        };
        let (registry, pool) = match &settings.adapters.root {
            Some(root) => {
                let store = Arc::new(LocalStore::new(&root.join("store"))?);
                let reg = Arc::new(Registry::open(
                    &root.join("registry.db"),
                    store,
                    settings.adapters.max_version_bytes,
                )?);
                let cfg = PoolConfig {
                    max_adapters: settings.adapters.max_resident,
                    max_bytes: settings.adapters.max_resident_bytes,
                    limits: LoadLimits {
                        max_rank: settings.adapters.max_rank,
                        max_file_bytes: settings.adapters.max_version_bytes,
                    },
                };
                let pool = AdapterPool::new(reg.clone(), base.shapes.clone(), cfg);
                (Some(reg), Some(pool))
            }
            None => (None, None),
        };
        let e = &settings.engine;
        let cfg = EngineConfig {
            max_batch: e.max_batch,
            max_queue: e.max_queue,
            prefill_chunk: e.prefill_chunk,
            max_kv_tokens: e.max_kv_tokens,
            threads: e.threads,
        };
        let backend = retune_engine::device::build_backend(
            loaded.model,
            &e.device,
            &retune_engine::device::options_from_settings(e)?,
        )?;
        let engine = Engine::start_with_pool(backend, loaded.tok, cfg, pool.clone())?;
        let metrics = metrics::Metrics::new(settings.server.max_metric_adapters)
            .map_err(|e| StartError::Metrics(e.to_string()))?;
        let addr = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = TcpListener::bind(&addr).map_err(|e| StartError::Bind {
            addr: addr.clone(),
            source: e,
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| StartError::Bind {
                addr: addr.clone(),
                source: e,
            })?
            .port();
        let state = web::Data::new(AppState {
            keys: auth::Keys::new(&settings),
            template: loaded.template,
            settings,
            engine,
            registry,
            pool,
            metrics,
            base,
        });
        let drain = state.settings.server.drain_seconds;
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap_fn(|req, srv| {
                    use actix_web::dev::Service;
                    use actix_web::HttpMessage;
                    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
                    let state = req.app_data::<web::Data<AppState>>().cloned();
                    let start = std::time::Instant::now();
                    let fut = srv.call(req);
                    async move {
                        let res = fut.await?;
                        if let Some(st) = state {
                            let tenant = res
                                .request()
                                .extensions()
                                .get::<routes::TenantLabel>()
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
                .configure(routes::configure)
                .configure(admin::configure)
        })
        .listen(listener)
        .map_err(|e| StartError::Bind {
            addr: addr.clone(),
            source: e,
        })?
        .shutdown_timeout(drain)
        .run();
        Ok(Self { server, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serve until SIGTERM/SIGINT (actix drains in-flight requests up to the deadline).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}
