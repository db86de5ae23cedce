//! Clear tickets: a dirty bit is cleared only for data the peer acknowledged, and only if
//! nothing wrote the block since that data was taken.
//!
//! Each write whose data goes to the peer, and each extent a resync reads, gets a ticket
//! for its range. A later write (or read) overlapping a ticket *spoils* the part it
//! overlaps. When the peer acknowledges a ticket, the part of its range nothing wrote since
//! may be cleared; the spoiled parts stay dirty:
//!
//! ```text
//!   write A (ticket a) ─► sent ──────────────────────────► acked: clear all of a
//!   extent E (ticket e) ─► sent ─► write B inside E ─► acked: clear E except B's blocks
//! ```
//!
//! Spoiling is conservative: a block stays dirty (and is resent later) rather than being
//! cleared while a newer write of it may not have reached the peer. (The dirty map clears
//! only blocks a range covers whole, so a spoiled part inside a block keeps the block.)

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
    /// Parts written since the data was taken, clipped to the ticket's range, in the order
    /// they were spoiled.
    spoiled: Vec<ByteRange>,
}

impl Entry {
    /// The ticket's range minus its spoiled parts, in order.
    fn clean_parts(&self, start: u64) -> Vec<ByteRange> {
        let mut spoiled = self.spoiled.clone();
        spoiled.sort_unstable();
        let mut out = Vec::new();
        let mut at = start;
        for s in spoiled {
            if s.offset > at {
                out.push(ByteRange::new(at, s.offset - at));
            }
            at = at.max(s.end());
        }
        if at < self.end {
            out.push(ByteRange::new(at, self.end - at));
        }
        out
    }
}

/// What the peer's acknowledgement of a ticket allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redeemed {
    /// Clear these parts: nothing wrote them since (all of the ticket's range, unless some
    /// of it was written again).
    Clear(Vec<ByteRange>),
    /// Written again since, all of it: leave it dirty.
    Spoiled,
    /// Not a live ticket (already redeemed or forgotten).
    Unknown,
}

#[derive(Debug, Default)]
pub struct TicketRegistry {
    entries: BTreeMap<(u64, u64), Entry>,
    /// How many live tickets have each length: a spoil looks back as far as the longest
    /// live one reaches, so one long resync extent, once redeemed, no longer makes every
    /// later 4 KiB write scan a megabyte's worth of tickets.
    lengths: BTreeMap<u64, u32>,
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

