//! A volume's role in replication, with the transitions allowed between roles.
//!
//! ```text
//!                  pair created (this side is production)
//!   Standalone ─────────────────────────────────────────► Primary ◄──── confirmed ───┐
//!      │  ▲  ◄──────────────── pair deleted ────────────────  │ ▲                    │
//!      │  │                                                   │ │ roles swap    Fenced
//!      │  └──────────────────── pair deleted ─────────────┐   ▼ │ (failover)     ▲  │
//!      └────────────────────────────────────────────────► Secondary ◄─ reprotect ─┘  │
//!                  pair created (this side is DR)              reverse, failover ────┘
//!                                                              (from Primary)
//! ```
//!
//! A `Secondary` volume's export refuses writes: the peer's data is the only thing written
//! to it. A `Fenced` volume refuses them too: it was production, and the group moved (or is
//! moving) production elsewhere, or it restarted and the coordinator has not yet confirmed
//! that it still is production.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::replication::ids::PairId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum VolumeRole {
    /// In no pair: the application's writes go.
    Standalone,
    /// The production side of `pair`: writes go and are replicated.
    Primary { pair: PairId },
    /// The DR side of `pair`: the application's writes are refused.
    Secondary { pair: PairId },
    /// The production side of `pair` that may not take writes (rule 5): demoted by a
    /// failover, draining for a reverse, or not yet confirmed after a restart.
    Fenced { pair: PairId },
}

/// What a volume's role says to an application's write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteVerdict {
    Go,
    /// Refused before anything is written or marked dirty.
    Refuse,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a volume cannot go from {from} to {to}")]
pub struct IllegalTransition {
    pub from: VolumeRole,
    pub to: VolumeRole,
}

impl VolumeRole {
    pub fn name(&self) -> &'static str {
        match self {
            VolumeRole::Standalone => "standalone",
            VolumeRole::Primary { .. } => "production",
            VolumeRole::Secondary { .. } => "dr",
            VolumeRole::Fenced { .. } => "fenced",
        }
    }

    pub fn pair(&self) -> Option<PairId> {
        match self {
            VolumeRole::Standalone => None,
            VolumeRole::Primary { pair }
            | VolumeRole::Secondary { pair }
            | VolumeRole::Fenced { pair } => Some(*pair),
        }
    }

    pub fn write_verdict(&self) -> WriteVerdict {
        match self {
            VolumeRole::Standalone | VolumeRole::Primary { .. } => WriteVerdict::Go,
            VolumeRole::Secondary { .. } | VolumeRole::Fenced { .. } => WriteVerdict::Refuse,
        }
    }

    /// The role after moving to `to`, if that move is allowed: into a pair only from
    /// standalone (never straight into `Fenced`), out of a pair only to standalone, and
    /// between production, DR and fenced only within the same pair.
    pub fn transition(self, to: VolumeRole) -> Result<VolumeRole, IllegalTransition> {
        use VolumeRole::*;
        let allowed = match (self, to) {
            (Standalone, Primary { .. } | Secondary { .. }) => true,
            (Primary { .. } | Secondary { .. } | Fenced { .. }, Standalone) => true,
            (Primary { pair: a }, Secondary { pair: b } | Fenced { pair: b })
            | (Secondary { pair: a }, Primary { pair: b })
            | (Fenced { pair: a }, Primary { pair: b } | Secondary { pair: b }) => a == b,
            _ => false,
        };
        if allowed {
            Ok(to)
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }
}

impl fmt::Display for VolumeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pair() {
            Some(pair) => write!(f, "{} of pair {pair}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VolumeRole::*;

    #[test]
    fn only_the_allowed_moves_are_taken() {
        let p = PairId::random();
        let q = PairId::random();
        let roles = [
            Standalone,
            Primary { pair: p },
            Secondary { pair: p },
            Fenced { pair: p },
            Primary { pair: q },
            Secondary { pair: q },
            Fenced { pair: q },
        ];
        let allowed = |from: VolumeRole, to: VolumeRole| match (from, to) {
            (Standalone, Standalone) => false,
            (Standalone, Fenced { .. }) => false,
            (Standalone, _) | (_, Standalone) => true,
            (Secondary { .. }, Fenced { .. }) => false,
            (a, b) => a.pair() == b.pair() && a.name() != b.name(),
        };
        for from in roles {
            for to in roles {
                assert_eq!(
                    from.transition(to).is_ok(),
                    allowed(from, to),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn a_dr_volume_refuses_writes() {
        let p = PairId::random();
        assert_eq!(Secondary { pair: p }.write_verdict(), WriteVerdict::Refuse);
        assert_eq!(Fenced { pair: p }.write_verdict(), WriteVerdict::Refuse);
        assert_eq!(Primary { pair: p }.write_verdict(), WriteVerdict::Go);
        assert_eq!(Standalone.write_verdict(), WriteVerdict::Go);
    }
}
