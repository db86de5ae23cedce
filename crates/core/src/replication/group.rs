//! Replication consistency groups: their statuses, fault levels and actions, and the checked
//! state machine that says which action may start from which state, and where it ends.
//!
//! ```text
//!             create                 sync / stop (replication_status only)
//!   creating ────────► available ◄──────────────────────────────┐
//!      │ fail            │  │  │ update (stopped)  ► updating ──┘
//!      ▼                 │  │  │ delete (no pairs) ► deleting ──► (gone) | error_deleting
//!    error ──────────────┘  │  │ reverse (active)  ► reversing ──► available (sides swapped)
//!                           │  │                               └─► error_reversing
//!                           │  └ extend (available)
//!                           └ failover ► failovering ──► failovered ── reprotect ──► available
//!                                                    └─► error_failovering  (sides swapped at failover)
//! ```
//!
//! Statuses, replication statuses and fault levels are spelled as the EVS API spells them.
//! No I/O: the coordinator asks [`GroupAction::begin`] before it changes anything and stores
//! what it answers.

use std::fmt;

use super::status::ReplicationStatus;

super::status::wire_enum!(
    /// A consistency group's (control-plane) status.
    GroupStatus {
        Creating => "creating",
        Available => "available",
        Error => "error",
        Deleting => "deleting",
        Updating => "updating",
        Reversing => "reversing",
        ErrorReversing => "error_reversing",
        Failovering => "failovering",
        Failovered => "failovered",
        ErrorFailovering => "error_failovering",
        ErrorDeleting => "error_deleting",
    }
);

/// How badly a group is hurt, as the API numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultLevel {
    /// 0: no fault.
    None,
    /// 2: a production volume is lost: failover is advised.
    ProductionLost,
    /// 5: the replication link is down: failover is not possible without data loss.
    LinkDown,
}

impl FaultLevel {
    pub fn code(self) -> u32 {
        match self {
            FaultLevel::None => 0,
            FaultLevel::ProductionLost => 2,
            FaultLevel::LinkDown => 5,
        }
    }
}

/// The operator's actions on a group (the EVS action names in [`GroupAction::api_name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupAction {
    Sync,
    Stop,
    Failover,
    Reverse,
    Reprotect,
    Extend,
    Update,
    Delete,
}

impl GroupAction {
    pub const ALL: [GroupAction; 8] = [
        GroupAction::Sync,
        GroupAction::Stop,
        GroupAction::Failover,
        GroupAction::Reverse,
        GroupAction::Reprotect,
        GroupAction::Extend,
        GroupAction::Update,
        GroupAction::Delete,
    ];

    pub fn api_name(self) -> &'static str {
        match self {
            GroupAction::Sync => "os-sync-replication-consistency-group",
            GroupAction::Stop => "os-stop-replication-consistency-group",
            GroupAction::Failover => "os-failover-replication-consistency-group",
            GroupAction::Reverse => "os-reverse-replication-consistency-group",
            GroupAction::Reprotect => "os-reprotect-replication-consistency-group",
            GroupAction::Extend => "os-extend-replication-volumes",
            GroupAction::Update => "update",
            GroupAction::Delete => "delete",
        }
    }
}

impl fmt::Display for GroupAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self {
            GroupAction::Sync => "sync",
            GroupAction::Stop => "stop",
            GroupAction::Failover => "failover",
            GroupAction::Reverse => "reverse",
            GroupAction::Reprotect => "reprotect",
            GroupAction::Extend => "extend",
            GroupAction::Update => "update",
            GroupAction::Delete => "delete",
        };
        f.write_str(word)
    }
}

/// What the rules look at: the group's status, its replication status, and its pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupView {
    pub status: GroupStatus,
    pub replication: ReplicationStatus,
    pub pairs: usize,
}

/// Where an action that may start takes the group: the status while it runs, and the one it
/// ends in when it succeeds or fails. `None` keeps the status as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub running: Option<GroupStatus>,
    pub succeeded: GroupStatus,
    pub failed: GroupStatus,
}

/// Why an action may not start: the EVS API answers 409 Conflict, naming the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{action} refused: {rule} (the group is {status}, replication {replication})")]
pub struct Refused {
    pub action: GroupAction,
    pub rule: &'static str,
    pub status: GroupStatus,
    pub replication: ReplicationStatus,
}

