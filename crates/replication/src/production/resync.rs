//! The resync reader of a production pair: the initial sync (every extent, or the dirty
//! ones, written direct on the DR side) and the catch-up (the dirty extents, staged as one
//! unit), read with their blocks locked and queued on the link.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blockrep_core::pair::atomic_spans::unit_to_record;
use blockrep_core::replication::{Admitted, Payload, ReplicationStatus, Ticket};
use blockrep_core::{ByteRange, ReadSpan, read_spans};
use blockrep_volume::{AlignedBuf, DIRECT_IO_ALIGN, SharedPool, Volume, Waker};
use bytes::Bytes;

use crate::link::{Data, PairLink};
use crate::membership::MembershipRecord;

use super::ProductionPair;
use super::error::SessionError;

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
        let runs = if whole {
            vec![ByteRange::new(0, self.volume.size())]
        } else {
            self.link.tracker().dirty_runs()
        };
        for run in runs {
            let mut at = run.offset;
            while at < run.end() {
                if self.stopped() {
                    return Ok(ResyncOutcome::Stopped);
                }
                // Holes are cheap to send (no payload): take them in big pieces.
                let piece = ByteRange::new(at, (run.end() - at).min(1 << 30));
                let consumed = self.sync_piece(piece, &waker)?;
                at += consumed;
            }
        }
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

    /// Sends the start of `piece`: a hole whole, or one data extent. Returns the bytes it
    /// covered.
    fn sync_piece(&self, piece: ByteRange, waker: &Arc<Waker>) -> Result<u64, String> {
        if !self.link.wait_for_room(self.extent, &|| self.stopped()) {
            return Ok(piece.len);
        }
        let gate = self.volume.gate();
        let lock = gate
            .lock_blocking(piece, waker)
            .map_err(|e| e.to_string())?;
        // Allocation is read with the blocks locked: no write can fill a hole meanwhile.
        let first = self
            .volume
            .allocation(piece, 1)
            .map_err(|e| e.to_string())
            .map(|extents| extents.first().copied());
        let result = match first {
            Ok(Some(e)) if e.hole => {
                let range = ByteRange::new(piece.offset, e.len);
                let ticket = self.link.tracker().issue_ticket(range);
                self.link.push_sync_extent(range, Payload::Zeroes, ticket);
                Ok(e.len)
            }
            Ok(Some(e)) => {
                let range = ByteRange::new(piece.offset, e.len.min(self.extent));
                self.read_extent(range).map(|payload| {
                    let ticket = self.link.tracker().issue_ticket(range);
                    self.count_sent(range, &payload);
                    self.link.push_sync_extent(range, payload, ticket);
                    range.len
                })
            }
            Ok(None) => Ok(piece.len),
            Err(e) => Err(e),
        };
        gate.leave(lock);
        result
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
                let read = self.read_range(span.range, None);
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

    /// Reads an initial sync's extent (its blocks locked by the caller) into a buffer of
    /// `buffers`: zeroes are sent as a zero range.
    fn read_extent(&self, range: ByteRange) -> Result<Payload<Data>, String> {
        self.read_range(range, Some(&self.buffers)).map(payload_of)
    }

    /// Reads `range` (its blocks locked by the caller) with one I/O, into a buffer of
    /// `pool` if one holds it exactly (a power-of-two length), which goes back to it once
    /// the link lets go of the data. A catch-up's spans take buffers of their own: their
    /// lengths vary, and the production host's memory is bounded by what they hold.
    fn read_range(&self, range: ByteRange, pool: Option<&SharedPool>) -> Result<Bytes, String> {
        let aligned = range.align_out(DIRECT_IO_ALIGN);
        let len = aligned.len as usize;
        let pool = pool.filter(|_| len.is_power_of_two());
        let mut buf = match pool {
            Some(pool) => pool.take(len),
            None => AlignedBuf::new(len),
        };
        self.volume
            .backing()
            .read_exact_at(&mut buf, aligned.offset)
            .map_err(|e| format!("read {range}: {e}"))?;
        let data = match pool {
            Some(pool) => Bytes::from_owner(pool.returning(buf)),
            None => Bytes::from_owner(buf),
        };
        let start = (range.offset - aligned.offset) as usize;
        Ok(data.slice(start..start + range.len as usize))
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
