//! The production side's shell: what `PairLink` and the production session do with the
//! machine's effects.

use super::*;

impl Sim {
    /// Does what an event's effects ask, as `PairLink` does, and lets the sender run.
    pub(super) fn carry_out(&mut self, h: usize, fx: Effects<()>) {
        let host = &mut self.hosts[h];
        for t in fx.forget {
            host.tickets.forget(t);
        }
        for t in fx.redeem {
            if let Redeemed::Clear(parts) = host.tickets.redeem(t) {
                for p in parts {
                    host.dirty.clear_range(p);
                }
            }
        }
        if let Some(range) = fx.mark_dirty {
            host.dirty.set_range(range);
        }
        for (token, ()) in fx.answers {
            self.answer(token.0 as usize);
        }
        self.send(h);
    }

    /// The sender: every frame the machine has goes on the stream, in order; on a broken
    /// link they are lost.
    pub(super) fn send(&mut self, h: usize) {
        if !self.hosts[h].machine.state().streaming() {
            return;
        }
        let mut out = Vec::new();
        let fx = self.hosts[h].machine.take_frames(u64::MAX, &mut out);
        debug_assert!(fx.answers.is_empty() && fx.redeem.is_empty());
        for frame in out {
            let corrupted =
                matches!(frame, Transmit::Write(_)) && self.faults() && self.rng.random_bool(0.005);
            let at = (self.clock.now() + 1 + self.rng.random_range(0..8))
                .max(self.hosts[h].stream_clock);
            self.hosts[h].stream_clock = at;
            let session = self.hosts[h].session;
            self.at(at, Event::ToDr(h, session, frame, corrupted));
        }
    }

    pub(super) fn answer(&mut self, w: usize) {
        let write = &mut self.writes[w];
        assert!(
            !write.answered,
            "at {} ms write {w} was answered twice",
            self.clock.now()
        );
        write.answered = true;
        // The record's presence is now that of this write (see `present`).
        self.touched.insert((write.chain, write.record));
        self.hosts[write.host].locked.remove(&write.block);
        let write = &self.writes[w];
        if write.issued_ms >= SETTLED_MS {
            let waited = self.clock.now() - write.issued_ms;
            if self.slowest.is_none_or(|(_, most)| waited > most) {
                self.slowest = Some((w, waited));
            }
        }
        let (chain, record, host) = (write.chain, write.record, write.host);
        if self.chains[chain].0 == record {
            self.chains[chain] = (record + 1, (host + 1) % self.hosts_n);
            // Now and then the application pauses, long enough for its pairs to go idle.
            let delay = match self.rng.random_bool(0.05) {
                true => self.rng.random_range(50..300),
                false => self.rng.random_range(0..5),
            };
            self.after(delay, Event::Issue(chain));
        }
    }

    pub(super) fn report(&mut self, h: usize) {
        if !self.hosts[h].up {
            return;
        }
        let m = &self.hosts[h].machine;
        let mode = PairMode {
            live: m.live(),
            gated: m.gated(),
            trip_wanted: m.trip_wanted(),
            catching_up: m.catching_up(),
            epoch: m.current_epoch(),
        };
        self.control(Event::Report(h, mode));
    }

