//! The examples store, written once over the one SQL layer ([`retune_sql`]):
//! the embedded SQLite file (beside, not inside, the registry's database) or a
//! shared PostgreSQL for replicas, chosen by location. A call that returned is
//! committed (on disk for SQLite: `synchronous = FULL`).
//!
//! - A database that cannot be reached makes a call fail with
//!   [`DataError::Unavailable`] (HTTP 503) at once, never hang it.
//! - The schema is versioned per dialect; a database whose schema is newer than
//!   this build is refused ([`DataError::Schema`]).
//! - Writers that read before they write (snapshot, suspects, erasure) serialise
//!   per tenant (SQLite's single writer; an advisory lock on PostgreSQL).

use crate::curate::Split;
use crate::error::DataError;
use crate::record::{CapturedCompletion, ExampleBody, Feedback, FeedbackState, ImportRow, Rating};
use crate::rows::{
    capture_candidate, feedback_state, js, labelled_split, manifest, parse, split_name,
    split_of_name, FeedbackRow,
};
use crate::schema::DATASETS;
use crate::snapshot::{content_id, curate, Candidate, Manifest, Origin, Policy, SnapshotRow};
use crate::DatasetStore;
use crate::{Erased, Lineage, Signals};
use retune_config::now_ms;
use retune_sql::{insert_many, p, Conn, Db, Mode, Row, SqlError, V};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

impl From<SqlError> for DataError {
    fn from(e: SqlError) -> Self {
        match e {
            SqlError::Db(m) => Self::Db(m),
            SqlError::Unavailable(m) => Self::Unavailable(m),
            SqlError::Schema(m) => Self::Schema(m),
            SqlError::Location(m) => Self::invalid("datasets.url", m),
        }
    }
}

/// The examples store on SQLite or PostgreSQL.
pub struct SqlStore {
    db: Arc<dyn Db>,
}

impl SqlStore {
    /// Open the store at `location`: a `postgres://` URL, or a SQLite file
    /// path (its directory made if missing). Refused: a URL that does not parse
    /// or options that cannot be honoured (`Invalid`, field `datasets.url`), a
    /// server that cannot be reached within a few seconds (`Unavailable`), a
    /// schema newer than this build (`Schema`).
    pub fn open(location: &str) -> Result<Self, DataError> {
        Ok(Self {
            db: retune_sql::open(location, &DATASETS)?,
        })
    }

    /// The embedded store in the SQLite file `path`.
    pub fn sqlite(path: &Path) -> Result<Self, DataError> {
        Self::open(&path.to_string_lossy())
    }

    /// Where it is, without credentials.
    pub fn location(&self) -> String {
        self.db.location()
    }

    fn begin(&self, mode: Mode) -> Result<Box<dyn Conn + '_>, DataError> {
        Ok(self.db.begin(mode)?)
    }
}

/// Serialise this transaction's read-then-write against others of `tenant`.
fn lock_tenant(c: &mut dyn Conn, tenant: &str) -> Result<(), DataError> {
    Ok(c.lock(&format!("retune-datasets:{tenant}"))?)
}

fn owned(c: &mut dyn Conn, tenant: &str, id: &str) -> Result<(), DataError> {
    c.opt(
        "SELECT 1 FROM ds_completions WHERE id = ?1 AND tenant = ?2",
        p![id, tenant],
    )?
    .map(|_| ())
    .ok_or_else(|| DataError::NotFound(format!("completion `{id}`")))
}

fn feedback_row(r: &Row) -> Result<FeedbackRow, DataError> {
    Ok((r.oi(0)?, r.os(1)?, r.s(2)?, r.os(3)?, r.os(4)?, r.i(5)?))
}

fn state_of(c: &mut dyn Conn, id: &str) -> Result<FeedbackState, DataError> {
    let rows = c.query(
        "SELECT rating, correction, labels, subject_id, comment, created_at FROM ds_feedback
         WHERE completion_id = ?1 ORDER BY seq",
        p![id],
    )?;
    feedback_state(
        id,
        rows.iter()
            .map(feedback_row)
            .collect::<Result<Vec<_>, _>>()?,
    )
}