impl GroupAction {
    /// Checks that this action may start on a group in `view`, and says where it goes.
    pub fn begin(self, view: GroupView) -> Result<Transition, Refused> {
        use GroupStatus as S;
        use ReplicationStatus as R;
        let refuse = |rule| Refused {
            action: self,
            rule,
            status: view.status,
            replication: view.replication,
        };
        let stays = |status| Transition {
            running: None,
            succeeded: status,
            failed: status,
        };
        match self {
            GroupAction::Sync | GroupAction::Stop | GroupAction::Extend => {
                if view.status != S::Available {
                    return Err(refuse("the group must be available"));
                }
                if view.pairs == 0 {
                    return Err(refuse("the group has no pairs"));
                }
                Ok(stays(S::Available))
            }
            GroupAction::Update => {
                if view.status != S::Available {
                    return Err(refuse("the group must be available"));
                }
                if view.pairs > 0 && view.replication != R::ActiveStopped {
                    return Err(refuse(
                        "the group must be stopped first (replication active-stopped)",
                    ));
                }
                Ok(Transition {
                    running: Some(S::Updating),
                    succeeded: S::Available,
                    failed: S::Available,
                })
            }
            GroupAction::Delete => {
                if !matches!(view.status, S::Available | S::Error) {
                    return Err(refuse("the group must be available or error"));
                }
                if view.pairs > 0 {
                    return Err(refuse("the group still has pairs: remove them first"));
                }
                Ok(Transition {
                    running: Some(S::Deleting),
                    succeeded: S::Deleting,
                    failed: S::ErrorDeleting,
                })
            }
            GroupAction::Failover => {
                if !matches!(view.status, S::Available | S::ErrorFailovering) {
                    return Err(refuse("the group must be available (or a failover failed)"));
                }
                if view.pairs == 0 {
                    return Err(refuse("the group has no pairs"));
                }
                Ok(Transition {
                    running: Some(S::Failovering),
                    succeeded: S::Failovered,
                    failed: S::ErrorFailovering,
                })
            }
            GroupAction::Reverse => {
                if !matches!(view.status, S::Available | S::ErrorReversing) {
                    return Err(refuse("the group must be available (or a reverse failed)"));
                }
                if view.pairs == 0 {
                    return Err(refuse("the group has no pairs"));
                }
                if view.status == S::Available && view.replication != R::Active {
                    return Err(refuse(
                        "a planned reverse needs the group replicating (active): sync it first",
                    ));
                }
                Ok(Transition {
                    running: Some(S::Reversing),
                    succeeded: S::Available,
                    failed: S::ErrorReversing,
                })
            }
            GroupAction::Reprotect => {
                if view.status != S::Failovered {
                    return Err(refuse(
                        "reprotect only follows a failover (status failovered)",
                    ));
                }
                Ok(Transition {
                    running: None,
                    succeeded: S::Available,
                    failed: S::Failovered,
                })
            }
        }
    }
}