    /// The application's next record of chain `c`, on the host whose turn it is.
    pub(super) fn issue(&mut self, c: usize) {
        let (record, h) = self.chains[c];
        let host = &self.hosts[h];
        if !host.up || !host.serving {
            // Down, or not confirmed yet: the chain tries the next host.
            self.chains[c].1 = (h + 1) % self.hosts_n;
            self.after(5, Event::Issue(c));
            return;
        }
        if host.next_block == BLOCKS {
            return;
        }
        let w = self.writes.len();
        let kind = match self.rng.random_range(0..10) {
            0 => Kind::Unaligned,
            1 => Kind::Zeroes,
            2 => Kind::Parked,
            _ => Kind::Aligned,
        };
        let value = if kind == Kind::Zeroes {
            0
        } else {
            w as u64 + 1
        };
        // The fast path's local write is done soon; the slow path's starts later.
        let delay = match kind {
            Kind::Aligned => self.rng.random_range(0..3),
            Kind::Unaligned | Kind::Zeroes | Kind::Parked => self.rng.random_range(3..25),
        };
        let now_us = self.now_us();
        let host = &mut self.hosts[h];
        let block = host.next_block;
        host.next_block += 1;
        host.locked.insert(block);
        self.owners[h][block as usize] = w;
        self.writes.push(Write {
            host: h,
            chain: c,
            record,
            block,
            value,
            kind,
            issued_ms: self.clock.now(),
            answered: false,
            lost: false,
        });
        if self.attempts[c].len() <= record as usize {
            self.attempts[c].resize(record as usize + 1, Vec::new());
        }
        self.attempts[c][record as usize].push(w);
        // The shell's admission: bits set, tickets of the range spoiled, a ticket taken.
        let range = ByteRange::new(block * BLOCK, BLOCK);
        let mode = host.machine.admit(range);
        host.dirty.set_range(range);
        host.tickets.spoil(range);
        let ticket = mode.wants_ticket().then(|| host.tickets.issue(range));
        let payload = match kind {
            Kind::Zeroes => Payload::Zeroes,
            _ => Payload::Data(Value(vec![value])),
        };
        let mut write = LocalWrite {
            range,
            payload: Some(payload),
            fua: false,
            token: AnswerToken(w as u64),
            mode,
            ticket,
            sent: None,
        };
        // The fast path sends the frame as the local write starts.
        let fx = if kind == Kind::Aligned && mode == ReplicaMode::Sync {
            host.machine.send_direct(&mut write, &(), now_us).1
        } else {
            Effects::default()
        };
        host.inflight.insert(w, write);
        self.carry_out(h, fx);
        let life = self.hosts[h].life;
        match kind {
            Kind::Parked => self.after(delay, Event::Start(h, life, w)),
            _ => self.after(delay, Event::LocalDone(h, life, w)),
        }
    }

    /// A parked write starts: its frame goes now, if the pair still writes its DR side
    /// directly (else `local_done` journals or tracks it).
    pub(super) fn start(&mut self, h: usize, w: usize) {
        let now_us = self.now_us();
        let host = &mut self.hosts[h];
        let Some(write) = host.inflight.get_mut(&w) else {
            return;
        };
        if write.mode != ReplicaMode::Sync {
            return;
        }
        let (_, fx) = host.machine.send_direct(write, &(), now_us);
        self.carry_out(h, fx);
    }

    pub(super) fn local_done(&mut self, h: usize, w: usize) {
        let Some(write) = self.hosts[h].inflight.remove(&w) else {
            return;
        };
        let block = self.writes[w].block as usize;
        self.hosts[h].image[block] = self.writes[w].value;
        let now_us = self.now_us();
        let (after, fx) = self.hosts[h].machine.local_done(write, &(), now_us);
        self.carry_out(h, fx);
        if after == AfterLocal::Answer {
            self.answer(w);
        }
    }

    /// A stream session: the DR side takes it with a new applier and says what it holds;
    /// the pair catches up if anything is dirty, else goes live.
    pub(super) fn connect(&mut self, h: usize) {
        let host = &self.hosts[h];
        if !host.up || !host.link_up || !self.drs[h].up {
            return;
        }
        if host.machine.state().streaming() {
            if self.drs[h].session == Some(host.session) {
                return;
            }
            // The stream broke while the host was not looking (a cut shorter than the
            // detection, a DR restart): it ends before a new one starts.
            self.disconnected(h);
        }
        if self.hosts[h].machine.state() != PairState::Connecting {
            return;
        }
        self.hosts[h].session += 1;
        let session = self.hosts[h].session;
        self.dr_new_applier(h);
        self.drs[h].session = Some(session);
        let dr = &self.drs[h];
        let staged = dr.last_seal.max(dr.side.applied());
        let applied = dr.side.applied();
        let now_ms = self.clock.now();
        let host = &mut self.hosts[h];
        host.stream_clock = now_ms;
        host.dr_applied = applied;
        let copying = !host.dirty.is_clean();
        let fx = host
            .machine
            .connected(staged, copying)
            .expect("a connecting pair takes a stream");
        self.carry_out(h, fx);
        if copying {
            self.begin_catch_up(h);
        }
        self.dr_progress(h);
    }

