//! The one database seam of retune: the registry and the datasets store write
//! their logic and SQL once against [`Db`] / [`Conn`], and run on the embedded
//! SQLite file (WAL, `synchronous = FULL`, `BEGIN IMMEDIATE`) or on a shared
//! PostgreSQL (a pool, `LISTEN/NOTIFY`), chosen by location ([`open`]).
//!
//! - Statements use `?N` placeholders (rewritten to `$N` for PostgreSQL, whose
//!   parameters are typed from the values); integers are 64-bit in both
//!   schemas; what the dialects spell differently goes through [`Db::json_text`]
//!   and [`Db::bytewise`].
//! - Each component (the registry, the datasets store) brings its schema as
//!   versioned migrations per dialect ([`Component`]); they run at open, once,
//!   recorded in `retune_migrations`, under a lock; a schema newer than the
//!   build is refused ([`SqlError::Schema`]).
//! - Errors are classified by kind, never by message: [`SqlError::Unavailable`]
//!   (the server cannot be reached now: nothing was written) apart from SQL
//!   faults ([`SqlError::Db`]).
//! - Writers that read before they write are serialised: [`Mode::Write`] against
//!   every writer of the component, [`Conn::lock`] against writers of one key.

mod postgres_db;
mod sqlite_db;

use std::sync::Arc;
use std::time::Duration;

/// Why a database call failed; each component maps it to its own error.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// A SQL fault or a stored value of the wrong shape.
    #[error("{0}")]
    Db(String),
    /// The database cannot be reached now; nothing was written; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The database's schema is not one this build can use.
    #[error("{0}")]
    Schema(String),
    /// A location that cannot be used (a URL that does not parse, options that
    /// cannot be honoured), with the reason; never the password.
    #[error("{0}")]
    Location(String),
}

impl From<rusqlite::Error> for SqlError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(e.to_string())
    }
}

pub type R<T> = Result<T, SqlError>;

/// A parameter or a column value.
#[derive(Clone, Debug, PartialEq)]
pub enum V {
    /// A text NULL.
    Null,
    /// An integer NULL.
    NullI,
    I(i64),
    F(f64),
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
impl From<&i64> for V {
    fn from(i: &i64) -> Self {
        V::I(*i)
    }
}
impl From<f64> for V {
    fn from(f: f64) -> Self {
        V::F(f)
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
#[macro_export]
macro_rules! p {
    ($($x:expr),* $(,)?) => { &[$($crate::V::from($x)),*] };
}

/// One result row.
pub struct Row(Vec<V>);

impl Row {
    fn at(&self, k: usize) -> R<&V> {
        self.0
            .get(k)
            .ok_or_else(|| SqlError::Db(format!("column {k} missing")))
    }
    pub fn oi(&self, k: usize) -> R<Option<i64>> {
        match self.at(k)? {
            V::I(i) => Ok(Some(*i)),
            V::B(b) => Ok(Some(*b as i64)),
            V::Null | V::NullI => Ok(None),
            other => Err(SqlError::Db(format!(
                "column {k}: integer expected, found {other:?}"
            ))),
        }
    }
    pub fn i(&self, k: usize) -> R<i64> {
        self.oi(k)?
            .ok_or_else(|| SqlError::Db(format!("column {k}: unexpected NULL")))
    }
    pub fn ob(&self, k: usize) -> R<Option<bool>> {
        Ok(self.oi(k)?.map(|i| i != 0))
    }
    pub fn b(&self, k: usize) -> R<bool> {
        Ok(self.i(k)? != 0)
    }
    pub fn f(&self, k: usize) -> R<f64> {
        match self.at(k)? {
            V::F(f) => Ok(*f),
            V::I(i) => Ok(*i as f64),
            other => Err(SqlError::Db(format!(
                "column {k}: number expected, found {other:?}"
            ))),
        }
    }
    pub fn os(&self, k: usize) -> R<Option<String>> {
        match self.at(k)? {
            V::T(t) => Ok(Some(t.clone())),
            V::Null | V::NullI => Ok(None),
            other => Err(SqlError::Db(format!(
                "column {k}: text expected, found {other:?}"
            ))),
        }
    }
    pub fn s(&self, k: usize) -> R<String> {
        self.os(k)?
            .ok_or_else(|| SqlError::Db(format!("column {k}: unexpected NULL")))
    }
}

/// What a transaction is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Statements commit one by one (reads, and writes that are one statement).
    /// Never an insert whose order readers follow: those take [`Mode::Write`].
    Auto,
    /// Reads that must agree with each other.
    Snapshot,
    /// Writes that commit together; serialised against other writers only
    /// where they take [`Conn::lock`] (SQLite's single writer serialises all).
    Tx,
    /// A read-then-write: serialised against every other writer of the
    /// component that takes this mode.
    Write,
}

/// An open transaction (or, in [`Mode::Auto`], a connection). Dropped without
/// [`Conn::commit`], it rolls back.
pub trait Conn {
    fn exec(&mut self, sql: &str, p: &[V]) -> R<usize>;
    fn query(&mut self, sql: &str, p: &[V]) -> R<Vec<Row>>;
    fn commit(self: Box<Self>) -> R<()>;
    /// Serialise the rest of this transaction against others that lock `key`.
    fn lock(&mut self, key: &str) -> R<()>;
    /// Statements without parameters, `;`-separated (migrations).
    fn batch(&mut self, sql: &str) -> R<()>;

