//! The loop on a tiny model with the real stores: the daemon trains what is due,
//! the gate passes a learnable task and rejects shuffled labels (5 seeds), bad
//! input stops with a journaled reason and promotes nothing, and the watch rolls
//! back a planted regression but never a person's promotion.

use candle_core::Device;
use retune_config::{Settings, WatchOptions};
use retune_datasets::{
    CapturedCompletion, DatasetStore, ExampleBody, Feedback, ImportRow, Message, Rating, SqlStore,
};
use retune_registry::{
    Decision, Expect, LocalStore, NewVersion, Registry, RegistryError, Rollout, ServedBase,
};
use retune_trainer::daemon::Daemon;
use retune_trainer::{Adapter, LoraSpec};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-loop-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const ANSWERS: [&str; 3] = ["hello", "world", "hello world"];

fn row(i: usize, answer: usize) -> ImportRow {
    ImportRow {
        body: ExampleBody::Chat {
            messages: vec![
                Message {
                    role: "user".into(),
                    content: format!("query {i} about {}", i % 3),
                    weight: None,
                },
                Message {
                    role: "assistant".into(),
                    content: ANSWERS[answer].into(),
                    weight: None,
                },
            ],
        },
        subject_id: Some(format!("person-{}", i % 7)),
        label: Some(ANSWERS[answer].into()),
    }
}

/// The answer follows from the input (`about k`), or, shuffled, from nothing.
fn rows(n: usize, shuffle_seed: Option<u64>) -> Vec<ImportRow> {
    (0..n)
        .map(|i| {
            let a = match shuffle_seed {
                None => i % 3,
                Some(s) => {
                    let h = retune_datasets::curate::input_key(&format!("{s}/{i}"));
                    usize::from_str_radix(&h[..8], 16).unwrap() % 3
                }
            };
            row(i, a)
        })
        .collect()
}

/// The tiny tasks here are ones a TF-IDF classifier solves perfectly: the loop's
/// other behaviour is tested with the classical arm reported only (`require`,
/// the default, has its own test).
fn settings(dir: &Path, gguf: &Path, extra: &str) -> Settings {
    settings_with(dir, gguf, extra, "report")
}

fn settings_with(dir: &Path, gguf: &Path, extra: &str, classical: &str) -> Settings {
    let toml = format!(
        r#"
[model]
path = {gguf:?}
[adapters]
root = {root:?}
[trainer]
lease_seconds = 60
[trainer.defaults.trigger]
min_new_examples = 20
min_examples = 10
[trainer.defaults.train]
rank = 4
alpha = 8.0
lr = 0.01
epochs = 8.0
batch_size = 8
max_len = 64
warmup_steps = 2
top_layers = 2
[trainer.defaults.gate]
max_new_tokens = 6
bootstrap = 500
max_forgetting = 100.0
rollout = "live"
classical = "{classical}"
[trainer.defaults.data]
eval_percent = 25
scrub = false
{extra}
"#,
        gguf = gguf.to_string_lossy(),
        root = dir.join("root").to_string_lossy(),
    );
    Settings::from_toml(&toml, std::iter::empty()).unwrap()
}

fn tiny(dir: &Path) -> PathBuf {
    retune_engine::tiny::write(dir, &Default::default())
        .unwrap()
        .0
}

fn import(dir: &Path, rows: &[ImportRow]) -> SqlStore {
    let data = SqlStore::sqlite(&dir.join("root").join("datasets.db")).unwrap();
    data.import("acme", "greet", "test", rows).unwrap();
    data
}

#[test]
fn the_gate_passes_a_learnable_task_and_rejects_shuffled_labels_every_time() {
    let dir = tmpdir("gate");
    let gguf = tiny(&dir);
    // learnable: trained, gated against the baselines, promoted
    let d = {
        let s = settings(&dir, &gguf, "");
        import(&dir, &rows(120, None));
        Daemon::open(s, "test-holder".into()).unwrap()
    };
    let out = d.pass().unwrap();
    assert_eq!(out.len(), 1, "{out:?}");
    eprintln!("learnable: {}", out[0].reason);
    assert_eq!(out[0].status, "promoted", "{}", out[0].reason);
    let live = d.reg.state("acme", "greet").unwrap().live.unwrap();
    assert_eq!(out[0].version.as_deref(), Some(live.as_str()));
    let v = d.reg.version("acme", "greet", &live).unwrap();
    let gate = &v.metadata["gate"];
    assert_eq!(gate["passed"], true);
    assert_eq!(gate["metric"], "label");
    assert!(gate["arms"][0]["score"].as_f64().unwrap() > 0.9, "{gate}");
    // reported, not required: the classical arm's figure is in the report
    let classical = &gate["classical"];
    assert_eq!(classical["mode"], "report", "{gate}");
    assert!(
        classical["note"]
            .as_str()
            .unwrap()
            .starts_with("a TF-IDF classifier"),
        "{gate}"
    );
    assert!(gate["arms"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["name"] == "classical" && a["score"].as_f64().unwrap() > 0.9));
    assert!(v.metadata["snapshot"].is_string() && v.metadata["training"].is_object());
    let j = d.reg.journal("acme", "greet").unwrap();
    assert!(j.iter().any(|e| e.event == "gate-pass"), "{j:?}");
    // nothing new: nothing to do
    assert!(d.pass().unwrap().is_empty());
    drop(d);

    // shuffled labels: rejected, kept retired with the reasons, never live — 5 seeds
    for seed in 0..5u64 {
        let sub = dir.join(format!("shuffled-{seed}"));
        std::fs::create_dir_all(&sub).unwrap();
        let extra = format!("[trainer.adapters.train]\nseed = {seed}\nrank = 4\nalpha = 8.0\nlr = 0.01\nepochs = 8.0\nbatch_size = 8\nmax_len = 64\nwarmup_steps = 2\ntop_layers = 2\n");
        let s = settings(
            &sub,
            &gguf,
            &format!("[[trainer.adapters]]\ntenant = \"acme\"\nname = \"greet\"\n{extra}"),
        );
        import(&sub, &rows(120, Some(seed)));
        let d = Daemon::open(s, "test-holder".into()).unwrap();
        let out = d.pass().unwrap();
        eprintln!("shuffled {seed}: {}", out[0].reason);
        assert_eq!(out[0].status, "rejected", "seed {seed}: {}", out[0].reason);
        assert!(out[0].reason.contains("does not beat"), "{}", out[0].reason);
        let st = d.reg.state("acme", "greet").unwrap();
        assert_eq!((st.live, st.canary), (None, None));
        let v = d
            .reg
            .version("acme", "greet", out[0].version.as_deref().unwrap())
            .unwrap();
        assert!(v.retired && v.metadata["gate"]["passed"] == false);
        assert!(d.reg.resolve("acme", "greet", 0).is_err());
        let j = d.reg.journal("acme", "greet").unwrap();
        assert!(j
            .iter()
            .any(|e| e.event == "gate-fail" && e.reason.contains("does not beat")));
    }
}

