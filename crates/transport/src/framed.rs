//! Frames over a QUIC stream: a reader that decodes whole frames out of what arrives, and a
//! writer that gathers headers and small payloads into large chunks and sends large payloads
//! as chunks of their own, uncopied.

use blockrep_wire::{Frame, RefuseKind, WireError, WriteHeader, encode_write_header};
use bytes::{Bytes, BytesMut};
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
        loop {
            if let Some(frame) = self.next_received()? {
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
/// Gathered bytes become a chunk once they reach this.
const GATHER_BYTES: usize = 256 << 10;

pub struct FrameWriter {
    send: SendStream,
    /// Headers and small payloads of the pending batch, not yet a chunk.
    gather: BytesMut,
    /// Bytes sent, for the pair's counters.
    pub bytes_sent: u64,
}

impl FrameWriter {
    pub fn new(send: SendStream) -> Self {
        Self {
            send,
            gather: BytesMut::with_capacity(GATHER_BYTES),
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
        self.make_room(64 + payload.len().min(COPY_BELOW));
        encode_write_header(header, payload.len() as u32, &mut self.gather);
        if payload.len() < COPY_BELOW {
            self.gather.extend_from_slice(&payload);
            if self.gather.len() >= GATHER_BYTES {
                chunks.push(self.gather.split().freeze());
            }
        } else {
            chunks.push(self.gather.split().freeze());
            chunks.push(payload);
        }
    }

    /// Queues any other frame in the pending batch.
    pub fn push_frame(&mut self, frame: &Frame, chunks: &mut Vec<Bytes>) {
        frame.encode(&mut self.gather);
        if self.gather.len() >= GATHER_BYTES {
            chunks.push(self.gather.split().freeze());
        }
    }

    fn make_room(&mut self, bytes: usize) {
        if self.gather.capacity() - self.gather.len() < bytes {
            self.gather.reserve(GATHER_BYTES.max(bytes));
        }
    }

    /// Sends a batch of chunks with as few system calls as quinn manages.
    /// Ends the pending batch: the gathered headers and small payloads become a chunk of
    /// `chunks`, so `chunks` holds every byte [`FrameWriter::send_chunks`] would send.
    pub fn close_batch(&mut self, chunks: &mut Vec<Bytes>) {
        if !self.gather.is_empty() {
            chunks.push(self.gather.split().freeze());
        }
    }

    pub async fn send_chunks(&mut self, chunks: &mut Vec<Bytes>) -> Result<(), StreamError> {
        if !self.gather.is_empty() {
            chunks.push(self.gather.split().freeze());
        }
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
