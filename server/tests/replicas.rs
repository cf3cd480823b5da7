//! Three `retune serve` processes sharing one PostgreSQL registry and datasets
//! store and one S3-compatible version store (s3s-fs), each with its own data
//! root (its verified cache): a promotion or a rollback through any of them is
//! served by all within 1 s (the alias poll is set far longer: only the
//! registry's NOTIFY can bring it), and hot swaps every 150 ms with clients on
//! every replica fail nothing, each response matching the version its header
//! names. With the bucket down, a cold version's requests get a clear 503 while
//! the live one serves, and with PostgreSQL down for 10 s every replica serves
//! from memory, feedback is a 503, and everything resumes by itself.

use retune_engine::tiny::{self, TinySpec};
use retune_registry::{open_store, BlobStore, Expect, NewVersion, Registry, ServedBase};
use retune_server::auth::hash_key;
use retune_testkit::pg::PgTest;
use retune_testkit::s3::S3Test;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Resp {
    status: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn version(&self) -> Option<String> {
        self.headers
            .lines()
            .find_map(|l| l.strip_prefix("x-retune-adapter-version: "))
            .map(|v| v.trim().to_string())
    }
    fn text(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

fn http(port: u16, method: &str, path: &str, key: &str, body: &str) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (headers, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Resp {
        status: out[9..12].parse().unwrap(),
        headers: headers.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

fn chat(port: u16, model: &str) -> Resp {
    http(
        port,
        "POST",
        "/v1/chat/completions",
        "acme-key",
        &format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello world"}}],"max_tokens":8,"temperature":0}}"#
        ),
    )
}

/// The replicas, killed when the test ends however it ends.
struct Replicas(Vec<Child>);

impl Drop for Replicas {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn serve(cfg: &Path) -> (Child, u16) {
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
    let port = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
    // keep draining its log so it never blocks on a full pipe
    std::thread::spawn(move || {
        let mut sink = String::new();
        while err.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    (child, port)
}

/// A registry handle of the test's own (its own cache of the bucket).
fn handle(url: &str, s3: &S3Test, cache: &Path) -> Registry {
    let store: Arc<dyn BlobStore> = open_store(cache, Some(&s3.url), Some(&s3.endpoint)).unwrap();
    Registry::open_at(url, store, 1 << 30).unwrap()
}

/// Versions of acme/tickets (seeds) in the shared stores, the first live.
fn register(dir: &Path, reg: &Registry, model: &Path, seeds: &[u64]) -> Vec<String> {
    let m = retune_engine::load(model).unwrap().model;
    let base = ServedBase {
        shapes: m.base_shapes(),
        fingerprint: m.fingerprint(),
    };
    let spec = TinySpec::default();
    let ids: Vec<String> = seeds
        .iter()
        .map(|&seed| {
            let up = dir.join(format!("upload-{seed}"));
            tiny::write_adapter(&up, &spec, 8, &[0, 1, 2, 3, 4, 5, 6], seed, 16.0, 0.5).unwrap();
            reg.register(
                NewVersion {
                    tenant: "acme",
                    name: "tickets",
                    dir: &up,
                    source: "upload",
                    parent: None,
                    metadata: serde_json::json!({}),
                    claimed_base: None,
                    actor: "t",
                },
                &base,
            )
            .unwrap()
            .id
        })
        .collect();
    if reg.state("acme", "tickets").unwrap().live.is_none() {
        reg.promote("acme", "tickets", &ids[0], Expect::NoLive, "t", "init")
            .unwrap();
    }
    ids
}

#[test]
fn three_replicas_on_postgresql_see_every_promotion_and_rollback_within_a_second_and_hot_swaps_fail_nothing(
) {
    let pg = PgTest::private().unwrap(); // stopped and started below
    let dir: PathBuf = std::env::temp_dir().join(format!("retune-replicas-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (model, _) = tiny::write(&dir.join("model"), &TinySpec::default()).unwrap();
    let s3 = S3Test::new().unwrap();
    let mine = handle(&pg.url, &s3, &dir.join("test-cache"));
    let ids = register(&dir, &mine, &model, &[3, 4]);
    let (v1, v2) = (ids[0].clone(), ids[1].clone());
    let mut replicas = Replicas(Vec::new());
    let mut ports = Vec::new();
    for i in 0..3 {
        // each replica its own data root: nothing shared but the three stores
        let cfg = dir.join(format!("retune-{i}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[server]\nport = 0\n[model]\npath = {:?}\nid = \"tiny\"\n[engine]\nmax_tokens_cap = 16\n\
                 [adapters]\nroot = {:?}\nregistry_url = {:?}\nstore_url = {:?}\nstore_endpoint = {:?}\n\
                 alias_poll_ms = 600000\nserved_flush_ms = 200\n\
                 [datasets]\nurl = {:?}\n[auth]\nadmin_key_sha256 = \"{}\"\n\
                 [[tenants]]\nname = \"acme\"\nkey_sha256 = [\"{}\"]\n",
                model.to_string_lossy(),
                dir.join(format!("data-{i}")).to_string_lossy(),
                pg.url,
                s3.url,
                s3.endpoint,
                pg.url,
                hash_key("admin-key"),
                hash_key("acme-key"),
            ),
        )
        .unwrap();
        let (c, p) = serve(&cfg);
        replicas.0.push(c);
        ports.push(p);
    }
    // what each version answers (pinned), on every replica alike
    let mut expected = HashMap::new();
    for v in [&v1, &v2] {
        let texts: Vec<String> = ports
            .iter()
            .map(|&p| {
                let r = chat(p, &format!("tickets@{v}"));
                assert_eq!(r.status, 200, "{}", r.body);
                r.text()
            })
            .collect();
        assert!(texts.windows(2).all(|w| w[0] == w[1]), "{texts:?}");
        expected.insert(v.clone(), texts[0].clone());
    }
    assert_ne!(
        expected[&v1], expected[&v2],
        "versions must be distinguishable"
    );
    for &p in &ports {
        assert_eq!(chat(p, "tickets").version().as_deref(), Some(v1.as_str()));
    }

    // promotions and rollbacks through each replica in turn
    let admin = "/admin/adapters/acme/tickets";
    let mut live = v1.clone();
    let mut worst = Duration::ZERO;
    for round in 0..6 {
        let via = ports[round % 3];
        let t = Instant::now();
        let r = if round % 2 == 0 {
            let next = if live == v1 { &v2 } else { &v1 };
            http(
                via,
                "POST",
                &format!("{admin}/promote"),
                "admin-key",
                &format!(r#"{{"version":"{next}","expected":"{live}","reason":"round {round}"}}"#),
            )
        } else {
            http(
                via,
                "POST",
                &format!("{admin}/rollback"),
                "admin-key",
                r#"{"reason":"undo"}"#,
            )
        };
        assert_eq!(r.status, 200, "round {round}: {}", r.body);
        let now: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        live = now["live"].as_str().unwrap().to_string();
        for &p in &ports {
            loop {
                let r = chat(p, "tickets");
                assert_eq!(r.status, 200, "{}", r.body);
                if r.version().as_deref() == Some(live.as_str()) {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(1),
                    "round {round}: replica on port {p} still serves {:?}, live is {live}",
                    r.version()
                );
            }
        }
        worst = worst.max(t.elapsed());
    }
    println!("slowest change served by all three replicas: {worst:?}");

    // hot swaps every 150 ms through the shared registry, clients on every replica
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, a, b) = (stop.clone(), v1.clone(), v2.clone());
        let reg = handle(&pg.url, &s3, &dir.join("swapper-cache"));
        std::thread::spawn(move || {
            let mut swaps = 0;
            while !stop.load(Ordering::Relaxed) {
                let live = reg.state("acme", "tickets").unwrap().live.unwrap();
                let next = if live == a { &b } else { &a };
                reg.promote(
                    "acme",
                    "tickets",
                    next,
                    Expect::Version(live),
                    "swapper",
                    "",
                )
                .unwrap();
                swaps += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
            swaps
        })
    };
    let clients: Vec<_> = ports
        .iter()
        .flat_map(|&p| [p, p])
        .map(|p| {
            let (stop, expected) = (stop.clone(), expected.clone());
            std::thread::spawn(move || {
                let mut seen = HashMap::<String, usize>::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = chat(p, "tickets");
                    assert_eq!(r.status, 200, "{}", r.body);
                    let v = r.version().expect("a version header");
                    assert_eq!(
                        r.text(),
                        expected[&v],
                        "response does not match the version {v} its header names"
                    );
                    *seen.entry(v).or_default() += 1;
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    let mut total = HashMap::<String, usize>::new();
    for c in clients {
        for (v, n) in c.join().unwrap() {
            *total.entry(v).or_default() += n;
        }
    }
    println!("{swaps} swaps, responses by version: {total:?}");
    assert!(swaps >= 10, "{swaps}");
    assert!(
        total.len() == 2 && total.values().all(|&n| n > 0),
        "both versions served during the swaps: {total:?}"
    );

    // PostgreSQL down for 10 s under load: every replica serves the live version
    // from memory, feedback is a 503 (never acknowledged and then lost), and
    // everything resumes by itself
    let live = mine.state("acme", "tickets").unwrap().live.unwrap();
    pg.stop().unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let (mut served, mut refused) = (0, 0);
    while Instant::now() < until {
        for &p in &ports {
            let r = chat(p, "tickets");
            assert_eq!(r.status, 200, "serving needs no database: {}", r.body);
            assert_eq!(r.version().as_deref(), Some(live.as_str()));
            served += 1;
            let id = serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string();
            let f = http(
                p,
                "POST",
                "/v1/feedback",
                "acme-key",
                &format!(r#"{{"completion_id":"{id}","rating":1}}"#),
            );
            assert_eq!(f.status, 503, "{}", f.body);
            assert!(f.headers.contains("retry-after"), "{}", f.headers);
            refused += 1;
        }
    }
    assert!(
        served >= 6 && refused >= 6,
        "{served} served, {refused} refused"
    );
    pg.start().unwrap();
    let t = Instant::now();
    loop {
        let r = chat(ports[0], "tickets");
        let id = serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        // the capture is written behind the answer: retry until it is there
        let f = http(
            ports[0],
            "POST",
            "/v1/feedback",
            "acme-key",
            &format!(r#"{{"completion_id":"{id}","rating":1}}"#),
        );
        if f.status == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "feedback did not resume: {} {}",
            f.status,
            f.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // the replicas' change feeds reconnected: a promotion reaches all within 1 s
    std::thread::sleep(Duration::from_secs(1));
    let next = if live == v1 { &v2 } else { &v1 };
    let t = Instant::now();
    let r = http(
        ports[2],
        "POST",
        &format!("{admin}/promote"),
        "admin-key",
        &format!(r#"{{"version":"{next}","expected":"{live}","reason":"after the outage"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    for &p in &ports {
        while chat(p, "tickets").version().as_deref() != Some(next.as_str()) {
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "replica on port {p} missed the promotion after the outage"
            );
        }
    }

    // the bucket down: the live version serves from memory; a version no
    // replica has loaded yet gets a clear 503
    let v3 = register(&dir, &mine, &model, &[5]).remove(0);
    s3.stop();
    let t = Instant::now();
    for &p in &ports {
        let r = chat(p, "tickets");
        assert_eq!(r.status, 200, "{}", r.body);
        // a replica learns of a new version through the change feed, within 1 s
        let r = loop {
            let r = chat(p, &format!("tickets@{v3}"));
            if r.status != 404 || t.elapsed() > Duration::from_secs(1) {
                break r;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.body.contains("cannot be fetched"), "{}", r.body);
        assert!(r.headers.contains("retry-after"), "{}", r.headers);
    }
    s3.start().unwrap();
    let t = Instant::now();
    while chat(ports[0], &format!("tickets@{v3}")).status != 200 {
        assert!(t.elapsed() < Duration::from_secs(10), "never resumed");
        std::thread::sleep(Duration::from_millis(100));
    }
}
