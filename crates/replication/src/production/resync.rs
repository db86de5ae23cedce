//! The resync reader of a production pair: the initial sync (every extent, or the dirty
//! ones, written direct on the DR side) and the catch-up (the dirty extents, staged as one
//! unit), read with their blocks locked and queued on the link.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blockrep_core::pair::atomic_spans::unit_to_record;
use blockrep_core::replication::{Admitted, Payload, ReplicationStatus, Ticket};
use blockrep_core::{ByteRange, LockId, ReadSpan, read_spans};
use blockrep_volume::{AlignedBuf, DIRECT_IO_ALIGN, Entered, SharedPool, Volume, Waker};
use bytes::Bytes;

use crate::link::{Data, PairLink};
use crate::membership::MembershipRecord;

use super::ProductionPair;
use super::error::SessionError;
use super::extent_reads::{ExtentRead, ExtentReads, READS_IN_FLIGHT};

/// The smallest extent a resync reads (a journal bound too small for more still moves).
pub const MIN_EXTENT: u64 = 64 << 10;

/// An initial sync's idle read buffers: four extents of the default 4 MiB
/// (`replication.resync_extent`).
const RESYNC_IDLE_BYTES: usize = 16 << 20;

/// A catch-up reads clean blocks between dirty ones when the gap is at most this: one read
/// of a span instead of one per dirty run (only the dirty runs are sent).
const MAX_READ_GAP: u64 = 128 << 10;

/// A resync under way: how much it copies, since when.
pub(super) struct Resync {
    pub(super) total: u64,
    pub(super) started: Instant,
}

impl ProductionPair {
    /// Starts the resync reader for `plan`, if there is anything to resync.
    pub(super) fn start_resync(
        &self,
        plan: ResyncKind,
        stop: Arc<AtomicBool>,
    ) -> Result<Option<std::thread::JoinHandle<()>>, SessionError> {
        let status_detail = match plan {
            ResyncKind::None => {
                // The link went live when it was connected.
                self.set_status(ReplicationStatus::Active, "replicating");
                return Ok(None);
            }
            ResyncKind::Full => "initial sync: copying the volume",
            ResyncKind::DirtyDirect => "completing the first sync",
            ResyncKind::CatchUp => "catching up from the bitmap",
        };
        match plan {
            ResyncKind::CatchUp => {
                self.link.begin_catch_up()?;
                // Recorded before the unit's end can be sealed: a restarted agent reports
                // its span again (docs/GROUPS.md, "Catch-up units are atomic").
                let recorded = self.membership().catch_up_from;
                let from = self
                    .link
                    .unit_in_progress()
                    .map(|new| unit_to_record(recorded, new, self.dr_applied()));
                if from.is_some() && recorded != from {
                    self.membership
                        .update(|m| m.catch_up_from = from)
                        .map_err(|e| {
                            SessionError::Resync(format!("record the catch-up's start: {e}"))
                        })?;
                }
            }
            _ => self.link.go_live(),
        }
        self.link.reset_resync_progress();
        self.set_status(ReplicationStatus::Copying, status_detail);
        let reader = ResyncReader {
            volume: Arc::clone(&self.volume),
            buffers: SharedPool::with_idle_limit(RESYNC_IDLE_BYTES),
            link: Arc::clone(&self.link),
            // An extent never takes more than half the journal's room.
            extent: self
                .config
                .resync_extent
                .min((self.config.journal_bytes / 2).max(MIN_EXTENT)),
            stop,
            final_pass_bytes: (self.config.journal_bytes / 2).min(64 << 20),
        };
        let total = match plan {
            ResyncKind::Full => self.volume.size(),
            _ => self.link.tracker().dirty_bytes(),
        };
        *self.resync.lock().unwrap_or_else(|e| e.into_inner()) = Some(Resync {
            total,
            started: Instant::now(),
        });
        let pair = self.membership().pair;
        let report = ResyncReport {
            membership: Arc::clone(&self.membership),
            done: Arc::clone(&self.resync_done),
            ended: Arc::clone(&self.resync_ended),
        };
        let thread = std::thread::Builder::new()
            .name(format!("resync-{}", &pair.to_string()[..8]))
            .spawn(move || {
                let outcome = match plan {
                    ResyncKind::Full => reader.initial_sync(true),
                    ResyncKind::DirtyDirect => reader.initial_sync(false),
                    _ => reader.catch_up(),
                };
                report.finish(outcome);
            })
            .map_err(|e| SessionError::Resync(e.to_string()))?;
        Ok(Some(thread))
    }
}

