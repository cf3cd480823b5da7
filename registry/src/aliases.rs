//! The request path's view of the registry: every adapter's aliases and servable
//! versions in memory, behind an `ArcSwap` snapshot, so resolving a model name
//! reads no database and never waits on an admin write (which holds the
//! registry's connection across its fsync).
//!
//! The snapshot is fed by the registry's change feed, the journal: a change made
//! through this process's [`Registry`] updates it before the changing call
//! returns (a client that promoted and then asks is served the new version), and
//! changes from other processes (the trainer's rollouts and rollbacks, other
//! replicas' promotions) are read on a thread of its own: on PostgreSQL as soon
//! as the commit's `NOTIFY` arrives, on SQLite by polling the journal's sequence;
//! every `poll` at the latest either way. Only the adapters the new journal
//! entries name are read again.

use crate::error::RegistryError;
use crate::registry::{last_seq, pick_alias, set_state, AdapterState, Listener, Registry};
use crate::sql::{p, Conn, Db, Mode};
use arc_swap::ArcSwap;
use retune_adapters::names::{check_name, AdapterRef, Via};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

type R<T> = Result<T, RegistryError>;

/// One adapter as the request path sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routed {
    pub state: AdapterState,
    /// Versions that may be served (registered, not retired).
    pub servable: HashSet<String>,
}

/// Everything the request path resolves against, as of journal entry `seq`.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub seq: i64,
    adapters: HashMap<(String, String), Arc<Routed>>,
}

impl Snapshot {
    pub fn get(&self, tenant: &str, name: &str) -> Option<&Routed> {
        self.adapters
            .get(&(tenant.to_string(), name.to_string()))
            .map(|a| &**a)
    }

    /// A tenant's adapters (name, state), sorted by name.
    pub fn of_tenant(&self, tenant: &str) -> Vec<(String, AdapterState)> {
        let mut v: Vec<(String, AdapterState)> = self
            .adapters
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|((_, n), a)| (n.clone(), a.state.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }
}

pub struct AliasCache {
    snap: ArcSwap<Snapshot>,
    /// Its own read handle (reads do not wait for the registry's writer).
    db: Arc<dyn Db>,
    /// Refreshes one at a time.
    refreshing: Mutex<()>,
    /// When a lookup that found nothing last read the registry (ms since
    /// `born`): at most one such read per [`MISS_REFRESH_MS`].
    miss_refresh: std::sync::atomic::AtomicU64,
    born: std::time::Instant,
}

/// A lookup that finds nothing reads what changed in the registry first, at
/// most this often: a version or alias another replica has just committed is
/// served here before its notification arrives, and a stream of unknown names
/// costs the database one small read per period, not one per request.
const MISS_REFRESH_MS: u64 = 5;
/// After such a read failed, none for this long.
const MISS_BACKOFF_MS: u64 = 1_000;

impl AliasCache {
    /// Load every adapter's routing state from `reg`'s database, follow `reg`'s
    /// in-process changes, and other processes' as their notifications arrive
    /// (every `poll` at the latest).
    pub fn attach(reg: &Registry, poll: Duration) -> R<Arc<Self>> {
        let cache = Arc::new(Self {
            snap: ArcSwap::from_pointee(Snapshot::default()),
            db: reg.db.reader()?,
            refreshing: Mutex::new(()),
            miss_refresh: std::sync::atomic::AtomicU64::new(0),
            born: std::time::Instant::now(),
        });
        cache.refresh()?;
        let listener: Arc<dyn Listener> = cache.clone();
        reg.listen(Arc::downgrade(&listener));
        let mut watch = cache.db.watcher()?;
        let weak: Weak<Self> = Arc::downgrade(&cache);
        std::thread::Builder::new()
            .name("retune-alias-feed".into())
            .spawn(move || loop {
                watch.wait(poll);
                let Some(c) = weak.upgrade() else { return };
                if let Err(e) = c.refresh() {
                    tracing_warn(&e);
                }
            })
            .map_err(|e| RegistryError::Io(format!("cannot start the alias feed: {e}")))?;
        Ok(cache)
    }

    /// The current snapshot (lock-free).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.load_full()
    }

    /// Resolve a client's model name for `tenant` from memory, with the
    /// registry's rules ([`Registry::resolve`]): `name` → canary when `bucket`
    /// falls in its share, else live; `name@version` pins a servable version.
    /// What memory does not have is looked for again after reading the
    /// registry's changes ([`MISS_REFRESH_MS`]): a replica serves a version
    /// another one has just registered without waiting for the notification.
    pub fn resolve(&self, tenant: &str, model: &str, bucket: u8) -> R<AdapterRef> {
        match self.lookup(tenant, model, bucket) {
            // another replica's commit may be ahead of its notification:
            // read what changed, then look again
            Err(RegistryError::NotFound(m)) => match self.refresh_after_miss() {
                true => self.lookup(tenant, model, bucket),
                false => Err(RegistryError::NotFound(m)),
            },
            found => found,
        }
    }

