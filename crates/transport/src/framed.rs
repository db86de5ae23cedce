//! Frames over a QUIC stream: a reader that decodes whole frames out of what arrives (and
//! can receive a large write's payload straight into memory its caller gives), and a
//! writer that gathers headers and small payloads into large chunks and sends large payloads
//! as chunks of their own, uncopied.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use blockrep_wire::{
    Frame, RefuseKind, WRITE_HEADER_LEN, WireError, WriteAhead, WriteHeader, encode_write_header,
    write_ahead,
};
use bytes::{Buf, Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::AsyncReadExt;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connection: {0}")]
    Connection(String),
    #[error("peer sent a bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
}

pub struct FrameReader {
    recv: RecvStream,
    buf: BytesMut,
    /// Bytes received, for the pair's counters.
    pub bytes_received: u64,
}

impl FrameReader {
    pub fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            buf: BytesMut::with_capacity(256 << 10),
            bytes_received: 0,
        }
    }

    /// The next whole frame, or `None` when the peer finished the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Frame>, StreamError> {
        self.next_placing(|_| None::<Vec<u8>>).await
    }

    /// Like [`FrameReader::next`], but a data write whose payload has not all arrived with
    /// its header is offered to `place`: memory it gives (exactly the write's `len` bytes)
    /// receives the payload, and becomes the frame's payload as it is. Memory of the
    /// caller's choosing (aligned for `O_DIRECT`, from a pool) saves the copy into it
    /// later, and the allocation of a buffer here. `place` may be offered the same header
    /// again (as more bytes arrive) until it gives memory or the frame is whole.
    ///
    /// Not cancel-safe, unlike `next`: a payload part-received into placed memory is lost
    /// with the future, and the reader is then out of step with the stream (drop it).
    pub async fn next_placing<M>(
        &mut self,
        mut place: impl FnMut(&WriteHeader) -> Option<M>,
    ) -> Result<Option<Frame>, StreamError>
    where
        M: AsRef<[u8]> + AsMut<[u8]> + Send + 'static,
    {
        loop {
            let ahead = write_ahead(&self.buf)?;
            if let WriteAhead::Data(header) = ahead
                && let Some(memory) = place(&header)
            {
                return self.receive_payload(header, memory).await.map(Some);
            }
            // A write's header read in part: read on (decoding would only make room for
            // the whole frame behind it, and might then take its payload in there).
            if ahead != WriteAhead::HeaderIncomplete
                && let Some(frame) = self.next_received()?
            {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < 64 << 10 {
                self.buf.reserve(256 << 10);
            }
            match self.recv.read_buf(&mut self.buf).await {
                Ok(0) => {
                    return if self.buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(StreamError::Truncated)
                    };
                }
                Ok(n) => self.bytes_received += n as u64,
                Err(e) => return Err(StreamError::Connection(with_causes(&e))),
            }
        }
    }

    /// Takes the write's header off the received bytes and its payload, those received
    /// and the rest as it arrives, into `memory`.
    async fn receive_payload<M>(
        &mut self,
        header: WriteHeader,
        mut memory: M,
    ) -> Result<Frame, StreamError>
    where
        M: AsRef<[u8]> + AsMut<[u8]> + Send + 'static,
    {
        self.buf.advance(WRITE_HEADER_LEN);
        let payload = memory.as_mut();
        assert_eq!(
            payload.len(),
            header.len as usize,
            "memory placed for a write's payload is its length"
        );
        // Fewer than the payload's bytes are here (or it would have decoded whole).
        let here = self.buf.len().min(payload.len());
        payload[..here].copy_from_slice(&self.buf[..here]);
        self.buf.advance(here);
        let mut filled = here;
        while filled < payload.len() {
            match self.recv.read(&mut payload[filled..]).await {
                Ok(Some(n)) => {
                    filled += n;
                    self.bytes_received += n as u64;
                }
                Ok(None) => return Err(StreamError::Truncated),
                Err(e) => return Err(StreamError::Connection(with_causes(&e))),
            }
        }
        Ok(Frame::Write(header, Bytes::from_owner(memory)))
    }

    /// The next whole frame among the bytes already received, without waiting for more:
    /// what arrived together can be handled together.
    pub fn next_received(&mut self) -> Result<Option<Frame>, StreamError> {
        Ok(Frame::decode(&mut self.buf)?)
    }
}

