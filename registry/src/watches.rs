//! Watches: the live check after a rollout, and the compare-and-set rollback
//! or promotion it ends with.

use crate::error::RegistryError;
use crate::registry::{journal, now_ms, servable, set_alias, state_of, Registry};
use crate::sql::{p, Mode, Row};
use crate::states::{Alias, JournalEvent, WatchMode, WatchStatus};
use serde::Serialize;

type R<T> = Result<T, RegistryError>;

/// The watch of a rolled-out version.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WatchInfo {
    pub tenant: String,
    pub name: String,
    pub version: String,
    /// The version it is compared against (live before the rollout).
    pub previous: Option<String>,
    pub mode: WatchMode,
    pub percent: Option<u8>,
    pub started_at: i64,
    /// Journal sequence of the rollout: alias changes after it by anyone else end the watch.
    pub promote_seq: i64,
    pub status: WatchStatus,
    pub verdict: serde_json::Value,
    pub updated_at: i64,
}

/// How a watch ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchEnd {
    Regressed,
    Passed,
    Inconclusive,
}

pub(crate) const WATCH_COLS: &str = "tenant, name, version, previous, mode, percent, started_at, promote_seq, status, verdict, updated_at";

fn row_to_watch(r: &Row) -> R<WatchInfo> {
    Ok(WatchInfo {
        tenant: r.s(0)?,
        name: r.s(1)?,
        version: r.s(2)?,
        previous: r.os(3)?,
        mode: r.s(4)?.parse()?,
        percent: r.oi(5)?.map(|p| p.clamp(0, 100) as u8),
        started_at: r.i(6)?,
        promote_seq: r.i(7)?,
        status: r.s(8)?.parse()?,
        verdict: serde_json::from_str(&r.s(9)?).unwrap_or(serde_json::Value::Null),
        updated_at: r.i(10)?,
    })
}

impl Registry {
    /// Watches of `tenant/name`, newest first.
    pub fn watches(&self, tenant: &str, name: &str) -> R<Vec<WatchInfo>> {
        self.tx(Mode::Auto)?
            .query(
                &format!("SELECT {WATCH_COLS} FROM watches WHERE tenant = ?1 AND name = ?2 ORDER BY started_at DESC"),
                p![tenant, name],
            )?
            .iter()
            .map(row_to_watch)
            .collect()
    }

    /// Every watch still `watching`.
    pub fn open_watches(&self) -> R<Vec<WatchInfo>> {
        self.tx(Mode::Auto)?
            .query(
                &format!("SELECT {WATCH_COLS} FROM watches WHERE status = 'watching' ORDER BY started_at"),
                &[],
            )?
            .iter()
            .map(row_to_watch)
            .collect()
    }

    /// Record the watch's latest figures (still watching).
    pub fn watch_progress(&self, w: &WatchInfo, verdict: &serde_json::Value) -> R<()> {
        self.tx(Mode::Auto)?.exec(
            "UPDATE watches SET verdict = ?4, updated_at = ?5 WHERE tenant = ?1 AND name = ?2 AND version = ?3 AND status = 'watching'",
            p![&w.tenant, &w.name, &w.version, verdict.to_string(), now_ms()],
        )?;
        Ok(())
    }

