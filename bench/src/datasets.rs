//! `retune-bench datasets`: the examples store on this machine's disk: JSONL
//! import rows/s, snapshot time at N examples, durable feedback writes/s from
//! concurrent writers (store level, no HTTP).

use anyhow::Result;
use retune_datasets::*;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct DatasetsArgs {
    /// Examples to import and snapshot.
    #[arg(long, default_value_t = 100_000)]
    rows: usize,
    /// Concurrent feedback writers.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Feedback writes per writer.
    #[arg(long, default_value_t = 500)]
    writes: usize,
    /// Directory for the database (default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also run it on PostgreSQL, in the same run: a fresh database in the
    /// cluster RETUNE_TEST_PG_URL names, else a throwaway local cluster.
    #[arg(long)]
    postgres: bool,
}

pub fn run(a: &DatasetsArgs) -> Result<()> {
    let dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("retune-bench-data-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let sqlite: Arc<dyn DatasetStore> = Arc::new(SqlStore::sqlite(&dir.join("datasets.db"))?);
    println!("== SQLite (WAL, synchronous=FULL) at {}", dir.display());
    workload(a, sqlite)?;
    if a.postgres {
        let pg = retune_testkit::pg::PgTest::new().map_err(anyhow::Error::msg)?;
        let store = SqlStore::open(&pg.url)?;
        println!(
            "== PostgreSQL (fsync on, synchronous_commit on) at {}",
            store.location()
        );
        workload(a, Arc::new(store))?;
    }
    Ok(())
}

fn workload(a: &DatasetsArgs, store: Arc<dyn DatasetStore>) -> Result<()> {
    let text: String = (0..a.rows)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "Classify the banking question."},
                {"role": "user", "content": format!("question number {i} about my card and a fee of {} EUR", i % 97)},
                {"role": "assistant", "content": format!("label_{}", i % 77)}]})
            .to_string()
                + "\n"
        })
        .collect();
    let t = Instant::now();
    let (rows, errors) = parse_jsonl(&text);
    let parsed = t.elapsed().as_secs_f64();
    store.import("bench", "tickets", "import:bench", &rows)?;
    let import_s = t.elapsed().as_secs_f64();
    println!(
        "import: {} rows ({} bad) in {import_s:.2} s (parse {parsed:.2} s) = {:.0} rows/s",
        rows.len(),
        errors.len(),
        rows.len() as f64 / import_s
    );
    let t = Instant::now();
    let m = store.snapshot("bench", "tickets", &Policy::default())?;
    println!(
        "snapshot: {} examples ({} train, {} eval, scrub on) in {:.2} s",
        m.train + m.eval,
        m.train,
        m.eval,
        t.elapsed().as_secs_f64()
    );
    let ids: Vec<String> = (0..a.writers).map(|i| format!("c{i}")).collect();
    let base = CapturedCompletion {
        id: String::new(),
        tenant: "bench".into(),
        adapter: Some("tickets".into()),
        version: Some("v".into()),
        base_fingerprint: "b".into(),
        request: serde_json::json!({"messages": []}),
        params: serde_json::json!({}),
        output_text: "x".into(),
        output_ids: vec![1],
        finish: retune_datasets::Finish::Stop,
        prompt_tokens: 1,
        completion_tokens: 1,
        ttft_ms: 0.0,
        total_ms: 0.0,
        user: None,
        created_at: 0,
    };
    let recs: Vec<CapturedCompletion> = ids
        .iter()
        .map(|id| CapturedCompletion {
            id: id.clone(),
            ..base.clone()
        })
        .collect();
    store.record(&recs)?;
    let t = Instant::now();
    let handles: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let s = store.clone();
            let n = a.writes;
            std::thread::spawn(move || -> Result<(), DataError> {
                for k in 0..n {
                    s.add_feedback(
                        "bench",
                        &Feedback {
                            completion_id: id.clone(),
                            rating: Some(if k % 2 == 0 { Rating::Up } else { Rating::Down }),
                            ..Feedback::default()
                        },
                    )?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    let total = a.writers * a.writes;
    let s = t.elapsed().as_secs_f64();
    println!(
        "feedback: {total} durable writes from {} writers in {s:.2} s = {:.0} writes/s",
        a.writers,
        total as f64 / s
    );
    Ok(())
}
