//! `retune adapters` end to end through the real binary: register, promote with
//! compare-and-set, rollback, show — state survives between invocations.

use retune_engine::tiny::{self, TinySpec};
use std::process::Command;

fn retune(args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_retune"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn register_promote_rollback_show() {
    let dir = std::env::temp_dir().join(format!("retune-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = TinySpec::default();
    let (model, _) = tiny::write(&dir.join("model"), &spec).unwrap();
    let model = model.to_string_lossy().to_string();
    let root = dir.join("root").to_string_lossy().to_string();
    let mut ids = Vec::new();
    for seed in [1, 2] {
        let a = dir.join(format!("a{seed}"));
        tiny::write_adapter(&a, &spec, 4, &[0, 2], seed, 8.0, 0.05).unwrap();
        let (ok, v, err) = retune(&[
            "adapters",
            "--root",
            &root,
            "register",
            "acme/tickets",
            a.to_str().unwrap(),
            "--model",
            &model,
        ]);
        assert!(ok, "{err}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let (ok, _, err) = retune(&[
        "adapters",
        "--root",
        &root,
        "promote",
        "acme/tickets",
        &ids[0],
        "--expect",
        "none",
    ]);
    assert!(ok, "{err}");
    let (ok, s, err) = retune(&[
        "adapters",
        "--root",
        &root,
        "promote",
        "acme/tickets",
        &ids[1],
        "--expect",
        &ids[0],
        "--reason",
        "v2",
    ]);
    assert!(ok, "{err}");
    assert_eq!(s["live"], ids[1].as_str());
    // a stale expectation is a conflict, and changes nothing
    let (ok, _, err) = retune(&[
        "adapters",
        "--root",
        &root,
        "promote",
        "acme/tickets",
        &ids[0],
        "--expect",
        &ids[0],
    ]);
    assert!(!ok && err.contains("conflict"), "{err}");
    let (ok, s, err) = retune(&[
        "adapters",
        "--root",
        &root,
        "rollback",
        "acme/tickets",
        "--reason",
        "bad",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        (s["live"].as_str(), s["previous"].as_str()),
        (Some(ids[0].as_str()), Some(ids[1].as_str()))
    );
    let (ok, show, err) = retune(&["adapters", "--root", &root, "show", "acme/tickets"]);
    assert!(ok, "{err}");
    let events: Vec<&str> = show["journal"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["register", "register", "promote", "promote", "rollback"]
    );
    assert_eq!(show["versions"].as_array().unwrap().len(), 2);
    let (ok, _, err) = retune(&["adapters", "--root", &root, "show", "nobody/nothing"]);
    assert!(!ok && err.contains("not found"), "{err}");
}
