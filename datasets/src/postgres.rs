//! The shared store: PostgreSQL, for replicas that share one examples store.
//! The same [`DatasetStore`] as the embedded SQLite file, with the same meaning
//! (one shared test suite runs against both). A call that returned is committed.
//!
//! - Connections come from a pool (`r2d2`), each checked before use; a server
//!   that cannot be reached makes a call fail with [`DataError::Unavailable`]
//!   (HTTP 503) at once, never hang it, and the pool reconnects by itself.
//! - The schema is versioned: migrations run at open, under an advisory lock so
//!   replicas starting together apply each once; a database whose schema is newer
//!   than this build is refused ([`DataError::Schema`]).
//! - Writers that read before they write (snapshot, erasure) serialise per tenant
//!   on a transaction-scoped advisory lock: what SQLite's single writer gives.

use crate::curate::Split;
use crate::error::DataError;
use crate::record::{CapturedCompletion, Feedback, FeedbackState, ImportRow, Rating};
use crate::rows::{
    capture_candidate, feedback_state, js, labelled_split, manifest, parse, split_name,
    split_of_name, FeedbackRow,
};
use crate::snapshot::{content_id, curate, Candidate, Manifest, Origin, Policy, SnapshotRow};
use crate::sqlite::now_ms;
use crate::DatasetStore;
use crate::{Erased, Lineage, Signals};
use postgres::GenericClient;
use r2d2_postgres::PostgresConnectionManager;
use retune_config::pg::{describe, explain, pg_target, PgTarget, PgTls};
use std::collections::HashMap;
use std::time::Duration;

/// The component name in `retune_migrations` (the registry has its own).
const COMPONENT: &str = "datasets";

/// Versioned migrations, applied in order, each once, in one transaction.
/// Append only: a released migration never changes.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "initial",
    "
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
)];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Connections kept at most; the server's blocking threads share them.
const POOL_SIZE: u32 = 8;
/// How long opening the store waits to connect before it is refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a call waits for a connection before it fails as unavailable: a
/// server that is down answers its callers' retries, not their patience.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

type Pool = r2d2::Pool<PostgresConnectionManager<PgTls>>;

pub struct PgStore {
    pool: Pool,
    /// host:port/dbname, without credentials, for messages.
    at: String,
}

/// A PostgreSQL error as the store's: SQL errors are the database's fault
/// (`Db`); a connection that is gone, refused or shutting down is `Unavailable`.
pub(crate) fn pg_error(e: postgres::Error) -> DataError {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            // class 08: connection exception; 57P01-03: shutdown, cannot connect now
            if code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03") {
                DataError::Unavailable(format!("PostgreSQL: {}", db.message()))
            } else {
                DataError::Db(format!("PostgreSQL: {} ({code})", db.message()))
            }
        }
        None => DataError::Unavailable(format!("PostgreSQL: {e}")),
    }
}

impl From<postgres::Error> for DataError {
    fn from(e: postgres::Error) -> Self {
        pg_error(e)
    }
}

