//! States kept as text in the stores, as types: a training run's status, a
//! watch's mode and status, the journal's events. Each parses from its stored
//! name (an unknown name is a database fault) and prints as it.

use crate::error::RegistryError;
use serde::Serialize;

type R<T> = Result<T, RegistryError>;

/// A state kept as text in the stores: its variants and their names, parsing
/// (an unknown name is a database fault), `Display`, and comparison with a name.
macro_rules! state_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $v:ident = $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v,)+
        }

        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$v),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$v => $s,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = RegistryError;

            fn from_str(s: &str) -> R<Self> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|x| x.as_str() == s)
                    .ok_or_else(|| RegistryError::Db(format!(concat!("a ", $what, " `{}`"), s)))
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

state_enum! {
    /// Where a training run stands, or how it ended.
    RunStatus, "run with the unknown status" {
        Running = "running",
        /// Gated and made live.
        Promoted = "promoted",
        /// Gated and rolled out to a share of the traffic, watched.
        Canary = "canary",
        /// Registered retired: the gate said no.
        Rejected = "rejected",
        /// Stopped by bad input or a fault; nothing registered.
        Failed = "failed",
        /// Nothing to do (the snapshot was already trained on).
        Skipped = "skipped",
        /// Its trainer died with it running (found when its lease lapsed).
        Crashed = "crashed",
        /// Stopped by a signal; nothing registered.
        Interrupted = "interrupted",
    }
}

impl RunStatus {
    /// The run reached its data's end: its snapshot counts as trained on.
    pub fn used_its_snapshot(self) -> bool {
        !matches!(self, Self::Running | Self::Crashed | Self::Interrupted)
    }
}

state_enum! {
    /// How a rolled-out version is compared with the one before it.
    WatchMode, "watch with the unknown mode" {
        /// A share of the traffic, side by side with the live version.
        Canary = "canary",
        /// All the traffic, against the previous version's window before the rollout.
        BeforeAfter = "before_after",
    }
}

state_enum! {
    /// Where a watch stands, or how it ended.
    WatchStatus, "watch with the unknown status" {
        Watching = "watching",
        Passed = "passed",
        RolledBack = "rolled_back",
        /// Someone else changed the adapter's aliases: nothing undone.
        Superseded = "superseded",
        Inconclusive = "inconclusive",
    }
}

state_enum! {
    /// What a journal entry records.
    JournalEvent, "journal entry with the unknown event" {
        /// A version was stored.
        Register = "register",
        GatePass = "gate-pass",
        GateFail = "gate-fail",
        /// A version became live.
        Promote = "promote",
        /// The live version went back to an earlier one (by a person).
        Rollback = "rollback",
        /// A version was given a share of the traffic.
        Canary = "canary",
        CanaryClear = "canary-clear",
        Retire = "retire",
        Delete = "delete",
        /// Erased data: a version trained on it is tainted.
        Taint = "taint",
        /// A person asked for a retrain.
        Retrain = "retrain",
        /// The watch rolled a regression back.
        AutoRollback = "auto-rollback",
        WatchPass = "watch-pass",
        WatchSuperseded = "watch-superseded",
        WatchInconclusive = "watch-inconclusive",
        RunFailed = "run-failed",
    }
}

state_enum! {
    /// The names an adapter's versions are reached by.
    Alias, "alias with the unknown name" {
        /// What requests for the adapter get.
        Live = "live",
        /// The live version before the last promotion (the rollback target).
        Previous = "previous",
        /// A version given a share of the traffic.
        Canary = "canary",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_from_its_stored_name_and_an_unknown_name_is_a_fault() {
        fn round<T: Copy + PartialEq + std::fmt::Debug + std::str::FromStr<Err = RegistryError>>(
            all: &[T],
            name: fn(T) -> &'static str,
        ) {
            for &x in all {
                assert_eq!(name(x).parse::<T>().unwrap(), x);
            }
            let mut names: Vec<_> = all.iter().map(|&x| name(x)).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), all.len(), "names are distinct");
        }
        round(RunStatus::ALL, RunStatus::as_str);
        round(WatchMode::ALL, WatchMode::as_str);
        round(WatchStatus::ALL, WatchStatus::as_str);
        round(JournalEvent::ALL, JournalEvent::as_str);
        round(Alias::ALL, Alias::as_str);
        // serde writes the stored name (the admin API's JSON)
        assert_eq!(
            serde_json::to_value(JournalEvent::AutoRollback).unwrap(),
            "auto-rollback"
        );
        assert_eq!(
            serde_json::to_value(WatchMode::BeforeAfter).unwrap(),
            "before_after"
        );
        let e = "finished".parse::<RunStatus>().unwrap_err();
        assert!(
            matches!(&e, RegistryError::Db(m) if m.contains("`finished`")),
            "{e}"
        );
        assert_eq!(RunStatus::Promoted, "promoted");
    }
}
