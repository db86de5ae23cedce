//! A seeded, deterministic simulation of an async pair built from the core's pieces: the
//! journal (epochs, bound, bitmap mode, catch-up), clear tickets and the dirty map, with
//! writes that overlap and complete out of order, epochs cut at random, an ordered stream
//! whose frames and acknowledgements arrive late, and a link that breaks and heals.
//!
//! Checked at every step:
//! - the DR image, after every unit it applies, is exactly production's image at the end of
//!   that unit's epoch (rule 3: a crash-consistent past image);
//! - a block clean in production's bitmap holds the same data on the DR side (no
//!   acknowledged write is lost track of: rules 1 and 2);
//! - the journal never holds more than its bound (rule 6).
//!
//! Writes pause a quarter of the time, so catch-ups end under load too, some cut at once and
//! some by a later cut (a pair of a consistency group). And at the end, once writes stop and
//! the link is up, the pair converges: nothing dirty, identical images. `BLOCKREP_SEED=n` replays one seed; `BLOCKREP_SIM_SEEDS` sets how many.

use std::collections::VecDeque;

use blockrep_core::ByteRange;
use blockrep_core::dirty_map::{DirtyMap, Granularity};
use blockrep_core::replication::{
    Admitted, Completed, Epoch, Journal, Outgoing, Payload, PayloadLen, Redeemed, Ticket,
    TicketRegistry,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 48;

/// A write's data: the value every block it covers takes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Value(Vec<u64>);

impl PayloadLen for Value {
    fn payload_len(&self) -> u64 {
        self.0.len() as u64 * BLOCK
    }
}

fn blocks(range: ByteRange) -> std::ops::Range<u64> {
    range.offset / BLOCK..range.end() / BLOCK
}

#[derive(Debug)]
struct InFlight {
    range: ByteRange,
    value: u64,
    admitted: Admitted,
    ticket: Option<Ticket>,
}

/// What the DR side holds.
struct Dr {
    image: Vec<u64>,
    /// Staged writes: (epoch, range, value per block), in stream order.
    staged: Vec<(Epoch, ByteRange, Vec<u64>)>,
    applied: Epoch,
}

struct Sim {
    rng: SmallRng,
    prod: Vec<u64>,
    dirty: DirtyMap,
    tickets: TicketRegistry,
    journal: Journal<Value>,
    inflight: Vec<InFlight>,
    /// Every completed write, in completion order: (epoch, range, value).
    history: Vec<(Epoch, ByteRange, u64)>,
    next_value: u64,
    /// Frames on the stream, in order, not yet processed by the DR side.
    wire: VecDeque<Outgoing<Value>>,
    /// Acknowledgements on their way back: staged epochs.
    acks: VecDeque<Epoch>,
    link_up: bool,
    dr: Dr,
    /// The catch-up reader: runs still to send in this pass, and whether this is the last.
    catch_up: Option<(VecDeque<ByteRange>, bool)>,
    steps: u64,
}

impl Sim {
    fn new(seed: u64, limit: u64) -> Self {
        let mut journal = Journal::new(limit, Epoch(0));
        journal.start_journaling();
        Self {
            rng: SmallRng::seed_from_u64(seed),
            prod: vec![0; BLOCKS as usize],
            dirty: DirtyMap::new(BLOCKS * BLOCK, Granularity::DEFAULT),
            tickets: TicketRegistry::new(),
            journal,
            inflight: Vec::new(),
            history: Vec::new(),
            next_value: 1,
            wire: VecDeque::new(),
            acks: VecDeque::new(),
            link_up: true,
            dr: Dr {
                image: vec![0; BLOCKS as usize],
                staged: Vec::new(),
                applied: Epoch(0),
            },
            catch_up: None,
            steps: 0,
        }
    }

    fn redeem(&mut self, tickets: Vec<Ticket>) {
        for t in tickets {
            if let Redeemed::Clear(parts) = self.tickets.redeem(t) {
                for p in parts {
                    self.dirty.clear_range(p);
                }
            }
        }
    }

    fn forget(&mut self, tickets: Vec<Ticket>) {
        for t in tickets {
            self.tickets.forget(t);
        }
    }

    /// A new write, unless it overlaps one in flight (the range locks serialise those).
    fn admit_write(&mut self) {
        let start = self.rng.random_range(0..BLOCKS);
        let len = self.rng.random_range(1..=4u64.min(BLOCKS - start));
        let range = ByteRange::new(start * BLOCK, len * BLOCK);
        if self
            .inflight
            .iter()
            .any(|w| w.range.offset < range.end() && range.offset < w.range.end())
        {
            return;
        }
        let admitted = self.journal.admit();
        self.dirty.set_range(range);
        self.tickets.spoil(range);
        let ticket = admitted.journaled.then(|| self.tickets.issue(range));
        let value = self.next_value;
        self.next_value += 1;
        self.inflight.push(InFlight {
            range,
            value,
            admitted,
            ticket,
        });
    }

    /// One write in flight completes locally (any of them: completions come in any order).
    fn complete_write(&mut self) {
        if self.inflight.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.inflight.len());
        let w = self.inflight.swap_remove(i);
        for b in blocks(w.range) {
            self.prod[b as usize] = w.value;
        }
        self.history.push((w.admitted.epoch, w.range, w.value));
        let payload = Payload::Data(Value(vec![w.value; blocks(w.range).count()]));
        match self
            .journal
            .complete(w.admitted, w.range, payload, w.ticket)
        {
            Completed::Queued => {}
            Completed::NotJournaled => self.forget(w.ticket.into_iter().collect()),
            Completed::Overflowed { forget } => self.forget(forget),
        }
    }

    /// The sender puts frames on the stream.
    fn send(&mut self) {
        for _ in 0..self.rng.random_range(1..6) {
            let Some(frame) = self.journal.poll_send() else {
                return;
            };
            if self.link_up {
                self.wire.push_back(frame);
            }
        }
    }

    /// The DR side takes the next frame.
    fn deliver(&mut self) {
        let Some(frame) = self.wire.pop_front() else {
            return;
        };
        match frame {
            Outgoing::Write {
                epoch,
                range,
                payload,
                direct,
                ..
            } => {
                assert!(!direct, "the async simulation sends no direct writes");
                let values = match payload {
                    Payload::Data(v) => v.0,
                    Payload::Zeroes => vec![0; blocks(range).count()],
                };
                self.dr.staged.push((epoch, range, values));
            }
            Outgoing::Seal { epoch } => {
                let (unit, rest): (Vec<_>, Vec<_>) =
                    self.dr.staged.drain(..).partition(|(e, _, _)| *e <= epoch);
                self.dr.staged = rest;
                for (_, range, values) in unit {
                    for (b, v) in blocks(range).zip(values) {
                        self.dr.image[b as usize] = v;
                    }
                }
                self.dr.applied = epoch;
                self.check_consistent(epoch);
                self.acks.push_back(epoch);
            }
            Outgoing::Discard { after } => self.dr.staged.retain(|(e, _, _)| *e <= after),
            Outgoing::Flush { .. }
            | Outgoing::SyncDone { .. }
            | Outgoing::Verify { .. }
            | Outgoing::Ungate { .. } => {}
        }
    }

    /// An acknowledgement arrives at the production side.
    fn acknowledge(&mut self) {
        if let Some(epoch) = self.acks.pop_front() {
            let tickets = self.journal.handle_staged(epoch);
            self.redeem(tickets);
        }
    }

    fn break_link(&mut self) {
        self.link_up = false;
        self.wire.clear();
        self.acks.clear();
        // The DR side drops what it staged without a seal.
        let applied = self.dr.applied;
        self.dr.staged.retain(|(e, _, _)| *e <= applied);
        let forget = self.journal.disconnect();
        self.forget(forget);
        self.catch_up = None;
    }

    fn heal_link(&mut self) {
        self.link_up = true;
        self.journal.reconnected(self.dr.applied);
        if self.dirty.is_clean() {
            self.journal.start_journaling();
        } else {
            self.journal.begin_catch_up();
            self.catch_up = Some((VecDeque::new(), false));
        }
    }

    /// The catch-up reader takes one extent, with its blocks "locked" (skipped while a
    /// write is in flight there, as the range lock would make it wait).
    fn catch_up_step(&mut self) {
        let Some((runs, final_pass)) = self.catch_up.as_mut() else {
            return;
        };
        if runs.is_empty() {
            if *final_pass {
                // The last pass is done: its seal ends the catch-up (unless the catch-up was
                // given up on the way; the ticker starts another). A pair of a consistency
                // group leaves its end to the group's next cut.
                let grouped = self.rng.random_bool(0.5);
                let _ = self.journal.finish_catch_up(!grouped);
                self.catch_up = None;
                return;
            }
            let unsent = unsent_runs(&self.dirty, &self.tickets);
            let bytes: u64 = unsent.iter().map(|r| r.len).sum();
            let (runs, final_pass) = self.catch_up.as_mut().expect("checked above");
            if bytes <= 4 * BLOCK {
                if !self.journal.begin_final_pass() {
                    self.catch_up = None;
                    return;
                }
                *final_pass = true;
                *runs = unsent_runs(&self.dirty, &self.tickets).into();
            } else {
                *runs = unsent.into();
            }
            return;
        }
        let run = runs.pop_front().expect("checked above");
        let extent = ByteRange::new(run.offset, run.len.min(2 * BLOCK));
        if run.len > extent.len {
            runs.push_front(ByteRange::new(extent.end(), run.len - extent.len));
        }
        if self
            .inflight
            .iter()
            .any(|w| w.range.offset < extent.end() && extent.offset < w.range.end())
        {
            runs.push_front(run);
            return;
        }
        if !self.journal.has_room(extent.len) {
            runs.push_front(run);
            return;
        }
        let admitted = self.journal.admit();
        let values: Vec<u64> = blocks(extent).map(|b| self.prod[b as usize]).collect();
        let ticket = self.tickets.issue(extent);
        if !self
            .journal
            .complete_resync(admitted, extent, Payload::Data(Value(values)), ticket)
        {
            // Given up (the journal overflowed): the reader stops.
            self.tickets.forget(ticket);
            self.catch_up = None;
        }
    }

    /// The DR image after a unit ending at `epoch` must be production's image at the end of
    /// that epoch: every write of an epoch ≤ `epoch`, in the order they completed.
    fn check_consistent(&self, epoch: Epoch) {
        let mut expected = vec![0u64; BLOCKS as usize];
        for (e, range, value) in &self.history {
            if *e <= epoch {
                for b in blocks(*range) {
                    expected[b as usize] = *value;
                }
            }
        }
        assert_eq!(
            self.dr.image, expected,
            "step {}: the DR image after {epoch} is not production's image at its end",
            self.steps
        );
    }

    /// A block clean at production holds the same data on the DR side.
    fn check_clean_blocks(&self) {
        for b in 0..BLOCKS {
            if !self.dirty.is_dirty(b * BLOCK) {
                assert_eq!(
                    self.dr.image[b as usize], self.prod[b as usize],
                    "step {}: block {b} is clean at production but differs on the DR side",
                    self.steps
                );
            }
        }
    }

    fn step(&mut self, writing: bool) {
        self.steps += 1;
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=24 if writing => self.admit_write(),
            25..=44 => self.complete_write(),
            45..=49 if self.rng.random_bool(0.5) => self.journal.advance_epoch(),
            50..=64 => self.send(),
            65..=79 => self.deliver(),
            80..=87 => self.acknowledge(),
            88..=96 => self.catch_up_step(),
            97 if self.link_up && writing && self.rng.random_bool(0.2) => self.break_link(),
            98 if !self.link_up => self.heal_link(),
            _ => {}
        }
        // A journal that overflowed starts a catch-up (the pair's ticker does this).
        if self.link_up
            && self.catch_up.is_none()
            && self.journal.mode() == blockrep_core::replication::Mode::Bitmap
        {
            self.journal.begin_catch_up();
            self.catch_up = Some((VecDeque::new(), false));
        }
        assert!(
            self.journal.queued_bytes() <= self.journal.limit(),
            "step {}: the journal is over its bound",
            self.steps
        );
        self.check_clean_blocks();
    }

    /// Writes stop, the link heals, and everything settles: nothing dirty, same images.
    fn settle(&mut self) {
        if !self.link_up {
            self.heal_link();
        }
        for _ in 0..200_000 {
            while !self.inflight.is_empty() {
                self.complete_write();
            }
            self.step(false);
            if self.dirty.is_clean()
                && self.catch_up.is_none()
                && self.wire.is_empty()
                && self.acks.is_empty()
            {
                self.journal.advance_epoch();
                self.send();
                while !self.wire.is_empty() {
                    self.deliver();
                }
                while !self.acks.is_empty() {
                    self.acknowledge();
                }
                if self.dirty.is_clean() {
                    assert_eq!(self.dr.image, self.prod, "settled, yet the images differ");
                    return;
                }
            }
        }
        panic!(
            "did not converge: {} bytes dirty, catch-up {:?}, journal {:?}",
            self.dirty.dirty_bytes(),
            self.catch_up.as_ref().map(|(r, f)| (r.len(), *f)),
            self.journal.mode()
        );
    }
}