    /// Spoils the live tickets overlapping `range`: it was written (or read) again. A
    /// ticket `range` covers whole can clear nothing any more: it is dropped (redeeming it
    /// then clears nothing, as a spoiled one would), so a block written over and over holds
    /// one live ticket, not one per write, each listing all the writes after it.
    pub fn spoil(&mut self, range: ByteRange) {
        if self.entries.is_empty() || range.is_empty() {
            return;
        }
        let longest = self.lengths.last_key_value().map_or(0, |(&len, _)| len);
        let from = range.offset.saturating_sub(longest.saturating_sub(1));
        let mut covered = Vec::new();
        for (&(start, id), entry) in self.entries.range_mut((from, 0)..(range.end(), 0)) {
            if entry.end > range.offset && entry.end > start {
                if range.offset <= start && entry.end <= range.end() {
                    covered.push(Ticket { start, id });
                    continue;
                }
                let lo = start.max(range.offset);
                let hi = entry.end.min(range.end());
                let part = ByteRange::new(lo, hi - lo);
                if entry.spoiled.last() != Some(&part) {
                    entry.spoiled.push(part);
                }
            }
        }
        for ticket in covered {
            self.remove(ticket);
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
        *self.lengths.entry(range.len).or_insert(0) += 1;
        self.entries.insert(
            (ticket.start, ticket.id),
            Entry {
                end: range.end(),
                spoiled: Vec::new(),
            },
        );
        ticket
    }

    /// The peer acknowledged the ticket's data.
    pub fn redeem(&mut self, ticket: Ticket) -> Redeemed {
        match self.remove(ticket) {
            Some(entry) => {
                let clean = entry.clean_parts(ticket.start);
                if clean.is_empty() {
                    Redeemed::Spoiled
                } else {
                    Redeemed::Clear(clean)
                }
            }
            None => Redeemed::Unknown,
        }
    }

    /// The ticket's data will not reach the peer (dropped from an overflowing journal, or
    /// the link went down): forget it, leaving its range dirty.
    pub fn forget(&mut self, ticket: Ticket) {
        self.remove(ticket);
    }

    /// The parts of live tickets nothing wrote since, merged and in order.
    pub fn unspoiled_ranges(&self) -> Vec<ByteRange> {
        let mut parts: Vec<ByteRange> = self
            .entries
            .iter()
            .flat_map(|(&(start, _), entry)| entry.clean_parts(start))
            .collect();
        parts.sort_unstable();
        let mut out: Vec<ByteRange> = Vec::new();
        for part in parts {
            match out.last_mut() {
                Some(last) if last.end() >= part.offset => {
                    let end = last.end().max(part.end());
                    last.len = end - last.offset;
                }
                _ => out.push(part),
            }
        }
        out
    }

    /// Forgets every ticket.
    pub fn forget_all(&mut self) {
        self.entries.clear();
        self.lengths.clear();
    }

    fn remove(&mut self, ticket: Ticket) -> Option<Entry> {
        let entry = self.entries.remove(&(ticket.start, ticket.id))?;
        let len = entry.end - ticket.start;
        if let Some(n) = self.lengths.get_mut(&len) {
            *n -= 1;
            if *n == 0 {
                self.lengths.remove(&len);
            }
        }
        Some(entry)
    }

    /// How far back from a range's start a live ticket may begin and still overlap it.
    #[cfg(test)]
    fn reach(&self) -> u64 {
        self.lengths.last_key_value().map_or(0, |(&len, _)| len)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A hot block written many times before the peer has any of it: one live ticket, not
    /// one per write each listing the writes after it (memory and time quadratic in them).
    #[test]
    fn a_block_written_over_and_over_holds_one_ticket() {
        let mut reg = TicketRegistry::new();
        let block = ByteRange::new(8192, 4096);
        let tickets: Vec<Ticket> = (0..1000).map(|_| reg.issue(block)).collect();
        assert_eq!(reg.len(), 1, "the covered tickets are gone");
        assert_eq!(reg.redeem(tickets[0]), Redeemed::Unknown, "clears nothing");
        assert_eq!(reg.redeem(tickets[999]), Redeemed::Clear(vec![block]));
        let extent = reg.issue(ByteRange::new(0, 1 << 20));
        for _ in 0..1000 {
            reg.spoil(block);
        }
        assert_eq!(
            reg.redeem(extent),
            Redeemed::Clear(vec![
                ByteRange::new(0, 8192),
                ByteRange::new(12288, (1 << 20) - 12288)
            ])
        );
    }

    #[test]
    fn a_long_ticket_gone_no_longer_widens_the_search() {
        let mut reg = TicketRegistry::new();
        let extent = reg.issue(ByteRange::new(0, 4 << 20));
        let writes: Vec<Ticket> = (0..4)
            .map(|i| reg.issue(ByteRange::new((64 << 20) + i * 8192, 4096)))
            .collect();
        assert_eq!(reg.reach(), 4 << 20);
        let _ = reg.redeem(extent);
        assert_eq!(reg.reach(), 4096, "only 4 KiB tickets are left");
        for w in writes {
            reg.forget(w);
        }
        assert_eq!(reg.reach(), 0);
    }

    #[test]
    fn a_write_after_the_data_was_taken_keeps_its_part_dirty() {
        let mut reg = TicketRegistry::new();
        let a = reg.issue(ByteRange::new(0, 8192));
        let b = reg.issue(ByteRange::new(4096, 4096)); // written again
        assert_eq!(
            reg.redeem(a),
            Redeemed::Clear(vec![ByteRange::new(0, 4096)])
        );
        assert_eq!(
            reg.redeem(b),
            Redeemed::Clear(vec![ByteRange::new(4096, 4096)])
        );
        assert_eq!(reg.redeem(b), Redeemed::Unknown);
        let c = reg.issue(ByteRange::new(0, 4096));
        reg.spoil(ByteRange::new(0, 4096));
        assert_eq!(
            reg.redeem(c),
            Redeemed::Unknown,
            "covered whole: dropped, it clears nothing"
        );
        let e = reg.issue(ByteRange::new(0, 8192));
        reg.spoil(ByteRange::new(0, 4096));
        reg.spoil(ByteRange::new(4096, 4096));
        assert_eq!(reg.redeem(e), Redeemed::Spoiled, "spoiled in parts");
        let d = reg.issue(ByteRange::new(0, 4096));
        reg.spoil(ByteRange::new(4096, 4096)); // adjacent, not overlapping
        assert_eq!(
            reg.redeem(d),
            Redeemed::Clear(vec![ByteRange::new(0, 4096)])
        );
        let e = reg.issue(ByteRange::new(0, 1 << 20));
        reg.spoil(ByteRange::new(100, 1));
        reg.spoil(ByteRange::new(8192, 4096));
        assert_eq!(
            reg.redeem(e),
            Redeemed::Clear(vec![
                ByteRange::new(0, 100),
                ByteRange::new(101, 8091),
                ByteRange::new(12288, (1 << 20) - 12288)
            ])
        );
    }

    proptest! {
        /// Against a model that remembers, per ticket, each unit of its range written later:
        /// a redeemed ticket clears exactly the units nobody wrote since.
        #[test]
        fn clears_exactly_what_was_not_written_later(ops in proptest::collection::vec(
            (0u64..40, 1u64..8, 0u8..3), 1..80)) {
            use std::collections::BTreeSet;
            let mut reg = TicketRegistry::new();
            // (ticket, range, units written since it was issued)
            let mut live: Vec<(Ticket, ByteRange, BTreeSet<u64>)> = Vec::new();
            for (offset, len, op) in ops {
                let range = ByteRange::new(offset, len);
                let touch = |live: &mut Vec<(Ticket, ByteRange, BTreeSet<u64>)>| {
                    for t in live.iter_mut() {
                        for u in range.offset..range.end() {
                            if u >= t.1.offset && u < t.1.end() { t.2.insert(u); }
                        }
                    }
                };
                match op {
                    0 => {
                        touch(&mut live);
                        let ticket = reg.issue(range);
                        live.push((ticket, range, BTreeSet::new()));
                    }
                    1 => {
                        reg.spoil(range);
                        touch(&mut live);
                    }
                    _ => {
                        if live.is_empty() { continue; }
                        let (ticket, r, written) = live.remove((offset as usize) % live.len());
                        let clean: BTreeSet<u64> = (r.offset..r.end()).filter(|u| !written.contains(u)).collect();
                        let cleared: BTreeSet<u64> = match reg.redeem(ticket) {
                            Redeemed::Clear(parts) => parts.iter().flat_map(|p| p.offset..p.end()).collect(),
                            Redeemed::Spoiled => BTreeSet::new(),
                            // Dropped when a later range covered it whole.
                            Redeemed::Unknown => {
                                prop_assert!(clean.is_empty(), "a live ticket with clean units is known");
                                BTreeSet::new()
                            }
                        };
                        prop_assert_eq!(cleared, clean);
                    }
                }
                // Kept: every ticket not written since over all of its range (one that was
                // may have been dropped).
                let partly_clean = live
                    .iter()
                    .filter(|(_, r, written)| (r.offset..r.end()).any(|u| !written.contains(&u)))
                    .count();
                prop_assert!(reg.len() >= partly_clean && reg.len() <= live.len());
            }
        }
    }
}
