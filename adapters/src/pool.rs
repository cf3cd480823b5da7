//! Adapter pool: adapters loaded on demand (on a loader thread, never the decode
//! thread), kept up to count and byte limits, least-recently-used evicted. An
//! adapter a running sequence holds (its `Arc` is shared) is never evicted.

use crate::error::AdapterError;
use crate::names::AdapterRef;
use crate::packed::{self, PackedError};
use crate::peft::{BaseShapes, LoadLimits, LoraAdapter};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Where a resolved adapter version's files are. The registry implements this (a
/// store lookup, no database query: the reference was resolved already); tests and
/// simple deployments use [`DirSource`].
pub trait AdapterSource: Send + Sync {
    fn locate(&self, adapter: &AdapterRef) -> Result<PathBuf, AdapterError>;

    /// Versions are named by their files' content id (the registry's store): the
    /// pool checks the files against it before each load.
    fn content_addressed(&self) -> bool {
        false
    }

    /// Keep `bytes`, the compute form of content-addressed `adapter`, beside its
    /// files (see [`crate::packed`]). Sources without one ignore it.
    fn store_packed(&self, _adapter: &AdapterRef, _bytes: &[u8]) -> Result<(), AdapterError> {
        Ok(())
    }
}

/// Each adapter is the directory `root/<name>` (tenant and version are not used).
pub struct DirSource {
    pub root: PathBuf,
}

impl AdapterSource for DirSource {
    fn locate(&self, adapter: &AdapterRef) -> Result<PathBuf, AdapterError> {
        Ok(self.root.join(adapter.name())) // a checked name: no separators, no `..`
    }
}

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub max_adapters: usize,
    pub max_bytes: usize,
    pub limits: LoadLimits,
    /// Loads run in parallel on this many threads: one slow or hostile adapter
    /// does not hold up every other tenant's first request.
    pub loaders: usize,
    /// Adapters (tenant, name) whose routed versions (live and canary) are
    /// never evicted; [`AdapterPool::load_pinned`] loads them at start.
    pub pinned: Vec<(String, String)>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_adapters: 64,
            max_bytes: 2 << 30,
            limits: LoadLimits::default(),
            loaders: 2,
            pinned: Vec::new(),
        }
    }
}

/// Whether a resolved version may still be served (the registry's alias cache
/// says: not retired, not deleted). A version that may not is evicted and refused.
pub trait Servable: Send + Sync {
    fn servable(&self, adapter: &AdapterRef) -> bool;

    /// The versions `tenant/name` routes requests to now (live, canary).
    fn routed(&self, _tenant: &str, _name: &str) -> Vec<String> {
        Vec::new()
    }
}

/// Counters for metrics.
#[derive(Default)]
pub struct PoolStats {
    pub resident: AtomicUsize,
    pub bytes: AtomicUsize,
    pub loads: AtomicU64,
    pub load_failures: AtomicU64,
    pub evictions: AtomicU64,
    /// Total load time, microseconds (loads / this = mean).
    pub load_micros: AtomicU64,
    /// Loads served from the compute form.
    pub packed_loads: AtomicU64,
    /// Compute forms refused (damaged, stale): loaded from the files instead.
    pub packed_rejected: AtomicU64,
    /// Loads started ahead of admission for queued requests.
    pub prefetches: AtomicU64,
}

pub enum Acquire {
    Ready(Arc<LoraAdapter>),
    /// Loading on the loader thread; ask again later.
    Pending,
    Failed(Arc<AdapterError>),
}

enum Entry {
    Loading,
    Ready {
        adapter: Arc<LoraAdapter>,
        last_used: u64,
    },
    /// A failed load, answered from here until `retry_at` (negative cache).
    Failed {
        error: Arc<AdapterError>,
        retry_at: Instant,
    },
}

/// Backoff of a failing version: 1 s after the first failure, doubling to 60 s.
/// Versions are immutable, so most failures are permanent; the backoff keeps a
/// broken one from being reloaded by every request, and still lets a transient
/// failure (a store briefly unreachable) heal.
fn backoff(failures: u32) -> std::time::Duration {
    std::time::Duration::from_secs(1u64 << failures.saturating_sub(1).min(6))
        .min(std::time::Duration::from_secs(60))
}

