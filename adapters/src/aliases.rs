//! The request path's view of the registry: every adapter's aliases and servable
//! versions in memory, behind an `ArcSwap` snapshot, so resolving a model name
//! reads no database and never waits on an admin write (which holds the
//! registry's connection across its fsync).
//!
//! The snapshot is fed by the registry's change feed, the journal: a change made
//! through this process's [`Registry`] updates it before the changing call
//! returns (a client that promoted and then asks is served the new version), and
//! changes from other processes (the trainer's rollouts and rollbacks) are found
//! by polling the journal's sequence on a thread of its own, every `poll`. Only
//! the adapters the new journal entries name are read again.

use crate::error::RegistryError;
use crate::names::{check_name, AdapterRef, Via};
use crate::registry::{pick_alias, AdapterState, Registry};
use arc_swap::ArcSwap;
use rusqlite::{params, Connection};
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
    /// Its own read connection (WAL: reads do not wait for the registry's writer);
    /// the lock also makes refreshes one at a time.
    conn: Mutex<Connection>,
}

impl AliasCache {
    /// Load every adapter's routing state from `reg`'s database, follow `reg`'s
    /// in-process changes, and poll for other processes' every `poll`.
    pub fn attach(reg: &Registry, poll: Duration) -> R<Arc<Self>> {
        let conn = Connection::open(reg.db_path())?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let cache = Arc::new(Self {
            snap: ArcSwap::from_pointee(Snapshot::default()),
            conn: Mutex::new(conn),
        });
        cache.refresh()?;
        reg.listen(Arc::downgrade(&cache));
        let weak: Weak<Self> = Arc::downgrade(&cache);
        std::thread::Builder::new()
            .name("retune-alias-feed".into())
            .spawn(move || loop {
                std::thread::sleep(poll);
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
    pub fn resolve(&self, tenant: &str, model: &str, bucket: u8) -> R<AdapterRef> {
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
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // one read transaction: the sequence and the rows agree
        let tx = conn.transaction()?;
        let seq: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM journal", [], |r| {
            r.get(0)
        })?;
        let old = self.snap.load_full();
        if seq == old.seq && seq != 0 {
            return Ok(false);
        }
        let mut next = (*old).clone();
        next.seq = seq;
        if old.seq == 0 {
            next.adapters = load_all(&tx)?;
        } else {
            let mut q = tx.prepare("SELECT DISTINCT tenant, name FROM journal WHERE seq > ?1")?;
            let keys = q
                .query_map(params![old.seq], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<(String, String)>, _>>()?;
            for (t, n) in keys {
                match load_one(&tx, &t, &n)? {
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

fn load_all(conn: &Connection) -> R<HashMap<(String, String), Arc<Routed>>> {
    let mut all: HashMap<(String, String), Routed> = HashMap::new();
    let mut q = conn.prepare("SELECT tenant, name, id, retired FROM versions")?;
    let rows = q.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    for row in rows {
        let (t, n, id, retired) = row?;
        let a = all.entry((t, n)).or_default();
        if retired == 0 {
            a.servable.insert(id);
        }
    }
    let mut q = conn.prepare("SELECT tenant, name, alias, version, percent FROM aliases")?;
    let rows = q.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Option<i64>>(4)?,
        ))
    })?;
    for row in rows {
        let (t, n, alias, version, pct) = row?;
        if let Some(a) = all.get_mut(&(t, n)) {
            set(&mut a.state, &alias, version, pct);
        }
    }
    Ok(all.into_iter().map(|(k, v)| (k, Arc::new(v))).collect())
}

fn load_one(conn: &Connection, tenant: &str, name: &str) -> R<Option<Routed>> {
    let mut a = Routed::default();
    let mut known = false;
    let mut q = conn.prepare("SELECT id, retired FROM versions WHERE tenant = ?1 AND name = ?2")?;
    let rows = q.query_map(params![tenant, name], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
    })?;
    for row in rows {
        let (id, retired) = row?;
        known = true;
        if retired == 0 {
            a.servable.insert(id);
        }
    }
    if !known {
        return Ok(None);
    }
    let mut q = conn
        .prepare("SELECT alias, version, percent FROM aliases WHERE tenant = ?1 AND name = ?2")?;
    let rows = q.query_map(params![tenant, name], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<i64>>(2)?,
        ))
    })?;
    for row in rows {
        let (alias, version, pct) = row?;
        set(&mut a.state, &alias, version, pct);
    }
    Ok(Some(a))
}

fn set(st: &mut AdapterState, alias: &str, version: String, pct: Option<i64>) {
    match alias {
        "live" => st.live = Some(version),
        "previous" => st.previous = Some(version),
        "canary" => st.canary = Some((version, pct.unwrap_or(0).clamp(0, 100) as u8)),
        _ => {}
    }
}
