//! The registry's database seam: one trait, two implementations — the embedded
//! SQLite file (WAL, `BEGIN IMMEDIATE`) and PostgreSQL (a pool, versioned
//! migrations, `LISTEN/NOTIFY`). The registry's logic and SQL are written once
//! against [`Db`]: statements use `?N` placeholders (rewritten to `$N` for
//! PostgreSQL), integers are 64-bit in both schemas, and what the dialects spell
//! differently goes through [`Db::json_text`].
//!
//! Writers are serialised in both: SQLite by its single writer, PostgreSQL by a
//! transaction-scoped advisory lock every write transaction takes first. So a
//! read-then-write (a compare-and-set promotion, a lease check) is atomic, and
//! journal sequence numbers commit in order — what a reader that follows the
//! journal by its sequence relies on.

use crate::error::RegistryError;
use postgres::types::{IsNull, ToSql, Type};
use r2d2_postgres::PostgresConnectionManager;
use retune_config::now_ms;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type R<T> = Result<T, RegistryError>;

/// A parameter or a column value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum V {
    /// A text NULL.
    Null,
    /// An integer NULL.
    NullI,
    I(i64),
    B(bool),
    T(String),
}

impl From<&str> for V {
    fn from(s: &str) -> Self {
        V::T(s.to_string())
    }
}
impl From<&String> for V {
    fn from(s: &String) -> Self {
        V::T(s.clone())
    }
}
impl From<String> for V {
    fn from(s: String) -> Self {
        V::T(s)
    }
}
impl From<i64> for V {
    fn from(i: i64) -> Self {
        V::I(i)
    }
}
impl From<bool> for V {
    fn from(b: bool) -> Self {
        V::B(b)
    }
}
impl From<Option<&str>> for V {
    fn from(s: Option<&str>) -> Self {
        s.map_or(V::Null, V::from)
    }
}
impl From<&Option<String>> for V {
    fn from(s: &Option<String>) -> Self {
        s.as_deref().into()
    }
}
impl From<Option<i64>> for V {
    fn from(i: Option<i64>) -> Self {
        i.map_or(V::NullI, V::I)
    }
}

/// `p![a, b]`: statement parameters.
macro_rules! p {
    ($($x:expr),* $(,)?) => { &[$($crate::sql::V::from($x)),*] };
}
pub(crate) use p;

/// One result row.
pub(crate) struct Row(Vec<V>);

impl Row {
    fn at(&self, k: usize) -> R<&V> {
        self.0
            .get(k)
            .ok_or_else(|| RegistryError::Db(format!("column {k} missing")))
    }
    pub fn oi(&self, k: usize) -> R<Option<i64>> {
        match self.at(k)? {
            V::I(i) => Ok(Some(*i)),
            V::B(b) => Ok(Some(*b as i64)),
            V::Null | V::NullI => Ok(None),
            V::T(t) => Err(RegistryError::Db(format!(
                "column {k}: integer expected, found text `{t}`"
            ))),
        }
    }
    pub fn i(&self, k: usize) -> R<i64> {
        self.oi(k)?
            .ok_or_else(|| RegistryError::Db(format!("column {k}: unexpected NULL")))
    }
    pub fn b(&self, k: usize) -> R<bool> {
        Ok(self.i(k)? != 0)
    }
    pub fn os(&self, k: usize) -> R<Option<String>> {
        match self.at(k)? {
            V::T(t) => Ok(Some(t.clone())),
            V::Null | V::NullI => Ok(None),
            other => Err(RegistryError::Db(format!(
                "column {k}: text expected, found {other:?}"
            ))),
        }
    }
    pub fn s(&self, k: usize) -> R<String> {
        self.os(k)?
            .ok_or_else(|| RegistryError::Db(format!("column {k}: unexpected NULL")))
    }
}

/// What a transaction is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Statements commit one by one (reads, and writes that are one statement).
    /// Never a journal insert: those take [`Mode::Write`], so that on PostgreSQL
    /// journal sequence numbers commit in order.
    Auto,
    /// Reads that must agree with each other.
    Snapshot,
    /// A read-then-write: serialised against every other writer.
    Write,
}

/// An open transaction (or, in [`Mode::Auto`], a connection). Dropped without
/// [`Conn::commit`], it rolls back.
pub(crate) trait Conn {
    fn exec(&mut self, sql: &str, p: &[V]) -> R<usize>;
    fn query(&mut self, sql: &str, p: &[V]) -> R<Vec<Row>>;
    fn commit(self: Box<Self>) -> R<()>;

