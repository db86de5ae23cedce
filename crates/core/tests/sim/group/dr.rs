//! The DR side: what the applier does, over a volume and a stage log in memory.

use super::*;

impl Dr {
    pub(super) fn new() -> Self {
        Dr {
            up: true,
            applier: 0,
            session: None,
            // The volumes start alike (nothing written): the DR side is a consistent
            // image from the start, as after an initial sync.
            side: DrSide::new(
                DrState {
                    consistent: true,
                    sync_done_at: Some(Epoch::ZERO),
                    ..DrState::default()
                },
                None,
            ),
            syncs: VecDeque::new(),
            image: vec![UNWRITTEN; BLOCKS as usize],
            volatile: VecDeque::new(),
            volatile_base: 0,
            staged: Vec::new(),
            seals: Vec::new(),
            last_seal: Epoch::ZERO,
            allowed: Epoch::ZERO,
            answer_clock: 0,
            inbox: VecDeque::new(),
            applying: None,
            draining: false,
            undo: undo::Undo::default(),
        }
    }

    /// A new applier, from what the DR side recorded: its applied state and the stage
    /// log's sealed units (replayed); nothing aside, nothing waiting for a sync. Returns the
    /// seals to replay.
    pub(super) fn new_applier(&mut self) -> Vec<SealRecord> {
        self.applier += 1;
        let state = self.side.state().clone();
        self.side = DrSide::new(state, Some(self.last_seal));
        self.syncs.clear();
        // The log's tail after its last seal belongs to a stream that is gone; what it holds
        // at or before the recorded applied epoch is skipped when it is opened.
        let (last, applied) = (self.last_seal, self.side.applied());
        self.staged.retain(|(e, ..)| *e <= last && *e > applied);
        self.seals.retain(|s| s.epoch > applied);
        self.seals.clone()
    }

    /// The volume is synced: every direct write on it is durable.
    pub(super) fn synced_all(&mut self) {
        self.volatile_base += self.volatile.len();
        self.volatile.clear();
    }
}

/// The most of a unit's writes that reach the volume in one event (the ring has many in
/// flight).
const UNIT_WRITES_AT_ONCE: usize = 16;

impl Sim {
    /// What a direct write is to the DR side's gate (the applier's rule, with the rules
    /// broken on purpose).
    pub(super) fn gating(&self, frame: &WriteFrame<Value>) -> Gating {
        match self.broken {
            Broken::IgnoreGate if frame.gated => Gating::Direct,
            _ if frame.gated => Gating::Gated,
            // Broken: it waits only behind writes aside, not for the Ungate's epoch.
            Broken::WriteAfterUngateAtOnce => Gating::Ordered,
            _ => Gating::Direct,
        }
    }

    /// A frame arrives: taken now, or after the unit being applied.
    pub(super) fn dr_frame(&mut self, h: usize, frame: Transmit<Value>, corrupted: bool) {
        self.drs[h]
            .inbox
            .push_back(DrInput::Frame(frame, corrupted));
        self.dr_pump(h);
    }

    /// A new applier starts: the old one finished what arrived (its unit and its inbox,
    /// at once), and the new one replays the sealed units of the stage log, in order.
    pub(super) fn dr_new_applier(&mut self, h: usize) {
        self.drs[h].draining = true;
        self.dr_pump(h);
        self.drs[h].draining = false;
        let replays = self.drs[h].new_applier();
        self.drs[h]
            .inbox
            .extend(replays.into_iter().map(DrInput::Replay));
        self.dr_pump(h);
    }

    /// Takes what waits in the inbox, in order, until a unit is being applied.
    fn dr_pump(&mut self, h: usize) {
        loop {
            if self.drs[h].applying.is_some() {
                if !self.drs[h].draining {
                    return;
                }
                while self.drs[h].applying.is_some() {
                    self.unit_write(h);
                }
            }
            match self.drs[h].inbox.pop_front() {
                None => return,
                Some(DrInput::Frame(frame, corrupted)) => self.dr_take(h, frame, corrupted),
                Some(DrInput::Replay(seal)) => self.dr_seal(h, seal.epoch, seal.cut_ms, false),
            }
        }
    }

