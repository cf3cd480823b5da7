//! The shared database: PostgreSQL, for replicas. Connections come from a pool
//! (`r2d2`), each checked before use; a server that cannot be reached makes a
//! call fail with [`SqlError::Unavailable`] at once, never hang it, and the
//! pool reconnects by itself. Migrations run at open under an advisory lock, so
//! replicas starting together apply each once.

use crate::{migrate, Component, Conn, Db, Mode, Row, SqlError, Watch, MIGRATE_LOCK, R, V};
use postgres::types::{IsNull, ToSql, Type};
use r2d2_postgres::PostgresConnectionManager;
use retune_config::pg::{describe, explain, pg_target, PgTarget, PgTls};
use std::sync::Arc;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A call waits this long for a connection, then fails as unavailable: a
/// server that is down answers its callers' retries, not their patience.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

type Pool = r2d2::Pool<PostgresConnectionManager<PgTls>>;

pub(crate) struct Pg {
    pool: Pool,
    cfg: postgres::Config,
    tls: PgTls,
    at: String,
    component: &'static Component,
}

impl From<postgres::Error> for SqlError {
    /// SQL errors are the database's fault (`Db`); a connection that is gone,
    /// refused or shutting down is `Unavailable`.
    fn from(e: postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                // class 08: connection exception; 57P01-03: shutdown, cannot connect now
                if code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03") {
                    SqlError::Unavailable(format!("PostgreSQL: {}", db.message()))
                } else {
                    SqlError::Db(format!("PostgreSQL: {} ({code})", db.message()))
                }
            }
            None => SqlError::Unavailable(format!("PostgreSQL: {e}")),
        }
    }
}

impl Pg {
    /// Connect to `url`, run the migrations of `c` the database lacks. Refused:
    /// a URL that does not parse (`Location`), a server that cannot be reached
    /// within a few seconds (`Unavailable`), a schema newer than this build
    /// (`Schema`).
    pub(crate) fn open(url: &str, c: &'static Component) -> R<Self> {
        let PgTarget {
            config: mut cfg,
            tls,
            ..
        } = pg_target(url).map_err(|e| SqlError::Location(e.to_string()))?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(CONNECT_TIMEOUT);
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name(c.application_name);
        }
        let at = describe(&cfg);
        // one connection first, for the reason when it fails (the pool's
        // error carries the text "db error" and nothing else)
        drop(cfg.connect(tls.clone()).map_err(|e| {
            SqlError::Unavailable(format!(
                "cannot connect to PostgreSQL at {at}: {}",
                explain(&e)
            ))
        })?);
        let pool = r2d2::Pool::builder()
            .max_size(c.pool_size)
            .min_idle(Some(1))
            .connection_timeout(CONNECT_TIMEOUT)
            .test_on_check_out(true)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build(PostgresConnectionManager::new(cfg.clone(), tls.clone()))
            .map_err(|e| {
                SqlError::Unavailable(format!("cannot connect to PostgreSQL at {at}: {e}"))
            })?;
        let db = Self {
            pool,
            cfg,
            tls,
            at,
            component: c,
        };
        let mut tx = db.begin(Mode::Tx)?;
        // one migrator at a time across replicas and components
        tx.exec(
            &format!("SELECT pg_advisory_xact_lock({MIGRATE_LOCK})"),
            &[],
        )?;
        migrate(&mut *tx, c, c.postgres, &db.at)?;
        tx.commit()?;
        Ok(db)
    }

    fn conn(&self) -> R<r2d2::PooledConnection<PostgresConnectionManager<PgTls>>> {
        self.pool
            .get_timeout(CALL_TIMEOUT)
            .map_err(|e| SqlError::Unavailable(format!("PostgreSQL at {}: {e}", self.at)))
    }
}

/// `?N` placeholders as PostgreSQL's `$N` (outside string literals).
fn dollars(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

impl ToSql for V {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            V::Null | V::NullI => Ok(IsNull::Yes),
            V::I(i) => i.to_sql(ty, out),
            V::F(f) => f.to_sql(ty, out),
            V::B(b) => b.to_sql(ty, out),
            V::T(t) => t.as_str().to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::INT8 | Type::FLOAT8 | Type::BOOL | Type::TEXT)
    }

    postgres::types::to_sql_checked!();
}

fn pg_type(v: &V) -> Type {
    match v {
        V::Null | V::T(_) => Type::TEXT,
        V::NullI | V::I(_) => Type::INT8,
        V::F(_) => Type::FLOAT8,
        V::B(_) => Type::BOOL,
    }
}

struct PgTx {
    conn: r2d2::PooledConnection<PostgresConnectionManager<PgTls>>,
    open: bool,
}

impl PgTx {
    fn params(p: &[V]) -> Vec<(&(dyn ToSql + Sync), Type)> {
        p.iter()
            .map(|v| (v as &(dyn ToSql + Sync), pg_type(v)))
            .collect()
    }
}

impl Conn for PgTx {
    fn exec(&mut self, sql: &str, p: &[V]) -> R<usize> {
        Ok(self.conn.execute_typed(&dollars(sql), &Self::params(p))? as usize)
    }