#[test]
fn under_require_a_candidate_that_does_not_beat_the_classical_arm_is_rejected() {
    // the learnable task, which the candidate learns (it beats base+prompt and the
    // constant answer) and a TF-IDF classifier solves perfectly too
    let dir = tmpdir("classical");
    let gguf = tiny(&dir);
    let s = settings_with(&dir, &gguf, "", "require");
    import(&dir, &rows(120, None));
    let d = Daemon::open(s, "test-holder".into()).unwrap();
    let out = d.pass().unwrap();
    eprintln!("{}", out[0].reason);
    assert_eq!(out[0].status, "rejected", "{}", out[0].reason);
    assert!(
        out[0].reason.contains("a TF-IDF classifier")
            && out[0].reason.contains("fine-tuning does not pay here yet"),
        "{}",
        out[0].reason
    );
    assert!(
        !out[0].reason.contains("does not beat"),
        "{}",
        out[0].reason
    );
    let v = d
        .reg
        .version("acme", "greet", out[0].version.as_deref().unwrap())
        .unwrap();
    let gate = &v.metadata["gate"];
    assert_eq!(gate["classical"]["mode"], "require");
    assert!(!gate["classical"]["comparison"]["beats"].as_bool().unwrap());
    assert!(gate["arms"][0]["score"].as_f64().unwrap() > 0.9, "{gate}");
    assert_eq!(d.reg.state("acme", "greet").unwrap().live, None);
}

#[test]
fn bad_input_stops_with_a_journaled_reason_and_promotes_nothing() {
    let dir = tmpdir("bad");
    let gguf = tiny(&dir);
    let check = |sub: &str, rows: Vec<ImportRow>, extra: &str, want: &str| {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        import(&d, &rows);
        let daemon = Daemon::open(settings(&d, &gguf, extra), "h".into()).unwrap();
        let out = daemon.pass().unwrap();
        assert_eq!(out.len(), 1, "{sub}: {out:?}");
        assert_eq!(out[0].status, "failed", "{sub}: {}", out[0].reason);
        assert!(out[0].reason.contains(want), "{sub}: {}", out[0].reason);
        assert!(
            daemon.reg.list(None).unwrap().is_empty(),
            "{sub}: nothing registered"
        );
        let j = daemon.reg.journal("acme", "greet").unwrap();
        assert!(
            j.iter()
                .any(|e| e.event == "run-failed" && e.reason.contains(want)),
            "{j:?}"
        );
        let runs = daemon.reg.runs("acme", "greet", 5).unwrap();
        assert_eq!(runs[0].status, "failed");
        // the same data is not retried until something new arrives
        assert!(daemon.pass().unwrap().is_empty(), "{sub}");
    };
    // too few examples: 24 arrive (the trigger is 20), 18 for training, at least 30 wanted
    check(
        "few",
        rows(24, None),
        "[[trainer.adapters]]\ntenant = \"acme\"\nname = \"greet\"\n[trainer.adapters.trigger]\nmin_new_examples = 20\nmin_examples = 30\n",
        "too few examples",
    );
    // a declared label longer than train.max_len (64 tokens) cannot be trained
    let long = vec!["word"; 80].join(" ");
    check(
        "long-label",
        rows(60, None),
        &format!("[[trainer.adapters]]\ntenant = \"acme\"\nname = \"greet\"\n[trainer.adapters.data]\neval_percent = 25\nscrub = false\nlabels = [\"hello\", \"world\", \"hello world\", \"{long}\"]\n"),
        "longer than train.max_len (64)",
    );
    // every input twice with different answers
    let mut conflicting = rows(30, None);
    conflicting.extend((0..30).map(|i| row(i, (i + 1) % 3)));
    check("conflict", conflicting, "", "every example conflicts");
    // the live version was made for another base: refused, nothing registered beyond it
    {
        let d = dir.join("base");
        std::fs::create_dir_all(&d).unwrap();
        import(&d, &rows(60, None));
        let mut other = base_of(&gguf);
        other.fingerprint = "another-base".into();
        let reg = registry(&d.join("root"));
        let v = version(&reg, &other, &d, 1);
        reg.promote("acme", "greet", &v, Expect::NoLive, "alice", "")
            .unwrap();
        let daemon = Daemon::open(settings(&d, &gguf, ""), "h".into()).unwrap();
        let out = daemon.pass().unwrap();
        assert_eq!(out[0].status, "failed");
        assert!(out[0].reason.contains("another-base"), "{}", out[0].reason);
        assert_eq!(daemon.reg.versions("acme", "greet").unwrap().len(), 1);
        assert_eq!(
            daemon.reg.state("acme", "greet").unwrap().live.as_deref(),
            Some(v.as_str())
        );
    }
    // a diverging run
    check(
        "diverge",
        rows(60, None),
        "[[trainer.adapters]]\ntenant = \"acme\"\nname = \"greet\"\n[trainer.adapters.train]\nlr = 1e30\nrank = 4\nalpha = 8.0\nmax_len = 64\nbatch_size = 8\nwarmup_steps = 0\n",
        "non-finite",
    );
}

fn registry(root: &Path) -> Registry {
    let store = Arc::new(LocalStore::new(&root.join("store")).unwrap());
    Registry::open(&root.join("registry.db"), store, 1 << 30).unwrap()
}

