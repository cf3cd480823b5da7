//! The examples store and the capture writer.

use retune_datasets::*;

mod common;
use common::backends;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("retune-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn completion(id: &str, tenant: &str) -> CapturedCompletion {
    CapturedCompletion {
        id: id.into(),
        tenant: tenant.into(),
        adapter: Some("tickets".into()),
        version: Some("0abc".into()),
        base_fingerprint: "base".into(),
        request: serde_json::json!({"messages": [{"role": "user", "content": "my card was charged twice"}]}),
        params: serde_json::json!({"temperature": 0.7, "seed": 42}),
        output_text: "card_payment_wrong_amount".into(),
        output_ids: vec![5, 6, 7],
        finish: retune_datasets::Finish::Stop,
        prompt_tokens: 12,
        completion_tokens: 3,
        ttft_ms: 1.5,
        total_ms: 3.0,
        user: Some("u1".into()),
        created_at: 1,
    }
}

#[test]
fn a_captured_completion_reads_back_exactly_and_only_for_its_tenant() {
    for b in backends("read") {
        eprintln!("store: {}", b.name());
        let s = b.open();
        let c = completion("cmpl-1", "acme");
        s.record(&[c.clone(), c.clone()]).unwrap(); // a repeated id is ignored
        assert_eq!(s.completion("acme", "cmpl-1").unwrap(), c);
        assert!(matches!(
            s.completion("globex", "cmpl-1"),
            Err(DataError::NotFound(_))
        ));
        assert!(matches!(
            s.completion("acme", "cmpl-2"),
            Err(DataError::NotFound(_))
        ));
    }
}

/// A SQLite file written by a build before the one SQL layer (its tables
/// without the `ds_` prefix, `user` for the end user, no migrations table)
/// opens with every row there, and the store writes on.
#[test]
fn a_sqlite_file_from_before_the_shared_schema_keeps_its_rows() {
    let path = tmp("old-schema").join("datasets.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE completions (
                id TEXT PRIMARY KEY, tenant TEXT NOT NULL, adapter TEXT, version TEXT,
                base_fingerprint TEXT NOT NULL, request TEXT NOT NULL, params TEXT NOT NULL,
                output_text TEXT NOT NULL, output_ids TEXT NOT NULL, finish TEXT NOT NULL,
                prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
                ttft_ms REAL NOT NULL, total_ms REAL NOT NULL, user TEXT, created_at INTEGER NOT NULL);
             CREATE TABLE feedback (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, completion_id TEXT NOT NULL, tenant TEXT NOT NULL,
                rating INTEGER, correction TEXT, labels TEXT NOT NULL, subject_id TEXT, comment TEXT,
                created_at INTEGER NOT NULL);
             INSERT INTO completions VALUES ('c-old', 'acme', 'tickets', '0abc', 'base',
                '{\"prompt\": \"hi\"}', '{}', 'hello', '[1,2]', 'stop', 3, 2, 1.5, 3.0, 'u9', 7);
             INSERT INTO feedback (completion_id, tenant, rating, correction, labels, subject_id, comment, created_at)
                VALUES ('c-old', 'acme', NULL, 'better', '{}', 'subj', NULL, 8);",
        )
        .unwrap();
    }
    let s = SqlStore::sqlite(&path).unwrap();
    let c = s.completion("acme", "c-old").unwrap();
    assert_eq!(
        (c.output_text.as_str(), c.user.as_deref()),
        ("hello", Some("u9"))
    );
    assert_eq!((c.ttft_ms, c.output_ids.clone()), (1.5, vec![1, 2]));
    assert_eq!(
        s.feedback("acme", "c-old").unwrap().correction.as_deref(),
        Some("better")
    );
    s.record(&[completion("c-new", "acme")]).unwrap();
    assert_eq!(
        s.completion("acme", "c-new").unwrap(),
        completion("c-new", "acme")
    );
    drop(s);
    // opened again: nothing migrates twice
    let s = SqlStore::sqlite(&path).unwrap();
    assert_eq!(s.lineage("acme", "subj").unwrap().snapshots.len(), 0);
    assert_eq!(s.completion("acme", "c-old").unwrap().output_text, "hello");
}