    fn query(&mut self, sql: &str, p: &[V]) -> R<Vec<Row>> {
        let rows = self.conn.query_typed(&dollars(sql), &Self::params(p))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut row = Vec::with_capacity(r.len());
            for (k, col) in r.columns().iter().enumerate() {
                let v = match *col.type_() {
                    Type::INT8 => r.try_get::<_, Option<i64>>(k)?.map_or(V::NullI, V::I),
                    Type::INT4 => r
                        .try_get::<_, Option<i32>>(k)?
                        .map_or(V::NullI, |i| V::I(i.into())),
                    Type::FLOAT8 => r.try_get::<_, Option<f64>>(k)?.map_or(V::NullI, V::F),
                    Type::BOOL => r.try_get::<_, Option<bool>>(k)?.map_or(V::NullI, V::B),
                    Type::TEXT | Type::VARCHAR => {
                        r.try_get::<_, Option<String>>(k)?.map_or(V::Null, V::T)
                    }
                    ref other => {
                        return Err(SqlError::Db(format!("column {k}: unexpected type {other}")))
                    }
                };
                row.push(v);
            }
            out.push(Row(row));
        }
        Ok(out)
    }

    fn commit(mut self: Box<Self>) -> R<()> {
        if self.open {
            self.open = false;
            self.conn.batch_execute("COMMIT")?;
        }
        Ok(())
    }

    fn lock(&mut self, key: &str) -> R<()> {
        self.exec(
            "SELECT pg_advisory_xact_lock(hashtextextended(?1, 0))",
            &[V::from(key)],
        )?;
        Ok(())
    }

    fn batch(&mut self, sql: &str) -> R<()> {
        Ok(self.conn.batch_execute(sql)?)
    }
}

impl Drop for PgTx {
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.batch_execute("ROLLBACK");
        }
    }
}

impl Db for Pg {
    fn begin(&self, mode: Mode) -> R<Box<dyn Conn + '_>> {
        let mut conn = self.conn()?;
        let begin = match mode {
            Mode::Auto => None,
            Mode::Snapshot => Some("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".to_string()),
            Mode::Tx => Some("BEGIN".to_string()),
            Mode::Write => Some(format!(
                "BEGIN; SELECT pg_advisory_xact_lock({})",
                self.component.write_lock
            )),
        };
        if let Some(b) = &begin {
            conn.batch_execute(b)?;
        }
        Ok(Box::new(PgTx {
            conn,
            open: begin.is_some(),
        }))
    }

    fn reader(&self) -> R<Arc<dyn Db>> {
        // the pool's other connections already read beside the writers
        Ok(Arc::new(Pg {
            pool: self.pool.clone(),
            cfg: self.cfg.clone(),
            tls: self.tls.clone(),
            at: self.at.clone(),
            component: self.component,
        }))
    }

    fn watcher(&self) -> R<Box<dyn Watch>> {
        let Some(channel) = self.component.channel else {
            return Ok(Box::new(Poll));
        };
        let mut w = Listen {
            cfg: self.cfg.clone(),
            tls: self.tls.clone(),
            channel,
            client: None,
        };
        w.connect()?;
        Ok(Box::new(w))
    }

    fn json_text(&self, column: &str, key: &str) -> String {
        format!("({column}::jsonb ->> '{key}')")
    }

    fn bytewise(&self, expr: &str) -> String {
        format!("{expr} COLLATE \"C\"")
    }

    fn location(&self) -> String {
        self.at.clone()
    }
}

/// A component without a channel: readers poll.
struct Poll;

impl Watch for Poll {
    fn wait(&mut self, timeout: Duration) {
        std::thread::sleep(timeout);
    }
}

/// `LISTEN` on a connection of its own; reconnects after the server comes back
/// (the caller reads everything again after every wait, so a notification
/// lost while disconnected costs one poll interval, never a change).
struct Listen {
    cfg: postgres::Config,
    tls: PgTls,
    channel: &'static str,
    client: Option<postgres::Client>,
}

impl Listen {
    fn connect(&mut self) -> R<()> {
        let mut c = self.cfg.connect(self.tls.clone())?;
        c.batch_execute(&format!("LISTEN {}", self.channel))?;
        self.client = Some(c);
        Ok(())
    }
}

impl Watch for Listen {
    fn wait(&mut self, timeout: Duration) {
        use postgres::fallible_iterator::FallibleIterator;
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            // back soon either way: the refresh after a reconnect reads what
            // was committed while nobody listened
            if self.connect().is_err() {
                std::thread::sleep(timeout.min(Duration::from_millis(500)));
            }
            return;
        }
        let Some(c) = self.client.as_mut() else {
            return;
        };
        let got = c
            .notifications()
            .timeout_iter(timeout)
            .next()
            .map(|n| n.is_some());
        match got {
            Ok(true) => {
                // one refresh reads them all
                let mut n = c.notifications();
                while let Ok(Some(_)) = n.iter().next() {}
            }
            Ok(false) => {}
            Err(_) => {
                self.client = None;
                std::thread::sleep(timeout.min(Duration::from_millis(200)));
            }
        }
    }
}
