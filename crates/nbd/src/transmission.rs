//! The transmission phase: one thread per connection, one io_uring for its socket and its
//! disk I/O.
//!
//! Each turn of the loop submits everything queued (a receive, a send of all replies ready,
//! the disk operations) with one `io_uring_enter`, waits for at least one completion, handles
//! the completions, parses every complete request in the input buffer, and admits the batch
//! of writes to the dirty tracker at once, so many requests cost one system call and a hot
//! region's writes cost no bitmap I/O. Replies go out as operations complete, in any order.
//!
//! Aligned reads, writes and flushes go to io_uring; unaligned I/O, zeroing and discard take
//! the volume's blocking slow paths. Without `O_DIRECT` (writeback cache mode) writes are
//! copies into the page cache, which io_uring would hand to a worker thread each: they are
//! done inline instead.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use blockrep_core::{ByteRange, RangeError};
use blockrep_volume::{AlignedBuf, BufPool, DIRECT_IO_ALIGN, Volume};
use io_uring::{IoUring, opcode, squeue, types};

use crate::proto::*;

const RING_ENTRIES: u32 = 256;
/// Disk operations in flight per connection before the loop stops reading requests.
const MAX_INFLIGHT: usize = 128;
const INBUF_BYTES: usize = 256 << 10;
/// Queued reply bytes before the loop stops reading requests.
const OUT_HIGH_WATER: usize = 64 << 20;
/// A write payload at least this large is received straight into its aligned buffer.
const DIRECT_RECV_MIN: usize = 64 << 10;

const UD_RECV: u64 = u64::MAX;
const UD_SEND: u64 = u64::MAX - 1;

/// What a connection did, for the log line at its end.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnectionStats {
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests answered with an error because of what the client sent.
    pub rejected: u64,
    /// Why the connection ended, if the client broke the protocol.
    pub protocol_error: Option<&'static str>,
}

enum DiskOp {
    Read {
        handle: u64,
        buf: AlignedBuf,
        offset: u64,
        done: usize,
    },
    Write {
        handle: u64,
        buf: AlignedBuf,
        offset: u64,
        done: usize,
        fua: bool,
    },
    Flush {
        handle: u64,
    },
}

/// A write whose payload is still arriving. `reject` is the error to answer once it has
/// been consumed, for writes that must not reach the disk.
struct Payload {
    req: Request,
    buf: AlignedBuf,
    filled: usize,
    reject: Option<i32>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Input {
    Open,
    /// EOF, disconnect request or protocol error: finish what is in flight, then close.
    Closing,
}

pub struct Connection {
    sock: RawFd,
    disk: RawFd,
    volume: Arc<Volume>,
    inline_writes: bool,
    ring: IoUring,
    input: Input,
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    recv_inflight: bool,
    recv_into_payload: bool,
    payload: Option<Payload>,
    out: Vec<u8>,
    sending: Vec<u8>,
    sent: usize,
    send_inflight: bool,
    send_failed: bool,
    ops: Vec<Option<DiskOp>>,
    free_slots: Vec<usize>,
    inflight: usize,
    pool: BufPool,
    to_admit: Vec<(usize, ByteRange)>,
    ranges: Vec<ByteRange>,
    ready: Vec<bool>,
    completions: Vec<(u64, i32)>,
    stats: ConnectionStats,
}

impl Connection {
    /// `sock` must stay open until `run` returns.
    pub fn new(sock: RawFd, volume: Arc<Volume>) -> io::Result<Self> {
        let disk = volume.backing().fd().as_raw_fd();
        let inline_writes = !volume.backing().is_direct();
        Ok(Self {
            sock,
            disk,
            inline_writes,
            volume,
            ring: new_ring()?,
            input: Input::Open,
            inbuf: vec![0u8; INBUF_BYTES].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            recv_inflight: false,
            recv_into_payload: false,
            payload: None,
            out: Vec::with_capacity(64 << 10),
            sending: Vec::with_capacity(64 << 10),
            sent: 0,
            send_inflight: false,
            send_failed: false,
            ops: Vec::new(),
            free_slots: Vec::new(),
            inflight: 0,
            pool: BufPool::default(),
            to_admit: Vec::new(),
            ranges: Vec::new(),
            ready: Vec::new(),
            completions: Vec::new(),
            stats: ConnectionStats::default(),
        })
    }

