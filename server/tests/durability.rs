//! A feedback write answered 200 survives `kill -9` of the server right after.

use retune_datasets::{DatasetStore, SqlStore};
use retune_engine::tiny::{self, TinySpec};
use retune_server::auth::hash_key;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

/// One HTTP/1.1 request on a fresh connection; (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn feedback_answered_200_survives_kill_9() {
    let dir = std::env::temp_dir().join(format!("retune-kill9-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (model, _) = tiny::write(&dir.join("model"), &TinySpec::default()).unwrap();
    let root = dir.join("data");
    let cfg = dir.join("retune.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nport = 0\n[model]\npath = {:?}\nid = \"tiny\"\n[engine]\nmax_tokens_cap = 16\n\
             [adapters]\nroot = {:?}\n[[tenants]]\nname = \"t\"\nkey_sha256 = [\"{}\"]\n",
            model.to_string_lossy(),
            root.to_string_lossy(),
            hash_key("k")
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_retune"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on port") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "no listening line");
    }
    let port: u16 = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
    let (status, body) = http(
        port,
        "POST",
        "/v1/completions",
        r#"{"model":"tiny","prompt":"hello","max_tokens":4}"#,
    );
    assert_eq!(status, 200, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let fb = format!(r#"{{"completion_id":"{id}","correction":"hello world","rating":-1}}"#);
    let (status, body) = http(port, "POST", "/v1/feedback", &fb);
    assert_eq!(status, 200, "{body}");
    child.kill().unwrap(); // SIGKILL, right after the answer
    child.wait().unwrap();
    let store = SqlStore::sqlite(&root.join("datasets.db")).unwrap();
    let st = store.feedback("t", &id).unwrap();
    assert_eq!(st.correction.as_deref(), Some("hello world"));
    assert_eq!((st.rating, st.events), (Some(-1), 1));
    assert_eq!(store.completion("t", &id).unwrap().output_ids.len(), 4);
}
