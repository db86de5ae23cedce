//! Exclusive byte-range locks: the order in which overlapping writes reach a volume.
//!
//! Every write-like command on a volume (a write, zeroing, discard, and the read-modify-write
//! of an unaligned write) holds the blocks it touches from the moment it is admitted until it
//! is answered, whichever connection it came from. Two overlapping writes therefore never run
//! at once: one is applied whole, then the other. That keeps a read-modify-write from writing
//! stale bytes back over a newer aligned write, and gives every block one order of writes,
//! the order replication sends them in.
//!
//! Waiting is first come, first served among overlapping requests: a request that must wait
//! blocks later requests that overlap it, so a stream of small writes cannot starve a large
//! one. The table does no waiting itself. [`RangeLocks::acquire`] says whether the lock is
//! held or queued, and [`RangeLocks::release`] hands back the waiters it granted, each with
//! the token its owner gave, so the caller can wake them.
//!
//! ```text
//!   acquire ──► Held ─────────────────────────────► release ──► waiters granted
//!      │
//!      └─────► Queued ──(an overlapping lock is released)──► Held
//! ```

use std::collections::BTreeMap;
use std::fmt;

use crate::extent::ByteRange;

/// One lock, held or queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockId {
    start: u64,
    seq: u64,
}

impl fmt::Display for LockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lock {}@{}", self.seq, self.start)
    }
}

/// What [`RangeLocks::acquire`] did.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// The range is held: go ahead.
    Held(LockId),
    /// An overlapping lock is held or queued first; this one is granted when those go.
    Queued(LockId),
}

impl Acquired {
    pub fn id(self) -> LockId {
        match self {
            Acquired::Held(id) | Acquired::Queued(id) => id,
        }
    }
}

#[derive(Debug)]
enum State<W> {
    Held,
    Queued(W),
}

#[derive(Debug)]
struct Entry<W> {
    end: u64,
    state: State<W>,
}

/// The lock table of one volume. `W` is the token that wakes a waiter's owner.
#[derive(Debug)]
pub struct RangeLocks<W> {
    /// By start offset, then arrival order.
    entries: BTreeMap<(u64, u64), Entry<W>>,
    /// The longest range in the table since it was last empty: overlap queries look this
    /// far back.
    longest: u64,
    next_seq: u64,
    queued: usize,
}

impl<W> Default for RangeLocks<W> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            longest: 0,
            next_seq: 0,
            queued: 0,
        }
    }
}

