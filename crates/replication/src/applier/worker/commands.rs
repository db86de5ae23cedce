//! What the applier's worker does with each command of the stream, in order: writes
//! direct or staged, seals and the units they end, flushes, discards, the sync's end and
//! verifies, asking the DR side's machine (the core's `DrSide`) at each step.

use std::io;

use blockrep_core::ByteRange;
use blockrep_core::pair::dr::{SealArrival, SealRecord, StagedWrite};
use blockrep_core::replication::Epoch;
use blockrep_core::replication::direct_gate::Gating;
use blockrep_volume::{AlignedBuf, DIRECT_IO_ALIGN};
use blockrep_wire::{RejectReason, WriteFlags, WriteHeader, block_crcs, payload_crc};

use crate::applier::RECORDS_PER_CAP;
use crate::compression;
use bytes::Bytes;

use super::{Worker, WriteData};
use crate::applier::{
    ApplyCmd, ApplyEvent, MAX_INFLIGHT, VerifyCmd, ZEROES_PIECE, goes_on_the_ring,
};
use crate::dr_state;

impl Worker {
    /// Starts whatever may start now, in order.
    pub(super) fn progress(&mut self) -> io::Result<()> {
        loop {
            if self.side.is_applying() {
                self.submit_unit()?;
                return Ok(());
            }
            // Held units the group has committed since apply first, as one unit.
            if self.inflight == 0
                && let Some(seal) = self
                    .side
                    .committed_unit(self.allowed.load(std::sync::atomic::Ordering::SeqCst))
            {
                self.apply_unit(seal)?;
                continue;
            }
            // Gated writes go, in order, once their group is synchronous and their past
            // applied; let go, they are gated no more.
            for mut cmd in self.side.let_go().into_iter().rev() {
                if let ApplyCmd::Write { header, .. } = &mut cmd {
                    header.flags.0 &= !WriteFlags::GATED;
                }
                self.queue.push_front(cmd);
            }
            let Some(cmd) = self.queue.front() else {
                return Ok(());
            };
            if let Some(gating) = gating(cmd)
                && self.side.must_set_aside(gating)
            {
                let mut cmd = self.queue.pop_front().expect("front checked");
                // What waits behind a gated write gives its room in the apply queue back:
                // the frames that let it go (`Ungate`, the seal of its unit) come after it.
                if let ApplyCmd::Write { budget, .. } = &mut cmd {
                    self.inbox
                        .budget
                        .add_permits(std::mem::take(budget) as usize);
                }
                self.side.set_aside(gating, cmd);
                continue;
            }
            let barrier = matches!(
                cmd,
                ApplyCmd::Flush { .. }
                    | ApplyCmd::Seal { .. }
                    | ApplyCmd::SyncDone { .. }
                    | ApplyCmd::Replay { .. }
                    | ApplyCmd::Verify(_)
            ) || matches!(cmd, ApplyCmd::Write { header, .. }
                if header.flags.has(WriteFlags::DIRECT) && !goes_on_the_ring(header));
            if barrier && self.inflight > 0 {
                return Ok(());
            }
            if self.inflight >= MAX_INFLIGHT || !self.room_in_flight(payload_bytes(cmd)) {
                return Ok(());
            }
            let cmd = self.queue.pop_front().expect("front checked");
            self.beat.progress();
            match cmd {
                ApplyCmd::Write {
                    header,
                    payload,
                    budget,
                    placed,
                } => {
                    if !self.write(header, payload, budget, placed)? {
                        return Ok(());
                    }
                    self.inbox.budget.add_permits(budget as usize);
                }
                ApplyCmd::Flush { seq } => {
                    self.volume.backing().sync_data()?;
                    self.synced_outside();
                    self.emit(ApplyEvent::FlushAck(seq));
                }
                ApplyCmd::Seal { epoch, cut_ms } => self.seal(epoch, cut_ms, true)?,
                ApplyCmd::Replay { epoch, cut_ms } => self.seal(epoch, cut_ms, false)?,
                ApplyCmd::Discard { after } => {
                    let after = self.side.discard(after);
                    self.log.discard_after(after);
                    // Staged writes before them are dropped: they describe no point here.
                    self.held_digests.clear();
                }
                ApplyCmd::Digest {
                    offset,
                    after,
                    crcs,
                } => self.digest_arrived(offset, after, crcs),
                // Picked up at the top of the loop.
                ApplyCmd::Allowed => {}
                ApplyCmd::Ungate { epoch } => self.side.ungate(epoch),
                ApplyCmd::Verify(v) => {
                    if let Some(v) = self.side.verify_arrived(v.after, v) {
                        self.verify(&v)?;
                    }
                }
                ApplyCmd::SyncDone { epoch } => {
                    self.volume.backing().sync_data()?;
                    self.synced_outside();
                    self.side.sync_done(epoch);
                    self.save_state()?;
                    // Every extent of the sync is durable, and so is its end.
                    self.emit(ApplyEvent::SyncDoneAck(epoch));
                    let state = self.side.state();
                    if state.consistent {
                        self.emit(ApplyEvent::Applied {
                            epoch: state.applied,
                            cut_ms: state.applied_cut_ms,
                        });
                    }
                }
            }
        }
    }

