//! `retune data ...`: the datasets store from the command line (JSON output).

use anyhow::{bail, Context, Result};
use retune_datasets::{parse_jsonl_for, Policy};
use retune_registry::{LocalStore, Registry};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// `retune data`: captured completions, imports, snapshots, erasure.
#[derive(clap::Args)]
pub struct DataArgs {
    /// Data root (the server's `adapters.root`): datasets.db beside registry.db.
    #[arg(long)]
    root: PathBuf,
    /// A PostgreSQL datasets store (the server's `datasets.url`) instead of
    /// `<root>/datasets.db`.
    #[arg(long, env = "RETUNE_DATASETS__URL")]
    datasets_url: Option<String>,
    /// A PostgreSQL registry (`adapters.registry_url`) instead of
    /// `<root>/registry.db` (erasure and lineage read it).
    #[arg(long, env = "RETUNE_ADAPTERS__REGISTRY_URL")]
    registry_url: Option<String>,
    /// Who acts (recorded in the registry journal on erasure); defaults to $USER.
    #[arg(long, global = true)]
    actor: Option<String>,
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(clap::Subcommand)]
enum DataCommand {
    /// Import examples from JSONL (OpenAI `{"messages": [...]}` or prompt/completion lines).
    Import {
        /// TENANT/ADAPTER the examples are for.
        #[arg(value_parser = crate::adapters_cli::tenant_name)]
        adapter: String,
        /// The JSONL file.
        file: PathBuf,
        /// A declared label task's labels (a JSON list of strings, as in
        /// `data.labels`): lines whose label or answer is not one of them are
        /// refused by number, the rest imported.
        #[arg(long)]
        labels: Option<PathBuf>,
    },
    /// Curate the examples of TENANT/ADAPTER into a snapshot; prints its manifest.
    Snapshot {
        /// TENANT/ADAPTER
        #[arg(value_parser = crate::adapters_cli::tenant_name)]
        adapter: String,
        /// Do not count +1-rated outputs as examples.
        #[arg(long)]
        no_positive: bool,
        /// Keep personal data (no scrub of emails, phones, cards, IBANs).
        #[arg(long)]
        no_scrub: bool,
        /// Percent of the input-hash space held out for eval.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=100))]
        eval_percent: u8,
        /// Suspect labels (label tasks): report (listed in the manifest), holdout
        /// (also left out of training), review (left out until a person labels
        /// each: `POST /admin/data/{tenant}/{adapter}/review`) or off.
        #[arg(long, default_value = "report", value_parser = ["report", "holdout", "review", "off"])]
        suspects: String,
    },
    /// Write a snapshot as JSONL (the import format) to stdout or a file.
    Export {
        /// The tenant the snapshot belongs to.
        tenant: String,
        /// Snapshot id.
        snapshot: String,
        /// Only this split: train or eval.
        #[arg(long)]
        split: Option<String>,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The manifest of a snapshot.
    Show { tenant: String, snapshot: String },
    /// Snapshots of a tenant (of one adapter when given).
    List {
        tenant: String,
        #[arg(long)]
        adapter: Option<String>,
    },
    /// Which snapshots hold data about a subject, and which adapter versions were trained on them.
    Lineage {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        subject: String,
    },
    /// Delete everything about a subject and taint every version trained on it.
    Erase {
        #[arg(long)]
        tenant: String,
        /// The person the data is about (`subject_id` of feedback and imports).
        #[arg(long)]
        subject: String,
        /// What follows for a tainted live version: report, rollback (to the newest
        /// untainted version) or retrain (journal a request for the trainer).
        #[arg(long, default_value = "report")]
        on_tainted_live: retune_server::erasure::OnTaintedLive,
    },
}

fn split(s: &str) -> Result<(&str, &str)> {
    s.split_once('/')
        .with_context(|| format!("expected TENANT/ADAPTER, got `{s}`"))
}

fn print(v: impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// The registry beside the datasets store, if there is one.
fn open_registry(root: &std::path::Path, url: Option<&str>) -> Result<Option<Registry>> {
    let blobs = || LocalStore::new(&root.join("store")).map(Arc::new);
    if let Some(url) = url {
        return Ok(Some(Registry::open_at(url, blobs()?, 4 << 30)?));
    }
    let path = root.join("registry.db");
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(Registry::open(&path, blobs()?, 4 << 30)?))
}

pub fn run(args: &DataArgs) -> Result<()> {
    let at = match &args.datasets_url {
        Some(url) => url.clone(),
        None => args.root.join("datasets.db").to_string_lossy().into_owned(),
    };
    let store = retune_datasets::open(&at)?;
    let store = store.as_ref();
    let actor = args
        .actor
        .clone()
        .unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "cli".into()));
    use DataCommand as C;
    match &args.command {
        C::Import {
            adapter,
            file,
            labels,
        } => {
            let (t, a) = split(adapter)?;
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let labels: Option<Vec<String>> = match labels {
                Some(p) => {
                    let v: Vec<String> = serde_json::from_str(
                        &std::fs::read_to_string(p)
                            .with_context(|| format!("reading {}", p.display()))?,
                    )
                    .with_context(|| format!("{}: not a JSON list of strings", p.display()))?;
                    retune_config::check_labels(&v)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                    Some(v)
                }
                None => None,
            };
            let (rows, errors) = parse_jsonl_for(&text, labels.as_deref());
            let source = format!("import:{}", file.display());
            let imported = store.import(t, a, &source, &rows)?;
            print(serde_json::json!({"imported": imported, "errors": errors}))?;
            if !errors.is_empty() {
                bail!("{} line(s) not imported (listed above)", errors.len());
            }
            Ok(())
        }
        C::Snapshot {
            adapter,
            no_positive,
            no_scrub,
            eval_percent,
            suspects,
        } => {
            let (t, a) = split(adapter)?;
            let policy = Policy {
                include_positive: !no_positive,
                scrub: !no_scrub,
                eval_percent: *eval_percent,
                suspects: match suspects.as_str() {
                    "holdout" => retune_datasets::snapshot::SuspectPolicy::Holdout,
                    "review" => retune_datasets::snapshot::SuspectPolicy::Review,
                    "off" => retune_datasets::snapshot::SuspectPolicy::Off,
                    _ => retune_datasets::snapshot::SuspectPolicy::Report,
                },
            };
            print(retune_datasets::snapshot_with_suspects(
                store, t, a, &policy,
            )?)
        }
        C::Export {
            tenant,
            snapshot,
            split,
            out,
        } => {
            let want = match split.as_deref() {
                None => None,
                Some("train") => Some(retune_datasets::curate::Split::Train),
                Some("eval") => Some(retune_datasets::curate::Split::Eval),
                Some(s) => bail!("--split {s}: train or eval"),
            };
            let mut text = String::new();
            for r in store.snapshot_rows(tenant, snapshot)? {
                if want.is_none_or(|w| w == r.split) {
                    text.push_str(&retune_datasets::import::to_line(&r.body));
                    text.push('\n');
                }
            }
            match out {
                Some(p) => {
                    std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?
                }
                None => std::io::stdout().lock().write_all(text.as_bytes())?,
            }
            Ok(())
        }
        C::Show { tenant, snapshot } => print(store.manifest(tenant, snapshot)?),
        C::Lineage { tenant, subject } => {
            let l = store.lineage(tenant, subject)?;
            let versions = match open_registry(&args.root, args.registry_url.as_deref())? {
                Some(reg) => reg.trained_on(tenant, &l.snapshots)?,
                None => Vec::new(),
            };
            print(serde_json::json!({"snapshots": l.snapshots, "versions": versions}))
        }
        C::List { tenant, adapter } => print(store.snapshots(tenant, adapter.as_deref())?),
        C::Erase {
            tenant,
            subject,
            on_tainted_live,
        } => {
            let registry = open_registry(&args.root, args.registry_url.as_deref())?;
            let report = retune_server::erasure::erase(
                store,
                registry.as_ref(),
                tenant,
                subject,
                &actor,
                *on_tainted_live,
            )?;
            print(report)
        }
    }
}