/// Register a distinct (B = 0) adapter for the tiny base.
fn version(reg: &Registry, base: &ServedBase, dir: &Path, seed: u64) -> String {
    let spec = LoraSpec {
        rank: 2,
        alpha: 4.0,
        rslora: false,
        modules: vec![0, 2],
        first_layer: 0,
    };
    let a = Adapter::init(&spec, &base.shapes, seed, &Device::Cpu).unwrap();
    let out = dir.join(format!("adapter-{seed}"));
    a.save_peft(&out, "tiny").unwrap();
    reg.register(
        NewVersion {
            tenant: "acme",
            name: "greet",
            dir: &out,
            source: "upload",
            parent: None,
            metadata: serde_json::json!({}),
            claimed_base: None,
            actor: "alice",
        },
        base,
    )
    .unwrap()
    .id
}

fn base_of(gguf: &Path) -> ServedBase {
    let l = retune_engine::load(gguf).unwrap();
    ServedBase {
        shapes: l.model.base_shapes(),
        fingerprint: l.model.fingerprint(),
    }
}

/// `n` completions served by `version`, `bad` of them rated -1, at `at`.
fn traffic(data: &SqlStore, version: &str, n: usize, bad: usize, at: i64, tag: &str) {
    let batch: Vec<CapturedCompletion> = (0..n)
        .map(|i| CapturedCompletion {
            id: format!("{tag}-{version}-{i}"),
            tenant: "acme".into(),
            adapter: Some("greet".into()),
            version: Some(version.into()),
            base_fingerprint: "b".into(),
            request: serde_json::json!({"messages": [{"role": "user", "content": format!("q {tag} {i}")}]}),
            params: serde_json::json!({}),
            output_text: "hello".into(),
            output_ids: vec![],
            finish: retune_datasets::Finish::Stop,
            prompt_tokens: 3,
            completion_tokens: 1,
            ttft_ms: 1.0,
            total_ms: 2.0,
            user: None,
            created_at: at,
        })
        .collect();
    data.record(&batch).unwrap();
    for c in batch.iter().take(bad) {
        data.add_feedback(
            "acme",
            &Feedback {
                completion_id: c.id.clone(),
                rating: Some(Rating::Down),
                ..Default::default()
            },
        )
        .unwrap();
    }
    for c in batch.iter().skip(bad).step_by(3) {
        data.add_feedback(
            "acme",
            &Feedback {
                completion_id: c.id.clone(),
                rating: Some(Rating::Up),
                ..Default::default()
            },
        )
        .unwrap();
    }
}

fn roll_out(
    reg: &Registry,
    base: &ServedBase,
    dir: &Path,
    live: &str,
    seed: u64,
    rollout: Rollout,
) -> String {
    let spec = LoraSpec {
        rank: 2,
        alpha: 4.0,
        rslora: false,
        modules: vec![1],
        first_layer: 0,
    };
    let a = Adapter::init(&spec, &base.shapes, seed, &Device::Cpu).unwrap();
    let out = dir.join(format!("candidate-{seed}"));
    a.save_peft(&out, "tiny").unwrap();
    assert!(reg
        .acquire_lease("acme", "greet", "daemon-1", 60_000)
        .unwrap());
    let (v, _) = reg
        .register_gated(
            NewVersion {
                tenant: "acme",
                name: "greet",
                dir: &out,
                source: "trainer:x",
                parent: Some(live),
                metadata: serde_json::json!({"gate": {"passed": true}}),
                claimed_base: None,
                actor: "retune-trainer",
            },
            base,
            &Decision::Pass {
                expect: Expect::Version(live.into()),
                rollout,
                watch: true,
                summary: "pass".into(),
            },
            "daemon-1",
        )
        .unwrap();
    reg.release_lease("acme", "greet", "daemon-1").unwrap();
    v.id
}

#[test]
fn the_watch_rolls_back_a_planted_regression_and_never_a_persons_promotion() {
    let dir = tmpdir("watch");
    let gguf = tiny(&dir);
    let base = base_of(&gguf);
    let root = dir.join("root");
    let reg = registry(&root);
    let data = SqlStore::sqlite(&root.join("datasets.db")).unwrap();
    let old = version(&reg, &base, &dir, 1);
    reg.promote("acme", "greet", &old, Expect::NoLive, "alice", "first")
        .unwrap();
    let o = WatchOptions {
        window_minutes: 1.0,
        min_samples: 100,
        max_minutes: 10.0,
        alpha: 0.01,
        enabled: true,
    };
    let tick = |now: i64| {
        let w = reg.open_watches().unwrap().pop().unwrap();
        retune_trainer::watch::tick(&reg, &data, &w, &o, now, "retune-trainer").unwrap()
    };

    // canary: the new version is rated -1 at 3x the old one's rate, same traffic window
    let new = roll_out(&reg, &base, &dir, &old, 2, Rollout::Canary(50));
    assert_eq!(
        reg.state("acme", "greet").unwrap().canary,
        Some((new.clone(), 50))
    );
    let t0 = reg.open_watches().unwrap()[0].started_at;
    traffic(&data, &old, 150, 15, t0 + 1000, "a");
    traffic(&data, &new, 150, 45, t0 + 1000, "a");
    assert_eq!(tick(t0 + 30_000), "watching", "the window is not over");
    assert_eq!(tick(t0 + 61_000), "rolled_back");
    let st = reg.state("acme", "greet").unwrap();
    assert_eq!(
        (st.live.as_deref(), st.canary.as_ref()),
        (Some(old.as_str()), None)
    );
    assert!(reg.version("acme", "greet", &new).unwrap().retired);
    let j = reg.journal("acme", "greet").unwrap();
    let rb = j.iter().find(|e| e.event == "auto-rollback").unwrap();
    assert!(
        rb.reason.contains("0.300 (45/150)") && rb.reason.contains("0.100 (15/150)"),
        "{}",
        rb.reason
    );

    // before/after: equal rates pass and the new version stays live
    let v3 = roll_out(&reg, &base, &dir, &old, 3, Rollout::Live);
    let t1 = reg.open_watches().unwrap()[0].started_at;
    traffic(&data, &old, 120, 12, t1 - 30_000, "b");
    traffic(&data, &v3, 120, 12, t1 + 1000, "b");
    assert_eq!(tick(t1 + 61_000), "passed");
    assert_eq!(
        reg.state("acme", "greet").unwrap().live.as_deref(),
        Some(v3.as_str())
    );

    // too little traffic: no verdict, then inconclusive — never a pass, nothing changes
    let v4 = roll_out(&reg, &base, &dir, &v3, 4, Rollout::Canary(10));
    let t2 = reg.open_watches().unwrap()[0].started_at;
    traffic(&data, &v4, 20, 10, t2 + 1000, "c");
    traffic(&data, &v3, 200, 10, t2 + 1000, "c");
    assert_eq!(tick(t2 + 120_000), "watching");
    let w = reg.watches("acme", "greet").unwrap().remove(0);
    assert_eq!(w.verdict["state"], "insufficient");
    assert_eq!(tick(t2 + 11 * 60_000), "inconclusive");
    let st = reg.state("acme", "greet").unwrap();
    assert_eq!(
        (st.live.as_deref(), st.canary),
        (Some(v3.as_str()), Some((v4.clone(), 10)))
    );
    reg.set_canary("acme", "greet", None, "alice", "enough")
        .unwrap();

    // a person promotes during the window: a regression is not undone
    let v5 = roll_out(&reg, &base, &dir, &v3, 5, Rollout::Live);
    let t3 = reg.open_watches().unwrap()[0].started_at;
    reg.promote(
        "acme",
        "greet",
        &v5,
        Expect::Version(v5.clone()),
        "alice",
        "I checked it myself",
    )
    .unwrap();
    traffic(&data, &v3, 150, 10, t3 - 30_000, "d");
    traffic(&data, &v5, 150, 60, t3 + 1000, "d");
    assert_eq!(tick(t3 + 61_000), "superseded");
    assert_eq!(
        reg.state("acme", "greet").unwrap().live.as_deref(),
        Some(v5.as_str())
    );
    assert!(!reg.version("acme", "greet", &v5).unwrap().retired);
}

