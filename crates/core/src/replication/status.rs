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
