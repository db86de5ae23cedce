//! An initial sync's extent reads in flight, on an io_uring of the resync thread: the
//! device reads the next extent while the thread waits for the CPU and queues the one
//! before. Each extent's blocks stay locked from before its read until the reader has
//! queued it (or given it up), and reads finish oldest first.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use blockrep_core::{ByteRange, LockId};
use blockrep_volume::ring::{DRAIN_PATIENCE, drain};
use blockrep_volume::{AlignedBuf, DIRECT_IO_ALIGN, SharedPool, Volume};
use bytes::Bytes;
use io_uring::{IoUring, opcode, types};

/// Reads an initial sync keeps in flight. Two keep the device busy while the resync thread
/// waits for the CPU, scans the extent before for zeroes and queues it. More did not help
/// on the development machine's disk: fio's 4 MiB `O_DIRECT` reads gave 1190 MiB/s at
/// queue depth 1, 1402 at 2 and 1129 at 4 (the kernel splits a 4 MiB read into several
/// requests already).
pub const READS_IN_FLIGHT: usize = 2;

/// An extent read and still locked: the reader queues it, then lets go of its blocks
/// (nothing else does: dropped unqueued, its blocks would stay locked).
#[must_use]
pub(super) struct ExtentRead {
    pub(super) range: ByteRange,
    pub(super) data: Bytes,
    pub(super) lock: LockId,
}

/// An extent being read: its buffer is the kernel's until the read completes.
struct InFlight {
    range: ByteRange,
    /// `range` widened to the direct-I/O alignment: what is read into `buf`.
    aligned: ByteRange,
    buf: AlignedBuf,
    /// Whether `buf` came from (and goes back to) the pool.
    pooled: bool,
    lock: LockId,
    /// The read's result (bytes read, or a negated errno), once it completed.
    result: Option<i32>,
    sequence: u64,
}

pub(super) struct ExtentReads {
    volume: Arc<Volume>,
    /// Read buffers, back once the DR side acknowledged their extents.
    pool: SharedPool,
    ring: IoUring,
    in_flight: VecDeque<InFlight>,
    next_sequence: u64,
    /// An operation may still point at the buffers of `in_flight`: they are leaked, not
    /// freed, when it is dropped.
    ring_failed: bool,
}

impl ExtentReads {
    pub(super) fn new(volume: Arc<Volume>, pool: SharedPool) -> io::Result<Self> {
        Ok(Self {
            volume,
            pool,
            ring: IoUring::new(READS_IN_FLIGHT.next_power_of_two() as u32)?,
            in_flight: VecDeque::with_capacity(READS_IN_FLIGHT),
            next_sequence: 0,
            ring_failed: false,
        })
    }

    pub(super) fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// The bytes of the extents being read (not yet queued on the link).
    pub(super) fn bytes(&self) -> u64 {
        self.in_flight.iter().map(|r| r.range.len).sum()
    }

    /// Starts reading `range`, its blocks locked with `lock` (which the reads now hold),
    /// into a pooled buffer if one holds it exactly (a power-of-two length).
    pub(super) fn start(&mut self, range: ByteRange, lock: LockId) -> Result<(), String> {
        let aligned = range.align_out(DIRECT_IO_ALIGN);
        let len = aligned.len as usize;
        let pooled = len.is_power_of_two();
        let mut buf = if pooled {
            self.pool.take(len)
        } else {
            AlignedBuf::new(len)
        };
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let read = opcode::Read::new(
            types::Fd(self.volume.backing().fd().as_raw_fd()),
            buf.as_mut_ptr(),
            len as u32,
        )
        .offset(aligned.offset)
        .build()
        .user_data(sequence);
        // SAFETY: the buffer is kept in `in_flight` until the read completes (or, if the
        // ring fails, leaked): its heap memory does not move with it.
        let pushed = unsafe { self.ring.submission().push(&read) };
        let read = InFlight {
            range,
            aligned,
            buf,
            pooled,
            lock,
            result: None,
            sequence,
        };
        if pushed.is_err() {
            // More reads than the ring holds: a caller's bug, not the device's.
            self.volume.gate().leave(read.lock);
            return Err(format!("read {range}: the resync's read ring is full"));
        }
        self.in_flight.push_back(read);
        if let Err(e) = self.ring.submit() {
            self.ring_failed = true;
            return Err(format!("read {range}: submit: {e}"));
        }
        Ok(())
    }