    fn opt(&mut self, sql: &str, p: &[V]) -> R<Option<Row>> {
        Ok(self.query(sql, p)?.into_iter().next())
    }
    fn one(&mut self, sql: &str, p: &[V]) -> R<Row> {
        self.opt(sql, p)?
            .ok_or_else(|| RegistryError::Db("the query returned no row".into()))
    }
}

/// Waits for a change another process may have made.
pub(crate) trait Watch: Send {
    /// Return when the journal may have grown, or after `timeout` at the latest.
    fn wait(&mut self, timeout: Duration);
}

pub(crate) trait Db: Send + Sync {
    fn begin(&self, mode: Mode) -> R<Box<dyn Conn + '_>>;
    /// A second handle for readers that must not wait for this one's writers.
    fn reader(&self) -> R<Arc<dyn Db>>;
    /// The change feed other processes' commits arrive on.
    fn watcher(&self) -> R<Box<dyn Watch>>;
    /// `column`'s JSON text member `key`, as text.
    fn json_text(&self, column: &str, key: &str) -> String;
    /// Where it is, without credentials.
    fn location(&self) -> String;
}

/// Is `location` a PostgreSQL URL (else: a SQLite file)?
pub fn is_postgres_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

/// Open the registry database at `location`: a `postgres://` URL or a SQLite file.
pub(crate) fn open(location: &str) -> R<Arc<dyn Db>> {
    if is_postgres_url(location) {
        Ok(Arc::new(Pg::open(location)?))
    } else {
        Ok(Arc::new(Sqlite::open(Path::new(location))?))
    }
}

// ---- SQLite ----

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS versions (
    tenant TEXT NOT NULL, name TEXT NOT NULL, id TEXT NOT NULL,
    created_at INTEGER NOT NULL, source TEXT NOT NULL, parent TEXT,
    base_fingerprint TEXT NOT NULL, size INTEGER NOT NULL, metadata TEXT NOT NULL,
    retired INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, name, id));
CREATE TABLE IF NOT EXISTS aliases (
    tenant TEXT NOT NULL, name TEXT NOT NULL, alias TEXT NOT NULL,
    version TEXT NOT NULL, percent INTEGER,
    PRIMARY KEY (tenant, name, alias));
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL,
    tenant TEXT NOT NULL, name TEXT NOT NULL, event TEXT NOT NULL,
    version TEXT, previous TEXT, actor TEXT NOT NULL, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS journal_by_event ON journal (event);
CREATE TABLE IF NOT EXISTS served (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY (tenant, name, version));
CREATE TABLE IF NOT EXISTS leases (
    tenant TEXT NOT NULL, name TEXT NOT NULL, holder TEXT NOT NULL, expires_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, name));
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, holder TEXT NOT NULL,
    started_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, finished_at INTEGER,
    status TEXT NOT NULL, snapshot TEXT, version TEXT, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_by_adapter ON runs (tenant, name, started_at);
CREATE TABLE IF NOT EXISTS watches (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, previous TEXT,
    mode TEXT NOT NULL, percent INTEGER, started_at INTEGER NOT NULL, promote_seq INTEGER NOT NULL,
    status TEXT NOT NULL, verdict TEXT NOT NULL, updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, name, version));
";

pub(crate) struct Sqlite {
    conn: Mutex<rusqlite::Connection>,
    path: PathBuf,
}

impl Sqlite {
    fn connect(path: &Path) -> R<rusqlite::Connection> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(conn)
    }

    fn open(path: &Path) -> R<Self> {
        let conn = Self::connect(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SQLITE_SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }
}

impl rusqlite::ToSql for V {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match self {
            V::Null | V::NullI => ToSqlOutput::Owned(Value::Null),
            V::I(i) => ToSqlOutput::Owned(Value::Integer(*i)),
            V::B(b) => ToSqlOutput::Owned(Value::Integer(*b as i64)),
            V::T(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
        })
    }
}

struct SqliteTx<'a> {
    conn: std::sync::MutexGuard<'a, rusqlite::Connection>,
    open: bool,
}

