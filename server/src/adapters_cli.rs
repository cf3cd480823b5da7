//! `retune adapters ...`: the registry from the command line (JSON output).

use anyhow::{bail, Context, Result};
use retune_registry::{Expect, NewVersion, Registry, ServedBase};
use std::path::PathBuf;

/// `retune adapters`: the adapter registry from the command line (JSON output).
#[derive(clap::Args)]
pub struct AdaptersArgs {
    /// Adapter root: registry.db and store/ (the server's `adapters.root`).
    #[arg(long)]
    root: PathBuf,
    /// A PostgreSQL registry (the server's `adapters.registry_url`) instead of
    /// `<root>/registry.db`.
    #[arg(long, env = "RETUNE_ADAPTERS__REGISTRY_URL")]
    registry_url: Option<String>,
    /// An S3-compatible version store (`adapters.store_url`); `<root>/store`
    /// is then the local cache.
    #[arg(long, env = "RETUNE_ADAPTERS__STORE_URL")]
    store_url: Option<String>,
    /// Its endpoint (`adapters.store_endpoint`).
    #[arg(long, env = "RETUNE_ADAPTERS__STORE_ENDPOINT")]
    store_endpoint: Option<String>,
    /// Who makes the change (recorded in the journal); defaults to $USER.
    #[arg(long, global = true)]
    actor: Option<String>,
    /// Why (recorded in the journal).
    #[arg(long, global = true, default_value = "")]
    reason: String,
    #[command(subcommand)]
    command: AdaptersCommand,
}