    /// Handles one incoming write. Returns false if it had to wait (it is put back).
    fn write(
        &mut self,
        mut header: WriteHeader,
        payload: Bytes,
        budget: u32,
        placed: bool,
    ) -> io::Result<bool> {
        let zeroes = header.flags.has(WriteFlags::ZEROES);
        // A malformed write ends the applier: nothing after it in the stream applies.
        let range = ByteRange::within(header.offset, u64::from(header.len), self.volume.size())
            .map_err(|e| invalid(format!("a write for the DR volume: {e}")))?;
        let (payload, whole) = if header.flags.has(WriteFlags::ZSTD) {
            // Into exactly the write's length; a payload that comes to anything else is
            // refused as a bad checksum (sent again), like one corrupted on the way. (Put
            // back for want of room, the write waits decompressed.)
            header.flags = WriteFlags(header.flags.0 & !WriteFlags::ZSTD);
            match compression::decompress(&payload, range.len as usize) {
                Some(data) => (Bytes::from(data), true),
                None => (Bytes::new(), false),
            }
        } else {
            (payload, true)
        };
        if whole && !zeroes && payload.len() as u64 != range.len {
            return Err(invalid(format!(
                "write {range} carries {} bytes of payload",
                payload.len()
            )));
        }
        let checksum_ok = zeroes || (whole && payload_crc(&payload) == header.crc);
        if !header.flags.has(WriteFlags::DIRECT) {
            self.spoil_digests(range);
            let room = checksum_ok && (range.is_empty() || self.stage_room(range));
            match self.side.staged_write(header.epoch, checksum_ok, room) {
                // Its unit can no longer apply: the production side catches up instead.
                StagedWrite::Drop => {}
                StagedWrite::Refuse(reason) => self.refuse(&header, range, reason),
                StagedWrite::Stage if range.is_empty() => {}
                StagedWrite::Stage => {
                    // A zero range has no payload; a write's CRC was checked just above.
                    let data_crc = if zeroes {
                        payload_crc(&payload)
                    } else {
                        header.crc
                    };
                    self.log.append_write_with_crc(
                        header.epoch,
                        range,
                        zeroes,
                        &payload,
                        data_crc,
                    )?;
                }
            }
            return Ok(true);
        }
        if !checksum_ok {
            self.refuse(&header, range, RejectReason::Checksum);
            return Ok(true);
        }
        let ack = header.flags.has(WriteFlags::ACK).then_some(header.seq);
        if !range.is_empty() {
            self.before_direct_write()?;
        }
        if range.is_empty() {
            // Nothing to write (an application's zero-length write): durable as it is.
            if let Some(seq) = ack {
                self.emit(ApplyEvent::WriteAck(seq));
            }
            return Ok(true);
        }
        if goes_on_the_ring(&header) {
            // Received into aligned memory of its own (`dr::received`), it goes as it is.
            let data = if placed {
                debug_assert!(
                    payload
                        .as_ptr()
                        .addr()
                        .is_multiple_of(DIRECT_IO_ALIGN as usize)
                );
                WriteData::Received(payload.clone())
            } else {
                let mut buf = self.bufs.take(payload.len());
                buf.copy_from_slice(&payload);
                WriteData::Pooled(buf)
            };
            let fua = header.flags.has(WriteFlags::FUA);
            if !self.submit_write(range, data, fua, ack, false)? {
                self.queue.push_front(ApplyCmd::Write {
                    header,
                    payload,
                    budget,
                    placed,
                });
                return Ok(false);
            }
            return Ok(true);
        }
        // Zeroes or an unaligned write: done here, after every earlier write (a barrier).
        if zeroes {
            self.write_zeroes(range)?;
        } else {
            self.volume
                .read_modify_write(range, Some(&payload), false)?;
        }
        self.counters
            .bytes_written
            .fetch_add(range.len, std::sync::atomic::Ordering::Relaxed);
        if let Some(seq) = ack {
            self.side.direct_written(seq);
        }
        if header.flags.has(WriteFlags::FUA) {
            self.volume.backing().sync_data()?;
            self.synced_outside();
        }
        Ok(true)
    }