/// A group's replication status from its pairs': stopped groups are `active-stopped`;
/// otherwise the worst pair's status counts (error, then inactive, then copying). While the
/// group's stop job runs (`stopping`), it is stopped only once every pair is: until then it
/// shows what its pairs still replicating show (an update, which needs it stopped, would be
/// refused as busy).
pub fn group_replication(
    stopped: bool,
    stopping: bool,
    pairs: impl IntoIterator<Item = ReplicationStatus>,
) -> ReplicationStatus {
    use ReplicationStatus as R;
    let pairs: Vec<R> = pairs.into_iter().collect();
    if stopping && !pairs.iter().all(|s| *s == R::ActiveStopped) {
        let replicating: Vec<R> = pairs
            .into_iter()
            .filter(|s| *s != R::ActiveStopped)
            .collect();
        return group_replication(false, false, replicating);
    }
    let rank = |s: R| match s {
        R::Error => 4,
        R::Inactive => 3,
        R::Copying => 2,
        R::ActiveStopped => 1,
        R::Active => 0,
    };
    let worst = pairs.into_iter().max_by_key(|s| rank(*s));
    match worst {
        Some(R::Error) => R::Error,
        _ if stopped => R::ActiveStopped,
        Some(s) => s,
        None => R::ActiveStopped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GroupAction as A;
    use GroupStatus as S;
    use ReplicationStatus as R;

    /// Every action from every status and replication status, with and without pairs: the
    /// allowed set is exactly this table, and everything else is refused with a rule.
    #[test]
    fn every_action_from_every_state_is_allowed_or_refused_as_the_table_says() {
        let allowed = |a: A, v: GroupView| -> bool {
            match a {
                A::Sync | A::Stop | A::Extend => v.status == S::Available && v.pairs > 0,
                A::Update => {
                    v.status == S::Available && (v.pairs == 0 || v.replication == R::ActiveStopped)
                }
                A::Delete => matches!(v.status, S::Available | S::Error) && v.pairs == 0,
                A::Failover => {
                    matches!(v.status, S::Available | S::ErrorFailovering) && v.pairs > 0
                }
                A::Reverse => {
                    v.pairs > 0
                        && (v.status == S::ErrorReversing
                            || (v.status == S::Available && v.replication == R::Active))
                }
                A::Reprotect => v.status == S::Failovered,
            }
        };
        let mut checked = 0;
        for &status in S::ALL {
            for &replication in R::ALL {
                for pairs in [0, 2] {
                    let view = GroupView {
                        status,
                        replication,
                        pairs,
                    };
                    for action in A::ALL {
                        let result = action.begin(view);
                        assert_eq!(
                            result.is_ok(),
                            allowed(action, view),
                            "{action} from {view:?}: {result:?}"
                        );
                        if let Err(e) = result {
                            assert!(e.to_string().contains(e.rule));
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 11 * 5 * 2 * 8);
    }

    #[test]
    fn actions_end_where_the_api_says() {
        let available = GroupView {
            status: S::Available,
            replication: R::Active,
            pairs: 2,
        };
        let failover = A::Failover.begin(available).unwrap();
        assert_eq!(failover.running, Some(S::Failovering));
        assert_eq!(failover.succeeded, S::Failovered);
        assert_eq!(failover.failed, S::ErrorFailovering);
        let failovered = GroupView {
            status: S::Failovered,
            replication: R::ActiveStopped,
            pairs: 2,
        };
        assert_eq!(
            A::Reprotect.begin(failovered).unwrap().succeeded,
            S::Available
        );
        let e = A::Reprotect.begin(available).unwrap_err();
        assert_eq!(
            e.to_string(),
            "reprotect refused: reprotect only follows a failover (status failovered) (the group is available, replication active)"
        );
        assert_eq!(
            A::Reverse.begin(available).unwrap().running,
            Some(S::Reversing)
        );
        assert_eq!(A::Sync.begin(available).unwrap().running, None);
    }

    #[test]
    fn a_group_replicates_as_its_worst_pair() {
        assert_eq!(
            group_replication(false, false, [R::Active, R::Active]),
            R::Active
        );
        assert_eq!(
            group_replication(false, false, [R::Active, R::Copying]),
            R::Copying
        );
        assert_eq!(
            group_replication(false, false, [R::Inactive, R::Copying]),
            R::Inactive
        );
        assert_eq!(
            group_replication(false, false, [R::Error, R::Inactive]),
            R::Error
        );
        assert_eq!(
            group_replication(true, false, [R::Active, R::Inactive]),
            R::ActiveStopped
        );
        assert_eq!(group_replication(true, false, [R::Error]), R::Error);
        assert_eq!(group_replication(false, false, []), R::ActiveStopped);
        // Being stopped: stopped once every pair is.
        assert_eq!(
            group_replication(true, true, [R::ActiveStopped, R::Active]),
            R::Active
        );
        assert_eq!(
            group_replication(true, true, [R::ActiveStopped, R::ActiveStopped]),
            R::ActiveStopped
        );
        assert_eq!(
            group_replication(true, true, [R::Error, R::ActiveStopped]),
            R::Error
        );
    }

    #[test]
    fn statuses_and_fault_levels_are_spelled_as_the_api_spells_them() {
        let texts: Vec<_> = S::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            texts,
            [
                "creating",
                "available",
                "error",
                "deleting",
                "updating",
                "reversing",
                "error_reversing",
                "failovering",
                "failovered",
                "error_failovering",
                "error_deleting"
            ]
        );
        assert_eq!(
            [
                FaultLevel::None,
                FaultLevel::ProductionLost,
                FaultLevel::LinkDown
            ]
            .map(FaultLevel::code),
            [0, 2, 5]
        );
        assert_eq!(
            A::Reprotect.api_name(),
            "os-reprotect-replication-consistency-group"
        );
    }
}