    /// Waits for the oldest read; `None` if none is in flight. A read that failed leaves
    /// its blocks and is an error (the others stay in flight, for the drop to settle).
    pub(super) fn finish_oldest(&mut self) -> Result<Option<ExtentRead>, String> {
        let Some(oldest) = self.in_flight.front() else {
            return Ok(None);
        };
        let range = oldest.range;
        while self.in_flight.front().is_some_and(|r| r.result.is_none()) {
            if let Err(e) = self.reap() {
                self.ring_failed = true;
                return Err(format!("read {range}: wait for the read: {e}"));
            }
        }
        let read = self.in_flight.pop_front().expect("checked above");
        let result = read.result.expect("the loop above waits for it");
        match self.complete(read, result) {
            Ok(read) => Ok(Some(read)),
            Err((lock, e)) => {
                self.volume.gate().leave(lock);
                Err(format!("read {range}: {e}"))
            }
        }
    }

    /// Waits for a completion, then takes those the ring holds (none if a signal came
    /// first: the caller waits again).
    fn reap(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => return Ok(()),
            Err(e) => return Err(e),
        }
        for completion in self.ring.completion() {
            let sequence = completion.user_data();
            if let Some(read) = self.in_flight.iter_mut().find(|r| r.sequence == sequence) {
                read.result = Some(completion.result());
            }
        }
        Ok(())
    }

    /// The data of a completed read: a short one (which a regular file or device gives only
    /// at its end, or on a signal), or one interrupted or refused for now, is read on,
    /// blocking.
    fn complete(&self, read: InFlight, result: i32) -> Result<ExtentRead, (LockId, io::Error)> {
        let InFlight {
            range,
            aligned,
            mut buf,
            pooled,
            lock,
            ..
        } = read;
        let done = match result {
            0.. => result as usize,
            _ if -result == libc::EINTR || -result == libc::EAGAIN => 0,
            _ => return Err((lock, io::Error::from_raw_os_error(-result))),
        };
        if done < buf.len() {
            let rest = &mut buf[done..];
            if let Err(e) = self
                .volume
                .backing()
                .read_exact_at(rest, aligned.offset + done as u64)
            {
                return Err((lock, e));
            }
        }
        let data = if pooled {
            Bytes::from_owner(self.pool.returning(buf))
        } else {
            Bytes::from_owner(buf)
        };
        let start = (range.offset - aligned.offset) as usize;
        Ok(ExtentRead {
            range,
            data: data.slice(start..start + range.len as usize),
            lock,
        })
    }
}

impl Drop for ExtentReads {
    /// Reads not finished (the sync stopped or failed): their extents were never queued.
    /// Each buffer is freed once its read completed, and each extent's blocks are let go.
    fn drop(&mut self) {
        let outstanding = self.in_flight.iter().filter(|r| r.result.is_none()).count();
        if outstanding > 0 && !self.ring_failed {
            let in_flight = &mut self.in_flight;
            let drained = drain(&mut self.ring, outstanding, DRAIN_PATIENCE, |sequence| {
                if let Some(read) = in_flight.iter_mut().find(|r| r.sequence == sequence) {
                    read.result = Some(0);
                }
            });
            if let Err(e) = drained {
                tracing::error!(error = %e, "an initial sync's reads did not complete: their buffers are leaked");
            }
        }
        for read in self.in_flight.drain(..) {
            self.volume.gate().leave(read.lock);
            if read.result.is_none() {
                // The kernel may still write into it.
                std::mem::forget(read.buf);
            }
        }
    }
}