impl PgStore {
    /// Connect to `url` (`postgres://user:pass@host:port/db`), run the migrations
    /// this build has that the database lacks. Refused: a URL that does not parse
    /// (`Invalid`), a server that cannot be reached within a few seconds
    /// (`Unavailable`), a schema newer than this build (`Schema`).
    pub fn open(url: &str) -> Result<Self, DataError> {
        let PgTarget {
            config: mut cfg,
            tls,
            ..
        } = pg_target(url).map_err(|e| DataError::invalid("datasets.url", e.to_string()))?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(CONNECT_TIMEOUT);
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("retune");
        }
        let at = describe(&cfg);
        // one connection first, for the reason when it fails (the pool's
        // error carries the text "db error" and nothing else)
        drop(cfg.connect(tls.clone()).map_err(|e| {
            DataError::Unavailable(format!(
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
            .build(PostgresConnectionManager::new(cfg, tls))
            .map_err(|e| {
                DataError::Unavailable(format!("cannot connect to PostgreSQL at {at}: {e}"))
            })?;
        let store = Self { pool, at };
        store.migrate()?;
        Ok(store)
    }

    /// Where it is, without credentials.
    pub fn location(&self) -> &str {
        &self.at
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<PostgresConnectionManager<PgTls>>, DataError> {
        self.pool
            .get_timeout(CALL_TIMEOUT)
            .map_err(|e| DataError::Unavailable(format!("PostgreSQL at {}: {e}", self.at)))
    }

    fn migrate(&self) -> Result<(), DataError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // one migrator at a time across replicas (the key is arbitrary, fixed)
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
        if found > SCHEMA_VERSION {
            return Err(DataError::Schema(format!(
                "the datasets schema at {} is version {found}; this build knows up to \
                 {SCHEMA_VERSION}: run a newer retune",
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
            tracing::info!(at = %self.at, version, name, "datasets schema migrated");
        }
        tx.commit()?;
        Ok(())
    }
}

/// Serialise this transaction's read-then-write against others of `tenant`.
fn lock_tenant(tx: &mut impl GenericClient, tenant: &str) -> Result<(), DataError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("retune-datasets:{tenant}")],
    )?;
    Ok(())
}

fn owned(c: &mut impl GenericClient, tenant: &str, id: &str) -> Result<(), DataError> {
    c.query_opt(
        "SELECT 1 FROM ds_completions WHERE id = $1 AND tenant = $2",
        &[&id, &tenant],
    )?
    .map(|_| ())
    .ok_or_else(|| DataError::NotFound(format!("completion `{id}`")))
}

fn feedback_row(r: &postgres::Row) -> FeedbackRow {
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))
}

fn state_of(c: &mut impl GenericClient, id: &str) -> Result<FeedbackState, DataError> {
    let rows = c.query(
        "SELECT rating, correction, labels, subject_id, comment, created_at FROM ds_feedback
         WHERE completion_id = $1 ORDER BY seq",
        &[&id],
    )?;
    feedback_state(id, rows.iter().map(feedback_row))
}

impl DatasetStore for PgStore {
    fn record(&self, batch: &[CapturedCompletion]) -> Result<(), DataError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let ins = tx.prepare(
            "INSERT INTO ds_completions (id, tenant, adapter, version, base_fingerprint, request,
             params, output_text, output_ids, finish, prompt_tokens, completion_tokens, ttft_ms,
             total_ms, end_user, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
             ON CONFLICT (id) DO NOTHING",
        )?;
        for c in batch {
            tx.execute(
                &ins,
                &[
                    &c.id,
                    &c.tenant,
                    &c.adapter,
                    &c.version,
                    &c.base_fingerprint,
                    &c.request.to_string(),
                    &c.params.to_string(),
                    &c.output_text,
                    &js(&c.output_ids)?,
                    &c.finish,
                    &(c.prompt_tokens as i64),
                    &(c.completion_tokens as i64),
                    &c.ttft_ms,
                    &c.total_ms,
                    &c.user,
                    &c.created_at,
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn completion(&self, tenant: &str, id: &str) -> Result<CapturedCompletion, DataError> {
        let r = self
            .conn()?
            .query_opt(
                "SELECT id, tenant, adapter, version, base_fingerprint, request, params,
                 output_text, output_ids, finish, prompt_tokens, completion_tokens, ttft_ms,
                 total_ms, end_user, created_at
                 FROM ds_completions WHERE id = $1 AND tenant = $2",
                &[&id, &tenant],
            )?
            .ok_or_else(|| DataError::NotFound(format!("completion `{id}`")))?;
        Ok(CapturedCompletion {
            id: r.get(0),
            tenant: r.get(1),
            adapter: r.get(2),
            version: r.get(3),
            base_fingerprint: r.get(4),
            request: parse(r.get(5), "captured request")?,
            params: parse(r.get(6), "captured params")?,
            output_text: r.get(7),
            output_ids: parse(r.get(8), "captured output ids")?,
            finish: r.get(9),
            prompt_tokens: r.get::<_, i64>(10) as usize,
            completion_tokens: r.get::<_, i64>(11) as usize,
            ttft_ms: r.get(12),
            total_ms: r.get(13),
            user: r.get(14),
            created_at: r.get(15),
        })
    }

    fn add_feedback(&self, tenant: &str, fb: &Feedback) -> Result<FeedbackState, DataError> {
        fb.validate()?;
        let labels = js(&fb.labels)?;
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // the ownership check and the insert in one round trip
        let n = tx.execute(
            "INSERT INTO ds_feedback (completion_id, tenant, rating, correction, labels,
             subject_id, comment, created_at)
             SELECT $1::text, $2::text, $3::bigint, $4::text, $5::text, $6::text, $7::text, $8::bigint
             WHERE EXISTS (SELECT 1 FROM ds_completions WHERE id = $1 AND tenant = $2)",
            &[
                &fb.completion_id,
                &tenant,
                &fb.rating.map(Rating::as_i64),
                &fb.correction,
                &labels,
                &fb.subject_id,
                &fb.comment,
                &now_ms(),
            ],
        )?;
        if n == 0 {
            return Err(DataError::NotFound(format!(
                "completion `{}`",
                fb.completion_id
            )));
        }
        let st = state_of(&mut tx, &fb.completion_id)?;
        tx.commit()?;
        Ok(st)
    }

    fn feedback(&self, tenant: &str, completion_id: &str) -> Result<FeedbackState, DataError> {
        let mut conn = self.conn()?;
        owned(&mut *conn, tenant, completion_id)?;
        state_of(&mut *conn, completion_id)
    }

    fn import(
        &self,
        tenant: &str,
        adapter: &str,
        source: &str,
        rows: &[ImportRow],
    ) -> Result<usize, DataError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // one statement for the batch (arrays), not a round trip per row
        let bodies = rows
            .iter()
            .map(|r| js(&r.body))
            .collect::<Result<Vec<_>, _>>()?;
        let subjects: Vec<Option<&str>> = rows.iter().map(|r| r.subject_id.as_deref()).collect();
        let labels: Vec<Option<&str>> = rows.iter().map(|r| r.label.as_deref()).collect();
        tx.execute(
            "INSERT INTO ds_examples (tenant, adapter, body, source, subject_id, label, created_at)
             SELECT $1, $2, b, $3, s, l, $4
             FROM UNNEST($5::text[], $6::text[], $7::text[]) WITH ORDINALITY AS u(b, s, l, n)
             ORDER BY n",
            &[
                &tenant,
                &adapter,
                &source,
                &now_ms(),
                &bodies,
                &subjects,
                &labels,
            ],
        )?;
        tx.commit()?;
        Ok(rows.len())
    }

    fn snapshot(
        &self,
        tenant: &str,
        adapter: &str,
        policy: &Policy,
    ) -> Result<Manifest, DataError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        lock_tenant(&mut tx, tenant)?;
        let mut c = curate(&candidates(&mut tx, tenant, adapter)?, policy);
        assign_splits(&mut tx, tenant, adapter, policy.eval_percent, &mut c.rows)?;
        let id = content_id(tenant, adapter, policy, &c.rows);
        if let Some(r) = tx.query_opt("SELECT manifest FROM ds_snapshots WHERE id = $1", &[&id])? {
            return parse(r.get(0), "manifest");
        }
        let m = manifest(&id, tenant, adapter, policy, &c, now_ms());
        tx.execute(
            "INSERT INTO ds_snapshots (id, tenant, adapter, created_at, manifest)
             VALUES ($1, $2, $3, $4, $5)",
            &[&id, &tenant, &adapter, &m.created_at, &js(&m)?],
        )?;
        let texts = c.rows.iter().map(js).collect::<Result<Vec<_>, _>>()?;
        let seqs: Vec<i64> = (0..c.rows.len() as i64).collect();
        tx.execute(
            "INSERT INTO ds_snapshot_rows (snapshot, seq, row)
             SELECT $1, q, r FROM UNNEST($2::bigint[], $3::text[]) AS u(q, r)",
            &[&id, &seqs, &texts],
        )?;
        let (mut sseq, mut sids) = (Vec::new(), Vec::new());
        for (i, r) in c.rows.iter().enumerate() {
            for s in &r.subject_ids {
                sseq.push(i as i64);
                sids.push(s.as_str());
            }
        }
        tx.execute(
            "INSERT INTO ds_snapshot_subjects (snapshot, seq, subject_id)
             SELECT $1, q, s FROM UNNEST($2::bigint[], $3::text[]) AS u(q, s)",
            &[&id, &sseq, &sids],
        )?;
        tx.commit()?;
        Ok(m)
    }

    fn manifest(&self, tenant: &str, id: &str) -> Result<Manifest, DataError> {
        let r = self
            .conn()?
            .query_opt(
                "SELECT manifest FROM ds_snapshots WHERE id = $1 AND tenant = $2",
                &[&id, &tenant],
            )?
            .ok_or_else(|| DataError::NotFound(format!("snapshot `{id}`")))?;
        parse(r.get(0), "manifest")
    }

    fn snapshots(&self, tenant: &str, adapter: Option<&str>) -> Result<Vec<Manifest>, DataError> {
        let rows = self.conn()?.query(
            "SELECT manifest FROM ds_snapshots WHERE tenant = $1
             AND ($2::text IS NULL OR adapter = $2) ORDER BY created_at, id COLLATE \"C\"",
            &[&tenant, &adapter],
        )?;
        rows.iter().map(|r| parse(r.get(0), "manifest")).collect()
    }

    fn set_suspects(
        &self,
        tenant: &str,
        id: &str,
        suspects: &crate::snapshot::Suspects,
    ) -> Result<Manifest, DataError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let r = tx
            .query_opt(
                "SELECT manifest FROM ds_snapshots WHERE id = $1 AND tenant = $2 FOR UPDATE",
                &[&id, &tenant],
            )?
            .ok_or_else(|| DataError::NotFound(format!("snapshot `{id}`")))?;
        let mut m: Manifest = parse(r.get(0), "manifest")?;
        m.suspects = Some(suspects.clone());
        tx.execute(
            "UPDATE ds_snapshots SET manifest = $1 WHERE id = $2",
            &[&js(&m)?, &id],
        )?;
        tx.commit()?;
        Ok(m)
    }

    fn snapshot_rows(&self, tenant: &str, id: &str) -> Result<Vec<SnapshotRow>, DataError> {
        self.manifest(tenant, id)?;
        let rows = self.conn()?.query(
            "SELECT row FROM ds_snapshot_rows WHERE snapshot = $1 ORDER BY seq",
            &[&id],
        )?;
        rows.iter()
            .map(|r| parse(r.get(0), "snapshot row"))
            .collect()
    }

    fn lineage(&self, tenant: &str, subject: &str) -> Result<Lineage, DataError> {
        let rows = self.conn()?.query(
            "SELECT DISTINCT s.id COLLATE \"C\" FROM ds_snapshot_subjects j
             JOIN ds_snapshots s ON s.id = j.snapshot
             WHERE s.tenant = $1 AND j.subject_id = $2 ORDER BY 1",
            &[&tenant, &subject],
        )?;
        Ok(Lineage {
            snapshots: rows.iter().map(|r| r.get(0)).collect(),
        })
    }

    fn erase(&self, tenant: &str, subject: &str) -> Result<Erased, DataError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        lock_tenant(&mut tx, tenant)?;
        let touched: Vec<(String, i64)> = tx
            .query(
                "SELECT j.snapshot, j.seq FROM ds_snapshot_subjects j
                 JOIN ds_snapshots s ON s.id = j.snapshot
                 WHERE s.tenant = $1 AND j.subject_id = $2",
                &[&tenant, &subject],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut snapshots: Vec<String> = touched.iter().map(|t| t.0.clone()).collect();
        snapshots.sort();
        snapshots.dedup();
        for (snap, seq) in &touched {
            // the split assignment is keyed by a hash of the subject's text: it goes too
            if let Some(r) = tx.query_opt(
                "SELECT row FROM ds_snapshot_rows WHERE snapshot = $1 AND seq = $2",
                &[snap, seq],
            )? {
                let row: SnapshotRow = parse(r.get(0), "snapshot row")?;
                tx.execute(
                    "DELETE FROM ds_split_assignments WHERE tenant = $1 AND input_key = $2",
                    &[&tenant, &row.input_key],
                )?;
            }
            tx.execute(
                "DELETE FROM ds_snapshot_rows WHERE snapshot = $1 AND seq = $2",
                &[snap, seq],
            )?;
            tx.execute(
                "DELETE FROM ds_snapshot_subjects WHERE snapshot = $1 AND seq = $2",
                &[snap, seq],
            )?;
        }
        for snap in &snapshots {
            let n = touched.iter().filter(|t| &t.0 == snap).count();
            let r = tx.query_one("SELECT manifest FROM ds_snapshots WHERE id = $1", &[snap])?;
            let mut m: Manifest = parse(r.get(0), "manifest")?;
            m.erased += n;
            tx.execute(
                "UPDATE ds_snapshots SET manifest = $1 WHERE id = $2",
                &[&js(&m)?, snap],
            )?;
        }
        let completions: Vec<String> = tx
            .query(
                "SELECT DISTINCT completion_id FROM ds_feedback WHERE tenant = $1 AND subject_id = $2",
                &[&tenant, &subject],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut feedback = 0;
        for c in &completions {
            feedback += tx.execute(
                "DELETE FROM ds_feedback WHERE completion_id = $1 AND tenant = $2",
                &[c, &tenant],
            )? as usize;
            tx.execute(
                "DELETE FROM ds_completions WHERE id = $1 AND tenant = $2",
                &[c, &tenant],
            )?;
        }
        let examples = tx.execute(
            "DELETE FROM ds_examples WHERE tenant = $1 AND subject_id = $2",
            &[&tenant, &subject],
        )? as usize;
        tx.commit()?;
        Ok(Erased {
            completions: completions.len(),
            feedback,
            examples,
            snapshot_rows: touched.len(),
            snapshots,
        })
    }

    fn purge_before(&self, tenant: &str, before_ms: i64) -> Result<usize, DataError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM ds_feedback WHERE tenant = $1 AND completion_id IN
             (SELECT id FROM ds_completions WHERE tenant = $1 AND created_at < $2)",
            &[&tenant, &before_ms],
        )?;
        let n = tx.execute(
            "DELETE FROM ds_completions WHERE tenant = $1 AND created_at < $2",
            &[&tenant, &before_ms],
        )?;
        tx.commit()?;
        Ok(n as usize)
    }