impl<W> RangeLocks<W> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks in the table, held or queued.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Locks waiting for an overlapping one.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Takes `range` if nothing overlapping is held or queued; otherwise queues behind
    /// them, to be granted (and `waiter` handed back by [`RangeLocks::release`]) later.
    /// An empty range is always held at once.
    pub fn acquire(&mut self, range: ByteRange, waiter: W) -> Acquired {
        let id = LockId {
            start: range.offset,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        let blocked = !range.is_empty() && self.overlapping(range).next().is_some();
        self.longest = self.longest.max(range.len);
        let state = if blocked {
            self.queued += 1;
            State::Queued(waiter)
        } else {
            State::Held
        };
        self.entries.insert(
            (id.start, id.seq),
            Entry {
                end: range.end(),
                state,
            },
        );
        if blocked {
            Acquired::Queued(id)
        } else {
            Acquired::Held(id)
        }
    }

    /// Whether `id` is held now (it may have been granted since it was queued).
    pub fn is_held(&self, id: LockId) -> bool {
        matches!(
            self.entries.get(&(id.start, id.seq)),
            Some(Entry {
                state: State::Held,
                ..
            })
        )
    }

    /// Drops a lock, held or queued, and grants every queued lock that no longer overlaps
    /// one held or queued before it. Returns the granted locks' waiters.
    pub fn release(&mut self, id: LockId) -> Vec<W> {
        let Some(entry) = self.entries.remove(&(id.start, id.seq)) else {
            return Vec::new();
        };
        if matches!(entry.state, State::Queued(_)) {
            self.queued -= 1;
        }
        if self.entries.is_empty() {
            self.longest = 0;
            return Vec::new();
        }
        if self.queued == 0 || entry.end == id.start {
            return Vec::new();
        }
        let released = ByteRange::new(id.start, entry.end - id.start);
        // Only a lock that overlapped the released one can have been waiting for it.
        let mut candidates: Vec<(u64, u64)> = self
            .overlapping(released)
            .filter(|(_, e)| matches!(e.state, State::Queued(_)))
            .map(|(key, _)| key)
            .collect();
        candidates.sort_unstable_by_key(|&(_, seq)| seq);
        let mut granted = Vec::new();
        for key in candidates {
            let range = ByteRange::new(key.0, self.entries[&key].end - key.0);
            let blocked = self.overlapping(range).any(|(other, e)| {
                other != key && (matches!(e.state, State::Held) || other.1 < key.1)
            });
            if blocked {
                continue;
            }
            let entry = self
                .entries
                .get_mut(&key)
                .expect("candidate is in the table");
            if let State::Queued(waiter) = std::mem::replace(&mut entry.state, State::Held) {
                self.queued -= 1;
                granted.push(waiter);
            }
        }
        granted
    }

    /// Entries overlapping `range` (non-empty entries only: an empty lock blocks nothing).
    fn overlapping(&self, range: ByteRange) -> impl Iterator<Item = ((u64, u64), &Entry<W>)> {
        let from = range.offset.saturating_sub(self.longest.saturating_sub(1));
        self.entries
            .range((from, 0)..(range.end(), 0))
            .filter(move |&(&(start, _), e)| e.end > range.offset && e.end > start)
            .map(|(&key, e)| (key, e))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn r(offset: u64, len: u64) -> ByteRange {
        ByteRange::new(offset, len)
    }

    #[test]
    fn disjoint_ranges_are_held_at_once_and_overlapping_ones_queue() {
        let mut locks = RangeLocks::new();
        let a = locks.acquire(r(0, 4096), 'a');
        let b = locks.acquire(r(4096, 4096), 'b');
        assert!(matches!((a, b), (Acquired::Held(_), Acquired::Held(_))));
        let c = locks.acquire(r(0, 8192), 'c');
        assert!(matches!(c, Acquired::Queued(_)));
        assert_eq!(
            locks.release(a.id()),
            Vec::<char>::new(),
            "b still overlaps c"
        );
        assert!(!locks.is_held(c.id()));
        assert_eq!(locks.release(b.id()), vec!['c']);
        assert!(locks.is_held(c.id()));
    }

    #[test]
    fn a_queued_lock_blocks_later_overlapping_requests() {
        let mut locks = RangeLocks::new();
        let small = locks.acquire(r(0, 512), 1);
        let big = locks.acquire(r(0, 1 << 20), 2);
        assert!(matches!(big, Acquired::Queued(_)));
        // A later small write into the big one's range waits behind it, not only behind `small`.
        let later = locks.acquire(r(8192, 512), 3);
        assert!(matches!(later, Acquired::Queued(_)));
        assert_eq!(locks.release(small.id()), vec![2]);
        assert_eq!(locks.release(big.id()), vec![3]);
    }

    #[test]
    fn an_empty_range_is_held_and_blocks_nothing() {
        let mut locks = RangeLocks::new();
        let e = locks.acquire(r(100, 0), ());
        assert!(matches!(e, Acquired::Held(_)));
        assert!(matches!(locks.acquire(r(0, 4096), ()), Acquired::Held(_)));
        assert!(locks.release(e.id()).is_empty());
    }

    #[test]
    fn releasing_a_queued_lock_lets_those_behind_it_go() {
        let mut locks = RangeLocks::new();
        let a = locks.acquire(r(0, 4096), 'a');
        let b = locks.acquire(r(0, 8192), 'b'); // queued behind a
        let c = locks.acquire(r(4096, 4096), 'c'); // queued behind b only
        assert!(matches!(c, Acquired::Queued(_)));
        assert_eq!(locks.release(b.id()), vec!['c']);
        assert!(locks.is_held(c.id()) && locks.is_held(a.id()));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Acquire(u64, u64),
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..64, 0u64..12).prop_map(|(o, l)| Op::Acquire(o, l)),
            (0usize..64).prop_map(Op::Release),
        ]
    }

    proptest! {
        /// Against a model: held locks never overlap; a lock is queued exactly when it
        /// overlaps one held or queued before it; every release wakes exactly the locks that
        /// became held; overlapping locks are granted in arrival order.
        #[test]
        fn matches_a_first_come_first_served_model(ops in proptest::collection::vec(op(), 1..120)) {
            let mut locks = RangeLocks::new();
            // (seq, range, id, held)
            let mut model: Vec<(u64, ByteRange, LockId, bool)> = Vec::new();
            let mut seq = 0u64;
            let overlaps = |a: ByteRange, b: ByteRange| {
                !a.is_empty() && !b.is_empty() && a.offset < b.end() && b.offset < a.end()
            };
            for op in ops {
                match op {
                    Op::Acquire(o, l) => {
                        let range = r(o, l);
                        let blocked = model.iter().any(|(_, other, _, _)| overlaps(range, *other));
                        let got = locks.acquire(range, seq);
                        prop_assert_eq!(matches!(got, Acquired::Queued(_)), blocked);
                        model.push((seq, range, got.id(), !blocked));
                        seq += 1;
                    }
                    Op::Release(i) => {
                        if model.is_empty() { continue; }
                        let (_, _, id, _) = model.remove(i % model.len());
                        let mut woken = locks.release(id);
                        // Model: grant queued locks in order when nothing earlier overlaps.
                        let mut expected = Vec::new();
                        for k in 0..model.len() {
                            if model[k].3 { continue; }
                            let blocked = model[..k].iter().any(|m| overlaps(m.1, model[k].1))
                                || model[k + 1..].iter().any(|m| m.3 && overlaps(m.1, model[k].1));
                            if !blocked {
                                model[k].3 = true;
                                expected.push(model[k].0);
                            }
                        }
                        woken.sort_unstable();
                        prop_assert_eq!(&woken, &expected);
                    }
                }
                for (i, a) in model.iter().enumerate() {
                    prop_assert_eq!(locks.is_held(a.2), a.3);
                    for b in &model[i + 1..] {
                        prop_assert!(!(a.3 && b.3 && overlaps(a.1, b.1)), "held locks overlap");
                    }
                }
                prop_assert_eq!(locks.len(), model.len());
            }
        }
    }
}
