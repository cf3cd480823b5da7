//! The HTTP layer on a scripted backend (no model, no socket): how each kind of
//! generation failure reaches a client, and what the validated request holds.

use actix_web::{test, web};
use retune_adapters::BaseShapes;
use retune_config::Settings;
use retune_engine::testing::{Script, ScriptedBackend, Step};
use retune_engine::{ErrorKind, FinishReason, GenError, Health};
use retune_registry::ServedBase;
use retune_server::{app, auth::hash_key, AppState};
use std::sync::{Arc, OnceLock};

/// One tokenizer for all tests (written once, under the temp dir).
fn backend() -> Arc<ScriptedBackend> {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("retune-fake-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    });
    let sub = dir.join(format!("{:x}", rand_id()));
    Arc::new(ScriptedBackend::tiny(&sub).unwrap())
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn state(b: Arc<ScriptedBackend>) -> web::Data<AppState> {
    let toml = format!(
        "[model]\npath = \"/srv/models/secret-base.gguf\"\nid = \"tiny\"\n[engine]\nmax_tokens_cap = 64\n\
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
    web::Data::new(AppState::new(settings, b, None, None, base).unwrap())
}

fn chat(stream: bool) -> test::TestRequest {
    test::TestRequest::post()
        .uri("/v1/chat/completions")
        .insert_header(("authorization", "Bearer acme-key"))
        .set_json(serde_json::json!({
            "model": "tiny", "stream": stream, "temperature": 0.7, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello"}]
        }))
}

/// The `data:` payloads of an SSE body.
fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

const SECRET: &str = "/srv/adapters/acme/tickets/0abc/adapter_model.safetensors: corrupt";

#[actix_web::test]
async fn an_error_mid_stream_ends_the_stream_with_an_error_event_then_done() {
    let b = backend();
    b.push(Script::Stream(vec![
        Step::Token("Hel".into()),
        Step::Token("lo".into()),
        Step::Fail(GenError::internal(SECRET)),
    ]));
    let svc = test::init_service(app(state(b))).await;
    let resp = test::call_service(&svc, chat(true).to_request()).await;
    assert_eq!(resp.status(), 200, "the stream had started");
    let rid = resp
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let ev = events(&test::read_body(resp).await);
    assert_eq!(ev.len(), 4, "{ev:?}");
    let text: String = ev[..2]
        .iter()
        .map(|e| {
            let j: serde_json::Value = serde_json::from_str(e).unwrap();
            j["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text, "Hello");
    let err: serde_json::Value = serde_json::from_str(&ev[2]).unwrap();
    assert_eq!(err["error"]["type"], "server_error");
    assert_eq!(err["error"]["code"], "internal_error");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&rid), "request id in the message: {msg}");
    assert!(!ev[2].contains("/srv"), "no server path: {}", ev[2]);
    assert_eq!(ev[3], "[DONE]");
}

#[actix_web::test]
async fn an_internal_error_is_a_5xx_with_the_request_id_and_no_path() {
    let b = backend();
    b.push(Script::Stream(vec![Step::Fail(GenError::internal(SECRET))]));
    let svc = test::init_service(app(state(b))).await;
    let req = chat(false)
        .insert_header(("x-request-id", "trace-42"))
        .to_request();
    let resp = test::call_service(&svc, req).await;
    assert_eq!(resp.status(), 500);
    assert_eq!(resp.headers().get("x-request-id").unwrap(), "trace-42");
    let body = test::read_body(resp).await;
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["error"]["code"], "internal_error");
    assert_eq!(
        j["error"]["message"],
        "internal server error (request id trace-42)"
    );
    let text = String::from_utf8_lossy(&body);
    assert!(
        !text.contains("/srv") && !text.contains("corrupt"),
        "{text}"
    );
}

#[actix_web::test]
async fn each_error_kind_maps_to_its_status_and_only_client_messages_are_shown() {
    let cases = [
        (ErrorKind::Client, 400, "invalid_request_error"),
        (ErrorKind::Adapter, 503, "server_error"),
        (ErrorKind::Capacity, 429, "rate_limit_error"),
        (ErrorKind::Unavailable, 503, "server_error"),
        (ErrorKind::AdapterUnavailable, 503, "server_error"),
        (ErrorKind::Internal, 500, "server_error"),
    ];
    for (kind, status, typ) in cases {
        for refuse in [true, false] {
            let b = backend();
            let e = GenError::new(kind, "detail at /srv/x");
            b.push(if refuse {
                Script::Refuse(e)
            } else {
                Script::Stream(vec![Step::Fail(e)])
            });
            let svc = test::init_service(app(state(b))).await;
            let resp = test::call_service(&svc, chat(false).to_request()).await;
            assert_eq!(resp.status(), status, "{kind:?} refuse={refuse}");
            if kind == ErrorKind::Capacity {
                assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
            }
            let j: serde_json::Value =
                serde_json::from_slice(&test::read_body(resp).await).unwrap();
            assert_eq!(j["error"]["type"], typ, "{kind:?}");
            let message = j["error"]["message"].as_str().unwrap();
            assert_eq!(
                message.contains("/srv/x"),
                kind == ErrorKind::Client,
                "{kind:?}: {j}"
            );
            // a store that cannot be reached and a server going down say so apart
            assert_eq!(
                message.contains("adapter's files cannot be fetched"),
                kind == ErrorKind::AdapterUnavailable,
                "{kind:?}: {j}"
            );
        }
    }
}

#[actix_web::test]
async fn overload_at_submit_answers_429_and_the_stream_is_not_started() {
    let b = backend();
    b.push(Script::Refuse(GenError::new(
        ErrorKind::Capacity,
        "queue full",
    )));
    let svc = test::init_service(app(state(b.clone()))).await;
    let resp = test::call_service(&svc, chat(true).to_request()).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
    assert_eq!(b.submitted().len(), 1, "the backend refused it");
    // the next request is served
    let resp = test::call_service(&svc, chat(false).to_request()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(b.submitted().len(), 2);
}

#[actix_web::test]
async fn a_backend_that_goes_away_mid_stream_ends_the_stream_with_an_error() {
    let b = backend();
    b.push(Script::Stream(vec![Step::Token("a".into()), Step::HangUp]));
    b.push(Script::Stream(vec![Step::HangUp]));
    let svc = test::init_service(app(state(b.clone()))).await;
    let resp = test::call_service(&svc, chat(true).to_request()).await;
    let ev = events(&test::read_body(resp).await);
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert!(ev[1].contains("\"server_error\""));
    assert_eq!(ev[2], "[DONE]");
    let resp = test::call_service(&svc, chat(false).to_request()).await;
    assert_eq!(
        resp.status(),
        500,
        "a lost result of a healthy backend is a fault"
    );
    // a backend that stopped: readiness says so, and a lost result is a 503
    b.set_health(Health::Unavailable("scheduler stopped".into()));
    let req = test::TestRequest::get().uri("/ready").to_request();
    assert_eq!(test::call_service(&svc, req).await.status(), 503);
    b.push(Script::Stream(vec![Step::HangUp]));
    let resp = test::call_service(&svc, chat(false).to_request()).await;
    assert_eq!(resp.status(), 503);
}

#[actix_web::test]
async fn bad_parameters_are_refused_before_the_backend_sees_the_request() {
    let b = backend();
    let svc = test::init_service(app(state(b.clone()))).await;
    for body in [
        serde_json::json!({"model": "tiny", "max_tokens": 65, "messages": [{"role": "user", "content": "x"}]}),
        serde_json::json!({"model": "tiny", "temperature": -1, "messages": [{"role": "user", "content": "x"}]}),
        serde_json::json!({"model": "tiny", "n": 99, "messages": [{"role": "user", "content": "x"}]}),
    ] {
        let req = test::TestRequest::post()
            .uri("/v1/chat/completions")
            .insert_header(("authorization", "Bearer acme-key"))
            .set_json(&body)
            .to_request();
        assert_eq!(test::call_service(&svc, req).await.status(), 400, "{body}");
    }
    assert!(b.submitted().is_empty());
}

#[actix_web::test]
async fn the_validated_request_carries_a_seed_and_the_completion_reports_usage() {
    let b = backend();
    b.push(Script::Stream(vec![
        Step::Token("a".into()),
        Step::Token("b".into()),
        Step::Finish(FinishReason::Length),
    ]));
    let svc = test::init_service(app(state(b.clone()))).await;
    let resp = test::call_service(&svc, chat(false).to_request()).await;
    assert_eq!(resp.status(), 200);
    let j: serde_json::Value = serde_json::from_slice(&test::read_body(resp).await).unwrap();
    assert_eq!(j["choices"][0]["message"]["content"], "ab");
    assert_eq!(j["choices"][0]["finish_reason"], "length");
    assert_eq!(j["usage"]["completion_tokens"], 2);
    let sent = b.submitted();
    assert_eq!(sent.len(), 1);
    let p = sent[0].params();
    assert!(p.seed.is_some(), "a seed is drawn for an unseeded request");
    assert_eq!((p.temperature, p.max_tokens), (0.7, 8));
    assert!(sent[0].adapter().is_none());
    assert_eq!(j["usage"]["prompt_tokens"], sent[0].prompt().len());
}
