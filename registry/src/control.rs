//! What the trainer daemon needs from the registry, in the same database so that
//! every step that matters is one transaction:
//! - **leases**: one trainer per adapter at a time (holder + expiry, renewed
//!   while it works; a registration checks the lease in its own transaction, so
//!   a trainer whose lease lapsed cannot register);
//! - **gated registration**: the version row, the gate's verdict, the alias change
//!   (compare-and-set) and the watch that follows commit together or not at all;
//! - **runs**: one row per training run, for the admin API, metrics and status;
//! - **watches**: the live check after a promotion, and the compare-and-set
//!   rollback or promotion it ends with.

use crate::error::RegistryError;
use crate::registry::{
    journal, last_seq, now_ms, servable, set_alias, state_of, AdapterState, Expect, NewVersion,
    Registry, ServedBase, Staged, VersionInfo,
};
use crate::sql::{p, Conn, Mode, Row};
use crate::states::{Alias, JournalEvent, RunStatus, WatchMode};
use crate::watches::WATCH_COLS;
use serde::Serialize;

type R<T> = Result<T, RegistryError>;

/// How a version that passed the gate reaches traffic.
#[derive(Clone, Debug, PartialEq)]
pub enum Rollout {
    /// Make it live (compare-and-set on the live version the gate compared against).
    Live,
    /// Give it `percent`% of the traffic beside the live version.
    Canary(u8),
}

/// The gate's decision for a staged version.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Passed: roll out if the live version is still `expect`; then watch it.
    Pass {
        expect: Expect,
        rollout: Rollout,
        /// Start a watch after the rollout.
        watch: bool,
        summary: String,
    },
    /// Failed: keep the version, retired (never servable), with the reasons.
    Reject { reasons: String },
}

/// A training run as recorded.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RunInfo {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub holder: String,
    pub started_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub status: RunStatus,
    pub snapshot: Option<String>,
    pub version: Option<String>,
    pub detail: serde_json::Value,
}

/// Counters for metrics and `status`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LoopCounts {
    /// Runs by status.
    pub runs: Vec<(RunStatus, i64)>,
    pub gate_passes: i64,
    pub gate_fails: i64,
    pub auto_rollbacks: i64,
    /// Unix ms of the last finished run.
    pub last_run_finished: Option<i64>,
    pub watching: i64,
}

fn lease_of(c: &mut dyn Conn, tenant: &str, name: &str) -> R<Option<(String, i64)>> {
    c.opt(
        "SELECT holder, expires_at FROM leases WHERE tenant = ?1 AND name = ?2",
        p![tenant, name],
    )?
    .map(|r| Ok((r.s(0)?, r.i(1)?)))
    .transpose()
}

fn lease_ok(c: &mut dyn Conn, tenant: &str, name: &str, holder: &str) -> R<()> {
    let row = lease_of(c, tenant, name)?;
    match row {
        Some((h, exp)) if h == holder && exp > now_ms() => Ok(()),
        Some((h, _)) if h != holder => Err(RegistryError::LeaseLost(format!(
            "{tenant}/{name} is leased to {h}"
        ))),
        _ => Err(RegistryError::LeaseLost(format!(
            "the lease of {holder} on {tenant}/{name} expired"
        ))),
    }
}

fn row_to_run(r: &Row) -> R<RunInfo> {
    Ok(RunInfo {
        id: r.s(0)?,
        tenant: r.s(1)?,
        name: r.s(2)?,
        holder: r.s(3)?,
        started_at: r.i(4)?,
        updated_at: r.i(5)?,
        finished_at: r.oi(6)?,
        status: r.s(7)?.parse()?,
        snapshot: r.os(8)?,
        version: r.os(9)?,
        detail: serde_json::from_str(&r.s(10)?).unwrap_or(serde_json::Value::Null),
    })
}

const RUN_COLS: &str = "id, tenant, name, holder, started_at, updated_at, finished_at, status, snapshot, version, detail";

impl Registry {
    // ---- leases ----