fn manifest_of(r: &Row) -> Result<Manifest, DataError> {
    parse(&r.s(0)?, "manifest")
}

impl DatasetStore for SqlStore {
    fn record(&self, batch: &[CapturedCompletion]) -> Result<(), DataError> {
        let mut values = Vec::with_capacity(batch.len() * 16);
        for c in batch {
            values.extend([
                V::from(&c.id),
                V::from(&c.tenant),
                V::from(&c.adapter),
                V::from(&c.version),
                V::from(&c.base_fingerprint),
                V::from(c.request.to_string()),
                V::from(c.params.to_string()),
                V::from(&c.output_text),
                V::from(js(&c.output_ids)?),
                V::from(c.finish.as_str()),
                V::from(c.prompt_tokens as i64),
                V::from(c.completion_tokens as i64),
                V::from(c.ttft_ms),
                V::from(c.total_ms),
                V::from(&c.user),
                V::from(c.created_at),
            ]);
        }
        let mut tx = self.begin(Mode::Tx)?;
        insert_many(
            &mut *tx,
            "INSERT INTO ds_completions (id, tenant, adapter, version, base_fingerprint, request,
             params, output_text, output_ids, finish, prompt_tokens, completion_tokens, ttft_ms,
             total_ms, end_user, created_at)",
            "ON CONFLICT (id) DO NOTHING",
            16,
            &values,
        )?;
        Ok(tx.commit()?)
    }

    fn completion(&self, tenant: &str, id: &str) -> Result<CapturedCompletion, DataError> {
        let r = self
            .begin(Mode::Auto)?
            .opt(
                "SELECT id, tenant, adapter, version, base_fingerprint, request, params,
                 output_text, output_ids, finish, prompt_tokens, completion_tokens, ttft_ms,
                 total_ms, end_user, created_at
                 FROM ds_completions WHERE id = ?1 AND tenant = ?2",
                p![id, tenant],
            )?
            .ok_or_else(|| DataError::NotFound(format!("completion `{id}`")))?;
        Ok(CapturedCompletion {
            id: r.s(0)?,
            tenant: r.s(1)?,
            adapter: r.os(2)?,
            version: r.os(3)?,
            base_fingerprint: r.s(4)?,
            request: parse(&r.s(5)?, "captured request")?,
            params: parse(&r.s(6)?, "captured params")?,
            output_text: r.s(7)?,
            output_ids: parse(&r.s(8)?, "captured output ids")?,
            finish: r.s(9)?.parse()?,
            prompt_tokens: r.i(10)? as usize,
            completion_tokens: r.i(11)? as usize,
            ttft_ms: r.f(12)?,
            total_ms: r.f(13)?,
            user: r.os(14)?,
            created_at: r.i(15)?,
        })
    }

    fn add_feedback(&self, tenant: &str, fb: &Feedback) -> Result<FeedbackState, DataError> {
        fb.validate()?;
        let labels = js(&fb.labels)?;
        let mut tx = self.begin(Mode::Tx)?;
        // the ownership check and the insert in one statement
        let n = tx.exec(
            "INSERT INTO ds_feedback (completion_id, tenant, rating, correction, labels,
             subject_id, comment, created_at)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8
             WHERE EXISTS (SELECT 1 FROM ds_completions WHERE id = ?1 AND tenant = ?2)",
            p![
                &fb.completion_id,
                tenant,
                fb.rating.map(Rating::as_i64),
                &fb.correction,
                labels,
                &fb.subject_id,
                &fb.comment,
                now_ms()
            ],
        )?;
        if n == 0 {
            return Err(DataError::NotFound(format!(
                "completion `{}`",
                fb.completion_id
            )));
        }
        let st = state_of(&mut *tx, &fb.completion_id)?;
        tx.commit()?;
        Ok(st)
    }

    fn feedback(&self, tenant: &str, completion_id: &str) -> Result<FeedbackState, DataError> {
        let mut c = self.begin(Mode::Snapshot)?;
        owned(&mut *c, tenant, completion_id)?;
        state_of(&mut *c, completion_id)
    }

    fn import(
        &self,
        tenant: &str,
        adapter: &str,
        source: &str,
        rows: &[ImportRow],
    ) -> Result<usize, DataError> {
        let at = now_ms();
        let mut values = Vec::with_capacity(rows.len() * 7);
        for r in rows {
            values.extend([
                V::from(tenant),
                V::from(adapter),
                V::from(js(&r.body)?),
                V::from(source),
                V::from(&r.subject_id),
                V::from(&r.label),
                V::from(at),
            ]);
        }
        let mut tx = self.begin(Mode::Tx)?;
        // a few hundred rows a statement, in order (their ids are their order)
        insert_many(
            &mut *tx,
            "INSERT INTO ds_examples (tenant, adapter, body, source, subject_id, label, created_at)",
            "",
            7,
            &values,
        )?;
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
        let db = &*self.db;
        let mut tx = self.begin(Mode::Tx)?;
        lock_tenant(&mut *tx, tenant)?;
        let mut c = curate(&candidates(db, &mut *tx, tenant, adapter)?, policy);
        assign_splits(&mut *tx, tenant, adapter, policy.eval_percent, &mut c.rows)?;
        let id = content_id(tenant, adapter, policy, &c.rows);
        if let Some(r) = tx.opt("SELECT manifest FROM ds_snapshots WHERE id = ?1", p![&id])? {
            return manifest_of(&r);
        }
        let m = manifest(&id, tenant, adapter, policy, &c, now_ms());
        tx.exec(
            "INSERT INTO ds_snapshots (id, tenant, adapter, created_at, manifest)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            p![&id, tenant, adapter, m.created_at, js(&m)?],
        )?;
        let (mut rows, mut subjects) = (Vec::new(), Vec::new());
        for (i, r) in c.rows.iter().enumerate() {
            rows.extend([V::from(&id), V::I(i as i64), V::from(js(r)?)]);
            for s in &r.subject_ids {
                subjects.extend([V::from(&id), V::I(i as i64), V::from(s)]);
            }
        }
        insert_many(
            &mut *tx,
            "INSERT INTO ds_snapshot_rows (snapshot, seq, row)",
            "",
            3,
            &rows,
        )?;
        insert_many(
            &mut *tx,
            "INSERT INTO ds_snapshot_subjects (snapshot, seq, subject_id)",
            "",
            3,
            &subjects,
        )?;
        tx.commit()?;
        Ok(m)
    }

    fn manifest(&self, tenant: &str, id: &str) -> Result<Manifest, DataError> {
        let r = self
            .begin(Mode::Auto)?
            .opt(
                "SELECT manifest FROM ds_snapshots WHERE id = ?1 AND tenant = ?2",
                p![id, tenant],
            )?
            .ok_or_else(|| DataError::NotFound(format!("snapshot `{id}`")))?;
        manifest_of(&r)
    }

    /// Manifests of a tenant's snapshots (of one adapter when given), oldest first.
    fn snapshots(&self, tenant: &str, adapter: Option<&str>) -> Result<Vec<Manifest>, DataError> {
        let sql = format!(
            "SELECT manifest FROM ds_snapshots WHERE tenant = ?1
             AND (?2 IS NULL OR adapter = ?2) ORDER BY created_at, {}",
            self.db.bytewise("id")
        );
        let rows = self.begin(Mode::Auto)?.query(&sql, p![tenant, adapter])?;
        rows.iter().map(manifest_of).collect()
    }

    fn set_suspects(
        &self,
        tenant: &str,
        id: &str,
        suspects: &crate::snapshot::Suspects,
    ) -> Result<Manifest, DataError> {
        let mut tx = self.begin(Mode::Tx)?;
        lock_tenant(&mut *tx, tenant)?;
        let r = tx
            .opt(
                "SELECT manifest FROM ds_snapshots WHERE id = ?1 AND tenant = ?2",
                p![id, tenant],
            )?
            .ok_or_else(|| DataError::NotFound(format!("snapshot `{id}`")))?;
        let mut m = manifest_of(&r)?;
        m.suspects = Some(suspects.clone());
        tx.exec(
            "UPDATE ds_snapshots SET manifest = ?1 WHERE id = ?2",
            p![js(&m)?, id],
        )?;
        tx.commit()?;
        Ok(m)
    }

    /// The rows of a snapshot, in order.
    fn snapshot_rows(&self, tenant: &str, id: &str) -> Result<Vec<SnapshotRow>, DataError> {
        self.manifest(tenant, id)?;
        let rows = self.begin(Mode::Auto)?.query(
            "SELECT row FROM ds_snapshot_rows WHERE snapshot = ?1 ORDER BY seq",
            p![id],
        )?;
        rows.iter()
            .map(|r| parse(&r.s(0)?, "snapshot row"))
            .collect()
    }

    /// Snapshots of `tenant` with a row about `subject`.
    fn lineage(&self, tenant: &str, subject: &str) -> Result<Lineage, DataError> {
        let sql = format!(
            "SELECT DISTINCT {} FROM ds_snapshot_subjects j
             JOIN ds_snapshots s ON s.id = j.snapshot
             WHERE s.tenant = ?1 AND j.subject_id = ?2 ORDER BY 1",
            self.db.bytewise("s.id")
        );
        let rows = self.begin(Mode::Auto)?.query(&sql, p![tenant, subject])?;
        Ok(Lineage {
            snapshots: rows.iter().map(|r| r.s(0)).collect::<Result<_, _>>()?,
        })
    }

    /// Delete every captured call, feedback row, example and snapshot row about
    /// `subject` (one transaction). Returns what went and the snapshots it touched.
    fn erase(&self, tenant: &str, subject: &str) -> Result<Erased, DataError> {
        let mut tx = self.begin(Mode::Tx)?;
        lock_tenant(&mut *tx, tenant)?;
        let touched: Vec<(String, i64)> = tx
            .query(
                "SELECT j.snapshot, j.seq FROM ds_snapshot_subjects j
                 JOIN ds_snapshots s ON s.id = j.snapshot
                 WHERE s.tenant = ?1 AND j.subject_id = ?2",
                p![tenant, subject],
            )?
            .iter()
            .map(|r| Ok((r.s(0)?, r.i(1)?)))
            .collect::<Result<_, SqlError>>()?;
        let mut snapshots: Vec<String> = touched.iter().map(|t| t.0.clone()).collect();
        snapshots.sort();
        snapshots.dedup();
        for (snap, seq) in &touched {
            // the split assignment is keyed by a hash of the subject's text: it goes too
            if let Some(r) = tx.opt(
                "SELECT row FROM ds_snapshot_rows WHERE snapshot = ?1 AND seq = ?2",
                p![snap, *seq],
            )? {
                let row: SnapshotRow = parse(&r.s(0)?, "snapshot row")?;
                tx.exec(
                    "DELETE FROM ds_split_assignments WHERE tenant = ?1 AND input_key = ?2",
                    p![tenant, &row.input_key],
                )?;
            }
            tx.exec(
                "DELETE FROM ds_snapshot_rows WHERE snapshot = ?1 AND seq = ?2",
                p![snap, *seq],
            )?;
            tx.exec(
                "DELETE FROM ds_snapshot_subjects WHERE snapshot = ?1 AND seq = ?2",
                p![snap, *seq],
            )?;
        }
        for snap in &snapshots {
            let n = touched.iter().filter(|t| &t.0 == snap).count();
            let r = tx.one("SELECT manifest FROM ds_snapshots WHERE id = ?1", p![snap])?;
            let mut m = manifest_of(&r)?;
            m.erased += n;
            tx.exec(
                "UPDATE ds_snapshots SET manifest = ?1 WHERE id = ?2",
                p![js(&m)?, snap],
            )?;
        }
        let completions: Vec<String> = tx
            .query(
                "SELECT DISTINCT completion_id FROM ds_feedback WHERE tenant = ?1 AND subject_id = ?2",
                p![tenant, subject],
            )?
            .iter()
            .map(|r| r.s(0))
            .collect::<Result<_, _>>()?;
        let mut feedback = 0;
        for c in &completions {
            feedback += tx.exec(
                "DELETE FROM ds_feedback WHERE completion_id = ?1 AND tenant = ?2",
                p![c, tenant],
            )?;
            tx.exec(
                "DELETE FROM ds_completions WHERE id = ?1 AND tenant = ?2",
                p![c, tenant],
            )?;
        }
        let examples = tx.exec(
            "DELETE FROM ds_examples WHERE tenant = ?1 AND subject_id = ?2",
            p![tenant, subject],
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

    fn purge_before(&self, tenant: &str, before_ms: i64) -> Result<usize, DataError> {
        let mut tx = self.begin(Mode::Tx)?;
        tx.exec(
            "DELETE FROM ds_feedback WHERE tenant = ?1 AND completion_id IN
             (SELECT id FROM ds_completions WHERE tenant = ?1 AND created_at < ?2)",
            p![tenant, before_ms],
        )?;
        let n = tx.exec(
            "DELETE FROM ds_completions WHERE tenant = ?1 AND created_at < ?2",
            p![tenant, before_ms],
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
        let mut c = self.begin(Mode::Snapshot)?;
        let imports = c
            .one(
                "SELECT COUNT(*) FROM ds_examples WHERE tenant = ?1 AND adapter = ?2 AND created_at > ?3",
                p![tenant, adapter, since_ms],
            )?
            .i(0)?;
        // a completion counts once, when its latest feedback arrived since
        let captures = c
            .one(
                "SELECT COUNT(*) FROM ds_completions c WHERE c.tenant = ?1 AND c.adapter = ?2
                 AND (SELECT MAX(f.created_at) FROM ds_feedback f WHERE f.completion_id = c.id) > ?3
                 AND (EXISTS (SELECT 1 FROM ds_feedback f
                              WHERE f.completion_id = c.id AND f.correction IS NOT NULL)
                      OR (?4 AND (SELECT f.rating FROM ds_feedback f
                                  WHERE f.completion_id = c.id AND f.rating IS NOT NULL
                                  ORDER BY f.seq DESC LIMIT 1) = 1))",
                p![tenant, adapter, since_ms, include_positive],
            )?
            .i(0)?;
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
        let rows = self.begin(Mode::Auto)?.query(
            "SELECT c.finish = 'error',
                    (SELECT f.rating FROM ds_feedback f
                     WHERE f.completion_id = c.id AND f.rating IS NOT NULL
                     ORDER BY f.seq DESC LIMIT 1) = -1,
                    EXISTS (SELECT 1 FROM ds_feedback f
                            WHERE f.completion_id = c.id AND f.correction IS NOT NULL)
             FROM ds_completions c WHERE c.tenant = ?1 AND c.adapter = ?2 AND c.version = ?3
             AND c.created_at >= ?4 AND c.created_at < ?5",
            p![tenant, adapter, version, from_ms, to_ms],
        )?;
        let mut s = Signals::default();
        for r in &rows {
            s.count(r.b(0)?, r.ob(1)?.unwrap_or(false), r.b(2)?);
        }
        Ok(s)
    }

    fn reviewed_keys(
        &self,
        tenant: &str,
        adapter: &str,
    ) -> Result<std::collections::BTreeSet<String>, DataError> {
        let rows = self.begin(Mode::Auto)?.query(
            "SELECT body FROM ds_examples WHERE tenant = ?1 AND adapter = ?2 AND source = ?3",
            p![tenant, adapter, crate::snapshot::REVIEW_SOURCE],
        )?;
        let bodies = rows
            .iter()
            .map(|r| parse(&r.s(0)?, "example"))
            .collect::<Result<Vec<ExampleBody>, DataError>>()?;
        Ok(crate::review::keys_of(bodies.into_iter()))
    }

    fn adapters(&self) -> Result<Vec<(String, String)>, DataError> {
        let sql = format!(
            "SELECT tenant, adapter FROM (SELECT tenant, adapter FROM ds_examples
             UNION SELECT tenant, adapter FROM ds_completions WHERE adapter IS NOT NULL) u
             ORDER BY {}, {}",
            self.db.bytewise("tenant"),
            self.db.bytewise("adapter")
        );
        let rows = self.begin(Mode::Auto)?.query(&sql, &[])?;
        rows.iter()
            .map(|r| Ok((r.s(0)?, r.s(1)?)))
            .collect::<Result<_, SqlError>>()
            .map_err(DataError::from)
    }
}

/// The side of each row: the one its input was given the first time it was
/// seen (so it never changes), else a new assignment. A labelled input goes to
/// eval when that keeps its label's eval share at or under `eval_percent`
/// (stratified); an unlabelled one by the hash of its input. Every assignment
/// of this (tenant, adapter, percent) is read once, the decisions made in order
/// in memory, and the new ones written together.
fn assign_splits(
    tx: &mut dyn Conn,
    tenant: &str,
    adapter: &str,
    eval_percent: u8,
    rows: &mut [SnapshotRow],
) -> Result<(), DataError> {
    let p = i64::from(eval_percent);
    let mut known: HashMap<String, Split> = HashMap::new();
    let mut per_label: HashMap<String, (i64, i64)> = HashMap::new();
    for r in tx.query(
        "SELECT input_key, label, split FROM ds_split_assignments
         WHERE tenant = ?1 AND adapter = ?2 AND eval_percent = ?3",
        p![tenant, adapter, p],
    )? {
        let split = split_of_name(&r.s(2)?);
        if let Some(label) = r.os(1)? {
            let e = per_label.entry(label).or_default();
            e.0 += 1;
            e.1 += (split == Split::Eval) as i64;
        }
        known.insert(r.s(0)?, split);
    }
    let mut new = Vec::new();
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
                new.extend([
                    V::from(tenant),
                    V::from(adapter),
                    V::I(p),
                    V::from(&r.input_key),
                    V::from(&r.label),
                    V::from(split_name(split)),
                ]);
                split
            }
        };
    }
    insert_many(
        tx,
        "INSERT INTO ds_split_assignments (tenant, adapter, eval_percent, input_key, label, split)",
        "",
        6,
        &new,
    )?;
    Ok(())
}

