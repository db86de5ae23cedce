//! The statuses of the EVS replication API, spelled exactly as the API spells them.

macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::replication::status::UnknownValue;
            fn from_str(s: &str) -> Result<Self, $crate::replication::status::UnknownValue> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err($crate::replication::status::UnknownValue {
                        what: stringify!($name),
                        value: other.to_owned(),
                        allowed: &[$($text),+],
                    }),
                }
            }
        }
    };
}
pub(crate) use wire_enum;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{value:?} is not a {what}; use one of: {}", allowed.join(", "))]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
    pub allowed: &'static [&'static str],
}

wire_enum!(
    /// A pair's (control-plane) status.
    PairStatus {
        Creating => "creating",
        Available => "available",
        Error => "error",
        Deleting => "deleting",
        ErrorDeleting => "error_deleting",
    }
);

/// A pair's status changes only along these edges (every other change is a bug, refused):
///
/// ```text
///   creating ──► available ──► deleting ──► (gone)
///      │            │            │  ▲
///      ▼            ▼            ▼  │ delete again
///    error ◄────────┘      error_deleting
///      └──────── delete ──► deleting
/// ```
///
/// `creating → available` once both agents took their roles; a step that gets no answer
/// for good puts a pair in `error` (`error_deleting` while deleting, which a delete may
/// retry); `error → error` records a newer failure.
impl PairStatus {
    pub fn can_become(self, to: PairStatus) -> bool {
        use PairStatus as S;
        matches!(
            (self, to),
            (S::Creating, S::Available | S::Error)
                | (S::Available | S::Error, S::Error)
                | (S::Available | S::Error | S::ErrorDeleting, S::Deleting)
                | (S::Deleting, S::ErrorDeleting)
        )
    }

    /// Moves to `to` if the table allows it; `event` names what asked, for the error.
    pub fn become_(
        &mut self,
        to: PairStatus,
        event: &'static str,
    ) -> Result<(), IllegalPairStatus> {
        if !self.can_become(to) {
            return Err(IllegalPairStatus {
                from: *self,
                to,
                event,
            });
        }
        *self = to;
        Ok(())
    }
}

/// A pair status change the table does not allow.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a pair's status may not go from {from} to {to} ({event})")]
pub struct IllegalPairStatus {
    pub from: PairStatus,
    pub to: PairStatus,
    pub event: &'static str,
}

wire_enum!(
    /// Whether and how a pair (or group) replicates.
    ReplicationStatus {
        /// Replicating; the DR side is consistent.
        Active => "active",
        /// Paused; the DR side is consistent.
        ActiveStopped => "active-stopped",
        /// A sync or catch-up is running.
        Copying => "copying",
        /// Paused or interrupted; the DR side is not consistent with production: needs a sync.
        Inactive => "inactive",
        Error => "error",
    }
);

wire_enum!(
    /// `hypermetro`: a write is answered once the DR side has it (RPO 0). `async`: answered
    /// after the local write; the DR side trails by about an epoch.
    ReplicationModel {
        Hypermetro => "hypermetro",
        Async => "async",
    }
);

wire_enum!(
    JobStatus {
        Init => "INIT",
        Running => "RUNNING",
        Success => "SUCCESS",
        Fail => "FAIL",
    }
);

wire_enum!(
    JobType {
        CreatePair => "createReplicationPair",
        DeletePair => "deleteReplicationPair",
        ResolvePair => "resolveReplicationPair",
        VerifyPair => "verifyReplicationPair",
        CreateGroup => "createReplicationConsistencyGroup",
        UpdateGroup => "updateReplicationConsistencyGroup",
        DeleteGroup => "deleteReplicationConsistencyGroup",
        SyncGroup => "syncReplicationConsistencyGroup",
        StopGroup => "stopReplicationConsistencyGroup",
        FailoverGroup => "failoverReplicationConsistencyGroup",
        ReverseGroup => "reverseReplicationConsistencyGroup",
        ReprotectGroup => "reprotectReplicationConsistencyGroup",
        ExtendGroup => "extendReplicationVolumes",
        AddGroupPair => "createGroupReplicationPair",
        RemoveGroupPair => "deleteGroupReplicationPair",
        CreateDrill => "createDisasterRecoveryDrill",
        DeleteDrill => "deleteDisasterRecoveryDrill",
    }
);

impl JobStatus {
    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Success | JobStatus::Fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_status_changes_only_along_the_table() {
        use PairStatus as S;
        let allowed: Vec<(S, S)> = S::ALL
            .iter()
            .flat_map(|&from| S::ALL.iter().map(move |&to| (from, to)))
            .filter(|(from, to)| from.can_become(*to))
            .collect();
        assert_eq!(
            allowed,
            [
                (S::Creating, S::Available),
                (S::Creating, S::Error),
                (S::Available, S::Error),
                (S::Available, S::Deleting),
                (S::Error, S::Error),
                (S::Error, S::Deleting),
                (S::Deleting, S::ErrorDeleting),
                (S::ErrorDeleting, S::Deleting),
            ]
        );
        let mut deleting = S::Deleting;
        assert_eq!(
            deleting.become_(S::Available, "a creation step"),
            Err(IllegalPairStatus {
                from: S::Deleting,
                to: S::Available,
                event: "a creation step"
            })
        );
        assert_eq!(deleting, S::Deleting);
        assert!(deleting.become_(S::ErrorDeleting, "stuck").is_ok());
        assert_eq!(deleting, S::ErrorDeleting);
    }

    #[test]
    fn statuses_are_spelled_as_the_api_spells_them() {
        let texts: Vec<_> = ReplicationStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            texts,
            ["active", "active-stopped", "copying", "inactive", "error"]
        );
        let texts: Vec<_> = PairStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            texts,
            [
                "creating",
                "available",
                "error",
                "deleting",
                "error_deleting"
            ]
        );
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>(), Ok(*s));
        }
        assert_eq!(
            serde_json::to_string(&ReplicationStatus::ActiveStopped).unwrap(),
            "\"active-stopped\""
        );
        let err = "sync".parse::<ReplicationModel>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"sync\" is not a ReplicationModel; use one of: hypermetro, async"
        );
    }
}
