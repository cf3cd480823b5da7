//! The embedded database: one SQLite file per component (WAL, `synchronous =
//! FULL`: a call that returned is on disk), its single writer serialising every
//! write transaction (`BEGIN IMMEDIATE`).

use crate::{migrate, Component, Conn, Db, Mode, Row, SqlError, Watch, R, V};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) struct Sqlite {
    conn: Mutex<rusqlite::Connection>,
    path: PathBuf,
}

impl Sqlite {
    fn connect(path: &Path) -> R<rusqlite::Connection> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(conn)
    }

    pub(crate) fn open(path: &Path, c: &'static Component) -> R<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| SqlError::Db(format!("{}: {e}", dir.display())))?;
        }
        let conn = Self::connect(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let db = Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        };
        let mut tx = db.begin(Mode::Write)?;
        migrate(&mut *tx, c, c.sqlite, &db.location())?;
        tx.commit()?;
        Ok(db)
    }
}

impl rusqlite::ToSql for V {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match self {
            V::Null | V::NullI => ToSqlOutput::Owned(Value::Null),
            V::I(i) => ToSqlOutput::Owned(Value::Integer(*i)),
            V::F(f) => ToSqlOutput::Owned(Value::Real(*f)),
            V::B(b) => ToSqlOutput::Owned(Value::Integer(*b as i64)),
            V::T(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
        })
    }
}

struct SqliteTx<'a> {
    conn: std::sync::MutexGuard<'a, rusqlite::Connection>,
    open: bool,
}

impl Conn for SqliteTx<'_> {
    fn exec(&mut self, sql: &str, p: &[V]) -> R<usize> {
        let mut st = self.conn.prepare_cached(sql)?;
        Ok(st.execute(rusqlite::params_from_iter(p.iter()))?)
    }

    fn query(&mut self, sql: &str, p: &[V]) -> R<Vec<Row>> {
        use rusqlite::types::ValueRef;
        let mut st = self.conn.prepare_cached(sql)?;
        let n = st.column_count();
        let mut rows = st.query(rusqlite::params_from_iter(p.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(n);
            for k in 0..n {
                row.push(match r.get_ref(k)? {
                    ValueRef::Null => V::Null,
                    ValueRef::Integer(i) => V::I(i),
                    ValueRef::Real(f) => V::F(f),
                    ValueRef::Text(t) => V::T(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(_) => {
                        return Err(SqlError::Db(format!("column {k}: unexpected blob")))
                    }
                });
            }
            out.push(Row(row));
        }
        Ok(out)
    }

    fn commit(mut self: Box<Self>) -> R<()> {
        if self.open {
            self.conn.execute_batch("COMMIT")?;
            self.open = false;
        }
        Ok(())
    }

    /// The single writer already serialises every write transaction.
    fn lock(&mut self, _key: &str) -> R<()> {
        Ok(())
    }

    fn batch(&mut self, sql: &str) -> R<()> {
        Ok(self.conn.execute_batch(sql)?)
    }
}

impl Drop for SqliteTx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

impl Db for Sqlite {
    fn begin(&self, mode: Mode) -> R<Box<dyn Conn + '_>> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let begin = match mode {
            Mode::Auto => None,
            Mode::Snapshot => Some("BEGIN"),
            Mode::Tx | Mode::Write => Some("BEGIN IMMEDIATE"),
        };
        if let Some(b) = begin {
            conn.execute_batch(b)?;
        }
        Ok(Box::new(SqliteTx {
            conn,
            open: begin.is_some(),
        }))
    }

    fn reader(&self) -> R<Arc<dyn Db>> {
        Ok(Arc::new(Sqlite {
            conn: Mutex::new(Self::connect(&self.path)?),
            path: self.path.clone(),
        }))
    }

    fn watcher(&self) -> R<Box<dyn Watch>> {
        Ok(Box::new(Sleep))
    }

    fn json_text(&self, column: &str, key: &str) -> String {
        format!("json_extract({column}, '$.{key}')")
    }

    /// SQLite's default collation is already bytewise.
    fn bytewise(&self, expr: &str) -> String {
        expr.to_string()
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

/// SQLite has no change feed: readers poll.
struct Sleep;

impl Watch for Sleep {
    fn wait(&mut self, timeout: Duration) {
        std::thread::sleep(timeout);
    }
}