    /// Serves requests until the client disconnects or breaks the protocol, then waits for
    /// every operation in flight and sends their replies.
    pub fn run(mut self) -> io::Result<ConnectionStats> {
        loop {
            self.queue_recv()?;
            self.queue_send()?;
            if self.finished() {
                return Ok(self.stats);
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            self.completions.clear();
            self.completions
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for i in 0..self.completions.len() {
                let (user_data, result) = self.completions[i];
                match user_data {
                    UD_RECV => self.on_recv(result),
                    UD_SEND => self.on_send(result),
                    slot => self.on_disk(slot as usize, result)?,
                }
            }
            self.parse_input()?;
            self.submit_admitted_writes()?;
        }
    }

    fn finished(&self) -> bool {
        self.input == Input::Closing
            && !self.recv_inflight
            && self.inflight == 0
            && !self.send_inflight
            && (self.out.is_empty() || self.send_failed)
    }

    fn close_input(&mut self, protocol_error: Option<&'static str>) {
        if self.input == Input::Closing {
            return;
        }
        self.input = Input::Closing;
        if let Some(reason) = protocol_error {
            self.stats.protocol_error = Some(reason);
        }
        // Wakes a receive in flight with EOF; replies can still be sent.
        // SAFETY: shutdown on a socket fd we were given for the life of `run`.
        unsafe { libc::shutdown(self.sock, libc::SHUT_RD) };
    }

    // ---- socket input ----

    fn queue_recv(&mut self) -> io::Result<()> {
        if self.recv_inflight
            || self.input == Input::Closing
            || self.inflight >= MAX_INFLIGHT
            || self.out.len() >= OUT_HIGH_WATER
        {
            return Ok(());
        }
        let direct = self.in_start == self.in_end
            && self
                .payload
                .as_ref()
                .is_some_and(|p| p.req.len as usize - p.filled >= DIRECT_RECV_MIN);
        let (ptr, len) = if direct {
            let p = self.payload.as_mut().expect("checked above");
            let want = p.req.len as usize - p.filled;
            // SAFETY: filled < len <= capacity of the buffer.
            (unsafe { p.buf.as_mut_ptr().add(p.filled) }, want)
        } else {
            if self.in_start == self.in_end {
                self.in_start = 0;
                self.in_end = 0;
            } else if self.in_end == self.inbuf.len() {
                self.inbuf.copy_within(self.in_start..self.in_end, 0);
                self.in_end -= self.in_start;
                self.in_start = 0;
            }
            let spare = &mut self.inbuf[self.in_end..];
            (spare.as_mut_ptr(), spare.len())
        };
        // A payload is received whole (io_uring retries until it is), not one socket buffer's
        // worth per turn of the loop.
        let flags = if direct { libc::MSG_WAITALL } else { 0 };
        let sqe = opcode::Recv::new(types::Fd(self.sock), ptr, len.min(u32::MAX as usize) as u32)
            .flags(flags)
            .build()
            .user_data(UD_RECV);
        self.push(sqe)?;
        self.recv_inflight = true;
        self.recv_into_payload = direct;
        Ok(())
    }

    fn on_recv(&mut self, result: i32) {
        self.recv_inflight = false;
        match result {
            n if n > 0 => {
                let n = n as usize;
                if self.recv_into_payload {
                    let p = self.payload.as_mut().expect("payload outlives its receive");
                    p.filled += n;
                    self.stats.bytes_written += n as u64;
                } else {
                    self.in_end += n;
                }
            }
            0 => self.close_input(None),
            e if -e == libc::EINTR || -e == libc::EAGAIN => {}
            e => {
                tracing::debug!(error = %io::Error::from_raw_os_error(-e), "receive failed");
                self.close_input(None);
            }
        }
    }

    /// Consumes every complete request (and payload) in the input buffer.
    fn parse_input(&mut self) -> io::Result<()> {
        loop {
            if let Some(p) = self.payload.as_mut() {
                let avail = self.in_end - self.in_start;
                let n = avail.min(p.req.len as usize - p.filled);
                p.buf[p.filled..p.filled + n]
                    .copy_from_slice(&self.inbuf[self.in_start..self.in_start + n]);
                p.filled += n;
                self.in_start += n;
                self.stats.bytes_written += n as u64;
                if p.filled < p.req.len as usize {
                    break;
                }
                let p = self.payload.take().expect("checked above");
                self.write_arrived(p)?;
                continue;
            }
            if self.input == Input::Closing || self.in_end - self.in_start < REQUEST_HEADER_LEN {
                break;
            }
            let header: &[u8; REQUEST_HEADER_LEN] = self.inbuf
                [self.in_start..self.in_start + REQUEST_HEADER_LEN]
                .try_into()
                .expect("length checked");
            self.in_start += REQUEST_HEADER_LEN;
            match Request::parse(header) {
                Ok(req) => self.dispatch(req)?,
                Err(bad) => {
                    tracing::warn!(%bad, "closing connection: bad request magic");
                    self.close_input(Some("bad request magic"));
                }
            }
        }
        // A payload that completed through a direct receive.
        if let Some(p) = self.payload.as_ref()
            && p.filled == p.req.len as usize
        {
            let p = self.payload.take().expect("checked above");
            self.write_arrived(p)?;
        }
        Ok(())
    }

    // ---- requests ----

    fn dispatch(&mut self, req: Request) -> io::Result<()> {
        self.stats.requests += 1;
        if req.command == Command::Write {
            if req.len > MAX_PAYLOAD {
                tracing::warn!(
                    len = req.len,
                    "closing connection: write payload over the 32 MiB limit"
                );
                self.close_input(Some("write payload too large"));
                return Ok(());
            }
            let reject = self.check(&req).err();
            let buf = self.pool.take(req.len as usize);
            self.payload = Some(Payload {
                req,
                buf,
                filled: 0,
                reject,
            });
            return Ok(());
        }
        if let Err(errno) = self.check(&req) {
            self.reply_error(req.handle, errno);
            return Ok(());
        }
        let range = ByteRange::new(req.offset, u64::from(req.len));
        match req.command {
            Command::Read if range.is_aligned(DIRECT_IO_ALIGN) && !range.is_empty() => {
                let buf = self.pool.take(req.len as usize);
                let slot = self.insert(DiskOp::Read {
                    handle: req.handle,
                    buf,
                    offset: req.offset,
                    done: 0,
                });
                self.submit_disk(slot)?;
            }
            Command::Read if range.is_empty() => self.reply_data(req.handle, &[]),
            Command::Read => {
                let mut buf = self.pool.take(req.len as usize);
                match self.volume.read_unaligned(range, &mut buf) {
                    Ok(()) => {
                        self.stats.bytes_read += buf.len() as u64;
                        self.reply_data(req.handle, &buf);
                    }
                    Err(e) => self.reply_error(req.handle, e.raw_os_error().unwrap_or(libc::EIO)),
                }
                self.pool.give(buf);
            }
            Command::Flush => {
                let slot = self.insert(DiskOp::Flush { handle: req.handle });
                self.submit_disk(slot)?;
            }
            Command::Trim => {
                let done = self.volume.trim(range, req.fua());
                self.reply_result(req.handle, done.map_err(|e| log_io_error("trim", &e)));
            }
            Command::WriteZeroes => {
                let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
                let done = self.volume.write_zeroes(range, may_trim, req.fua());
                self.reply_result(
                    req.handle,
                    done.map_err(|e| log_io_error("write zeroes", &e)),
                );
            }
            Command::Disconnect => self.close_input(None),
            Command::Write | Command::Unsupported(_) => unreachable!("handled before"),
        }
        Ok(())
    }

    /// The errno a request gets without touching the disk, if any.
    fn check(&mut self, req: &Request) -> Result<(), i32> {
        let result = self.validate(req);
        if result.is_err() {
            self.stats.rejected += 1;
        }
        result
    }

    fn validate(&self, req: &Request) -> Result<(), i32> {
        if let Command::Unsupported(_) = req.command {
            return Err(libc::EINVAL);
        }
        if req.flags & !req.command.allowed_flags() != 0 {
            return Err(libc::EINVAL);
        }
        if matches!(req.command, Command::Flush | Command::Disconnect) {
            return Ok(());
        }
        if req.command == Command::Read && req.len > MAX_PAYLOAD {
            return Err(libc::EINVAL);
        }
        match ByteRange::within(req.offset, u64::from(req.len), self.volume.size()) {
            Ok(_) => Ok(()),
            Err(RangeError::PastEnd { .. }) if req.command != Command::Read => Err(libc::ENOSPC),
            Err(_) => Err(libc::EINVAL),
        }
    }

    fn write_arrived(&mut self, p: Payload) -> io::Result<()> {
        let Payload {
            req,
            mut buf,
            reject,
            ..
        } = p;
        if let Some(errno) = reject {
            self.reply_error(req.handle, errno);
            self.pool.give(buf);
            return Ok(());
        }
        let range = ByteRange::new(req.offset, u64::from(req.len));
        if range.is_empty() {
            self.reply_ok(req.handle);
        } else if range.is_aligned(DIRECT_IO_ALIGN) {
            let slot = self.insert(DiskOp::Write {
                handle: req.handle,
                buf,
                offset: req.offset,
                done: 0,
                fua: req.fua(),
            });
            self.to_admit.push((slot, range));
            return Ok(());
        } else {
            buf.set_len(req.len as usize);
            let done = self.volume.write_unaligned(range, Some(&buf), req.fua());
            self.reply_result(req.handle, done.map_err(|e| log_io_error("write", &e)));
        }
        self.pool.give(buf);
        Ok(())
    }

    /// Admits this turn's writes to the dirty tracker together, then starts them: first the
    /// writes whose regions are already in the on-disk activity log, then, once the log write
    /// they need is durable, the writes into new regions.
    fn submit_admitted_writes(&mut self) -> io::Result<()> {
        if self.to_admit.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.to_admit);
        self.ranges.clear();
        self.ranges.extend(batch.iter().map(|(_, r)| *r));
        let tracker = self.volume.tracker().cloned();
        let admitted = match &tracker {
            Some(tracker) => tracker.admit_batch(&self.ranges, &mut self.ready),
            None => {
                self.ready.clear();
                self.ready.resize(batch.len(), true);
                Ok(None)
            }
        };
        match admitted {
            Err(e) => self.refuse_writes(&batch, None, &e),
            Ok(needed) => {
                for (i, &(slot, _)) in batch.iter().enumerate() {
                    if self.ready[i] {
                        self.start_write(slot)?;
                    }
                }
                if let (Some(version), Some(tracker)) = (needed, tracker) {
                    // The writes into logged regions go to the device while the log is synced.
                    self.ring.submit()?;
                    match tracker.make_durable(version) {
                        Ok(()) => {
                            for (i, &(slot, _)) in batch.iter().enumerate() {
                                if !self.ready[i] {
                                    self.start_write(slot)?;
                                }
                            }
                        }
                        Err(e) => self.refuse_writes(&batch, Some(false), &e),
                    }
                }
            }
        }
        self.to_admit = batch;
        self.to_admit.clear();
        Ok(())
    }

