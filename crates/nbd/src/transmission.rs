//! The transmission phase: one thread per connection, one io_uring for its socket, its disk
//! I/O and its wake-ups.
//!
//! Each turn of the loop submits everything queued (a receive, a send of all replies ready,
//! the disk operations, a read of the wake-up eventfd) with one `io_uring_enter`, waits for
//! at least one completion, handles the completions, parses every complete request in the
//! input buffer, and admits the batch of writes at once, so many requests cost one system
//! call and a hot region's writes cost no bitmap I/O. Replies go out as operations complete,
//! in any order.
//!
//! Every write-like command (WRITE, WRITE_ZEROES, TRIM, aligned or not) takes one path:
//!
//! ```text
//!  parsed ─► enter_gate ─► (queued: woken when its blocks are free) ─► admit_and_start
//!        ─► io_uring / inline / blocking slow path ─► finish_write ─► answer
//! ```
//!
//! [`Connection::enter_gate`] is where a write enters the volume's write gate and
//! [`Connection::finish_write`] is where it leaves and is answered; nothing else admits or
//! answers a write. Aligned writes go to io_uring; without `O_DIRECT` (writeback cache mode)
//! they are copies into the page cache, which io_uring would hand to a worker thread each,
//! so they are done inline; unaligned writes, zeroing and discard take the volume's blocking
//! slow paths.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockrep_core::{ByteRange, LockId, RangeError};
use blockrep_volume::liveness::{Beat, Liveness};
use blockrep_volume::{
    ADMIT_CHUNK, AfterLocal, AlignedBuf, AnswerToken, BufPool, DIRECT_IO_ALIGN, Delivery, Entered,
    Mailbox, ReplicaData, ReplicaLink, Replicated, SharedPool, Volume, Waker,
};
use bytes::Bytes;
use io_uring::{IoUring, opcode, squeue, types};

use crate::handshake::Negotiated;
use crate::merge::Merged;
use crate::proto::*;

const RING_ENTRIES: u32 = 256;
/// Disk operations in flight, writes queued in the gate and answers held for the peer, per
/// connection, before the loop stops reading requests.
const MAX_INFLIGHT: usize = 128;
/// Write buffers shared with the replication link that come back once the link lets go of
/// them, kept idle for the next writes (beyond the connection's own pool): enough for a
/// window of 1 MiB writes answered by the peer, little beside an async pair's journal.
const RETURNED_IDLE_BYTES: usize = 8 << 20;
const INBUF_BYTES: usize = 256 << 10;
/// Queued reply bytes before the loop stops reading requests.
const OUT_HIGH_WATER: usize = 64 << 20;
/// A write payload at least this large is received straight into its aligned buffer.
const DIRECT_RECV_MIN: usize = 64 << 10;
/// Most extents one BLOCK_STATUS answer carries.
const MAX_EXTENTS: usize = 1024;
/// An unaligned WRITE_ZEROES up to this long is replicated as the whole blocks it leaves
/// (read back, as data); a longer one as its zero range.
const MAX_PATCHED_ZEROES: u64 = 1 << 20;

const UD_RECV: u64 = u64::MAX;
const UD_SEND: u64 = u64::MAX - 1;
const UD_WAKE: u64 = u64::MAX - 2;

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

/// A write-like command that has entered the volume's write gate, until it is answered.
struct GatedWrite {
    handle: u64,
    /// The other requests it answers: sub-block writes merged into it (see `merge`).
    merged: Vec<u64>,
    range: ByteRange,
    fua: bool,
    kind: WriteKind,
    lock: LockId,
    /// How it is replicated, when the volume has a link.
    replica: Option<Replicated>,
}

enum WriteKind {
    Data(WriteBuf),
    Zeroes { may_trim: bool },
    Trim,
}

/// A write's payload: the connection's own buffer, or shared with the replication link
/// (which sends it to the peer while the local write runs).
enum WriteBuf {
    Owned(AlignedBuf),
    Shared(Bytes),
}

impl WriteBuf {
    fn bytes(&self) -> &[u8] {
        match self {
            WriteBuf::Owned(buf) => buf,
            WriteBuf::Shared(bytes) => bytes,
        }
    }

    /// Makes the payload shareable with the link, without copying it; its buffer goes
    /// back to `returned` once the last of them lets go.
    fn share(&mut self, returned: &SharedPool) -> Bytes {
        if let WriteBuf::Owned(buf) = self {
            let owned = std::mem::replace(buf, AlignedBuf::empty());
            *self = WriteBuf::Shared(Bytes::from_owner(returned.returning(owned)));
        }
        match self {
            WriteBuf::Shared(bytes) => bytes.clone(),
            WriteBuf::Owned(_) => unreachable!("shared above"),
        }
    }
}

/// An answer that waits for the peer (hypermetro), with its local outcome.
enum Held {
    Write(Box<GatedWrite>, Result<(), i32>),
    Flush {
        handle: u64,
        result: Result<(), i32>,
    },
}

impl GatedWrite {
    /// What it changes, and so what is marked dirty: a discard's whole blocks (the device
    /// keeps the partial ones as they are); for the rest, its range.
    fn admitted_range(&self) -> ByteRange {
        match self.kind {
            WriteKind::Trim => Volume::trim_blocks(self.range),
            _ => self.range,
        }
    }

    /// What is replicated (and cleared once the peer has it): whole blocks, as this volume
    /// holds them after the write. An unaligned write sends the blocks it patched, so the
    /// peer ends up with the same blocks whatever it held, and their bits clear (a partly
    /// covered block never would). A large unaligned zeroing sends its zero range (its
    /// partly covered edge blocks stay dirty until a catch-up); a discard, its whole blocks.
    fn replicated_range(&self) -> ByteRange {
        let whole = self.range.align_out(DIRECT_IO_ALIGN);
        match self.kind {
            WriteKind::Trim => Volume::trim_blocks(self.range),
            WriteKind::Data(_) => whole,
            WriteKind::Zeroes { .. } if whole.len <= MAX_PATCHED_ZEROES => whole,
            WriteKind::Zeroes { .. } => self.range,
        }
    }

