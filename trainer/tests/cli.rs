//! `retune-trainer train` end to end: from a JSONL file and from a dataset
//! snapshot to a registered (not promoted) version with its training record,
//! lineage and plot; bad input exits 2 with nothing registered.

use retune_datasets::{DatasetStore, ImportRow, Policy, SqlStore};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-trainer-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn jsonl(n: usize) -> String {
    let answers = ["hello", "world", "hello world"];
    (0..n)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("query {i} about {}", i % 3)},
                {"role": "assistant", "content": answers[i % 3]}]})
            .to_string()
                + "\n"
        })
        .collect()
}

fn trainer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_retune-trainer"))
        .args(args)
        .env_remove("RETUNE_MODEL")
        .env_remove("RETUNE_ROOT")
        .output()
        .unwrap()
}

fn registry(root: &Path) -> retune_registry::Registry {
    let store = std::sync::Arc::new(retune_registry::LocalStore::new(&root.join("store")).unwrap());
    retune_registry::Registry::open(&root.join("registry.db"), store, 1 << 30).unwrap()
}

#[test]
fn trains_from_a_file_and_from_a_snapshot_and_registers() {
    let dir = tmpdir("ok");
    let (gguf, _) = retune_engine::tiny::write(&dir, &Default::default()).unwrap();
    let data = dir.join("data.jsonl");
    std::fs::write(&data, jsonl(40)).unwrap();
    let root = dir.join("root");
    let out = dir.join("out");
    let common = [
        "--model",
        gguf.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--rank",
        "4",
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--warmup",
        "1",
    ];
    let mut args = vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(common);
    args.extend(["--register", "acme/tone"]);
    let o = trainer(&args);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("registered acme/tone version"), "{stdout}");
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "training.json",
        "loss.svg",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    assert!(
        !out.join("checkpoint").exists(),
        "a finished run leaves no checkpoint"
    );
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("polyline") && svg.trim_end().ends_with("</svg>")
    );
    let reg = registry(&root);
    let versions = reg.versions("acme", "tone").unwrap();
    assert_eq!(versions.len(), 1);
    let v = &versions[0];
    assert_eq!(
        reg.state("acme", "tone").unwrap().live,
        None,
        "registered, not promoted"
    );
    let rec = &v.metadata["training"];
    assert_eq!(rec["steps"], 6);
    assert_eq!(rec["loss_curve"].as_array().unwrap().len(), 6);
    assert!(rec["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(rec["peak_rss_mib"].as_f64().unwrap() > 0.0);
    assert_eq!(rec["base_fingerprint"], v.base_fingerprint.as_str());
    assert!(v.source.starts_with("trainer:"));

    // from a snapshot: the version records it, so lineage finds the version
    let store = SqlStore::sqlite(&root.join("datasets.db")).unwrap();
    let (rows, errs) = retune_datasets::parse_jsonl(&jsonl(40));
    assert!(errs.is_empty());
    let rows: Vec<ImportRow> = rows
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r.subject_id = Some(format!("user-{}", i % 4));
            r
        })
        .collect();
    store.import("acme", "tone", "test", &rows).unwrap();
    let m = store.snapshot("acme", "tone", &Policy::default()).unwrap();
    assert!(m.eval > 0 && m.train > 0);
    let out2 = dir.join("out2");
    let mut args = vec![
        "train",
        "--snapshot",
        &m.id,
        "--out",
        out2.to_str().unwrap(),
    ];
    args.extend(common);
    args.extend(["--register", "acme/tone"]);
    let o = trainer(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("training.json")).unwrap())
            .unwrap();
    assert_eq!(rec["examples"], m.train);
    assert_eq!(rec["eval_examples"], m.eval);
    assert!(
        !rec["eval_curve"].as_array().unwrap().is_empty(),
        "eval loss on the snapshot's eval split"
    );
    let lineage = store.lineage("acme", "user-1").unwrap();
    assert!(lineage.snapshots.contains(&m.id));
    let trained = reg.trained_on("acme", &lineage.snapshots).unwrap();
    assert_eq!(
        trained.len(),
        1,
        "the version trained on user-1's data is found"
    );
}

#[test]
fn bad_input_exits_2_and_registers_nothing() {
    let dir = tmpdir("bad");
    let (gguf, _) = retune_engine::tiny::write(&dir, &Default::default()).unwrap();
    let root = dir.join("root");
    let cases: Vec<(&str, String, &str)> = vec![
        ("empty.jsonl", String::new(), "no examples"),
        ("few.jsonl", jsonl(3), "at least 8"),
        ("broken.jsonl", "{\"messages\": 3}\n".into(), "bad lines"),
    ];
    for (name, body, want) in cases {
        let f = dir.join(name);
        std::fs::write(&f, body).unwrap();
        let out = dir.join(format!("out-{name}"));
        let o = trainer(&[
            "train",
            "--model",
            gguf.to_str().unwrap(),
            "--data",
            f.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "--register",
            "acme/tone",
            "--max-steps",
            "2",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
    }
    let o = trainer(&[
        "train",
        "--model",
        gguf.to_str().unwrap(),
        "--snapshot",
        "nope",
        "--tenant",
        "acme",
        "--out",
        dir.join("o").to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!root.join("registry.db").exists(), "nothing registered");
}

#[test]
fn registers_into_the_shared_stores_postgresql_and_the_bucket() {
    let dir = tmpdir("shared");
    let (gguf, _) = retune_engine::tiny::write(&dir, &Default::default()).unwrap();
    let data = dir.join("data.jsonl");
    std::fs::write(&data, jsonl(24)).unwrap();
    let pg = retune_testkit::pg::PgTest::new().unwrap();
    let s3 = retune_testkit::s3::S3Test::new().unwrap(); // sets the AWS credentials
    let root = dir.join("root");
    let out = trainer(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        dir.join("out").to_str().unwrap(),
        "--model",
        gguf.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--rank",
        "4",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--register",
        "acme/tone",
        "--registry-url",
        &pg.url,
        "--store-url",
        &s3.url,
        "--store-endpoint",
        &s3.endpoint,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // another replica (its own cache) finds the version in the shared registry
    // and loads its files from the bucket
    let other =
        retune_registry::open_store(&dir.join("other-cache"), Some(&s3.url), Some(&s3.endpoint))
            .unwrap();
    let reg = retune_registry::Registry::open_at(&pg.url, other, 1 << 30).unwrap();
    let v = reg.versions("acme", "tone").unwrap().remove(0);
    assert!(s3
        .object_file(&format!(
            "versions/acme/tone/{}/adapter_model.safetensors",
            v.id
        ))
        .is_file());
    let r = retune_adapters::AdapterRef::new("acme", "tone", &v.id, retune_adapters::Via::Pinned)
        .unwrap();
    let got = reg.servable_dir(&r).unwrap();
    assert!(got.starts_with(dir.join("other-cache").canonicalize().unwrap()));
    assert!(
        !root.join("registry.db").exists(),
        "nothing written to the embedded registry"
    );
}