/// Payloads smaller than this are copied in behind their header; larger ones go out as
/// chunks of their own. quinn finds a retransmitted or sent range by walking the stream's
/// unacknowledged chunks, so a window full of 40-byte headers and 4 KiB payloads costs far
/// more than copying them.
const COPY_BELOW: usize = 16 << 10;
/// A gather buffer's capacity: gathered bytes become a chunk when the next frame would not
/// fit behind them (a larger frame grows the buffer, which is then not reused).
const GATHER_CAPACITY: usize = 256 << 10;
/// A batch sealed with less than this gathered goes out as a copy of its own, and its buffer
/// gathers on: a buffer leaves with a chunk only at least half full, so the buffers chunks
/// in flight hold are at most twice their bytes (which the connection's send window bounds).
const HAND_OFF_BYTES: usize = GATHER_CAPACITY / 2;
/// Idle gather buffers a writer keeps for reuse (1 MiB).
const IDLE_GATHER_BUFFERS: usize = 4;

pub struct FrameWriter {
    send: SendStream,
    gather: Gather,
    /// Where a frame other than a write is encoded before it is gathered.
    scratch: BytesMut,
    /// Bytes sent, for the pair's counters.
    pub bytes_sent: u64,
}

impl FrameWriter {
    pub fn new(send: SendStream) -> Self {
        Self {
            send,
            gather: Gather::new(),
            scratch: BytesMut::new(),
            bytes_sent: 0,
        }
    }

    pub async fn send(&mut self, frame: &Frame) -> Result<(), StreamError> {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        self.send_bytes(out.freeze()).await
    }

    pub async fn send_bytes(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.bytes_sent += bytes.len() as u64;
        self.send
            .write_all_chunks(&mut [bytes])
            .await
            .map_err(|e| StreamError::Connection(with_causes(&e)))
    }

    /// Queues a write in the pending batch: a small payload gathered behind its header, a
    /// large one as its own chunk.
    pub fn push_write(&mut self, header: &WriteHeader, payload: Bytes, chunks: &mut Vec<Bytes>) {
        self.gather.push_write(header, payload, chunks);
    }

    /// Queues any other frame in the pending batch.
    pub fn push_frame(&mut self, frame: &Frame, chunks: &mut Vec<Bytes>) {
        self.scratch.clear();
        frame.encode(&mut self.scratch);
        self.gather.push(&self.scratch, chunks);
    }

    /// Ends the pending batch: the gathered headers and small payloads become a chunk of
    /// `chunks`, so `chunks` holds every byte [`FrameWriter::send_chunks`] would send.
    pub fn close_batch(&mut self, chunks: &mut Vec<Bytes>) {
        self.gather.seal(chunks);
    }

    /// Sends a batch of chunks with as few system calls as quinn manages.
    pub async fn send_chunks(&mut self, chunks: &mut Vec<Bytes>) -> Result<(), StreamError> {
        self.gather.seal(chunks);
        self.bytes_sent += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
        let result = self.send.write_all_chunks(chunks).await;
        chunks.clear();
        result.map_err(|e| StreamError::Connection(with_causes(&e)))
    }

    /// Refuses the stream: tells the peer why (if it still listens) and ends it.
    pub async fn refuse(&mut self, kind: RefuseKind, reason: String) {
        let _ = self.send(&Frame::Refuse { kind, reason }).await;
        self.finish();
    }

    /// Ends the stream from this side.
    pub fn finish(&mut self) {
        // The peer may be gone already; nothing to do then.
        let _ = self.send.finish();
    }
}