    fn candidates_since(
        &self,
        tenant: &str,
        adapter: &str,
        since_ms: i64,
        include_positive: bool,
    ) -> Result<usize, DataError> {
        let mut conn = self.conn()?;
        let imports: i64 = conn
            .query_one(
                "SELECT COUNT(*) FROM ds_examples WHERE tenant = $1 AND adapter = $2 AND created_at > $3",
                &[&tenant, &adapter, &since_ms],
            )?
            .get(0);
        // a completion counts once, when its latest feedback arrived since
        let captures: i64 = conn
            .query_one(
                "SELECT COUNT(*) FROM ds_completions c WHERE c.tenant = $1 AND c.adapter = $2
                 AND (SELECT MAX(f.created_at) FROM ds_feedback f WHERE f.completion_id = c.id) > $3
                 AND (EXISTS (SELECT 1 FROM ds_feedback f
                              WHERE f.completion_id = c.id AND f.correction IS NOT NULL)
                      OR ($4 AND (SELECT f.rating FROM ds_feedback f
                                  WHERE f.completion_id = c.id AND f.rating IS NOT NULL
                                  ORDER BY f.seq DESC LIMIT 1) = 1))",
                &[&tenant, &adapter, &since_ms, &include_positive],
            )?
            .get(0);
        Ok((imports + captures) as usize)
    }