    /// Whether it goes to io_uring (or, in writeback mode, is copied inline) rather than a
    /// blocking slow path.
    fn is_aligned_data(&self) -> bool {
        matches!(self.kind, WriteKind::Data(_)) && self.range.is_aligned(DIRECT_IO_ALIGN)
    }
}

enum DiskOp {
    Read {
        handle: u64,
        buf: AlignedBuf,
        offset: u64,
        done: usize,
    },
    Write {
        write: GatedWrite,
        done: usize,
    },
    Flush {
        handle: u64,
        /// The peer flushes too; the answer waits for this token as well.
        peer: Option<AnswerToken>,
    },
}

/// A write whose payload is still arriving. `reject` is the error to answer once it has
/// been consumed, for writes that must not reach the disk; their payload is dropped as it
/// arrives (`buf` is `None`) when it is too large to hold.
struct Payload {
    req: Request,
    buf: Option<AlignedBuf>,
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
    negotiated: Negotiated,
    inline_writes: bool,
    ring: IoUring,
    input: Input,
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    recv_inflight: bool,
    recv_into_payload: bool,
    payload: Option<Payload>,
    /// Data writes of this turn being merged (they touch one another), not yet in the gate.
    merging: Option<Merged>,
    out: Vec<u8>,
    sending: Vec<u8>,
    sent: usize,
    send_inflight: bool,
    send_failed: bool,
    ops: Vec<Option<DiskOp>>,
    free_slots: Vec<usize>,
    inflight: usize,
    pool: BufPool,
    /// Where write buffers shared with the link come back to (see `WriteBuf::share`).
    returned: SharedPool,
    /// Wakes the loop when a queued write's blocks are granted.
    waker: Arc<Waker>,
    wake_buf: Box<[u8; 8]>,
    wake_inflight: bool,
    /// Writes waiting in the gate for an overlapping write, in arrival order.
    queued: VecDeque<GatedWrite>,
    /// Writes holding their blocks, to be admitted together this turn.
    to_admit: Vec<GatedWrite>,
    /// Where the replication link delivers the peer's answers.
    mailbox: Arc<Mailbox>,
    next_token: AnswerToken,
    /// Tokens handed to the link and not yet delivered back.
    tokens_out: usize,
    /// Whether any write or flush went through a link: from then on the loop listens for
    /// deliveries.
    linked: bool,
    /// Answers waiting for the peer, by token.
    held: HashMap<AnswerToken, Held>,
    /// Tokens delivered before their local part was done, with the error to answer with, if
    /// the link said to fail them.
    early: HashMap<AnswerToken, Option<i32>>,
    delivered: Vec<Delivery>,
    replicas: Vec<Replicated>,
    ranges: Vec<ByteRange>,
    ready: Vec<bool>,
    later: Vec<GatedWrite>,
    completions: Vec<(u64, i32)>,
    stats: ConnectionStats,
    /// For the watchdog: disk operations in flight must complete.
    beat: Arc<Beat>,
}

impl Connection {
    /// `sock` must stay open until `run` returns.
    pub fn new(sock: RawFd, volume: Arc<Volume>, negotiated: Negotiated) -> io::Result<Self> {
        let disk = volume.backing().fd().as_raw_fd();
        let inline_writes = !volume.backing().is_direct();
        let waker = Arc::new(Waker::new()?);
        let beat = Liveness::global().register(format!("NBD connection to {}", volume.name()));
        Ok(Self {
            sock,
            disk,
            inline_writes,
            volume,
            negotiated,
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
            returned: SharedPool::with_idle_limit(RETURNED_IDLE_BYTES),
            merging: None,
            mailbox: Arc::new(Mailbox::new(Arc::clone(&waker))),
            waker,
            next_token: AnswerToken(0),
            tokens_out: 0,
            linked: false,
            held: HashMap::new(),
            early: HashMap::new(),
            delivered: Vec::new(),
            replicas: Vec::new(),
            wake_buf: Box::new([0; 8]),
            wake_inflight: false,
            queued: VecDeque::new(),
            to_admit: Vec::new(),
            ranges: Vec::new(),
            ready: Vec::new(),
            later: Vec::new(),
            completions: Vec::new(),
            stats: ConnectionStats::default(),
            beat,
        })
    }

    /// Serves requests until the client disconnects or breaks the protocol, then waits for
    /// every operation in flight and sends their replies. On an error of its ring, it still
    /// waits for every operation in flight before its buffers go, and gives back the blocks
    /// its writes hold in the volume's write gate.
    pub fn run(mut self) -> io::Result<ConnectionStats> {
        let served = self.serve();
        if served.is_err() {
            self.abandon();
        }
        served
    }