    /// Take the training lease on `tenant/name` for `ttl_ms` if it is free,
    /// expired or already `holder`'s. `false`: someone else holds it.
    pub fn acquire_lease(&self, tenant: &str, name: &str, holder: &str, ttl_ms: i64) -> R<bool> {
        let mut tx = self.tx(Mode::Write)?;
        let cur = lease_of(&mut *tx, tenant, name)?;
        let now = now_ms();
        if let Some((h, exp)) = cur {
            if h != holder && exp > now {
                return Ok(false);
            }
        }
        tx.exec(
            "INSERT INTO leases (tenant, name, holder, expires_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (tenant, name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at",
            p![tenant, name, holder, now + ttl_ms],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Extend `holder`'s lease; `LeaseLost` when it expired or passed to another.
    pub fn renew_lease(&self, tenant: &str, name: &str, holder: &str, ttl_ms: i64) -> R<()> {
        let n = self.tx(Mode::Auto)?.exec(
            "UPDATE leases SET expires_at = ?4 WHERE tenant = ?1 AND name = ?2 AND holder = ?3 AND expires_at > ?5",
            p![tenant, name, holder, now_ms() + ttl_ms, now_ms()],
        )?;
        if n == 1 {
            Ok(())
        } else {
            Err(RegistryError::LeaseLost(format!(
                "{holder} no longer holds the lease on {tenant}/{name}"
            )))
        }
    }

    pub fn release_lease(&self, tenant: &str, name: &str, holder: &str) -> R<()> {
        self.tx(Mode::Auto)?.exec(
            "DELETE FROM leases WHERE tenant = ?1 AND name = ?2 AND holder = ?3",
            p![tenant, name, holder],
        )?;
        Ok(())
    }

    /// The current holder of a lease that has not expired.
    pub fn lease_holder(&self, tenant: &str, name: &str) -> R<Option<String>> {
        self.tx(Mode::Auto)?
            .opt(
                "SELECT holder FROM leases WHERE tenant = ?1 AND name = ?2 AND expires_at > ?3",
                p![tenant, name, now_ms()],
            )?
            .map(|r| r.s(0))
            .transpose()
            .map_err(Into::into)
    }

    // ---- gated registration ----

    /// Register a version with the gate's decision, in one transaction under
    /// `holder`'s lease: the version row (retired when rejected), `register` and
    /// `gate-pass`/`gate-fail` journal entries, the rollout by compare-and-set and
    /// the watch. A conflict (the live version changed since the gate read it) or a
    /// lapsed lease writes nothing.
    pub fn register_gated(
        &self,
        v: NewVersion<'_>,
        base: &ServedBase,
        decision: &Decision,
        holder: &str,
    ) -> R<(VersionInfo, AdapterState)> {
        let (id, size, existing) = match self.stage(&v, base)? {
            Staged::Existing(e) => (e.id.clone(), e.size, true),
            Staged::New { id, size } => (id, size, false),
        };
        let (tenant, name) = (v.tenant, v.name);
        let state = {
            let mut guard = self.tx(Mode::Write)?;
            let tx = &mut *guard;
            lease_ok(tx, tenant, name, holder)?;
            let rejected = matches!(decision, Decision::Reject { .. });
            if !existing {
                tx.exec(
                    "INSERT INTO versions (tenant, name, id, created_at, source, parent, base_fingerprint, size, metadata, retired)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    p![tenant, name, &id, now_ms(), v.source, v.parent, &base.fingerprint, size as i64,
                            v.metadata.to_string(), rejected as i64],
                )?;
                journal(
                    tx,
                    tenant,
                    name,
                    JournalEvent::Register,
                    Some(&id),
                    None,
                    v.actor,
                    v.source,
                )?;
            }
            match decision {
                Decision::Reject { reasons } => {
                    if existing {
                        tx.exec(
                            "UPDATE versions SET retired = 1 WHERE tenant = ?1 AND name = ?2 AND id = ?3
                             AND NOT EXISTS (SELECT 1 FROM aliases WHERE tenant = ?1 AND name = ?2 AND alias = 'live' AND version = ?3)",
                            p![tenant, name, &id],
                        )?;
                    }
                    journal(
                        tx,
                        tenant,
                        name,
                        JournalEvent::GateFail,
                        Some(&id),
                        None,
                        v.actor,
                        reasons,
                    )?;
                }
                Decision::Pass {
                    expect,
                    rollout,
                    watch,
                    summary,
                } => {
                    servable(tx, tenant, name, &id)?;
                    let cur = state_of(tx, tenant, name)?;
                    let ok = match expect {
                        Expect::Any => true,
                        Expect::NoLive => cur.live.is_none(),
                        Expect::Version(e) => cur.live.as_deref() == Some(e.as_str()),
                    };
                    if !ok {
                        return Err(RegistryError::Conflict {
                            expected: match expect {
                                Expect::Version(e) => e.clone(),
                                _ => "none".into(),
                            },
                            actual: cur.live.unwrap_or_else(|| "none".into()),
                        });
                    }
                    journal(
                        tx,
                        tenant,
                        name,
                        JournalEvent::GatePass,
                        Some(&id),
                        cur.live.as_deref(),
                        v.actor,
                        summary,
                    )?;
                    let (mode, pct) = match rollout {
                        Rollout::Live => {
                            if cur.live.as_deref() != Some(id.as_str()) {
                                if let Some(l) = &cur.live {
                                    set_alias(tx, tenant, name, Alias::Previous, l, None)?;
                                }
                                set_alias(tx, tenant, name, Alias::Live, &id, None)?;
                            }
                            journal(
                                tx,
                                tenant,
                                name,
                                JournalEvent::Promote,
                                Some(&id),
                                cur.live.as_deref(),
                                v.actor,
                                summary,
                            )?;
                            (WatchMode::BeforeAfter, None)
                        }
                        Rollout::Canary(p) => {
                            if *p == 0 || *p > 100 {
                                return Err(RegistryError::Rejected(format!(
                                    "canary percentage {p}: 1 to 100"
                                )));
                            }
                            if cur.live.is_none() {
                                // nothing to share traffic with: the first version goes live
                                set_alias(tx, tenant, name, Alias::Live, &id, None)?;
                                journal(
                                    tx,
                                    tenant,
                                    name,
                                    JournalEvent::Promote,
                                    Some(&id),
                                    None,
                                    v.actor,
                                    summary,
                                )?;
                                (WatchMode::BeforeAfter, None)
                            } else {
                                set_alias(tx, tenant, name, Alias::Canary, &id, Some(*p))?;
                                journal(
                                    tx,
                                    tenant,
                                    name,
                                    JournalEvent::Canary,
                                    Some(&id),
                                    cur.live.as_deref(),
                                    v.actor,
                                    &format!("{p}%: {summary}"),
                                )?;
                                (WatchMode::Canary, Some(*p))
                            }
                        }
                    };
                    if *watch && cur.live.is_some() {
                        let seq = last_seq(tx)?;
                        let now = now_ms();
                        tx.exec(
                            &format!("INSERT INTO watches ({WATCH_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'watching', '{{}}', ?7)
                             ON CONFLICT (tenant, name, version) DO UPDATE SET previous = excluded.previous, mode = excluded.mode,
                             percent = excluded.percent, started_at = excluded.started_at, promote_seq = excluded.promote_seq,
                             status = excluded.status, verdict = excluded.verdict, updated_at = excluded.updated_at"),
                            p![tenant, name, &id, &cur.live, mode.as_str(), pct.map(i64::from), now, seq],
                        )?;
                    }
                }
            }
            let st = state_of(tx, tenant, name)?;
            guard.commit()?;
            st
        };
        self.notify(tenant, name, &state);
        Ok((self.version(tenant, name, &id)?, state))
    }

    /// A journal entry about an adapter without an alias change (a failed run,
    /// a watch's verdict).
    pub fn note(
        &self,
        tenant: &str,
        name: &str,
        event: JournalEvent,
        version: Option<&str>,
        actor: &str,
        reason: &str,
    ) -> R<()> {
        // under the write lock like every journal entry: sequence numbers then
        // commit in order, which readers that follow the journal by its
        // sequence rely on
        let mut tx = self.tx(Mode::Write)?;
        journal(&mut *tx, tenant, name, event, version, None, actor, reason)?;
        Ok(tx.commit()?)
    }

    // ---- runs ----

    pub fn run_start(&self, id: &str, tenant: &str, name: &str, holder: &str) -> R<()> {
        let now = now_ms();
        self.tx(Mode::Auto)?.exec(
            &format!("INSERT INTO runs ({RUN_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?5, NULL, 'running', NULL, NULL, '{{}}')"),
            p![id, tenant, name, holder, now],
        )?;
        Ok(())
    }

    /// Update a run; `finished` stamps its end.
    pub fn run_update(
        &self,
        id: &str,
        status: RunStatus,
        snapshot: Option<&str>,
        version: Option<&str>,
        detail: &serde_json::Value,
        finished: bool,
    ) -> R<()> {
        let now = now_ms();
        let status = status.as_str();
        self.tx(Mode::Auto)?.exec(
            "UPDATE runs SET status = ?2, snapshot = COALESCE(?3, snapshot), version = COALESCE(?4, version),
             detail = ?5, updated_at = ?6, finished_at = CASE WHEN ?7 THEN ?6 ELSE finished_at END WHERE id = ?1",
            p![id, status, snapshot, version, detail.to_string(), now, finished],
        )?;
        Ok(())
    }

    /// Runs left `running` on `tenant/name` by a trainer that no longer holds the
    /// lease become `crashed`; returns how many.
    pub fn mark_crashed(&self, tenant: &str, name: &str) -> R<usize> {
        self.tx(Mode::Auto)?.exec(
            "UPDATE runs SET status = 'crashed', finished_at = ?3, updated_at = ?3
             WHERE tenant = ?1 AND name = ?2 AND status = 'running' AND NOT EXISTS (
                 SELECT 1 FROM leases l WHERE l.tenant = ?1 AND l.name = ?2 AND l.holder = runs.holder AND l.expires_at > ?3)",
            p![tenant, name, now_ms()],
        )
        .map_err(Into::into)
    }

    /// Runs `holder` left `running` (it is starting again, so they died with an
    /// earlier process) become `crashed`; returns how many.
    pub fn mark_crashed_of(&self, holder: &str) -> R<usize> {
        self.tx(Mode::Auto)?.exec(
            "UPDATE runs SET status = 'crashed', finished_at = ?2, updated_at = ?2 WHERE holder = ?1 AND status = 'running'",
            p![holder, now_ms()],
        )
        .map_err(Into::into)
    }

    /// Runs of `tenant/name`, newest first.
    pub fn runs(&self, tenant: &str, name: &str, limit: usize) -> R<Vec<RunInfo>> {
        self.tx(Mode::Auto)?
            .query(
                &format!("SELECT {RUN_COLS} FROM runs WHERE tenant = ?1 AND name = ?2 ORDER BY started_at DESC, id DESC LIMIT ?3"),
                p![tenant, name, limit as i64],
            )?
            .iter()
            .map(row_to_run)
            .collect()
    }

    pub fn run(&self, id: &str) -> R<RunInfo> {
        self.tx(Mode::Auto)?
            .opt(
                &format!("SELECT {RUN_COLS} FROM runs WHERE id = ?1"),
                p![id],
            )?
            .map(|r| row_to_run(&r))
            .transpose()?
            .ok_or_else(|| RegistryError::NotFound(format!("run {id}")))
    }

    /// Every adapter with a run, as (tenant, name).
    pub fn trained_adapters(&self) -> R<Vec<(String, String)>> {
        self.tx(Mode::Auto)?
            .query(
                "SELECT DISTINCT tenant, name FROM runs ORDER BY tenant, name",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.s(0)?, r.s(1)?)))
            .collect()
    }

    pub fn loop_counts(&self) -> R<LoopCounts> {
        let mut tx = self.tx(Mode::Snapshot)?;
        let runs = tx
            .query(
                "SELECT status, COUNT(*) FROM runs GROUP BY status ORDER BY status",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.s(0)?.parse()?, r.i(1)?)))
            .collect::<R<Vec<_>>>()?;
        let mut count = |event: JournalEvent| -> R<i64> {
            tx.one(
                "SELECT COUNT(*) FROM journal WHERE event = ?1",
                p![event.as_str()],
            )?
            .i(0)
            .map_err(Into::into)
        };
        let (gate_passes, gate_fails, auto_rollbacks) = (
            count(JournalEvent::GatePass)?,
            count(JournalEvent::GateFail)?,
            count(JournalEvent::AutoRollback)?,
        );
        Ok(LoopCounts {
            runs,
            gate_passes,
            gate_fails,
            auto_rollbacks,
            last_run_finished: tx.one("SELECT MAX(finished_at) FROM runs", &[])?.oi(0)?,
            watching: tx
                .one(
                    "SELECT COUNT(*) FROM watches WHERE status = 'watching'",
                    &[],
                )?
                .i(0)?,
        })
    }
}
