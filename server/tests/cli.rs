//! The `retune` command line: help for every command, the version, exit codes,
//! and settings errors that name the key.

use std::process::{Command, Output};

fn retune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retune"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_lists_every_command_and_documents_exit_codes() {
    let out = retune(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    // a command is a line of the `Commands:` list, not a word of a description
    let listed = |help: &str, cmd: &str| help.lines().any(|l| l.starts_with(&format!("  {cmd} ")));
    for cmd in ["serve", "generate", "adapters", "data"] {
        assert!(listed(&help, cmd), "{cmd} missing from:\n{help}");
    }
    assert!(help.contains("Exit codes:\n  0  success"), "{help}");
    let serve = text(&retune(&["serve", "--help"]).stdout);
    assert!(
        serve.contains("--config") && serve.contains("Settings file"),
        "{serve}"
    );
    assert!(
        serve.contains("--model") && serve.contains("embedded defaults"),
        "{serve}"
    );
    let adapters = text(&retune(&["adapters", "--help"]).stdout);
    for cmd in [
        "list", "show", "register", "promote", "rollback", "canary", "retire", "gc",
    ] {
        assert!(listed(&adapters, cmd), "{cmd} missing from:\n{adapters}");
    }
    let promote = text(&retune(&["adapters", "--root", "x", "promote", "--help"]).stdout);
    assert!(promote.contains("--expect"), "{promote}");
}

#[test]
fn version_prints_the_crate_version() {
    let out = retune(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("retune {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_exit_2_and_runtime_failures_exit_1() {
    assert_eq!(retune(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        retune(&["serve"]).status.code(),
        Some(2),
        "needs --config or --model"
    );
    assert_eq!(
        retune(&["serve", "--config", "a", "--model", "b"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        retune(&["generate", "--model", "m.gguf"]).status.code(),
        Some(2)
    );
    for bad in [
        &["adapters", "--root", "r", "show", "no-slash"][..],
        &["adapters", "--root", "r", "canary", "a/b", "v1", "101"],
        &["adapters", "--root", "r", "canary", "a/b"],
        &[
            "adapters",
            "--root",
            "r",
            "register",
            "a/b",
            "d",
            "--model",
            "m",
            "--metadata",
            "[1]",
        ],
        &[
            "data",
            "--root",
            "r",
            "snapshot",
            "a/b",
            "--eval-percent",
            "200",
        ],
    ] {
        assert_eq!(retune(bad).status.code(), Some(2), "{bad:?}");
    }
    let out = retune(&["generate", "--model", "/nonexistent/m.gguf", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("error: "),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_bad_setting_exits_1_and_names_the_key() {
    let dir = std::env::temp_dir().join(format!("retune-cli-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "[server]\nport = \"x\"\n[model]\npath = \"m.gguf\"\n",
            "`server.port`",
        ),
        (
            "[model]\npath = \"m.gguf\"\n[engine]\nmax_batch = 0\n",
            "engine.max_batch",
        ),
        (
            "[model]\npath = \"m.gguf\"\n[server]\nprot = 1\n",
            "unknown field `prot`",
        ),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let f = dir.join(format!("s{i}.toml"));
        std::fs::write(&f, toml).unwrap();
        let out = retune(&["serve", "--config", f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{toml}");
        let err = text(&out.stderr);
        assert!(err.contains(key), "`{key}` not named in: {err}");
    }
}
