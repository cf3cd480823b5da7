//! Capture and the feedback API on the scripted backend (no model, no socket).

use actix_web::{test, web};
use retune_adapters::BaseShapes;
use retune_config::Settings;
use retune_datasets::*;
use retune_engine::guide::Constraint;
use retune_engine::testing::{Script, ScriptedBackend, Step};
use retune_engine::FinishReason;
use retune_registry::ServedBase;
use retune_server::{app, auth::hash_key, AppState};
use std::sync::Arc;
use std::time::Duration;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("retune-capture-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// acme captures everything; globex has capture off.
fn state(
    dir: &std::path::Path,
    store: Arc<dyn DatasetStore>,
) -> (web::Data<AppState>, Arc<ScriptedBackend>) {
    let (st, b) = state_with(dir, store, "");
    (web::Data::new(st), b)
}

/// [`state`] with `server` settings (TOML, a `[server]` table or nothing).
fn state_with(
    dir: &std::path::Path,
    store: Arc<dyn DatasetStore>,
    server: &str,
) -> (AppState, Arc<ScriptedBackend>) {
    let b = Arc::new(ScriptedBackend::tiny(&dir.join("tok")).unwrap());
    let toml = format!(
        "{server}[model]\npath = \"m.gguf\"\nid = \"tiny\"\n[engine]\nmax_tokens_cap = 64\n[auth]\npublic_metrics = true\nadmin_key_sha256 = \"{}\"\n\
         [[tenants]]\nname = \"acme\"\nkey_sha256 = [\"{}\"]\n\
         [[tenants]]\nname = \"globex\"\nkey_sha256 = [\"{}\"]\n[tenants.capture]\nenabled = false\n\
         [[tenants]]\nname = \"initech\"\nkey_sha256 = [\"{}\"]\n[tenants.capture]\nscrub = true\n",
        hash_key("admin-key"),
        hash_key("acme-key"),
        hash_key("globex-key"),
        hash_key("initech-key")
    );
    let settings = Settings::from_toml(&toml, []).unwrap();
    let base = ServedBase {
        shapes: BaseShapes {
            n_layers: 2,
            dims: [(64, 64); 7],
        },
        fingerprint: "fake-base".into(),
    };
    let st = AppState::new(settings, b.clone(), None, None, base)
        .unwrap()
        .with_datasets(store)
        .unwrap();
    (st, b)
}

fn chat(key: &str, stream: bool) -> test::TestRequest {
    test::TestRequest::post()
        .uri("/v1/chat/completions")
        .insert_header(("authorization", format!("Bearer {key}")))
        .set_json(serde_json::json!({
            "model": "tiny", "stream": stream, "temperature": 0.7, "max_tokens": 8, "user": "u-9",
            "messages": [{"role": "user", "content": "my card was charged twice"}]
        }))
}

fn feedback(key: &str, body: serde_json::Value) -> actix_http::Request {
    test::TestRequest::post()
        .uri("/v1/feedback")
        .insert_header(("authorization", format!("Bearer {key}")))
        .set_json(body)
        .to_request()
}

fn script(b: &ScriptedBackend, pieces: &[&str]) {
    let mut steps: Vec<Step> = pieces.iter().map(|p| Step::Token(p.to_string())).collect();
    steps.push(Step::Finish(FinishReason::Stop));
    b.push(Script::Stream(steps));
}

#[actix_web::test]
async fn streamed_and_plain_completions_are_captured_with_the_text_the_client_got() {
    let dir = tmp("both");
    let store = Arc::new(SqlStore::sqlite(&dir.join("datasets.db")).unwrap());
    let (st, b) = state(&dir, store.clone());
    let capture = st.capture.clone().unwrap();
    let svc = test::init_service(app(st)).await;
    script(&b, &["card_", "payment"]);
    let resp = test::call_service(&svc, chat("acme-key", false).to_request()).await;
    let j: serde_json::Value = serde_json::from_slice(&test::read_body(resp).await).unwrap();
    let plain_id = j["id"].as_str().unwrap().to_string();
    script(&b, &["é", "\u{1F600}", " ok"]);
    let resp = test::call_service(&svc, chat("acme-key", true).to_request()).await;
    let sse = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
    let chunks: Vec<serde_json::Value> = sse
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed_id = chunks[0]["id"].as_str().unwrap().to_string();
    let received: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(capture.flush(Duration::from_secs(10)));
    let plain = store.completion("acme", &plain_id).unwrap();
    assert_eq!(plain.output_text, "card_payment");
    assert_eq!(plain.output_ids, vec![1000, 1001]);
    assert_eq!(
        plain.request["messages"][0]["content"],
        "my card was charged twice"
    );
    assert_eq!(plain.user.as_deref(), Some("u-9"));
    assert_eq!(plain.base_fingerprint, "fake-base");
    assert_eq!(
        (plain.adapter.as_deref(), plain.finish.as_str()),
        (None, "stop")
    );
    assert!(
        plain.params["seed"].is_u64(),
        "the seed used is recorded: {}",
        plain.params
    );
    assert_eq!(plain.params["temperature"], 0.7f32 as f64);
    let streamed = store.completion("acme", &streamed_id).unwrap();
    assert_eq!(streamed.output_text, received);
    assert_eq!(received, "é\u{1F600} ok");
    // a tenant with capture off leaves nothing
    script(&b, &["x"]);
    let resp = test::call_service(&svc, chat("globex-key", false).to_request()).await;
    let j: serde_json::Value = serde_json::from_slice(&test::read_body(resp).await).unwrap();
    assert!(capture.flush(Duration::from_secs(10)));
    assert!(store
        .completion("globex", j["id"].as_str().unwrap())
        .is_err());
}

#[actix_web::test]
async fn a_tenant_that_scrubs_before_store_keeps_no_personal_data() {
    let dir = tmp("scrub");
    let store = Arc::new(SqlStore::sqlite(&dir.join("datasets.db")).unwrap());
    let (st, b) = state(&dir, store.clone());
    let capture = st.capture.clone().unwrap();
    let svc = test::init_service(app(st)).await;
    script(&b, &["write to ", "ann@example.com"]);
    let req = test::TestRequest::post()
        .uri("/v1/chat/completions")
        .insert_header(("authorization", "Bearer initech-key"))
        .set_json(serde_json::json!({"model": "tiny", "max_tokens": 8,
            "messages": [{"role": "user", "content": "my card 4539 5787 6362 1486 was charged"}]}))
        .to_request();
    let j: serde_json::Value = test::read_body_json(test::call_service(&svc, req).await).await;
    assert_eq!(
        j["choices"][0]["message"]["content"], "write to ann@example.com",
        "the client gets the text"
    );
    assert!(capture.flush(Duration::from_secs(10)));
    let c = store
        .completion("initech", j["id"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        c.request["messages"][0]["content"],
        "my card [CARD] was charged"
    );
    assert_eq!(c.output_text, "write to [EMAIL]");
    assert!(c.output_ids.is_empty(), "ids would spell the address");
}

#[actix_web::test]
async fn feedback_is_durable_versioned_and_private_to_its_tenant() {
    let dir = tmp("feedback");
    let store = Arc::new(SqlStore::sqlite(&dir.join("datasets.db")).unwrap());
    let (st, b) = state(&dir, store.clone());
    let svc = test::init_service(app(st)).await;
    script(&b, &["fee"]);
    let resp = test::call_service(&svc, chat("acme-key", false).to_request()).await;
    let j: serde_json::Value = serde_json::from_slice(&test::read_body(resp).await).unwrap();
    let id = j["id"].as_str().unwrap().to_string();
    // right after the completion: the writer is caught up before the lookup fails
    let resp = test::call_service(
        &svc,
        feedback("acme-key", serde_json::json!({"completion_id": id, "rating": -1, "correction": "wrong_fee", "labels": {"intent": "fee"}})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let resp = test::call_service(
        &svc,
        feedback("acme-key", serde_json::json!({"completion_id": id, "correction": {"role": "assistant", "content": "charged_twice"}, "subject_id": "p-7"})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    // on disk before the answer: a fresh connection sees it
    let fresh = SqlStore::sqlite(&dir.join("datasets.db")).unwrap();
    let st = fresh.feedback("acme", &id).unwrap();
    assert_eq!(st.correction.as_deref(), Some("charged_twice"));
    assert_eq!((st.rating, st.events), (Some(-1), 2));
    let req = test::TestRequest::get()
        .uri(&format!("/v1/feedback/{id}"))
        .insert_header(("authorization", "Bearer acme-key"))
        .to_request();
    let got: serde_json::Value =
        serde_json::from_slice(&test::read_body(test::call_service(&svc, req).await).await)
            .unwrap();
    assert_eq!(got["correction"], "charged_twice");
    assert_eq!(got["labels"]["intent"], "fee");
    assert_eq!(got["subject_id"], "p-7");
    // another tenant's id and an unknown id: the same 404 (but for the id itself)
    let other = test::call_service(
        &svc,
        feedback(
            "globex-key",
            serde_json::json!({"completion_id": id, "rating": 1}),
        ),
    )
    .await;
    assert_eq!(other.status(), 404);
    let other = String::from_utf8(test::read_body(other).await.to_vec()).unwrap();
    let unknown = test::call_service(
        &svc,
        feedback(
            "globex-key",
            serde_json::json!({"completion_id": "chatcmpl-nope", "rating": 1}),
        ),
    )
    .await;
    assert_eq!(unknown.status(), 404);
    let unknown = String::from_utf8(test::read_body(unknown).await.to_vec()).unwrap();
    assert_eq!(
        other.replace(&id, "ID"),
        unknown.replace("chatcmpl-nope", "ID")
    );
    let req = test::TestRequest::get()
        .uri(&format!("/v1/feedback/{id}"))
        .insert_header(("authorization", "Bearer globex-key"))
        .to_request();
    assert_eq!(test::call_service(&svc, req).await.status(), 404);
    assert_eq!(
        fresh.feedback("acme", &id).unwrap().events,
        2,
        "nothing written by globex"
    );
}

#[actix_web::test]
async fn malformed_feedback_is_a_400_naming_the_field() {
    let dir = tmp("bad");
    let store = Arc::new(SqlStore::sqlite(&dir.join("datasets.db")).unwrap());
    let (st, _) = state(&dir, store);
    let svc = test::init_service(app(st)).await;
    for (body, param) in [
        (
            serde_json::json!({"completion_id": "c", "rating": 5}),
            "rating",
        ),
        (
            serde_json::json!({"completion_id": "c", "rating": "up"}),
            "rating",
        ),
        (
            serde_json::json!({"completion_id": "c", "labels": {"a": 1}}),
            "labels",
        ),
        (
            serde_json::json!({"completion_id": "c", "labels": ["a"]}),
            "labels",
        ),
        (
            serde_json::json!({"completion_id": "c", "correction": {"role": "user", "content": "x"}}),
            "correction",
        ),
        (
            serde_json::json!({"completion_id": "c", "correction": 3}),
            "correction",
        ),
        (serde_json::json!({"rating": 1}), "completion_id"),
        (serde_json::json!({"completion_id": "c"}), "rating"),
        (
            serde_json::json!({"completion_id": "c", "rating": 1, "ratng": 1}),
            "ratng",
        ),
    ] {
        let resp = test::call_service(&svc, feedback("acme-key", body.clone())).await;
        assert_eq!(resp.status(), 400, "{body}");
        let j: serde_json::Value = serde_json::from_slice(&test::read_body(resp).await).unwrap();
        assert_eq!(j["error"]["param"], param, "{body}: {j}");
    }
    let req = test::TestRequest::post()
        .uri("/v1/feedback")
        .insert_header(("authorization", "Bearer acme-key"))
        .insert_header(("content-type", "application/json"))
        .set_payload(vec![b'x'; 8 << 20])
        .to_request();
    assert_eq!(test::call_service(&svc, req).await.status(), 413);
}

/// A store that fails its writes (a full disk) or takes its time (a saturated one).
struct Faulty {
    inner: SqlStore,
    fail: bool,
    delay: Duration,
}

impl Faulty {
    fn new(dir: &std::path::Path, fail: bool, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: SqlStore::sqlite(&dir.join("datasets.db")).unwrap(),
            fail,
            delay,
        })
    }

    fn write(&self) -> Result<(), DataError> {
        std::thread::sleep(self.delay);
        match self.fail {
            true => Err(DataError::Db(
                "disk I/O error at /var/lib/retune/datasets.db".into(),
            )),
            false => Ok(()),
        }
    }
}

impl DatasetStore for Faulty {
    fn record(&self, batch: &[CapturedCompletion]) -> Result<(), DataError> {
        self.write()?;
        self.inner.record(batch)
    }
    fn completion(&self, t: &str, id: &str) -> Result<CapturedCompletion, DataError> {
        self.inner.completion(t, id)
    }
    fn add_feedback(&self, t: &str, fb: &Feedback) -> Result<FeedbackState, DataError> {
        self.write()?;
        self.inner.add_feedback(t, fb)
    }
    fn feedback(&self, t: &str, id: &str) -> Result<FeedbackState, DataError> {
        self.inner.feedback(t, id)
    }
    fn import(&self, t: &str, a: &str, s: &str, rows: &[ImportRow]) -> Result<usize, DataError> {
        self.inner.import(t, a, s, rows)
    }
    fn snapshot(&self, t: &str, a: &str, p: &Policy) -> Result<Manifest, DataError> {
        self.inner.snapshot(t, a, p)
    }
    fn manifest(&self, t: &str, id: &str) -> Result<Manifest, DataError> {
        self.inner.manifest(t, id)
    }
    fn snapshots(&self, t: &str, a: Option<&str>) -> Result<Vec<Manifest>, DataError> {
        self.inner.snapshots(t, a)
    }
    fn snapshot_rows(&self, t: &str, id: &str) -> Result<Vec<SnapshotRow>, DataError> {
        self.inner.snapshot_rows(t, id)
    }
    fn set_suspects(
        &self,
        t: &str,
        id: &str,
        s: &retune_datasets::snapshot::Suspects,
    ) -> Result<Manifest, DataError> {
        self.inner.set_suspects(t, id, s)
    }
    fn lineage(&self, t: &str, s: &str) -> Result<Lineage, DataError> {
        self.inner.lineage(t, s)
    }
    fn reviewed_keys(
        &self,
        t: &str,
        a: &str,
    ) -> Result<std::collections::BTreeSet<String>, DataError> {
        self.inner.reviewed_keys(t, a)
    }
    fn erase(&self, t: &str, s: &str) -> Result<Erased, DataError> {
        self.inner.erase(t, s)
    }
    fn purge_before(&self, t: &str, before: i64) -> Result<usize, DataError> {
        self.inner.purge_before(t, before)
    }
    fn candidates_since(
        &self,
        t: &str,
        a: &str,
        since: i64,
        pos: bool,
    ) -> Result<usize, DataError> {
        self.inner.candidates_since(t, a, since, pos)
    }
    fn signals(
        &self,
        t: &str,
        a: &str,
        v: &str,
        from: i64,
        to: i64,
    ) -> Result<retune_datasets::Signals, DataError> {
        self.inner.signals(t, a, v, from, to)
    }
    fn adapters(&self) -> Result<Vec<(String, String)>, DataError> {
        self.inner.adapters()
    }
}

#[actix_web::test]
async fn completions_succeed_and_drops_are_counted_while_the_store_fails() {
    let dir = tmp("broken");
    let store = Faulty::new(&dir, true, Duration::ZERO);
    let (st, _) = state(&dir, store);
    let capture = st.capture.clone().unwrap();
    let svc = test::init_service(app(st)).await;
    for stream in [false, true, false] {
        let resp = test::call_service(&svc, chat("acme-key", stream).to_request()).await;
        assert_eq!(resp.status(), 200);
        test::read_body(resp).await;
    }
    assert!(capture.flush(Duration::from_secs(10)));
    let req = test::TestRequest::get().uri("/metrics").to_request();
    let m = String::from_utf8(
        test::read_body(test::call_service(&svc, req).await)
            .await
            .to_vec(),
    )
    .unwrap();
    assert!(m.contains("retune_capture_dropped_total 3"), "{m}");
    // a feedback write the store refuses is a 5xx without the path
    let resp = test::call_service(
        &svc,
        feedback(
            "acme-key",
            serde_json::json!({"completion_id": "c", "rating": 1}),
        ),
    )
    .await;
    assert_eq!(resp.status(), 500);
    let body = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
    assert!(!body.contains("/var/lib"), "{body}");
}

#[actix_web::test]
async fn a_declared_label_task_refuses_examples_outside_its_label_set_by_line() {
    let dir = tmp("declared-labels");
    let store = Arc::new(SqlStore::sqlite(&dir.join("datasets.db")).unwrap());
    let (st, _b) = state_with(
        &dir,
        store.clone(),
        "[[trainer.adapters]]\ntenant = \"acme\"\nname = \"tickets\"\n[trainer.adapters.data]\nlabels = [\"card_arrival\", \"refund\"]\n",
    );
    let svc = test::init_service(app(web::Data::new(st))).await;
    let jsonl = [
        r#"{"messages": [{"role": "user", "content": "where is my card"}, {"role": "assistant", "content": "card_arrival"}]}"#,
        r#"{"messages": [{"role": "user", "content": "money back?"}, {"role": "assistant", "content": "refund please"}]}"#,
        r#"{"messages": [{"role": "user", "content": "money back?"}, {"role": "assistant", "content": "x"}], "label": "refund"}"#,
        r#"{"messages": [{"role": "user", "content": "card?"}, {"role": "assistant", "content": "card_arrival"}], "label": 7}"#,
        r#"{"prompt": "fee?", "completion": "fees"}"#,
    ]
    .join("\n");
    let req = test::TestRequest::post()
        .uri("/admin/data/acme/tickets/import")
        .insert_header(("authorization", "Bearer admin-key"))
        .set_payload(jsonl)
        .to_request();
    let j: serde_json::Value = test::read_body_json(test::call_service(&svc, req).await).await;
    assert_eq!(j["imported"], 2, "{j}");
    let lines: Vec<u64> = j["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [2, 4, 5], "{j}");
    assert!(j["errors"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("`refund please` is not one of the task's 2 declared labels"));
    assert!(j["errors"][1]["reason"]
        .as_str()
        .unwrap()
        .contains("must be a string"));
    // another adapter of the tenant declares no labels: anything goes
    let req = test::TestRequest::post()
        .uri("/admin/data/acme/other/import")
        .insert_header(("authorization", "Bearer admin-key"))
        .set_payload(r#"{"prompt": "fee?", "completion": "fees"}"#)
        .to_request();
    let j: serde_json::Value = test::read_body_json(test::call_service(&svc, req).await).await;
    assert_eq!(j["imported"], 1, "{j}");
}

#[actix_web::test]
async fn a_declared_label_task_is_answered_under_its_label_set_unless_the_client_constrains() {
    let dir = tmp("declared-choice");
    let store = Arc::new(SqlStore::sqlite(&dir.join("datasets.db")).unwrap());
    let (st, b) = state_with(
        &dir,
        store,
        "[[trainer.adapters]]\ntenant = \"acme\"\nname = \"tickets\"\n[trainer.adapters.data]\nlabels = [\"card_arrival\", \"refund\"]\n",
    );
    let svc = test::init_service(app(web::Data::new(st))).await;
    let ask = |model: &str, extra: serde_json::Value| {
        let mut body = serde_json::json!({"model": model, "max_tokens": 8,
            "messages": [{"role": "user", "content": "where is my card"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        test::TestRequest::post()
            .uri("/v1/chat/completions")
            .insert_header(("authorization", "Bearer acme-key"))
            .set_json(body)
            .to_request()
    };
    let labels = vec!["card_arrival".to_string(), "refund".to_string()];
    script(&b, &["card_arrival"]);
    let resp = test::call_service(&svc, ask("tickets", serde_json::json!({}))).await;
    assert_eq!(resp.status(), 200);
    let last = b.submitted().pop().unwrap();
    assert_eq!(
        last.params().constraint,
        Some(Constraint::Choice {
            choices: labels.clone()
        })
    );
    // the client's own constraint is kept
    script(&b, &["x"]);
    let resp = test::call_service(
        &svc,
        ask("tickets", serde_json::json!({"guided_choice": ["x", "y"]})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        b.submitted().pop().unwrap().params().constraint,
        Some(Constraint::Choice {
            choices: vec!["x".into(), "y".into()]
        })
    );
    // the base model (no task declared under that name) is free
    script(&b, &["hi"]);
    let resp = test::call_service(&svc, ask("tiny", serde_json::json!({}))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(b.submitted().pop().unwrap().params().constraint, None);
}

#[actix_web::test]
async fn the_admin_data_api_imports_snapshots_exports_and_erases() {
    let dir = tmp("admin");
    let store = Arc::new(SqlStore::sqlite(&dir.join("datasets.db")).unwrap());
    let (st, b) = state(&dir, store);
    let svc = test::init_service(app(st)).await;
    let admin = |method: test::TestRequest, uri: &str| {
        method
            .uri(uri)
            .insert_header(("authorization", "Bearer admin-key"))
    };
    let jsonl = [
        r#"{"messages": [{"role": "user", "content": "where is my card"}, {"role": "assistant", "content": "card_arrival"}], "subject_id": "zed"}"#,
        "not json",
        r#"{"prompt": "fee?", "completion": "card_payment_fee_charged"}"#,
    ]
    .join("\n");
    let req = admin(test::TestRequest::post(), "/admin/data/acme/tickets/import")
        .set_payload(jsonl)
        .to_request();
    let j: serde_json::Value = test::read_body_json(test::call_service(&svc, req).await).await;
    assert_eq!(j["imported"], 2);
    assert_eq!(j["errors"][0]["line"], 2);
    // a corrected capture of the base model is not an example of the adapter
    script(&b, &["wrong"]);
    let resp = test::call_service(&svc, chat("acme-key", false).to_request()).await;
    let c: serde_json::Value = test::read_body_json(resp).await;
    let fbr = feedback(
        "acme-key",
        serde_json::json!({"completion_id": c["id"], "correction": "transaction_charged_twice"}),
    );
    assert_eq!(test::call_service(&svc, fbr).await.status(), 200);
    let req = admin(
        test::TestRequest::post(),
        "/admin/data/acme/tickets/snapshots",
    )
    .to_request();
    let m: serde_json::Value = test::read_body_json(test::call_service(&svc, req).await).await;
    assert_eq!(
        m["train"].as_u64().unwrap() + m["eval"].as_u64().unwrap(),
        2,
        "{m}"
    );
    let id = m["id"].as_str().unwrap().to_string();
    let req = admin(
        test::TestRequest::get(),
        &format!("/admin/data/acme/snapshots/{id}/export"),
    )
    .to_request();
    let text = String::from_utf8(
        test::read_body(test::call_service(&svc, req).await)
            .await
            .to_vec(),
    )
    .unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(
        text.contains("card_arrival") && !text.contains("transaction_charged_twice"),
        "{text}"
    );
    let req = admin(test::TestRequest::post(), "/admin/data/acme/erase")
        .set_json(serde_json::json!({"subject_id": "zed"}))
        .to_request();
    let r: serde_json::Value = test::read_body_json(test::call_service(&svc, req).await).await;
    assert_eq!(r["erased"]["examples"], 1);
    assert_eq!(r["erased"]["snapshots"], serde_json::json!([id]));
    // a tenant key is not an admin key
    let req = test::TestRequest::post()
        .uri("/admin/data/acme/erase")
        .insert_header(("authorization", "Bearer acme-key"))
        .set_json(serde_json::json!({"subject_id": "zed"}))
        .to_request();
    assert_eq!(test::call_service(&svc, req).await.status(), 401);
    let req = admin(
        test::TestRequest::get(),
        "/admin/data/globex/snapshots/nope",
    )
    .to_request();
    assert_eq!(test::call_service(&svc, req).await.status(), 404);
}

#[actix_web::test]
async fn a_slow_store_never_delays_a_completion() {
    let dir = tmp("slow");
    let store = Faulty::new(&dir, false, Duration::from_millis(1500));
    let (st, _) = state(&dir, store.clone());
    let capture = st.capture.clone().unwrap();
    let svc = test::init_service(app(st)).await;
    let t = std::time::Instant::now();
    let mut ids = Vec::new();
    for stream in [false, true, false, true] {
        let resp = test::call_service(&svc, chat("acme-key", stream).to_request()).await;
        assert_eq!(resp.status(), 200);
        let body = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
        ids.push(
            body.split("cmpl-")
                .nth(1)
                .map(|r| format!("chatcmpl-{}", &r[..32]))
                .unwrap(),
        );
    }
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "completions waited for the store: {:?}",
        t.elapsed()
    );
    // and the records arrive once the store catches up
    assert!(capture.flush(Duration::from_secs(20)));
    for id in &ids {
        assert!(store.completion("acme", id).is_ok(), "{id}");
    }
}

/// The process ends when the server returns: what its handlers queued for a
/// slow store must be written by then, not die with the writer thread.
// the plain test attribute (`test` here is actix's module)
#[core::prelude::v1::test]
fn a_stopping_server_writes_the_captures_still_queued_before_it_returns() {
    use std::io::{Read, Write};
    let dir = tmp("exit");
    let store = Faulty::new(&dir, false, Duration::from_millis(600));
    let (st, _) = state_with(
        &dir,
        store.clone(),
        "[server]\nport = 0\ndrain_seconds = 2\n",
    );
    let capture = st.capture.clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let app = retune_server::Application::serve(st).unwrap();
            tx.send((app.port(), app.shutdown_handle())).unwrap();
            let _ = done_tx.send(app.run_until_stopped().await);
        })
    });
    let (port, sh) = rx.recv().unwrap();
    let mut ids = Vec::new();
    for stream in [false, true, false, true, false] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let body = format!(
            r#"{{"model":"tiny","stream":{stream},"max_tokens":8,"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer acme-key\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let id = out
            .split("cmpl-")
            .nth(1)
            .map(|r| format!("chatcmpl-{}", &r[..32]));
        ids.push(id.unwrap());
    }
    // the first write is still in the store's 600 ms: the rest wait in the queue
    assert_eq!(
        capture
            .stats()
            .captured
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    sh.begin();
    let result = done.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(result.is_ok(), "{result:?}");
    for id in &ids {
        assert!(store.completion("acme", id).is_ok(), "lost at exit: {id}");
    }
}

#[actix_web::test]
async fn postgresql_down_for_ten_seconds_serving_goes_on_feedback_is_a_503_and_it_resumes() {
    let dir = tmp("pg-outage");
    // the PostgreSQL client blocks: never on the async runtime's threads
    let (pg, store) = tokio::task::spawn_blocking(|| {
        let pg = retune_testkit::pg::PgTest::private().unwrap();
        let store = Arc::new(SqlStore::open(&pg.url).unwrap());
        (pg, store)
    })
    .await
    .unwrap();
    let (st, b) = state(&dir, store.clone());
    let capture = st.capture.clone().unwrap();
    let svc = test::init_service(app(st)).await;
    let complete = |b: &ScriptedBackend| script(b, &["fee"]);
    complete(&b);
    let resp = test::call_service(&svc, chat("acme-key", false).to_request()).await;
    let j: serde_json::Value = serde_json::from_slice(&test::read_body(resp).await).unwrap();
    let id = j["id"].as_str().unwrap().to_string();
    let fb = |c: &str| serde_json::json!({"completion_id": id, "correction": c});
    let resp = test::call_service(&svc, feedback("acme-key", fb("before"))).await;
    assert_eq!(resp.status(), 200);

    pg.stop().unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let (mut served, mut refused) = (0, 0);
    let mut during = Vec::new();
    while std::time::Instant::now() < until {
        complete(&b);
        let resp = test::call_service(&svc, chat("acme-key", false).to_request()).await;
        assert_eq!(resp.status(), 200, "serving does not need the store");
        let j: serde_json::Value = serde_json::from_slice(&test::read_body(resp).await).unwrap();
        during.push(j["id"].as_str().unwrap().to_string());
        served += 1;
        let resp = test::call_service(&svc, feedback("acme-key", fb("during"))).await;
        assert_eq!(
            resp.status(),
            503,
            "never acknowledged while it cannot be written"
        );
        assert_eq!(
            resp.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            Some("1")
        );
        let body: serde_json::Value = serde_json::from_slice(&test::read_body(resp).await).unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("unavailable"),
            "{body}"
        );
        refused += 1;
    }
    assert!(
        served >= 3 && refused >= 3,
        "{served} served, {refused} refused"
    );

    pg.start().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let resp = test::call_service(&svc, feedback("acme-key", fb("after"))).await;
        if resp.status() == 200 {
            break;
        }
        assert_eq!(resp.status(), 503);
        assert!(std::time::Instant::now() < deadline, "did not resume");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // exactly what was acknowledged: before and after, nothing from the outage
    let reader = store.clone();
    let st = tokio::task::spawn_blocking(move || reader.feedback("acme", &id).unwrap())
        .await
        .unwrap();
    assert_eq!(st.correction.as_deref(), Some("after"));
    assert_eq!(st.events, 2);
    // the completions served during the outage were held and written after it
    let flushed = tokio::task::spawn_blocking(move || capture.flush(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(flushed, "the held captures were written");
    let missing = tokio::task::spawn_blocking(move || {
        during
            .iter()
            .filter(|id| store.completion("acme", id).is_err())
            .cloned()
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(
        missing.is_empty(),
        "captures lost in the outage: {missing:?}"
    );
}

/// The review queue over the admin API: a snapshot under `review` lists its
/// suspects, a verdict is written durably and leaves the queue; bad verdicts
/// name the field (400) or the missing row (404).
#[actix_web::test]
async fn the_admin_review_queue_lists_suspects_and_takes_verdicts() {
    let dir = tmp("review");
    let store = Arc::new(SqlStore::sqlite(&dir.join("datasets.db")).unwrap());
    let (st, _) = state(&dir, store.clone());
    let svc = test::init_service(app(st)).await;
    let admin = |method: test::TestRequest, uri: &str| {
        method
            .uri(uri)
            .insert_header(("authorization", "Bearer admin-key"))
    };
    // two clearly separate intents; three rows carry the other one's label
    let mut lines = Vec::new();
    for i in 0..60 {
        let (q, mut l) = if i % 2 == 0 {
            (
                format!("my card number {i} was stolen, block the card"),
                "card_lost",
            )
        } else {
            (format!("refund order {i}, i want my money back"), "refund")
        };
        if [4, 11, 20].contains(&i) {
            l = if l == "refund" { "card_lost" } else { "refund" };
        }
        lines.push(
            serde_json::json!({"messages": [{"role": "user", "content": q},
                {"role": "assistant", "content": l}], "label": l})
            .to_string(),
        );
    }
    let req = admin(test::TestRequest::post(), "/admin/data/acme/intents/import")
        .set_payload(lines.join("\n"))
        .to_request();
    assert_eq!(test::call_service(&svc, req).await.status(), 200);
    let req = admin(
        test::TestRequest::post(),
        "/admin/data/acme/intents/snapshots",
    )
    .set_json(serde_json::json!({"include_positive": true, "scrub": true,
            "eval_percent": 10, "suspects": "review"}))
    .to_request();
    let m: serde_json::Value = test::read_body_json(test::call_service(&svc, req).await).await;
    assert_eq!(m["suspects"]["policy"], "review", "{m}");
    let req = admin(test::TestRequest::get(), "/admin/data/acme/intents/review").to_request();
    let q: serde_json::Value = test::read_body_json(test::call_service(&svc, req).await).await;
    let items = q["items"].as_array().unwrap().clone();
    assert!(!items.is_empty(), "{q}");
    assert!(items.iter().all(|i| i["given"] != i["suggested"]), "{q}");
    let first = &items[0];
    let post = |body: serde_json::Value| {
        admin(test::TestRequest::post(), "/admin/data/acme/intents/review")
            .set_json(body)
            .to_request()
    };
    let resp = test::call_service(
        &svc,
        post(serde_json::json!({"input_key": first["input_key"], "label": " "})),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let e: serde_json::Value = test::read_body_json(resp).await;
    assert_eq!(e["error"]["param"], "label", "{e}");
    let resp = test::call_service(
        &svc,
        post(serde_json::json!({"input_key": "nope", "label": "refund"})),
    )
    .await;
    assert_eq!(resp.status(), 404);
    assert!(store.reviewed_keys("acme", "intents").unwrap().is_empty());
    let resp = test::call_service(
        &svc,
        post(serde_json::json!({"input_key": first["input_key"], "label": first["suggested"]})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let done: serde_json::Value = test::read_body_json(resp).await;
    assert_eq!(done["written"], 1);
    // durable before the answer: the store has it
    assert_eq!(store.reviewed_keys("acme", "intents").unwrap().len(), 1);
    let req = admin(test::TestRequest::get(), "/admin/data/acme/intents/review").to_request();
    let q2: serde_json::Value = test::read_body_json(test::call_service(&svc, req).await).await;
    assert_eq!(q2["items"].as_array().unwrap().len(), items.len() - 1);
    assert_eq!(q2["reviewed"], 1);
}