    fn serve(&mut self) -> io::Result<ConnectionStats> {
        loop {
            self.queue_recv()?;
            self.queue_wake()?;
            self.queue_send()?;
            if self.finished() {
                return Ok(self.stats);
            }
            self.beat.expect(self.inflight > 0);
            fault::maybe_stall(self.stats.requests, self.inflight);
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            self.completions.clear();
            self.completions
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            // Every completion is handled, even after an error: each is off the ring, and
            // [`Connection::abandon`] waits only for what is still on it.
            let mut first_error = None;
            for i in 0..self.completions.len() {
                let (user_data, result) = self.completions[i];
                match user_data {
                    UD_RECV => self.on_recv(result),
                    UD_SEND => self.on_send(result),
                    UD_WAKE => self.on_wake(),
                    slot => {
                        if let Err(e) = self.on_disk(slot as usize, result) {
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            self.parse_input()?;
            self.take_delivered();
            self.take_granted();
            self.admit_and_start()?;
        }
    }

    /// After an error: ends the socket's receive and send in flight, waits for every
    /// operation on the ring, then releases the gate's blocks held by writes that will never
    /// be answered. If the ring does not give its operations back within the drain's
    /// patience, the writes on it fail at once and the wait goes on (see
    /// [`RingLeftovers`]).
    fn abandon(mut self) {
        // SAFETY: shutdown on a socket fd we were given for the life of `run`.
        unsafe { libc::shutdown(self.sock, libc::SHUT_RDWR) };
        if self.wake_inflight {
            self.waker.signal();
        }
        let outstanding = self.inflight
            + usize::from(self.recv_inflight)
            + usize::from(self.send_inflight)
            + usize::from(self.wake_inflight);
        let ops = &mut self.ops;
        let beat = &self.beat;
        let mut writes = Vec::new();
        let mut reaped = 0;
        let drained = fault::drain_gives_up().and_then(|()| {
            blockrep_volume::ring::drain(
                &mut self.ring,
                outstanding,
                blockrep_volume::ring::DRAIN_PATIENCE,
                |user_data| {
                    beat.progress();
                    reaped += 1;
                    if let Some(DiskOp::Write { write, .. }) =
                        ops.get_mut(user_data as usize).and_then(Option::take)
                    {
                        writes.push(write);
                    }
                },
            )
        });
        let gate = self.volume.gate();
        let link = gate.link();
        // A write the link admitted and that never finished locally fails through the link
        // (its epoch closes, its blocks stay dirty); a held one had its say already.
        let fail = |write: &mut GatedWrite| {
            if let (Some(replica), Some(link)) = (write.replica.take(), link.as_ref()) {
                let _ = link.local_failed(replica, &self.mailbox);
            }
        };
        for mut write in writes
            .into_iter()
            .chain(self.queued.drain(..))
            .chain(self.to_admit.drain(..))
            .chain(self.later.drain(..))
        {
            fail(&mut write);
            gate.leave(write.lock);
        }
        for (_, held) in self.held.drain() {
            if let Held::Write(write, _) = held {
                gate.leave(write.lock);
            }
        }
        if let Err(e) = drained {
            tracing::error!(
                error = %e,
                operations = outstanding - reaped,
                "the connection's ring did not give back its operations: its thread waits for \
                 them, and the blocks its writes hold stay locked until they are back"
            );
            // A write still on the ring fails now (its epoch must not wait for it); its
            // blocks are left only once the ring gave it back, or a later write of them
            // could be overtaken by it.
            for op in self.ops.iter_mut().flatten() {
                if let DiskOp::Write { write, .. } = op {
                    fail(write);
                }
            }
            // The watchdog sees this wait: an operation that never comes back is a device
            // that stopped answering, which a restart of the agent recovers from.
            self.beat.expect(true);
            self.beat.progress();
            RingLeftovers {
                ring: self.ring,
                ops: self.ops,
                _inbuf: self.inbuf,
                _payload: self.payload,
                _sending: self.sending,
                _wake_buf: self.wake_buf,
                volume: Arc::clone(&self.volume),
                beat: Arc::clone(&self.beat),
                remaining: outstanding - reaped,
            }
            .wait_then_free();
        }
    }

    /// Everything is answered and sent, and nothing of ours is left in the ring.
    fn finished(&mut self) -> bool {
        let done = self.input == Input::Closing
            && !self.recv_inflight
            && self.inflight == 0
            && self.queued.is_empty()
            && self.to_admit.is_empty()
            && self.held.is_empty()
            && self.tokens_out == 0
            && !self.send_inflight
            && (self.out.is_empty() || self.send_failed);
        if done && self.wake_inflight {
            // The posted eventfd read must complete before its buffer goes.
            self.waker.signal();
            return false;
        }
        done
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
            || self.inflight + self.queued.len() + self.held.len() >= MAX_INFLIGHT
            || self.out.len() >= OUT_HIGH_WATER
        {
            return Ok(());
        }
        let direct = self.in_start == self.in_end
            && self.payload.as_ref().is_some_and(|p| {
                p.buf.is_some() && p.req.len as usize - p.filled >= DIRECT_RECV_MIN
            });
        let (ptr, len) = if direct {
            let p = self.payload.as_mut().expect("checked above");
            let want = p.req.len as usize - p.filled;
            let buf = p.buf.as_mut().expect("checked above");
            // SAFETY: filled < len <= capacity of the buffer.
            (unsafe { buf.as_mut_ptr().add(p.filled) }, want)
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
                if let Some(buf) = p.buf.as_mut() {
                    buf[p.filled..p.filled + n]
                        .copy_from_slice(&self.inbuf[self.in_start..self.in_start + n]);
                }
                p.filled += n;
                self.in_start += n;
                self.stats.bytes_written += n as u64;
                if p.filled < p.req.len as usize {
                    break;
                }
                let p = self.payload.take().expect("checked above");
                self.write_arrived(p);
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
            self.write_arrived(p);
        }
        // The turn's merged writes go to the gate with the rest.
        self.end_merge();
        Ok(())
    }

    // ---- requests ----

    /// A buffer for a write's payload: the connection's own idle one, or one the link gave
    /// back, or a new one.
    fn write_buf(&mut self, len: usize) -> AlignedBuf {
        match self.pool.take_idle(len) {
            Some(buf) => buf,
            None => self.returned.take(len),
        }
    }

    fn dispatch(&mut self, req: Request) -> io::Result<()> {
        self.stats.requests += 1;
        if req.command != Command::Write {
            // A write merging now enters the gate before any other command does.
            self.end_merge();
        }
        if req.command == Command::Write {
            let reject = self.check(&req).err();
            // A payload over the limit is read and dropped; the rest is held for the disk.
            let buf = (req.len <= MAX_PAYLOAD).then(|| self.write_buf(req.len as usize));
            self.payload = Some(Payload {
                req,
                buf,
                filled: 0,
                reject,
            });
            return Ok(());
        }
        let range = match self.check(&req) {
            Ok(range) => range,
            Err(errno) => {
                self.reply_error(req.handle, errno);
                return Ok(());
            }
        };
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
            Command::Read if range.is_empty() => self.reply_read(req.handle, req.offset, &[]),
            Command::Read => {
                let mut buf = self.pool.take(req.len as usize);
                match self.volume.read_unaligned(range, &mut buf) {
                    Ok(()) => {
                        self.count_read(buf.len());
                        self.reply_read(req.handle, req.offset, &buf);
                    }
                    Err(e) => {
                        let errno = log_io_error("read", &e);
                        self.reply_error(req.handle, errno);
                    }
                }
                self.pool.give(buf);
            }
            Command::Flush => {
                let peer = self.volume.gate().link().and_then(|link| {
                    let token = self.new_token();
                    match link.flush(token, &self.mailbox) {
                        AfterLocal::WaitForPeer => {
                            self.tokens_out += 1;
                            Some(token)
                        }
                        AfterLocal::Answer => None,
                    }
                });
                if !self.volume.backing().ring_sync_is_durable() {
                    // The test-only volatile backing: only its own sync makes writes durable.
                    let synced = self
                        .volume
                        .backing()
                        .sync_data()
                        .map_err(|e| log_io_error("flush", &e));
                    self.finish_flush(req.handle, peer, synced);
                    return Ok(());
                }
                let slot = self.insert(DiskOp::Flush {
                    handle: req.handle,
                    peer,
                });
                self.submit_disk(slot)?;
            }
            Command::Trim => self.enter_gate(req, range, WriteKind::Trim),
            Command::WriteZeroes => {
                let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
                self.enter_gate(req, range, WriteKind::Zeroes { may_trim });
            }
            Command::BlockStatus => self.block_status(req, range),
            Command::Disconnect => self.close_input(None),
            Command::Write | Command::Unsupported(_) => unreachable!("handled before"),
        }
        Ok(())
    }

    /// The errno a request gets without touching the disk, if any.
    /// The range a request touches, checked; or the errno it gets without touching the disk.
    fn check(&mut self, req: &Request) -> Result<ByteRange, i32> {
        let result = self.validate(req);
        if result.is_err() {
            self.stats.rejected += 1;
        }
        result
    }

    fn validate(&self, req: &Request) -> Result<ByteRange, i32> {
        if let Command::Unsupported(_) = req.command {
            return Err(libc::EINVAL);
        }
        let structured = self.negotiated.structured_replies;
        if req.flags & !req.command.allowed_flags(structured) != 0 {
            return Err(libc::EINVAL);
        }
        match req.command {
            // Their offset and length mean nothing (and may be anything a client sends).
            Command::Flush | Command::Disconnect => return Ok(ByteRange::new(0, 0)),
            Command::Read | Command::Write if req.len > MAX_PAYLOAD => return Err(libc::EINVAL),
            Command::BlockStatus if !self.negotiated.base_allocation || req.len == 0 => {
                return Err(libc::EINVAL);
            }
            _ => {}
        }
        match ByteRange::within(req.offset, u64::from(req.len), self.volume.size()) {
            Ok(range) => Ok(range),
            // As nbdkit and qemu-nbd: writes past the end are out of space, the rest invalid.
            Err(RangeError::PastEnd { .. })
                if matches!(req.command, Command::Write | Command::WriteZeroes) =>
            {
                Err(libc::ENOSPC)
            }
            Err(_) => Err(libc::EINVAL),
        }
    }

    fn write_arrived(&mut self, p: Payload) {
        let Payload {
            req, buf, reject, ..
        } = p;
        match (reject, buf) {
            (None, Some(mut buf)) => {
                buf.set_len(req.len as usize);
                let range = ByteRange::new(req.offset, u64::from(req.len));
                if let Some(run) = self.merging.as_mut()
                    && run.takes(range)
                {
                    run.absorb(req.handle, range, &buf, req.fua(), &mut self.pool);
                    self.pool.give(buf);
                    return;
                }
                self.end_merge();
                if !range.is_empty() && !range.is_aligned(DIRECT_IO_ALIGN) {
                    // A sub-block write: the next ones may touch it.
                    self.merging = Some(Merged::new(req.handle, range, buf, req.fua()));
                    return;
                }
                self.enter_gate(req, range, WriteKind::Data(WriteBuf::Owned(buf)));
            }
            (reject, buf) => {
                if let Some(buf) = buf {
                    self.pool.give(buf);
                }
                self.reply_error(req.handle, reject.unwrap_or(libc::EINVAL));
            }
        }
    }

    fn block_status(&mut self, req: Request, range: ByteRange) {
        let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        match self.volume.allocation(range, max) {
            Ok(extents) => {
                let extents: Vec<(u32, u32)> = extents
                    .iter()
                    .map(|e| {
                        let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
                        // Each extent lies within the request, whose length fits in 32 bits.
                        (e.len as u32, flags)
                    })
                    .collect();
                put_block_status(&mut self.out, req.handle, META_BASE_ALLOCATION_ID, &extents);
            }
            Err(e) => {
                tracing::error!(error = %e, "block status failed");
                self.reply_error(req.handle, e.raw_os_error().unwrap_or(libc::EIO));
            }
        }
    }

    // ---- the write gate ----

    /// The one admission point: a write-like command enters the volume's write gate. It
    /// goes on this turn if its blocks are free, or waits in `queued` until they are.
    fn enter_gate(&mut self, req: Request, range: ByteRange, kind: WriteKind) {
        self.enter_gate_for(req.handle, Vec::new(), req.fua(), range, kind);
    }

    /// The run of merged writes, if any, enters the gate as one write.
    fn end_merge(&mut self) {
        if let Some(run) = self.merging.take() {
            let kind = WriteKind::Data(WriteBuf::Owned(run.data));
            self.enter_gate_for(run.first, run.more, run.fua, run.range, kind);
        }
    }

    /// As [`Connection::enter_gate`], for a write that answers `handle` and the `merged`
    /// requests.
    fn enter_gate_for(
        &mut self,
        handle: u64,
        merged: Vec<u64>,
        fua: bool,
        range: ByteRange,
        kind: WriteKind,
    ) {
        if range.is_empty() {
            // Nothing to write, lock, mark or replicate; a volume that refuses writes still
            // refuses it.
            if let WriteKind::Data(WriteBuf::Owned(buf)) = kind {
                self.pool.give(buf);
            }
            let result = self.volume.gate().refusal().map_or(Ok(()), Err);
            self.reply_all(handle, &merged, result);
            return;
        }
        let entered = self.volume.gate().enter(range, &self.waker);
        let lock = match entered {
            Entered::Go(lock) | Entered::Queued(lock) => lock,
            Entered::Refused(errno) => {
                if let WriteKind::Data(WriteBuf::Owned(buf)) = kind {
                    self.pool.give(buf);
                }
                self.reply_all(handle, &merged, Err(errno));
                return;
            }
        };
        let write = GatedWrite {
            handle,
            merged,
            range,
            fua,
            kind,
            lock,
            replica: None,
        };
        match entered {
            Entered::Queued(_) => self.queued.push_back(write),
            _ => self.to_admit.push(write),
        }
    }

    /// Moves queued writes whose blocks were granted to this turn's batch, keeping the
    /// order of the rest.
    fn take_granted(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let gate = self.volume.gate();
        let mut i = 0;
        while i < self.queued.len() {
            if gate.is_held(self.queued[i].lock) {
                let write = self.queued.remove(i).expect("index checked");
                self.to_admit.push(write);
            } else {
                i += 1;
            }
        }
    }

    /// Admits this turn's writes to the dirty tracker together, then starts them: first the
    /// writes whose regions are already in the on-disk activity log, then, once the log write
    /// they need is durable, the writes into new regions. Zeroing and discard are admitted
    /// piece by piece as they run.
    fn admit_and_start(&mut self) -> io::Result<()> {
        if self.to_admit.is_empty() {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.to_admit);
        let mut later = std::mem::take(&mut self.later);
        let mut ready = std::mem::take(&mut self.ready);
        self.ranges.clear();
        self.ranges.extend(
            batch
                .iter()
                .filter(|w| matches!(w.kind, WriteKind::Data(_)))
                .map(|w| w.range),
        );
        let volume = Arc::clone(&self.volume);
        let gate = volume.gate();
        let admitted = if self.ranges.is_empty() {
            Ok(None)
        } else {
            gate.admit(&self.ranges, &mut ready)
        };
        // Zeroing and discard are admitted here too, before the link takes their tickets:
        // an admission spoils every ticket it overlaps, its own write's included.
        let mut slow_admitted: Vec<Result<(), i32>> = batch
            .iter()
            .filter(|w| !matches!(w.kind, WriteKind::Data(_)))
            .map(|w| {
                admit_in_pieces(&volume, w.admitted_range())
                    .map_err(|e| log_io_error("dirty tracking", &e))
            })
            .collect();
        // Every write of the batch goes through the link, even one whose admission failed:
        // it then fails through the link too (its ticket forgotten, its answer held if a
        // group's trip holds answers), like any write that fails.
        if admitted.is_ok()
            && let Some(link) = gate.link()
        {
            self.attach_replicas(&mut batch, link.as_ref());
        }
        // After a ring error, the batch's other writes fail (EIO): none is dropped.
        let mut ring_error = None;
        let mut data_index = 0;
        let mut slow_admitted = slow_admitted.drain(..);
        for write in batch.drain(..) {
            if !matches!(write.kind, WriteKind::Data(_)) {
                let admitted = slow_admitted.next().expect("one per slow write");
                match admitted {
                    Ok(()) => self.run_blocking(write),
                    Err(errno) => self.finish_write(write, Err(errno)),
                }
                continue;
            }
            let is_ready = ready.get(data_index).copied().unwrap_or(false);
            data_index += 1;
            match &admitted {
                Err(e) => self.finish_write(write, Err(e.errno())),
                Ok(_) if is_ready => self.start_write_or_fail(write, &mut ring_error),
                Ok(_) => later.push(write),
            }
        }
        match admitted {
            Err(e) => {
                tracing::error!(volume = %volume.name(), error = %e, "dirty tracking failed; refusing writes");
            }
            Ok(needed) => {
                let durable = match needed {
                    Some(version) => {
                        // The writes into logged regions go to the device while the log is
                        // synced.
                        if let Err(e) = self.ring.submit() {
                            ring_error.get_or_insert(e);
                        }
                        gate.make_durable(version)
                    }
                    None => Ok(()),
                };
                if let Err(e) = &durable {
                    tracing::error!(volume = %volume.name(), error = %e, "dirty tracking failed; refusing writes");
                }
                for write in later.drain(..) {
                    match &durable {
                        Ok(()) => self.start_write_or_fail(write, &mut ring_error),
                        Err(e) => self.finish_write(write, Err(e.errno())),
                    }
                }
            }
        }
        self.to_admit = batch;
        self.later = later;
        self.ready = ready;
        ring_error.map_or(Ok(()), Err)
    }

    /// Starts `write`, unless the ring failed already this turn: then it fails (EIO).
    fn start_write_or_fail(&mut self, write: GatedWrite, ring_error: &mut Option<io::Error>) {
        if ring_error.is_some() {
            return self.finish_write(write, Err(libc::EIO));
        }
        if let Err(e) = self.start_write(write) {
            *ring_error = Some(e);
        }
    }

    /// Starts an admitted write of data: io_uring, an inline page-cache copy, or a
    /// read-modify-write.
    fn start_write(&mut self, mut write: GatedWrite) -> io::Result<()> {
        if !write.is_aligned_data() {
            self.run_blocking(write);
            return Ok(());
        }
        if let Some(replica) = write.replica.as_mut()
            && let Some(link) = self.volume.gate().link()
        {
            link.start(replica, &self.mailbox);
            if replica.sent {
                self.tokens_out += 1;
            }
        }
        if self.inline_writes {
            let WriteKind::Data(buf) = &write.kind else {
                unreachable!("aligned data")
            };
            let backing = self.volume.backing();
            let written = backing
                .write_all_at(buf.bytes(), write.range.offset)
                .and_then(|()| {
                    if write.fua {
                        backing.sync_data()
                    } else {
                        Ok(())
                    }
                })
                .map_err(|e| log_io_error("write", &e));
            self.finish_write(write, written);
            return Ok(());
        }
        let slot = self.insert(DiskOp::Write { write, done: 0 });
        self.submit_disk(slot)
    }

    /// Runs a write on the volume's blocking slow paths: unaligned data, zeroing, discard.
    fn run_blocking(&mut self, write: GatedWrite) {
        let volume = Arc::clone(&self.volume);
        let mut write = write;
        let done = match &write.kind {
            // Admitted with its batch.
            WriteKind::Data(buf) => volume
                .read_modify_write(write.range, Some(buf.bytes()), write.fua)
                .map(|blocks| {
                    if let Some(replica) = write.replica.as_mut() {
                        replica.data = ReplicaData::Data(Bytes::from_owner(blocks));
                    }
                }),
            // Admitted with its batch, in pieces.
            WriteKind::Zeroes { may_trim } => volume
                .write_zeroes(write.range, *may_trim, write.fua)
                .and_then(|()| match write.replica.as_mut() {
                    // The blocks it patched, as they are now (still locked).
                    Some(replica) if replica.range != write.range => {
                        let mut blocks = AlignedBuf::new(replica.range.len as usize);
                        volume
                            .backing()
                            .read_exact_at(&mut blocks, replica.range.offset)?;
                        replica.data = ReplicaData::Data(Bytes::from_owner(blocks));
                        Ok(())
                    }
                    _ => Ok(()),
                }),
            WriteKind::Trim => volume.trim(write.range, write.fua).map(|punched| {
                if let Some(replica) = write.replica.as_mut() {
                    replica.data = if punched {
                        ReplicaData::Zeroes
                    } else {
                        ReplicaData::Unchanged
                    };
                }
            }),
        };
        let done = done.map_err(|e| log_io_error("write", &e));
        self.finish_write(write, done);
    }

    /// The local write is done: the link has its say (hypermetro holds the answer until the
    /// peer has the data), then the write is answered.
    fn finish_write(&mut self, mut write: GatedWrite, result: Result<(), i32>) {
        let Some(replica) = write.replica.take() else {
            return self.answer_write(write, result);
        };
        let Some(link) = self.volume.gate().link() else {
            return self.answer_write(write, result);
        };
        let token = replica.token;
        let sent = replica.sent;
        let after = match result {
            Ok(()) => link.local_done(replica, &self.mailbox),
            Err(_) => link.local_failed(replica, &self.mailbox),
        };
        if after == AfterLocal::Answer {
            return self.answer_write(write, result);
        }
        if !sent {
            self.tokens_out += 1;
        }
        if let Some(failed) = self.early.remove(&token) {
            self.answer_write(write, failed.map_or(result, Err));
        } else {
            self.held
                .insert(token, Held::Write(Box::new(write), result));
        }
    }

    /// Gives every write of the batch its replica (sharing its data with the link) and lets
    /// the link admit them together.
    fn attach_replicas(&mut self, batch: &mut [GatedWrite], link: &dyn ReplicaLink) {
        self.linked = true;
        self.replicas.clear();
        for write in batch.iter_mut() {
            let data = match &mut write.kind {
                WriteKind::Data(buf) => ReplicaData::Data(buf.share(&self.returned)),
                WriteKind::Zeroes { .. } | WriteKind::Trim => ReplicaData::Zeroes,
            };
            let token = self.new_token();
            self.replicas.push(Replicated::new(
                write.replicated_range(),
                data,
                write.fua,
                token,
            ));
        }
        link.admit(&mut self.replicas);
        for (write, replica) in batch.iter_mut().zip(self.replicas.drain(..)) {
            write.replica = Some(replica);
        }
    }

    fn new_token(&mut self) -> AnswerToken {
        self.linked = true;
        let token = self.next_token;
        self.next_token = AnswerToken(token.0 + 1);
        token
    }

    /// Answers whose peer part the link delivered.
    fn take_delivered(&mut self) {
        if !self.linked {
            return;
        }
        self.mailbox.take(&mut self.delivered);
        let mut delivered = std::mem::take(&mut self.delivered);
        for Delivery { token, failed } in delivered.drain(..) {
            self.tokens_out -= 1;
            match self.held.remove(&token) {
                Some(Held::Write(write, result)) => {
                    self.answer_write(*write, failed.map_or(result, Err))
                }
                Some(Held::Flush { handle, result }) => {
                    self.reply_result(handle, failed.map_or(result, Err))
                }
                None => {
                    self.early.insert(token, failed);
                }
            }
        }
        self.delivered = delivered;
    }

    /// The one answer point of a write: it leaves the gate, its blocks go to the next
    /// writer, and its answer is queued.
    fn answer_write(&mut self, write: GatedWrite, result: Result<(), i32>) {
        self.volume.gate().leave(write.lock);
        if result.is_ok() {
            self.volume
                .counters()
                .bytes_written
                .fetch_add(write.range.len, Ordering::Relaxed);
        }
        if let WriteKind::Data(WriteBuf::Owned(buf)) = write.kind {
            self.pool.give(buf);
        }
        self.reply_all(write.handle, &write.merged, result);
    }

    /// Answers a write and the requests merged into it.
    fn reply_all(&mut self, handle: u64, merged: &[u64], result: Result<(), i32>) {
        self.reply_result(handle, result);
        for &other in merged {
            self.reply_result(other, result);
        }
    }

    // ---- wake-ups ----

    /// Keeps a read posted on the eventfd while a write waits in the gate or an answer
    /// waits for the peer.
    fn queue_wake(&mut self) -> io::Result<()> {
        if self.wake_inflight || (self.queued.is_empty() && self.tokens_out == 0) {
            return Ok(());
        }
        let sqe = opcode::Read::new(
            types::Fd(self.waker.fd()),
            self.wake_buf.as_mut_ptr(),
            self.wake_buf.len() as u32,
        )
        .build()
        .user_data(UD_WAKE);
        self.push(sqe)?;
        self.wake_inflight = true;
        Ok(())
    }

    fn on_wake(&mut self) {
        self.wake_inflight = false;
        // What the wake-up was about is looked at after this, in `take_delivered` and
        // `take_granted`.
        self.waker.reset();
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

    /// A disk operation failed with `errno` (or never reached the ring): it is answered
    /// with the error, and its slot freed.
    fn fail_disk(&mut self, slot: usize, errno: i32) {
        let Some(op) = self.remove(slot) else {
            return;
        };
        let what = match &op {
            DiskOp::Read { .. } => "read",
            DiskOp::Write { .. } => "write",
            DiskOp::Flush { .. } => "flush",
        };
        tracing::error!(error = %io::Error::from_raw_os_error(errno), "{what} failed");
        match op {
            DiskOp::Read { handle, buf, .. } => {
                self.pool.give(buf);
                self.reply_error(handle, errno);
            }
            DiskOp::Write { write, .. } => self.finish_write(write, Err(errno)),
            DiskOp::Flush { handle, peer } => self.finish_flush(handle, peer, Err(errno)),
        }
    }

    /// Puts the operation in `slot` on the ring. If the ring fails, the operation fails
    /// (EIO) rather than stay counted as in flight.
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
            DiskOp::Write { write, done } => {
                let WriteKind::Data(buf) = &write.kind else {
                    unreachable!("only data writes go to the ring")
                };
                let bytes = buf.bytes();
                let len = (bytes.len() - *done) as u32;
                // SAFETY: as above; a shared buffer is kept alive by the write's own reference.
                let ptr = unsafe { bytes.as_ptr().add(*done) };
                let flags = if write.fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(disk, ptr, len)
                    .offset(write.range.offset + *done as u64)
                    .rw_flags(flags)
                    .build()
            }
            DiskOp::Flush { .. } => opcode::Fsync::new(disk)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        let pushed = fault::ring_error(self.stats.requests, self.inflight)
            .and_then(|()| self.push(sqe.user_data(slot as u64)));
        if pushed.is_err() {
            self.fail_disk(slot, libc::EIO);
        }
        pushed
    }

    fn on_disk(&mut self, slot: usize, result: i32) -> io::Result<()> {
        self.beat.progress();
        if result < 0 {
            self.fail_disk(slot, -result);
            return Ok(());
        }
        let n = result as usize;
        let (progress, total) = match self.ops[slot].as_mut() {
            Some(DiskOp::Read { buf, done, .. }) => {
                *done += n;
                (*done, buf.len())
            }
            Some(DiskOp::Write { write, done }) => {
                *done += n;
                (*done, write.range.len as usize)
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
            DiskOp::Read {
                handle,
                buf,
                offset,
                ..
            } => {
                self.count_read(buf.len());
                self.reply_read(handle, offset, &buf);
                self.pool.give(buf);
            }
            DiskOp::Write { write, .. } => {
                self.volume.backing().note_written(write.range);
                self.finish_write(write, Ok(()))
            }
            DiskOp::Flush { handle, peer } => self.finish_flush(handle, peer, Ok(())),
        }
        Ok(())
    }

    /// The local fdatasync of a FLUSH is done; with a peer flush too, answer once both are.
    fn finish_flush(&mut self, handle: u64, peer: Option<AnswerToken>, result: Result<(), i32>) {
        match peer.map(|token| (token, self.early.remove(&token))) {
            Some((token, None)) => {
                self.held.insert(token, Held::Flush { handle, result });
            }
            Some((_, Some(failed))) => self.reply_result(handle, failed.map_or(result, Err)),
            None => self.reply_result(handle, result),
        }
    }

    fn count_read(&mut self, bytes: usize) {
        self.stats.bytes_read += bytes as u64;
        self.volume
            .counters()
            .bytes_read
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    // ---- replies ----

    fn reply_ok(&mut self, handle: u64) {
        put_simple_reply(&mut self.out, 0, handle);
    }

    fn reply_result(&mut self, handle: u64, result: Result<(), i32>) {
        match result {
            Ok(()) => self.reply_ok(handle),
            Err(errno) => self.reply_error(handle, errno),
        }
    }

    /// With structured replies, errors go as `ERROR` chunks (a read must never get a simple
    /// reply then); without, as simple replies.
    fn reply_error(&mut self, handle: u64, errno: i32) {
        if self.negotiated.structured_replies {
            put_error_chunk(&mut self.out, handle, nbd_error(errno));
        } else {
            put_simple_reply(&mut self.out, nbd_error(errno), handle);
        }
    }

    fn reply_read(&mut self, handle: u64, offset: u64, data: &[u8]) {
        if self.negotiated.structured_replies {
            put_read_chunk(&mut self.out, handle, offset, data.len() as u32);
        } else {
            put_simple_reply(&mut self.out, 0, handle);
        }
        self.out.extend_from_slice(data);
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
        // Counted on the ring only once it is there: an abandoned connection waits for
        // every operation counted.
        self.push(sqe)?;
        self.send_inflight = true;
        Ok(())
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
            // payload, an op's buffer in its slot, the wake-up buffer, or `sending`) and is
            // neither moved nor freed until the entry's completion has been handled.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }
}

/// Admits a locked range to the dirty tracker in pieces small enough for the activity log.
/// All pieces are admitted before the write starts: a piece's regions may leave the log
/// once its bits are in the on-disk bitmap, and they stay set there.
fn admit_in_pieces(volume: &Volume, range: ByteRange) -> io::Result<()> {
    let mut at = range.offset;
    while at < range.end() {
        let len = ADMIT_CHUNK.min(range.end() - at);
        volume
            .gate()
            .admit_blocking(ByteRange::new(at, len))
            .map_err(|e| io::Error::new(io::Error::from_raw_os_error(e.errno()).kind(), e))?;
        at += len;
    }
    Ok(())
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

/// Logs a failed disk operation and gives the errno its client should see: ENOSPC as it is
/// (the device is full), everything else as EIO.
fn log_io_error(what: &str, e: &io::Error) -> i32 {
    tracing::error!(error = %e, "{what} failed");
    match e.kind() {
        io::ErrorKind::StorageFull => libc::ENOSPC,
        _ => libc::EIO,
    }
}

/// What the ring of an abandoned connection did not give back within the drain's
/// patience (a device that stopped answering): the ring, the operations on it, and every
/// buffer they may still read or write. The connection's thread waits for their
/// completions, giving each write's blocks back to the volume's write gate as its operation
/// comes back, and frees everything once nothing is left on the ring. The watchdog watches
/// the wait: if the device never gives an operation back, the agent stops pinging systemd
/// and is restarted.
struct RingLeftovers {
    ring: IoUring,
    ops: Vec<Option<DiskOp>>,
    // Kept only until the ring gave back the operations that point at them: the receive
    // buffer, a payload being received, the send buffer and the wake-up buffer.
    _inbuf: Box<[u8]>,
    _payload: Option<Payload>,
    _sending: Vec<u8>,
    _wake_buf: Box<[u8; 8]>,
    volume: Arc<Volume>,
    beat: Arc<Beat>,
    remaining: usize,
}

impl RingLeftovers {
    /// Waits on this thread (the ring takes completions only on the thread that submits to
    /// it). If the ring fails, everything is leaked and the blocks stay locked.
    fn wait_then_free(mut self) {
        if let Err(e) = self.wait() {
            tracing::error!(error = %e, "an abandoned connection's ring failed: its buffers are leaked and its writes' blocks stay locked");
            std::mem::forget(self);
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        while self.remaining > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            for completion in self.ring.completion() {
                self.beat.progress();
                self.remaining = self.remaining.saturating_sub(1);
                if let Some(DiskOp::Write { write, .. }) = self
                    .ops
                    .get_mut(completion.user_data() as usize)
                    .and_then(Option::take)
                {
                    self.volume.gate().leave(write.lock);
                }
            }
        }
        tracing::info!("an abandoned connection's ring gave back its last operations");
        Ok(())
    }
}

/// Test-only faults, compiled in only with the `fault-injection` feature.
mod fault {
    /// With `BLOCKREP_FAULT_STALL_NBD_AFTER=N`, a connection that has taken N requests and
    /// has disk operations in flight stops for good: a hung I/O loop, for the watchdog test.
    #[cfg(feature = "fault-injection")]
    pub fn maybe_stall(requests: u64, inflight: usize) {
        static AFTER: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        let after = AFTER.get_or_init(|| {
            std::env::var("BLOCKREP_FAULT_STALL_NBD_AFTER")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        if after.is_some_and(|n| requests >= n) && inflight > 0 {
            tracing::warn!("fault injection: this connection's loop stops for good");
            loop {
                std::thread::park();
            }
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    #[inline]
    pub fn maybe_stall(_requests: u64, _inflight: usize) {}

    /// With `BLOCKREP_FAULT_NBD_RING_ERROR_AFTER=N`, the first disk operation a connection
    /// puts on its ring after taking N requests, with another one in flight, fails as if the
    /// ring had (once per process): the connection is abandoned with writes on the ring.
    #[cfg(feature = "fault-injection")]
    pub fn ring_error(requests: u64, inflight: usize) -> std::io::Result<()> {
        use std::sync::atomic::{AtomicBool, Ordering};
        static AFTER: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        static FIRED: AtomicBool = AtomicBool::new(false);
        let after = AFTER.get_or_init(|| {
            std::env::var("BLOCKREP_FAULT_NBD_RING_ERROR_AFTER")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        if after.is_some_and(|n| requests >= n)
            && inflight >= 2
            && !FIRED.swap(true, Ordering::SeqCst)
        {
            tracing::warn!("fault injection: this connection's ring fails");
            return Err(std::io::Error::other("fault injection: the ring failed"));
        }
        Ok(())
    }

    #[cfg(not(feature = "fault-injection"))]
    #[inline]
    pub fn ring_error(_requests: u64, _inflight: usize) -> std::io::Result<()> {
        Ok(())
    }

    /// With `BLOCKREP_FAULT_NBD_DRAIN_GIVES_UP` set, a connection being abandoned does not
    /// wait for its ring: it gives up at once, as a drain past its patience does, with its
    /// operations still on the ring.
    #[cfg(feature = "fault-injection")]
    pub fn drain_gives_up() -> std::io::Result<()> {
        if std::env::var_os("BLOCKREP_FAULT_NBD_DRAIN_GIVES_UP").is_some() {
            tracing::warn!("fault injection: the connection's ring is not drained");
            return Err(std::io::Error::other("fault injection: the drain gave up"));
        }
        Ok(())
    }

    #[cfg(not(feature = "fault-injection"))]
    #[inline]
    pub fn drain_gives_up() -> std::io::Result<()> {
        Ok(())
    }
}
