//! Faults end cleanly and visibly, on a real socket over a scripted backend: the
//! drain deadline ends streams with an error event and `[DONE]` and other
//! requests with a 503; a dead engine fails liveness and stops the server with an
//! error; a client that leaves a non-streaming request cancels its generation.

use actix_web::{test as atest, web};
use retune_adapters::BaseShapes;
use retune_config::Settings;
use retune_engine::testing::{Script, ScriptedBackend, Step};
use retune_engine::Health;
use retune_registry::ServedBase;
use retune_server::{app, auth::hash_key, AppState, Application, Shutdown};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn backend(name: &str) -> Arc<ScriptedBackend> {
    let d = std::env::temp_dir().join(format!("retune-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    Arc::new(ScriptedBackend::tiny(&d).unwrap())
}

fn state(b: Arc<ScriptedBackend>, drain: u64) -> AppState {
    let toml = format!(
        "[server]\nport = 0\ndrain_seconds = {drain}\n[model]\npath = \"/m.gguf\"\nid = \"tiny\"\n[engine]\nmax_tokens_cap = 64\n\
         [[tenants]]\nname = \"acme\"\nkey_sha256 = [\"{}\"]\n",
        hash_key("acme-key")
    );
    let settings = Settings::from_toml(&toml, []).unwrap();
    let base = ServedBase {
        shapes: BaseShapes {
            n_layers: 2,
            dims: [(64, 64); 7],
        },
        fingerprint: "fake".into(),
    };
    AppState::new(settings, b, None, None, base).unwrap()
}

/// Serve on a thread: the port, the shutdown handle, and the run's result.
fn serve(
    st: AppState,
) -> (
    u16,
    Shutdown,
    std::sync::mpsc::Receiver<std::io::Result<()>>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let app = Application::serve(st).unwrap();
            tx.send((app.port(), app.shutdown_handle())).unwrap();
            let _ = done_tx.send(app.run_until_stopped().await);
        })
    });
    let (port, sh) = rx.recv().unwrap();
    (port, sh, done)
}

fn send(port: u16, stream: bool) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = format!(
        r#"{{"model":"tiny","stream":{stream},"max_tokens":8,"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer acme-key\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    s
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "never: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_all(mut s: TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_drain_deadline_ends_streams_with_an_error_and_done_and_others_with_503() {
    let b = backend("drain");
    for _ in 0..2 {
        b.push(Script::Stream(vec![Step::Token("a".into()), Step::Hold]));
    }
    let (port, sh, done) = serve(state(b.clone(), 2));
    let streaming = send(port, true);
    let plain = send(port, false);
    wait_for("both generations running", || b.holding() == 2);
    let began = Instant::now();
    sh.begin();
    let s = read_all(streaming);
    let p = read_all(plain);
    let took = began.elapsed();
    assert!(s.starts_with("HTTP/1.1 200"), "{s}");
    assert!(s.contains(r#""content":"a""#), "{s}");
    assert!(s.contains(r#""code":"unavailable""#), "no error event: {s}");
    assert!(
        s.contains("data: [DONE]") && s.ends_with("0\r\n\r\n"),
        "no [DONE] and clean end: {s}"
    );
    assert!(p.starts_with("HTTP/1.1 503"), "{p}");
    assert!(p.contains(r#""code":"unavailable""#), "{p}");
    // cut at 3/4 of a 2 s drain, before actix would close the connections
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(1990),
        "{took:?}"
    );
    let result = done.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn a_dead_engine_ends_requests_and_stops_the_server_with_an_error() {
    let b = backend("dead");
    b.push(Script::Stream(vec![Step::Token("a".into()), Step::Hold]));
    let (port, _sh, done) = serve(state(b.clone(), 30));
    let streaming = send(port, true);
    wait_for("the generation running", || b.holding() == 1);
    b.set_health(Health::Unavailable(
        "the scheduler thread has stopped".into(),
    ));
    let s = read_all(streaming);
    assert!(s.contains(r#""code":"unavailable""#), "{s}");
    assert!(
        s.contains("data: [DONE]") && s.ends_with("0\r\n\r\n"),
        "{s}"
    );
    let result = done.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        result.is_err(),
        "a dead engine must make the process exit non-zero"
    );
}

#[test]
fn a_client_that_leaves_a_non_streaming_request_cancels_its_generation() {
    let b = backend("leave");
    b.push(Script::Stream(vec![Step::Token("a".into()), Step::Hold]));
    let (port, sh, _done) = serve(state(b.clone(), 1));
    let s = send(port, false);
    wait_for("the generation running", || b.holding() == 1);
    drop(s);
    wait_for("the generation cancelled", || b.cancelled() == 1);
    assert_eq!(b.holding(), 0);
    sh.begin();
}

#[actix_web::test]
async fn liveness_fails_when_the_engine_is_dead_and_readiness_while_draining() {
    let b = backend("probes");
    let st = web::Data::new(state(b.clone(), 30));
    let svc = atest::init_service(app(st.clone())).await;
    let get = |p: &str| atest::TestRequest::get().uri(p).to_request();
    assert_eq!(
        atest::call_service(&svc, get("/health")).await.status(),
        200
    );
    assert_eq!(atest::call_service(&svc, get("/ready")).await.status(), 200);
    st.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        atest::call_service(&svc, get("/health")).await.status(),
        200
    );
    assert_eq!(atest::call_service(&svc, get("/ready")).await.status(), 503);
    st.draining
        .store(false, std::sync::atomic::Ordering::SeqCst);
    b.set_health(Health::Unavailable("scheduler panicked".into()));
    assert_eq!(
        atest::call_service(&svc, get("/health")).await.status(),
        503
    );
    assert_eq!(atest::call_service(&svc, get("/ready")).await.status(), 503);
}