    /// Refuses a write: a direct one is sent again; a staged one spoiled the unit of its
    /// epoch and every later one (none of them may apply without it).
    fn refuse(&mut self, header: &WriteHeader, range: ByteRange, reason: RejectReason) {
        if reason == RejectReason::Checksum {
            self.counters
                .extents_rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(seq = %header.seq, %range, "extent failed its CRC; asking for it again");
        }
        self.emit(ApplyEvent::Reject {
            seq: header.seq,
            reason,
        });
    }

    /// Whether a write of `bytes` more may go on the ring now (memory, rule 6).
    fn room_in_flight(&self, bytes: u64) -> bool {
        self.inflight == 0 || self.inflight_bytes + bytes <= self.inflight_limit
    }

    /// Whether the stage log has room for a write of `range`: the bytes of the volume the
    /// unapplied units change (each block once per unit) stay under the cap, and their
    /// records (every copy a catch-up sent) under twice the cap; the file, compacted past
    /// [`COMPACT_BYTES`], stays within that plus [`COMPACT_BYTES`]. A pair whose log is full
    /// falls back to the bitmap (the production side is told with `StageFull`) and the DR
    /// volume stays at its last consistent point.
    fn stage_room(&mut self, range: ByteRange) -> bool {
        let cap = self.stage_log_max_bytes;
        let records = self.log.records_bytes() + range.len;
        // The write's overlap with the open unit is looked up only near the cap: far from
        // it, counting the whole range again cannot pass it.
        let distinct_fits = self.log.distinct_bytes() + range.len <= cap
            || self.log.distinct_bytes_with(range) <= cap;
        if distinct_fits && records <= cap.saturating_mul(RECORDS_PER_CAP) {
            self.stage_full = false;
            return true;
        }
        if !self.stage_full {
            tracing::warn!(
                %range,
                distinct_bytes = self.log.distinct_bytes(),
                records_bytes = self.log.records_bytes(),
                cap,
                "the stage log is at its cap (replication.stage_log_max_bytes; its records at twice that): staged writes are refused, the pair falls back to the bitmap"
            );
            self.stage_full = true;
        }
        false
    }

    /// A seal: the unit is made durable and acknowledged, then applied. A replayed seal is
    /// durable already.
    fn seal(&mut self, epoch: Epoch, cut_ms: u64, append: bool) -> io::Result<()> {
        match self.side.seal_arrived(epoch, append) {
            SealArrival::Staged => {
                self.emit(ApplyEvent::Staged(epoch));
                return Ok(());
            }
            SealArrival::Dropped => return Ok(()),
            SealArrival::Append => {
                self.log.seal(epoch, cut_ms)?;
                self.side.appended(epoch);
                self.emit(ApplyEvent::Staged(epoch));
            }
            SealArrival::Replay => {}
        }
        let allowed = self.allowed.load(std::sync::atomic::Ordering::SeqCst);
        // Held, staged, if its group has not committed it (rule 3).
        match self.side.unit_ready(SealRecord { epoch, cut_ms }, allowed) {
            Some(seal) => self.apply_unit(seal),
            None => Ok(()),
        }
    }