#[test]
fn a_later_correction_supersedes_an_earlier_one_and_history_is_kept() {
    for b in backends("feedback") {
        eprintln!("store: {}", b.name());
        let s = b.open();
        s.record(&[completion("cmpl-1", "acme")]).unwrap();
        let fb = |f: Feedback| Feedback {
            completion_id: "cmpl-1".into(),
            ..f
        };
        s.add_feedback(
            "acme",
            &fb(Feedback {
                rating: Some(Rating::Down),
                correction: Some("card_payment_fee_charged".into()),
                labels: [("intent".to_string(), "fee".to_string())].into(),
                ..Feedback::default()
            }),
        )
        .unwrap();
        let st = s
            .add_feedback(
                "acme",
                &fb(Feedback {
                    correction: Some("transaction_charged_twice".into()),
                    labels: [
                        ("intent".to_string(), "twice".to_string()),
                        ("lang".to_string(), "en".to_string()),
                    ]
                    .into(),
                    subject_id: Some("person-7".into()),
                    ..Feedback::default()
                }),
            )
            .unwrap();
        assert_eq!(st.correction.as_deref(), Some("transaction_charged_twice"));
        assert_eq!(st.rating, Some(-1), "a field not given again is kept");
        assert_eq!(st.labels["intent"], "twice");
        assert_eq!(st.labels["lang"], "en");
        assert_eq!(st.subject_id.as_deref(), Some("person-7"));
        assert_eq!(st.events, 2);
        // durable and the same after reopening
        drop(s);
        let s = b.open();
        assert_eq!(s.feedback("acme", "cmpl-1").unwrap(), st);
        // another tenant cannot read or write it, exactly like an unknown id
        for (t, id) in [("globex", "cmpl-1"), ("acme", "cmpl-9")] {
            assert!(matches!(s.feedback(t, id), Err(DataError::NotFound(_))));
            let r = s.add_feedback(
                t,
                &Feedback {
                    completion_id: id.into(),
                    rating: Some(Rating::Up),
                    ..Feedback::default()
                },
            );
            assert!(matches!(r, Err(DataError::NotFound(_))));
        }
        assert_eq!(s.feedback("acme", "cmpl-1").unwrap().events, 2);
    }
}

#[test]
fn retention_purges_old_captures_with_their_feedback_and_only_for_that_tenant() {
    for b in backends("retention") {
        eprintln!("store: {}", b.name());
        let s = b.open();
        let at = |id: &str, tenant: &str, t: i64| CapturedCompletion {
            created_at: t,
            ..completion(id, tenant)
        };
        s.record(&[
            at("old", "acme", 1_000),
            at("new", "acme", 5_000),
            at("other", "globex", 1_000),
        ])
        .unwrap();
        s.add_feedback(
            "acme",
            &Feedback {
                completion_id: "old".into(),
                rating: Some(Rating::Up),
                ..Feedback::default()
            },
        )
        .unwrap();
        assert_eq!(s.purge_before("acme", 2_000).unwrap(), 1);
        assert!(s.completion("acme", "old").is_err());
        assert!(s.feedback("acme", "old").is_err());
        assert!(s.completion("acme", "new").is_ok());
        assert!(
            s.completion("globex", "other").is_ok(),
            "another tenant's rule"
        );
    }
}

