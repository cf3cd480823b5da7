//! Every Prometheus metric retune exports, in one place.

use crate::errors::ApiError;
use crate::extract::MetricsCaller;
use crate::AppState;
use actix_web::{web, HttpResponse};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use std::sync::atomic::Ordering;

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub ttft: Histogram,
    pub tokens: IntCounterVec,
    pub queue_depth: IntGauge,
    pub running: IntGauge,
    pub adapters_resident: IntGauge,
    pub adapter_bytes: IntGauge,
    pub adapter_loads: IntGauge,
    pub adapter_evictions: IntGauge,
    pub by_version: IntCounterVec,
    pub swaps: IntCounterVec,
    pub itl: Histogram,
    pub step_tokens: IntGauge,
    pub adapter_load_seconds: prometheus::Gauge,
    pub captured: prometheus::IntCounter,
    pub capture_dropped: prometheus::IntCounter,
    pub feedback: IntCounterVec,
    pub tainted_live: IntGauge,
    pub store_refused: prometheus::IntCounter,
    pub registry_unreadable: prometheus::IntCounter,
    pub trainer_runs: IntCounterVec,
    pub trainer_running: IntGauge,
    pub gate_decisions: IntCounterVec,
    pub auto_rollbacks: prometheus::IntCounter,
    pub trainer_last_run: IntGauge,
    pub watches_open: IntGauge,
    pub snapshot_examples: Histogram,
    /// Generations cancelled because the client left.
    pub cancelled: prometheus::IntCounter,
    pub prefix: PrefixMetrics,
    pub pool: PoolMetrics,
    /// The inference gateway's model-server protocol: KV-cache utilisation and
    /// the LoRA affinity metric (vLLM's `vllm:lora_requests_info` semantics).
    pub kv_usage: prometheus::Gauge,
    pub lora_info: prometheus::GaugeVec,
    /// The CPU weight kernels this process runs (`engine.kernels`), value 1.
    pub kernels_info: IntGaugeVec,
    /// Adapters that already have `by_version` series; capped to bound label sets.
    seen_adapters: std::sync::Mutex<std::collections::HashSet<String>>,
    max_adapters: usize,
}

/// The adapter tiers: resident in the pool (compute-ready; pinned ones
/// counted apart too), loading, and stored (every servable version in the
/// store, its compute form on local disk); loads by where they read from.
pub struct PoolMetrics {
    pub versions: prometheus::IntGaugeVec,
    pub bytes: prometheus::IntGaugeVec,
    pub loads: IntCounterVec,
    pub compute_form_rejected: prometheus::IntCounter,
    pub prefetches: prometheus::IntCounter,
}

impl PoolMetrics {
    fn new(r: &Registry) -> prometheus::Result<Self> {
        let versions = prometheus::IntGaugeVec::new(
            Opts::new(
                "retune_adapter_tier_versions",
                "Adapter versions per tier (resident, pinned, loading, stored)",
            ),
            &["tier"],
        )?;
        let bytes = prometheus::IntGaugeVec::new(
            Opts::new(
                "retune_adapter_tier_bytes",
                "Bytes per adapter tier (resident and pinned: compute-ready weights; stored: PEFT files)",
            ),
            &["tier"],
        )?;
        let loads = IntCounterVec::new(
            Opts::new(
                "retune_adapter_loads_by_source_total",
                "Adapter loads by what they read (compute_form, or files: the PEFT files checked by content id)",
            ),
            &["source"],
        )?;
        let compute_form_rejected = prometheus::IntCounter::new(
            "retune_adapter_compute_form_rejected_total",
            "Compute forms refused at load (damaged or stale): loaded from the checked files instead",
        )?;
        let prefetches = prometheus::IntCounter::new(
            "retune_adapter_prefetches_total",
            "Adapter loads started for queued requests ahead of admission",
        )?;
        r.register(Box::new(versions.clone()))?;
        r.register(Box::new(bytes.clone()))?;
        r.register(Box::new(loads.clone()))?;
        r.register(Box::new(compute_form_rejected.clone()))?;
        r.register(Box::new(prefetches.clone()))?;
        Ok(Self {
            versions,
            bytes,
            loads,
            compute_form_rejected,
            prefetches,
        })
    }

