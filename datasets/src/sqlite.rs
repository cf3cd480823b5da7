//! The embedded store: one SQLite file (WAL, `synchronous = FULL`: a call that
//! returned is on disk) beside, not inside, the adapter registry's database.

use crate::error::DataError;
use crate::record::{CapturedCompletion, Feedback, FeedbackState, ImportRow, Rating};
use crate::rows::{
    capture_candidate, feedback_state, js, labelled_split, manifest, parse, split_name, FeedbackRow,
};
use crate::snapshot::{content_id, curate, Candidate, Manifest, Origin, Policy, SnapshotRow};
use crate::DatasetStore;
use crate::{Erased, Lineage, Signals};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::sync::Mutex;

const SCHEMA: &str = "
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
";

pub struct SqliteStore {
    db: Mutex<Connection>,
}

pub(crate) use retune_config::now_ms;

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, DataError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| DataError::Db(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            db: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn owned(conn: &Connection, tenant: &str, id: &str) -> Result<(), DataError> {
    let found: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM completions WHERE id = ?1 AND tenant = ?2",
            params![id, tenant],
            |r| r.get(0),
        )
        .optional()?;
    found
        .map(|_| ())
        .ok_or_else(|| DataError::NotFound(format!("completion `{id}`")))
}

fn state_of(conn: &Connection, id: &str) -> Result<FeedbackState, DataError> {
    let mut q = conn.prepare_cached(
        "SELECT rating, correction, labels, subject_id, comment, created_at FROM feedback
         WHERE completion_id = ?1 ORDER BY seq",
    )?;
    let rows = q
        .query_map(params![id], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<Result<Vec<FeedbackRow>, _>>()?;
    feedback_state(id, rows)
}

impl DatasetStore for SqliteStore {
    fn record(&self, batch: &[CapturedCompletion]) -> Result<(), DataError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO completions (id, tenant, adapter, version, base_fingerprint, request,
                 params, output_text, output_ids, finish, prompt_tokens, completion_tokens, ttft_ms,
                 total_ms, user, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?;
            for c in batch {
                let ids = serde_json::to_string(&c.output_ids)
                    .map_err(|e| DataError::Db(e.to_string()))?;
                ins.execute(params![
                    c.id,
                    c.tenant,
                    c.adapter,
                    c.version,
                    c.base_fingerprint,
                    c.request.to_string(),
                    c.params.to_string(),
                    c.output_text,
                    ids,
                    c.finish,
                    c.prompt_tokens as i64,
                    c.completion_tokens as i64,
                    c.ttft_ms,
                    c.total_ms,
                    c.user,
                    c.created_at
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn completion(&self, tenant: &str, id: &str) -> Result<CapturedCompletion, DataError> {
        let conn = self.conn();
        let json = |s: String| {
            serde_json::from_str::<serde_json::Value>(&s)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
        };
        conn.query_row(
            "SELECT id, tenant, adapter, version, base_fingerprint, request, params, output_text,
             output_ids, finish, prompt_tokens, completion_tokens, ttft_ms, total_ms, user, created_at
             FROM completions WHERE id = ?1 AND tenant = ?2",
            params![id, tenant],
            |r| {
                let ids: String = r.get(8)?;
                Ok(CapturedCompletion {
                    id: r.get(0)?,
                    tenant: r.get(1)?,
                    adapter: r.get(2)?,
                    version: r.get(3)?,
                    base_fingerprint: r.get(4)?,
                    request: json(r.get(5)?)?,
                    params: json(r.get(6)?)?,
                    output_text: r.get(7)?,
                    output_ids: serde_json::from_str(&ids)
                        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
                    finish: r.get(9)?,
                    prompt_tokens: r.get::<_, i64>(10)? as usize,
                    completion_tokens: r.get::<_, i64>(11)? as usize,
                    ttft_ms: r.get(12)?,
                    total_ms: r.get(13)?,
                    user: r.get(14)?,
                    created_at: r.get(15)?,
                })
            },
        )
        .optional()?
        .ok_or_else(|| DataError::NotFound(format!("completion `{id}`")))
    }

    fn add_feedback(&self, tenant: &str, fb: &Feedback) -> Result<FeedbackState, DataError> {
        fb.validate()?;
        let labels = serde_json::to_string(&fb.labels).map_err(|e| DataError::Db(e.to_string()))?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        owned(&tx, tenant, &fb.completion_id)?;
        tx.execute(
            "INSERT INTO feedback (completion_id, tenant, rating, correction, labels, subject_id, comment, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                fb.completion_id,
                tenant,
                fb.rating.map(Rating::as_i64),
                fb.correction,
                labels,
                fb.subject_id,
                fb.comment,
                now_ms()
            ],
        )?;
        let st = state_of(&tx, &fb.completion_id)?;
        tx.commit()?;
        Ok(st)
    }

    fn feedback(&self, tenant: &str, completion_id: &str) -> Result<FeedbackState, DataError> {
        let conn = self.conn();
        owned(&conn, tenant, completion_id)?;
        state_of(&conn, completion_id)
    }
    /// Import examples for `tenant/adapter` (one transaction); returns how many.
    fn import(
        &self,
        tenant: &str,
        adapter: &str,
        source: &str,
        rows: &[ImportRow],
    ) -> Result<usize, DataError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO examples (tenant, adapter, body, source, subject_id, label, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let at = now_ms();
            for r in rows {
                ins.execute(params![
                    tenant,
                    adapter,
                    js(&r.body)?,
                    source,
                    r.subject_id,
                    r.label,
                    at
                ])?;
            }
        }
        tx.commit()?;
        Ok(rows.len())
    }

    /// Curate the current examples of `tenant/adapter` into a snapshot (the same
    /// content gives the same id, stored once).
    fn snapshot(
        &self,
        tenant: &str,
        adapter: &str,
        policy: &Policy,
    ) -> Result<Manifest, DataError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut c = curate(&candidates(&tx, tenant, adapter)?, policy);
        assign_splits(&tx, tenant, adapter, policy.eval_percent, &mut c.rows)?;
        let id = content_id(tenant, adapter, policy, &c.rows);
        if let Some(m) = tx
            .query_row(
                "SELECT manifest FROM snapshots WHERE id = ?1",
                params![id],
                |r| r.get::<_, String>(0),
            )
            .optional()?
        {
            return parse(&m, "manifest");
        }
        let m = manifest(&id, tenant, adapter, policy, &c, now_ms());
        tx.execute(
            "INSERT INTO snapshots (id, tenant, adapter, created_at, manifest) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, tenant, adapter, m.created_at, js(&m)?],
        )?;
        {
            let mut row = tx.prepare_cached(
                "INSERT INTO snapshot_rows (snapshot, seq, row) VALUES (?1, ?2, ?3)",
            )?;
            let mut subj = tx.prepare_cached(
                "INSERT INTO snapshot_subjects (snapshot, seq, subject_id) VALUES (?1, ?2, ?3)",
            )?;
            for (i, r) in c.rows.iter().enumerate() {
                row.execute(params![id, i as i64, js(r)?])?;
                for s in &r.subject_ids {
                    subj.execute(params![id, i as i64, s])?;
                }
            }
        }
        tx.commit()?;
        Ok(m)
    }

    fn manifest(&self, tenant: &str, id: &str) -> Result<Manifest, DataError> {
        let m: Option<String> = self
            .conn()
            .query_row(
                "SELECT manifest FROM snapshots WHERE id = ?1 AND tenant = ?2",
                params![id, tenant],
                |r| r.get(0),
            )
            .optional()?;
        parse(
            &m.ok_or_else(|| DataError::NotFound(format!("snapshot `{id}`")))?,
            "manifest",
        )
    }

    /// Manifests of a tenant's snapshots (of one adapter when given), oldest first.
    fn snapshots(&self, tenant: &str, adapter: Option<&str>) -> Result<Vec<Manifest>, DataError> {
        let conn = self.conn();
        let mut q = conn.prepare(
            "SELECT manifest FROM snapshots WHERE tenant = ?1 AND (?2 IS NULL OR adapter = ?2) ORDER BY created_at, id",
        )?;
        let rows = q.query_map(params![tenant, adapter], |r| r.get::<_, String>(0))?;
        rows.map(|m| parse(&m?, "manifest")).collect()
    }

    fn set_suspects(
        &self,
        tenant: &str,
        id: &str,
        suspects: &crate::snapshot::Suspects,
    ) -> Result<Manifest, DataError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let m: Option<String> = tx
            .query_row(
                "SELECT manifest FROM snapshots WHERE id = ?1 AND tenant = ?2",
                params![id, tenant],
                |r| r.get(0),
            )
            .optional()?;
        let mut m: Manifest = parse(
            &m.ok_or_else(|| DataError::NotFound(format!("snapshot `{id}`")))?,
            "manifest",
        )?;
        m.suspects = Some(suspects.clone());
        tx.execute(
            "UPDATE snapshots SET manifest = ?1 WHERE id = ?2",
            params![js(&m)?, id],
        )?;
        tx.commit()?;
        Ok(m)
    }

    /// The rows of a snapshot, in order.
    fn snapshot_rows(&self, tenant: &str, id: &str) -> Result<Vec<SnapshotRow>, DataError> {
        self.manifest(tenant, id)?;
        let conn = self.conn();
        let mut q =
            conn.prepare("SELECT row FROM snapshot_rows WHERE snapshot = ?1 ORDER BY seq")?;
        let rows = q.query_map(params![id], |r| r.get::<_, String>(0))?;
        rows.map(|r| parse(&r?, "snapshot row")).collect()
    }

    /// Snapshots of `tenant` with a row about `subject`.
    fn lineage(&self, tenant: &str, subject: &str) -> Result<Lineage, DataError> {
        let conn = self.conn();
        let mut q = conn.prepare(
            "SELECT DISTINCT s.id FROM snapshot_subjects j JOIN snapshots s ON s.id = j.snapshot
             WHERE s.tenant = ?1 AND j.subject_id = ?2 ORDER BY s.id",
        )?;
        let snapshots = q
            .query_map(params![tenant, subject], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Lineage { snapshots })
    }

    /// Delete every captured call, feedback row, example and snapshot row about
    /// `subject` (one transaction). Returns what went and the snapshots it touched.
    fn purge_before(&self, tenant: &str, before_ms: i64) -> Result<usize, DataError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM feedback WHERE tenant = ?1 AND completion_id IN
             (SELECT id FROM completions WHERE tenant = ?1 AND created_at < ?2)",
            params![tenant, before_ms],
        )?;
        let n = tx.execute(
            "DELETE FROM completions WHERE tenant = ?1 AND created_at < ?2",
            params![tenant, before_ms],
        )?;
        tx.commit()?;
        Ok(n)
    }

    fn candidates_since(
        &self,
        tenant: &str,
        adapter: &str,
        since_ms: i64,
        include_positive: bool,
    ) -> Result<usize, DataError> {
        let conn = self.conn();
        let imports: i64 = conn.query_row(
            "SELECT COUNT(*) FROM examples WHERE tenant = ?1 AND adapter = ?2 AND created_at > ?3",
            params![tenant, adapter, since_ms],
            |r| r.get(0),
        )?;
        // a completion counts once, when its latest feedback arrived since
        let captures: i64 = conn.query_row(
            "SELECT COUNT(*) FROM completions c WHERE c.tenant = ?1 AND c.adapter = ?2
             AND (SELECT MAX(f.created_at) FROM feedback f WHERE f.completion_id = c.id) > ?3
             AND (EXISTS (SELECT 1 FROM feedback f WHERE f.completion_id = c.id AND f.correction IS NOT NULL)
                  OR (?4 AND (SELECT f.rating FROM feedback f WHERE f.completion_id = c.id AND f.rating IS NOT NULL
                              ORDER BY f.seq DESC LIMIT 1) = 1))",
            params![tenant, adapter, since_ms, include_positive],
            |r| r.get(0),
        )?;
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
        let conn = self.conn();
        let mut q = conn.prepare_cached(
            "SELECT c.finish = 'error',
                    (SELECT f.rating FROM feedback f WHERE f.completion_id = c.id AND f.rating IS NOT NULL
                     ORDER BY f.seq DESC LIMIT 1) = -1,
                    EXISTS (SELECT 1 FROM feedback f WHERE f.completion_id = c.id AND f.correction IS NOT NULL)
             FROM completions c WHERE c.tenant = ?1 AND c.adapter = ?2 AND c.version = ?3
             AND c.created_at >= ?4 AND c.created_at < ?5",
        )?;
        let rows = q.query_map(params![tenant, adapter, version, from_ms, to_ms], |r| {
            Ok((
                r.get::<_, bool>(0)?,
                r.get::<_, Option<bool>>(1)?.unwrap_or(false),
                r.get::<_, bool>(2)?,
            ))
        })?;
        let mut s = Signals::default();
        for row in rows {
            let (err, down, corrected) = row?;
            s.count(err, down, corrected);
        }
        Ok(s)
    }

    fn adapters(&self) -> Result<Vec<(String, String)>, DataError> {
        let conn = self.conn();
        let mut q = conn.prepare(
            "SELECT tenant, adapter FROM examples UNION SELECT tenant, adapter FROM completions
             WHERE adapter IS NOT NULL ORDER BY 1, 2",
        )?;
        let rows = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn erase(&self, tenant: &str, subject: &str) -> Result<Erased, DataError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let touched: Vec<(String, i64)> = {
            let mut q = tx.prepare(
                "SELECT j.snapshot, j.seq FROM snapshot_subjects j JOIN snapshots s ON s.id = j.snapshot
                 WHERE s.tenant = ?1 AND j.subject_id = ?2",
            )?;
            let rows = q.query_map(params![tenant, subject], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut snapshots: Vec<String> = touched.iter().map(|t| t.0.clone()).collect();
        snapshots.sort();
        snapshots.dedup();
        for (snap, seq) in &touched {
            // the split assignment is keyed by a hash of the subject's text: it goes too
            let row: Option<String> = tx
                .query_row(
                    "SELECT row FROM snapshot_rows WHERE snapshot = ?1 AND seq = ?2",
                    params![snap, seq],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(row) = row {
                let row: SnapshotRow = parse(&row, "snapshot row")?;
                tx.execute(
                    "DELETE FROM split_assignments WHERE tenant = ?1 AND input_key = ?2",
                    params![tenant, row.input_key],
                )?;
            }
            tx.execute(
                "DELETE FROM snapshot_rows WHERE snapshot = ?1 AND seq = ?2",
                params![snap, seq],
            )?;
            tx.execute(
                "DELETE FROM snapshot_subjects WHERE snapshot = ?1 AND seq = ?2",
                params![snap, seq],
            )?;
        }
        for snap in &snapshots {
            let n = touched.iter().filter(|t| &t.0 == snap).count();
            let m: String = tx.query_row(
                "SELECT manifest FROM snapshots WHERE id = ?1",
                params![snap],
                |r| r.get(0),
            )?;
            let mut m: Manifest = parse(&m, "manifest")?;
            m.erased += n;
            tx.execute(
                "UPDATE snapshots SET manifest = ?1 WHERE id = ?2",
                params![js(&m)?, snap],
            )?;
        }
        let completions: Vec<String> = {
            let mut q = tx.prepare(
                "SELECT DISTINCT completion_id FROM feedback WHERE tenant = ?1 AND subject_id = ?2",
            )?;
            let rows = q.query_map(params![tenant, subject], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut feedback = 0;
        for c in &completions {
            feedback += tx.execute(
                "DELETE FROM feedback WHERE completion_id = ?1 AND tenant = ?2",
                params![c, tenant],
            )?;
            tx.execute(
                "DELETE FROM completions WHERE id = ?1 AND tenant = ?2",
                params![c, tenant],
            )?;
        }
        let examples = tx.execute(
            "DELETE FROM examples WHERE tenant = ?1 AND subject_id = ?2",
            params![tenant, subject],
        )?;
        tx.commit()?;
        Ok(Erased {
            completions: completions.len(),
            feedback,
            examples,
            snapshot_rows: touched.len(),
            snapshots,
        })
    }
}

/// The side of each row: the one its input was given the first time it was seen
/// (so it never changes), else a new assignment. A labelled input goes to eval
/// when that keeps its label's eval share at or under `eval_percent` (stratified);
/// an unlabelled one by the hash of its input.
fn assign_splits(
    conn: &Connection,
    tenant: &str,
    adapter: &str,
    eval_percent: u8,
    rows: &mut [SnapshotRow],
) -> Result<(), DataError> {
    use crate::curate::Split;
    let mut known = conn.prepare_cached(
        "SELECT split FROM split_assignments WHERE tenant = ?1 AND adapter = ?2 AND eval_percent = ?3 AND input_key = ?4",
    )?;
    let mut counts = conn.prepare_cached(
        "SELECT COUNT(*), COALESCE(SUM(split = 'eval'), 0) FROM split_assignments
         WHERE tenant = ?1 AND adapter = ?2 AND eval_percent = ?3 AND label = ?4",
    )?;
    let mut put = conn.prepare_cached(
        "INSERT INTO split_assignments (tenant, adapter, eval_percent, input_key, label, split)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let p = i64::from(eval_percent);
    for r in rows.iter_mut() {
        let prior: Option<String> = known
            .query_row(params![tenant, adapter, p, r.input_key], |x| x.get(0))
            .optional()?;
        r.split = match prior.as_deref() {
            Some("eval") => Split::Eval,
            Some(_) => Split::Train,
            None => {
                let split = match &r.label {
                    Some(label) => {
                        let (total, eval): (i64, i64) = counts
                            .query_row(params![tenant, adapter, p, label], |x| {
                                Ok((x.get(0)?, x.get(1)?))
                            })?;
                        labelled_split(total, eval, p)
                    }
                    None => r.split, // the hash split curation gave it
                };
                put.execute(params![
                    tenant,
                    adapter,
                    p,
                    r.input_key,
                    r.label,
                    split_name(split)
                ])?;
                split
            }
        };
    }
    Ok(())
}

fn candidates(conn: &Connection, tenant: &str, adapter: &str) -> Result<Vec<Candidate>, DataError> {
    let mut out = Vec::new();
    let mut q = conn.prepare(
        "SELECT id, body, subject_id, label FROM examples WHERE tenant = ?1 AND adapter = ?2 ORDER BY id",
    )?;
    let rows = q.query_map(params![tenant, adapter], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, Option<String>>(3)?,
        ))
    })?;
    for row in rows {
        let (id, body, subject_id, label) = row?;
        out.push(Candidate {
            body: parse(&body, "example")?,
            origin: Origin::Import { id },
            subject_id,
            label,
        });
    }
    let mut q = conn.prepare(
        "SELECT id, request, output_text FROM completions WHERE tenant = ?1 AND adapter = ?2 ORDER BY created_at, id",
    )?;
    let rows = q.query_map(params![tenant, adapter], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    for row in rows {
        let (id, request, output) = row?;
        let fb = state_of(conn, &id)?;
        out.push(capture_candidate(id, &request, output, &fb)?);
    }
    Ok(out)
}
