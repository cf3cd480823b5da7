//! Adapter registry: tenants' adapters, immutable content-addressed versions,
//! aliases (`live`, `previous`, `canary`) changed by compare-and-set, and an
//! append-only journal, in the embedded SQLite file (WAL) or a shared PostgreSQL
//! database ([`crate::sql`]). Every state change and its journal entry commit in
//! one write transaction, and writers serialise, so concurrent processes (replicas,
//! trainers) never interleave a read-then-write.

use crate::error::RegistryError;
use crate::sql::{p, Conn, Db, Mode};
use crate::states::JournalEvent;
use crate::store::{content_id_of, BlobStore, FILES};
use retune_adapters::names::{check_name, store_key, AdapterRef, Via};
use retune_adapters::peft::{load_peft, BaseShapes, LoadLimits};
use retune_adapters::pool::AdapterSource;
use retune_adapters::AdapterError;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, Weak};

type R<T> = Result<T, RegistryError>;

pub(crate) use crate::rows::{
    journal, last_seq, pick_alias, row_to_version, servable, set_alias, set_state, state_of,
    VERSION_COLS,
};
pub use crate::rows::{AdapterState, VersionInfo};

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct JournalEntry {
    pub seq: i64,
    pub at: i64,
    pub event: JournalEvent,
    pub version: Option<String>,
    pub previous: Option<String>,
    pub actor: String,
    pub reason: String,
}

/// An in-memory copy of the aliases (the request path's [`crate::AliasCache`]),
/// refreshed after every change made through this process's registry.
pub trait Listener: Send + Sync {
    /// Read the current state; `Ok(true)` when something changed.
    fn refresh(&self) -> R<bool>;
}

/// An alias change, for in-process subscribers (the server's hot-swap).
#[derive(Clone, Debug, PartialEq)]
pub struct AliasChange {
    pub tenant: String,
    pub name: String,
    pub seq: i64,
    pub state: AdapterState,
}

/// What a promotion expects the current live version to be.
#[derive(Clone, Debug, PartialEq)]
pub enum Expect {
    Any,
    NoLive,
    Version(String),
}

/// A version to register.
pub struct NewVersion<'a> {
    pub tenant: &'a str,
    pub name: &'a str,
    /// Directory with `adapter_config.json` and `adapter_model.safetensors`.
    pub dir: &'a Path,
    /// `upload`, `path:...`, `trainer:<run>`.
    pub source: &'a str,
    pub parent: Option<&'a str>,
    pub metadata: serde_json::Value,
    /// Fingerprint of the base the adapter was made for, when the uploader states one.
    pub claimed_base: Option<&'a str>,
    pub actor: &'a str,
}

/// The served base model: shapes adapters are validated against and its fingerprint.
#[derive(Clone, Debug)]
pub struct ServedBase {
    pub shapes: BaseShapes,
    pub fingerprint: String,
}

pub(crate) enum Staged {
    Existing(VersionInfo),
    New { id: String, size: u64 },
}

pub struct Registry {
    pub(crate) db: Arc<dyn Db>,
    pub(crate) store: Arc<dyn BlobStore>,
    pub(crate) max_version_bytes: u64,
    pub(crate) limits: LoadLimits,
    pub(crate) subscribers: Mutex<Vec<Sender<AliasChange>>>,
    /// In-memory alias caches, refreshed before a change made here returns.
    pub(crate) listeners: Mutex<Vec<Weak<dyn Listener>>>,
}

pub(crate) use retune_config::now_ms;

impl Registry {
    /// The embedded registry: a SQLite file.
    pub fn open(db_path: &Path, store: Arc<dyn BlobStore>, max_version_bytes: u64) -> R<Self> {
        Self::open_at(&db_path.to_string_lossy(), store, max_version_bytes)
    }

    /// The registry at `location`: a `postgres://` URL (shared by replicas:
    /// migrations run here; unreachable or a newer schema is refused) or a
    /// SQLite file.
    pub fn open_at(location: &str, store: Arc<dyn BlobStore>, max_version_bytes: u64) -> R<Self> {
        Ok(Self {
            db: crate::sql::open(location)?,
            store,
            max_version_bytes,
            limits: LoadLimits {
                max_file_bytes: max_version_bytes,
                ..LoadLimits::default()
            },
            subscribers: Mutex::new(Vec::new()),
            listeners: Mutex::new(Vec::new()),
        })
    }

    /// What a version must satisfy to be registered (the served backend's limits:
    /// a device's adapter slots hold ranks up to its `max_rank`).
    pub fn with_limits(mut self, limits: LoadLimits) -> Self {
        self.limits = LoadLimits {
            max_file_bytes: self.max_version_bytes,
            ..limits
        };
        self
    }

