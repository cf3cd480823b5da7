//! The registry's rows: versions and alias states read from the database, and
//! the writes every change shares (aliases, journal entries).

use crate::error::RegistryError;
use crate::sql::{p, Conn, Row};
use crate::states::{Alias, JournalEvent};
use retune_adapters::names::Via;
use retune_config::now_ms;
use serde::Serialize;

type R<T> = Result<T, RegistryError>;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct VersionInfo {
    pub id: String,
    pub tenant: String,
    pub name: String,
    /// Unix milliseconds.
    pub created_at: i64,
    pub source: String,
    pub parent: Option<String>,
    pub base_fingerprint: String,
    pub size: u64,
    pub metadata: serde_json::Value,
    pub retired: bool,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct AdapterState {
    pub live: Option<String>,
    pub previous: Option<String>,
    /// Canary version and the percentage of traffic it gets.
    pub canary: Option<(String, u8)>,
}

/// The version `name` routes to: the canary when `bucket` (0..100) falls in its
/// share, else the live one.
pub(crate) fn pick_alias(st: &AdapterState, bucket: u8) -> Option<(String, Via)> {
    match (&st.canary, &st.live) {
        (Some((c, pct)), _) if bucket < *pct => Some((c.clone(), Via::Canary)),
        (_, Some(live)) => Some((live.clone(), Via::Live)),
        _ => None,
    }
}

pub(crate) const VERSION_COLS: &str =
    "id, tenant, name, created_at, source, parent, base_fingerprint, size, metadata, retired";

pub(crate) fn row_to_version(r: &Row) -> R<VersionInfo> {
    Ok(VersionInfo {
        id: r.s(0)?,
        tenant: r.s(1)?,
        name: r.s(2)?,
        created_at: r.i(3)?,
        source: r.s(4)?,
        parent: r.os(5)?,
        base_fingerprint: r.s(6)?,
        size: r.i(7)? as u64,
        metadata: serde_json::from_str(&r.s(8)?).unwrap_or(serde_json::Value::Null),
        retired: r.b(9)?,
    })
}

pub(crate) fn last_seq(c: &mut dyn Conn) -> R<i64> {
    Ok(c.one("SELECT COALESCE(MAX(seq), 0) FROM journal", &[])?
        .i(0)?)
}

pub(crate) fn state_of(c: &mut dyn Conn, tenant: &str, name: &str) -> R<AdapterState> {
    let known = c
        .one(
            "SELECT COUNT(*) FROM versions WHERE tenant = ?1 AND name = ?2",
            p![tenant, name],
        )?
        .i(0)?;
    if known == 0 {
        return Err(RegistryError::NotFound(format!("adapter {tenant}/{name}")));
    }
    let mut st = AdapterState::default();
    for r in c.query(
        "SELECT alias, version, percent FROM aliases WHERE tenant = ?1 AND name = ?2",
        p![tenant, name],
    )? {
        set_state(&mut st, &r.s(0)?, r.s(1)?, r.oi(2)?);
    }
    Ok(st)
}

/// One alias row into an adapter's state (a name this build does not know is
/// left out).
pub(crate) fn set_state(st: &mut AdapterState, alias: &str, version: String, pct: Option<i64>) {
    match alias.parse::<Alias>() {
        Ok(Alias::Live) => st.live = Some(version),
        Ok(Alias::Previous) => st.previous = Some(version),
        Ok(Alias::Canary) => st.canary = Some((version, pct.unwrap_or(0).clamp(0, 100) as u8)),
        Err(_) => {}
    }
}

pub(crate) fn servable(c: &mut dyn Conn, tenant: &str, name: &str, version: &str) -> R<()> {
    let retired = c
        .opt(
            "SELECT retired FROM versions WHERE tenant = ?1 AND name = ?2 AND id = ?3",
            p![tenant, name, version],
        )?
        .map(|r| r.i(0))
        .transpose()?;
    match retired {
        None => Err(RegistryError::NotFound(format!(
            "version {tenant}/{name}@{version}"
        ))),
        Some(1) => Err(RegistryError::Rejected(format!(
            "version {version} is retired"
        ))),
        Some(_) => Ok(()),
    }
}

pub(crate) fn set_alias(
    c: &mut dyn Conn,
    tenant: &str,
    name: &str,
    alias: Alias,
    version: &str,
    pct: Option<u8>,
) -> R<()> {
    c.exec(
        "INSERT INTO aliases (tenant, name, alias, version, percent) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (tenant, name, alias) DO UPDATE SET version = excluded.version, percent = excluded.percent",
        p![tenant, name, alias.as_str(), version, pct.map(i64::from)],
    )?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn journal(
    c: &mut dyn Conn,
    tenant: &str,
    name: &str,
    event: JournalEvent,
    version: Option<&str>,
    previous: Option<&str>,
    actor: &str,
    reason: &str,
) -> R<()> {
    c.exec(
        "INSERT INTO journal (at, tenant, name, event, version, previous, actor, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        p![now_ms(), tenant, name, event.as_str(), version, previous, actor, reason],
    )?;
    Ok(())
}
