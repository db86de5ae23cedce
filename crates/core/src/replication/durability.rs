//! The DR side's durability barrier: a write is acknowledged to the production side only
//! once a sync of the DR volume that began after the write completed has returned.
//!
//! An acknowledgement clears the production side's dirty bits (and answers a hypermetro
//! write), so it must mean *durable*, not *written*: a DR host that loses power drops what
//! its device cache and page cache held, and a bit cleared for data that is gone is a write
//! lost for good (rules 1 and 2). Syncing after every write would cost one device flush per
//! write; instead the syncs are group-committed:
//!
//! ```text
//!  write a completes ─► waiting {a}
//!  write b completes ─► waiting {a, b}
//!  sync S1 starts    ─► S1 covers {a, b}; waiting {}
//!  write c completes ─► waiting {c}                 (S1 began before c completed)
//!  S1 returns        ─► acknowledge a, b
//!  sync S2 starts    ─► S2 covers {c} ...
//! ```
//!
//! At most one sync is in flight; writes that complete meanwhile wait for the next, so the
//! number of syncs is bounded by the device's sync rate, not by the write rate, and each
//! write waits at most for the sync in flight plus one more.
//!
//! The barrier does no I/O: the applier tells it what completed and when its syncs start
//! and return, and sends the acknowledgements it gives.

/// What a sync covers: the acknowledgements it releases when it returns.
#[must_use = "the sync's acknowledgements are given back when it returns"]
#[derive(Debug, PartialEq, Eq)]
pub struct SyncTicket {
    covers: usize,
}

/// Acknowledgements waiting for a sync of the DR volume.
#[derive(Debug)]
pub struct AckBarrier<A> {
    /// Completed before the sync in flight began: released when it returns, in order.
    covered: Vec<A>,
    /// Completed since: waiting for the next sync.
    waiting: Vec<A>,
    syncing: bool,
}

impl<A> Default for AckBarrier<A> {
    fn default() -> Self {
        Self {
            covered: Vec::new(),
            waiting: Vec::new(),
            syncing: false,
        }
    }
}

impl<A> AckBarrier<A> {
    /// A write completed on the DR volume (not yet durable): `ack` waits for a sync.
    pub fn completed(&mut self, ack: A) {
        self.waiting.push(ack);
    }

    /// Whether a sync should start now: something waits and no sync is in flight.
    pub fn wants_sync(&self) -> bool {
        !self.syncing && !self.waiting.is_empty()
    }

    /// A sync of the volume is about to be issued: it covers everything completed so far.
    /// Panics if one is in flight already (the caller asks [`AckBarrier::wants_sync`]).
    pub fn start_sync(&mut self) -> SyncTicket {
        assert!(!self.syncing, "one sync at a time");
        self.syncing = true;
        self.covered = std::mem::take(&mut self.waiting);
        SyncTicket {
            covers: self.covered.len(),
        }
    }

    /// The sync returned successfully: the acknowledgements it covers, to send now.
    pub fn synced(&mut self, ticket: SyncTicket) -> Vec<A> {
        assert!(self.syncing, "a sync was started");
        debug_assert_eq!(ticket.covers, self.covered.len());
        self.syncing = false;
        std::mem::take(&mut self.covered)
    }

    /// A sync that covers everything completed so far was done outside the barrier (a
    /// flush, a unit's apply, a blocking slow path followed by a sync): everything waiting
    /// is durable. Returns it, to acknowledge; a sync still in flight keeps its own.
    pub fn synced_outside(&mut self) -> Vec<A> {
        std::mem::take(&mut self.waiting)
    }

    /// Acknowledgements held, waiting or covered by the sync in flight.
    pub fn held(&self) -> usize {
        self.covered.len() + self.waiting.len()
    }

    /// Whether a sync is in flight.
    pub fn syncing(&self) -> bool {
        self.syncing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_acknowledges_only_what_completed_before_it_began() {
        let mut barrier = AckBarrier::default();
        assert!(!barrier.wants_sync());
        barrier.completed(1);
        barrier.completed(2);
        assert!(barrier.wants_sync());
        let s1 = barrier.start_sync();
        barrier.completed(3);
        assert!(!barrier.wants_sync(), "one sync at a time");
        assert_eq!(barrier.held(), 3);
        assert_eq!(barrier.synced(s1), vec![1, 2]);
        assert!(barrier.wants_sync());
        let s2 = barrier.start_sync();
        assert_eq!(barrier.synced(s2), vec![3]);
        assert_eq!(barrier.held(), 0);
    }

    #[test]
    fn a_sync_outside_releases_what_waits_but_not_what_the_sync_in_flight_covers() {
        let mut barrier = AckBarrier::default();
        barrier.completed(1);
        let s = barrier.start_sync();
        barrier.completed(2);
        assert_eq!(barrier.synced_outside(), vec![2]);
        assert_eq!(barrier.synced(s), vec![1]);
    }
}
