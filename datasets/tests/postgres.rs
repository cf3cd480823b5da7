//! What only the shared PostgreSQL store has to hold: refusals at open, a
//! server that goes away and comes back, replicas writing at once.

use retune_datasets::*;
use retune_testkit::pg::{PgTest, PgTlsCluster};
use std::time::{Duration, Instant};

fn completion(id: &str) -> CapturedCompletion {
    CapturedCompletion {
        id: id.into(),
        tenant: "acme".into(),
        adapter: Some("tickets".into()),
        version: Some("v1".into()),
        base_fingerprint: "base".into(),
        request: serde_json::json!({"messages": [{"role": "user", "content": format!("question {id}")}]}),
        params: serde_json::json!({}),
        output_text: "answer".into(),
        output_ids: vec![1],
        finish: retune_datasets::Finish::Stop,
        prompt_tokens: 3,
        completion_tokens: 1,
        ttft_ms: 1.0,
        total_ms: 2.0,
        user: None,
        created_at: 1,
    }
}

fn correction(id: &str, text: &str) -> Feedback {
    Feedback {
        completion_id: id.into(),
        correction: Some(text.into()),
        ..Feedback::default()
    }
}

#[test]
fn a_bad_url_an_unreachable_server_and_a_newer_schema_are_refused_with_the_reason() {
    match SqlStore::open("postgres://nobody@127.0.0.1:notaport/db") {
        Err(DataError::Invalid { field, .. }) => assert_eq!(field, "datasets.url"),
        other => panic!("bad URL: {:?}", other.err()),
    }
    // a port nothing listens on: refused within the connect timeout, naming where
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = Instant::now();
    match SqlStore::open(&format!("postgres://postgres:secret@127.0.0.1:{port}/x")) {
        Err(DataError::Unavailable(m)) => {
            assert!(m.contains(&format!("127.0.0.1:{port}/x")), "{m}");
            assert!(!m.contains("secret"), "the password is not printed: {m}");
        }
        other => panic!("unreachable: {:?}", other.err()),
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    let pg = PgTest::new().unwrap();
    drop(SqlStore::open(&pg.url).unwrap());
    // opening again applies nothing twice
    drop(SqlStore::open(&pg.url).unwrap());
    let mut c = pg.client().unwrap();
    let n: i64 = c
        .query_one(
            "SELECT COUNT(*) FROM retune_migrations WHERE component = 'datasets'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, retune_datasets::PG_SCHEMA_VERSION as i64);
    c.execute(
        "INSERT INTO retune_migrations VALUES ('datasets', 999, 'from the future', 0)",
        &[],
    )
    .unwrap();
    match SqlStore::open(&pg.url) {
        Err(DataError::Schema(m)) => assert!(m.contains("999"), "{m}"),
        other => panic!("newer schema: {:?}", other.err()),
    }
}

/// A server that takes TLS only (as managed databases are often set): reached
/// with `sslmode` and the CA that signed its certificate; a certificate from
/// another CA, or one that does not name the host connected to, is refused
/// with the reason.
#[test]
fn a_tls_only_server_is_reached_over_verified_tls_and_bad_certificates_are_refused() {
    let c = PgTlsCluster::start().unwrap();
    let (ca, other) = (c.ca.display(), c.other_ca.display());
    // without TLS the server refuses: what works below went over TLS
    match SqlStore::open(&c.url) {
        Err(DataError::Unavailable(m)) => assert!(m.contains("no encryption"), "{m}"),
        other => panic!("plain connection: {:?}", other.err()),
    }
    for mode in ["require", "verify-ca", "verify-full", "prefer"] {
        let url = format!("{}?sslmode={mode}&sslrootcert={ca}", c.url);
        let store = SqlStore::open(&url).unwrap_or_else(|e| panic!("{mode}: {e}"));
        let id = format!("c-{mode}");
        store.record(&[completion(&id)]).unwrap();
        assert_eq!(store.completion("acme", &id).unwrap().output_text, "answer");
    }
    // the CA is percent-encoded in the URL like any query value
    let enc = ca.to_string().replace('/', "%2F");
    SqlStore::open(&format!("{}?sslmode=verify-full&sslrootcert={enc}", c.url)).unwrap();
    // signed by a CA this client was not told to trust
    let url = format!("{}?sslmode=require&sslrootcert={other}", c.url);
    match SqlStore::open(&url) {
        Err(DataError::Unavailable(m)) => {
            assert!(m.contains("invalid peer certificate: UnknownIssuer"), "{m}")
        }
        other => panic!("unrelated CA: {:?}", other.err()),
    }
    // the right CA, but `localhost` is not a name the certificate has
    let url =
        format!("{}?sslmode=verify-full&sslrootcert={ca}", c.url).replace("127.0.0.1", "localhost");
    match SqlStore::open(&url) {
        Err(DataError::Unavailable(m)) => {
            assert!(m.contains("not valid for name \"localhost\""), "{m}")
        }
        other => panic!("wrong name: {:?}", other.err()),
    }
    // options that cannot be honoured: refused at open, naming them
    for (q, says) in [
        ("sslmode=allow", "sslmode=allow"),
        ("sslmode=require&sslcert=/c.pem", "sslcert"),
        (
            "sslmode=require&sslrootcert=/nonexistent/ca.pem",
            "/nonexistent/ca.pem",
        ),
    ] {
        match SqlStore::open(&format!("{}?{q}", c.url)) {
            Err(DataError::Invalid { field, reason }) => {
                assert_eq!(field, "datasets.url");
                assert!(reason.contains(says), "{q}: {reason}");
            }
            other => panic!("{q}: {:?}", other.err()),
        }
    }
}

#[test]
fn replicas_opening_and_writing_at_once_see_one_store() {
    let pg = PgTest::new().unwrap();
    // four replicas migrate an empty database at the same moment
    let stores: Vec<SqlStore> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| SqlStore::open(&pg.url).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    stores[0]
        .record(
            &(0..40)
                .map(|i| completion(&format!("c{i}")))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    // each replica corrects its share; snapshots race with the writes
    let manifests: Vec<Manifest> = std::thread::scope(|s| {
        let hs: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(r, st)| {
                s.spawn(move || {
                    for i in (r..40).step_by(4) {
                        st.add_feedback(
                            "acme",
                            &correction(&format!("c{i}"), &format!("fixed {i}")),
                        )
                        .unwrap();
                    }
                    st.snapshot("acme", "tickets", &Policy::default()).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(manifests.iter().all(|m| m.train + m.eval <= 40));
    // after every write, any replica curates the same snapshot
    let a = stores[1]
        .snapshot("acme", "tickets", &Policy::default())
        .unwrap();
    let b = stores[3]
        .snapshot("acme", "tickets", &Policy::default())
        .unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(a.train + a.eval, 40);
    for (i, st) in stores.iter().enumerate() {
        assert_eq!(
            st.feedback("acme", &format!("c{}", (i + 1) % 4))
                .unwrap()
                .correction,
            Some(format!("fixed {}", (i + 1) % 4))
        );
    }
}

#[test]
fn a_server_gone_fails_writes_as_unavailable_and_the_store_resumes_by_itself() {
    let pg = PgTest::private().unwrap();
    let s = SqlStore::open(&pg.url).unwrap();
    s.record(&[completion("c1"), completion("c2")]).unwrap();
    s.add_feedback("acme", &correction("c1", "before")).unwrap();
    pg.stop().unwrap();
    let t = Instant::now();
    for _ in 0..3 {
        match s.add_feedback("acme", &correction("c2", "during")) {
            Err(DataError::Unavailable(_)) => {}
            other => panic!("while down: {other:?}"),
        }
    }
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    pg.start().unwrap();
    // the pool reconnects: no reopen, no restart
    let deadline = Instant::now() + Duration::from_secs(15);
    let st = loop {
        match s.add_feedback("acme", &correction("c2", "after")) {
            Ok(st) => break st,
            Err(DataError::Unavailable(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("after restart: {e}"),
        }
    };
    assert_eq!(st.correction.as_deref(), Some("after"));
    assert_eq!(st.events, 1, "nothing written while it was down");
    assert_eq!(
        s.feedback("acme", "c1").unwrap().correction.as_deref(),
        Some("before")
    );
}