#[test]
fn gated_registration_is_all_or_nothing() {
    let dir = tmpdir("cas");
    let gguf = tiny(&dir);
    let base = base_of(&gguf);
    let reg = registry(&dir.join("root"));
    let v1 = version(&reg, &base, &dir, 1);
    let v2 = version(&reg, &base, &dir, 2);
    reg.promote("acme", "greet", &v1, Expect::NoLive, "alice", "")
        .unwrap();
    let before = (
        reg.versions("acme", "greet").unwrap().len(),
        reg.journal("acme", "greet").unwrap().len(),
    );
    let spec = LoraSpec {
        rank: 2,
        alpha: 4.0,
        rslora: false,
        modules: vec![3],
        first_layer: 0,
    };
    let out = dir.join("cand");
    Adapter::init(&spec, &base.shapes, 9, &Device::Cpu)
        .unwrap()
        .save_peft(&out, "tiny")
        .unwrap();
    let nv = || NewVersion {
        tenant: "acme",
        name: "greet",
        dir: &out,
        source: "trainer:x",
        parent: None,
        metadata: serde_json::json!({}),
        claimed_base: None,
        actor: "retune-trainer",
    };
    let pass = Decision::Pass {
        expect: Expect::Version(v1.clone()),
        rollout: Rollout::Live,
        watch: true,
        summary: "pass".into(),
    };
    // no lease: nothing written
    assert!(matches!(
        reg.register_gated(nv(), &base, &pass, "d1"),
        Err(RegistryError::LeaseLost(_))
    ));
    // the live version changed since the gate read it (a person rolled it to v2,
    // then retired v1): nothing written
    assert!(reg.acquire_lease("acme", "greet", "d1", 60_000).unwrap());
    assert!(
        !reg.acquire_lease("acme", "greet", "d2", 60_000).unwrap(),
        "one holder at a time"
    );
    reg.promote("acme", "greet", &v2, Expect::Any, "alice", "")
        .unwrap();
    reg.retire("acme", "greet", &v1, "alice", "").unwrap();
    let before = (before.0, before.1 + 2);
    assert!(matches!(
        reg.register_gated(nv(), &base, &pass, "d1"),
        Err(RegistryError::Conflict { .. })
    ));
    assert_eq!(
        (
            reg.versions("acme", "greet").unwrap().len(),
            reg.journal("acme", "greet").unwrap().len()
        ),
        before
    );
    assert!(reg.open_watches().unwrap().is_empty());
    // a lapsed lease: another daemon took over; the first cannot register
    assert!(reg.acquire_lease("acme", "greet", "d1", 1).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert!(reg.acquire_lease("acme", "greet", "d2", 60_000).unwrap());
    assert!(reg.renew_lease("acme", "greet", "d1", 60_000).is_err());
    let pass2 = Decision::Pass {
        expect: Expect::Version(v2.clone()),
        rollout: Rollout::Live,
        watch: true,
        summary: "pass".into(),
    };
    assert!(matches!(
        reg.register_gated(nv(), &base, &pass2, "d1"),
        Err(RegistryError::LeaseLost(_))
    ));
    let (v, st) = reg.register_gated(nv(), &base, &pass2, "d2").unwrap();
    assert_eq!(st.live.as_deref(), Some(v.id.as_str()));
    assert_eq!(
        reg.open_watches().unwrap()[0].previous.as_deref(),
        Some(v2.as_str())
    );
}

/// A rank-2 adapter on every module of every layer, its B set by `b` from the
/// zeros it starts at, saved at `dir` and loaded as served.
fn rank2_adapter(
    dir: &Path,
    base: &ServedBase,
    b: impl Fn(&candle_core::Tensor) -> candle_core::Tensor,
) -> retune_adapters::LoraAdapter {
    let spec = LoraSpec {
        rank: 2,
        alpha: 4.0,
        rslora: false,
        modules: (0..7).collect(),
        first_layer: 0,
    };
    let a = Adapter::init(&spec, &base.shapes, 1, &Device::Cpu).unwrap();
    for layer in &a.lora.layers {
        for p in layer.iter().flatten() {
            p.b.set(&b(p.b.as_tensor())).unwrap();
        }
    }
    a.save_peft(dir, "tiny").unwrap();
    retune_adapters::load_peft(dir, &base.shapes, &Default::default()).unwrap()
}

#[test]
fn forgetting_is_zero_for_an_identity_adapter_and_bounded_for_a_trained_one() {
    let dir = tmpdir("forget");
    let gguf = tiny(&dir);
    let l = retune_engine::load(&gguf).unwrap();
    let base = base_of(&gguf);
    let zero = rank2_adapter(&dir.join("zero"), &base, |b| b.zeros_like().unwrap());
    let f = retune_trainer::gate::forgetting(&l.model, &l.tok, &l.template, &zero, 8, 0.0).unwrap();
    assert!(f.kl.abs() < 1e-9 && f.ok && f.tokens > 12, "{f:?}");
    // B != 0: the adapter changes the base's answers; a zero bound rejects it
    let moved = rank2_adapter(&dir.join("moved"), &base, |b| {
        (b.ones_like().unwrap() * 0.5).unwrap()
    });
    let f =
        retune_trainer::gate::forgetting(&l.model, &l.tok, &l.template, &moved, 8, 0.0).unwrap();
    assert!(f.kl > 1e-3 && !f.ok, "{f:?}");
}

/// The gate and `retune-trainer eval` decode a declared label task as it is
/// served: only its labels, for the base and for an adapter with random weights
/// (which, unconstrained, answer other text).
#[test]
fn a_label_task_is_decoded_as_served_only_its_labels_for_any_weights() {
    let dir = tmpdir("constrained");
    let gguf = tiny(&dir);
    let l = retune_engine::load(&gguf).unwrap();
    let base = base_of(&gguf);
    let random = rank2_adapter(&dir.join("random"), &base, |b| {
        b.randn_like(0.0, 0.5).unwrap()
    });
    let labels: Vec<String> = ["hello", "world", "hello world", "lost card"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let bodies: Vec<ExampleBody> = (0..12).map(|i| row(i, i % 3).body).collect();
    for adapter in [None, Some(&random)] {
        let eval = |labels: Option<&[String]>| {
            retune_trainer::eval::exact_match(
                &l.model,
                &l.tok,
                &l.template,
                adapter,
                &bodies,
                (24, 5),
                labels,
            )
            .unwrap()
            .answers
        };
        let free = eval(None);
        assert!(
            free.iter().any(|x| !labels.contains(&x.trim().to_string())),
            "{free:?}"
        );
        let only = eval(Some(&labels));
        assert!(
            only.iter().all(|x| labels.contains(&x.trim().to_string())),
            "{only:?}"
        );
    }
}

/// What must hold in the stores whenever no daemon is mid-transaction.
fn consistent(root: &Path) {
    consistent_in(&registry(root));
}

fn consistent_in(reg: &Registry) {
    for (tenant, name, st) in reg.list(None).unwrap() {
        let versions = reg.versions(&tenant, &name).unwrap();
        let journal = reg.journal(&tenant, &name).unwrap();
        for v in &versions {
            assert!(
                journal
                    .iter()
                    .any(|e| e.event == "register" && e.version.as_deref() == Some(v.id.as_str())),
                "{} registered without its journal entry",
                v.id
            );
            let gate = &v.metadata["gate"];
            assert!(
                gate.is_object(),
                "{} registered without its gate result",
                v.id
            );
            if gate["passed"] == false {
                assert!(v.retired, "rejected {} is servable", v.id);
            }
            if !v.retired {
                let r = retune_adapters::AdapterRef::new(
                    &tenant,
                    &name,
                    &v.id,
                    retune_adapters::Via::Pinned,
                )
                .unwrap();
                let dir = reg.servable_dir(&r).unwrap();
                for f in ["adapter_config.json", "adapter_model.safetensors"] {
                    assert!(dir.join(f).is_file(), "{} lacks {f}", v.id);
                }
            }
        }
        for alias in [st.live.clone(), st.previous.clone(), st.canary.map(|c| c.0)]
            .into_iter()
            .flatten()
        {
            let v = versions
                .iter()
                .find(|v| v.id == alias)
                .expect("an alias names an unknown version");
            assert!(
                !v.retired || Some(&alias) == st.previous.as_ref(),
                "alias on retired {alias}"
            );
        }
        for w in reg.watches(&tenant, &name).unwrap() {
            assert!(
                versions.iter().any(|v| v.id == w.version),
                "watch of an unknown version"
            );
        }
    }
}

#[test]
fn kill_9_at_any_point_leaves_the_registry_consistent_and_the_next_run_completes() {
    let dir = tmpdir("kill");
    let gguf = tiny(&dir);
    let cfg = dir.join("retune.toml");
    let text = format!(
        "[model]\npath = {:?}\n[adapters]\nroot = {:?}\n[trainer]\nlease_seconds = 60\n[trainer.defaults.trigger]\nmin_new_examples = 20\nmin_examples = 10\n[trainer.defaults.train]\nrank = 4\nalpha = 8.0\nlr = 0.01\nepochs = 8.0\nbatch_size = 8\nmax_len = 64\nwarmup_steps = 2\ntop_layers = 2\n[trainer.defaults.gate]\nmax_new_tokens = 6\nbootstrap = 500\nmax_forgetting = 100.0\nrollout = \"live\"\nclassical = \"report\"\n[trainer.defaults.data]\neval_percent = 25\nscrub = false\n",
        gguf.to_string_lossy(),
        dir.join("root").to_string_lossy()
    );
    std::fs::write(&cfg, text).unwrap();
    let daemon = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_retune-trainer"))
            .args(["daemon", "--once", "--holder", "node-a", "--config"])
            .arg(&cfg)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // how long one uninterrupted pass takes, on a copy of the data
    import(&dir, &rows(120, None));
    let root = dir.join("root");
    let t = std::time::Instant::now();
    let probe_dir = dir.join("probe");
    std::fs::create_dir_all(probe_dir.join("root")).unwrap();
    import(&probe_dir, &rows(120, None));
    let probe_cfg = probe_dir.join("retune.toml");
    std::fs::write(
        &probe_cfg,
        std::fs::read_to_string(&cfg).unwrap().replace(
            &*root.to_string_lossy(),
            &*probe_dir.join("root").to_string_lossy(),
        ),
    )
    .unwrap();
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_retune-trainer"))
        .args(["daemon", "--once", "--holder", "probe", "--config"])
        .arg(&probe_cfg)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let full = t.elapsed();
    // kill at spread points of a pass: loading, training, gating, registering
    let mut killed = 0;
    for frac in [0.15, 0.35, 0.55, 0.7, 0.8, 0.9, 0.97] {
        let mut child = daemon();
        std::thread::sleep(full.mul_f64(frac));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        }
        child.wait().unwrap();
        consistent(&root);
        let reg = registry(&root);
        if reg
            .state("acme", "greet")
            .map(|s| s.live.is_some())
            .unwrap_or(false)
        {
            break; // a kill after the commit: the work is done
        }
    }
    assert!(killed > 0);
    // the next run completes (or finds the work already committed)
    let out = daemon().wait_with_output().unwrap();
    assert!(out.status.success());
    consistent(&root);
    let reg = registry(&root);
    let live = reg
        .state("acme", "greet")
        .unwrap()
        .live
        .expect("a live version after the next run");
    assert_eq!(
        reg.version("acme", "greet", &live).unwrap().metadata["gate"]["passed"],
        true
    );
    let runs = reg.runs("acme", "greet", 50).unwrap();
    assert!(runs.iter().all(|r| r.status != "running"), "{runs:?}");
    assert!(runs.iter().any(|r| r.status == "crashed"), "{runs:?}");
    // the live version came from the run that finished, or from one killed
    // between its commit and its last bookkeeping step
    let made_by = reg.version("acme", "greet", &live).unwrap().metadata["run"]
        .as_str()
        .unwrap()
        .to_string();
    let run = runs.iter().find(|r| r.id == made_by).unwrap();
    assert!(
        run.status == "promoted" || run.status == "crashed",
        "{run:?}"
    );
    assert!(
        runs.iter().filter(|r| r.status == "promoted").count() <= 1,
        "{runs:?}"
    );
    assert_eq!(
        reg.versions("acme", "greet").unwrap().len(),
        1,
        "no second version of the same data"
    );
    // `status` reads the same from the stores, without a model
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_retune-trainer"))
        .args(["status", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["adapters"][0]["live"], live.as_str());
    assert_eq!(st["adapters"][0]["new_examples"], 0);
    assert_eq!(st["counts"]["gate_passes"], 1);
}

#[test]
fn sigterm_mid_training_ends_the_run_as_interrupted_releases_the_lease_and_exits() {
    // the kubelet sends SIGTERM, then SIGKILL after the grace period; as PID 1
    // in a container an unhandled SIGTERM is ignored, so the daemon handles it
    let dir = tmpdir("sigterm");
    let gguf = tiny(&dir);
    let root = dir.join("root");
    let cfg_with = |epochs: f64, name: &str| {
        let cfg = dir.join(name);
        let text = format!(
            "[model]\npath = {:?}\n[adapters]\nroot = {:?}\n[trainer]\nlease_seconds = 10\npoll_seconds = 30\n[trainer.defaults.trigger]\nmin_new_examples = 20\nmin_examples = 10\n[trainer.defaults.train]\nrank = 4\nalpha = 8.0\nlr = 0.01\nepochs = {epochs}\nbatch_size = 8\nmax_len = 64\nwarmup_steps = 2\ntop_layers = 2\n[trainer.defaults.gate]\nmax_new_tokens = 6\nbootstrap = 500\nmax_forgetting = 100.0\nrollout = \"live\"\nclassical = \"report\"\n[trainer.defaults.data]\neval_percent = 25\nscrub = false\n",
            gguf.to_string_lossy(),
            root.to_string_lossy()
        );
        std::fs::write(&cfg, text).unwrap();
        cfg
    };
    // long enough that the signal lands mid-training
    let long = cfg_with(2000.0, "long.toml");
    import(&dir, &rows(120, None));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_retune-trainer"))
        .args(["daemon", "--holder", "node-a", "--config"])
        .arg(&long)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // wait for a run with training progress in its record
    let t = std::time::Instant::now();
    let run_id = loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the daemon exited before training: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(120),
            "no training progress"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        let Ok(reg) = Registry::open(
            &root.join("registry.db"),
            Arc::new(LocalStore::new(&root.join("store")).unwrap()),
            1 << 30,
        ) else {
            continue;
        };
        let runs = reg.runs("acme", "greet", 10).unwrap_or_default();
        if let Some(r) = runs
            .iter()
            .find(|r| r.status == "running" && r.detail.get("progress").is_some())
        {
            break r.id.clone();
        }
    };
    let sent = std::time::Instant::now();
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            sent.elapsed() < std::time::Duration::from_secs(20),
            "SIGTERM did not stop the daemon within 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    assert!(
        status.success(),
        "{status:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    consistent(&root);
    let reg = registry(&root);
    let runs = reg.runs("acme", "greet", 50).unwrap();
    let run = runs.iter().find(|r| r.id == run_id).unwrap();
    assert_eq!(run.status, "interrupted", "{run:?}");
    assert!(run.finished_at.is_some());
    assert_eq!(reg.lease_holder("acme", "greet").unwrap(), None);
    match reg.versions("acme", "greet") {
        Ok(vs) => assert!(vs.is_empty(), "{vs:?}"),
        Err(RegistryError::NotFound(_)) => {}
        Err(e) => panic!("{e}"),
    }
    assert!(
        !reg.journal("acme", "greet")
            .unwrap()
            .iter()
            .any(|e| e.event == "run-failed"),
        "a stop is not a failure"
    );
    // the interrupted run consumed nothing: the next daemon trains the same data
    let short = cfg_with(8.0, "short.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retune-trainer"))
        .args(["daemon", "--once", "--holder", "node-a", "--config"])
        .arg(&short)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reg = registry(&root);
    assert!(reg.state("acme", "greet").unwrap().live.is_some());
    consistent(&root);
}

