//! Frames over a QUIC stream: a reader that decodes whole frames out of what arrives, and a
//! writer that sends a write's header and payload as separate chunks, so the payload is
//! never copied on its way out.

use blockrep_wire::{Frame, WireError, WriteHeader, encode_write_header};
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
            if let Some(frame) = Frame::decode(&mut self.buf)? {
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
                Err(e) => return Err(StreamError::Connection(e.to_string())),
            }
        }
    }
}

pub struct FrameWriter {
    send: SendStream,
    header: BytesMut,
    /// Bytes sent, for the pair's counters.
    pub bytes_sent: u64,
}

impl FrameWriter {
    pub fn new(send: SendStream) -> Self {
        Self {
            send,
            header: BytesMut::with_capacity(4096),
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
            .map_err(|e| StreamError::Connection(e.to_string()))
    }

    /// Queues a write's header in the pending batch; its payload follows as its own chunk.
    pub fn push_write(&mut self, header: &WriteHeader, payload: Bytes, chunks: &mut Vec<Bytes>) {
        self.header.clear();
        encode_write_header(header, &mut self.header);
        chunks.push(self.header.split().freeze());
        if !payload.is_empty() {
            chunks.push(payload);
        }
    }

    /// Queues any other frame in the pending batch.
    pub fn push_frame(&mut self, frame: &Frame, chunks: &mut Vec<Bytes>) {
        self.header.clear();
        frame.encode(&mut self.header);
        chunks.push(self.header.split().freeze());
    }

    /// Sends a batch of chunks with as few system calls as quinn manages.
    pub async fn send_chunks(&mut self, chunks: &mut Vec<Bytes>) -> Result<(), StreamError> {
        self.bytes_sent += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
        let result = self.send.write_all_chunks(chunks).await;
        chunks.clear();
        result.map_err(|e| StreamError::Connection(e.to_string()))
    }

    /// Ends the stream from this side.
    pub fn finish(&mut self) {
        // The peer may be gone already; nothing to do then.
        let _ = self.send.finish();
    }
}