#[test]
fn malformed_feedback_names_its_field() {
    for b in backends("bad") {
        eprintln!("store: {}", b.name());
        let s = b.open();
        s.record(&[completion("cmpl-1", "acme")]).unwrap();
        let field = |fb: Feedback| match s.add_feedback("acme", &fb) {
            Err(DataError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let base = Feedback {
            completion_id: "cmpl-1".into(),
            ..Feedback::default()
        };
        assert_eq!(field(base.clone()), "rating", "empty feedback");
        assert_eq!(
            field(Feedback {
                correction: Some("x".repeat(300_000)),
                ..base.clone()
            }),
            "correction"
        );
        assert_eq!(
            field(Feedback {
                labels: [(String::new(), "v".to_string())].into(),
                ..base.clone()
            }),
            "labels"
        );
        assert_eq!(
            field(Feedback {
                subject_id: Some(String::new()),
                ..base.clone()
            }),
            "subject_id"
        );
        assert!(matches!(
            Rating::from_i64(2),
            Err(DataError::Invalid { .. })
        ));
    }
}

/// A store that fails, stalls or is unreachable on demand.
struct Flaky {
    inner: SqlStore,
    fail: Mutex<bool>,
    stall: Mutex<Duration>,
    /// `Unavailable` (a shared database down); nothing written.
    down: Mutex<bool>,
    /// Write, then answer `Unavailable` once (a commit whose answer was lost).
    lose_answer: Mutex<bool>,
    /// Batches asked to be written.
    calls: Mutex<usize>,
}

impl Flaky {
    fn new(name: &str) -> Self {
        Flaky {
            inner: SqlStore::sqlite(&tmp(name).join("datasets.db")).unwrap(),
            fail: Mutex::new(false),
            stall: Mutex::new(Duration::ZERO),
            down: Mutex::new(false),
            lose_answer: Mutex::new(false),
            calls: Mutex::new(0),
        }
    }
}

impl DatasetStore for Flaky {
    fn record(&self, batch: &[CapturedCompletion]) -> Result<(), DataError> {
        *self.calls.lock().unwrap() += 1;
        std::thread::sleep(*self.stall.lock().unwrap());
        if *self.fail.lock().unwrap() {
            return Err(DataError::Db("disk full".into()));
        }
        if *self.down.lock().unwrap() {
            return Err(DataError::Unavailable("connection refused".into()));
        }
        self.inner.record(batch)?;
        if std::mem::take(&mut *self.lose_answer.lock().unwrap()) {
            return Err(DataError::Unavailable("connection reset".into()));
        }
        Ok(())
    }
    fn completion(&self, t: &str, id: &str) -> Result<CapturedCompletion, DataError> {
        self.inner.completion(t, id)
    }
    fn add_feedback(&self, t: &str, fb: &Feedback) -> Result<FeedbackState, DataError> {
        self.inner.add_feedback(t, fb)
    }
    fn feedback(&self, t: &str, id: &str) -> Result<FeedbackState, DataError> {
        self.inner.feedback(t, id)
    }
    fn import(&self, t: &str, a: &str, s: &str, rows: &[ImportRow]) -> Result<usize, DataError> {
        self.inner.import(t, a, s, rows)
    }
    fn snapshot(&self, t: &str, a: &str, p: &Policy) -> Result<Manifest, DataError> {
        self.inner.snapshot(t, a, p)
    }
    fn manifest(&self, t: &str, id: &str) -> Result<Manifest, DataError> {
        self.inner.manifest(t, id)
    }
    fn snapshots(&self, t: &str, a: Option<&str>) -> Result<Vec<Manifest>, DataError> {
        self.inner.snapshots(t, a)
    }
    fn snapshot_rows(&self, t: &str, id: &str) -> Result<Vec<SnapshotRow>, DataError> {
        self.inner.snapshot_rows(t, id)
    }
    fn set_suspects(
        &self,
        t: &str,
        id: &str,
        s: &retune_datasets::snapshot::Suspects,
    ) -> Result<Manifest, DataError> {
        self.inner.set_suspects(t, id, s)
    }
    fn lineage(&self, t: &str, s: &str) -> Result<Lineage, DataError> {
        self.inner.lineage(t, s)
    }
    fn reviewed_keys(
        &self,
        t: &str,
        a: &str,
    ) -> Result<std::collections::BTreeSet<String>, DataError> {
        self.inner.reviewed_keys(t, a)
    }
    fn erase(&self, t: &str, s: &str) -> Result<Erased, DataError> {
        self.inner.erase(t, s)
    }
    fn purge_before(&self, t: &str, before: i64) -> Result<usize, DataError> {
        self.inner.purge_before(t, before)
    }
    fn candidates_since(
        &self,
        t: &str,
        a: &str,
        since: i64,
        pos: bool,
    ) -> Result<usize, DataError> {
        self.inner.candidates_since(t, a, since, pos)
    }
    fn signals(
        &self,
        t: &str,
        a: &str,
        v: &str,
        from: i64,
        to: i64,
    ) -> Result<retune_datasets::Signals, DataError> {
        self.inner.signals(t, a, v, from, to)
    }
    fn adapters(&self) -> Result<Vec<(String, String)>, DataError> {
        self.inner.adapters()
    }
}

#[test]
fn the_writer_drops_and_counts_when_the_store_fails_or_falls_behind() {
    let store = Arc::new(Flaky::new("flaky"));
    *store.fail.lock().unwrap() = true;
    let w = CaptureWriter::start(store.clone(), 4).unwrap();
    for i in 0..3 {
        assert!(w.capture(completion(&format!("f{i}"), "acme")));
    }
    assert!(w.flush(Duration::from_secs(10)));
    assert_eq!(w.stats().dropped.load(Ordering::Relaxed), 3, "store failed");
    assert_eq!(w.stats().captured.load(Ordering::Relaxed), 0);
    // a stalled store: the queue fills, capture never blocks, the rest is dropped
    *store.fail.lock().unwrap() = false;
    *store.stall.lock().unwrap() = Duration::from_millis(300);
    // one record first, so the writer is inside its stalled write when the
    // burst comes (else it drains the queue while the burst fills it)
    assert!(w.capture(completion("s0", "acme")));
    std::thread::sleep(Duration::from_millis(50));
    let t = std::time::Instant::now();
    let accepted = 1
        + (1..50)
            .filter(|i| w.capture(completion(&format!("s{i}"), "acme")))
            .count();
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "capture blocked: {:?}",
        t.elapsed()
    );
    assert!(
        accepted <= 1 + 4,
        "{accepted} accepted: one in the writer's hands and a queue of 4"
    );
    *store.stall.lock().unwrap() = Duration::ZERO;
    assert!(w.flush(Duration::from_secs(10)));
    let (c, d) = (
        w.stats().captured.load(Ordering::Relaxed),
        w.stats().dropped.load(Ordering::Relaxed),
    );
    assert_eq!(c as usize, accepted);
    assert_eq!(d as usize, 3 + 50 - accepted);
    assert!(store.completion("acme", "s0").is_ok());
}

/// A store that cannot be reached (a shared database down) loses nothing the
/// queue can hold: the records wait, the writer retries with backoff, a flush
/// does not claim them written, and they are written once it is back. A write
/// whose answer was lost is retried without duplicating anything (the stores
/// ignore an id they have).
#[test]
fn the_writer_holds_records_while_the_store_is_unavailable_and_writes_them_once_back() {
    let store = Arc::new(Flaky::new("unavailable"));
    *store.down.lock().unwrap() = true;
    let w = CaptureWriter::start(store.clone(), 8).unwrap();
    for i in 0..40 {
        assert!(
            w.capture(completion(&format!("u{i}"), "acme")),
            "u{i} dropped"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        !w.flush(Duration::from_millis(300)),
        "a flush while the store is down must not report the records written"
    );
    let tries = *store.calls.lock().unwrap();
    assert!(tries >= 2, "retried: {tries} tries");
    assert_eq!(w.stats().captured.load(Ordering::Relaxed), 0);
    assert_eq!(w.stats().dropped.load(Ordering::Relaxed), 0);
    // back, but the first write's answer is lost after its commit
    *store.lose_answer.lock().unwrap() = true;
    *store.down.lock().unwrap() = false;
    assert!(w.flush(Duration::from_secs(10)));
    assert_eq!(w.stats().captured.load(Ordering::Relaxed), 40);
    assert_eq!(w.stats().dropped.load(Ordering::Relaxed), 0);
    for i in 0..40 {
        assert!(store.completion("acme", &format!("u{i}")).is_ok(), "u{i}");
    }
    // more than the writer holds: the rest is dropped and counted, never blocking
    *store.down.lock().unwrap() = true;
    let t = std::time::Instant::now();
    let accepted = (0..2000)
        .filter(|i| w.capture(completion(&format!("o{i}"), "acme")))
        .count();
    assert!(t.elapsed() < Duration::from_secs(1), "capture blocked");
    std::thread::sleep(Duration::from_millis(100));
    *store.down.lock().unwrap() = false;
    assert!(w.flush(Duration::from_secs(10)));
    let (c, d) = (
        w.stats().captured.load(Ordering::Relaxed) as usize,
        w.stats().dropped.load(Ordering::Relaxed) as usize,
    );
    assert!(accepted < 2000, "nothing dropped past the hold: {accepted}");
    assert_eq!(c + d, 40 + 2000, "every record written or counted");
    assert!(c > 40 && d >= 2000 - accepted, "captured {c}, dropped {d}");
}