#[test]
fn one_daemon_per_adapter_retrain_requests_and_the_schedule_trigger_training() {
    let dir = tmpdir("lease");
    let gguf = tiny(&dir);
    let s = settings(&dir, &gguf, "");
    let data = import(&dir, &rows(120, None));
    let a = Daemon::open(s.clone(), "node-a".into()).unwrap();
    let b = Daemon::open(s, "node-b".into()).unwrap();
    let ls = a.targets().unwrap().remove(0).2;
    // node-b holds the lease (it is training): node-a does not train the adapter
    assert!(b
        .reg
        .acquire_lease("acme", "greet", "node-b", 60_000)
        .unwrap());
    let due = a
        .due("acme", "greet", &ls)
        .unwrap()
        .expect("120 new examples");
    assert!(a
        .train_adapter("acme", "greet", &ls, &due)
        .unwrap()
        .is_none());
    assert!(a.reg.runs("acme", "greet", 5).unwrap().is_empty());
    b.reg.release_lease("acme", "greet", "node-b").unwrap();
    let out = a.pass().unwrap();
    assert_eq!(out[0].status, "promoted", "{}", out[0].reason);
    let first = out[0].version.clone().unwrap();
    assert_eq!(a.due("acme", "greet", &ls).unwrap(), None);
    // an erasure asks for a retrain: trained again without new examples, on a
    // snapshot without the erased person's rows
    let erased = data.erase("acme", "person-3").unwrap();
    assert!(erased.examples > 0 && !erased.snapshots.is_empty());
    a.reg
        .request_retrain("acme", "greet", &first, "privacy", "erasure of person-3")
        .unwrap();
    let due = a.due("acme", "greet", &ls).unwrap();
    assert!(
        matches!(due, Some(retune_trainer::daemon::Trigger::Retrain(_))),
        "{due:?}"
    );
    let out = a.pass().unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].status, "promoted",
        "as good as the tainted version: {}",
        out[0].reason
    );
    let run = a.reg.run(&out[0].run).unwrap();
    let snap = run.snapshot.unwrap();
    let rows = data.snapshot_rows("acme", &snap).unwrap();
    assert!(rows
        .iter()
        .all(|r| !r.subject_ids.contains(&"person-3".to_string())));
    assert_eq!(rows.len() + erased.examples, 120);
    assert_eq!(
        a.due("acme", "greet", &ls).unwrap(),
        None,
        "the request was served"
    );
    // the schedule: a few new examples (below the count trigger) once the time is up
    data.import("acme", "greet", "test", &rows_from(200, 5))
        .unwrap();
    assert_eq!(a.due("acme", "greet", &ls).unwrap(), None);
    let mut sched = ls.clone();
    sched.trigger.every_minutes = Some(0.0);
    assert_eq!(
        a.due("acme", "greet", &sched).unwrap(),
        Some(retune_trainer::daemon::Trigger::Schedule { new: 5 })
    );
}

