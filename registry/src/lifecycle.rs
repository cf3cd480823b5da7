//! What changes a version's standing after it is registered: promotion
//! (compare-and-set), rollback, canary, retirement, taint and retraining
//! requests after an erasure, and garbage collection of what nobody serves.
//! Every change and its journal entry commit in one write transaction.

use crate::error::RegistryError;
use crate::registry::*;
use crate::sql::{p, Mode};
use crate::states::{Alias, JournalEvent};
use retune_adapters::names::store_key;

type R<T> = Result<T, RegistryError>;

impl Registry {
    /// Make `version` live if the current live version is what the caller expects.
    pub fn promote(
        &self,
        tenant: &str,
        name: &str,
        version: &str,
        expected: Expect,
        actor: &str,
        reason: &str,
    ) -> R<AdapterState> {
        self.mutate(tenant, name, |tx| {
            servable(tx, tenant, name, version)?;
            let cur = state_of(tx, tenant, name)?;
            let ok = match &expected {
                Expect::Any => true,
                Expect::NoLive => cur.live.is_none(),
                Expect::Version(v) => cur.live.as_deref() == Some(v.as_str()),
            };
            if !ok {
                return Err(RegistryError::Conflict {
                    expected: match expected {
                        Expect::Version(v) => v,
                        _ => "none".into(),
                    },
                    actual: cur.live.unwrap_or_else(|| "none".into()),
                });
            }
            if cur.live.as_deref() != Some(version) {
                if let Some(l) = &cur.live {
                    set_alias(tx, tenant, name, Alias::Previous, l, None)?;
                }
                set_alias(tx, tenant, name, Alias::Live, version, None)?;
            }
            journal(
                tx,
                tenant,
                name,
                JournalEvent::Promote,
                Some(version),
                cur.live.as_deref(),
                actor,
                reason,
            )?;
            Ok(())
        })
    }

    /// Undo: swap live and previous, or make a named version live.
    pub fn rollback(
        &self,
        tenant: &str,
        name: &str,
        to: Option<&str>,
        actor: &str,
        reason: &str,
    ) -> R<AdapterState> {
        self.mutate(tenant, name, |tx| {
            let cur = state_of(tx, tenant, name)?;
            let live = cur.live.clone().ok_or_else(|| {
                RegistryError::NotFound(format!("live version of {tenant}/{name}"))
            })?;
            let target = match to {
                Some(v) => v.to_string(),
                None => cur.previous.clone().ok_or_else(|| {
                    RegistryError::NotFound(format!("previous version of {tenant}/{name}"))
                })?,
            };
            servable(tx, tenant, name, &target)?;
            set_alias(tx, tenant, name, Alias::Previous, &live, None)?;
            set_alias(tx, tenant, name, Alias::Live, &target, None)?;
            journal(
                tx,
                tenant,
                name,
                JournalEvent::Rollback,
                Some(&target),
                Some(&live),
                actor,
                reason,
            )?;
            Ok(())
        })
    }

    /// Route `percent`% of the adapter's traffic to `version`, or clear the canary.
    pub fn set_canary(
        &self,
        tenant: &str,
        name: &str,
        canary: Option<(&str, u8)>,
        actor: &str,
        reason: &str,
    ) -> R<AdapterState> {
        self.mutate(tenant, name, |tx| {
            state_of(tx, tenant, name)?;
            match canary {
                Some((v, pct)) => {
                    if pct > 100 {
                        return Err(RegistryError::Rejected(format!(
                            "canary percentage {pct} above 100"
                        )));
                    }
                    servable(tx, tenant, name, v)?;
                    set_alias(tx, tenant, name, Alias::Canary, v, Some(pct))?;
                    journal(
                        tx,
                        tenant,
                        name,
                        JournalEvent::Canary,
                        Some(v),
                        None,
                        actor,
                        &format!("{pct}%: {reason}"),
                    )?;
                }
                None => {
                    tx.exec(
                        "DELETE FROM aliases WHERE tenant = ?1 AND name = ?2 AND alias = 'canary'",
                        p![tenant, name],
                    )?;
                    journal(
                        tx,
                        tenant,
                        name,
                        JournalEvent::CanaryClear,
                        None,
                        None,
                        actor,
                        reason,
                    )?;
                }
            }
            Ok(())
        })
    }

