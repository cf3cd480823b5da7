//! Adapter registry and store: versions, compare-and-set promotion, rollback,
//! restart, concurrency, crash safety, bad input.

use retune_adapters::*;
use retune_engine::tiny::{self, TinySpec};
use retune_registry::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-reg-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn base() -> ServedBase {
    let s = TinySpec::default();
    let hd = s.hidden / s.n_head;
    let (h, q, kv, f) = (s.hidden, s.n_head * hd, s.n_kv_head * hd, s.ffn);
    ServedBase {
        shapes: BaseShapes {
            n_layers: s.n_layer,
            dims: [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)],
        },
        fingerprint: "tiny-llama-test".into(),
    }
}

/// Run `test` on the embedded SQLite registry, then on PostgreSQL (a fresh
/// database): the shared suite. `dir/registry.location` says which, so that
/// child processes and second handles open the same one.
fn both(name: &str, test: impl Fn(PathBuf)) {
    test(tmpdir(&format!("{name}-sqlite")));
    let pg = retune_testkit::pg::PgTest::new().unwrap();
    let dir = tmpdir(&format!("{name}-pg"));
    std::fs::write(dir.join("registry.location"), &pg.url).unwrap();
    test(dir);
    drop(pg);
}

fn location(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("registry.location"))
        .unwrap_or_else(|_| dir.join("registry.db").to_string_lossy().into_owned())
}

fn open(dir: &Path) -> Registry {
    let store = Arc::new(LocalStore::new(&dir.join("store")).unwrap());
    Registry::open_at(&location(dir), store, 64 << 20).unwrap()
}

fn upload(dir: &Path, seed: u64) -> PathBuf {
    let p = dir.join(format!("upload-{seed}"));
    tiny::write_adapter(&p, &TinySpec::default(), 4, &[0, 2], seed, 8.0, 0.05).unwrap();
    p
}

fn new<'a>(dir: &'a Path, tenant: &'a str, name: &'a str) -> NewVersion<'a> {
    NewVersion {
        tenant,
        name,
        dir,
        source: "upload",
        parent: None,
        metadata: serde_json::json!({"note": "test"}),
        claimed_base: None,
        actor: "alice",
    }
}

