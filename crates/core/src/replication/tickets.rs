//! Clear tickets: a dirty bit is cleared only for data the peer acknowledged, and only if
//! nothing wrote the block since that data was taken.
//!
//! Each write whose data goes to the peer, and each extent a resync reads, gets a ticket
//! for its range. A later write (or read) overlapping a ticket *spoils* it. When the peer
//! acknowledges a ticket, its range may be cleared only if it was not spoiled:
//!
//! ```text
//!   write A (ticket a) ─► sent ──────────────────────────► acked: a not spoiled ─► clear
//!   write A (ticket a) ─► sent ─► write B overlaps (a spoiled) ─► acked: keep dirty
//! ```
//!
//! Spoiling is conservative: a block stays dirty (and is resent later) rather than being
//! cleared while a newer write of it may not have reached the peer.

use std::collections::BTreeMap;

use crate::extent::ByteRange;

/// A claim to clear a range once the peer has its data.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket {
    start: u64,
    id: u64,
}

#[derive(Debug)]
struct Entry {
    end: u64,
    spoiled: bool,
}

/// What the peer's acknowledgement of a ticket allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redeemed {
    /// Nothing wrote the range since: clear it.
    Clear(ByteRange),
    /// Written again since: leave it dirty.
    Spoiled,
    /// Not a live ticket (already redeemed or forgotten).
    Unknown,
}

#[derive(Debug, Default)]
pub struct TicketRegistry {
    entries: BTreeMap<(u64, u64), Entry>,
    longest: u64,
    next_id: u64,
}

impl TicketRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Spoils the live tickets overlapping `range`: it was written (or read) again.
    pub fn spoil(&mut self, range: ByteRange) {
        if self.entries.is_empty() || range.is_empty() {
            return;
        }
        let from = range.offset.saturating_sub(self.longest.saturating_sub(1));
        for (&(start, _), entry) in self.entries.range_mut((from, 0)..(range.end(), 0)) {
            if entry.end > range.offset && entry.end > start {
                entry.spoiled = true;
            }
        }
    }

    /// A new ticket for `range`, spoiling the older ones it overlaps.
    pub fn issue(&mut self, range: ByteRange) -> Ticket {
        self.spoil(range);
        let ticket = Ticket {
            start: range.offset,
            id: self.next_id,
        };
        self.next_id += 1;
        self.longest = self.longest.max(range.len);
        self.entries.insert(
            (ticket.start, ticket.id),
            Entry {
                end: range.end(),
                spoiled: false,
            },
        );
        ticket
    }

    /// The peer acknowledged the ticket's data.
    pub fn redeem(&mut self, ticket: Ticket) -> Redeemed {
        match self.remove(ticket) {
            Some(entry) if !entry.spoiled => {
                Redeemed::Clear(ByteRange::new(ticket.start, entry.end - ticket.start))
            }
            Some(_) => Redeemed::Spoiled,
            None => Redeemed::Unknown,
        }
    }

    /// The ticket's data will not reach the peer (dropped from an overflowing journal, or
    /// the link went down): forget it, leaving its range dirty.
    pub fn forget(&mut self, ticket: Ticket) {
        self.remove(ticket);
    }

    /// The ranges of live tickets nothing wrote since, merged and in order.
    pub fn unspoiled_ranges(&self) -> Vec<ByteRange> {
        let mut out: Vec<ByteRange> = Vec::new();
        for (&(start, _), entry) in &self.entries {
            if entry.spoiled || entry.end == start {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end() >= start => {
                    let end = last.end().max(entry.end);
                    last.len = end - last.offset;
                }
                _ => out.push(ByteRange::new(start, entry.end - start)),
            }
        }
        out
    }

    /// Forgets every ticket.
    pub fn forget_all(&mut self) {
        self.entries.clear();
        self.longest = 0;
    }

    fn remove(&mut self, ticket: Ticket) -> Option<Entry> {
        let entry = self.entries.remove(&(ticket.start, ticket.id));
        if self.entries.is_empty() {
            self.longest = 0;
        }
        entry
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_write_after_the_data_was_taken_keeps_the_block_dirty() {
        let mut reg = TicketRegistry::new();
        let a = reg.issue(ByteRange::new(0, 8192));
        let b = reg.issue(ByteRange::new(4096, 4096)); // written again
        assert_eq!(reg.redeem(a), Redeemed::Spoiled);
        assert_eq!(reg.redeem(b), Redeemed::Clear(ByteRange::new(4096, 4096)));
        assert_eq!(reg.redeem(b), Redeemed::Unknown);
        let c = reg.issue(ByteRange::new(0, 4096));
        reg.spoil(ByteRange::new(100, 1));
        assert_eq!(reg.redeem(c), Redeemed::Spoiled);
        let d = reg.issue(ByteRange::new(0, 4096));
        reg.spoil(ByteRange::new(4096, 4096)); // adjacent, not overlapping
        assert_eq!(reg.redeem(d), Redeemed::Clear(ByteRange::new(0, 4096)));
    }

    proptest! {
        /// Against a model that remembers, per ticket, whether any later issue or spoil
        /// overlapped it.
        #[test]
        fn spoiled_exactly_when_overlapped_later(ops in proptest::collection::vec(
            (0u64..40, 1u64..8, 0u8..3), 1..80)) {
            let mut reg = TicketRegistry::new();
            let mut live: Vec<(Ticket, ByteRange, bool)> = Vec::new();
            for (offset, len, op) in ops {
                let range = ByteRange::new(offset, len);
                let overlaps = |r: ByteRange| r.offset < range.end() && range.offset < r.end();
                match op {
                    0 => {
                        for t in live.iter_mut() { if overlaps(t.1) { t.2 = true; } }
                        let ticket = reg.issue(range);
                        live.push((ticket, range, false));
                    }
                    1 => {
                        reg.spoil(range);
                        for t in live.iter_mut() { if overlaps(t.1) { t.2 = true; } }
                    }
                    _ => {
                        if live.is_empty() { continue; }
                        let (ticket, r, spoiled) = live.remove((offset as usize) % live.len());
                        let expected = if spoiled { Redeemed::Spoiled } else { Redeemed::Clear(r) };
                        prop_assert_eq!(reg.redeem(ticket), expected);
                    }
                }
                prop_assert_eq!(reg.len(), live.len());
            }
        }
    }
}