    /// The host noticed its stream is gone.
    pub(super) fn disconnected(&mut self, h: usize) {
        let now_us = self.now_us();
        let host = &mut self.hosts[h];
        if !host.machine.state().streaming() {
            return;
        }
        let fx = host.machine.disconnected(now_us);
        host.reader = None;
        let old = host.session;
        host.session += 1;
        if self.drs[h].session == Some(old) {
            self.drs[h].session = None;
        }
        self.carry_out(h, fx);
        self.report(h);
    }

    /// The session ends the stream itself and connects again a little later.
    pub(super) fn end_session(&mut self, h: usize) {
        self.disconnected(h);
        self.after(RECONNECT_MS, Event::Reconnect(h));
    }

    /// A catch-up starts; where its unit begins is recorded first, as the session does.
    pub(super) fn begin_catch_up(&mut self, h: usize) {
        let host = &mut self.hosts[h];
        host.machine
            .begin_catch_up()
            .expect("a catch-up starts on a stream");
        if let Some(new) = host.machine.unit_in_progress() {
            host.catch_up_from = Some(unit_to_record(host.catch_up_from, new, host.dr_applied));
        }
        host.reader = Some(Reader {
            runs: VecDeque::new(),
            final_pass: false,
            ends: None,
        });
        let session = host.session;
        self.after(1, Event::CatchUpStep(h, session));
    }

    /// The catch-up reader takes one extent (skipping blocks a write in flight holds, as
    /// the range lock would make it wait), or moves to its final pass, or ends.
    pub(super) fn catch_up_step(&mut self, h: usize) {
        let wall_ms = self.wall_ms();
        let host = &mut self.hosts[h];
        let Some(reader) = host.reader.as_mut() else {
            return;
        };
        if let Some(end) = reader.ends {
            // The session waits for the unit's end to be staged, then goes live.
            if host.machine.catch_up_settled(end) {
                host.reader = None;
                if host.machine.staged_epoch() >= end {
                    if let Some(from) = host.unit_from.take() {
                        host.units.push((from, end));
                    }
                    let fx = host.machine.go_live();
                    host.machine
                        .resync_done()
                        .expect("a catch-up ends on its stream");
                    self.carry_out(h, fx);
                    self.report(h);
                }
            }
            return;
        }
        if reader.runs.is_empty() {
            if reader.final_pass {
                let (end, fx) = host.machine.finish_catch_up(wall_ms);
                match end {
                    Some(end) => host.reader.as_mut().expect("checked above").ends = Some(end),
                    // Given up on the way: the session starts another.
                    None => host.reader = None,
                }
                return self.carry_out(h, fx);
            }
            let unsent = unsent_runs(&host.dirty, &host.tickets);
            let bytes: u64 = unsent.iter().map(|r| r.len).sum();
            if bytes <= FINAL_PASS_BYTES {
                if !host.machine.begin_final_pass() {
                    host.reader = None;
                    return;
                }
                let runs = unsent_runs(&host.dirty, &host.tickets).into();
                let reader = host.reader.as_mut().expect("checked above");
                reader.final_pass = true;
                reader.runs = runs;
            } else {
                reader.runs = unsent.into();
            }
            return;
        }
        let run = *reader.runs.front().expect("checked above");
        let extent = ByteRange::new(run.offset, run.len.min(4 * BLOCK));
        let locked = host.locked.range(blocks(extent)).next().is_some();
        if locked || !host.machine.has_room_for(extent.len) {
            // The reader waits; the run stays where it was.
            return;
        }
        let runs = &mut host.reader.as_mut().expect("checked above").runs;
        runs.pop_front();
        if run.len > extent.len {
            runs.push_front(ByteRange::new(extent.end(), run.len - extent.len));
        }
        let admitted = host.machine.admit_catch_up_extent();
        let values: Vec<u64> = blocks(extent).map(|b| host.image[b as usize]).collect();
        let ticket = host.tickets.issue(extent);
        let (queued, fx) = host.machine.push_catch_up_extent(
            admitted,
            extent,
            Payload::Data(Value(values)),
            ticket,
        );
        if !queued {
            // Given up (the journal overflowed, or the DR side refused): the reader stops.
            host.reader = None;
        }
        self.carry_out(h, fx);
    }