    /// Read the registry's changes after a lookup found nothing, unless one
    /// did within [`MISS_REFRESH_MS`]; true when anything changed.
    fn refresh_after_miss(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = self.born.elapsed().as_millis() as u64 + MISS_REFRESH_MS;
        let last = self.miss_refresh.load(Ordering::Relaxed);
        if now < last + MISS_REFRESH_MS
            || self
                .miss_refresh
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        match self.refresh() {
            Ok(changed) => changed,
            Err(_) => {
                // the database is not answering (the refresh waited for it):
                // misses stay memory-only for a while rather than each paying
                // that wait on the request path
                let after = self.born.elapsed().as_millis() as u64;
                self.miss_refresh
                    .store(after + MISS_BACKOFF_MS, Ordering::Relaxed);
                false
            }
        }
    }

    fn lookup(&self, tenant: &str, model: &str, bucket: u8) -> R<AdapterRef> {
        let not_found = || RegistryError::NotFound(format!("model `{model}`"));
        let (name, pinned) = match model.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (model, None),
        };
        if check_name("adapter name", name).is_err() {
            return Err(not_found());
        }
        let snap = self.snap.load();
        let a = snap.get(tenant, name).ok_or_else(not_found)?;
        let (version, via) = match pinned {
            Some(v) if a.servable.contains(v) => (v.to_string(), Via::Pinned),
            Some(_) => return Err(not_found()),
            None => pick_alias(&a.state, bucket).ok_or_else(not_found)?,
        };
        AdapterRef::new(tenant, name, &version, via).map_err(|_| not_found())
    }

    /// Read what changed since the snapshot's journal entry; true when anything did.
    pub fn refresh(&self) -> R<bool> {
        let _one = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        // one read transaction: the sequence and the rows agree
        let mut tx = self.db.begin(Mode::Snapshot)?;
        let seq = last_seq(&mut *tx)?;
        let old = self.snap.load_full();
        if seq == old.seq && seq != 0 {
            return Ok(false);
        }
        let mut next = (*old).clone();
        next.seq = seq;
        if old.seq == 0 {
            next.adapters = load_all(&mut *tx)?;
        } else {
            let keys = tx
                .query(
                    "SELECT DISTINCT tenant, name FROM journal WHERE seq > ?1",
                    p![old.seq],
                )?
                .iter()
                .map(|r| Ok((r.s(0)?, r.s(1)?)))
                .collect::<R<Vec<(String, String)>>>()?;
            for (t, n) in keys {
                match load_one(&mut *tx, &t, &n)? {
                    Some(a) => next.adapters.insert((t, n), Arc::new(a)),
                    None => next.adapters.remove(&(t, n)),
                };
            }
        }
        self.snap.store(Arc::new(next));
        Ok(true)
    }
}

fn tracing_warn(e: &RegistryError) {
    // the adapters crate has no logger: stderr, rare (the database is unreadable)
    eprintln!("retune: alias feed: reading the registry failed (serving the last state): {e}");
}

fn load_all(c: &mut dyn Conn) -> R<HashMap<(String, String), Arc<Routed>>> {
    let mut all: HashMap<(String, String), Routed> = HashMap::new();
    for r in c.query("SELECT tenant, name, id, retired FROM versions", &[])? {
        let a = all.entry((r.s(0)?, r.s(1)?)).or_default();
        if r.i(3)? == 0 {
            a.servable.insert(r.s(2)?);
        }
    }
    for r in c.query(
        "SELECT tenant, name, alias, version, percent FROM aliases",
        &[],
    )? {
        if let Some(a) = all.get_mut(&(r.s(0)?, r.s(1)?)) {
            set_state(&mut a.state, &r.s(2)?, r.s(3)?, r.oi(4)?);
        }
    }
    Ok(all.into_iter().map(|(k, v)| (k, Arc::new(v))).collect())
}

fn load_one(c: &mut dyn Conn, tenant: &str, name: &str) -> R<Option<Routed>> {
    let mut a = Routed::default();
    let rows = c.query(
        "SELECT id, retired FROM versions WHERE tenant = ?1 AND name = ?2",
        p![tenant, name],
    )?;
    if rows.is_empty() {
        return Ok(None);
    }
    for r in rows {
        if r.i(1)? == 0 {
            a.servable.insert(r.s(0)?);
        }
    }
    for r in c.query(
        "SELECT alias, version, percent FROM aliases WHERE tenant = ?1 AND name = ?2",
        p![tenant, name],
    )? {
        set_state(&mut a.state, &r.s(0)?, r.s(1)?, r.oi(2)?);
    }
    Ok(Some(a))
}

impl retune_adapters::pool::Servable for AliasCache {
    fn servable(&self, adapter: &AdapterRef) -> bool {
        self.snapshot()
            .get(adapter.tenant(), adapter.name())
            .is_some_and(|a| a.servable.contains(adapter.version()))
    }

    fn routed(&self, tenant: &str, name: &str) -> Vec<String> {
        let snap = self.snapshot();
        let Some(a) = snap.get(tenant, name) else {
            return Vec::new();
        };
        a.state
            .live
            .iter()
            .chain(a.state.canary.as_ref().map(|c| &c.0))
            .cloned()
            .collect()
    }
}

impl Listener for AliasCache {
    fn refresh(&self) -> R<bool> {
        AliasCache::refresh(self)
    }
}