    fn start_write(&mut self, slot: usize) -> io::Result<()> {
        if self.inline_writes {
            self.write_inline(slot);
            Ok(())
        } else {
            self.submit_disk(slot)
        }
    }

    /// Answers EIO to the batch's writes (only those with `ready[i] == only`, if given):
    /// without dirty tracking they must not reach the disk.
    fn refuse_writes(
        &mut self,
        batch: &[(usize, ByteRange)],
        only: Option<bool>,
        e: &dyn std::fmt::Display,
    ) {
        tracing::error!(volume = %self.volume.name(), error = %e, "dirty tracking failed; refusing writes");
        for (i, &(slot, _)) in batch.iter().enumerate() {
            if only.is_some_and(|ready| self.ready[i] != ready) {
                continue;
            }
            if let Some(DiskOp::Write { handle, buf, .. }) = self.remove(slot) {
                self.pool.give(buf);
                self.reply_error(handle, libc::EIO);
            }
        }
    }

    /// A page-cache write, done on this thread.
    fn write_inline(&mut self, slot: usize) {
        let Some(DiskOp::Write {
            handle,
            buf,
            offset,
            fua,
            ..
        }) = self.remove(slot)
        else {
            unreachable!("admitted slots hold writes");
        };
        let backing = self.volume.backing();
        let written = backing
            .write_all_at(&buf, offset)
            .and_then(|()| if fua { backing.sync_data() } else { Ok(()) });
        self.pool.give(buf);
        match written {
            Ok(()) => self.reply_ok(handle),
            Err(e) => {
                tracing::error!(error = %e, "write failed");
                self.reply_error(handle, e.raw_os_error().unwrap_or(libc::EIO));
            }
        }
    }