    /// The session's tick: held answers time out, a silent peer or a stream the machine
    /// wants ended ends the session, a catch-up the machine asks for starts, the pair's
    /// mode is reported.
    pub(super) fn host_tick(&mut self, h: usize) -> Result<(), String> {
        if self.hosts[h].up {
            let now_us = self.now_us();
            let host = &mut self.hosts[h];
            let fx = host
                .machine
                .release_held_longer_than(HOLD_TIMEOUT_MS, now_us);
            self.carry_out(h, fx);
            let host = &self.hosts[h];
            let silent = host
                .machine
                .unanswered_for_us(now_us)
                .is_some_and(|us| us > PEER_TIMEOUT_MS * 1000);
            let m = &host.machine;
            // The coordinator cuts (a restarted one waits for every host's report: with a
            // host down, no commit can come), and has had time to commit.
            let coordinator_settled = self.coordinator_up
                && !self.starting
                && self.clock.now() >= FAULTS_UNTIL_MS
                && self.clock.now() - self.cutting_since >= COMMIT_WITHIN_MS;
            if silent
                && coordinator_settled
                && m.live() == Live::Sync
                && !m.gated()
                && !m.trip_wanted()
            {
                // A synchronous group's DR side answers every direct write within a few
                // cuts: a link or DR fault ends the stream sooner, and gated writes go once
                // the group commits the epoch of their Ungate. Silent here, it holds writes
                // for a commit that does not come.
                return Err(format!(
                    "at {} ms host {h}'s DR side left its direct writes unanswered for {PEER_TIMEOUT_MS} ms while the group was synchronous",
                    self.clock.now()
                ));
            }
            if silent || host.machine.stream_must_end().is_some() {
                self.end_session(h);
            }
            let host = &self.hosts[h];
            if host.machine.state().streaming()
                && host.reader.is_none()
                && host.machine.needs_catch_up()
            {
                self.begin_catch_up(h);
            }
            if self.clock.now().is_multiple_of(REPORT_MS) || self.hosts[h].machine.trip_wanted() {
                self.report(h);
            }
        }
        self.after(5, Event::HostTick(h));
        Ok(())
    }

    pub(super) fn host_cut(&mut self, h: usize, to: Epoch, mode: CutMode) {
        let (now_us, wall_ms) = (self.now_us(), self.wall_ms());
        let host = &mut self.hosts[h];
        // Recorded before the switch is acknowledged.
        host.recorded_cut = host.recorded_cut.max(to);
        let ((staged, synchronous), fx) = host.machine.group_cut(to, mode, wall_ms, now_us);
        if self.broken == Broken::ReleaseOnCut {
            let fx = host
                .machine
                .group_release(to, RoundOutcome::default(), wall_ms, now_us);
            self.carry_out(h, fx);
        }
        let host = &mut self.hosts[h];
        let spans = host
            .machine
            .atomic_spans()
            .into_iter()
            .map(|s| (s.from, s.to))
            .collect();
        self.carry_out(h, fx);
        // Now and then the agent dies just after it switched (and recorded the cut), and
        // systemd restarts it at once.
        if self.faults() && self.rng.random_bool(0.03) {
            self.after(2, Event::HostBounce(h));
        }
        self.control(Event::Ack {
            host: h,
            to,
            staged,
            synchronous,
            spans,
        });
    }

    /// The coordinator asked what host `h` staged: its staged epoch and its catch-up units,
    /// read together (the agent's `group_staged`), nothing switched or held.
    pub(super) fn host_staged(&mut self, h: usize) {
        let machine = &self.hosts[h].machine;
        let staged = machine.staged_epoch();
        let spans = machine
            .atomic_spans()
            .into_iter()
            .map(|s| (s.from, s.to))
            .collect();
        self.control(Event::Staged {
            host: h,
            staged,
            spans,
        });
    }

    pub(super) fn host_release(&mut self, h: usize, to: Epoch, outcome: RoundOutcome) {
        let outcome = match self.broken {
            // Broken: every release counts as a completed trip.
            Broken::TripOnAnyRelease => RoundOutcome {
                tripped: true,
                ..outcome
            },
            _ => outcome,
        };
        let (now_us, wall_ms) = (self.now_us(), self.wall_ms());
        let fx = self.hosts[h]
            .machine
            .group_release(to, outcome, wall_ms, now_us);
        self.carry_out(h, fx);
    }

