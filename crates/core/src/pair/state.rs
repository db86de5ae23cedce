//! Where the production side of a pair is in its life: one [`PairState`], changed only
//! through [`PairState::become_`], which refuses every change the table below does not
//! list (docs/PAIR-MACHINE.md, "The pair's state").
//!
//! | state | stream | live writes |
//! |---|---|---|
//! | `Unconfirmed` | none: the agent restarted, the coordinator has not yet said this side is still production | refused by the gate |
//! | `Paused` | none: the operator's `group stop`, or a failover | tracked in the bitmap |
//! | `Connecting` | being opened, or waiting to be opened again | tracked in the bitmap |
//! | `Resyncing` | up: an initial sync or a catch-up copies what the DR side lacks | sent, or tracked while a catch-up copies |
//! | `Live` | up, nothing to copy | sent (direct or journaled) |
//! | `Diverged` | none: the sides hold different data, the operator resolves | tracked in the bitmap |
//! | `Demoted` | none: the group failed over, this side is production no more | refused by the gate |
//! | `Stopped` | none: the pair was removed or the agent stops | not the pair's any more |

use std::fmt;

/// Where the production side of a pair is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PairState {
    Unconfirmed,
    Paused,
    Connecting,
    Resyncing,
    Live,
    Diverged,
    Demoted,
    Stopped,
}

/// A change of state the table does not allow: a bug in the caller, or an event that came
/// too late (a stream accepted after the pair was paused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the pair cannot go from {from} to {to} ({event})")]
pub struct IllegalTransition {
    pub from: PairState,
    pub to: PairState,
    pub event: &'static str,
}

impl PairState {
    /// Whether a stream to the DR side is up in this state.
    pub fn streaming(self) -> bool {
        matches!(self, PairState::Resyncing | PairState::Live)
    }

    /// Whether the pair's session task runs in this state (connecting or streaming).
    pub fn in_session(self) -> bool {
        matches!(self, PairState::Connecting) || self.streaming()
    }

    /// Whether the pair can go from `self` to `to`. Staying where it is always allowed.
    pub fn can_become(self, to: PairState) -> bool {
        use PairState::*;
        if self == to {
            return true;
        }
        match (self, to) {
            // Nothing comes back from Stopped; anything may stop.
            (Stopped, _) => false,
            (_, Stopped) => true,
            // A demoted side waits to be removed (reprotect makes a new pair).
            (Demoted, _) => false,
            (_, Demoted) => true,
            (Unconfirmed, Paused | Connecting) => true,
            (Paused, Connecting) => true,
            (Connecting | Resyncing | Live | Diverged, Paused) => true,
            (Connecting, Resyncing | Live | Diverged) => true,
            (Resyncing, Live | Connecting) => true,
            (Live, Resyncing | Connecting) => true,
            (Diverged, Connecting) => true,
            _ => false,
        }
    }

    /// Moves to `to` if the table allows it; `event` names what asked, for the error.
    pub fn become_(&mut self, to: PairState, event: &'static str) -> Result<(), IllegalTransition> {
        if !self.can_become(to) {
            return Err(IllegalTransition {
                from: *self,
                to,
                event,
            });
        }
        *self = to;
        Ok(())
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PairState::Unconfirmed => "unconfirmed",
            PairState::Paused => "paused",
            PairState::Connecting => "connecting",
            PairState::Resyncing => "resyncing",
            PairState::Live => "live",
            PairState::Diverged => "diverged",
            PairState::Demoted => "demoted",
            PairState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for PairState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::PairState::{self, *};

    const ALL: [PairState; 8] = [
        Unconfirmed,
        Paused,
        Connecting,
        Resyncing,
        Live,
        Diverged,
        Demoted,
        Stopped,
    ];

    #[test]
    fn stopped_is_final_and_demoted_only_stops() {
        for to in ALL {
            assert_eq!(Stopped.can_become(to), to == Stopped, "stopped -> {to}");
            assert_eq!(
                Demoted.can_become(to),
                matches!(to, Demoted | Stopped),
                "demoted -> {to}"
            );
        }
    }

    #[test]
    fn a_stream_comes_up_only_from_connecting_and_live_only_through_a_stream() {
        for from in ALL {
            for to in [Resyncing, Live] {
                let allowed = from.can_become(to);
                let expected = from == to || from == Connecting || from.streaming();
                assert_eq!(allowed, expected, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn an_unconfirmed_side_replicates_only_once_confirmed() {
        assert!(!Unconfirmed.can_become(Resyncing));
        assert!(!Unconfirmed.can_become(Live));
        assert!(!Unconfirmed.can_become(Diverged));
        assert!(Unconfirmed.can_become(Connecting));
        assert!(Unconfirmed.can_become(Paused));
    }

    #[test]
    fn a_refused_change_leaves_the_state_and_names_the_event() {
        let mut state = Paused;
        let err = state.become_(Live, "go live").unwrap_err();
        assert_eq!(state, Paused);
        assert_eq!(
            err.to_string(),
            "the pair cannot go from paused to live (go live)"
        );
    }
}
