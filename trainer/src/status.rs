//! `retune-trainer status` and the admin API's view of the loop, from the
//! stores alone (no model is loaded).

use crate::error::Result;
use retune_config::Settings;
use retune_datasets::DatasetStore;
use retune_registry::Registry;
use std::path::Path;

/// Unix ms of the newest data the adapter's versions and finished runs were
/// made from: new examples count from here.
pub fn data_mark(reg: &Registry, data: &dyn DatasetStore, tenant: &str, name: &str) -> Result<i64> {
    let mut mark = 0;
    if let Ok(vs) = reg.versions(tenant, name) {
        for v in vs {
            if let Some(s) = v.metadata.get("snapshot").and_then(|s| s.as_str()) {
                mark = mark.max(snapshot_time(data, tenant, s).unwrap_or(0));
            }
        }
    }
    for r in reg.runs(tenant, name, 50)? {
        if r.status.used_its_snapshot() {
            if let Some(s) = &r.snapshot {
                mark = mark.max(snapshot_time(data, tenant, s).unwrap_or(0));
            }
        }
    }
    Ok(mark)
}

/// One adapter in `retune-trainer status` and the admin API.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterStatus {
    pub tenant: String,
    pub name: String,
    pub live: Option<String>,
    pub canary: Option<(String, u8)>,
    pub lease: Option<String>,
    pub new_examples: usize,
    pub runs: Vec<retune_registry::RunInfo>,
    pub watch: Option<retune_registry::WatchInfo>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    pub counts: retune_registry::LoopCounts,
    pub adapters: Vec<AdapterStatus>,
}

/// What the loop is doing, from the stores alone (no model is loaded).
pub fn status(settings: &Settings, root: &Path) -> Result<Status> {
    let db = settings
        .datasets
        .location(&settings.adapters)
        .unwrap_or_else(|| root.join("datasets.db").to_string_lossy().into_owned());
    let data = retune_datasets::open(&db)?;
    let data = data.as_ref();
    let store = retune_registry::open_store(
        &root.join("store"),
        settings.adapters.store_url.as_deref(),
        settings.adapters.store_endpoint.as_deref(),
    )?;
    let reg = Registry::open_at(
        &settings.adapters.registry_location(root),
        store,
        settings.adapters.max_version_bytes,
    )?;
    let mut names: Vec<(String, String)> = settings
        .trainer
        .adapters
        .iter()
        .map(|a| (a.tenant.clone(), a.name.clone()))
        .collect();
    names.extend(data.adapters()?);
    names.extend(reg.trained_adapters()?);
    names.sort();
    names.dedup();
    let mut adapters = Vec::new();
    for (tenant, name) in names {
        let st = reg.state(&tenant, &name).unwrap_or_default();
        let include_positive = settings
            .trainer
            .adapters
            .iter()
            .find(|a| a.tenant == tenant && a.name == name)
            .map(|a| a.resolve(&settings.trainer.defaults))
            .unwrap_or_else(|| settings.trainer.defaults.clone())
            .data
            .include_positive;
        let mark = data_mark(&reg, data, &tenant, &name)?;
        adapters.push(AdapterStatus {
            new_examples: data.candidates_since(&tenant, &name, mark, include_positive)?,
            lease: reg.lease_holder(&tenant, &name)?,
            runs: reg.runs(&tenant, &name, 5)?,
            watch: reg.watches(&tenant, &name)?.into_iter().next(),
            live: st.live,
            canary: st.canary,
            tenant,
            name,
        });
    }
    Ok(Status {
        counts: reg.loop_counts()?,
        adapters,
    })
}

pub(crate) fn snapshot_time(data: &dyn DatasetStore, tenant: &str, id: &str) -> Option<i64> {
    data.manifest(tenant, id).ok().map(|m| m.created_at)
}