fn rows_from(start: usize, n: usize) -> Vec<ImportRow> {
    (start..start + n).map(|i| row(i, i % 3)).collect()
}

#[test]
fn a_candidate_that_beats_a_weak_live_version_goes_out_as_a_watched_canary() {
    let dir = tmpdir("canary");
    let gguf = tiny(&dir);
    let base = base_of(&gguf);
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    // a live version that knows nothing (B = 0: the base model's answers)
    let weak = {
        let reg = registry(&root);
        let v = version(&reg, &base, &dir, 1);
        reg.promote("acme", "greet", &v, Expect::NoLive, "alice", "first")
            .unwrap();
        v
    };
    import(&dir, &rows(120, None));
    let extra = "[[trainer.adapters]]\ntenant = \"acme\"\nname = \"greet\"\n[trainer.adapters.gate]\nmax_new_tokens = 6\nbootstrap = 500\nmax_forgetting = 100.0\nrollout = \"canary\"\ncanary_percent = 25\nclassical = \"report\"\n";
    let d = Daemon::open(settings(&dir, &gguf, extra), "h".into()).unwrap();
    let out = d.pass().unwrap();
    assert_eq!(out[0].status, "canary", "{}", out[0].reason);
    let v = out[0].version.clone().unwrap();
    let st = d.reg.state("acme", "greet").unwrap();
    assert_eq!(
        (st.live.as_deref(), st.canary),
        (Some(weak.as_str()), Some((v.clone(), 25)))
    );
    let g = &d.reg.version("acme", "greet", &v).unwrap().metadata["gate"];
    assert_eq!(g["vs_live"]["beats"], true, "{g}");
    let w = d.reg.open_watches().unwrap();
    assert_eq!(
        (
            w[0].version.as_str(),
            w[0].previous.as_deref(),
            w[0].mode.as_str()
        ),
        (v.as_str(), Some(weak.as_str()), "canary")
    );
    // the next pass looks at the watch: the window is not over
    assert!(d.pass().unwrap().is_empty());
    assert_eq!(d.reg.open_watches().unwrap()[0].verdict["state"], "waiting");
}