/// Imports, then captures with their feedback (one query for all feedback of
/// the adapter, not one per completion).
fn candidates(
    db: &dyn Db,
    tx: &mut dyn Conn,
    tenant: &str,
    adapter: &str,
) -> Result<Vec<Candidate>, DataError> {
    let mut out = Vec::new();
    for r in tx.query(
        "SELECT id, body, subject_id, label, source FROM ds_examples
         WHERE tenant = ?1 AND adapter = ?2 ORDER BY id",
        p![tenant, adapter],
    )? {
        out.push(Candidate {
            body: parse(&r.s(1)?, "example")?,
            origin: Origin::Import {
                id: r.i(0)?,
                reviewed: r.s(4)? == crate::snapshot::REVIEW_SOURCE,
            },
            subject_id: r.os(2)?,
            label: r.os(3)?,
        });
    }
    let mut feedback: HashMap<String, Vec<FeedbackRow>> = HashMap::new();
    for r in tx.query(
        "SELECT f.rating, f.correction, f.labels, f.subject_id, f.comment, f.created_at,
                f.completion_id
         FROM ds_feedback f JOIN ds_completions c ON c.id = f.completion_id
         WHERE c.tenant = ?1 AND c.adapter = ?2 ORDER BY f.seq",
        p![tenant, adapter],
    )? {
        feedback.entry(r.s(6)?).or_default().push(feedback_row(&r)?);
    }
    let sql = format!(
        "SELECT id, request, output_text FROM ds_completions
         WHERE tenant = ?1 AND adapter = ?2 ORDER BY created_at, {}",
        db.bytewise("id")
    );
    for r in tx.query(&sql, p![tenant, adapter])? {
        let id = r.s(0)?;
        let fb = feedback_state(&id, feedback.remove(&id).unwrap_or_default())?;
        out.push(capture_candidate(id, &r.s(1)?, r.s(2)?, &fb)?);
    }
    Ok(out)
}