    /// Check a registered version against the current serving limits (before a
    /// promotion or canary: it may have been registered under other limits).
    pub fn check_servable(
        &self,
        tenant: &str,
        name: &str,
        version: &str,
        base: &ServedBase,
    ) -> R<()> {
        let dir = {
            servable(&mut *self.tx(Mode::Auto)?, tenant, name, version)?;
            self.store.local_dir(&store_key(tenant, name, version))?
        };
        load_peft(&dir, &base.shapes, &self.limits)
            .map(|_| ())
            .map_err(|e| RegistryError::Invalid(format!("{version} cannot be served here: {e}")))
    }

    /// Stored objects the version store refused (content id mismatch).
    pub fn store_refused(&self) -> u64 {
        self.store.refused()
    }

    /// Where the database is (a file, or host:port/db without credentials).
    pub fn location(&self) -> String {
        self.db.location()
    }

    /// Keep `cache` current with every change made through this registry.
    pub fn listen(&self, cache: Weak<dyn Listener>) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(cache);
    }

    /// After a commit: in-memory caches read the change before the caller returns.
    pub(crate) fn changed(&self) {
        let live: Vec<Arc<dyn Listener>> = {
            let mut l = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            l.retain(|w| w.strong_count() > 0);
            l.iter().filter_map(Weak::upgrade).collect()
        };
        for c in live {
            if let Err(e) = c.refresh() {
                eprintln!(
                    "retune: alias cache refresh after a change failed (the poll retries): {e}"
                );
            }
        }
    }

    pub(crate) fn tx(&self, mode: Mode) -> R<Box<dyn Conn + '_>> {
        Ok(self.db.begin(mode)?)
    }

    /// Register a version (idempotent: the same files give the same id).
    pub fn register(&self, v: NewVersion<'_>, base: &ServedBase) -> R<VersionInfo> {
        let (id, size) = match self.stage(&v, base)? {
            Staged::Existing(existing) => {
                // used just now: gc's idle window keeps it for the caller
                self.mark_served(&[(
                    existing.tenant.clone(),
                    existing.name.clone(),
                    existing.id.clone(),
                )])?;
                return Ok(existing);
            }
            Staged::New { id, size } => (id, size),
        };
        let info = VersionInfo {
            id: id.clone(),
            tenant: v.tenant.into(),
            name: v.name.into(),
            created_at: now_ms(),
            source: v.source.into(),
            parent: v.parent.map(str::to_string),
            base_fingerprint: base.fingerprint.clone(),
            size,
            metadata: v.metadata,
            retired: false,
        };
        let mut tx = self.tx(Mode::Write)?;
        tx.exec(
            "INSERT INTO versions (tenant, name, id, created_at, source, parent, base_fingerprint, size, metadata)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING",
            p![&info.tenant, &info.name, &info.id, info.created_at, &info.source, &info.parent, &info.base_fingerprint, info.size as i64, info.metadata.to_string()],
        )?;
        journal(
            &mut *tx,
            v.tenant,
            v.name,
            JournalEvent::Register,
            Some(&id),
            None,
            v.actor,
            v.source,
        )?;
        tx.commit()?;
        // gc of an older row with the same content may have removed these files
        // after `stage` found them in place: gc deletes files inside its write
        // transaction, so once this row is committed a missing directory means
        // exactly that, and the files are stored again
        let key = store_key(v.tenant, v.name, &id);
        if self.store.local_dir(&key).is_err() {
            let paths: Vec<(&str, PathBuf)> = FILES.iter().map(|f| (*f, v.dir.join(f))).collect();
            let paths: Vec<(&str, &Path)> = paths.iter().map(|(f, p)| (*f, p.as_path())).collect();
            self.store.put(&key, &paths)?;
        }
        self.changed();
        Ok(info)
    }

    /// Read, store and validate a version's files; `Existing` when the same
    /// content is already registered. Files stored here and never referenced by a
    /// row (a crash before the row commits) are harmless: content-addressed, unserved.
    pub(crate) fn stage(&self, v: &NewVersion<'_>, base: &ServedBase) -> R<Staged> {
        check_name("tenant", v.tenant)?;
        check_name("adapter name", v.name)?;
        if let Some(claimed) = v.claimed_base {
            if claimed != base.fingerprint {
                return Err(RegistryError::Invalid(format!(
                    "adapter was made for base `{claimed}`, this server serves `{}`",
                    base.fingerprint
                )));
            }
        }
        let mut files: Vec<(&str, PathBuf)> = Vec::new();
        let mut size = 0u64;
        for f in FILES {
            let p = v.dir.join(f);
            // messages name the file, never the server's directories
            let meta = std::fs::symlink_metadata(&p)
                .map_err(|_| RegistryError::NotFound(format!("the version's {f}")))?;
            if !meta.file_type().is_file() {
                return Err(RegistryError::Forbidden(format!(
                    "{f} is not a regular file"
                )));
            }
            size += meta.len();
            if size > self.max_version_bytes {
                return Err(RegistryError::TooLarge(format!(
                    "version exceeds {} bytes",
                    self.max_version_bytes
                )));
            }
            files.push((f, p));
        }
        // validated where it lies, before the store holds it (the weights are
        // mapped, not read into memory)
        if let Err(e) = load_peft(v.dir, &base.shapes, &self.limits) {
            let mut msg = e.to_string();
            for d in [
                v.dir.to_path_buf(),
                v.dir.canonicalize().unwrap_or_default(),
            ] {
                let d = format!("{}/", d.display());
                if d.len() > 1 {
                    msg = msg.replace(&d, "");
                }
            }
            return Err(RegistryError::Invalid(msg));
        }
        let paths: Vec<(&str, &Path)> = files.iter().map(|(f, p)| (*f, p.as_path())).collect();
        let id = content_id_of(&paths)
            .map_err(|e| RegistryError::Io(format!("hashing the version: {e}")))?;
        if let Ok(existing) = self.version(v.tenant, v.name, &id) {
            return Ok(Staged::Existing(existing));
        }
        if let Some(parent) = v.parent {
            self.version(v.tenant, v.name, parent)?;
        }
        let key = store_key(v.tenant, v.name, &id);
        self.store.put(&key, &paths)?;
        self.write_packed(&key, &id, base);
        Ok(Staged::New { id, size })
    }

    /// Validate the stored copy once and keep its compute form, so that loads
    /// map it instead of parsing and checking the PEFT files. Best effort: a
    /// version without one loads the slow way and writes it then.
    pub(crate) fn write_packed(&self, key: &str, id: &str, base: &ServedBase) {
        let built = self.store.local_dir(key).and_then(|dir| {
            let a = retune_adapters::packed::load_verified(&dir, id, &base.shapes, &self.limits)
                .map_err(|e| RegistryError::Invalid(e.to_string()))?;
            if !retune_adapters::packed::packable(&a) {
                return Ok(());
            }
            let bytes = retune_adapters::packed::pack_dir(&a, &dir, id, &base.shapes)
                .map_err(|e| RegistryError::Io(e.to_string()))?;
            self.store
                .put_derived(key, retune_adapters::packed::PACKED_FILE, &bytes)
        });
        if let Err(e) = built {
            eprintln!("retune: compute form of {key} not written (its loads stay slow): {e}");
        }
    }

    pub fn version(&self, tenant: &str, name: &str, id: &str) -> R<VersionInfo> {
        self.tx(Mode::Auto)?
            .opt(
                &format!("SELECT {VERSION_COLS} FROM versions WHERE tenant = ?1 AND name = ?2 AND id = ?3"),
                p![tenant, name, id],
            )?
            .map(|r| row_to_version(&r))
            .transpose()?
            .ok_or_else(|| RegistryError::NotFound(format!("version {tenant}/{name}@{id}")))
    }

    pub fn versions(&self, tenant: &str, name: &str) -> R<Vec<VersionInfo>> {
        let v = self
            .tx(Mode::Auto)?
            .query(
                &format!("SELECT {VERSION_COLS} FROM versions WHERE tenant = ?1 AND name = ?2 ORDER BY created_at, id"),
                p![tenant, name],
            )?
            .iter()
            .map(row_to_version)
            .collect::<R<Vec<_>>>()?;
        if v.is_empty() {
            return Err(RegistryError::NotFound(format!("adapter {tenant}/{name}")));
        }
        Ok(v)
    }

    /// Every adapter (optionally of one tenant) with its aliases.
    pub fn list(&self, tenant: Option<&str>) -> R<Vec<(String, String, AdapterState)>> {
        let mut tx = self.tx(Mode::Snapshot)?;
        let names: Vec<(String, String)> = tx
            .query(
                "SELECT DISTINCT tenant, name FROM versions WHERE (?1 IS NULL OR tenant = ?1) ORDER BY tenant, name",
                p![tenant],
            )?
            .iter()
            .map(|r| Ok((r.s(0)?, r.s(1)?)))
            .collect::<R<_>>()?;
        names
            .into_iter()
            .map(|(t, n)| {
                let st = state_of(&mut *tx, &t, &n)?;
                Ok((t, n, st))
            })
            .collect()
    }

    pub fn state(&self, tenant: &str, name: &str) -> R<AdapterState> {
        state_of(&mut *self.tx(Mode::Snapshot)?, tenant, name)
    }

    /// Resolve a client's model name for `tenant`: `name` routes to the canary when
    /// `bucket` (0..100, stable per request) falls in its share, else to `live`;
    /// `name@version` pins a version. Unknown, retired and not-live are all `NotFound`.
    pub fn resolve(&self, tenant: &str, model: &str, bucket: u8) -> R<AdapterRef> {
        let not_found = || RegistryError::NotFound(format!("model `{model}`"));
        let (name, pinned) = match model.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (model, None),
        };
        if check_name("adapter name", name).is_err() {
            return Err(not_found());
        }
        let mut conn = self.tx(Mode::Snapshot)?;
        let (version, via) = match pinned {
            Some(v) => {
                servable(&mut *conn, tenant, name, v).map_err(|e| match e {
                    RegistryError::NotFound(_) | RegistryError::Rejected(_) => not_found(),
                    other => other,
                })?;
                (v.to_string(), Via::Pinned)
            }
            None => {
                let st = state_of(&mut *conn, tenant, name).map_err(|e| match e {
                    RegistryError::NotFound(_) => not_found(),
                    other => other,
                })?;
                pick_alias(&st, bucket).ok_or_else(not_found)?
            }
        };
        AdapterRef::new(tenant, name, &version, via).map_err(|_| not_found())
    }

    /// The files of a version that may be served (not retired, files present).
    pub fn servable_dir(&self, adapter: &AdapterRef) -> R<PathBuf> {
        servable(
            &mut *self.tx(Mode::Auto)?,
            adapter.tenant(),
            adapter.name(),
            adapter.version(),
        )?;
        self.store.local_dir(&adapter.key())
    }

    pub fn journal(&self, tenant: &str, name: &str) -> R<Vec<JournalEntry>> {
        self.tx(Mode::Auto)?
            .query(
                "SELECT seq, at, event, version, previous, actor, reason FROM journal WHERE tenant = ?1 AND name = ?2 ORDER BY seq",
                p![tenant, name],
            )?
            .iter()
            .map(|r| {
                Ok(JournalEntry {
                    seq: r.i(0)?,
                    at: r.i(1)?,
                    event: r.s(2)?.parse()?,
                    version: r.os(3)?,
                    previous: r.os(4)?,
                    actor: r.s(5)?,
                    reason: r.s(6)?,
                })
            })
            .collect()
    }

    /// Highest journal sequence number: other processes poll it to learn of changes.
    pub fn change_counter(&self) -> R<i64> {
        last_seq(&mut *self.tx(Mode::Auto)?)
    }

    /// In-process feed of alias changes.
    pub fn subscribe(&self) -> Receiver<AliasChange> {
        let (tx, rx) = channel();
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    pub(crate) fn notify(&self, tenant: &str, name: &str, state: &AdapterState) {
        self.changed();
        let seq = self.change_counter().unwrap_or(0);
        let change = AliasChange {
            tenant: tenant.into(),
            name: name.into(),
            seq,
            state: state.clone(),
        };
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|s| s.send(change.clone()).is_ok());
    }

    /// Run one alias change: `BEGIN IMMEDIATE`, `f`, read the new state, commit,
    /// then tell subscribers.
    pub(crate) fn mutate(
        &self,
        tenant: &str,
        name: &str,
        f: impl FnOnce(&mut dyn Conn) -> R<()>,
    ) -> R<AdapterState> {
        let state = {
            let mut tx = self.tx(Mode::Write)?;
            f(&mut *tx)?;
            let st = state_of(&mut *tx, tenant, name)?;
            tx.commit()?;
            st
        };
        self.notify(tenant, name, &state);
        Ok(state)
    }
}

/// The pool loads a resolved version's files straight from the store: the
/// registry was asked once, when the request resolved its adapter.
impl AdapterSource for Registry {
    fn content_addressed(&self) -> bool {
        true
    }

    fn store_packed(&self, adapter: &AdapterRef, bytes: &[u8]) -> Result<(), AdapterError> {
        self.store
            .put_derived(&adapter.key(), retune_adapters::packed::PACKED_FILE, bytes)
            .map_err(|e| AdapterError::Config {
                field: "adapter".into(),
                reason: e.to_string(),
            })
    }

    fn locate(&self, adapter: &AdapterRef) -> Result<PathBuf, AdapterError> {
        self.store.local_dir(&adapter.key()).map_err(|e| match e {
            RegistryError::Unavailable(why) => AdapterError::Unavailable(why),
            other => AdapterError::Config {
                field: "adapter".into(),
                reason: other.to_string(),
            },
        })
    }
}