/// How the resync thread reports its end.
struct ResyncReport {
    membership: Arc<MembershipRecord>,
    done: Arc<Mutex<Option<Result<ResyncOutcome, String>>>>,
    ended: Arc<tokio::sync::Notify>,
}

impl ResyncReport {
    fn finish(self, outcome: Result<ResyncOutcome, String>) {
        match &outcome {
            Ok(ResyncOutcome::FullSyncDone) => {
                let recorded = self.membership.update(|m| {
                    m.full_sync_done = true;
                    m.discard_peer = false;
                });
                if let Err(e) = recorded {
                    tracing::error!(error = %e, "cannot record the end of the initial sync");
                }
            }
            Ok(ResyncOutcome::CaughtUp | ResyncOutcome::Stopped) => {}
            Err(e) => tracing::error!(error = %e, "resync failed"),
        }
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        self.ended.notify_one();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ResyncKind {
    None,
    /// Every extent of the volume, direct: the DR side never had a copy.
    Full,
    /// The dirty extents, direct: the first sync did not complete its last step.
    DirtyDirect,
    /// The dirty extents, staged as one unit: the DR side keeps its consistent image.
    CatchUp,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum ResyncOutcome {
    FullSyncDone,
    CaughtUp,
    Stopped,
}

/// Reads extents with their blocks locked and queues them on the link.
struct ResyncReader {
    volume: Arc<Volume>,
    /// An initial sync's read buffers, back once the DR side acknowledged their extents.
    buffers: SharedPool,
    link: Arc<PairLink>,
    extent: u64,
    stop: Arc<AtomicBool>,
    final_pass_bytes: u64,
}

impl ResyncReader {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Copies every extent (`whole`) or the dirty ones, written direct on the DR side, then
    /// marks the sync done.
    fn initial_sync(&self, whole: bool) -> Result<ResyncOutcome, String> {
        let waker = Arc::new(Waker::new().map_err(|e| e.to_string())?);
        let mut reads = self.extent_reads()?;
        let runs = if whole {
            vec![ByteRange::new(0, self.volume.size())]
        } else {
            self.link.tracker().dirty_runs()
        };
        for run in runs {
            let mut at = run.offset;
            while at < run.end() {
                if self.stopped() {
                    // The reads in flight are dropped, their blocks let go, never queued.
                    return Ok(ResyncOutcome::Stopped);
                }
                // Holes are cheap to send (no payload): take them in big pieces.
                let piece = ByteRange::new(at, (run.end() - at).min(1 << 30));
                let consumed = self.sync_piece(piece, &waker, &mut reads)?;
                at += consumed;
            }
        }
        self.finish_reads(&mut reads)?;
        if !self.link.wait_for_extents(&|| self.stopped()) {
            return Ok(ResyncOutcome::Stopped);
        }
        // The pair counts as synced only once the DR side recorded it durably.
        let end = self.link.push_sync_done();
        if !self.link.wait_for_sync_done(end, &|| self.stopped()) {
            return Ok(ResyncOutcome::Stopped);
        }
        Ok(ResyncOutcome::FullSyncDone)
    }

    /// An initial sync's reads, into this reader's buffers.
    fn extent_reads(&self) -> Result<ExtentReads, String> {
        ExtentReads::new(Arc::clone(&self.volume), self.buffers.clone())
            .map_err(|e| format!("set up the initial sync's reads: {e}"))
    }

    /// Sends the start of `piece`: a hole whole, or one data extent, whose read it starts
    /// (queued once read, oldest first, with at most [`READS_IN_FLIGHT`] reading). Returns
    /// the bytes it covered: none if a write filled the hole it found.
    fn sync_piece(
        &self,
        piece: ByteRange,
        waker: &Arc<Waker>,
        reads: &mut ExtentReads,
    ) -> Result<u64, String> {
        // Room for one more extent beside those being read: while there is none, the
        // oldest read is queued first (it had room of its own). The reader waits for room
        // only with no blocks locked.
        while !self.link.has_room_for(reads.bytes() + self.extent) {
            if let Some(read) = reads.finish_oldest()? {
                self.queue_extent(read);
                continue;
            }
            if !self.link.wait_for_room(self.extent, &|| self.stopped()) {
                return Ok(piece.len);
            }
            break;
        }
        // Read unlocked to size the lock; a hole is read again with its blocks locked.
        let extents = self
            .volume
            .allocation(piece, 1)
            .map_err(|e| format!("find the data of {piece}: {e}"))?;
        let Some(first) = extents.first().copied() else {
            return Ok(piece.len);
        };
        if first.hole {
            return self.sync_hole(ByteRange::new(piece.offset, first.len), waker, reads);
        }
        let range = ByteRange::new(piece.offset, first.len.min(self.extent));
        let lock = self.lock_extent(range, waker, reads)?;
        reads.start(range, lock)?;
        if reads.len() >= READS_IN_FLIGHT
            && let Some(read) = reads.finish_oldest()?
        {
            self.queue_extent(read);
        }
        Ok(range.len)
    }

    /// Sends `hole` as a zero range if it still is one with its blocks locked (no write can
    /// fill it meanwhile). Returns the bytes sent: none if a write filled its start.
    fn sync_hole(
        &self,
        hole: ByteRange,
        waker: &Arc<Waker>,
        reads: &mut ExtentReads,
    ) -> Result<u64, String> {
        let gate = self.volume.gate();
        let lock = self.lock_extent(hole, waker, reads)?;
        let still = self
            .volume
            .allocation(hole, 1)
            .map_err(|e| format!("find the data of {hole}: {e}"))
            .map(|extents| extents.first().copied());
        let sent = match still {
            Ok(Some(e)) if e.hole => {
                let range = ByteRange::new(hole.offset, e.len);
                let ticket = self.link.tracker().issue_ticket(range);
                self.link.push_sync_extent(range, Payload::Zeroes, ticket);
                Ok(e.len)
            }
            Ok(_) => Ok(0),
            Err(e) => Err(e),
        };
        gate.leave(lock);
        sent
    }

    /// Locks `range` for an initial sync, its earlier extents perhaps still being read.
    /// If a write holds or waits for some of its blocks, those reads are queued first,
    /// letting go of their blocks: the write may be waiting for them too, and locks are
    /// granted first come, first served, so waiting while holding them could wait forever.
    fn lock_extent(
        &self,
        range: ByteRange,
        waker: &Arc<Waker>,
        reads: &mut ExtentReads,
    ) -> Result<LockId, String> {
        let gate = self.volume.gate();
        let lock = match gate.lock(range, waker) {
            Entered::Go(lock) => return Ok(lock),
            Entered::Queued(lock) => lock,
            // Only `WriteGate::enter` refuses (the application's writes, by the volume's
            // role); a lock is always taken or queued.
            Entered::Refused(errno) => {
                return Err(format!(
                    "lock {range}: {}",
                    std::io::Error::from_raw_os_error(errno)
                ));
            }
        };
        let waited = self.finish_reads(reads).and_then(|()| {
            while !gate.is_held(lock) {
                waker
                    .wait_blocking()
                    .map_err(|e| format!("lock {range}: {e}"))?;
            }
            Ok(())
        });
        match waited {
            Ok(()) => Ok(lock),
            Err(e) => {
                gate.leave(lock);
                Err(e)
            }
        }
    }

    /// Queues every extent being read, oldest first.
    fn finish_reads(&self, reads: &mut ExtentReads) -> Result<(), String> {
        while let Some(read) = reads.finish_oldest()? {
            self.queue_extent(read);
        }
        Ok(())
    }

    /// Queues an initial sync's extent, read with its blocks locked, and lets go of them.
    fn queue_extent(&self, read: ExtentRead) {
        let ExtentRead { range, data, lock } = read;
        let payload = payload_of(data);
        let ticket = self.link.tracker().issue_ticket(range);
        self.count_sent(range, &payload);
        self.link.push_sync_extent(range, payload, ticket);
        self.volume.gate().leave(lock);
    }

    /// Sends the extents dirtied and not yet sent, pass after pass, staged as one unit;
    /// once little is left, live writes join the unit and its seal ends the catch-up.
    fn catch_up(&self) -> Result<ResyncOutcome, String> {
        let waker = Arc::new(Waker::new().map_err(|e| e.to_string())?);
        let mut final_pass = false;
        loop {
            let runs = self.link.tracker().unsent_runs();
            let bytes: u64 = runs.iter().map(|r| r.len).sum();
            if !final_pass && bytes <= self.final_pass_bytes {
                if !self.link.begin_final_pass() {
                    return Ok(ResyncOutcome::Stopped);
                }
                final_pass = true;
                continue;
            }
            for span in read_spans(&runs, self.extent, MAX_READ_GAP) {
                if self.stopped() {
                    return Ok(ResyncOutcome::Stopped);
                }
                if !self
                    .link
                    .wait_for_room(span.piece_bytes(), &|| self.stopped())
                {
                    return Ok(ResyncOutcome::Stopped);
                }
                let lock = self
                    .volume
                    .gate()
                    .lock_blocking(span.range, &waker)
                    .map_err(|e| e.to_string())?;
                let admitted: Vec<_> = span
                    .pieces
                    .iter()
                    .map(|_| self.link.admit_catch_up_extent())
                    .collect();
                let read = self.read_range(span.range);
                let mut tickets = Vec::with_capacity(span.pieces.len());
                self.link
                    .tracker()
                    .issue_tickets(span.pieces.iter().copied(), &mut tickets);
                // Queued before the blocks are let go: a live write of the final pass that
                // waited for them is journaled after the data read here, not before it (the
                // DR side applies a unit in stream order).
                let queued = match read {
                    Ok(data) => Ok(self.queue_pieces(&span, &data, admitted, tickets)),
                    Err(e) => {
                        for admitted in admitted {
                            self.link.abandon_catch_up_extent(admitted);
                        }
                        self.link.tracker().forget(tickets);
                        Err(e)
                    }
                };
                self.volume.gate().leave(lock);
                if !queued? {
                    return Ok(ResyncOutcome::Stopped);
                }
            }
            if final_pass {
                let Some(end) = self.link.finish_catch_up() else {
                    return Ok(ResyncOutcome::Stopped);
                };
                // The unit applies whole once its seal is staged; live writes then go on
                // as the model says (direct again, for hypermetro).
                if !self.link.wait_for_catch_up_end(end, &|| self.stopped()) {
                    return Ok(ResyncOutcome::Stopped);
                }
                self.link.go_live();
                return Ok(ResyncOutcome::CaughtUp);
            }
        }
    }

    /// Queues a span's pieces, read into `data`; false if the catch-up was given up. Every
    /// piece goes to the link even then: each leaves its epoch there.
    fn queue_pieces(
        &self,
        span: &ReadSpan,
        data: &Bytes,
        admitted: Vec<Admitted>,
        tickets: Vec<Ticket>,
    ) -> bool {
        let mut given_up = false;
        for ((piece, admitted), ticket) in span.pieces.iter().zip(admitted).zip(tickets) {
            let start = (piece.offset - span.range.offset) as usize;
            let payload = payload_of(data.slice(start..start + piece.len as usize));
            self.count_sent(*piece, &payload);
            given_up |= !self
                .link
                .push_catch_up_extent(admitted, *piece, payload, ticket);
        }
        !given_up
    }

    fn count_sent(&self, range: ByteRange, payload: &Payload<Data>) {
        let counters = &self.link.counters;
        if let Payload::Data(data) = payload {
            counters
                .resync_bytes_sent
                .fetch_add(data.0.len() as u64, Ordering::Relaxed);
        }
        counters
            .resync_bytes_copied
            .fetch_add(range.len, Ordering::Relaxed);
    }

    /// Reads a catch-up's `range` (its blocks locked by the caller) with one I/O, into a
    /// buffer of its own: the spans' lengths vary, and the production host's memory is
    /// bounded by what they hold.
    fn read_range(&self, range: ByteRange) -> Result<Bytes, String> {
        let aligned = range.align_out(DIRECT_IO_ALIGN);
        let mut buf = AlignedBuf::new(aligned.len as usize);
        self.volume
            .backing()
            .read_exact_at(&mut buf, aligned.offset)
            .map_err(|e| format!("read {range}: {e}"))?;
        let start = (range.offset - aligned.offset) as usize;
        Ok(Bytes::from_owner(buf).slice(start..start + range.len as usize))
    }
}

/// Data to send: all zeroes go as a zero range, without payload.
fn payload_of(data: Bytes) -> Payload<Data> {
    if is_zero(&data) {
        Payload::Zeroes
    } else {
        Payload::Data(Data(data))
    }
}

fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: any bytes are valid u128s; align_to splits off what is not aligned.
    let (head, body, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;
    use std::time::Duration;

    use blockrep_core::pair::production::Transmit;
    use blockrep_core::pair::state::PairState;
    use blockrep_core::replication::{Epoch, ReplicationModel};
    use blockrep_volume::{Backing, DirtyTracker, TrackerConfig};

    use super::*;
    use crate::clock::ManualClock;

    const EXTENT: u64 = 4 << 20;
    const VOLUME: u64 = 4 * EXTENT;

    /// A resync reader of 4 MiB extents over a 16 MiB volume full of data, its link
    /// copying (an initial sync's).
    fn reader(dir: &std::path::Path) -> ResyncReader {
        reader_over(dir, ByteRange::new(0, VOLUME))
    }

    /// As [`reader`], the volume a sparse file with only `data` written.
    fn reader_over(dir: &std::path::Path, data: ByteRange) -> ResyncReader {
        use std::os::unix::fs::FileExt;
        let path = dir.join("prod.img");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(VOLUME).unwrap();
        file.write_all_at(&pattern(data), data.offset).unwrap();
        let (tracker, _) =
            DirtyTracker::open(&dir.join("bitmap"), VOLUME, TrackerConfig::default()).unwrap();
        let tracker = Arc::new(tracker);
        let volume = Arc::new(Volume::new(
            "prod".into(),
            Backing::open(&path, blockrep_core::CacheMode::Writeback).unwrap(),
            Some(Arc::clone(&tracker)),
        ));
        let link = PairLink::new(
            ReplicationModel::Async,
            tracker,
            64 << 20,
            Epoch(1),
            PairState::Connecting,
            Arc::new(ManualClock::default()),
        );
        link.connected(Epoch(1), true).unwrap();
        link.go_live();
        ResyncReader {
            volume,
            buffers: SharedPool::with_idle_limit(RESYNC_IDLE_BYTES),
            link: Arc::new(link),
            extent: EXTENT,
            stop: Arc::new(AtomicBool::new(false)),
            final_pass_bytes: 0,
        }
    }

    /// Bytes that differ in every 4 KiB block of `range` (none zero): a read put in the
    /// wrong buffer or at the wrong offset shows.
    fn pattern(range: ByteRange) -> Vec<u8> {
        (range.offset..range.end())
            .map(|at| ((at / 4096) as u8).wrapping_mul(31) | 1)
            .collect()
    }

    fn copied(reader: &ResyncReader) -> u64 {
        reader
            .link
            .counters
            .resync_bytes_copied
            .load(Ordering::Relaxed)
    }

    /// A write across the boundary of two extents waits for the first, being read. The
    /// reader, locking the second, would wait for that write: it queues the first extent
    /// (letting go of its blocks) before it waits, or neither could go on.
    #[test]
    fn the_reader_lets_go_of_the_extents_it_reads_before_it_waits_behind_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let reader = reader(dir.path());
        let waker = Arc::new(Waker::new().unwrap());
        let mut reads = reader.extent_reads().unwrap();
        let first = ByteRange::new(0, EXTENT);
        let lock = reader.lock_extent(first, &waker, &mut reads).unwrap();
        reads.start(first, lock).unwrap();

        let volume = Arc::clone(&reader.volume);
        let link = Arc::clone(&reader.link);
        let writer_waker = Arc::new(Waker::new().unwrap());
        let across = ByteRange::new(EXTENT - 4096, 8192);
        let Entered::Queued(write) = volume.gate().lock(across, &writer_waker) else {
            panic!("the write waits for the extent being read");
        };
        let writer = std::thread::spawn(move || {
            while !volume.gate().is_held(write) {
                writer_waker.wait_blocking().unwrap();
            }
            let queued_first = link.counters.resync_bytes_copied.load(Ordering::Relaxed);
            volume.gate().leave(write);
            queued_first
        });

        let (locked, seen) = mpsc::channel();
        let locker = std::thread::spawn(move || {
            let second = ByteRange::new(EXTENT, EXTENT);
            let lock = reader.lock_extent(second, &waker, &mut reads);
            locked.send(()).unwrap();
            (reader, reads, lock)
        });
        seen.recv_timeout(Duration::from_secs(30))
            .expect("the reader locked the second extent (it did not wait forever)");
        let (reader, reads, lock) = locker.join().unwrap();
        assert_eq!(
            writer.join().unwrap(),
            EXTENT,
            "the write got its blocks only once the extent read before it was queued"
        );
        assert_eq!(
            reads.len(),
            0,
            "the first extent was queued before the wait"
        );
        assert_eq!(copied(&reader), EXTENT);
        reader.volume.gate().leave(lock.unwrap());
        assert!(reader.volume.gate().idle());
    }

    /// A sync that stops with reads in flight never queues their extents, and lets go of
    /// their blocks once the reads completed.
    #[test]
    fn reads_dropped_in_flight_let_go_of_their_blocks_unqueued() {
        let dir = tempfile::tempdir().unwrap();
        let reader = reader(dir.path());
        let waker = Arc::new(Waker::new().unwrap());
        let mut reads = reader.extent_reads().unwrap();
        for i in 0..READS_IN_FLIGHT as u64 {
            let range = ByteRange::new(i * EXTENT, EXTENT);
            let lock = reader.lock_extent(range, &waker, &mut reads).unwrap();
            reads.start(range, lock).unwrap();
        }
        assert_eq!(reads.bytes(), READS_IN_FLIGHT as u64 * EXTENT);
        assert!(!reader.volume.gate().idle());
        drop(reads);
        assert!(reader.volume.gate().idle());
        assert_eq!(copied(&reader), 0);
    }

    /// A hole found unlocked that a write filled before its blocks were locked is not sent
    /// as zeroes: the reader sends nothing, and reads it as data next.
    #[test]
    fn a_hole_filled_before_it_was_locked_is_not_sent_as_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let reader = reader_over(dir.path(), ByteRange::new(0, EXTENT));
        let waker = Arc::new(Waker::new().unwrap());
        let mut reads = reader.extent_reads().unwrap();
        let hole = ByteRange::new(EXTENT, EXTENT);
        let found = reader.volume.allocation(hole, 1).unwrap();
        assert!(found[0].hole, "{found:?}");
        // The write lands between the first look and the lock.
        reader
            .volume
            .backing()
            .write_all_at(&pattern(ByteRange::new(EXTENT, 4096)), EXTENT)
            .unwrap();
        assert_eq!(reader.sync_hole(hole, &waker, &mut reads).unwrap(), 0);
        let mut frames = Vec::new();
        reader.link.take_frames(u64::MAX, &mut frames);
        assert!(frames.is_empty(), "{frames:?}");
        assert!(reader.volume.gate().idle());
    }

    /// The whole initial sync, reads in flight: the data extents are read and queued with
    /// their bytes, the holes as zero ranges, and the blocks are free at the end.
    #[test]
    fn an_initial_sync_queues_every_extent_read_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let data = ByteRange::new(EXTENT, 2 * EXTENT);
        let reader = reader_over(dir.path(), data);
        let waker = Arc::new(Waker::new().unwrap());
        let mut reads = reader.extent_reads().unwrap();
        let mut at = 0;
        while at < VOLUME {
            at += reader
                .sync_piece(ByteRange::new(at, VOLUME - at), &waker, &mut reads)
                .unwrap();
        }
        reader.finish_reads(&mut reads).unwrap();
        assert_eq!(copied(&reader), data.len, "the data extents were read");
        let mut frames = Vec::new();
        reader.link.take_frames(u64::MAX, &mut frames);
        let mut covered = 0;
        for frame in frames {
            let Transmit::Write(w) = frame else { continue };
            covered += w.range.len;
            match w.payload {
                Payload::Data(Data(bytes)) => assert_eq!(bytes, pattern(w.range), "{}", w.range),
                Payload::Zeroes => assert!(
                    w.range.end() <= data.offset || w.range.offset >= data.end(),
                    "{} sent as zeroes",
                    w.range
                ),
            }
        }
        assert_eq!(covered, VOLUME, "every byte of the volume was sent once");
        assert_eq!(
            reader
                .link
                .counters
                .resync_bytes_sent
                .load(Ordering::Relaxed),
            data.len,
            "the data went with its bytes, the holes as zero ranges"
        );
        assert!(reader.volume.gate().idle());
    }
}