    /// One frame, as the applier's worker takes it.
    fn dr_take(&mut self, h: usize, frame: Transmit<Value>, corrupted: bool) {
        match frame {
            Transmit::Write(write) if write.direct => {
                let gating = self.gating(&write);
                let dr = &mut self.drs[h];
                if dr.side.must_set_aside(gating) {
                    dr.side.set_aside(gating, (write, corrupted));
                } else {
                    self.dr_direct(h, write, corrupted);
                }
            }
            Transmit::Write(write) => {
                let room = !(self.faults() && self.rng.random_bool(0.003));
                let dr = &mut self.drs[h];
                match dr.side.staged_write(write.epoch, !corrupted, room) {
                    StagedWrite::Drop => {}
                    StagedWrite::Refuse(reason) => {
                        self.answer_production(h, Answer::Refused(write.seq, reason))
                    }
                    StagedWrite::Stage => {
                        for (b, v) in blocks(write.range).zip(values(&write.payload, write.range)) {
                            dr.staged.push((write.epoch, b, v, false));
                        }
                    }
                }
            }
            Transmit::Seal { epoch, cut_ms } => self.dr_seal(h, epoch, cut_ms, true),
            Transmit::Discard { after } => {
                let dr = &mut self.drs[h];
                let after = dr.side.discard(after);
                dr.staged.retain(|(e, ..)| *e <= after);
            }
            Transmit::Ungate { epoch } => self.drs[h].side.ungate(epoch),
            Transmit::Flush { .. }
            | Transmit::SyncDone { .. }
            | Transmit::Verify { .. }
            | Transmit::Digest { .. } => {
                panic!("the simulation sends no flush, sync end, verify or digest")
            }
        }
        self.dr_progress(h);
    }

    /// A direct write: written, and answered once a sync covers it (its CRC failed on the
    /// way: refused, to be sent again).
    pub(super) fn dr_direct(&mut self, h: usize, write: WriteFrame<Value>, corrupted: bool) {
        if corrupted {
            return self.answer_production(h, Answer::Refused(write.seq, RejectReason::Checksum));
        }
        self.drs[h].undo.direct_write();
        for (b, v) in blocks(write.range).zip(values(&write.payload, write.range)) {
            let before = self.drs[h].image[b as usize];
            self.drs[h].volatile.push_back((b, before));
            self.set_dr_block(h, b, v);
        }
        if self.broken == Broken::AckBeforeSync {
            return self.answer_production(h, Answer::Written(vec![write.seq]));
        }
        self.drs[h].side.direct_written(write.seq);
        self.start_sync(h);
    }

    pub(super) fn start_sync(&mut self, h: usize) {
        let dr = &mut self.drs[h];
        let Some(ticket) = dr.side.start_sync() else {
            return;
        };
        let reaches = dr.volatile_base + dr.volatile.len();
        dr.syncs.push_back((ticket, reaches));
        let applier = dr.applier;
        let delay = self.rng.random_range(1..6);
        self.after(delay, Event::DrSynced(h, applier));
    }

    /// A sync returned (syncs return in order here): what it covers is durable, and the
    /// writes the barrier held for it are answered.
    pub(super) fn dr_synced(&mut self, h: usize) {
        let dr = &mut self.drs[h];
        let Some((ticket, reaches)) = dr.syncs.pop_front() else {
            return;
        };
        while dr.volatile_base < reaches && !dr.volatile.is_empty() {
            dr.volatile.pop_front();
            dr.volatile_base += 1;
        }
        let durable = dr.side.synced(ticket);
        self.answer_writes(h, durable);
        self.start_sync(h);
    }

    /// A seal arrived (`append`) or was found in the stage log: as the applier's `seal`.
    pub(super) fn dr_seal(&mut self, h: usize, epoch: Epoch, cut_ms: u64, append: bool) {
        let dr = &mut self.drs[h];
        match dr.side.seal_arrived(epoch, append) {
            SealArrival::Staged => return self.answer_production(h, Answer::Staged(epoch)),
            SealArrival::Dropped => return,
            SealArrival::Append => {
                // The log is synced with its seal: everything staged before it is durable.
                for s in &mut dr.staged {
                    s.3 = true;
                }
                dr.seals.push(SealRecord { epoch, cut_ms });
                dr.last_seal = dr.last_seal.max(epoch);
                dr.side.appended(epoch);
                // A seal of a stream that is gone, taken from the inbox after a unit: the
                // epochs it ends are a unit of their own, and a catch-up begins after them.
                let gone = dr.session != Some(self.hosts[h].session);
                if gone && let Some(from) = self.hosts[h].unit_from.as_mut() {
                    *from = (*from).max(epoch);
                }
                self.answer_production(h, Answer::Staged(epoch));
            }
            SealArrival::Replay => {}
        }
        let dr = &mut self.drs[h];
        if let Some(seal) = dr
            .side
            .unit_ready(SealRecord { epoch, cut_ms }, dr.allowed.0)
        {
            self.apply_unit(h, seal);
        }
    }