    pub(super) fn crash(&mut self, h: usize) {
        let host = &mut self.hosts[h];
        host.up = false;
        host.life += 1;
        host.reader = None;
        // Writes whose local write had not ended are lost; the dirty map is durable.
        host.inflight.clear();
        host.session += 1;
        if self.drs[h].session.is_some() {
            self.drs[h].session = None;
        }
        host.locked.clear();
        // What the journal held is gone: what the DR side lacks comes as a unit.
        if host.unit_from.is_none() {
            let dr = &self.drs[h];
            host.unit_from = Some(dr.last_seal.max(dr.side.applied()));
        }
        // Writes never answered never will be; their chains write the record again
        // elsewhere.
        let mut stalled = Vec::new();
        for w in &mut self.writes {
            if w.host == h && !w.answered && !w.lost {
                w.lost = true;
                if self.chains[w.chain].0 == w.record {
                    stalled.push(w.chain);
                }
            }
        }
        for c in stalled {
            self.chains[c].1 = (h + 1) % self.hosts_n;
            self.after(5, Event::Issue(c));
        }
    }

    /// The agent starts again: unconfirmed, in its group's last recorded cut, tripped, and
    /// with its catch-up unit's span open again if it recorded one.
    pub(super) fn restart(&mut self, h: usize) {
        let now_us = self.now_us();
        let (broken, model) = (self.broken, self.model);
        let host = &mut self.hosts[h];
        host.up = true;
        host.serving = false;
        host.tickets = TicketRegistry::new();
        let mut machine =
            Machine::new(model, JOURNAL_BYTES, Epoch::ZERO).starting_in(PairState::Unconfirmed);
        let _ = machine.set_grouped(true);
        machine.set_resync_read_ahead(READ_AHEAD_BYTES);
        machine.start_in_group(host.recorded_cut, now_us);
        if model == ReplicationModel::Hypermetro && broken != Broken::StartUntripped {
            machine.start_tripped(now_us);
        }
        if let Some(from) = host.catch_up_from
            && broken != Broken::ForgetRecordedUnit
        {
            machine.resume_unit(from);
        }
        host.machine = machine;
        self.report(h);
        let confirm = self.rng.random_range(CONFIRM_MS);
        self.after(confirm, Event::Confirm(h));
    }

    /// For the checks: where each host's catch-up unit really begins: at what its DR side
    /// had sealed when live writes left the journal (the machine's span may begin earlier:
    /// a restarted agent reopens the one its record names).
    pub(super) fn note_units(&mut self) {
        for (host, dr) in self.hosts.iter_mut().zip(&self.drs).filter(|(h, _)| h.up) {
            let m = &host.machine;
            if host.unit_from.is_none() {
                if m.unit_in_progress().is_some() {
                    host.unit_from = Some(dr.last_seal.max(dr.side.applied()));
                }
            } else if m.live() != Live::Tracked
                && host.reader.is_none()
                && m.unit_in_progress().is_none()
            {
                // Live again with nothing to catch up: no unit was made.
                host.unit_from = None;
            }
        }
    }

    pub(super) fn production_hears(&mut self, h: usize, answer: Answer) {
        let now_us = self.now_us();
        let machine = &mut self.hosts[h].machine;
        let fx = match answer {
            Answer::Written(seqs) => machine.handle_acks(&seqs, now_us),
            Answer::Staged(epoch) => machine.handle_staged(epoch, now_us),
            Answer::Refused(seq, reason) => machine.handle_reject(seq, reason, now_us),
        };
        self.carry_out(h, fx);
    }
}

pub(super) fn new_host(model: ReplicationModel) -> Host {
    let mut machine = Machine::new(model, JOURNAL_BYTES, Epoch::ZERO);
    let _ = machine.set_grouped(true);
    machine.set_resync_read_ahead(READ_AHEAD_BYTES);
    Host {
        up: true,
        life: 0,
        serving: true,
        machine,
        dirty: DirtyMap::new(BLOCKS * BLOCK, Granularity::DEFAULT),
        tickets: TicketRegistry::new(),
        image: vec![UNWRITTEN; BLOCKS as usize],
        next_block: 0,
        inflight: HashMap::new(),
        link_up: true,
        session: 0,
        stream_clock: 0,
        reader: None,
        dr_applied: Epoch::ZERO,
        recorded_cut: Epoch::ZERO,
        catch_up_from: None,
        unit_from: None,
        units: Vec::new(),
        locked: BTreeSet::new(),
    }
}