    /// Read the pool's state (cheap: one pass over its entries).
    pub fn update(&self, pool: &retune_adapters::AdapterPool) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = pool.stats();
        let (pinned, pinned_bytes) = pool.pinned_resident();
        let set = |tier: &str, v: usize| self.versions.with_label_values(&[tier]).set(v as i64);
        set("resident", s.resident.load(Relaxed));
        set("pinned", pinned);
        set("loading", pool.loading());
        self.bytes
            .with_label_values(&["resident"])
            .set(s.bytes.load(Relaxed) as i64);
        self.bytes
            .with_label_values(&["pinned"])
            .set(pinned_bytes as i64);
        let (loads, packed) = (s.loads.load(Relaxed), s.packed_loads.load(Relaxed));
        catch_up(&self.loads.with_label_values(&["compute_form"]), packed);
        catch_up(
            &self.loads.with_label_values(&["files"]),
            loads.saturating_sub(packed),
        );
        catch_up(&self.compute_form_rejected, s.packed_rejected.load(Relaxed));
        catch_up(&self.prefetches, s.prefetches.load(Relaxed));
    }

    /// The store tier: servable versions and their bytes.
    pub fn stored(&self, versions: i64, bytes: i64) {
        self.versions.with_label_values(&["stored"]).set(versions);
        self.bytes.with_label_values(&["stored"]).set(bytes);
    }
}

/// The engine's prefix cache.
pub struct PrefixMetrics {
    pub hits: prometheus::IntCounter,
    pub misses: prometheus::IntCounter,
    pub tokens_reused: prometheus::IntCounter,
    pub evictions: prometheus::IntCounter,
    pub uncached: prometheus::IntCounter,
    pub tokens: IntGauge,
    pub bytes: IntGauge,
}

impl PrefixMetrics {
    fn new(r: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str| -> prometheus::Result<prometheus::IntCounter> {
            let c = prometheus::IntCounter::new(name, help)?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            hits: counter(
                "retune_prefix_cache_hits_total",
                "Admitted prompts that reused a cached prefix",
            )?,
            misses: counter(
                "retune_prefix_cache_misses_total",
                "Admitted prompts that found no cached prefix",
            )?,
            tokens_reused: counter(
                "retune_prefix_cache_reused_tokens_total",
                "Prompt tokens taken from the prefix cache instead of prefilled",
            )?,
            evictions: counter(
                "retune_prefix_cache_evictions_total",
                "Prefix cache blocks evicted to make room",
            )?,
            uncached: counter(
                "retune_prefix_cache_uncached_total",
                "Prompts longer than a tenant's share of the prefix cache: served, not cached",
            )?,
            tokens: gauge(
                "retune_prefix_cache_tokens",
                "Positions held by the prefix cache",
            )?,
            bytes: gauge(
                "retune_prefix_cache_bytes",
                "Bytes held by the prefix cache",
            )?,
        })
    }

    pub fn update(&self, p: &retune_engine::PrefixCounters) {
        catch_up(&self.hits, p.hits);
        catch_up(&self.misses, p.misses);
        catch_up(&self.tokens_reused, p.tokens_reused);
        catch_up(&self.evictions, p.evictions);
        catch_up(&self.uncached, p.uncached_too_long);
        self.tokens.set(p.tokens as i64);
        self.bytes.set(p.bytes as i64);
    }
}

impl Metrics {
    /// Count a generation by adapter and version; beyond `max_adapters` distinct
    /// adapters the adapter label becomes `other`.
    pub fn count_version(&self, tenant: &str, adapter: &str, version: &str) {
        let key = format!("{tenant}/{adapter}");
        let mut seen = self.seen_adapters.lock().unwrap_or_else(|p| p.into_inner());
        let known = seen.contains(&key) || (seen.len() < self.max_adapters && seen.insert(key));
        let (t, a, v) = if known {
            (tenant, adapter, version)
        } else {
            ("other", "other", "other")
        };
        self.by_version.with_label_values(&[t, a, v]).inc();
    }