    /// Applies the unit that `seal` ends: every staged write up to its epoch.
    fn apply_unit(&mut self, seal: SealRecord) -> io::Result<()> {
        let unit = self.log.take_unit(seal.epoch);
        self.keep_undo(seal, &unit)?;
        self.unit_started = Some((std::time::Instant::now(), unit.len()));
        self.side.begin_unit(seal, unit.len());
        self.unit_queue = unit.into();
        if self.unit_queue.is_empty() {
            return self.finish_unit();
        }
        self.submit_unit()
    }

    /// Submits the unit's writes, in log order, as far as the ring and the locks allow.
    fn submit_unit(&mut self) -> io::Result<()> {
        while let Some(staged) = self.unit_queue.front().cloned() {
            self.beat.progress();
            if !self.room_in_flight(staged.range.len) {
                return Ok(());
            }
            // Read back from disk: checked like any input.
            if staged.range.end() > self.volume.size() {
                return Err(io::Error::other(format!(
                    "staged write {} lies past the end of the {}-byte DR volume",
                    staged.range,
                    self.volume.size()
                )));
            }
            if staged.range.is_empty() {
                self.unit_queue.pop_front();
                let _ = self.side.unit_write_done();
                continue;
            }
            if self.inflight >= MAX_INFLIGHT {
                return Ok(());
            }
            // As `goes_on_the_ring`, for a staged write's range.
            let fast = !staged.zeroes && staged.range.is_aligned(DIRECT_IO_ALIGN);
            if !fast {
                if self.inflight > 0 {
                    return Ok(());
                }
                self.unit_queue.pop_front();
                if staged.zeroes {
                    self.write_zeroes(staged.range)?;
                } else {
                    let mut data = vec![0u8; staged.range.len as usize];
                    self.log.read(&staged, &mut data)?;
                    self.volume
                        .read_modify_write(staged.range, Some(&data), false)?;
                }
                let _ = self.side.unit_write_done();
                continue;
            }
            let mut buf = self.bufs.take(staged.range.len as usize);
            self.log.read(&staged, &mut buf)?;
            if !self.submit_write(staged.range, WriteData::Pooled(buf), false, None, true)? {
                return Ok(());
            }
            self.unit_queue.pop_front();
        }
        if self.side.unit_written() && self.inflight == 0 {
            self.finish_unit()?;
        }
        Ok(())
    }

    /// Zeroes `range` in pieces, each one progress: zeroing gigabytes is one long call.
    fn write_zeroes(&self, range: ByteRange) -> io::Result<()> {
        let mut at = range.offset;
        while at < range.end() {
            let piece = ByteRange::new(at, ZEROES_PIECE.min(range.end() - at));
            self.volume.write_zeroes(piece, true, false)?;
            self.beat.progress();
            at = piece.end();
        }
        Ok(())
    }

    /// Every write of the unit is on the volume: sync it, record the epoch, report.
    pub(super) fn finish_unit(&mut self) -> io::Result<()> {
        if !self.side.is_applying() {
            return Ok(());
        }
        self.volume.backing().sync_data()?;
        let done = self.side.finish_unit().expect("a unit was being applied");
        for seq in done.answers {
            self.emit(ApplyEvent::WriteAck(seq));
        }
        self.save_state()?;
        self.unit_kept()?;
        // Reported before the log is compacted: the unit is applied and recorded, and the
        // copy (a whole unit's writes, at worst) must not hold the answer back.
        self.emit(ApplyEvent::Applied {
            epoch: done.seal.epoch,
            cut_ms: done.seal.cut_ms,
        });
        let applied_at = std::time::Instant::now();
        // Seals of units not yet applied are durable and acknowledged: a rewritten log
        // keeps them, and a log holding one is never emptied (its unit may have no writes).
        let unapplied = self.seals_not_applied();
        let mut compacted = false;
        if !(unapplied.is_empty() && self.log.truncate_if_empty()?) {
            let beat = &self.beat;
            compacted = self
                .log
                .compact(self.compact_after_bytes, &unapplied, &|| beat.progress())?;
        }
        if let Some((started, writes)) = self.unit_started.take() {
            let wall_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            tracing::debug!(
                epoch = done.seal.epoch.0,
                writes,
                since_cut_ms = wall_ms.saturating_sub(done.seal.cut_ms),
                apply_ms = (applied_at - started).as_secs_f64() * 1e3,
                compact_ms = ?compacted.then(|| applied_at.elapsed().as_secs_f64() * 1e3),
                "unit applied"
            );
        }
        // The volume now holds every write of epochs ≤ this one and none later.
        for v in &done.verifies {
            self.verify(v)?;
        }
        Ok(())
    }