#[test]
fn promote_rollback_twice_restart_and_journal() {
    both("story", |dir| {
        let (u1, u2) = (upload(&dir, 1), upload(&dir, 2));
        let reg = open(&dir);
        let feed = reg.subscribe();
        let v1 = reg.register(new(&u1, "acme", "tickets"), &base()).unwrap();
        let again = reg.register(new(&u1, "acme", "tickets"), &base()).unwrap();
        assert_eq!(v1.id, again.id, "same files, same version id");
        let v2 = reg
            .register(
                NewVersion {
                    parent: Some(&v1.id),
                    ..new(&u2, "acme", "tickets")
                },
                &base(),
            )
            .unwrap();
        assert_ne!(v1.id, v2.id);
        reg.promote("acme", "tickets", &v1.id, Expect::NoLive, "alice", "first")
            .unwrap();
        let s = reg
            .promote(
                "acme",
                "tickets",
                &v2.id,
                Expect::Version(v1.id.clone()),
                "bob",
                "better evals",
            )
            .unwrap();
        assert_eq!(
            (s.live.as_deref(), s.previous.as_deref()),
            (Some(v2.id.as_str()), Some(v1.id.as_str()))
        );
        assert_eq!(
            feed.try_recv().unwrap().state.live.as_deref(),
            Some(v1.id.as_str())
        );
        let counter = reg.change_counter().unwrap();
        let s1 = reg
            .rollback("acme", "tickets", None, "carol", "complaints")
            .unwrap();
        assert_eq!(
            (s1.live.as_deref(), s1.previous.as_deref()),
            (Some(v1.id.as_str()), Some(v2.id.as_str()))
        );
        let s2 = reg
            .rollback("acme", "tickets", None, "carol", "false alarm")
            .unwrap();
        assert_eq!(s2, s, "rolling back twice returns to where we started");
        assert!(reg.change_counter().unwrap() > counter);
        let events: Vec<&str> = reg
            .journal("acme", "tickets")
            .unwrap()
            .into_iter()
            .map(|e| e.event.as_str())
            .collect();
        assert_eq!(
            events,
            ["register", "register", "promote", "promote", "rollback", "rollback"]
        );
        let journal = reg.journal("acme", "tickets").unwrap();
        assert_eq!(journal[4].reason, "complaints");
        assert_eq!(journal[4].previous.as_deref(), Some(v2.id.as_str()));
        let versions = reg.versions("acme", "tickets").unwrap();
        drop(reg);
        // restart restores aliases and history exactly
        let reg = open(&dir);
        assert_eq!(reg.state("acme", "tickets").unwrap(), s2);
        assert_eq!(reg.journal("acme", "tickets").unwrap(), journal);
        assert_eq!(reg.versions("acme", "tickets").unwrap(), versions);
        assert_eq!(
            reg.version("acme", "tickets", &v2.id)
                .unwrap()
                .parent
                .as_deref(),
            Some(v1.id.as_str())
        );
        // the pool loads versions through the registry
        let reg = Arc::new(reg);
        let pool = AdapterPool::new(reg.clone(), base().shapes, PoolConfig::default());
        let h = AdapterRef::new("acme", "tickets", &v2.id, Via::Pinned).unwrap();
        let t = std::time::Instant::now();
        while !matches!(pool.acquire(&h), Acquire::Ready(_)) {
            assert!(t.elapsed().as_secs() < 10);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // garbage collection keeps aliased versions and the most recent others
        let u3 = upload(&dir, 3);
        let v3 = reg.register(new(&u3, "acme", "tickets"), &base()).unwrap();
        assert!(
            reg.gc("acme", "tickets", 1, std::time::Duration::ZERO, "janitor")
                .unwrap()
                .is_empty(),
            "v3 is the one kept"
        );
        assert_eq!(
            reg.gc("acme", "tickets", 0, std::time::Duration::ZERO, "janitor")
                .unwrap(),
            vec![v3.id.clone()]
        );
        assert!(matches!(
            reg.version("acme", "tickets", &v3.id),
            Err(RegistryError::NotFound(_))
        ));
        assert!(reg
            .servable_dir(&AdapterRef::new("acme", "tickets", &v3.id, Via::Pinned).unwrap())
            .is_err());
        assert_eq!(
            reg.journal("acme", "tickets")
                .unwrap()
                .last()
                .unwrap()
                .event,
            "delete"
        );
        // canary and retire
        let s = reg
            .set_canary("acme", "tickets", Some((&v1.id, 10)), "alice", "try")
            .unwrap();
        assert_eq!(s.canary, Some((v1.id.clone(), 10)));
        assert!(
            matches!(
                reg.retire("acme", "tickets", &v2.id, "alice", "x"),
                Err(RegistryError::Rejected(_))
            ),
            "live cannot be retired"
        );
        let s = reg
            .retire("acme", "tickets", &v1.id, "alice", "bad")
            .unwrap();
        assert_eq!(s.canary, None);
        assert!(matches!(
            reg.promote("acme", "tickets", &v1.id, Expect::Any, "a", "r"),
            Err(RegistryError::Rejected(_))
        ));
        assert!(
            reg.servable_dir(&AdapterRef::new("acme", "tickets", &v1.id, Via::Pinned).unwrap())
                .is_err(),
            "retired versions are not servable"
        );
        assert!(
            matches!(
                reg.resolve("acme", &format!("tickets@{}", v1.id), 0),
                Err(RegistryError::NotFound(_))
            ),
            "and a request pinning one is not found"
        );
    });
}

#[test]
fn resolve_gives_one_reference_for_live_canary_and_pinned_and_hides_the_rest() {
    both("resolve", |dir| {
        let reg = open(&dir);
        let not_found =
            |r: Result<AdapterRef, RegistryError>| matches!(r, Err(RegistryError::NotFound(_)));
        assert!(
            not_found(reg.resolve("acme", "tickets", 0)),
            "unknown adapter"
        );
        let v1 = reg
            .register(new(&upload(&dir, 1), "acme", "tickets"), &base())
            .unwrap();
        assert!(
            not_found(reg.resolve("acme", "tickets", 0)),
            "nothing live yet"
        );
        reg.promote("acme", "tickets", &v1.id, Expect::NoLive, "a", "r")
            .unwrap();
        let v2 = reg
            .register(new(&upload(&dir, 2), "acme", "tickets"), &base())
            .unwrap();
        let live = reg.resolve("acme", "tickets", 0).unwrap();
        assert_eq!(
            (live.tenant(), live.name(), live.version(), live.via()),
            ("acme", "tickets", v1.id.as_str(), Via::Live)
        );
        assert_eq!(live.key(), format!("acme/tickets/{}", v1.id));
        let pinned = reg
            .resolve("acme", &format!("tickets@{}", v2.id), 0)
            .unwrap();
        assert_eq!(
            (pinned.version(), pinned.via()),
            (v2.id.as_str(), Via::Pinned)
        );
        // the canary takes the buckets below its share
        reg.set_canary("acme", "tickets", Some((&v2.id, 30)), "a", "try")
            .unwrap();
        let at = |bucket| reg.resolve("acme", "tickets", bucket).unwrap();
        assert_eq!(
            (at(29).version(), at(29).via()),
            (v2.id.as_str(), Via::Canary)
        );
        assert_eq!(
            (at(30).version(), at(30).via()),
            (v1.id.as_str(), Via::Live)
        );
        // another tenant, a retired pinned version and a malformed name are all not found
        assert!(not_found(reg.resolve("globex", "tickets", 0)));
        reg.set_canary("acme", "tickets", None, "a", "stop")
            .unwrap();
        reg.retire("acme", "tickets", &v2.id, "a", "bad").unwrap();
        assert!(not_found(reg.resolve(
            "acme",
            &format!("tickets@{}", v2.id),
            0
        )));
        assert!(not_found(reg.resolve("acme", "../tickets", 0)));
        assert!(not_found(reg.resolve("acme", "tickets@../../x", 0)));
        // the pool's source finds the files of a resolved version without the database
        assert!(AdapterSource::locate(&reg, &live)
            .unwrap()
            .join("adapter_config.json")
            .is_file());
    });
}

#[test]
fn a_tainted_live_version_is_counted_until_it_is_no_longer_live() {
    both("taint", |dir| {
        let reg = open(&dir);
        let v1 = reg
            .register(new(&upload(&dir, 1), "acme", "tickets"), &base())
            .unwrap();
        let v2 = reg
            .register(new(&upload(&dir, 2), "acme", "tickets"), &base())
            .unwrap();
        reg.promote("acme", "tickets", &v1.id, Expect::NoLive, "a", "r")
            .unwrap();
        assert_eq!(reg.tainted_live_count().unwrap(), 0);
        reg.taint("acme", "tickets", &v2.id, "a", "erased").unwrap();
        assert_eq!(reg.tainted_live_count().unwrap(), 0, "v2 is not live");
        reg.taint("acme", "tickets", &v1.id, "a", "erased").unwrap();
        assert_eq!(reg.tainted_live_count().unwrap(), 1);
        assert_eq!(reg.tainted("acme", "tickets").unwrap().len(), 2);
        reg.taint("acme", "tickets", &v1.id, "a", "again").unwrap();
        assert_eq!(reg.tainted_live_count().unwrap(), 1, "counted once");
        let v3 = reg
            .register(new(&upload(&dir, 3), "acme", "tickets"), &base())
            .unwrap();
        reg.promote(
            "acme",
            "tickets",
            &v3.id,
            Expect::Version(v1.id.clone()),
            "a",
            "r",
        )
        .unwrap();
        assert_eq!(reg.tainted_live_count().unwrap(), 0);
        assert!(matches!(
            reg.taint("acme", "tickets", "nope", "a", "r"),
            Err(RegistryError::NotFound(_))
        ));
    });
}

#[test]
fn two_concurrent_promoters_with_the_same_expectation_one_wins() {
    both("race", |dir| {
        let reg = open(&dir);
        let ids: Vec<String> = (1..=3)
            .map(|s| {
                reg.register(new(&upload(&dir, s), "t", "a"), &base())
                    .unwrap()
                    .id
            })
            .collect();
        reg.promote("t", "a", &ids[0], Expect::NoLive, "x", "init")
            .unwrap();
        drop(reg);
        for round in 0..5 {
            let live = open(&dir).state("t", "a").unwrap().live.unwrap();
            let expected = live.clone();
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let handles: Vec<_> = (1..=2)
                .map(|k| {
                    let (dir, expected, b) = (dir.clone(), expected.clone(), barrier.clone());
                    // two different versions, neither of them the current live one
                    let others: Vec<&String> = ids.iter().filter(|v| **v != expected).collect();
                    let target = others[(round + k) % 2].clone();
                    std::thread::spawn(move || {
                        let reg = open(&dir); // own connection, like another process
                        b.wait();
                        reg.promote(
                            "t",
                            "a",
                            &target,
                            Expect::Version(expected),
                            &format!("p{k}"),
                            "race",
                        )
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let wins = results.iter().filter(|r| r.is_ok()).count();
            let conflicts = results
                .iter()
                .filter(|r| matches!(r, Err(RegistryError::Conflict { .. })))
                .count();
            assert_eq!((wins, conflicts), (1, 1), "round {round}: {results:?}");
        }
    });
}

#[test]
fn bad_input_gets_typed_errors() {
    both("bad", |dir| {
        let reg = open(&dir);
        let u = upload(&dir, 1);
        let v = reg.register(new(&u, "t", "a"), &base()).unwrap();
        assert!(matches!(
            reg.state("nobody", "a"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.state("t", "nothing"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.promote("t", "a", "deadbeef", Expect::Any, "x", "y"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(
            matches!(
                reg.rollback("t", "a", None, "x", "y"),
                Err(RegistryError::NotFound(_))
            ),
            "nothing live yet"
        );
        for bad in ["../evil", "UPPER", "", "a/b"] {
            assert!(
                matches!(
                    reg.register(new(&u, bad, "a"), &base()),
                    Err(RegistryError::Forbidden(_))
                ),
                "{bad}"
            );
        }
        assert!(AdapterRef::new("t", "a", "../../etc", Via::Pinned).is_err());
        // a symlinked file is refused (it could point anywhere)
        let link = dir.join("linked");
        std::fs::create_dir_all(&link).unwrap();
        std::fs::copy(
            u.join("adapter_config.json"),
            link.join("adapter_config.json"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            u.join("adapter_model.safetensors"),
            link.join("adapter_model.safetensors"),
        )
        .unwrap();
        assert!(matches!(
            reg.register(new(&link, "t", "a"), &base()),
            Err(RegistryError::Forbidden(_))
        ));
        // oversized
        let small = Registry::open(
            &dir.join("small.db"),
            Arc::new(LocalStore::new(&dir.join("s2")).unwrap()),
            1000,
        )
        .unwrap();
        assert!(matches!(
            small.register(new(&u, "t", "a"), &base()),
            Err(RegistryError::TooLarge(_))
        ));
        // made for another base: shapes, or a stated fingerprint
        let other = dir.join("other");
        tiny::write_adapter(
            &other,
            &TinySpec {
                hidden: 128,
                ..TinySpec::default()
            },
            4,
            &[0],
            1,
            8.0,
            0.05,
        )
        .unwrap();
        let e = reg.register(new(&other, "t", "a"), &base()).unwrap_err();
        assert!(
            matches!(&e, RegistryError::Invalid(r) if r.contains("shape")),
            "{e}"
        );
        let e = reg
            .register(
                NewVersion {
                    claimed_base: Some("llama-3-8b"),
                    ..new(&u, "t", "a")
                },
                &base(),
            )
            .unwrap_err();
        assert!(matches!(e, RegistryError::Invalid(_)));
        // finite but absurd: an alpha of -1e38, weights of 3e38 (they served empty text)
        for (name, alpha, w, what) in [
            ("alpha", -1e38f32, 0.05f32, "lora_alpha"),
            ("huge", 8.0, 3e38, "not a trained adapter"),
        ] {
            let d = dir.join(name);
            tiny::write_adapter(&d, &TinySpec::default(), 4, &[0], 1, alpha, w).unwrap();
            let e = reg.register(new(&d, "t", "a"), &base()).unwrap_err();
            assert!(
                matches!(&e, RegistryError::Invalid(r) if r.contains(what)),
                "{e}"
            );
        }
        // a config with 1,500 patterns (it took 28 s to load) is refused at once
        let many = dir.join("many");
        tiny::write_adapter(&many, &TinySpec::default(), 4, &[0], 1, 8.0, 0.05).unwrap();
        let cfg_path = many.join("adapter_config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
        cfg["rank_pattern"] = (0..1500)
            .map(|i| {
                (
                    format!("layers\\.{i}\\.self_attn\\.q_proj"),
                    serde_json::json!(4),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let t = std::time::Instant::now();
        let e = reg.register(new(&many, "t", "a"), &base()).unwrap_err();
        assert!(
            matches!(&e, RegistryError::Invalid(r) if r.contains("more than 64 patterns")),
            "{e}"
        );
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        // within the cap, patterns still apply (compiled once per load)
        cfg["rank_pattern"] = (0..60)
            .map(|i| {
                (
                    format!("layers\\.{i}\\.self_attn\\.q_proj"),
                    serde_json::json!(4),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        reg.register(new(&many, "t", "a"), &base()).unwrap();
        assert!(matches!(
            reg.register(new(&dir.join("missing"), "t", "a"), &base()),
            Err(RegistryError::NotFound(_))
        ));
        // the registry still works
        reg.promote("t", "a", &v.id, Expect::NoLive, "x", "ok")
            .unwrap();
    });
}

/// Child mode for the crash test: register and promote in a loop until killed.
fn crash_child(dir: &Path) {
    let reg = open(dir);
    let mut seed = 100;
    loop {
        seed += 1;
        let u = upload(dir, seed);
        let Ok(v) = reg.register(new(&u, "c", "a"), &base()) else {
            continue;
        };
        let _ = reg.promote("c", "a", &v.id, Expect::Any, "child", "loop");
        let _ = std::fs::remove_dir_all(&u);
    }
}

#[test]
fn sigkill_during_register_and_promote_leaves_a_consistent_registry() {
    if let Ok(d) = std::env::var("RETUNE_CRASH_CHILD") {
        crash_child(Path::new(&d));
        return;
    }
    both("crash", |dir| {
        let exe = std::env::current_exe().unwrap();
        let mut rng = 0x2545F4914F6CDD1Du64;
        for round in 0..8 {
            let mut child = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "sigkill_during_register_and_promote_leaves_a_consistent_registry",
                    "--nocapture",
                ])
                .env("RETUNE_CRASH_CHILD", &dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            std::thread::sleep(std::time::Duration::from_millis(150 + rng % 400));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            let reg = open(&dir);
            let Ok(state) = reg.state("c", "a") else {
                continue;
            }; // killed before the first register
            let base = base();
            for v in [&state.live, &state.previous].into_iter().flatten() {
                let path = reg
                    .servable_dir(&AdapterRef::new("c", "a", v, Via::Pinned).unwrap())
                    .unwrap_or_else(|e| panic!("round {round}: alias to {v}: {e}"));
                load_peft(&path, &base.shapes, &LoadLimits::default())
                    .unwrap_or_else(|e| panic!("round {round}: {v}: {e}"));
            }
            for v in reg.versions("c", "a").unwrap() {
                assert!(
                    reg.servable_dir(&AdapterRef::new("c", "a", &v.id, Via::Pinned).unwrap())
                        .is_ok(),
                    "round {round}: registered {} has no files",
                    v.id
                );
            }
        }
        // the children really were killed mid-work, many times over
        let reg = open(&dir);
        let promotes = reg
            .journal("c", "a")
            .unwrap()
            .iter()
            .filter(|e| e.event == "promote")
            .count();
        println!(
            "{} versions, {promotes} promotions across 8 killed children",
            reg.versions("c", "a").unwrap().len()
        );
        assert!(
            promotes >= 8,
            "children made too little progress to test anything ({promotes})"
        );
    });
}

#[test]
fn the_alias_cache_resolves_from_memory_while_a_writer_holds_the_database() {
    use std::time::{Duration, Instant};
    both("alias-cache", |dir| {
        let (u1, u2) = (upload(&dir, 1), upload(&dir, 2));
        let reg = Arc::new(open(&dir));
        let v1 = reg.register(new(&u1, "acme", "tickets"), &base()).unwrap();
        let v2 = reg.register(new(&u2, "acme", "tickets"), &base()).unwrap();
        reg.promote("acme", "tickets", &v1.id, Expect::NoLive, "a", "")
            .unwrap();
        let cache = AliasCache::attach(&reg, Duration::from_millis(50)).unwrap();
        assert_eq!(
            cache.resolve("acme", "tickets", 0).unwrap().version(),
            v1.id
        );
        // a change made through this registry is seen before the call returns
        reg.promote("acme", "tickets", &v2.id, Expect::Any, "a", "")
            .unwrap();
        let r = cache.resolve("acme", "tickets", 0).unwrap();
        assert_eq!((r.version(), r.via()), (v2.id.as_str(), Via::Live));
        let pinned = format!("tickets@{}", v1.id);
        assert_eq!(
            cache.resolve("acme", &pinned, 0).unwrap().via(),
            Via::Pinned
        );
        reg.retire("acme", "tickets", &v1.id, "a", "bad").unwrap();
        assert!(matches!(
            cache.resolve("acme", &pinned, 0),
            Err(RegistryError::NotFound(_))
        ));
        assert!(
            cache.resolve("globex", "tickets", 0).is_err(),
            "tenants are apart"
        );
        // another process holds the write lock (as an admin write across its fsync):
        // resolving does not wait for it
        let other = hold_writer(&dir);
        let t = Instant::now();
        for _ in 0..1000 {
            cache.resolve("acme", "tickets", 0).unwrap();
        }
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        drop(other);
        // a change another process makes is seen within the poll
        let reg2 = open(&dir);
        reg2.rollback("acme", "tickets", Some(&v2.id), "trainer", "watch")
            .unwrap_or_else(|e| panic!("{e}"));
        let u3 = upload(&dir, 3);
        let v3 = reg2.register(new(&u3, "acme", "tickets"), &base()).unwrap();
        reg2.promote("acme", "tickets", &v3.id, Expect::Any, "trainer", "gate")
            .unwrap();
        let t = Instant::now();
        while cache.resolve("acme", "tickets", 0).unwrap().version() != v3.id {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "never saw the other process's promotion"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    });
}

/// `r` from `pool` once loaded (10 s at most), or the load's error.
fn acquired(pool: &AdapterPool, r: &AdapterRef) -> Result<Arc<LoraAdapter>, String> {
    use std::time::{Duration, Instant};
    let t = Instant::now();
    loop {
        match pool.acquire(r) {
            Acquire::Ready(a) => return Ok(a),
            Acquire::Failed(e) => return Err(e.to_string()),
            Acquire::Pending => {
                assert!(t.elapsed() < Duration::from_secs(10), "{r} never loaded");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Another process's writer holding the registry's write lock until dropped:
/// SQLite's `BEGIN IMMEDIATE`, or the advisory lock every PostgreSQL writer takes.
fn hold_writer(dir: &Path) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let at = location(dir);
    if retune_registry::is_postgres_url(&at) {
        std::thread::spawn(move || {
            let mut c = retune_testkit::pg::connect(&at).unwrap();
            c.batch_execute("BEGIN; SELECT pg_advisory_xact_lock(7310012642)")
                .unwrap();
            ready_tx.send(()).unwrap();
            let _ = rx.recv();
            let _ = c.batch_execute("ROLLBACK");
        });
        ready.recv().unwrap();
        return tx;
    }
    let db = PathBuf::from(at);
    std::thread::spawn(move || {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import sqlite3,sys\nc=sqlite3.connect({:?},isolation_level=None)\nc.execute('BEGIN IMMEDIATE')\nprint('held',flush=True)\nsys.stdin.read()\nc.execute('ROLLBACK')",
                db.to_string_lossy()
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = out;
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "held");
        ready_tx.send(()).unwrap();
        let _ = rx.recv();
        drop(child.stdin.take());
        child.wait().unwrap();
    });
    ready.recv().unwrap();
    tx
}

#[test]
fn a_retired_version_stops_serving_from_the_pool_and_a_corrupt_one_is_refused() {
    use std::time::Duration;
    both("pool-gate", |dir| {
        let (u1, u2) = (upload(&dir, 1), upload(&dir, 2));
        let reg = Arc::new(open(&dir));
        let v1 = reg.register(new(&u1, "acme", "tickets"), &base()).unwrap();
        let v2 = reg.register(new(&u2, "acme", "tickets"), &base()).unwrap();
        reg.promote("acme", "tickets", &v2.id, Expect::NoLive, "a", "")
            .unwrap();
        let cache = AliasCache::attach(&reg, Duration::from_millis(50)).unwrap();
        let pool = AdapterPool::new(reg.clone(), base().shapes, PoolConfig::default());
        pool.set_servable(cache.clone());
        let wait = |r: &AdapterRef| acquired(&pool, r);
        let r1 = AdapterRef::new("acme", "tickets", &v1.id, Via::Pinned).unwrap();
        wait(&r1).unwrap();
        assert_eq!(pool.resident().len(), 1);
        reg.retire("acme", "tickets", &v1.id, "a", "bad").unwrap();
        let e = wait(&r1).unwrap_err();
        assert!(e.contains("retired"), "{e}");
        assert!(
            pool.resident().is_empty(),
            "the retired version is still resident"
        );
        // a stored file changed behind the registry's back: refused at load
        let r2 = AdapterRef::new("acme", "tickets", &v2.id, Via::Live).unwrap();
        let stored = reg.servable_dir(&r2).unwrap().join("adapter_config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&stored).unwrap()).unwrap();
        cfg["lora_alpha"] = serde_json::json!(1000.0);
        std::fs::write(&stored, cfg.to_string()).unwrap();
        let e = wait(&r2).unwrap_err();
        assert!(e.contains("content id"), "{e}");
    });
}

#[test]
fn serving_limits_refuse_a_version_at_register_and_at_promote() {
    both("limits", |dir| {
        let (u1, u2) = (upload(&dir, 1), upload(&dir, 2)); // rank 4
        let reg = open(&dir);
        let v1 = reg.register(new(&u1, "acme", "tickets"), &base()).unwrap();
        reg.check_servable("acme", "tickets", &v1.id, &base())
            .unwrap();
        drop(reg);
        // the same registry served by a device whose adapter slots hold rank 2
        let small = || LoadLimits {
            max_rank: 2,
            ..LoadLimits::default()
        };
        let reg = open(&dir).with_limits(small());
        let e = reg
            .check_servable("acme", "tickets", &v1.id, &base())
            .unwrap_err();
        assert!(
            matches!(e, RegistryError::Invalid(ref m) if m.contains("rank")),
            "{e}"
        );
        let e = reg
            .register(new(&u2, "acme", "tickets"), &base())
            .unwrap_err();
        assert!(matches!(e, RegistryError::Invalid(_)), "{e}");
    });
}

#[test]
fn gc_keeps_versions_served_or_changed_recently() {
    use std::time::Duration;
    both("gc-recent", |dir| {
        let (u1, u2, u3) = (upload(&dir, 1), upload(&dir, 2), upload(&dir, 3));
        let reg = open(&dir);
        let v1 = reg.register(new(&u1, "acme", "tickets"), &base()).unwrap();
        let v2 = reg.register(new(&u2, "acme", "tickets"), &base()).unwrap();
        let v3 = reg.register(new(&u3, "acme", "tickets"), &base()).unwrap();
        reg.promote("acme", "tickets", &v3.id, Expect::NoLive, "a", "")
            .unwrap();
        // all registered just now: a 15-minute idle window keeps everything
        let idle = Duration::from_secs(900);
        assert!(reg
            .gc("acme", "tickets", 0, idle, "janitor")
            .unwrap()
            .is_empty());
        // once the registrations are older than the window, only what a server
        // served within it (v1, pinned) and what is aliased (v3) stay
        std::thread::sleep(Duration::from_millis(1200));
        reg.mark_served(&[("acme".into(), "tickets".into(), v1.id.clone())])
            .unwrap();
        let gone = reg
            .gc("acme", "tickets", 0, Duration::from_secs(1), "janitor")
            .unwrap();
        assert_eq!(gone, vec![v2.id.clone()]);
        let left: Vec<String> = reg
            .versions("acme", "tickets")
            .unwrap()
            .into_iter()
            .map(|v| v.id)
            .collect();
        assert!(left.contains(&v1.id) && left.contains(&v3.id) && !left.contains(&v2.id));
    });
}

#[test]
fn gc_racing_register_of_the_same_content_never_leaves_a_row_without_files() {
    use std::time::Duration;
    both("gc-race", |dir| {
        let u = upload(&dir, 1);
        // two processes' handles on one registry: the server registers, the CLI
        // collects, its file deletions slowed to widen the window
        struct SlowDelete(LocalStore);
        impl BlobStore for SlowDelete {
            fn put(&self, key: &str, files: &[(&str, &Path)]) -> Result<(), RegistryError> {
                self.0.put(key, files)
            }
            fn local_dir(&self, key: &str) -> Result<PathBuf, RegistryError> {
                self.0.local_dir(key)
            }
            fn delete(&self, key: &str) -> Result<(), RegistryError> {
                std::thread::sleep(Duration::from_millis(20));
                self.0.delete(key)
            }
            fn put_derived(
                &self,
                key: &str,
                name: &str,
                bytes: &[u8],
            ) -> Result<(), RegistryError> {
                self.0.put_derived(key, name, bytes)
            }
        }
        let server = open(&dir);
        let janitor = Registry::open_at(
            &location(&dir),
            Arc::new(SlowDelete(LocalStore::new(&dir.join("store")).unwrap())),
            64 << 20,
        )
        .unwrap();
        for round in 0..30 {
            // the version is there (row and files); gc removes it while the same
            // content is registered again, in the middle of gc's file deletion
            server
                .register(new(&u, "acme", "tickets"), &base())
                .unwrap();
            let v = std::thread::scope(|s| {
                let gc = s.spawn(|| {
                    janitor
                        .gc("acme", "tickets", 0, Duration::ZERO, "janitor")
                        .unwrap()
                });
                std::thread::sleep(Duration::from_millis(5 + round % 10));
                let v = server
                    .register(new(&u, "acme", "tickets"), &base())
                    .unwrap();
                assert_eq!(gc.join().unwrap().len(), 1, "round {round}: gc removed it");
                v
            });
            let rows = match server.versions("acme", "tickets") {
                Ok(rows) => rows,
                Err(RegistryError::NotFound(_)) => Vec::new(),
                Err(e) => panic!("{e}"),
            };
            for row in rows {
                assert_eq!(row.id, v.id);
                // the row that survived is servable: its files are whole
                server
                    .check_servable("acme", "tickets", &row.id, &base())
                    .unwrap_or_else(|e| panic!("round {round}: a row without its files: {e}"));
            }
        }
    });
}

/// Every weight and scale of two loaded copies, bit for bit.
fn same_weights(x: &LoraAdapter, y: &LoraAdapter) -> bool {
    let bits = |a: &LoraAdapter| -> Vec<(usize, usize, usize, u32, Vec<u32>, Vec<u32>)> {
        let mut v = Vec::new();
        for (l, ms) in a.layers.iter().enumerate() {
            for (m, p) in ms.iter().enumerate() {
                if let Some(p) = p {
                    let b = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect();
                    v.push((l, m, p.rank, p.scale.to_bits(), b(&p.a), b(&p.b)));
                }
            }
        }
        v
    };
    x.bytes == y.bytes && bits(x) == bits(y) && x.cache_key() == y.cache_key()
}

#[test]
fn the_compute_form_is_written_at_register_loaded_bit_identical_and_rebuilt_when_damaged() {
    both("packed", |dir| {
        let shapes = base().shapes;
        let mut ups = Vec::new();
        for (i, dt) in [tiny::DType::F32, tiny::DType::F16, tiny::DType::BF16]
            .into_iter()
            .enumerate()
        {
            let p = dir.join(format!("up-{i}"));
            tiny::write_random_adapter_as(
                &p,
                &shapes,
                4,
                &[0, 1, 2, 3, 4, 5, 6],
                i as u64,
                (8.0, 0.05),
                dt,
            )
            .unwrap();
            ups.push(p);
        }
        let reg = Arc::new(open(&dir));
        let pool = AdapterPool::new(reg.clone(), shapes.clone(), PoolConfig::default());
        let wait = |r: &AdapterRef| acquired(&pool, r);
        let stat = |f: fn(&PoolStats) -> &std::sync::atomic::AtomicU64| {
            f(pool.stats()).load(std::sync::atomic::Ordering::Relaxed)
        };
        let mut sizes = Vec::new();
        let mut refs = Vec::new();
        for (i, up) in ups.iter().enumerate() {
            let v = reg
                .register(new(up, "acme", &format!("a{i}")), &base())
                .unwrap();
            let r = AdapterRef::new("acme", &format!("a{i}"), &v.id, Via::Pinned).unwrap();
            let stored = reg.servable_dir(&r).unwrap();
            let packed = stored.join(packed::PACKED_FILE);
            sizes.push(
                std::fs::metadata(&packed)
                    .expect("written at register")
                    .len(),
            );
            let served = wait(&r).unwrap();
            let direct = load_peft(&stored, &shapes, &LoadLimits::default())
                .unwrap()
                .with_content_id(&v.id);
            assert!(
                same_weights(&served, &direct),
                "dtype {i}: not the PEFT loader's weights"
            );
            refs.push((r, packed, direct));
        }
        assert_eq!(
            stat(|s| &s.packed_loads),
            3,
            "every load came from the compute form"
        );
        assert_eq!(stat(|s| &s.packed_rejected), 0);
        // f16 and bf16 weights are kept in half the bytes
        assert!(
            sizes[1] * 10 < sizes[0] * 6 && sizes[2] * 10 < sizes[0] * 6,
            "{sizes:?}"
        );

        // a flipped byte: the crc refuses it, the files are checked and loaded, a
        // good compute form is written again and the next load uses it
        let (r, packed, direct) = &refs[1];
        let mut bytes = std::fs::read(packed).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        std::fs::write(packed, &bytes).unwrap();
        pool.forget(r);
        assert!(same_weights(&wait(r).unwrap(), direct));
        assert_eq!(stat(|s| &s.packed_rejected), 1);
        assert_ne!(std::fs::read(packed).unwrap(), bytes, "rewritten");
        pool.forget(r);
        assert!(same_weights(&wait(r).unwrap(), direct));
        assert_eq!(stat(|s| &s.packed_loads), 4);

        // another version's compute form in its place: refused by the content id it names
        std::fs::copy(&refs[2].1, packed).unwrap();
        pool.forget(r);
        assert!(same_weights(&wait(r).unwrap(), direct));
        assert_eq!(stat(|s| &s.packed_rejected), 2);

        // deleted: loaded from the files and written again
        std::fs::remove_file(packed).unwrap();
        pool.forget(r);
        assert!(same_weights(&wait(r).unwrap(), direct));
        assert!(packed.exists());
        assert_eq!(
            stat(|s| &s.packed_rejected),
            2,
            "a missing one is not a rejection"
        );

        // a PEFT file changed behind the registry's back: the compute form sees the
        // change (size, time, inode) and the full check refuses the version; the
        // other versions still serve
        let (r0, _, direct0) = &refs[0];
        let cfg_path = reg.servable_dir(r).unwrap().join("adapter_config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["lora_alpha"] = serde_json::json!(9.0);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        pool.forget(r);
        let e = wait(r).unwrap_err();
        assert!(e.contains("content id"), "{e}");
        pool.forget(r0);
        assert!(same_weights(&wait(r0).unwrap(), direct0));
    });
}

#[test]
fn an_adapter_evicted_from_every_tier_serves_the_same_output_and_a_corrupt_one_fails_only_its_requests(
) {
    use retune_engine::{Engine, EngineConfig, GenerateRequest, SamplingParams};
    both("tiers", |dir| {
        let spec = TinySpec::default();
        let (gguf, _) = tiny::write(&dir.join("model"), &spec).unwrap();
        let strong = |seed: u64| {
            let p = dir.join(format!("strong-{seed}"));
            tiny::write_adapter(&p, &spec, 8, &[0, 1, 2, 3, 4, 5, 6], seed, 16.0, 0.5).unwrap();
            p
        };
        let (u1, u2) = (strong(1), strong(2));
        let reg = Arc::new(open(&dir));
        let v1 = reg.register(new(&u1, "acme", "a"), &base()).unwrap();
        let v2 = reg.register(new(&u2, "acme", "b"), &base()).unwrap();
        let l = retune_engine::load(&gguf).unwrap();
        let pool = AdapterPool::new(reg.clone(), l.model.base_shapes(), PoolConfig::default());
        // the prefix cache on (the default): entries are keyed by the content id
        let engine =
            Engine::start_with_pool(l.model, l.tok, EngineConfig::default(), Some(pool.clone()))
                .unwrap();
        let ra = AdapterRef::new("acme", "a", &v1.id, Via::Live).unwrap();
        let rb = AdapterRef::new("acme", "b", &v2.id, Via::Live).unwrap();
        let ask = |r: &AdapterRef| {
            engine.generate_blocking(GenerateRequest {
                prompt: (1..40).collect(),
                params: SamplingParams {
                    stop_on_eos: false,
                    temperature: 0.8,
                    seed: Some(7),
                    logprobs: Some(2),
                    ..SamplingParams::greedy(12)
                },
                adapter: Some(r.clone()),
            })
        };
        let first = ask(&ra).unwrap();
        let other = ask(&rb).unwrap();
        assert_ne!(first.completion.output, other.completion.output);
        // evicted from the pool and its compute form gone: loaded from the checked
        // files (the prefix cache still has its entries: same content id)
        let packed = reg.servable_dir(&ra).unwrap().join(packed::PACKED_FILE);
        std::fs::remove_file(&packed).unwrap();
        pool.forget(&ra);
        let again = ask(&ra).unwrap();
        assert_eq!(again.completion.output, first.completion.output);
        let lp = |g: &retune_engine::Generated| -> Vec<(Option<u32>, Vec<(u32, u32)>)> {
            g.tokens
                .iter()
                .map(|t| {
                    (
                        t.logprob.map(f32::to_bits),
                        t.top.iter().map(|(i, p)| (*i, p.to_bits())).collect(),
                    )
                })
                .collect()
        };
        assert_eq!(lp(&again), lp(&first), "bit-identical logprobs");
        assert!(packed.exists(), "rewritten by the load");
        // corrupt in the store (its compute form damaged, a weight changed): refused
        // by its content id; b still serves, the same as before
        let weights = reg
            .servable_dir(&ra)
            .unwrap()
            .join("adapter_model.safetensors");
        let mut w = std::fs::read(&weights).unwrap();
        let at = w.len() - 3;
        w[at] ^= 0x01;
        std::fs::write(&weights, &w).unwrap();
        std::fs::write(&packed, b"garbage").unwrap();
        pool.forget(&ra);
        let e = ask(&ra).unwrap_err();
        assert!(e.to_string().contains("content id"), "{e}");
        let b_again = ask(&rb).unwrap();
        assert_eq!(b_again.completion.output, other.completion.output);
    });
}

/// A registry on a fresh PostgreSQL database (and the database's handle).
fn pg_dir(name: &str, pg: &retune_testkit::pg::PgTest) -> PathBuf {
    let dir = tmpdir(name);
    std::fs::write(dir.join("registry.location"), &pg.url).unwrap();
    dir
}

#[test]
fn on_postgresql_another_replicas_promotion_reaches_the_alias_cache_by_notify_not_the_poll() {
    let pg = retune_testkit::pg::PgTest::new().unwrap();
    notify_reaches_the_cache(&pg_dir("notify", &pg));
}

/// The same over TLS, to a server that takes nothing else: the pool's
/// connections and the change feed's `LISTEN` connection verify its
/// certificate; one from another CA is refused at open with the reason.
#[test]
fn on_a_tls_only_postgresql_the_registry_and_its_change_feed_run_over_verified_tls() {
    let c = retune_testkit::pg::PgTlsCluster::start().unwrap();
    let dir = tmpdir("notify-tls");
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        c.url,
        c.ca.display()
    );
    std::fs::write(dir.join("registry.location"), &url).unwrap();
    notify_reaches_the_cache(&dir);
    let store = || Arc::new(LocalStore::new(&dir.join("store")).unwrap());
    let wrong = format!(
        "{}?sslmode=require&sslrootcert={}",
        c.url,
        c.other_ca.display()
    );
    let e = Registry::open_at(&wrong, store(), 1 << 20)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");
    let e = Registry::open_at(&c.url, store(), 1 << 20)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no encryption"), "{e}");
}

fn notify_reaches_the_cache(dir: &Path) {
    use std::time::{Duration, Instant};
    let dir = dir.to_path_buf();
    let reg = Arc::new(open(&dir));
    let ids: Vec<String> = (1..=3)
        .map(|s| {
            reg.register(new(&upload(&dir, s), "acme", "tickets"), &base())
                .unwrap()
                .id
        })
        .collect();
    reg.promote("acme", "tickets", &ids[0], Expect::NoLive, "a", "")
        .unwrap();
    // a poll far longer than the test: only the notification can bring changes
    let cache = AliasCache::attach(&reg, Duration::from_secs(600)).unwrap();
    let other = open(&dir); // another replica
    let mut worst = Duration::ZERO;
    for round in 0..10 {
        let target = &ids[(round + 1) % 3];
        let t = Instant::now();
        if round % 3 == 2 {
            other
                .rollback("acme", "tickets", Some(target), "b", "undo")
                .unwrap();
        } else {
            other
                .promote("acme", "tickets", target, Expect::Any, "b", "")
                .unwrap();
        }
        while cache.resolve("acme", "tickets", 0).unwrap().version() != target {
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "round {round}: the other replica's change was not seen within 1 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        worst = worst.max(t.elapsed());
    }
    println!("slowest change to reach the other replica's cache: {worst:?}");
}

#[test]
fn a_postgresql_registry_that_cannot_be_used_is_refused_at_open_with_the_reason() {
    let store = || Arc::new(LocalStore::new(&tmpdir("refusals").join("store")).unwrap());
    let e = Registry::open_at("postgres://u:sekrit@127.0.0.1:1/reg", store(), 1 << 20)
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(
        matches!(e, RegistryError::Unavailable(_)) && msg.contains("127.0.0.1:1/reg"),
        "{e:?}"
    );
    assert!(!msg.contains("sekrit"), "the password leaked: {msg}");
    assert!(matches!(
        Registry::open_at("postgres://u@127.0.0.1:notaport/x", store(), 1 << 20),
        Err(RegistryError::Invalid(_))
    ));
    // a schema from a newer build
    let pg = retune_testkit::pg::PgTest::new().unwrap();
    drop(Registry::open_at(&pg.url, store(), 1 << 20).unwrap());
    let mut c = pg.client().unwrap();
    c.batch_execute(
        "INSERT INTO retune_migrations (component, version, name, applied_at)
         VALUES ('registry', 99, 'from the future', 0)",
    )
    .unwrap();
    let e = Registry::open_at(&pg.url, store(), 1 << 20).err().unwrap();
    assert!(
        matches!(&e, RegistryError::Schema(m) if m.contains("99")),
        "{e:?}"
    );
}

#[test]
fn postgresql_down_the_alias_cache_serves_the_last_state_writes_are_unavailable_and_it_resumes() {
    use std::time::{Duration, Instant};
    let pg = retune_testkit::pg::PgTest::private().unwrap();
    let dir = pg_dir("outage", &pg);
    let reg = Arc::new(open(&dir));
    let (u1, u2) = (upload(&dir, 1), upload(&dir, 2));
    let v1 = reg.register(new(&u1, "acme", "tickets"), &base()).unwrap();
    let v2 = reg.register(new(&u2, "acme", "tickets"), &base()).unwrap();
    reg.promote("acme", "tickets", &v1.id, Expect::NoLive, "a", "")
        .unwrap();
    let cache = AliasCache::attach(&reg, Duration::from_secs(600)).unwrap();
    pg.stop().unwrap();
    let t = Instant::now();
    let e = reg
        .promote("acme", "tickets", &v2.id, Expect::Any, "a", "")
        .unwrap_err();
    assert!(matches!(e, RegistryError::Unavailable(_)), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    for _ in 0..100 {
        assert_eq!(
            cache.resolve("acme", "tickets", 0).unwrap().version(),
            v1.id
        );
    }
    pg.start().unwrap();
    // the same handles resume by themselves; the feed reconnects
    let t = Instant::now();
    loop {
        match open(&dir).promote("acme", "tickets", &v2.id, Expect::Any, "b", "after") {
            Ok(_) => break,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(10), "{e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let t = Instant::now();
    while cache.resolve("acme", "tickets", 0).unwrap().version() != v2.id {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "the alias feed did not resume"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    reg.rollback("acme", "tickets", None, "a", "the first handle works again")
        .unwrap();
    assert_eq!(reg.state("acme", "tickets").unwrap().live, Some(v1.id));
}

/// A version or adapter another replica has just committed is served at once,
/// before its notification or the poll: a lookup that finds nothing reads
/// the registry's changes first (at most every few milliseconds).
#[test]
fn a_lookup_that_finds_nothing_reads_the_registrys_changes_first() {
    use std::time::Duration;
    let dir = tmpdir("miss-refresh");
    let reg = Arc::new(open(&dir));
    let v1 = reg
        .register(new(&upload(&dir, 1), "acme", "tickets"), &base())
        .unwrap()
        .id;
    reg.promote("acme", "tickets", &v1, Expect::NoLive, "a", "")
        .unwrap();
    // no notification reaches it (SQLite), and the poll is far longer than the test
    let cache = AliasCache::attach(&reg, Duration::from_secs(600)).unwrap();
    let other = open(&dir); // another replica: its commits reach the cache by the database only
    let v2 = other
        .register(new(&upload(&dir, 2), "acme", "tickets"), &base())
        .unwrap()
        .id;
    let pinned = format!("tickets@{v2}");
    assert_eq!(cache.resolve("acme", &pinned, 0).unwrap().version(), v2);
    let v3 = other
        .register(new(&upload(&dir, 3), "acme", "billing"), &base())
        .unwrap()
        .id;
    other
        .promote("acme", "billing", &v3, Expect::NoLive, "b", "")
        .unwrap();
    std::thread::sleep(Duration::from_millis(10)); // past the last miss's read
    assert_eq!(cache.resolve("acme", "billing", 0).unwrap().version(), v3);
    // what does not exist is still not found
    std::thread::sleep(Duration::from_millis(10));
    assert!(matches!(
        cache.resolve("acme", "nope", 0),
        Err(RegistryError::NotFound(_))
    ));
    assert_eq!(cache.resolve("acme", "tickets", 0).unwrap().version(), v1);
}

/// With the database down, a lookup that finds nothing pays the wait for it
/// once, then misses stay in memory for a while; what memory has is served.
#[test]
fn on_postgresql_down_a_miss_waits_for_the_database_once_then_stays_in_memory() {
    use std::time::{Duration, Instant};
    let pg = retune_testkit::pg::PgTest::private().unwrap();
    let dir = pg_dir("miss-down", &pg);
    let reg = Arc::new(open(&dir));
    let v1 = reg
        .register(new(&upload(&dir, 1), "acme", "tickets"), &base())
        .unwrap()
        .id;
    reg.promote("acme", "tickets", &v1, Expect::NoLive, "a", "")
        .unwrap();
    let cache = AliasCache::attach(&reg, Duration::from_secs(600)).unwrap();
    pg.stop().unwrap();
    assert_eq!(cache.resolve("acme", "tickets", 0).unwrap().version(), v1);
    let miss = |name: &str| {
        let t = Instant::now();
        let r = cache.resolve("acme", name, 0);
        assert!(
            matches!(r, Err(RegistryError::NotFound(_))),
            "{name}: {r:?}"
        );
        t.elapsed()
    };
    let first = miss("nope");
    std::thread::sleep(Duration::from_millis(20)); // past the miss-refresh period
    let second = miss("nope-either");
    assert!(
        second < Duration::from_millis(100),
        "the second miss waited for the database again: {second:?} (the first took {first:?})"
    );
}

/// A classifier (head and classical prior) has no compute form: every load,
/// the second included, comes from its files with the head and the prior (a
/// compute form holds LoRA pairs only, so one would serve it headless).
#[test]
fn a_classifier_loads_whole_every_time_from_its_files() {
    use retune_datasets::classical::{ClassicalOptions, TextClassifier};
    let dir = tmpdir("classifier-packed");
    let shapes = base().shapes;
    let up = dir.join("up-cls");
    let labels = ["yes", "no"];
    tiny::write_classifier_adapter(&up, &shapes, 4, &[0, 1, 2, 3, 4, 5, 6], 5, &labels, 0.5)
        .unwrap();
    let prior = TextClassifier::train(
        &["yes please", "sure yes", "no thanks", "no never"],
        &["yes", "yes", "no", "no"],
        &ClassicalOptions::default(),
    )
    .unwrap();
    let st = up.join("adapter_model.safetensors");
    let with = retune_adapters::head::with_prior(&std::fs::read(&st).unwrap(), &prior).unwrap();
    std::fs::write(&st, with).unwrap();
    let reg = Arc::new(open(&dir));
    let v = reg.register(new(&up, "acme", "cls"), &base()).unwrap();
    let r = AdapterRef::new("acme", "cls", &v.id, Via::Pinned).unwrap();
    let stored = reg.servable_dir(&r).unwrap();
    assert!(
        !stored.join(packed::PACKED_FILE).exists(),
        "no compute form for a classifier"
    );
    let pool = AdapterPool::new(reg.clone(), shapes.clone(), PoolConfig::default());
    for round in 0..2 {
        let a = acquired(&pool, &r).unwrap();
        let h = a
            .head
            .as_ref()
            .unwrap_or_else(|| panic!("round {round}: no head"));
        assert_eq!(h.labels, labels);
        let p = h.prior.as_ref().expect("the prior");
        assert_eq!(p.classifier.labels(), ["no", "yes"]);
        pool.forget(&r);
    }
    assert_eq!(
        pool.stats()
            .packed_loads
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(!stored.join(packed::PACKED_FILE).exists());
}
