//! The embedded store: one SQLite file (WAL, `synchronous = FULL`: a call that
//! returned is on disk) beside, not inside, the adapter registry's database.

use crate::error::DataError;
use crate::record::{CapturedCompletion, Feedback, FeedbackState, Rating};
use crate::DatasetStore;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::collections::BTreeMap;
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
";

pub struct SqliteStore {
    db: Mutex<Connection>,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

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
    let mut st = FeedbackState {
        completion_id: id.into(),
        ..FeedbackState::default()
    };
    let mut q = conn.prepare(
        "SELECT rating, correction, labels, subject_id, comment, created_at FROM feedback
         WHERE completion_id = ?1 ORDER BY seq",
    )?;
    let rows = q.query_map(params![id], |r| {
        Ok((
            r.get::<_, Option<i64>>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, i64>(5)?,
        ))
    })?;
    for row in rows {
        let (rating, correction, labels, subject_id, comment, at) = row?;
        let fb = Feedback {
            completion_id: id.into(),
            rating: rating.map(Rating::from_i64).transpose()?,
            correction,
            labels: serde_json::from_str::<BTreeMap<String, String>>(&labels)
                .map_err(|e| DataError::Db(format!("feedback labels: {e}")))?,
            subject_id,
            comment,
        };
        st.apply(&fb, at);
    }
    Ok(st)
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
}