    pub fn new(max_adapters: usize) -> prometheus::Result<Self> {
        let r = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "retune_requests_total",
                "HTTP requests by route, status and tenant",
            ),
            &["route", "status", "tenant"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "retune_request_duration_seconds",
                "Request duration by route",
            ),
            &["route"],
        )?;
        let ttft = Histogram::with_opts(HistogramOpts::new(
            "retune_time_to_first_token_seconds",
            "Time to first token",
        ))?;
        let tokens = IntCounterVec::new(
            Opts::new("retune_tokens_total", "Prompt and completion tokens"),
            &["kind"],
        )?;
        let queue_depth = IntGauge::new("retune_queue_depth", "Requests waiting for admission")?;
        let running = IntGauge::new("retune_running_sequences", "Sequences in the running batch")?;
        let adapters_resident =
            IntGauge::new("retune_adapters_resident", "Adapters held in memory")?;
        let adapter_bytes = IntGauge::new("retune_adapter_bytes", "Bytes of resident adapters")?;
        let adapter_loads = IntGauge::new("retune_adapter_loads", "Adapter loads since start")?;
        let adapter_evictions =
            IntGauge::new("retune_adapter_evictions", "Adapter evictions since start")?;
        let by_version = IntCounterVec::new(
            Opts::new(
                "retune_requests_by_adapter_version_total",
                "Generations by tenant, adapter and served version",
            ),
            &["tenant", "adapter", "version"],
        )?;
        r.register(Box::new(requests.clone()))?;
        r.register(Box::new(duration.clone()))?;
        r.register(Box::new(ttft.clone()))?;
        r.register(Box::new(tokens.clone()))?;
        r.register(Box::new(queue_depth.clone()))?;
        r.register(Box::new(running.clone()))?;
        r.register(Box::new(adapters_resident.clone()))?;
        r.register(Box::new(adapter_bytes.clone()))?;
        r.register(Box::new(adapter_loads.clone()))?;
        r.register(Box::new(adapter_evictions.clone()))?;
        r.register(Box::new(by_version.clone()))?;
        let swaps = IntCounterVec::new(
            Opts::new(
                "retune_adapter_changes_total",
                "Admin alias changes by operation",
            ),
            &["op"],
        )?;
        let itl = Histogram::with_opts(
            HistogramOpts::new(
                "retune_inter_token_latency_seconds",
                "Time between streamed tokens",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )?;
        r.register(Box::new(swaps.clone()))?;
        let step_tokens = IntGauge::new(
            "retune_batch_tokens",
            "Tokens in the most recent engine step (batch size)",
        )?;
        let adapter_load_seconds =
            prometheus::Gauge::new("retune_adapter_load_seconds", "Time spent loading adapters")?;
        r.register(Box::new(step_tokens.clone()))?;
        r.register(Box::new(adapter_load_seconds.clone()))?;
        r.register(Box::new(itl.clone()))?;
        let captured = prometheus::IntCounter::new(
            "retune_capture_total",
            "Completions written to the datasets store",
        )?;
        let capture_dropped = prometheus::IntCounter::new(
            "retune_capture_dropped_total",
            "Completions not captured: queue full or store failing",
        )?;
        let feedback = IntCounterVec::new(
            Opts::new("retune_feedback_total", "Feedback writes by kind"),
            &["kind"],
        )?;
        r.register(Box::new(captured.clone()))?;
        r.register(Box::new(capture_dropped.clone()))?;
        r.register(Box::new(feedback.clone()))?;
        let tainted_live = IntGauge::new(
            "retune_tainted_live_adapters",
            "Adapters whose live version was trained on erased data",
        )?;
        r.register(Box::new(tainted_live.clone()))?;
        let store_refused = prometheus::IntCounter::new(
            "retune_adapter_store_refused_total",
            "Stored adapter objects refused because they did not match their content id",
        )?;
        r.register(Box::new(store_refused.clone()))?;
        let registry_unreadable = prometheus::IntCounter::new(
            "retune_registry_unreadable_total",
            "Metrics scrapes that could not read the registry (its figures kept their last values)",
        )?;
        r.register(Box::new(registry_unreadable.clone()))?;
        let trainer_runs = IntCounterVec::new(
            Opts::new("retune_trainer_runs_total", "Finished trainer runs by outcome (promoted, canary, rejected, failed, skipped, crashed)"),
            &["status"],
        )?;
        let trainer_running =
            IntGauge::new("retune_trainer_running_runs", "Trainer runs in progress")?;
        let gate_decisions = IntCounterVec::new(
            Opts::new("retune_gate_decisions_total", "Eval gate verdicts"),
            &["result"],
        )?;
        let auto_rollbacks = prometheus::IntCounter::new(
            "retune_auto_rollbacks_total",
            "Rollouts undone by the watch after promotion",
        )?;
        let trainer_last_run = IntGauge::new(
            "retune_trainer_last_run_timestamp_seconds",
            "When the last trainer run finished (Unix seconds; 0: never)",
        )?;
        let watches_open =
            IntGauge::new("retune_watches_open", "Rolled-out versions being watched")?;
        r.register(Box::new(trainer_runs.clone()))?;
        r.register(Box::new(trainer_running.clone()))?;
        r.register(Box::new(gate_decisions.clone()))?;
        r.register(Box::new(auto_rollbacks.clone()))?;
        r.register(Box::new(trainer_last_run.clone()))?;
        r.register(Box::new(watches_open.clone()))?;
        let snapshot_examples = Histogram::with_opts(
            HistogramOpts::new(
                "retune_dataset_snapshot_examples",
                "Examples in each dataset snapshot made through the admin API",
            )
            .buckets(vec![10.0, 100.0, 1e3, 1e4, 1e5, 1e6]),
        )?;
        r.register(Box::new(snapshot_examples.clone()))?;
        let cancelled = prometheus::IntCounter::new(
            "retune_cancelled_generations_total",
            "Generations cancelled because the client left",
        )?;
        r.register(Box::new(cancelled.clone()))?;
        let prefix = PrefixMetrics::new(&r)?;
        let pool = PoolMetrics::new(&r)?;
        let kv_usage = prometheus::Gauge::new(
            "retune_kv_cache_usage_perc",
            "Fraction (0 to 1) of engine.max_kv_tokens the running sequences reserve",
        )?;
        let lora_info = prometheus::GaugeVec::new(
            Opts::new(
                "retune_lora_requests_info",
                "Adapters of running and waiting requests (names as sent in `model`); value: unix time of the update",
            ),
            &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )?;
        r.register(Box::new(kv_usage.clone()))?;
        r.register(Box::new(lora_info.clone()))?;
        let kernels_info = IntGaugeVec::new(
            Opts::new(
                "retune_engine_kernels_info",
                "The CPU weight kernels this process runs (engine.kernels resolved against the CPU); value 1",
            ),
            &["path"],
        )?;
        r.register(Box::new(kernels_info.clone()))?;
        Ok(Self {
            registry: r,
            requests,
            duration,
            ttft,
            tokens,
            queue_depth,
            running,
            adapters_resident,
            adapter_bytes,
            adapter_loads,
            adapter_evictions,
            by_version,
            swaps,
            itl,
            step_tokens,
            adapter_load_seconds,
            captured,
            capture_dropped,
            feedback,
            tainted_live,
            store_refused,
            registry_unreadable,
            trainer_runs,
            trainer_running,
            gate_decisions,
            auto_rollbacks,
            trainer_last_run,
            watches_open,
            snapshot_examples,
            cancelled,
            prefix,
            pool,
            kv_usage,
            lora_info,
            kernels_info,
            seen_adapters: Default::default(),
            max_adapters,
        })
    }
}