    // ---- disk operations ----

    fn insert(&mut self, op: DiskOp) -> usize {
        self.inflight += 1;
        match self.free_slots.pop() {
            Some(slot) => {
                self.ops[slot] = Some(op);
                slot
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        }
    }

    fn remove(&mut self, slot: usize) -> Option<DiskOp> {
        let op = self.ops.get_mut(slot)?.take()?;
        self.inflight -= 1;
        self.free_slots.push(slot);
        Some(op)
    }

    fn submit_disk(&mut self, slot: usize) -> io::Result<()> {
        let disk = types::Fd(self.disk);
        let sqe = match self.ops[slot].as_mut().expect("submitting a live slot") {
            DiskOp::Read {
                buf, offset, done, ..
            } => {
                let len = (buf.len() - *done) as u32;
                // SAFETY: done < len <= capacity; the buffer lives in the slot until completion.
                let ptr = unsafe { buf.as_mut_ptr().add(*done) };
                opcode::Read::new(disk, ptr, len)
                    .offset(*offset + *done as u64)
                    .build()
            }
            DiskOp::Write {
                buf,
                offset,
                done,
                fua,
                ..
            } => {
                let len = (buf.len() - *done) as u32;
                // SAFETY: as above.
                let ptr = unsafe { buf.as_ptr().add(*done) };
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(disk, ptr, len)
                    .offset(*offset + *done as u64)
                    .rw_flags(flags)
                    .build()
            }
            DiskOp::Flush { .. } => opcode::Fsync::new(disk)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        self.push(sqe.user_data(slot as u64))
    }

    fn on_disk(&mut self, slot: usize, result: i32) -> io::Result<()> {
        if result < 0 {
            let errno = -result;
            if let Some(op) = self.remove(slot) {
                let (what, handle, buf) = match op {
                    DiskOp::Read { handle, buf, .. } => ("read", handle, Some(buf)),
                    DiskOp::Write { handle, buf, .. } => ("write", handle, Some(buf)),
                    DiskOp::Flush { handle } => ("flush", handle, None),
                };
                if let Some(buf) = buf {
                    self.pool.give(buf);
                }
                tracing::error!(error = %io::Error::from_raw_os_error(errno), "{what} failed");
                self.reply_error(handle, errno);
            }
            return Ok(());
        }
        let n = result as usize;
        let (progress, total) = match self.ops[slot].as_mut() {
            Some(DiskOp::Read { buf, done, .. } | DiskOp::Write { buf, done, .. }) => {
                *done += n;
                (*done, buf.len())
            }
            Some(DiskOp::Flush { .. }) => (0, 0),
            None => return Ok(()),
        };
        if n == 0 && progress < total {
            // The backing ended early (truncated under us): an I/O error, not a retry loop.
            return self.on_disk(slot, -libc::EIO);
        }
        if progress < total {
            return self.submit_disk(slot);
        }
        match self.remove(slot).expect("slot is live") {
            DiskOp::Read { handle, buf, .. } => {
                self.stats.bytes_read += buf.len() as u64;
                self.reply_data(handle, &buf);
                self.pool.give(buf);
            }
            DiskOp::Write { handle, buf, .. } => {
                self.pool.give(buf);
                self.reply_ok(handle);
            }
            DiskOp::Flush { handle } => self.reply_ok(handle),
        }
        Ok(())
    }

    // ---- replies ----

    fn reply_ok(&mut self, handle: u64) {
        put_simple_reply(&mut self.out, 0, handle);
    }

    fn reply_error(&mut self, handle: u64, errno: i32) {
        put_simple_reply(&mut self.out, nbd_error(errno), handle);
    }

    fn reply_data(&mut self, handle: u64, data: &[u8]) {
        put_simple_reply(&mut self.out, 0, handle);
        self.out.extend_from_slice(data);
    }

    fn reply_result(&mut self, handle: u64, result: Result<(), i32>) {
        match result {
            Ok(()) => self.reply_ok(handle),
            Err(errno) => self.reply_error(handle, errno),
        }
    }

    fn queue_send(&mut self) -> io::Result<()> {
        if self.send_inflight || self.send_failed || self.out.is_empty() {
            return Ok(());
        }
        std::mem::swap(&mut self.out, &mut self.sending);
        self.sent = 0;
        self.push_send()
    }

    fn push_send(&mut self) -> io::Result<()> {
        let rest = &self.sending[self.sent..];
        let sqe = opcode::Send::new(
            types::Fd(self.sock),
            rest.as_ptr(),
            rest.len().min(u32::MAX as usize) as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(UD_SEND);
        self.send_inflight = true;
        self.push(sqe)
    }

    fn on_send(&mut self, result: i32) {
        self.send_inflight = false;
        if result < 0 {
            if -result == libc::EINTR || -result == libc::EAGAIN {
                return self.push_send().unwrap_or_else(|_| self.fail_send());
            }
            tracing::debug!(error = %io::Error::from_raw_os_error(-result), "send failed; dropping replies");
            return self.fail_send();
        }
        self.sent += result as usize;
        if self.sent < self.sending.len() {
            if self.push_send().is_err() {
                self.fail_send();
            }
            return;
        }
        self.sending.clear();
    }

    fn fail_send(&mut self) {
        self.send_failed = true;
        self.out.clear();
        self.sending.clear();
        self.close_input(None);
    }

    fn push(&mut self, sqe: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry points at is owned by `self` (the input buffer, a
            // payload, an op's buffer in its slot, or `sending`) and is neither moved nor freed
            // until the entry's completion has been handled.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }
}

/// One thread submits and reaps, so completion work can wait until that thread asks for
/// it (`DEFER_TASKRUN`) instead of interrupting it; older kernels get a plain ring.
fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::new(RING_ENTRIES))
}

fn log_io_error(what: &str, e: &blockrep_volume::VolumeIoError) -> i32 {
    tracing::error!(error = %e, "{what} failed");
    e.errno()
}
