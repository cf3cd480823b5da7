//! The registry's schema on the one SQL layer ([`retune_sql`]): its tables per
//! dialect as versioned migrations, its write lock and its change channel. The
//! registry's logic and SQL are written once against [`Db`].
//!
//! Writers are serialised in both dialects: SQLite by its single writer,
//! PostgreSQL by the transaction-scoped advisory lock every [`Mode::Write`]
//! transaction takes first. So a read-then-write (a compare-and-set promotion,
//! a lease check) is atomic, and journal sequence numbers commit in order —
//! what a reader that follows the journal by its sequence relies on.

use crate::error::RegistryError;
pub use retune_sql::is_postgres_url;
pub(crate) use retune_sql::{p, Conn, Db, Mode, Row};
use retune_sql::{Component, Migration, SqlError};
use std::sync::Arc;

impl From<SqlError> for RegistryError {
    fn from(e: SqlError) -> Self {
        match e {
            SqlError::Db(m) => Self::Db(m),
            SqlError::Unavailable(m) => Self::Unavailable(m),
            SqlError::Schema(m) => Self::Schema(m),
            SqlError::Location(m) => Self::Invalid(m),
        }
    }
}

const SQLITE: &[Migration] = &[Migration {
    version: 1,
    name: "initial",
    sql: "
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
",
}];

/// Append only: a released migration never changes.
const POSTGRES: &[Migration] = &[Migration {
    version: 1,
    name: "initial",
    sql: "
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
}];

/// The registry schema version this build writes on PostgreSQL.
pub const PG_SCHEMA_VERSION: i32 = POSTGRES[POSTGRES.len() - 1].version;

/// The registry's tables, its lock (the datasets store's is another) and the
/// channel every journal insert notifies (at commit).
pub(crate) static REGISTRY: Component = Component {
    name: "registry",
    sqlite: SQLITE,
    postgres: POSTGRES,
    write_lock: 7310012642,
    pool_size: 4,
    application_name: "retune-registry",
    channel: Some("retune_registry"),
};

/// Open the registry database at `location`: a `postgres://` URL or a SQLite file.
pub(crate) fn open(location: &str) -> Result<Arc<dyn Db>, RegistryError> {
    Ok(retune_sql::open(location, &REGISTRY)?)
}