#[test]
fn two_daemons_on_postgresql_never_train_one_adapter_together_and_the_survivor_takes_over_after_kill_9(
) {
    use std::time::{Duration, Instant};
    let pg = retune_testkit::pg::PgTest::new().unwrap();
    let dir = tmpdir("two-daemons");
    let gguf = tiny(&dir);
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let data = retune_datasets::SqlStore::open(&pg.url).unwrap();
    data.import("acme", "greet", "test", &rows(120, None))
        .unwrap();
    let cfg = dir.join("retune.toml");
    let text = format!(
        "[model]\npath = {:?}\n[adapters]\nroot = {:?}\nregistry_url = {:?}\n[datasets]\nurl = {:?}\n\
         [trainer]\nlease_seconds = 10\npoll_seconds = 0.5\n[trainer.defaults.trigger]\nmin_new_examples = 20\nmin_examples = 10\n\
         [trainer.defaults.train]\nrank = 4\nalpha = 8.0\nlr = 0.01\nepochs = 40.0\nbatch_size = 8\nmax_len = 64\nwarmup_steps = 2\ntop_layers = 2\n\
         [trainer.defaults.gate]\nmax_new_tokens = 6\nbootstrap = 500\nmax_forgetting = 100.0\nrollout = \"live\"\nclassical = \"report\"\n\
         [trainer.defaults.data]\neval_percent = 25\nscrub = false\n",
        gguf.to_string_lossy(),
        root.to_string_lossy(),
        pg.url,
        pg.url
    );
    std::fs::write(&cfg, text).unwrap();
    let spawn = |holder: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_retune-trainer"))
            .args(["daemon", "--holder", holder, "--config"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{holder}.log"))).unwrap())
            .spawn()
            .unwrap()
    };
    struct Killed(Vec<(String, std::process::Child)>);
    impl Drop for Killed {
        fn drop(&mut self) {
            for (_, c) in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut daemons = Killed(vec![
        ("node-a".to_string(), spawn("node-a")),
        ("node-b".to_string(), spawn("node-b")),
    ]);
    let reg = Registry::open_at(
        &pg.url,
        Arc::new(LocalStore::new(&root.join("store")).unwrap()),
        1 << 30,
    )
    .unwrap();
    let mut db = pg.client().unwrap();
    // never two runs at once; returns the runs
    let sample = || {
        let runs = reg.runs("acme", "greet", 50).unwrap();
        let running: Vec<&str> = runs
            .iter()
            .filter(|r| r.status == "running")
            .map(|r| r.holder.as_str())
            .collect();
        assert!(running.len() <= 1, "two trainers at once: {runs:?}");
        runs
    };
    let t = Instant::now();
    let first = loop {
        assert!(t.elapsed() < Duration::from_secs(120), "nobody trained");
        let runs = sample();
        if let Some(r) = runs
            .iter()
            .find(|r| r.status == "running" && r.detail.get("progress").is_some())
        {
            break r.clone();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // kill -9 the leader mid-training
    let k = daemons
        .0
        .iter()
        .position(|(h, _)| *h == first.holder)
        .unwrap();
    let (_, mut leader) = daemons.0.remove(k);
    leader.kill().unwrap();
    leader.wait().unwrap();
    let expires: i64 = db
        .query_one(
            "SELECT expires_at FROM leases WHERE tenant = 'acme' AND name = 'greet'",
            &[],
        )
        .unwrap()
        .get(0);
    let survivor = daemons.0[0].0.clone();
    let t = Instant::now();
    let second = loop {
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "the survivor never finished a run"
        );
        let runs = sample();
        if let Some(r) = runs
            .iter()
            .find(|r| r.holder == survivor && r.finished_at.is_some())
        {
            break r.clone();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        second.started_at >= expires,
        "the survivor started at {} before the leader's lease expired at {expires}",
        second.started_at
    );
    assert_eq!(second.status, "promoted", "{second:?}");
    let runs = reg.runs("acme", "greet", 50).unwrap();
    let dead = runs.iter().find(|r| r.id == first.id).unwrap();
    assert_eq!(dead.status, "crashed", "{dead:?}");
    consistent_in(&reg);
    let versions = reg.versions("acme", "greet").unwrap();
    assert_eq!(
        versions.len(),
        1,
        "the killed run registered nothing: {versions:?}"
    );
    assert_eq!(
        reg.state("acme", "greet").unwrap().live.as_deref(),
        second.version.as_deref()
    );
    println!(
        "leader {} killed mid-training; {survivor} took over {} ms after the lease expired",
        first.holder,
        second.started_at - expires
    );
}

/// Declaring the label set is all it takes: the daemon trains a classifier
/// (LoRA + a head over the labels), gates it through the serving forward, skips
/// the forgetting check (it answers only labels) and promotes it; the registered
/// version is a PEFT SEQ_CLS adapter whose head carries the declared labels.
#[test]
fn a_declared_label_task_is_trained_as_a_classifier_and_promoted() {
    let dir = tmpdir("classifier");
    let gguf = tiny(&dir);
    let s = settings(
        &dir,
        &gguf,
        "[[trainer.adapters]]\ntenant = \"acme\"\nname = \"greet\"\n[trainer.adapters.data]\neval_percent = 25\nscrub = false\nlabels = [\"hello\", \"world\", \"hello world\"]\n",
    );
    import(&dir, &rows(120, None));
    let d = Daemon::open(s, "test-holder".into()).unwrap();
    let out = d.pass().unwrap();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].status, "promoted", "{}", out[0].reason);
    let live = d.reg.state("acme", "greet").unwrap().live.unwrap();
    let v = d.reg.version("acme", "greet", &live).unwrap();
    let gate = &v.metadata["gate"];
    assert!(gate["arms"][0]["score"].as_f64().unwrap() > 0.9, "{gate}");
    assert!(
        gate["forgetting"]["skipped"]
            .as_str()
            .is_some_and(|s| s.contains("classifier")),
        "{gate}"
    );
    let training = &v.metadata["training"]["settings"];
    assert_eq!(training["labels"], serde_json::json!(ANSWERS), "{training}");
    assert_eq!(training["fit_to_budget"], true, "{training}");
    let r = retune_adapters::AdapterRef::new("acme", "greet", &live, retune_adapters::Via::Live)
        .unwrap();
    let dir = d.reg.servable_dir(&r).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let base = base_of(&gguf);
    let a = retune_adapters::load_peft(&dir, &base.shapes, &Default::default()).unwrap();
    assert_eq!(a.head.as_ref().unwrap().labels, ANSWERS);
    // with the classical prior trained on the same rows (the daemon's default),
    // and the gate reports what the head scores without it
    assert!(a.head.as_ref().unwrap().prior.is_some());
    let note = v.metadata["training"]["classical_prior"]
        .as_str()
        .unwrap_or("");
    assert!(
        note.starts_with("a TF-IDF classifier over 3 labels"),
        "{note}"
    );
    assert!(
        gate["arms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "head alone"),
        "{gate}"
    );
}