#[derive(clap::Subcommand)]
enum AdaptersCommand {
    /// List adapters and their aliases.
    List {
        /// Only this tenant's adapters.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Aliases, versions and journal of one adapter.
    Show {
        /// TENANT/NAME
        #[arg(value_parser = tenant_name)]
        adapter: String,
    },
    /// Register a PEFT adapter directory as a new version (validated against the base).
    Register {
        /// TENANT/NAME
        #[arg(value_parser = tenant_name)]
        adapter: String,
        /// Directory with adapter_config.json and adapter_model.safetensors.
        dir: PathBuf,
        /// The served base model (GGUF or HF directory) the adapter must fit.
        #[arg(long)]
        model: PathBuf,
        /// The version this one was derived from.
        #[arg(long)]
        parent: Option<String>,
        /// Where the version came from (default `path:DIR`).
        #[arg(long)]
        source: Option<String>,
        /// Metadata to store with the version (a JSON object, e.g. `{"snapshot": "ID"}`).
        #[arg(long, value_parser = json_object)]
        metadata: Option<serde_json::Value>,
    },
    /// Make a version live (compare-and-set on the current live version).
    Promote {
        /// TENANT/NAME
        #[arg(value_parser = tenant_name)]
        adapter: String,
        version: String,
        /// The live version expected now (`none` = nothing live); refused if it differs.
        #[arg(long)]
        expect: Option<String>,
    },
    /// Make the previous (or a named) version live again.
    Rollback {
        /// TENANT/NAME
        #[arg(value_parser = tenant_name)]
        adapter: String,
        /// The version to go back to (default: the previous live one).
        #[arg(long)]
        to: Option<String>,
    },
    /// Send a share of traffic to a version, or stop (--clear).
    Canary {
        /// TENANT/NAME
        #[arg(value_parser = tenant_name)]
        adapter: String,
        #[arg(required_unless_present = "clear")]
        version: Option<String>,
        /// Percent of requests, 0..=100.
        #[arg(required_unless_present = "clear", value_parser = clap::value_parser!(u8).range(0..=100))]
        percent: Option<u8>,
        /// Remove the canary.
        #[arg(long, conflicts_with_all = ["version", "percent"])]
        clear: bool,
    },
    /// Mark a version unservable (not the live one).
    Retire {
        /// TENANT/NAME
        #[arg(value_parser = tenant_name)]
        adapter: String,
        version: String,
    },
    /// Delete unaliased versions, keeping the newest N.
    Gc {
        /// TENANT/NAME
        #[arg(value_parser = tenant_name)]
        adapter: String,
        /// Unaliased versions to keep.
        #[arg(long)]
        keep: usize,
        /// Also keep versions served, registered or aliased within this many
        /// minutes (servers record what they serve).
        #[arg(long, default_value_t = 15)]
        idle_minutes: u64,
    },
}

fn open(args: &AdaptersArgs) -> Result<Registry> {
    let (root, url) = (&args.root, args.registry_url.as_deref());
    let store = retune_registry::open_store(
        &root.join("store"),
        args.store_url.as_deref(),
        args.store_endpoint.as_deref(),
    )?;
    Ok(match url {
        Some(url) => Registry::open_at(url, store, 4 << 30)?,
        None => Registry::open(&root.join("registry.db"), store, 4 << 30)?,
    })
}

/// `TENANT/NAME`, checked when the command line is parsed (a usage error).
pub(crate) fn tenant_name(s: &str) -> std::result::Result<String, String> {
    match s.split_once('/') {
        Some((t, n)) if !t.is_empty() && !n.is_empty() && !n.contains('/') => Ok(s.to_string()),
        _ => Err(format!("expected TENANT/NAME, got `{s}`")),
    }
}

fn json_object(s: &str) -> std::result::Result<serde_json::Value, String> {
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err("must be a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

fn split(s: &str) -> Result<(&str, &str)> {
    s.split_once('/')
        .with_context(|| format!("expected TENANT/NAME, got `{s}`"))
}

fn print(v: impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

pub fn run(args: &AdaptersArgs) -> Result<()> {
    let actor = args
        .actor
        .clone()
        .unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "cli".into()));
    let reason = &args.reason;
    let reg = open(args)?;
    use AdaptersCommand as C;
    match &args.command {
        C::List { tenant } => print(reg.list(tenant.as_deref())?),
        C::Show { adapter } => {
            let (t, n) = split(adapter)?;
            print(
                serde_json::json!({"state": reg.state(t, n)?, "versions": reg.versions(t, n)?, "journal": reg.journal(t, n)?}),
            )
        }
        C::Register {
            adapter,
            dir,
            model,
            parent,
            source,
            metadata,
        } => {
            let (t, n) = split(adapter)?;
            let m = retune_engine::load(model)?.model;
            let base = ServedBase {
                shapes: m.base_shapes(),
                fingerprint: m.fingerprint(),
            };
            let metadata = metadata.clone().unwrap_or_else(|| serde_json::json!({}));
            let source = source
                .clone()
                .unwrap_or_else(|| format!("path:{}", dir.display()));
            let v = NewVersion {
                tenant: t,
                name: n,
                dir,
                source: &source,
                parent: parent.as_deref(),
                metadata,
                claimed_base: None,
                actor: &actor,
            };
            print(reg.register(v, &base)?)
        }
        C::Promote {
            adapter,
            version,
            expect,
        } => {
            let (t, n) = split(adapter)?;
            let expect = match expect.as_deref() {
                None => Expect::Any,
                Some("none") => Expect::NoLive,
                Some(e) => Expect::Version(e.to_string()),
            };
            print(reg.promote(t, n, version, expect, &actor, reason)?)
        }
        C::Rollback { adapter, to } => {
            let (t, n) = split(adapter)?;
            print(reg.rollback(t, n, to.as_deref(), &actor, reason)?)
        }
        C::Canary {
            adapter,
            version,
            percent,
            clear,
        } => {
            let (t, n) = split(adapter)?;
            let canary = match (version, percent, clear) {
                (_, _, true) => None,
                (Some(v), Some(p), false) if *p <= 100 => Some((v.as_str(), *p)),
                _ => bail!("canary needs VERSION PERCENT (0..=100) or --clear"),
            };
            print(reg.set_canary(t, n, canary, &actor, reason)?)
        }
        C::Retire { adapter, version } => {
            let (t, n) = split(adapter)?;
            print(reg.retire(t, n, version, &actor, reason)?)
        }
        C::Gc {
            adapter,
            keep,
            idle_minutes,
        } => {
            let (t, n) = split(adapter)?;
            let idle = std::time::Duration::from_secs(idle_minutes * 60);
            print(reg.gc(t, n, *keep, idle, &actor)?)
        }
    }
}
