//! Erasure across the two stores: every row about a subject leaves the datasets
//! store (snapshots too), and every adapter version trained on a snapshot that
//! held such a row is marked tainted in the registry journal.

use retune_datasets::{DatasetStore, Erased};
use retune_registry::Registry;

#[derive(Debug, serde::Serialize)]
pub struct TaintedVersion {
    pub adapter: String,
    pub version: String,
    /// The version was live when it was tainted.
    pub live: bool,
    /// What the tenant's policy did about a tainted live version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

/// What follows when erasure taints a live version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTaintedLive {
    /// Flag it (journal, admin API, metric); a person decides.
    Report,
    /// Promote the newest untainted, unretired version (compare-and-set on the tainted one).
    Rollback,
    /// Journal a `retrain` request for the trainer.
    Retrain,
}

impl std::str::FromStr for OnTaintedLive {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "report" => Ok(Self::Report),
            "rollback" => Ok(Self::Rollback),
            "retrain" => Ok(Self::Retrain),
            _ => Err(format!("`{s}`: report, rollback or retrain")),
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct ErasureReport {
    pub erased: Erased,
    pub tainted: Vec<TaintedVersion>,
}

#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    #[error(transparent)]
    Data(#[from] retune_datasets::DataError),
    #[error(transparent)]
    Registry(#[from] retune_registry::RegistryError),
}

pub fn erase(
    data: &dyn DatasetStore,
    registry: Option<&Registry>,
    tenant: &str,
    subject: &str,
    actor: &str,
    policy: OnTaintedLive,
) -> Result<ErasureReport, ErasureError> {
    let erased = data.erase(tenant, subject)?;
    let mut tainted = Vec::new();
    if let Some(reg) = registry {
        for v in reg.trained_on(tenant, &erased.snapshots)? {
            let reason = format!(
                "trained on snapshot {} which held data of an erased subject",
                v.metadata["snapshot"].as_str().unwrap_or("?")
            );
            let st = reg.taint(tenant, &v.name, &v.id, actor, &reason)?;
            let live = st.live.as_deref() == Some(v.id.as_str());
            tainted.push(TaintedVersion {
                live,
                adapter: v.name,
                version: v.id,
                action: None,
            });
        }
        for t in tainted.iter_mut().filter(|t| t.live) {
            t.action = Some(act(reg, tenant, t, actor, policy)?);
        }
    }
    Ok(ErasureReport { erased, tainted })
}

fn act(
    reg: &Registry,
    tenant: &str,
    t: &TaintedVersion,
    actor: &str,
    policy: OnTaintedLive,
) -> Result<String, ErasureError> {
    match policy {
        OnTaintedLive::Report => Ok("reported".into()),
        OnTaintedLive::Retrain => {
            reg.request_retrain(
                tenant,
                &t.adapter,
                &t.version,
                actor,
                "live version tainted by erasure",
            )?;
            Ok("retrain requested".into())
        }
        OnTaintedLive::Rollback => {
            let tainted = reg.tainted(tenant, &t.adapter)?;
            let target = reg
                .versions(tenant, &t.adapter)?
                .into_iter()
                .rev()
                .find(|v| !v.retired && !tainted.contains(&v.id));
            match target {
                Some(v) => {
                    reg.promote(
                        tenant,
                        &t.adapter,
                        &v.id,
                        retune_registry::Expect::Version(t.version.clone()),
                        actor,
                        "live version tainted by erasure",
                    )?;
                    Ok(format!("rolled back to {}", v.id))
                }
                None => Ok("no untainted version to roll back to: reported".into()),
            }
        }
    }
}
