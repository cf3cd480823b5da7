//! Erasure across the two stores: every row about a subject leaves the datasets
//! store (snapshots too), and every adapter version trained on a snapshot that
//! held such a row is marked tainted in the registry journal.

use retune_adapters::Registry;
use retune_datasets::{DatasetStore, Erased};

#[derive(Debug, serde::Serialize)]
pub struct TaintedVersion {
    pub adapter: String,
    pub version: String,
    /// The version is live now.
    pub live: bool,
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
    Registry(#[from] retune_adapters::RegistryError),
}

pub fn erase(
    data: &dyn DatasetStore,
    registry: Option<&Registry>,
    tenant: &str,
    subject: &str,
    actor: &str,
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
            tainted.push(TaintedVersion {
                live: st.live.as_deref() == Some(v.id.as_str()),
                adapter: v.name,
                version: v.id,
            });
        }
    }
    Ok(ErasureReport { erased, tainted })
}
