//! The examples store's tables, per dialect, as versioned migrations on the one
//! SQL layer ([`retune_sql`]).

use retune_sql::{Component, Migration};

/// SQLite: the first schema as it shipped, then the names PostgreSQL has
/// always used (`ds_` tables beside the registry's, `end_user` for the
/// reserved word), so that one set of statements serves both.
const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: "
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, adapter TEXT, version TEXT,
    base_fingerprint TEXT NOT NULL, request TEXT NOT NULL, params TEXT NOT NULL,
    output_text TEXT NOT NULL, output_ids TEXT NOT NULL, finish TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    ttft_ms REAL NOT NULL, total_ms REAL NOT NULL, user TEXT, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS completions_by_adapter ON completions (tenant, adapter, created_at);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, completion_id TEXT NOT NULL, tenant TEXT NOT NULL,
    rating INTEGER, correction TEXT, labels TEXT NOT NULL, subject_id TEXT, comment TEXT,
    created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_by_completion ON feedback (completion_id, seq);
CREATE INDEX IF NOT EXISTS feedback_by_subject ON feedback (tenant, subject_id);
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, adapter TEXT NOT NULL,
    body TEXT NOT NULL, source TEXT NOT NULL, subject_id TEXT, label TEXT, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS examples_by_adapter ON examples (tenant, adapter);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, adapter TEXT NOT NULL, created_at INTEGER NOT NULL,
    manifest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshot_rows (
    snapshot TEXT NOT NULL, seq INTEGER NOT NULL, row TEXT NOT NULL, PRIMARY KEY (snapshot, seq));
CREATE TABLE IF NOT EXISTS snapshot_subjects (
    snapshot TEXT NOT NULL, seq INTEGER NOT NULL, subject_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS snapshot_subjects_by_subject ON snapshot_subjects (subject_id);
CREATE TABLE IF NOT EXISTS split_assignments (
    tenant TEXT NOT NULL, adapter TEXT NOT NULL, eval_percent INTEGER NOT NULL,
    input_key TEXT NOT NULL, label TEXT, split TEXT NOT NULL,
    PRIMARY KEY (tenant, adapter, eval_percent, input_key));
",
    },
    Migration {
        version: 2,
        name: "the names of the PostgreSQL schema",
        sql: "
ALTER TABLE completions RENAME TO ds_completions;
ALTER TABLE ds_completions RENAME COLUMN user TO end_user;
ALTER TABLE feedback RENAME TO ds_feedback;
ALTER TABLE examples RENAME TO ds_examples;
CREATE INDEX IF NOT EXISTS ds_examples_by_subject ON ds_examples (tenant, subject_id);
ALTER TABLE snapshots RENAME TO ds_snapshots;
ALTER TABLE snapshot_rows RENAME TO ds_snapshot_rows;
ALTER TABLE snapshot_subjects RENAME TO ds_snapshot_subjects;
ALTER TABLE split_assignments RENAME TO ds_split_assignments;
",
    },
];

/// PostgreSQL. Append only: a released migration never changes.
const POSTGRES: &[Migration] = &[Migration {
    version: 1,
    name: "initial",
    sql: "
CREATE TABLE ds_completions (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, adapter TEXT, version TEXT,
    base_fingerprint TEXT NOT NULL, request TEXT NOT NULL, params TEXT NOT NULL,
    output_text TEXT NOT NULL, output_ids TEXT NOT NULL, finish TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL,
    ttft_ms DOUBLE PRECISION NOT NULL, total_ms DOUBLE PRECISION NOT NULL,
    end_user TEXT, created_at BIGINT NOT NULL);
CREATE INDEX ds_completions_by_adapter ON ds_completions (tenant, adapter, created_at);
CREATE TABLE ds_feedback (
    seq BIGSERIAL PRIMARY KEY, completion_id TEXT NOT NULL, tenant TEXT NOT NULL,
    rating BIGINT, correction TEXT, labels TEXT NOT NULL, subject_id TEXT, comment TEXT,
    created_at BIGINT NOT NULL);
CREATE INDEX ds_feedback_by_completion ON ds_feedback (completion_id, seq);
CREATE INDEX ds_feedback_by_subject ON ds_feedback (tenant, subject_id);
CREATE TABLE ds_examples (
    id BIGSERIAL PRIMARY KEY, tenant TEXT NOT NULL, adapter TEXT NOT NULL,
    body TEXT NOT NULL, source TEXT NOT NULL, subject_id TEXT, label TEXT,
    created_at BIGINT NOT NULL);
CREATE INDEX ds_examples_by_adapter ON ds_examples (tenant, adapter);
CREATE INDEX ds_examples_by_subject ON ds_examples (tenant, subject_id);
CREATE TABLE ds_snapshots (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, adapter TEXT NOT NULL,
    created_at BIGINT NOT NULL, manifest TEXT NOT NULL);
CREATE TABLE ds_snapshot_rows (
    snapshot TEXT NOT NULL, seq BIGINT NOT NULL, row TEXT NOT NULL,
    PRIMARY KEY (snapshot, seq));
CREATE TABLE ds_snapshot_subjects (
    snapshot TEXT NOT NULL, seq BIGINT NOT NULL, subject_id TEXT NOT NULL);
CREATE INDEX ds_snapshot_subjects_by_subject ON ds_snapshot_subjects (subject_id);
CREATE TABLE ds_split_assignments (
    tenant TEXT NOT NULL, adapter TEXT NOT NULL, eval_percent BIGINT NOT NULL,
    input_key TEXT NOT NULL, label TEXT, split TEXT NOT NULL,
    PRIMARY KEY (tenant, adapter, eval_percent, input_key));
",
}];

/// The PostgreSQL schema version this build writes.
pub const PG_SCHEMA_VERSION: i32 = POSTGRES[POSTGRES.len() - 1].version;

pub(crate) static DATASETS: Component = Component {
    name: "datasets",
    sqlite: SQLITE,
    postgres: POSTGRES,
    // the registry's is 7310012642
    write_lock: 7310012643,
    // the server's blocking threads share them
    pool_size: 8,
    application_name: "retune",
    channel: None,
};