    /// Begins applying the unit `seal` ends: every staged write up to its epoch, in log
    /// order, one event each (the stage log keeps them until the unit is applied whole).
    pub(super) fn apply_unit(&mut self, h: usize, seal: SealRecord) {
        let dr = &mut self.drs[h];
        let unit: Vec<(u64, u64)> = dr
            .staged
            .iter()
            .filter(|(e, ..)| *e <= seal.epoch)
            .map(|&(_, b, v, _)| (b, v))
            .collect();
        let blocks: Vec<u64> = unit.iter().map(|(b, _)| *b).collect();
        let state = dr.side.state().clone();
        let again = self.broken == Broken::UndoTakenAgainOnReplay;
        dr.undo.drill_views_not_extended = self.broken == Broken::DrillViewNotExtended;
        dr.undo
            .before_unit(seal.epoch, &state, &blocks, &dr.image, again);
        dr.side.begin_unit(seal, unit.len());
        let empty = unit.is_empty();
        dr.applying = Some(UnitApply {
            seal,
            writes: unit,
            done: 0,
        });
        if empty {
            self.finish_unit(h);
        } else if !self.drs[h].draining {
            let (applier, delay) = (self.drs[h].applier, self.rng.random_range(0..3));
            self.after(delay, Event::UnitWrite(h, applier));
        }
    }

    /// The unit's next write is on the volume (not durable until the sync at its end).
    pub(super) fn unit_write(&mut self, h: usize) {
        let Some(unit) = self.drs[h].applying.as_mut() else {
            return;
        };
        // The ring takes many of the unit's writes at once: a batch reaches the volume.
        let batch = self.rng.random_range(1..=UNIT_WRITES_AT_ONCE);
        let from = unit.done;
        unit.done = (unit.done + batch).min(unit.writes.len());
        let all = unit.done == unit.writes.len();
        let writes = unit.writes[from..unit.done].to_vec();
        let check_drill = !all && self.rng.random_bool(0.02);
        let mut written = false;
        for (b, v) in writes {
            let before = self.drs[h].image[b as usize];
            self.drs[h].volatile.push_back((b, before));
            self.set_dr_block(h, b, v);
            written = self.drs[h].side.unit_write_done();
        }
        assert_eq!(
            written, all,
            "the machine counts the unit's writes as the shell does"
        );
        // A drill reads while the unit is half on the volume.
        if check_drill {
            let dr = &mut self.drs[h];
            if let Err(e) = dr.undo.check_drill(&dr.image) {
                self.undo_failure
                    .get_or_insert(format!("DR side {h}'s drill, mid-unit: {e}"));
            }
        }
        if all {
            self.finish_unit(h);
        } else if !self.drs[h].draining {
            let (applier, delay) = (self.drs[h].applier, self.rng.random_range(0..3));
            self.after(delay, Event::UnitWrite(h, applier));
        }
    }

    /// Every write of the unit is on the volume: it is synced, the unit recorded applied,
    /// its writes leave the stage log; then what waited goes on.
    fn finish_unit(&mut self, h: usize) {
        let dr = &mut self.drs[h];
        let seal = dr.applying.take().expect("a unit was being applied").seal;
        dr.staged.retain(|(e, ..)| *e > seal.epoch);
        dr.seals.retain(|s| s.epoch > seal.epoch);
        dr.synced_all();
        let done = dr.side.finish_unit().expect("the unit was begun");
        let replayed = dr.undo.after_unit(dr.side.state(), &dr.image);
        if self.rng.random_bool(0.05) {
            let nth = self.rng.random_range(0..4);
            self.drs[h].undo.trim(nth);
        }
        if replayed && let Err(e) = self.drs[h].undo.check(&self.drs[h].image) {
            self.undo_failure
                .get_or_insert(format!("after DR side {h} replayed a unit: {e}"));
        }
        // A drill's turn, now and then; it checks what it reads.
        if self.rng.random_bool(0.05) {
            let dr = &mut self.drs[h];
            if let Err(e) = dr.undo.drill_step(&mut self.rng, &dr.image) {
                self.undo_failure
                    .get_or_insert(format!("DR side {h}'s drill: {e}"));
            }
        }
        self.answer_writes(h, done.answers);
        self.dr_progress(h);
        self.dr_pump(h);
    }

    /// Starts what may start now: units the group committed, gated writes let go.
    pub(super) fn dr_progress(&mut self, h: usize) {
        loop {
            let dr = &mut self.drs[h];
            if dr.applying.is_some() {
                return;
            }
            if let Some(seal) = dr.side.committed_unit(dr.allowed.0) {
                self.apply_unit(h, seal);
                continue;
            }
            let let_go = dr.side.let_go();
            if let_go.is_empty() {
                return;
            }
            for (mut write, corrupted) in let_go {
                write.gated = false;
                self.dr_direct(h, write, corrupted);
            }
        }
    }