    fn opt(&mut self, sql: &str, p: &[V]) -> R<Option<Row>> {
        Ok(self.query(sql, p)?.into_iter().next())
    }
    fn one(&mut self, sql: &str, p: &[V]) -> R<Row> {
        self.opt(sql, p)?
            .ok_or_else(|| SqlError::Db("the query returned no row".into()))
    }
}

/// Parameters per multi-row `INSERT` at most: under SQLite's 32,766 and
/// PostgreSQL's 65,535, and few statements for a large batch (each is a round
/// trip and a parse on PostgreSQL).
const INSERT_PARAMS: usize = 30_000;

/// Insert `rows` (each `width` values) with multi-row `VALUES` statements, in
/// order, up to a few thousand rows a statement: `head` is `INSERT INTO t (a, b)`,
/// `tail` what follows the values (`ON CONFLICT DO NOTHING`, or empty).
/// Returns the rows inserted.
pub fn insert_many(c: &mut dyn Conn, head: &str, tail: &str, width: usize, rows: &[V]) -> R<usize> {
    if width == 0 || !rows.len().is_multiple_of(width) {
        return Err(SqlError::Db(format!(
            "{} values do not make rows of {width}",
            rows.len()
        )));
    }
    let mut n = 0;
    let per = (INSERT_PARAMS / width).clamp(1, 4096);
    for chunk in rows.chunks(width * per) {
        let mut sql = String::with_capacity(head.len() + tail.len() + chunk.len() * 6);
        sql.push_str(head);
        sql.push_str(" VALUES ");
        for r in 0..chunk.len() / width {
            if r > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for k in 0..width {
                if k > 0 {
                    sql.push_str(", ");
                }
                sql.push('?');
                sql.push_str(&(r * width + k + 1).to_string());
            }
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(tail);
        n += c.exec(&sql, chunk)?;
    }
    Ok(n)
}

/// Waits for a change another process may have made.
pub trait Watch: Send {
    /// Return when the component's tables may have changed, or after
    /// `timeout` at the latest.
    fn wait(&mut self, timeout: Duration);
}

pub trait Db: Send + Sync {
    fn begin(&self, mode: Mode) -> R<Box<dyn Conn + '_>>;
    /// A second handle for readers that must not wait for this one's writers.
    fn reader(&self) -> R<Arc<dyn Db>>;
    /// The change feed other processes' commits arrive on (the component's
    /// notify channel; SQLite polls).
    fn watcher(&self) -> R<Box<dyn Watch>>;
    /// `column`'s JSON text member `key`, as text.
    fn json_text(&self, column: &str, key: &str) -> String;
    /// `expr` compared byte by byte (ORDER BY the same in both dialects).
    fn bytewise(&self, expr: &str) -> String;
    /// Where it is, without credentials.
    fn location(&self) -> String;
}

/// One schema change: applied once, in order; append only (a released
/// migration never changes).
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// What a component brings to the shared database.
pub struct Component {
    /// Its name in `retune_migrations` and in messages ("the registry schema").
    pub name: &'static str,
    pub sqlite: &'static [Migration],
    pub postgres: &'static [Migration],
    /// The advisory lock [`Mode::Write`] takes on PostgreSQL (fixed, one per
    /// component).
    pub write_lock: i64,
    /// Connections kept at most (PostgreSQL).
    pub pool_size: u32,
    /// `application_name` when the URL gives none.
    pub application_name: &'static str,
    /// The channel its triggers notify (PostgreSQL), if readers follow it.
    pub channel: Option<&'static str>,
}

impl Component {
    /// The schema version this build writes on PostgreSQL.
    pub fn postgres_version(&self) -> i32 {
        self.postgres.last().map_or(0, |m| m.version)
    }
    /// The schema version this build writes on SQLite.
    pub fn sqlite_version(&self) -> i32 {
        self.sqlite.last().map_or(0, |m| m.version)
    }
}

/// The lock every migrator takes first, across replicas and components.
const MIGRATE_LOCK: i64 = 7310012641;

const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS retune_migrations (
    component TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL,
    applied_at BIGINT NOT NULL, PRIMARY KEY (component, version))";

/// Apply the migrations of `c` that the database lacks, in one transaction
/// the caller opened under its migration lock.
fn migrate(tx: &mut dyn Conn, c: &Component, list: &[Migration], at: &str) -> R<usize> {
    tx.exec(MIGRATIONS_TABLE, &[])?;
    let found = tx
        .one(
            "SELECT COALESCE(MAX(version), 0) FROM retune_migrations WHERE component = ?1",
            p![c.name],
        )?
        .i(0)?;
    let knows = list.last().map_or(0, |m| m.version);
    if found > i64::from(knows) {
        return Err(SqlError::Schema(format!(
            "the {} schema at {at} is version {found}; this build knows up to {knows}: run a newer retune",
            c.name
        )));
    }
    let mut n = 0;
    for m in list.iter().filter(|m| i64::from(m.version) > found) {
        tx.batch(m.sql)?;
        tx.exec(
            "INSERT INTO retune_migrations (component, version, name, applied_at)
             VALUES (?1, ?2, ?3, ?4)",
            p![
                c.name,
                i64::from(m.version),
                m.name,
                retune_config::now_ms()
            ],
        )?;
        tracing::info!(
            at,
            component = c.name,
            version = m.version,
            name = m.name,
            "schema migrated"
        );
        n += 1;
    }
    Ok(n)
}

/// Is `location` a PostgreSQL URL (else: a SQLite file)?
pub fn is_postgres_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

/// Open `component`'s database at `location` (a `postgres://` URL or a SQLite
/// file, its directory made if missing) and bring its schema up to date.
pub fn open(location: &str, component: &'static Component) -> R<Arc<dyn Db>> {
    if is_postgres_url(location) {
        Ok(Arc::new(postgres_db::Pg::open(location, component)?))
    } else {
        Ok(Arc::new(sqlite_db::Sqlite::open(
            std::path::Path::new(location),
            component,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static T: Component = Component {
        name: "test",
        sqlite: &[
            Migration {
                version: 1,
                name: "initial",
                sql: "CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER, f REAL)",
            },
            Migration {
                version: 2,
                name: "rename",
                sql: "ALTER TABLE t RENAME TO u",
            },
        ],
        postgres: &[],
        write_lock: 1,
        pool_size: 1,
        application_name: "test",
        channel: None,
    };

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("retune-sql-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d.join("x.db")
    }

    #[test]
    fn sqlite_applies_each_migration_once_and_refuses_a_newer_schema() {
        let path = tmp("migrate");
        let at = path.to_str().unwrap();
        let db = open(at, &T).unwrap();
        let mut c = db.begin(Mode::Tx).unwrap();
        insert_many(
            &mut *c,
            "INSERT INTO u (k, n, f)",
            "ON CONFLICT DO NOTHING",
            3,
            &[
                V::from("a"),
                V::I(1),
                V::F(0.5),
                V::from("b"),
                V::NullI,
                V::F(2.0),
                V::from("a"),
                V::I(9),
                V::F(9.0),
            ],
        )
        .unwrap();
        c.commit().unwrap();
        drop(db);
        // opened again: nothing applied twice, the rows are there
        let db = open(at, &T).unwrap();
        let mut c = db.begin(Mode::Auto).unwrap();
        let rows = c.query("SELECT k, n, f FROM u ORDER BY k", &[]).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].i(1).unwrap(), 1);
        assert_eq!(rows[1].oi(1).unwrap(), None);
        assert_eq!(rows[1].f(2).unwrap(), 2.0);
        let n = c
            .one(
                "SELECT COUNT(*) FROM retune_migrations WHERE component = 'test'",
                &[],
            )
            .unwrap()
            .i(0)
            .unwrap();
        assert_eq!(n, 2);
        c.exec(
            "INSERT INTO retune_migrations VALUES ('test', 7, 'from the future', 0)",
            &[],
        )
        .unwrap();
        drop(c);
        drop(db);
        match open(at, &T) {
            Err(SqlError::Schema(m)) => assert!(m.contains("version 7"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn insert_many_refuses_values_that_do_not_make_whole_rows() {
        let db = open(tmp("ragged").to_str().unwrap(), &T).unwrap();
        let mut c = db.begin(Mode::Tx).unwrap();
        let e = insert_many(&mut *c, "INSERT INTO u (k, n, f)", "", 3, &[V::I(1)]);
        assert!(matches!(e, Err(SqlError::Db(_))));
    }
}
