//! Real PostgreSQL for tests and benchmarks (not a mock): a fresh database per
//! test in the cluster `RETUNE_TEST_PG_URL` names (`scripts/test.sh` starts one
//! with `scripts/pg-cluster.sh`), or, when that is unset, a private throwaway
//! cluster started here. A test that must stop the server gets its own cluster.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static N: AtomicUsize = AtomicUsize::new(0);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-cluster.sh")
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(script())
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", script().display()))?;
    if !out.status.success() {
        return Err(format!(
            "pg-cluster.sh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A database for one test; a private cluster is stopped and removed on drop.
pub struct PgTest {
    /// The test's own database.
    pub url: String,
    /// The cluster's maintenance database.
    pub admin_url: String,
    cluster: Option<PathBuf>,
}

impl PgTest {
    /// A fresh, empty database (in the shared cluster when one is set).
    pub fn new() -> Result<Self, String> {
        match std::env::var("RETUNE_TEST_PG_URL") {
            Ok(admin) if !admin.is_empty() => Self::in_cluster(admin, None),
            _ => Self::private(),
        }
    }

    /// A fresh database in a cluster of its own, which [`stop`](Self::stop)
    /// and [`start`](Self::start) control.
    pub fn private() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!(
            "retune-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let d = dir.to_string_lossy().to_string();
        let admin = run(&["start", &d])?;
        Self::in_cluster(admin, Some(dir))
    }

    fn in_cluster(admin: String, cluster: Option<PathBuf>) -> Result<Self, String> {
        let name = format!(
            "t_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        let mut c = postgres::Client::connect(&admin, postgres::NoTls)
            .map_err(|e| format!("connect {admin}: {e}"))?;
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .map_err(|e| format!("create database: {e}"))?;
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b.to_string())
            .unwrap_or(admin.clone());
        Ok(Self {
            url: format!("{base}/{name}"),
            admin_url: admin,
            cluster,
        })
    }

    /// Fast shutdown of a private cluster: open connections are cut.
    pub fn stop(&self) -> Result<(), String> {
        let dir = self.cluster.as_ref().ok_or("not a private cluster")?;
        run(&["stop", &dir.to_string_lossy()]).map(|_| ())
    }

    /// Start a private cluster again, on the same port.
    pub fn start(&self) -> Result<(), String> {
        let dir = self.cluster.as_ref().ok_or("not a private cluster")?;
        run(&["start", &dir.to_string_lossy()]).map(|_| ())
    }

    /// A client on the test's database, for checks behind the store's back.
    pub fn client(&self) -> Result<postgres::Client, String> {
        connect(&self.url)
    }
}

/// A private cluster that takes TLS connections only (`pg-cluster.sh
/// start-tls`): its certificate names 127.0.0.1 and no host name; stopped and
/// removed on drop.
pub struct PgTlsCluster {
    /// The maintenance database, without TLS options (refused as it is).
    pub url: String,
    /// The CA that signed the server's certificate (PEM).
    pub ca: PathBuf,
    /// A CA that signed nothing the server has.
    pub other_ca: PathBuf,
    dir: PathBuf,
}

impl PgTlsCluster {
    pub fn start() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!(
            "retune-pgtls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let url = run(&["start-tls", &dir.to_string_lossy()])?;
        Ok(Self {
            url,
            ca: dir.join("tls/ca.pem"),
            other_ca: dir.join("tls/other-ca.pem"),
            dir,
        })
    }
}

impl Drop for PgTlsCluster {
    fn drop(&mut self) {
        let _ = run(&["stop", &self.dir.to_string_lossy()]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client on `url` (a test's database, or a copy of its URL).
pub fn connect(url: &str) -> Result<postgres::Client, String> {
    postgres::Client::connect(url, postgres::NoTls).map_err(|e| e.to_string())
}

impl Drop for PgTest {
    fn drop(&mut self) {
        if let Some(dir) = &self.cluster {
            let _ = run(&["stop", &dir.to_string_lossy()]);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