impl Metrics {
    /// The one current series of `retune_lora_requests_info` (older label sets removed).
    pub fn set_lora_info(&self, max_lora: usize, running: &[String], waiting: &[String]) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let (max, run, wait) = (max_lora.to_string(), running.join(","), waiting.join(","));
        self.lora_info.reset();
        self.lora_info
            .with_label_values(&[max.as_str(), run.as_str(), wait.as_str()])
            .set(now);
    }
}

/// Raise a counter to a monotonic total kept elsewhere (an atomic of another crate).
pub fn catch_up(c: &prometheus::IntCounter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

/// `GET /metrics`: the serving figures read now, the loop's figures from the
/// shared registry (kept at their last values while it cannot be read), in
/// Prometheus' text format. Closed without the metrics key unless
/// `auth.public_metrics`.
pub(crate) async fn scrape(
    state: web::Data<AppState>,
    _: MetricsCaller,
) -> Result<HttpResponse, ApiError> {
    let m = &state.metrics;
    let s = state.backend.stats();
    m.queue_depth.set(s.queued as i64);
    m.running.set(s.running as i64);
    m.step_tokens.set(s.last_step_tokens as i64);
    if let Some(p) = &s.prefix {
        m.prefix.update(p);
    }
    m.kv_usage.set(if s.kv_capacity_tokens > 0 {
        s.kv_reserved_tokens as f64 / s.kv_capacity_tokens as f64
    } else {
        0.0
    });
    if state.pool.is_some() {
        m.set_lora_info(
            state.settings.adapters.max_resident,
            &s.running_adapters,
            &s.waiting_adapters,
        );
    }
    if let Some(p) = &state.pool {
        let ps = p.stats();
        m.adapters_resident
            .set(ps.resident.load(Ordering::Relaxed) as i64);
        m.adapter_bytes.set(ps.bytes.load(Ordering::Relaxed) as i64);
        m.adapter_loads.set(ps.loads.load(Ordering::Relaxed) as i64);
        m.adapter_evictions
            .set(ps.evictions.load(Ordering::Relaxed) as i64);
        m.adapter_load_seconds
            .set(ps.load_micros.load(Ordering::Relaxed) as f64 / 1e6);
        m.pool.update(p);
    }
    if let Some(w) = &state.capture {
        let cs = w.stats();
        catch_up(&m.captured, cs.captured.load(Ordering::Relaxed));
        catch_up(&m.capture_dropped, cs.dropped.load(Ordering::Relaxed));
    }
    if let Some(reg) = &state.registry {
        catch_up(&m.store_refused, reg.store_refused());
    }
    let read = match state.registry.clone() {
        Some(reg) => Some(
            web::block(move || {
                Ok::<_, retune_registry::RegistryError>((
                    reg.tainted_live_count()?,
                    reg.loop_counts()?,
                    reg.stored_totals()?,
                ))
            })
            .await
            .map_err(|e| ApiError::Internal(format!("registry task: {e}")))?,
        ),
        None => None,
    };
    // a shared registry that is down must not take the serving gauges (which
    // the inference gateway routes by) with it
    let read = match read {
        Some(Err(e)) => {
            tracing::warn!(error = %e, "metrics: the registry cannot be read; its figures keep their last values");
            m.registry_unreadable.inc();
            None
        }
        Some(Ok(r)) => Some(r),
        None => None,
    };
    if let Some((n, c, stored)) = read {
        m.tainted_live.set(n);
        m.pool.stored(stored.0, stored.1);
        // the trainer writes these to the shared registry; the server reports them
        let mut running = 0;
        for (status, count) in &c.runs {
            if *status == retune_registry::RunStatus::Running {
                running = *count;
            } else {
                catch_up(
                    &m.trainer_runs.with_label_values(&[status.as_str()]),
                    *count as u64,
                );
            }
        }
        m.trainer_running.set(running);
        catch_up(
            &m.gate_decisions.with_label_values(&["pass"]),
            c.gate_passes as u64,
        );
        catch_up(
            &m.gate_decisions.with_label_values(&["fail"]),
            c.gate_fails as u64,
        );
        catch_up(&m.auto_rollbacks, c.auto_rollbacks as u64);
        m.trainer_last_run
            .set(c.last_run_finished.unwrap_or(0) / 1000);
        m.watches_open.set(c.watching);
    }
    let mut out = Vec::new();
    use prometheus::Encoder;
    prometheus::TextEncoder::new()
        .encode(&m.registry.gather(), &mut out)
        .map_err(|e| ApiError::Internal(format!("encoding metrics: {e}")))?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out))
}