/// Headers and small payloads of the pending batch, gathered into chunks.
struct Gather {
    buf: Vec<u8>,
    buffers: Arc<GatherBuffers>,
}

impl Gather {
    fn new() -> Self {
        let buffers = Arc::new(GatherBuffers::default());
        Self {
            buf: buffers.take(),
            buffers,
        }
    }

    /// A write: its header, and its payload behind it if small, or as a chunk of its own.
    fn push_write(&mut self, header: &WriteHeader, payload: Bytes, chunks: &mut Vec<Bytes>) {
        let small = payload.len() < COPY_BELOW;
        let gathered = WRITE_HEADER_LEN + if small { payload.len() } else { 0 };
        self.make_room(gathered, chunks);
        encode_write_header(header, payload.len() as u32, &mut self.buf);
        if small {
            self.buf.extend_from_slice(&payload);
        } else {
            self.seal(chunks);
            chunks.push(payload);
        }
    }

    /// An encoded frame.
    fn push(&mut self, frame: &[u8], chunks: &mut Vec<Bytes>) {
        self.make_room(frame.len(), chunks);
        self.buf.extend_from_slice(frame);
    }

    /// Seals what is gathered if `bytes` more would not fit behind it.
    fn make_room(&mut self, bytes: usize, chunks: &mut Vec<Bytes>) {
        if self.buf.len() + bytes > self.buf.capacity() {
            self.seal(chunks);
        }
    }

    /// What is gathered becomes a chunk: a buffer at least half full leaves with it (and
    /// comes back once quinn drops the chunk) and gathering goes on in an idle one; less is
    /// copied out, and the buffer gathers on.
    fn seal(&mut self, chunks: &mut Vec<Bytes>) {
        if self.buf.is_empty() {
            return;
        }
        if self.buf.len() < HAND_OFF_BYTES {
            chunks.push(Bytes::copy_from_slice(&self.buf));
            self.buf.clear();
            return;
        }
        let buf = std::mem::replace(&mut self.buf, self.buffers.take());
        chunks.push(Bytes::from_owner(Gathered {
            buf,
            home: Arc::downgrade(&self.buffers),
        }));
    }
}

/// A writer's idle gather buffers. A chunk keeps its buffer until quinn drops it (the peer
/// acknowledged its bytes); the buffer then comes back here, so gathering reuses memory
/// already in place rather than faulting in a fresh allocation's pages. Not the volume
/// crate's `SharedPool`: these are growable `Vec`s frames are encoded into (`BufMut`), of
/// one size and unaligned, and a chunk still in flight once its writer is gone frees its
/// buffer (a `Weak` home) rather than keep the pool alive.
#[derive(Default)]
struct GatherBuffers {
    idle: Mutex<Vec<Vec<u8>>>,
}

impl GatherBuffers {
    fn take(&self) -> Vec<u8> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(GATHER_CAPACITY))
    }

    /// Keeps `buf` for reuse, unless enough are idle or a large frame grew it.
    fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() != GATHER_CAPACITY {
            return;
        }
        buf.clear();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_GATHER_BUFFERS {
            idle.push(buf);
        }
    }
}

/// A sent chunk of gathered bytes; its buffer goes back to its writer when dropped (or is
/// freed, if the writer is gone).
struct Gathered {
    buf: Vec<u8>,
    home: Weak<GatherBuffers>,
}

impl AsRef<[u8]> for Gathered {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Gathered {
    fn drop(&mut self) {
        if let Some(home) = self.home.upgrade() {
            home.give(std::mem::take(&mut self.buf));
        }
    }
}

/// An error with its causes ("connection lost: reset by peer").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk made of `buffers`' next buffer holding `bytes`.
    fn chunk(buffers: &Arc<GatherBuffers>, bytes: &[u8]) -> (Bytes, *const u8) {
        let mut buf = buffers.take();
        buf.extend_from_slice(bytes);
        let at = buf.as_ptr();
        let chunk = Bytes::from_owner(Gathered {
            buf,
            home: Arc::downgrade(buffers),
        });
        (chunk, at)
    }