struct State {
    entries: HashMap<String, Entry>,
    /// Consecutive failed loads per version (cleared by a successful load).
    failures: HashMap<String, u32>,
    clock: u64,
    latencies_us: Vec<u64>,
}

pub struct AdapterPool {
    state: Mutex<State>,
    cfg: PoolConfig,
    stats: PoolStats,
    tx: Mutex<Sender<AdapterRef>>,
    gate: std::sync::OnceLock<Arc<dyn Servable>>,
}

/// Load a version: from its compute form when the source keeps one and it
/// passes its checks, else from its files (checked against the content id it
/// is named by), writing a new compute form for next time.
fn load_checked(
    source: &dyn AdapterSource,
    adapter: &AdapterRef,
    base: &BaseShapes,
    cfg: &PoolConfig,
    stats: &PoolStats,
) -> Result<LoraAdapter, AdapterError> {
    let dir = source.locate(adapter)?;
    if !source.content_addressed() {
        return packed::load_guarded(&dir, base, &cfg.limits);
    }
    let id = adapter.version();
    match packed::unpack(&packed::path_in(&dir), &dir, id, base, &cfg.limits) {
        Ok(a) => {
            stats.packed_loads.fetch_add(1, Ordering::Relaxed);
            return Ok(a);
        }
        Err(PackedError::Missing) => {}
        // a real refusal (a rank above this server's limit): the files say the same
        Err(PackedError::Adapter(e)) if !matches!(e, AdapterError::Io { .. }) => return Err(e),
        Err(e) => {
            stats.packed_rejected.fetch_add(1, Ordering::Relaxed);
            eprintln!("retune: compute form of {adapter} not used ({e}): loading its files");
        }
    }
    let loaded = packed::load_verified(&dir, id, base, &cfg.limits)?;
    if !packed::packable(&loaded) {
        return Ok(loaded);
    }
    let stored = packed::pack_dir(&loaded, &dir, id, base)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            source
                .store_packed(adapter, &bytes)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = stored {
        eprintln!("retune: writing the compute form of {adapter} failed (loads stay slow): {e}");
    }
    Ok(loaded)
}

impl AdapterPool {
    pub fn new(source: Arc<dyn AdapterSource>, base: BaseShapes, cfg: PoolConfig) -> Arc<Self> {
        let (tx, rx) = channel::<AdapterRef>();
        let pool = Arc::new(Self {
            state: Mutex::new(State {
                entries: HashMap::new(),
                failures: HashMap::new(),
                clock: 0,
                latencies_us: Vec::new(),
            }),
            cfg,
            stats: PoolStats::default(),
            tx: Mutex::new(tx),
            gate: std::sync::OnceLock::new(),
        });
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        let mut spawn_error = None;
        for i in 0..pool.cfg.loaders.max(1) {
            let (weak, rx, source, base) = (
                Arc::downgrade(&pool),
                rx.clone(),
                source.clone(),
                base.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("retune-adapter-loader-{i}"))
                .spawn(move || loop {
                    let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(adapter) = next else { return };
                    let Some(pool) = weak.upgrade() else { return };
                    let start = Instant::now();
                    let result = load_checked(&*source, &adapter, &base, &pool.cfg, &pool.stats);
                    let micros = start.elapsed().as_micros() as u64;
                    pool.finish_load(adapter.key(), result, micros);
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => spawn_error = Some(e),
            }
        }
        if let (0, Some(e)) = (started, spawn_error) {
            // no loader: every acquire reports the failure instead of hanging
            let mut st = pool.lock();
            st.entries.insert(
                String::new(),
                Entry::Failed {
                    error: Arc::new(AdapterError::Io {
                        path: PathBuf::new(),
                        source: e,
                    }),
                    retry_at: Instant::now() + std::time::Duration::from_secs(u32::MAX as u64),
                },
            );
        }
        pool
    }

    /// Refuse (and evict) versions `gate` says may no longer be served: a retired
    /// version stops serving even while resident.
    pub fn set_servable(&self, gate: Arc<dyn Servable>) {
        let _ = self.gate.set(gate);
    }

    /// Drop a version now (it was retired or deleted); sequences already running
    /// on it finish.
    pub fn forget(&self, adapter: &AdapterRef) {
        let mut st = self.lock();
        if st.entries.remove(&adapter.key()).is_some() {
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
        self.publish(&st);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> &PoolStats {
        &self.stats
    }

    /// Load-time percentiles in microseconds (p50, p99) over recorded loads.
    pub fn load_latency_us(&self) -> Option<(u64, u64)> {
        let mut v = self.lock().latencies_us.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99)))
    }