/// Dirty runs minus the unspoiled parts of live tickets (what the tracker's `unsent_runs`
/// computes).
fn unsent_runs(dirty: &DirtyMap, tickets: &TicketRegistry) -> Vec<ByteRange> {
    let sent = tickets.unspoiled_ranges();
    let mut out = Vec::new();
    for run in dirty.runs() {
        let mut at = run.offset;
        for s in sent
            .iter()
            .filter(|s| s.end() > run.offset && s.offset < run.end())
        {
            if s.offset > at {
                out.push(ByteRange::new(at, s.offset - at));
            }
            at = at.max(s.end());
        }
        if at < run.end() {
            out.push(ByteRange::new(at, run.end() - at));
        }
    }
    out
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("BLOCKREP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let n = std::env::var("BLOCKREP_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    (0..n).map(|i| 0xb10c_0000 + i).collect()
}

fn run_seeds(limit: u64, steps: u64) {
    for seed in seeds() {
        let result = std::panic::catch_unwind(|| {
            let mut sim = Sim::new(seed, limit);
            // Writes pause now and then, so that catch-ups end while epochs go on and
            // writes come again (seed 0xb10c_0079 found a seal inside a catch-up's unit).
            for i in 0..steps {
                sim.step(i % 600 < 450);
            }
            sim.settle();
        });
        if let Err(panic) = result {
            eprintln!("failing seed: BLOCKREP_SEED={seed}");
            std::panic::resume_unwind(panic);
        }
    }
}

/// A roomy journal: epochs flow, the link breaks and heals, catch-ups run.
#[test]
fn async_pairs_stay_consistent_through_link_breaks() {
    run_seeds(64 * BLOCK, 3000);
}

/// A tiny journal: overflow into bitmap mode all the time (also during a catch-up's final
/// pass, which must then be given up, not sealed: seed 0xb10c_034b found that).
#[test]
fn async_pairs_stay_consistent_through_overflows() {
    run_seeds(6 * BLOCK, 3000);
}