    fn signals(
        &self,
        tenant: &str,
        adapter: &str,
        version: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Signals, DataError> {
        let rows = self.conn()?.query(
            "SELECT c.finish = 'error',
                    (SELECT f.rating FROM ds_feedback f
                     WHERE f.completion_id = c.id AND f.rating IS NOT NULL
                     ORDER BY f.seq DESC LIMIT 1) = -1,
                    EXISTS (SELECT 1 FROM ds_feedback f
                            WHERE f.completion_id = c.id AND f.correction IS NOT NULL)
             FROM ds_completions c WHERE c.tenant = $1 AND c.adapter = $2 AND c.version = $3
             AND c.created_at >= $4 AND c.created_at < $5",
            &[&tenant, &adapter, &version, &from_ms, &to_ms],
        )?;
        let mut s = Signals::default();
        for r in &rows {
            let err: bool = r.get(0);
            let down = r.get::<_, Option<bool>>(1).unwrap_or(false);
            s.count(err, down, r.get(2));
        }
        Ok(s)
    }

    fn adapters(&self) -> Result<Vec<(String, String)>, DataError> {
        let rows = self.conn()?.query(
            "SELECT tenant, adapter FROM (SELECT tenant, adapter FROM ds_examples
             UNION SELECT tenant, adapter FROM ds_completions WHERE adapter IS NOT NULL) u
             ORDER BY tenant COLLATE \"C\", adapter COLLATE \"C\"",
            &[],
        )?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}

/// The side of each row, as in the SQLite store: the one its input was first
/// given, else a new (stratified for labelled inputs) assignment.
fn assign_splits(
    tx: &mut postgres::Transaction<'_>,
    tenant: &str,
    adapter: &str,
    eval_percent: u8,
    rows: &mut [SnapshotRow],
) -> Result<(), DataError> {
    let p = i64::from(eval_percent);
    // every assignment of this (tenant, adapter, percent) in one read; the
    // decisions are made in order in memory, exactly as the row-at-a-time
    // SQLite store makes them, and the new ones written in one statement
    let mut known: HashMap<String, Split> = HashMap::new();
    let mut per_label: HashMap<String, (i64, i64)> = HashMap::new();
    for r in tx.query(
        "SELECT input_key, label, split FROM ds_split_assignments
         WHERE tenant = $1 AND adapter = $2 AND eval_percent = $3",
        &[&tenant, &adapter, &p],
    )? {
        let split = split_of_name(r.get(2));
        if let Some(label) = r.get::<_, Option<String>>(1) {
            let e = per_label.entry(label).or_default();
            e.0 += 1;
            e.1 += (split == Split::Eval) as i64;
        }
        known.insert(r.get(0), split);
    }
    let (mut keys, mut labels, mut splits) = (Vec::new(), Vec::new(), Vec::new());
    for r in rows.iter_mut() {
        r.split = match known.get(&r.input_key) {
            Some(s) => *s,
            None => {
                let split = match &r.label {
                    Some(label) => {
                        let e = per_label.entry(label.clone()).or_default();
                        let s = labelled_split(e.0, e.1, p);
                        e.0 += 1;
                        e.1 += (s == Split::Eval) as i64;
                        s
                    }
                    None => r.split, // the hash split curation gave it
                };
                known.insert(r.input_key.clone(), split);
                keys.push(r.input_key.clone());
                labels.push(r.label.clone());
                splits.push(split_name(split));
                split
            }
        };
    }
    tx.execute(
        "INSERT INTO ds_split_assignments (tenant, adapter, eval_percent, input_key, label, split)
         SELECT $1, $2, $3, k, l, s FROM UNNEST($4::text[], $5::text[], $6::text[]) AS u(k, l, s)",
        &[&tenant, &adapter, &p, &keys, &labels, &splits],
    )?;
    Ok(())
}

/// Imports, then captures with their feedback (one query for all feedback of
/// the adapter, not one per completion), in the SQLite store's order.
fn candidates(
    tx: &mut postgres::Transaction<'_>,
    tenant: &str,
    adapter: &str,
) -> Result<Vec<Candidate>, DataError> {
    let mut out = Vec::new();
    for r in tx.query(
        "SELECT id, body, subject_id, label FROM ds_examples
         WHERE tenant = $1 AND adapter = $2 ORDER BY id",
        &[&tenant, &adapter],
    )? {
        out.push(Candidate {
            body: parse(r.get(1), "example")?,
            origin: Origin::Import { id: r.get(0) },
            subject_id: r.get(2),
            label: r.get(3),
        });
    }
    let mut feedback: HashMap<String, Vec<FeedbackRow>> = HashMap::new();
    for r in tx.query(
        "SELECT f.rating, f.correction, f.labels, f.subject_id, f.comment, f.created_at,
                f.completion_id
         FROM ds_feedback f JOIN ds_completions c ON c.id = f.completion_id
         WHERE c.tenant = $1 AND c.adapter = $2 ORDER BY f.seq",
        &[&tenant, &adapter],
    )? {
        feedback.entry(r.get(6)).or_default().push(feedback_row(&r));
    }
    for r in tx.query(
        "SELECT id, request, output_text FROM ds_completions
         WHERE tenant = $1 AND adapter = $2 ORDER BY created_at, id COLLATE \"C\"",
        &[&tenant, &adapter],
    )? {
        let id: String = r.get(0);
        let fb = feedback_state(&id, feedback.remove(&id).unwrap_or_default())?;
        out.push(capture_candidate(id, r.get(1), r.get(2), &fb)?);
    }
    Ok(out)
}