impl Conn for SqliteTx<'_> {
    fn exec(&mut self, sql: &str, p: &[V]) -> R<usize> {
        let mut st = self.conn.prepare_cached(sql)?;
        Ok(st.execute(rusqlite::params_from_iter(p.iter()))?)
    }

    fn query(&mut self, sql: &str, p: &[V]) -> R<Vec<Row>> {
        use rusqlite::types::ValueRef;
        let mut st = self.conn.prepare_cached(sql)?;
        let n = st.column_count();
        let mut rows = st.query(rusqlite::params_from_iter(p.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(n);
            for k in 0..n {
                row.push(match r.get_ref(k)? {
                    ValueRef::Null => V::Null,
                    ValueRef::Integer(i) => V::I(i),
                    ValueRef::Text(t) => V::T(String::from_utf8_lossy(t).into_owned()),
                    other => {
                        return Err(RegistryError::Db(format!(
                            "column {k}: unexpected {:?}",
                            other.data_type()
                        )))
                    }
                });
            }
            out.push(Row(row));
        }
        Ok(out)
    }

    fn commit(mut self: Box<Self>) -> R<()> {
        if self.open {
            self.conn.execute_batch("COMMIT")?;
            self.open = false;
        }
        Ok(())
    }
}

impl Drop for SqliteTx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

impl Db for Sqlite {
    fn begin(&self, mode: Mode) -> R<Box<dyn Conn + '_>> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let begin = match mode {
            Mode::Auto => None,
            Mode::Snapshot => Some("BEGIN"),
            Mode::Write => Some("BEGIN IMMEDIATE"),
        };
        if let Some(b) = begin {
            conn.execute_batch(b)?;
        }
        Ok(Box::new(SqliteTx {
            conn,
            open: begin.is_some(),
        }))
    }

    fn reader(&self) -> R<Arc<dyn Db>> {
        Ok(Arc::new(Sqlite {
            conn: Mutex::new(Self::connect(&self.path)?),
            path: self.path.clone(),
        }))
    }

    fn watcher(&self) -> R<Box<dyn Watch>> {
        Ok(Box::new(Sleep))
    }

    fn json_text(&self, column: &str, key: &str) -> String {
        format!("json_extract({column}, '$.{key}')")
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

/// SQLite has no change feed: readers poll.
struct Sleep;

impl Watch for Sleep {
    fn wait(&mut self, timeout: Duration) {
        std::thread::sleep(timeout);
    }
}

// ---- PostgreSQL ----

/// The component name in `retune_migrations` (the datasets store has its own).
const COMPONENT: &str = "registry";

/// The channel every journal insert notifies (at commit).
const CHANNEL: &str = "retune_registry";

/// Versioned migrations, applied in order, each once, in one transaction.
/// Append only: a released migration never changes.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "initial",
    "
CREATE TABLE versions (
    tenant TEXT NOT NULL, name TEXT NOT NULL, id TEXT NOT NULL,
    created_at BIGINT NOT NULL, source TEXT NOT NULL, parent TEXT,
    base_fingerprint TEXT NOT NULL, size BIGINT NOT NULL, metadata TEXT NOT NULL,
    retired BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, name, id));
CREATE TABLE aliases (
    tenant TEXT NOT NULL, name TEXT NOT NULL, alias TEXT NOT NULL,
    version TEXT NOT NULL, percent BIGINT,
    PRIMARY KEY (tenant, name, alias));
CREATE TABLE journal (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at BIGINT NOT NULL,
    tenant TEXT NOT NULL, name TEXT NOT NULL, event TEXT NOT NULL,
    version TEXT, previous TEXT, actor TEXT NOT NULL, reason TEXT NOT NULL);
CREATE INDEX journal_by_event ON journal (event);
CREATE INDEX journal_by_adapter ON journal (tenant, name, seq);
CREATE TABLE served (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, at BIGINT NOT NULL,
    PRIMARY KEY (tenant, name, version));
CREATE TABLE leases (
    tenant TEXT NOT NULL, name TEXT NOT NULL, holder TEXT NOT NULL, expires_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, name));
CREATE TABLE runs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, holder TEXT NOT NULL,
    started_at BIGINT NOT NULL, updated_at BIGINT NOT NULL, finished_at BIGINT,
    status TEXT NOT NULL, snapshot TEXT, version TEXT, detail TEXT NOT NULL);
CREATE INDEX runs_by_adapter ON runs (tenant, name, started_at);
CREATE TABLE watches (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, previous TEXT,
    mode TEXT NOT NULL, percent BIGINT, started_at BIGINT NOT NULL, promote_seq BIGINT NOT NULL,
    status TEXT NOT NULL, verdict TEXT NOT NULL, updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, name, version));
