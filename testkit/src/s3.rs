//! A real S3-compatible server for tests and benchmarks (not an in-process
//! fake): `s3s-fs` (crates.io, Apache-2.0) over a temporary directory on a free
//! port, one per test, which the test can stop and start again. `.ci/run`
//! installs it; `RETUNE_S3S_FS` names the binary when it is not on `PATH`.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static N: AtomicUsize = AtomicUsize::new(0);

pub const ACCESS_KEY: &str = "retune-test";
pub const SECRET_KEY: &str = "retune-test-secret";
pub const BUCKET: &str = "adapters";

pub struct S3Test {
    /// `http://127.0.0.1:port`
    pub endpoint: String,
    /// `s3://adapters/<prefix>`
    pub url: String,
    /// The server's data directory: objects lie under `dir/adapters/...`.
    pub dir: PathBuf,
    port: u16,
    child: Mutex<Option<Child>>,
}

fn binary() -> String {
    std::env::var("RETUNE_S3S_FS").unwrap_or_else(|_| "s3s-fs".into())
}

impl S3Test {
    /// A server with an empty bucket; the AWS credentials it accepts are set in
    /// this process's environment (where the store reads them).
    pub fn new() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!(
            "retune-s3-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(BUCKET)).map_err(|e| e.to_string())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        let s = Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            url: format!("s3://{BUCKET}/versions"),
            dir,
            port,
            child: Mutex::new(None),
        };
        s.start()?;
        Ok(s)
    }

    /// Start the server (again, on the same port and directory).
    pub fn start(&self) -> Result<(), String> {
        let child = Command::new(binary())
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {} (install it: cargo install s3s-fs --version 0.14.1 \
                     --features binary, or set RETUNE_S3S_FS): {e}",
                    binary()
                )
            })?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if t.elapsed() > Duration::from_secs(10) {
                return Err("s3s-fs did not start listening within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stop the server (SIGKILL: an outage, not a shutdown).
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The file holding object `key` (below the bucket).
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.dir.join(BUCKET).join(key)
    }
}

impl Drop for S3Test {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