    /// Versions of `tenant` registered with `metadata.snapshot` among `snapshots`:
    /// the lineage from training data to adapter versions.
    pub fn trained_on(&self, tenant: &str, snapshots: &[String]) -> R<Vec<VersionInfo>> {
        let sql = format!(
            "SELECT {VERSION_COLS} FROM versions WHERE tenant = ?1 AND {} = ?2
             ORDER BY name, created_at, id",
            self.db.json_text("metadata", "snapshot")
        );
        let mut tx = self.tx(Mode::Snapshot)?;
        let mut out = Vec::new();
        for snap in snapshots {
            for r in tx.query(&sql, p![tenant, snap])? {
                out.push(row_to_version(&r)?);
            }
        }
        Ok(out)
    }

    /// Mark a version tainted (its training data was erased): a journal entry;
    /// the version stays servable until a policy or a person acts.
    pub fn taint(
        &self,
        tenant: &str,
        name: &str,
        version: &str,
        actor: &str,
        reason: &str,
    ) -> R<AdapterState> {
        self.mutate(tenant, name, |tx| {
            let known = tx
                .one(
                    "SELECT COUNT(*) FROM versions WHERE tenant = ?1 AND name = ?2 AND id = ?3",
                    p![tenant, name, version],
                )?
                .i(0)?;
            if known == 0 {
                return Err(RegistryError::NotFound(format!(
                    "version {tenant}/{name}@{version}"
                )));
            }
            journal(
                tx,
                tenant,
                name,
                JournalEvent::Taint,
                Some(version),
                None,
                actor,
                reason,
            )
        })
    }

    /// Ask the trainer for a new version without the erased data (a journal entry
    /// the trainer daemon consumes).
    pub fn request_retrain(
        &self,
        tenant: &str,
        name: &str,
        version: &str,
        actor: &str,
        reason: &str,
    ) -> R<AdapterState> {
        self.mutate(tenant, name, |tx| {
            journal(
                tx,
                tenant,
                name,
                JournalEvent::Retrain,
                Some(version),
                None,
                actor,
                reason,
            )
        })
    }

    /// Servable (not retired) versions of every tenant and their stored bytes: for metrics.
    pub fn stored_totals(&self) -> R<(i64, i64)> {
        let r = self.tx(Mode::Auto)?.one(
            "SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM versions WHERE retired = 0",
            &[],
        )?;
        Ok((r.i(0)?, r.i(1)?))
    }

