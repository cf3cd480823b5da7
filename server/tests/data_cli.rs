//! `retune data` end to end through the real binary: import with a bad line,
//! snapshot, lineage into registered versions, erasure that taints exactly the
//! versions trained on the subject's data, export.

use retune_engine::tiny::{self, TinySpec};
use std::process::Command;

fn retune(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_retune"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn line(q: &str, a: &str, subject: Option<&str>) -> String {
    let mut v = serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]});
    if let Some(s) = subject {
        v["subject_id"] = s.into();
    }
    v.to_string()
}

#[test]
fn erasing_a_subject_taints_exactly_the_versions_trained_on_its_data() {
    let dir = std::env::temp_dir().join(format!("retune-data-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = TinySpec::default();
    let (model, _) = tiny::write(&dir.join("model"), &spec).unwrap();
    let model = model.to_string_lossy().to_string();
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let root = root.to_string_lossy().to_string();
    let f1 = dir.join("tickets.jsonl");
    std::fs::write(
        &f1,
        [
            line(
                "ZED-PRIVATE lost my card",
                "lost_or_stolen_card",
                Some("zed"),
            ),
            "{broken".to_string(),
            line("card arrived?", "card_arrival", None),
            line("fee?", "card_payment_fee_charged", Some("olga")),
        ]
        .join("\n"),
    )
    .unwrap();
    let (code, out, err) = retune(&[
        "data",
        "--root",
        &root,
        "import",
        "acme/tickets",
        f1.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "a bad line is a failure: {err}");
    let r = json(&out);
    assert_eq!(r["imported"], 3);
    assert_eq!(r["errors"][0]["line"], 2);
    let f2 = dir.join("other.jsonl");
    std::fs::write(&f2, line("hello", "greeting", Some("olga"))).unwrap();
    assert_eq!(
        retune(&[
            "data",
            "--root",
            &root,
            "import",
            "acme/other",
            f2.to_str().unwrap()
        ])
        .0,
        0
    );
    let (code, out, err) = retune(&[
        "data",
        "--root",
        &root,
        "snapshot",
        "acme/tickets",
        "--no-scrub",
    ]);
    assert_eq!(code, 0, "{err}");
    let s1 = json(&out);
    let (_, out, _) = retune(&["data", "--root", &root, "snapshot", "acme/other"]);
    let s2 = json(&out);
    let (s1, s2) = (
        s1["id"].as_str().unwrap().to_string(),
        s2["id"].as_str().unwrap().to_string(),
    );
    // versions: two trained on s1 (tickets), one on s2 (other), one with no lineage
    let mut versions = Vec::new();
    for (i, (name, snap)) in [
        ("tickets", Some(&s1)),
        ("tickets", Some(&s1)),
        ("other", Some(&s2)),
        ("tickets", None),
    ]
    .iter()
    .enumerate()
    {
        let a = dir.join(format!("a{i}"));
        tiny::write_adapter(&a, &spec, 4, &[0, 2], i as u64 + 1, 8.0, 0.05).unwrap();
        let meta = match snap {
            Some(s) => serde_json::json!({ "snapshot": s }).to_string(),
            None => "{}".into(),
        };
        let (code, out, err) = retune(&[
            "adapters",
            "--root",
            &root,
            "register",
            &format!("acme/{name}"),
            a.to_str().unwrap(),
            "--model",
            &model,
            "--metadata",
            &meta,
        ]);
        assert_eq!(code, 0, "{err}");
        versions.push(json(&out)["id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        retune(&[
            "adapters",
            "--root",
            &root,
            "promote",
            "acme/tickets",
            &versions[1]
        ])
        .0,
        0
    );
    // lineage before erasure: the snapshot and exactly the two versions trained on it
    let (code, out, err) = retune(&[
        "data",
        "--root",
        &root,
        "lineage",
        "--tenant",
        "acme",
        "--subject",
        "zed",
    ]);
    assert_eq!(code, 0, "{err}");
    let l = json(&out);
    assert_eq!(l["snapshots"], serde_json::json!([s1]));
    let mut ids: Vec<&str> = l["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut want_ids = vec![versions[0].as_str(), versions[1].as_str()];
    want_ids.sort();
    assert_eq!(ids, want_ids);
    let (code, out, err) = retune(&[
        "data",
        "--root",
        &root,
        "erase",
        "--tenant",
        "acme",
        "--subject",
        "zed",
    ]);
    assert_eq!(code, 0, "{err}");
    let report = json(&out);
    assert_eq!(report["erased"]["examples"], 1);
    assert_eq!(report["erased"]["snapshots"], serde_json::json!([s1]));
    let mut tainted: Vec<(String, bool)> = report["tainted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["version"].as_str().unwrap().to_string(),
                t["live"].as_bool().unwrap(),
            )
        })
        .collect();
    tainted.sort();
    let mut want = vec![(versions[0].clone(), false), (versions[1].clone(), true)];
    want.sort();
    assert_eq!(
        tainted, want,
        "exactly the versions trained on s1; the live one flagged"
    );
    let (_, out, _) = retune(&["adapters", "--root", &root, "show", "acme/tickets"]);
    let taints = json(&out)["journal"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "taint")
        .count();
    assert_eq!(taints, 2);
    // the export holds the rest and nothing of zed
    let (code, out, _) = retune(&["data", "--root", &root, "export", "acme", &s1]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(!out.contains("ZED-PRIVATE"));
    let (_, out, _) = retune(&["data", "--root", &root, "show", "acme", &s1]);
    assert_eq!(json(&out)["erased"], 1);
    // with the rollback policy a tainted live version is replaced by the newest
    // untainted one (olga is in both snapshots: tickets and other)
    let (code, out, err) = retune(&[
        "data",
        "--root",
        &root,
        "erase",
        "--tenant",
        "acme",
        "--subject",
        "olga",
        "--on-tainted-live",
        "rollback",
    ]);
    assert_eq!(code, 0, "{err}");
    let report = json(&out);
    let live_row: Vec<&serde_json::Value> = report["tainted"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["live"] == true)
        .collect();
    assert_eq!(live_row.len(), 1, "{report}");
    assert_eq!(
        live_row[0]["action"],
        format!("rolled back to {}", versions[3])
    );
    assert_eq!(
        report["tainted"].as_array().unwrap().len(),
        3,
        "v0, v1 (tickets) and v2 (other)"
    );
    let (_, out, _) = retune(&["adapters", "--root", &root, "show", "acme/tickets"]);
    assert_eq!(json(&out)["state"]["live"], versions[3].as_str());
    assert_eq!(
        retune(&[
            "data",
            "--root",
            &root,
            "erase",
            "--tenant",
            "acme",
            "--subject",
            "x",
            "--on-tainted-live",
            "delete"
        ])
        .0,
        2,
        "an unknown policy is a usage error"
    );
    // erasing a subject nobody trained on taints nothing
    let (_, out, _) = retune(&[
        "data",
        "--root",
        &root,
        "erase",
        "--tenant",
        "acme",
        "--subject",
        "nobody",
    ]);
    assert_eq!(json(&out)["tainted"], serde_json::json!([]));
}

#[test]
fn import_for_a_label_task_refuses_answers_outside_its_labels_by_line() {
    let dir = std::env::temp_dir().join(format!("retune-data-cli-labels-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("root")).unwrap();
    let root = dir.join("root").to_string_lossy().to_string();
    let labels = dir.join("labels.json");
    std::fs::write(&labels, r#"["card_arrival", "lost_or_stolen_card"]"#).unwrap();
    let f = dir.join("t.jsonl");
    std::fs::write(
        &f,
        [
            line("lost my card", "lost_or_stolen_card", None),
            line("where is my card", "card_arival", None),
            line("card arrived?", "card_arrival", None),
        ]
        .join("\n"),
    )
    .unwrap();
    let (code, out, err) = retune(&[
        "data",
        "--root",
        &root,
        "import",
        "acme/intents",
        f.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    let r = json(&out);
    assert_eq!(r["imported"], 2, "{r}");
    assert_eq!(r["errors"][0]["line"], 2, "{r}");
    assert!(
        r["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("card_arival"),
        "{r}"
    );
    // a label set that declares nothing is refused before anything is read
    std::fs::write(&labels, r#"["only"]"#).unwrap();
    let (code, _, err) = retune(&[
        "data",
        "--root",
        &root,
        "import",
        "acme/intents",
        f.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("at least 2 labels"), "{err}");
}
