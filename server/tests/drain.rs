//! SIGTERM: stop accepting, let in-flight streams finish, exit 0.

use retune_engine::tiny::{self, TinySpec};
use retune_server::auth::hash_key;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

#[test]
fn sigterm_drains_in_flight_streams_and_exits_zero() {
    let dir = std::env::temp_dir().join(format!("retune-drain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = TinySpec {
        context: 2048,
        ..TinySpec::default()
    };
    let (model, _) = tiny::write(&dir.join("model"), &spec).unwrap();
    let cfg = dir.join("retune.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nport = 0\ndrain_seconds = 30\n[model]\npath = {:?}\nid = \"tiny\"\n[engine]\nmax_tokens_cap = 2000\n\
             [[tenants]]\nname = \"t\"\nkey_sha256 = [\"{}\"]\n",
            model.to_string_lossy(),
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
    // log lines may come first: the port is on the `listening` line
    let mut line = String::new();
    while !line.contains("listening on port") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "no listening line");
    }
    let port: u16 = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{line}"));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body =
        r#"{"model":"tiny","prompt":"hello","max_tokens":1500,"temperature":0,"stream":true}"#;
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut first = [0u8; 64];
    let n = s.read(&mut first).unwrap();
    assert!(
        n > 0 && first.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );
    // the stream is running: ask the server to stop
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("data: [DONE]"),
        "in-flight stream was cut: ...{}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(text.contains(r#""finish_reason":"length""#));
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still accepting after shutdown"
    );
}