    #[test]
    fn a_chunks_buffer_is_reused_once_the_chunk_is_dropped() {
        let buffers = Arc::new(GatherBuffers::default());
        let (first, at) = chunk(&buffers, &[7; 4096]);
        assert_eq!(&first[..], &[7; 4096][..]);
        let (second, other) = chunk(&buffers, b"x");
        assert_ne!(at, other, "a buffer still sent is not handed out again");
        drop(first);
        let again = buffers.take();
        assert_eq!(again.as_ptr(), at, "the dropped chunk's buffer comes back");
        assert!(again.is_empty());
        assert_eq!(again.capacity(), GATHER_CAPACITY);
        drop(second);
    }

    fn header(len: u32) -> WriteHeader {
        WriteHeader {
            flags: blockrep_wire::WriteFlags(0),
            epoch: blockrep_core::replication::Epoch(1),
            seq: blockrep_core::replication::WriteSeq(0),
            offset: 0,
            len,
            crc: 0,
        }
    }

    #[test]
    fn a_small_batch_is_copied_out_and_its_buffer_gathers_on() {
        let mut gather = Gather::new();
        let at = gather.buf.as_ptr();
        let mut chunks = Vec::new();
        for _ in 0..100 {
            gather.push_write(&header(4096), Bytes::from(vec![1; 4096]), &mut chunks);
            gather.seal(&mut chunks);
        }
        assert_eq!(chunks.len(), 100);
        assert!(chunks.iter().all(|c| c.len() == WRITE_HEADER_LEN + 4096));
        assert_eq!(gather.buf.as_ptr(), at, "no buffer left with a small batch");
        assert!(gather.buf.is_empty());
    }

    #[test]
    fn a_full_buffer_leaves_with_its_chunk_and_comes_back() {
        let mut gather = Gather::new();
        let at = gather.buf.as_ptr();
        let mut chunks = Vec::new();
        let per_write = WRITE_HEADER_LEN + 8192;
        let fit = GATHER_CAPACITY / per_write;
        for _ in 0..=fit {
            gather.push_write(&header(8192), Bytes::from(vec![2; 8192]), &mut chunks);
        }
        assert_eq!(
            chunks.len(),
            1,
            "the write that did not fit sealed the rest"
        );
        assert_eq!(chunks[0].len(), fit * per_write);
        assert_eq!(chunks[0].as_ptr(), at, "the buffer itself, not a copy");
        assert_eq!(gather.buf.len(), per_write);
        drop(chunks);
        let back = gather.buffers.take();
        assert_eq!(back.as_ptr(), at);
    }

    #[test]
    fn a_large_payload_goes_as_its_own_chunk_behind_its_header() {
        let mut gather = Gather::new();
        let mut chunks = Vec::new();
        let payload = Bytes::from(vec![3; COPY_BELOW]);
        gather.push_write(&header(COPY_BELOW as u32), payload.clone(), &mut chunks);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].len(), WRITE_HEADER_LEN);
        assert_eq!(chunks[1].as_ptr(), payload.as_ptr(), "not copied");
    }

    #[test]
    fn a_buffer_a_large_frame_grew_is_not_kept() {
        let buffers = Arc::new(GatherBuffers::default());
        let (grown, _) = chunk(&buffers, &vec![1; GATHER_CAPACITY + 1]);
        drop(grown);
        assert!(buffers.idle.lock().unwrap().is_empty());
    }

    #[test]
    fn no_more_buffers_are_kept_idle_than_the_bound() {
        let buffers = Arc::new(GatherBuffers::default());
        let chunks: Vec<_> = (0..IDLE_GATHER_BUFFERS + 3)
            .map(|_| chunk(&buffers, b"header").0)
            .collect();
        drop(chunks);
        assert_eq!(buffers.idle.lock().unwrap().len(), IDLE_GATHER_BUFFERS);
    }
}