    /// Adapters (of every tenant) whose live version is tainted: one query, for metrics.
    pub fn tainted_live_count(&self) -> R<i64> {
        self.tx(Mode::Auto)?
            .one(
                "SELECT COUNT(*) FROM aliases a WHERE a.alias = 'live' AND EXISTS (
                 SELECT 1 FROM journal j WHERE j.tenant = a.tenant AND j.name = a.name
                 AND j.event = 'taint' AND j.version = a.version)",
                &[],
            )?
            .i(0)
            .map_err(Into::into)
    }

    /// The tainted versions of an adapter.
    pub fn tainted(&self, tenant: &str, name: &str) -> R<Vec<String>> {
        self.tx(Mode::Auto)?
            .query(
                "SELECT DISTINCT version FROM journal WHERE tenant = ?1 AND name = ?2 AND event = 'taint'
             AND version IS NOT NULL ORDER BY version",
                p![tenant, name],
            )?
            .iter()
            .map(|r| r.s(0).map_err(Into::into))
            .collect()
    }

    /// Never servable again. The live version cannot be retired (roll back first).
    pub fn retire(
        &self,
        tenant: &str,
        name: &str,
        version: &str,
        actor: &str,
        reason: &str,
    ) -> R<AdapterState> {
        self.mutate(tenant, name, |tx| {
            servable(tx, tenant, name, version)?;
            let cur = state_of(tx, tenant, name)?;
            if cur.live.as_deref() == Some(version) {
                return Err(RegistryError::Rejected(format!(
                    "{version} is live; promote or roll back first"
                )));
            }
            tx.exec(
                "UPDATE versions SET retired = 1 WHERE tenant = ?1 AND name = ?2 AND id = ?3",
                p![tenant, name, version],
            )?;
            tx.exec(
                "DELETE FROM aliases WHERE tenant = ?1 AND name = ?2 AND version = ?3",
                p![tenant, name, version],
            )?;
            journal(
                tx,
                tenant,
                name,
                JournalEvent::Retire,
                Some(version),
                None,
                actor,
                reason,
            )?;
            Ok(())
        })
    }

    /// Servers record the versions they served (every few seconds): gc keeps
    /// what was served recently, so a queued request never loses its version.
    pub fn mark_served(&self, versions: &[(String, String, String)]) -> R<()> {
        if versions.is_empty() {
            return Ok(());
        }
        let mut tx = self.tx(Mode::Write)?;
        let now = now_ms();
        for (t, n, v) in versions {
            tx.exec(
                "INSERT INTO served (tenant, name, version, at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (tenant, name, version) DO UPDATE SET at = excluded.at",
                p![t, n, v, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Delete versions no alias references, keeping the `keep` most recent ones
    /// and every version served, registered or named by an alias change within
    /// the last `idle` (requests queued or pinned to it may still need it).
    /// Rows and files go; the journal keeps a `delete` event for each.
    pub fn gc(
        &self,
        tenant: &str,
        name: &str,
        keep: usize,
        idle: std::time::Duration,
        actor: &str,
    ) -> R<Vec<String>> {
        let since = now_ms() - idle.as_millis() as i64;
        let doomed: Vec<String> = {
            let mut tx = self.tx(Mode::Write)?;
            state_of(&mut *tx, tenant, name)?;
            let ids: Vec<String> = {
                let rows = tx
                    .query(
                        "SELECT id FROM versions v WHERE tenant = ?1 AND name = ?2
                     AND NOT EXISTS (SELECT 1 FROM aliases a WHERE a.tenant = v.tenant AND a.name = v.name AND a.version = v.id)
                     ORDER BY created_at DESC, id DESC",
                        p![tenant, name],
                    )?
                    .iter()
                    .map(|r| r.s(0).map_err(Into::into))
                    .collect::<R<Vec<String>>>()?;
                let mut out = Vec::new();
                for id in rows.into_iter().skip(keep) {
                    // an idle window of zero keeps nothing for recency
                    let busy = !idle.is_zero()
                        && tx.one(
                            "SELECT EXISTS (SELECT 1 FROM served WHERE tenant = ?1 AND name = ?2 AND version = ?3 AND at >= ?4)
                         OR EXISTS (SELECT 1 FROM journal WHERE tenant = ?1 AND name = ?2 AND (version = ?3 OR previous = ?3) AND at >= ?4)",
                            p![tenant, name, &id, since],
                        )?
                        .b(0)?;
                    if !busy {
                        out.push(id);
                    }
                }
                out
            };
            for id in &ids {
                tx.exec(
                    "DELETE FROM versions WHERE tenant = ?1 AND name = ?2 AND id = ?3",
                    p![tenant, name, id],
                )?;
                tx.exec(
                    "DELETE FROM served WHERE tenant = ?1 AND name = ?2 AND version = ?3",
                    p![tenant, name, id],
                )?;
                journal(
                    &mut *tx,
                    tenant,
                    name,
                    JournalEvent::Delete,
                    Some(id),
                    None,
                    actor,
                    &format!("gc, keep {keep}"),
                )?;
            }
            // files go inside the write transaction: a register of the same
            // content waits for it and then finds them gone (and stores them
            // again) instead of committing a row whose files vanish after.
            // Only unaliased, unserved versions are here, so a commit that
            // fails after this leaves rows nothing serves.
            for id in &ids {
                self.store.delete(&store_key(tenant, name, id))?;
            }
            tx.commit()?;
            ids
        };
        self.changed();
        Ok(doomed)
    }
}
