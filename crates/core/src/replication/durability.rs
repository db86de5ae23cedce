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
//!  sync S2 starts    ─► S2 covers {c}               (while S1 is in flight)
//!  S1 returns        ─► acknowledge a, b
//!  S2 returns        ─► acknowledge c
//! ```
//!
//! A sync covers every write that completed before it began, so when one returns,
//! everything the syncs begun before it covered is durable too, whatever order they return
//! in. Up to [`MAX_SYNCS`] are in flight: a write that completes while one is running does
//! not wait for it to return before its own sync begins, so each write waits about one
//! sync, and the number of syncs is bounded by the device's sync rate, not the write rate.
//!
//! The barrier does no I/O: the applier tells it what completed and when its syncs start
//! and return, and sends the acknowledgements it gives.

use std::collections::VecDeque;

/// The most syncs in flight at once.
pub const MAX_SYNCS: usize = 4;

/// A sync begun: what it covers is given back when it returns.
#[must_use = "the sync's acknowledgements are given back when it returns"]
#[derive(Debug, PartialEq, Eq)]
pub struct SyncTicket {
    id: u64,
}

/// Acknowledgements waiting for a sync of the DR volume.
#[derive(Debug)]
pub struct AckBarrier<A> {
    /// Per sync in flight, oldest first: what completed before it began (and after the one
    /// before it began).
    covered: VecDeque<(u64, Vec<A>)>,
    /// Completed since the last sync began: waiting for the next.
    waiting: Vec<A>,
    next_id: u64,
}

impl<A> Default for AckBarrier<A> {
    fn default() -> Self {
        Self {
            covered: VecDeque::new(),
            waiting: Vec::new(),
            next_id: 0,
        }
    }
}

impl<A> AckBarrier<A> {
    /// A write completed on the DR volume (not yet durable): `ack` waits for a sync.
    pub fn completed(&mut self, ack: A) {
        self.waiting.push(ack);
    }

    /// Whether a sync should start now: something waits, and fewer than [`MAX_SYNCS`] are
    /// in flight.
    pub fn wants_sync(&self) -> bool {
        !self.waiting.is_empty() && self.covered.len() < MAX_SYNCS
    }

    /// A sync of the volume is about to be issued: it covers everything completed so far.
    pub fn start_sync(&mut self) -> SyncTicket {
        let id = self.next_id;
        self.next_id += 1;
        self.covered
            .push_back((id, std::mem::take(&mut self.waiting)));
        SyncTicket { id }
    }

    /// The sync of `ticket` returned successfully: the acknowledgements it covers, and those
    /// of every sync begun before it (still in flight or not), to send now.
    pub fn synced(&mut self, ticket: SyncTicket) -> Vec<A> {
        let mut durable = Vec::new();
        while let Some((id, _)) = self.covered.front() {
            if *id > ticket.id {
                break;
            }
            let (_, acks) = self.covered.pop_front().expect("looked at the front");
            durable.extend(acks);
        }
        durable
    }

    /// A sync that covers everything completed so far was done outside the barrier (a
    /// flush, a unit's apply, a blocking slow path followed by a sync): everything waiting,
    /// and everything the syncs in flight cover, is durable. Returns it, to acknowledge.
    pub fn synced_outside(&mut self) -> Vec<A> {
        let mut durable: Vec<A> = Vec::new();
        for (_, acks) in &mut self.covered {
            durable.append(acks);
        }
        durable.append(&mut self.waiting);
        durable
    }

    /// Acknowledgements held, waiting or covered by a sync in flight.
    pub fn held(&self) -> usize {
        self.covered.iter().map(|(_, a)| a.len()).sum::<usize>() + self.waiting.len()
    }

    /// Syncs in flight.
    pub fn syncing(&self) -> usize {
        self.covered.len()
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
        assert_eq!(barrier.held(), 3);
        assert_eq!(barrier.synced(s1), vec![1, 2]);
        assert!(barrier.wants_sync());
        let s2 = barrier.start_sync();
        assert_eq!(barrier.synced(s2), vec![3]);
        assert_eq!(barrier.held(), 0);
    }

    #[test]
    fn a_later_sync_returning_first_makes_what_earlier_ones_cover_durable() {
        let mut barrier = AckBarrier::default();
        barrier.completed(1);
        let s1 = barrier.start_sync();
        barrier.completed(2);
        let s2 = barrier.start_sync();
        barrier.completed(3);
        let s3 = barrier.start_sync();
        assert_eq!(barrier.syncing(), 3);
        assert_eq!(barrier.synced(s2), vec![1, 2]);
        assert_eq!(barrier.synced(s1), Vec::<i32>::new(), "already given");
        assert_eq!(barrier.synced(s3), vec![3]);
        assert_eq!(barrier.syncing(), 0);
    }

    #[test]
    fn no_more_than_max_syncs_are_in_flight() {
        let mut barrier = AckBarrier::default();
        let mut tickets = Vec::new();
        for i in 0..MAX_SYNCS {
            barrier.completed(i);
            assert!(barrier.wants_sync());
            tickets.push(barrier.start_sync());
        }
        barrier.completed(99);
        assert!(!barrier.wants_sync());
        let first = tickets.remove(0);
        assert_eq!(barrier.synced(first), vec![0]);
        assert!(barrier.wants_sync());
    }

    #[test]
    fn a_sync_outside_releases_everything_completed_before_it() {
        let mut barrier = AckBarrier::default();
        barrier.completed(1);
        let s = barrier.start_sync();
        barrier.completed(2);
        assert_eq!(barrier.synced_outside(), vec![1, 2]);
        assert_eq!(barrier.synced(s), Vec::<i32>::new());
    }
}
