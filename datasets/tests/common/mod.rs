//! The shared store suite: every test runs against each implementation of
//! `DatasetStore` — the SQLite file and a real PostgreSQL database.

#![allow(dead_code)]

use retune_datasets::{DatasetStore, SqlStore};
use retune_testkit::pg::PgTest;
use std::path::PathBuf;

pub enum Backend {
    Sqlite(PathBuf),
    Postgres(PgTest),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Open (or reopen) the store: the same data each time.
    pub fn open(&self) -> Box<dyn DatasetStore> {
        match self {
            Self::Sqlite(p) => Box::new(SqlStore::sqlite(p).expect("sqlite store")),
            Self::Postgres(pg) => Box::new(SqlStore::open(&pg.url).expect("postgres store")),
        }
    }

    /// Every row of every table, as text, read behind the store's back.
    pub fn dump(&self) -> Vec<(String, String)> {
        match self {
            Self::Sqlite(p) => {
                let conn = rusqlite::Connection::open(p).unwrap();
                let tables: Vec<String> = conn
                    .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
                    .unwrap()
                    .query_map([], |r| r.get(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                let mut out = Vec::new();
                for t in &tables {
                    let mut q = conn.prepare(&format!("SELECT * FROM {t}")).unwrap();
                    let n = q.column_count();
                    let rows: Vec<String> = q
                        .query_map([], |r| {
                            Ok((0..n)
                                .map(|i| {
                                    r.get::<_, rusqlite::types::Value>(i)
                                        .map(|v| format!("{v:?}"))
                                        .unwrap_or_default()
                                })
                                .collect::<Vec<_>>()
                                .join(" "))
                        })
                        .unwrap()
                        .filter_map(Result::ok)
                        .collect();
                    out.extend(rows.into_iter().map(|r| (t.clone(), r)));
                }
                out
            }
            Self::Postgres(pg) => {
                let mut c = pg.client().unwrap();
                let tables: Vec<String> = c
                    .query(
                        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'",
                        &[],
                    )
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                assert!(tables.len() >= 7, "tables: {tables:?}");
                let mut out = Vec::new();
                for t in &tables {
                    for r in c
                        .query(&format!("SELECT row_to_json(x)::text FROM {t} x"), &[])
                        .unwrap()
                    {
                        out.push((t.clone(), r.get(0)));
                    }
                }
                out
            }
        }
    }
}

/// The SQLite store in a fresh directory, then a fresh PostgreSQL database.
pub fn backends(test: &str) -> Vec<Backend> {
    let d = std::env::temp_dir().join(format!("retune-suite-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    vec![
        Backend::Sqlite(d.join("datasets.db")),
        Backend::Postgres(PgTest::new().expect("PostgreSQL for the shared suite")),
    ]
}
