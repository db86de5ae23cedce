//! Why a session of a production pair ended.

use crate::endpoint::CallError;
use crate::framed::StreamError;
use blockrep_core::pair::state::{IllegalTransition, PairState};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error("peer unreachable: {0}")]
    Unreachable(#[from] CallError),
    #[error("link lost: {0}")]
    Stream(#[from] StreamError),
    #[error("peer refused: {0}")]
    Refused(String),
    /// The two sides' data diverged: nothing moves until the operator resolves it.
    #[error("{0}")]
    Diverged(String),
    #[error("peer silent: the DR agent answered nothing for {0:?}")]
    Silent(Duration),
    /// A synchronous pair of a group leaves synchronous replication as when its link
    /// breaks, so that its group trips.
    #[error("{0}: the stream ends so that the group trips, then catches up")]
    Trip(&'static str),
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
    #[error("resync failed: {0}")]
    Resync(String),
    /// Something on this host failed (not the peer, not the link).
    #[error("{0}")]
    Local(String),
    /// The pair left the session's states (paused, demoted, stopped) while it ran.
    #[error("{0}")]
    Left(#[from] IllegalTransition),
    #[error("the pair is {0}")]
    Ended(PairState),
}