    /// End a watch. `Regressed` rolls back by compare-and-set on the state the
    /// watch created (the canary is still this version / the live version is still
    /// this version), `Passed` promotes a canary the same way, `Inconclusive` and
    /// `Superseded` change no alias. When anyone else changed the adapter's aliases
    /// since the rollout, nothing is undone and the watch ends `superseded`.
    /// Returns the status the watch ended with.
    pub fn finish_watch(
        &self,
        w: &WatchInfo,
        end: WatchEnd,
        verdict: &serde_json::Value,
        actor: &str,
        reason: &str,
    ) -> R<WatchStatus> {
        let (status, state) = {
            let mut guard = self.tx(Mode::Write)?;
            let tx = &mut *guard;
            let still = tx
                .opt(
                    "SELECT status FROM watches WHERE tenant = ?1 AND name = ?2 AND version = ?3",
                    p![&w.tenant, &w.name, &w.version],
                )?
                .map(|r| r.s(0)?.parse::<WatchStatus>())
                .transpose()?
                .ok_or_else(|| {
                    RegistryError::NotFound(format!(
                        "the watch of {}/{} {}",
                        w.tenant, w.name, w.version
                    ))
                })?;
            if still != WatchStatus::Watching {
                return Ok(still);
            }
            let (t, n, v) = (w.tenant.as_str(), w.name.as_str(), w.version.as_str());
            let others = tx
                .one(
                    "SELECT COUNT(*) FROM journal WHERE tenant = ?1 AND name = ?2 AND seq > ?3
                 AND event IN ('promote', 'rollback', 'canary', 'canary-clear', 'retire') AND actor != ?4",
                    p![t, n, w.promote_seq, actor],
                )?
                .i(0)?;
            let cur = state_of(tx, t, n)?;
            let in_place = match w.mode {
                WatchMode::Canary => {
                    cur.canary.as_ref().map(|c| c.0.as_str()) == Some(v) && cur.live == w.previous
                }
                WatchMode::BeforeAfter => cur.live.as_deref() == Some(v),
            };
            let status = if others > 0 || !in_place {
                journal(
                    tx,
                    t,
                    n,
                    JournalEvent::WatchSuperseded,
                    Some(v),
                    None,
                    actor,
                    "the adapter's aliases changed since the rollout: nothing is undone",
                )?;
                WatchStatus::Superseded
            } else {
                match end {
                    WatchEnd::Regressed => {
                        match w.mode {
                            WatchMode::Canary => {
                                tx.exec(
                                    "DELETE FROM aliases WHERE tenant = ?1 AND name = ?2 AND alias = 'canary'",
                                    p![t, n],
                                )?;
                            }
                            WatchMode::BeforeAfter => {
                                let prev = w.previous.as_deref().ok_or_else(|| {
                                    RegistryError::NotFound(format!("previous version of {t}/{n}"))
                                })?;
                                servable(tx, t, n, prev)?;
                                set_alias(tx, t, n, Alias::Live, prev, None)?;
                                set_alias(tx, t, n, Alias::Previous, v, None)?;
                            }
                        }
                        tx.exec(
                            "UPDATE versions SET retired = 1 WHERE tenant = ?1 AND name = ?2 AND id = ?3",
                            p![t, n, v],
                        )?;
                        tx.exec(
                            "DELETE FROM aliases WHERE tenant = ?1 AND name = ?2 AND version = ?3",
                            p![t, n, v],
                        )?;
                        journal(
                            tx,
                            t,
                            n,
                            JournalEvent::AutoRollback,
                            w.previous.as_deref(),
                            Some(v),
                            actor,
                            reason,
                        )?;
                        WatchStatus::RolledBack
                    }
                    WatchEnd::Passed => {
                        if w.mode == WatchMode::Canary {
                            if let Some(l) = &cur.live {
                                set_alias(tx, t, n, Alias::Previous, l, None)?;
                            }
                            set_alias(tx, t, n, Alias::Live, v, None)?;
                            tx.exec(
                                "DELETE FROM aliases WHERE tenant = ?1 AND name = ?2 AND alias = 'canary'",
                                p![t, n],
                            )?;
                            journal(
                                tx,
                                t,
                                n,
                                JournalEvent::Promote,
                                Some(v),
                                cur.live.as_deref(),
                                actor,
                                reason,
                            )?;
                        }
                        journal(
                            tx,
                            t,
                            n,
                            JournalEvent::WatchPass,
                            Some(v),
                            None,
                            actor,
                            reason,
                        )?;
                        WatchStatus::Passed
                    }
                    WatchEnd::Inconclusive => {
                        journal(
                            tx,
                            t,
                            n,
                            JournalEvent::WatchInconclusive,
                            Some(v),
                            None,
                            actor,
                            reason,
                        )?;
                        WatchStatus::Inconclusive
                    }
                }
            };
            tx.exec(
                "UPDATE watches SET status = ?4, verdict = ?5, updated_at = ?6 WHERE tenant = ?1 AND name = ?2 AND version = ?3",
                p![t, n, v, status.as_str(), verdict.to_string(), now_ms()],
            )?;
            let st = state_of(tx, t, n)?;
            guard.commit()?;
            (status, st)
        };
        self.notify(&w.tenant, &w.name, &state);
        Ok(status)
    }
}