CREATE FUNCTION retune_registry_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('retune_registry', ''); RETURN NULL; END $$;
CREATE TRIGGER journal_notify AFTER INSERT ON journal
    FOR EACH STATEMENT EXECUTE FUNCTION retune_registry_notify();
",
)];

/// The registry schema version this build writes.
pub const PG_SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The advisory lock every write transaction takes first (arbitrary, fixed;
/// the datasets store's migrator uses 7310012641).
const WRITE_LOCK: i64 = 7310012642;

const POOL_SIZE: u32 = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A call waits this long for a connection, then fails as unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

use retune_config::pg::{describe, explain, pg_target, PgTarget, PgTls};

type Pool = r2d2::Pool<PostgresConnectionManager<PgTls>>;

pub(crate) struct Pg {
    pool: Pool,
    cfg: postgres::Config,
    tls: PgTls,
    at: String,
}

impl From<postgres::Error> for RegistryError {
    fn from(e: postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                // class 08: connection exception; 57P01-03: shutdown, cannot connect now
                if code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03") {
                    RegistryError::Unavailable(format!("PostgreSQL: {}", db.message()))
                } else {
                    RegistryError::Db(format!("PostgreSQL: {} ({code})", db.message()))
                }
            }
            None => RegistryError::Unavailable(format!("PostgreSQL: {e}")),
        }
    }
}

impl Pg {
    fn open(url: &str) -> R<Self> {
        let PgTarget {
            config: mut cfg,
            tls,
            ..
        } = pg_target(url).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(CONNECT_TIMEOUT);
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("retune-registry");
        }
        let at = describe(&cfg);
        // one connection first, for the reason when it fails (the pool's
        // error carries the text "db error" and nothing else)
        drop(cfg.connect(tls.clone()).map_err(|e| {
            RegistryError::Unavailable(format!(
                "cannot connect to PostgreSQL at {at}: {}",
                explain(&e)
            ))
        })?);
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(1))
            .connection_timeout(CONNECT_TIMEOUT)
            .test_on_check_out(true)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build(PostgresConnectionManager::new(cfg.clone(), tls.clone()))
            .map_err(|e| {
                RegistryError::Unavailable(format!("cannot connect to PostgreSQL at {at}: {e}"))
            })?;
        let db = Self { pool, cfg, tls, at };
        db.migrate()?;
        Ok(db)
    }

    fn conn(&self) -> R<r2d2::PooledConnection<PostgresConnectionManager<PgTls>>> {
        self.pool
            .get_timeout(CALL_TIMEOUT)
            .map_err(|e| RegistryError::Unavailable(format!("PostgreSQL at {}: {e}", self.at)))
    }

    fn migrate(&self) -> R<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // one migrator at a time across replicas and components
        tx.execute("SELECT pg_advisory_xact_lock(7310012641)", &[])?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS retune_migrations (
                component TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL,
                applied_at BIGINT NOT NULL, PRIMARY KEY (component, version))",
        )?;
        let found: i32 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM retune_migrations WHERE component = $1",
                &[&COMPONENT],
            )?
            .get(0);
        if found > PG_SCHEMA_VERSION {
            return Err(RegistryError::Schema(format!(
                "the registry schema at {} is version {found}; this build knows up to \
                 {PG_SCHEMA_VERSION}: run a newer retune",
                self.at
            )));
        }
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
            tx.batch_execute(sql)?;
            tx.execute(
                "INSERT INTO retune_migrations (component, version, name, applied_at)
                 VALUES ($1, $2, $3, $4)",
                &[&COMPONENT, version, name, &now_ms()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// `?N` placeholders as PostgreSQL's `$N` (outside string literals).
fn dollars(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

impl ToSql for V {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            V::Null | V::NullI => Ok(IsNull::Yes),
            V::I(i) => i.to_sql(ty, out),
            V::B(b) => b.to_sql(ty, out),
            V::T(t) => t.as_str().to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::INT8 | Type::BOOL | Type::TEXT)
    }

    postgres::types::to_sql_checked!();
}

fn pg_type(v: &V) -> Type {
    match v {
        V::Null | V::T(_) => Type::TEXT,
        V::NullI | V::I(_) => Type::INT8,
        V::B(_) => Type::BOOL,
    }
}

struct PgTx {
    conn: r2d2::PooledConnection<PostgresConnectionManager<PgTls>>,
    open: bool,
}

impl PgTx {
    fn params(p: &[V]) -> Vec<(&(dyn ToSql + Sync), Type)> {
        p.iter()
            .map(|v| (v as &(dyn ToSql + Sync), pg_type(v)))
            .collect()
    }
}

impl Conn for PgTx {
    fn exec(&mut self, sql: &str, p: &[V]) -> R<usize> {
        Ok(self.conn.execute_typed(&dollars(sql), &Self::params(p))? as usize)
    }

    fn query(&mut self, sql: &str, p: &[V]) -> R<Vec<Row>> {
        let rows = self.conn.query_typed(&dollars(sql), &Self::params(p))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut row = Vec::with_capacity(r.len());
            for (k, col) in r.columns().iter().enumerate() {
                let v = match *col.type_() {
                    Type::INT8 => r.try_get::<_, Option<i64>>(k)?.map_or(V::NullI, V::I),
                    Type::INT4 => r
                        .try_get::<_, Option<i32>>(k)?
                        .map_or(V::NullI, |i| V::I(i.into())),
                    Type::BOOL => r.try_get::<_, Option<bool>>(k)?.map_or(V::NullI, V::B),
                    Type::TEXT | Type::VARCHAR => {
                        r.try_get::<_, Option<String>>(k)?.map_or(V::Null, V::T)
                    }
                    ref other => {
                        return Err(RegistryError::Db(format!(
                            "column {k}: unexpected type {other}"
                        )))
                    }
                };
                row.push(v);
            }
            out.push(Row(row));
        }
        Ok(out)
    }

    fn commit(mut self: Box<Self>) -> R<()> {
        if self.open {
            self.open = false;
            self.conn.batch_execute("COMMIT")?;
        }
        Ok(())
    }
}