    /// Answers writes made durable together: in one answer, as the applier's shell sends
    /// them, or (as when they straddle the reads of the production side) one at a time.
    fn answer_writes(&mut self, h: usize, seqs: Vec<WriteSeq>) {
        if seqs.is_empty() {
            return;
        }
        if self.rng.random_bool(0.5) {
            self.answer_production(h, Answer::Written(seqs));
        } else {
            for seq in seqs {
                self.answer_production(h, Answer::Written(vec![seq]));
            }
        }
    }

    pub(super) fn answer_production(&mut self, h: usize, answer: Answer) {
        let Some(session) = self.drs[h].session else {
            return;
        };
        let at = (self.clock.now() + self.rng.random_range(1..8)).max(self.drs[h].answer_clock);
        self.drs[h].answer_clock = at;
        self.at(at, Event::ToProduction(h, session, answer));
    }

    /// The DR host loses power: direct writes no sync covered and the stage log's unsynced
    /// tail are gone; what it recorded (its applied state, its sealed units, the group's
    /// commit) stays.
    pub(super) fn dr_power_cut(&mut self, h: usize) -> Result<(), String> {
        let dr = &mut self.drs[h];
        dr.up = false;
        dr.applier += 1;
        dr.session = None;
        dr.syncs.clear();
        // The unit half applied is in the stage log still (sealed, synced): replayed later.
        let half_applied = dr.applying.take();
        let unit_done = half_applied.as_ref().map_or(0, |u| u.done);
        if half_applied.as_ref().is_some_and(|unit| unit.done > 0) {
            self.cuts_mid_unit += 1;
        }
        let dr = &mut self.drs[h];
        dr.inbox.clear();
        let mut state = dr.side.state().clone();
        if let (Broken::RecordUnitAtItsStart, Some(UnitApply { seal, .. })) =
            (self.broken, half_applied)
        {
            // Broken: the state was recorded with the unit applied when it began.
            state.applied = seal.epoch;
            state.applied_cut_ms = seal.cut_ms;
        }
        dr.side = DrSide::new(state, Some(dr.last_seal));
        // What the stage log holds after its last seal is dropped when it is opened again.
        let last = dr.last_seal;
        dr.staged.retain(|s| s.3 && s.0 <= last);
        // Of the unit's writes on the volume (the last in `volatile`), the disk may have
        // written some before the power went: a prefix of them survives.
        let survive = self.rng.random_range(0..=unit_done);
        let dr = &mut self.drs[h];
        let n = dr.volatile.len();
        let first_unit = n.saturating_sub(unit_done);
        let lost: Vec<(usize, u64, u64)> = dr
            .volatile
            .drain(..)
            .enumerate()
            .filter(|(i, _)| !(first_unit..first_unit + survive).contains(i))
            .map(|(i, (b, before))| (i, b, before))
            .rev()
            .collect();
        dr.volatile_base += n;
        for (_, b, before) in lost {
            self.set_dr_block(h, b, before);
        }
        if let Err(e) = self.drs[h].undo.check(&self.drs[h].image) {
            return Err(format!("after DR side {h} lost power: {e}"));
        }
        let dr = &mut self.drs[h];
        dr.undo.drill_power_cut();
        if let Err(e) = dr.undo.check_drill(&dr.image) {
            return Err(format!("after DR side {h} lost power, its drill: {e}"));
        }
        self.check_clean_blocks(h)
    }

    /// Rules 1 and 2: a block clean at production holds production's data on the DR side,
    /// on its volume or, newer, in its stage log.
    pub(super) fn check_clean_blocks(&self, h: usize) -> Result<(), String> {
        let (host, dr) = (&self.hosts[h], &self.drs[h]);
        let mut dr_image = dr.image.clone();
        for (_, b, v, _) in &dr.staged {
            dr_image[*b as usize] = *v;
        }
        for b in 0..host.next_block {
            if !host.dirty.is_dirty(b * BLOCK) && dr_image[b as usize] != host.image[b as usize] {
                return Err(format!(
                    "at {} ms, after host {h}'s DR side lost power, block {b} is clean at production but its DR side holds {} instead of {}",
                    self.clock.now(),
                    dr_image[b as usize],
                    host.image[b as usize]
                ));
            }
        }
        Ok(())
    }
}

/// The value each block of a write's `range` takes.
fn values(payload: &Payload<Value>, range: ByteRange) -> Vec<u64> {
    match payload {
        Payload::Data(v) => v.0.clone(),
        Payload::Zeroes => vec![0; blocks(range).count()],
    }
}
