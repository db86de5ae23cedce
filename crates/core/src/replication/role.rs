//! A volume's role in replication, with the transitions allowed between roles.
//!
//! ```text
//!                  pair created (this side is production)
//!   Standalone ─────────────────────────────────────────► Primary
//!      │  ▲  ◄──────────────── pair deleted ────────────────  │ ▲
//!      │  │                                                   │ │ roles swap
//!      │  └──────────────────── pair deleted ─────────────┐   ▼ │ (reverse, failover)
//!      └────────────────────────────────────────────────► Secondary
//!                  pair created (this side is DR)
//! ```
//!
//! A `Secondary` volume's export refuses writes: the peer's data is the only thing written
//! to it.

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
        }
    }

    pub fn pair(&self) -> Option<PairId> {
        match self {
            VolumeRole::Standalone => None,
            VolumeRole::Primary { pair } | VolumeRole::Secondary { pair } => Some(*pair),
        }
    }

    pub fn write_verdict(&self) -> WriteVerdict {
        match self {
            VolumeRole::Standalone | VolumeRole::Primary { .. } => WriteVerdict::Go,
            VolumeRole::Secondary { .. } => WriteVerdict::Refuse,
        }
    }

    /// The role after moving to `to`, if that move is allowed: into a pair only from
    /// standalone, out of a pair only to standalone, and between production and DR only
    /// within the same pair.
    pub fn transition(self, to: VolumeRole) -> Result<VolumeRole, IllegalTransition> {
        use VolumeRole::*;
        let allowed = match (self, to) {
            (Standalone, Primary { .. } | Secondary { .. }) => true,
            (Primary { .. } | Secondary { .. }, Standalone) => true,
            (Primary { pair: a }, Secondary { pair: b })
            | (Secondary { pair: a }, Primary { pair: b }) => a == b,
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
            Primary { pair: q },
            Secondary { pair: q },
        ];
        let allowed = |from: VolumeRole, to: VolumeRole| match (from, to) {
            (Standalone, Standalone) => false,
            (Standalone, _) | (_, Standalone) => true,
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
        assert_eq!(Primary { pair: p }.write_verdict(), WriteVerdict::Go);
        assert_eq!(Standalone.write_verdict(), WriteVerdict::Go);
    }
}