impl Drop for PgTx {
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.batch_execute("ROLLBACK");
        }
    }
}

impl Db for Pg {
    fn begin(&self, mode: Mode) -> R<Box<dyn Conn + '_>> {
        let mut conn = self.conn()?;
        let begin = match mode {
            Mode::Auto => None,
            Mode::Snapshot => Some("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".to_string()),
            Mode::Write => Some(format!("BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})")),
        };
        if let Some(b) = &begin {
            conn.batch_execute(b)?;
        }
        Ok(Box::new(PgTx {
            conn,
            open: begin.is_some(),
        }))
    }

    fn reader(&self) -> R<Arc<dyn Db>> {
        // the pool's other connections already read beside the writers
        Ok(Arc::new(Pg {
            pool: self.pool.clone(),
            cfg: self.cfg.clone(),
            tls: self.tls.clone(),
            at: self.at.clone(),
        }))
    }

    fn watcher(&self) -> R<Box<dyn Watch>> {
        let mut w = Listen {
            cfg: self.cfg.clone(),
            tls: self.tls.clone(),
            client: None,
        };
        w.connect()?;
        Ok(Box::new(w))
    }

    fn json_text(&self, column: &str, key: &str) -> String {
        format!("({column}::jsonb ->> '{key}')")
    }

    fn location(&self) -> String {
        self.at.clone()
    }
}

/// `LISTEN` on a connection of its own; reconnects after the server comes back
/// (the caller reads everything again after every wait, so a notification
/// lost while disconnected costs one poll interval, never a change).
struct Listen {
    cfg: postgres::Config,
    tls: PgTls,
    client: Option<postgres::Client>,
}

impl Listen {
    fn connect(&mut self) -> R<()> {
        let mut c = self.cfg.connect(self.tls.clone())?;
        c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
        self.client = Some(c);
        Ok(())
    }
}

impl Watch for Listen {
    fn wait(&mut self, timeout: Duration) {
        use postgres::fallible_iterator::FallibleIterator;
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            // back soon either way: the refresh after a reconnect reads what
            // was committed while nobody listened
            if self.connect().is_err() {
                std::thread::sleep(timeout.min(Duration::from_millis(500)));
            }
            return;
        }
        let Some(c) = self.client.as_mut() else {
            return;
        };
        let got = c
            .notifications()
            .timeout_iter(timeout)
            .next()
            .map(|n| n.is_some());
        match got {
            Ok(true) => {
                // one refresh reads them all
                let mut n = c.notifications();
                while let Ok(Some(_)) = n.iter().next() {}
            }
            Ok(false) => {}
            Err(_) => {
                self.client = None;
                std::thread::sleep(timeout.min(Duration::from_millis(200)));
            }
        }
    }
}