    /// Keys (`tenant/name/version`) of resident adapters.
    pub fn resident(&self) -> Vec<String> {
        let st = self.lock();
        let mut v: Vec<String> = st
            .entries
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Ready { .. }))
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// Get an adapter for a sequence, starting a load if it is not resident. A
    /// failed load is answered from a negative cache until its backoff expires;
    /// the next request after that loads it again.
    pub fn acquire(&self, adapter: &AdapterRef) -> Acquire {
        self.get_or_load(adapter, true)
    }

    /// Start loading `adapter` for a request still queued, unless it is
    /// resident, loading or failed; its recency is left as it is.
    pub fn prefetch(&self, adapter: &AdapterRef) {
        if self.lock().entries.contains_key(&adapter.key()) {
            return;
        }
        if let Acquire::Pending = self.get_or_load(adapter, false) {
            self.stats.prefetches.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn get_or_load(&self, adapter: &AdapterRef, use_it: bool) -> Acquire {
        if let Some(gate) = self.gate.get() {
            if !gate.servable(adapter) {
                self.forget(adapter);
                return Acquire::Failed(Arc::new(AdapterError::Config {
                    field: "adapter".into(),
                    reason: format!("{adapter} was retired or deleted"),
                }));
            }
        }
        let key = adapter.key();
        let handle = key.as_str();
        let mut st = self.lock();
        st.clock += 1;
        let now = st.clock;
        match st.entries.get_mut(handle) {
            Some(Entry::Ready { adapter, last_used }) => {
                if use_it {
                    *last_used = now;
                }
                Acquire::Ready(adapter.clone())
            }
            Some(Entry::Loading) => Acquire::Pending,
            Some(Entry::Failed { error, retry_at }) if Instant::now() < *retry_at => {
                Acquire::Failed(error.clone())
            }
            other => {
                if other.is_some() {
                    st.entries.remove(handle); // the backoff is over: load again
                }
                if let Some(Entry::Failed { error, .. }) = st.entries.get("") {
                    return Acquire::Failed(error.clone());
                }
                st.entries.insert(handle.to_string(), Entry::Loading);
                let sent = self
                    .tx
                    .lock()
                    .map(|tx| tx.send(adapter.clone()).is_ok())
                    .unwrap_or(false);
                if !sent {
                    st.entries.remove(handle);
                    return Acquire::Failed(Arc::new(AdapterError::Config {
                        field: "adapter".into(),
                        reason: "adapter loader has stopped".into(),
                    }));
                }
                Acquire::Pending
            }
        }
    }

    fn finish_load(&self, handle: String, result: Result<LoraAdapter, AdapterError>, micros: u64) {
        let mut st = self.lock();
        match result {
            Ok(a) => {
                self.stats.loads.fetch_add(1, Ordering::Relaxed);
                self.stats.load_micros.fetch_add(micros, Ordering::Relaxed);
                st.latencies_us.push(micros);
                if st.latencies_us.len() > 4096 {
                    st.latencies_us.drain(..2048);
                }
                st.clock += 1;
                let now = st.clock;
                st.failures.remove(&handle);
                st.entries.insert(
                    handle,
                    Entry::Ready {
                        adapter: Arc::new(a),
                        last_used: now,
                    },
                );
                self.evict(&mut st);
            }
            Err(e) => {
                self.stats.load_failures.fetch_add(1, Ordering::Relaxed);
                if st.failures.len() > 10_000 {
                    st.failures.clear(); // bounded: many distinct broken versions start over at 1 s
                }
                // an unreachable store heals by itself: retried within a second
                let wait = if matches!(e, AdapterError::Unavailable(_)) {
                    std::time::Duration::from_secs(1)
                } else {
                    let n = st.failures.entry(handle.clone()).or_insert(0);
                    *n += 1;
                    backoff(*n)
                };
                let retry_at = Instant::now() + wait;
                st.entries.insert(
                    handle,
                    Entry::Failed {
                        error: Arc::new(e),
                        retry_at,
                    },
                );
            }
        }
        self.publish(&st);
    }

    /// Evict least-recently-used adapters nobody holds until within limits.
    fn evict(&self, st: &mut State) {
        loop {
            let ready: Vec<(&String, u64, usize, bool)> = st
                .entries
                .iter()
                .filter_map(|(k, e)| match e {
                    Entry::Ready { adapter, last_used } => {
                        Some((k, *last_used, adapter.bytes, Arc::strong_count(adapter) > 1))
                    }
                    _ => None,
                })
                .collect();
            let bytes: usize = ready.iter().map(|r| r.2).sum();
            if ready.len() <= self.cfg.max_adapters && bytes <= self.cfg.max_bytes {
                return;
            }
            let Some(victim) = ready
                .iter()
                .filter(|r| !r.3 && !self.is_pinned(r.0))
                .min_by_key(|r| r.1)
                .map(|r| r.0.clone())
            else {
                return; // everything resident is in use: stay over the limit until released
            };
            st.entries.remove(&victim);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether resident entry `key` (`tenant/name/version`) is pinned: its
    /// adapter is in the pinned list and routes to this version now (without a
    /// routing gate, every version of a pinned adapter).
    fn is_pinned(&self, key: &str) -> bool {
        let mut parts = key.splitn(3, '/');
        let (Some(t), Some(n), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        if !self.cfg.pinned.iter().any(|(pt, pn)| pt == t && pn == n) {
            return false;
        }
        match self.gate.get() {
            Some(gate) => gate.routed(t, n).iter().any(|r| r == v),
            None => true,
        }
    }

    /// Load the routed versions of every pinned adapter and wait for them (at
    /// start, before serving). Returns the bytes they hold resident and the
    /// failures (a pinned adapter that fails to load fails its own requests,
    /// like any other; it does not stop the server).
    pub fn load_pinned(&self, timeout: std::time::Duration) -> (usize, usize, Vec<String>) {
        let Some(gate) = self.gate.get().cloned() else {
            return (0, 0, Vec::new());
        };
        let mut wanted = Vec::new();
        for (t, n) in &self.cfg.pinned {
            for v in gate.routed(t, n) {
                match AdapterRef::new(t, n, &v, crate::names::Via::Pinned) {
                    Ok(r) => wanted.push(r),
                    Err(e) => return (0, 0, vec![e.to_string()]),
                }
            }
        }
        let start = Instant::now();
        let (mut bytes, mut count, mut failed) = (0, 0, Vec::new());
        for r in &wanted {
            loop {
                match self.acquire(r) {
                    Acquire::Ready(a) => {
                        bytes += a.bytes;
                        count += 1;
                        break;
                    }
                    Acquire::Failed(e) => {
                        failed.push(format!("{r}: {e}"));
                        break;
                    }
                    Acquire::Pending if start.elapsed() > timeout => {
                        failed.push(format!("{r}: not loaded within {timeout:?}"));
                        break;
                    }
                    Acquire::Pending => std::thread::sleep(std::time::Duration::from_millis(2)),
                }
            }
        }
        (bytes, count, failed)
    }

    /// Resident versions that are pinned now, and their bytes.
    pub fn pinned_resident(&self) -> (usize, usize) {
        let st = self.lock();
        st.entries
            .iter()
            .filter_map(|(k, e)| match e {
                Entry::Ready { adapter, .. } if self.is_pinned(k) => Some(adapter.bytes),
                _ => None,
            })
            .fold((0, 0), |(n, b), x| (n + 1, b + x))
    }

    /// Loads in flight.
    pub fn loading(&self) -> usize {
        self.lock()
            .entries
            .values()
            .filter(|e| matches!(e, Entry::Loading))
            .count()
    }

    /// Re-apply limits (after sequences released adapters).
    pub fn trim(&self) {
        let mut st = self.lock();
        self.evict(&mut st);
        self.publish(&st);
    }

    fn publish(&self, st: &State) {
        let (n, b) = st.entries.values().fold((0, 0), |(n, b), e| match e {
            Entry::Ready { adapter, .. } => (n + 1, b + adapter.bytes),
            _ => (n, b),
        });
        self.stats.resident.store(n, Ordering::Relaxed);
        self.stats.bytes.store(b, Ordering::Relaxed);
    }
}
