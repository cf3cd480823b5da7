//! Watch after a rollout: the new version's bad-outcome rate (rated -1,
//! corrected, or an error) against the version it replaced, from the captured
//! completions and their feedback.
//!
//! - `canary` mode: both versions serve at the same time (the canary share), both
//!   counted from the rollout on;
//! - `before_after`: the new version since the rollout against the old one over
//!   the same length of time before it.
//!
//! One look, no peeking: the verdict comes at the first check after
//! `window_minutes` at which both versions have `min_samples` completions: a
//! one-sided two-proportion z-test at `alpha`. A significantly higher rate rolls
//! back (compare-and-set on the state the rollout made; anyone else's change since
//! ends the watch untouched); otherwise a canary is promoted. Too little traffic
//! is no verdict: after `max_minutes` the watch ends inconclusive and changes nothing.

use crate::error::Result;
use crate::stats::two_proportion_greater;
use retune_config::WatchOptions;
use retune_datasets::{DatasetStore, Signals};
use retune_registry::{Registry, WatchEnd, WatchInfo, WatchMode, WatchStatus};
use serde::Serialize;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WatchFigures {
    pub new: Signals,
    pub old: Signals,
    pub new_rate: f64,
    pub old_rate: f64,
    pub z: f64,
    pub p_value: f64,
    pub alpha: f64,
    pub minutes: f64,
    pub window_minutes: f64,
    pub min_samples: usize,
    /// `waiting` (window not over), `insufficient` (too few samples: no verdict),
    /// `regressed`, `no_regression`, `inconclusive` (gave up for lack of traffic).
    pub state: String,
    /// The test, in words.
    pub test: String,
}

fn rate(s: &Signals) -> f64 {
    s.bad as f64 / s.completions.max(1) as f64
}

/// The verdict from the two versions' signals after `minutes` of watching.
pub fn decide(
    new: &Signals,
    old: &Signals,
    minutes: f64,
    o: &WatchOptions,
) -> (Option<WatchEnd>, WatchFigures) {
    let (z, p) = two_proportion_greater(new.bad, new.completions, old.bad, old.completions);
    let enough = new.completions >= o.min_samples && old.completions >= o.min_samples;
    let (end, state) = if minutes < o.window_minutes {
        (None, "waiting")
    } else if !enough {
        if minutes >= o.max_minutes {
            (Some(WatchEnd::Inconclusive), "inconclusive")
        } else {
            (None, "insufficient")
        }
    } else if p < o.alpha {
        (Some(WatchEnd::Regressed), "regressed")
    } else {
        (Some(WatchEnd::Passed), "no_regression")
    };
    (
        end,
        WatchFigures {
            new: new.clone(),
            old: old.clone(),
            new_rate: rate(new),
            old_rate: rate(old),
            z,
            p_value: p,
            alpha: o.alpha,
            minutes,
            window_minutes: o.window_minutes,
            min_samples: o.min_samples,
            state: state.into(),
            test: format!(
                "one-sided pooled two-proportion z-test of the bad-outcome rate (rated -1, corrected or error), new > old, at alpha {}, one look after {} min with at least {} completions each",
                o.alpha, o.window_minutes, o.min_samples
            ),
        },
    )
}

/// Check one watch now; returns its status afterwards.
pub fn tick(
    reg: &Registry,
    data: &dyn DatasetStore,
    w: &WatchInfo,
    o: &WatchOptions,
    now_ms: i64,
    actor: &str,
) -> Result<WatchStatus> {
    let Some(old_version) = w.previous.as_deref() else {
        let v = serde_json::json!({"state": "nothing to compare against"});
        return Ok(reg.finish_watch(
            w,
            WatchEnd::Passed,
            &v,
            actor,
            "first version: nothing to compare against",
        )?);
    };
    let elapsed = (now_ms - w.started_at).max(0);
    let new = data.signals(&w.tenant, &w.name, &w.version, w.started_at, now_ms + 1)?;
    let old = match w.mode {
        WatchMode::Canary => {
            data.signals(&w.tenant, &w.name, old_version, w.started_at, now_ms + 1)?
        }
        WatchMode::BeforeAfter => data.signals(
            &w.tenant,
            &w.name,
            old_version,
            w.started_at - elapsed,
            w.started_at,
        )?,
    };
    let (end, fig) = decide(&new, &old, elapsed as f64 / 60_000.0, o);
    let verdict = serde_json::to_value(&fig).unwrap_or_default();
    match end {
        None => {
            reg.watch_progress(w, &verdict)?;
            Ok(WatchStatus::Watching)
        }
        Some(e) => {
            let reason = format!(
                "{}: bad-outcome rate {:.3} ({}/{}) vs {:.3} ({}/{}) for {old_version}, z {:.2}, p {:.4}, alpha {}",
                fig.state, fig.new_rate, new.bad, new.completions, fig.old_rate, old.bad, old.completions, fig.z, fig.p_value, o.alpha
            );
            Ok(reg.finish_watch(w, e, &verdict, actor, &reason)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sim(rng: &mut impl Rng, n: usize, p: f64) -> Signals {
        let bad = (0..n).filter(|_| rng.gen::<f64>() < p).count();
        Signals {
            completions: n,
            rated_down: bad,
            bad,
            ..Signals::default()
        }
    }

    #[test]
    fn equal_rates_rarely_roll_back_and_a_tripled_rate_does() {
        let o = WatchOptions {
            min_samples: 200,
            window_minutes: 60.0,
            ..WatchOptions::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let trials = 2000;
        let false_alarms = (0..trials)
            .filter(|_| {
                let (e, _) = decide(
                    &sim(&mut rng, 300, 0.08),
                    &sim(&mut rng, 300, 0.08),
                    61.0,
                    &o,
                );
                e == Some(WatchEnd::Regressed)
            })
            .count();
        assert!(
            (false_alarms as f64 / trials as f64) < 0.05,
            "{false_alarms} of {trials}"
        );
        let caught = (0..trials)
            .filter(|_| {
                let (e, _) = decide(
                    &sim(&mut rng, 300, 0.24),
                    &sim(&mut rng, 300, 0.08),
                    61.0,
                    &o,
                );
                e == Some(WatchEnd::Regressed)
            })
            .count();
        assert!(caught as f64 / trials as f64 > 0.99, "{caught} of {trials}");
    }

    #[test]
    fn too_little_traffic_is_no_verdict_and_never_a_pass() {
        let o = WatchOptions {
            min_samples: 100,
            window_minutes: 60.0,
            max_minutes: 120.0,
            ..WatchOptions::default()
        };
        let few = Signals {
            completions: 40,
            bad: 0,
            ..Signals::default()
        };
        let many = Signals {
            completions: 400,
            bad: 40,
            ..Signals::default()
        };
        assert_eq!(decide(&few, &many, 30.0, &o).1.state, "waiting");
        assert_eq!(decide(&few, &many, 90.0, &o).0, None);
        assert_eq!(decide(&few, &many, 90.0, &o).1.state, "insufficient");
        assert_eq!(
            decide(&few, &many, 121.0, &o).0,
            Some(WatchEnd::Inconclusive)
        );
        assert_eq!(decide(&many, &many, 61.0, &o).0, Some(WatchEnd::Passed));
    }
}
