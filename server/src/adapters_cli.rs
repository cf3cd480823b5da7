//! `retune adapters ...`: the registry from the command line (JSON output).

use super::Args;
use anyhow::{bail, Context, Result};
use retune_adapters::{Expect, LocalStore, NewVersion, Registry, ServedBase};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const USAGE: &str = "usage: retune adapters --root DIR <command>
  list [--tenant T]
  show TENANT/NAME
  register TENANT/NAME ADAPTER_DIR --model PATH [--parent ID] [--source S] [--metadata JSON]
  promote TENANT/NAME VERSION [--expect VERSION|none]
  rollback TENANT/NAME [--to VERSION]
  canary TENANT/NAME (VERSION PERCENT | --clear)
  retire TENANT/NAME VERSION
  gc TENANT/NAME --keep N
common: [--actor NAME] [--reason TEXT]";

fn open(root: &Path) -> Result<Registry> {
    let store = Arc::new(LocalStore::new(&root.join("store"))?);
    Ok(Registry::open(&root.join("registry.db"), store, 4 << 30)?)
}

fn split(s: &str) -> Result<(&str, &str)> {
    s.split_once('/')
        .with_context(|| format!("expected TENANT/NAME, got `{s}`\n{USAGE}"))
}

fn print(v: impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

pub fn run(args: &mut Args) -> Result<()> {
    let root = PathBuf::from(args.opt("--root")?.context(USAGE)?);
    let actor = args
        .opt("--actor")?
        .unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "cli".into()));
    let reason = args.opt("--reason")?.unwrap_or_default();
    let tenant = args.opt("--tenant")?;
    let model = args.opt("--model")?;
    let parent = args.opt("--parent")?;
    let source = args.opt("--source")?;
    let metadata = args.opt("--metadata")?;
    let expect = args.opt("--expect")?;
    let to = args.opt("--to")?;
    let keep = args.parsed::<usize>("--keep")?;
    let clear = args.flag("--clear");
    let pos: Vec<String> = std::mem::take(&mut args.rest);
    let Some((cmd, rest)) = pos.split_first() else {
        bail!("{USAGE}")
    };
    let reg = open(&root)?;
    match (cmd.as_str(), rest) {
        ("list", []) => print(reg.list(tenant.as_deref())?),
        ("show", [tn]) => {
            let (t, n) = split(tn)?;
            print(
                serde_json::json!({"state": reg.state(t, n)?, "versions": reg.versions(t, n)?, "journal": reg.journal(t, n)?}),
            )
        }
        ("register", [tn, dir]) => {
            let (t, n) = split(tn)?;
            let model = model.context("register needs --model PATH (the served base)")?;
            let m = retune_engine::load(Path::new(&model))?.model;
            let base = ServedBase {
                shapes: m.base_shapes(),
                fingerprint: m.fingerprint(),
            };
            let metadata = match metadata {
                Some(j) => serde_json::from_str(&j).context("--metadata must be JSON")?,
                None => serde_json::json!({}),
            };
            let source = source.unwrap_or_else(|| format!("path:{dir}"));
            let v = NewVersion {
                tenant: t,
                name: n,
                dir: Path::new(dir),
                source: &source,
                parent: parent.as_deref(),
                metadata,
                claimed_base: None,
                actor: &actor,
            };
            print(reg.register(v, &base)?)
        }
        ("promote", [tn, v]) => {
            let (t, n) = split(tn)?;
            let expect = match expect.as_deref() {
                None => Expect::Any,
                Some("none") => Expect::NoLive,
                Some(e) => Expect::Version(e.to_string()),
            };
            print(reg.promote(t, n, v, expect, &actor, &reason)?)
        }
        ("rollback", [tn]) => {
            let (t, n) = split(tn)?;
            print(reg.rollback(t, n, to.as_deref(), &actor, &reason)?)
        }
        ("canary", [tn]) if clear => {
            let (t, n) = split(tn)?;
            print(reg.set_canary(t, n, None, &actor, &reason)?)
        }
        ("canary", [tn, v, pct]) => {
            let (t, n) = split(tn)?;
            let pct: u8 = pct.parse().context("PERCENT must be 0..=100")?;
            print(reg.set_canary(t, n, Some((v, pct)), &actor, &reason)?)
        }
        ("retire", [tn, v]) => {
            let (t, n) = split(tn)?;
            print(reg.retire(t, n, v, &actor, &reason)?)
        }
        ("gc", [tn]) => {
            let (t, n) = split(tn)?;
            print(reg.gc(t, n, keep.context("gc needs --keep N")?, &actor)?)
        }
        _ => bail!("unknown or malformed adapters command\n{USAGE}"),
    }
}