    /// The seals in the stage log whose units are not applied: held for their group's
    /// commit, or queued for replay at start. In epoch order.
    fn seals_not_applied(&self) -> Vec<SealRecord> {
        let replays = self.queue.iter().filter_map(|cmd| match *cmd {
            ApplyCmd::Replay { epoch, cut_ms } => Some(SealRecord { epoch, cut_ms }),
            _ => None,
        });
        self.side.seals_not_applied(replays)
    }

    /// Records the state durably, after checking the machine's invariants.
    fn save_state(&self) -> io::Result<()> {
        if let Err(broken) = self.side.check_invariants() {
            return Err(io::Error::other(format!(
                "the DR side's units broke an invariant: {broken}"
            )));
        }
        dr_state::save(self.side.state(), &self.state_path)
    }

    /// Reads back the blocks a verify names and reports those whose CRC differs.
    fn verify(&self, v: &VerifyCmd) -> io::Result<()> {
        if v.block == 0 || !u64::from(v.block).is_multiple_of(DIRECT_IO_ALIGN) {
            return Err(invalid(format!(
                "a verify request with blocks of {} bytes (not a multiple of {DIRECT_IO_ALIGN})",
                v.block
            )));
        }
        let len = (u64::from(v.block) * v.crcs.len() as u64)
            .min(self.volume.size().saturating_sub(v.offset));
        let Ok(range) = ByteRange::within(v.offset, len, self.volume.size()) else {
            return Err(invalid(format!(
                "a verify request at offset {} is past the end of the {}-byte DR volume",
                v.offset,
                self.volume.size()
            )));
        };
        let aligned = range.align_out(DIRECT_IO_ALIGN);
        let mut buf = AlignedBuf::new(aligned.len as usize);
        self.volume
            .backing()
            .read_exact_at(&mut buf, aligned.offset)?;
        let start = (range.offset - aligned.offset) as usize;
        let here = block_crcs(&buf[start..start + len as usize], v.block as usize);
        let differing = v
            .crcs
            .iter()
            .enumerate()
            .filter(|&(i, crc)| here.get(i) != Some(crc))
            .map(|(i, _)| i as u16)
            .collect();
        self.emit(ApplyEvent::Verified {
            id: v.id,
            differing,
        });
        Ok(())
    }
}

/// What a command is to the gate of a hypermetro group's direct writes (`None`: it never
/// waits there: journaled writes, seals, commits).
fn gating(cmd: &ApplyCmd) -> Option<Gating> {
    match cmd {
        ApplyCmd::Write { header, .. } if header.flags.has(WriteFlags::GATED) => {
            Some(Gating::Gated)
        }
        ApplyCmd::Write { header, .. } if header.flags.has(WriteFlags::DIRECT) => {
            Some(Gating::Direct)
        }
        ApplyCmd::Flush { .. } | ApplyCmd::Verify(_) => Some(Gating::Ordered),
        _ => None,
    }
}

/// The payload bytes a command puts on the ring (none but a write's).
fn payload_bytes(cmd: &ApplyCmd) -> u64 {
    match cmd {
        ApplyCmd::Write { payload, .. } => payload.len() as u64,
        _ => 0,
    }
}

/// A frame the applier cannot act on.
fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}
