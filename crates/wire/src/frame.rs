//! Frames on a replication stream, and the control request/response envelope.
//!
//! Every frame is `u32 length | u8 type | body`, big-endian, where `length` counts the type
//! byte and the body. A `Write` frame's body is a fixed header followed by its payload; the
//! payload is never copied on the way in (it is split off the receive buffer) or out (it is
//! sent as its own chunk after the header).
//!
//! ```text
//! Hello     u16 version | 16 pair | 16 volume | u64 size | u8 model | u8 flags | lineage | str node
//! Welcome   u64 applied epoch | u64 staged epoch | u8 consistent | lineage
//! Refuse    u8 kind | str reason
//! Write     u8 flags | u64 epoch | u64 seq | u64 offset | u32 len | u32 crc32 | payload
//! WriteAck  u64 seq                       Flush    u64 seq       FlushAck u64 seq
//! Seal      u64 epoch | u64 cut time (ms) Staged   u64 epoch     Discard  u64 after
//! Applied   u64 epoch | u64 cut time (ms) SyncDone u64 epoch     Reject   u64 seq | u8 why
//! Request   JSON                          Response JSON
//! Verify    u64 id | u64 offset | u32 block | u8 after? | u64 epoch | u16 n | n × u32 crc32
//! Verified  u64 id | u16 n | n × u16 index of a block that differs
//! Ungate    u64 epoch                     SyncDoneAck u64 epoch
//! Digest    u64 offset | u64 after epoch | u16 n | n × u32 crc32 of a 64 KiB block
//!
//! lineage   u64 current | u8 written | u16 n | n × (u64 generation | u8 written)
//! ```

use blockrep_core::VolumeId;
use blockrep_core::replication::digests;
use blockrep_core::replication::{
    Epoch, Generation, GenerationId, Lineage, PairId, ProbeId, ReplicationModel, WriteSeq,
};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::version::ProtocolVersion;

/// The most data one write carries: 64 MiB (compressed or not).
pub const MAX_PAYLOAD_LEN: usize = 64 << 20;
/// The longest frame accepted: a 64 MiB write plus its header.
pub const MAX_FRAME_LEN: usize = MAX_PAYLOAD_LEN + 64;
/// Bytes of a frame before its body: length and type.
pub const FRAME_HEADER_LEN: usize = 5;
/// Bytes of a `Write` frame before its payload, counting the frame header.
pub const WRITE_HEADER_LEN: usize = FRAME_HEADER_LEN + 1 + 8 + 8 + 8 + 4 + 4;

/// Flags of a `Write` frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags(pub u8);

impl WriteFlags {
    /// Apply at once (hypermetro, initial sync) rather than stage until the epoch's seal.
    pub const DIRECT: u8 = 1 << 0;
    /// Answer with `WriteAck` once written (hypermetro).
    pub const ACK: u8 = 1 << 1;
    /// Write with FUA (durable before the acknowledgement).
    pub const FUA: u8 = 1 << 2;
    /// The range reads as zeroes; no payload.
    pub const ZEROES: u8 = 1 << 3;
    /// A resync extent (initial sync or catch-up), not an application write.
    pub const RESYNC: u8 = 1 << 4;
    /// A direct write the DR side holds back, unwritten and unacknowledged, until an
    /// `Ungate` (a hypermetro group going synchronous again).
    pub const GATED: u8 = 1 << 5;
    /// The payload is one zstd frame of the write's `len` bytes (fewer bytes than that on
    /// the wire); the CRC is of the bytes it decompresses to.
    pub const ZSTD: u8 = 1 << 6;
    const KNOWN: u8 = 0x7f;

    pub fn has(self, flag: u8) -> bool {
        self.0 & flag != 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteHeader {
    pub flags: WriteFlags,
    pub epoch: Epoch,
    /// The sender's key for the acknowledgement (and for a `Reject`).
    pub seq: WriteSeq,
    pub offset: u64,
    pub len: u32,
    /// CRC32 of the payload (of nothing, for a zero range).
    pub crc: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: ProtocolVersion,
    pub pair: PairId,
    /// The DR volume the stream writes.
    pub volume: VolumeId,
    /// Its size as the production side knows it; the DR side refuses a mismatch.
    pub size: u64,
    pub model: ReplicationModel,
    /// The production agent's node name.
    pub node: String,
    /// The production volume's data generations.
    pub lineage: Lineage,
    pub flags: HelloFlags,
}

/// What the production side says about its bitmap and the operator's word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HelloFlags {
    /// Its bitmap has dirty blocks.
    pub dirty: bool,
    /// The pair's first full copy completed.
    pub full_sync_done: bool,
    /// The operator resolved a divergence keeping the production side.
    pub discard_peer: bool,
}

impl HelloFlags {
    fn to_byte(self) -> u8 {
        u8::from(self.dirty) | u8::from(self.full_sync_done) << 1 | u8::from(self.discard_peer) << 2
    }

    fn from_byte(b: u8) -> Result<Self, WireError> {
        if b & !0x7 != 0 {
            return Err(WireError::UnknownFlags(b));
        }
        Ok(Self {
            dirty: b & 1 != 0,
            full_sync_done: b & 2 != 0,
            discard_peer: b & 4 != 0,
        })
    }
}

/// Why the DR side refused a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RefuseKind {
    /// The stream does not fit the pair here (pair, volume, size, model or version).
    Mismatch = 1,
    /// The two sides' data diverged (split brain, newer or unrelated DR data): nothing is
    /// copied until the operator resolves it.
    Diverged = 2,
    /// The DR side cannot serve the pair (its stage log, its volume).
    Failed = 3,
}

/// Why the DR side rejected a write (the pair machines' vocabulary; its byte on the wire is
/// its discriminant).
pub use blockrep_core::replication::RejectReason;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    /// The DR side accepts the stream: it has applied `applied`, staged `staged`, and holds
    /// a consistent image (or not yet: a first sync is needed).
    Welcome {
        applied: Epoch,
        staged: Epoch,
        consistent: bool,
        lineage: Lineage,
    },
    Refuse {
        kind: RefuseKind,
        reason: String,
    },
    Write(WriteHeader, Bytes),
    WriteAck {
        seq: WriteSeq,
    },
    Flush {
        seq: WriteSeq,
    },
    FlushAck {
        seq: WriteSeq,
    },
    Seal {
        epoch: Epoch,
        cut_ms: u64,
    },
    Staged {
        epoch: Epoch,
    },
    Applied {
        epoch: Epoch,
        cut_ms: u64,
    },
    Discard {
        after: Epoch,
    },
    SyncDone {
        epoch: Epoch,
    },
    /// The DR side recorded the end of the initial sync of `epoch` durably, with every
    /// extent before it: the production side may record the pair as synced.
    SyncDoneAck {
        epoch: Epoch,
    },
    Reject {
        seq: WriteSeq,
        reason: RejectReason,
    },
    Request(Bytes),
    Response(Bytes),
    /// Online verify: the CRC32 of each `block`-byte block from `offset` on production, to
    /// compare once every earlier frame is applied: at once (`after: None`, direct
    /// replication), or once the unit of epoch `after` is applied (epochs).
    Verify {
        id: ProbeId,
        offset: u64,
        block: u32,
        after: Option<Epoch>,
        crcs: Vec<u32>,
    },
    /// Gated direct writes before this are written (and acknowledged) once the DR side
    /// applied the unit of `epoch`: every host of the group went synchronous at that cut.
    Ungate {
        epoch: Epoch,
    },
    /// The blocks of verify request `id` whose CRC differs on the DR side.
    Verified {
        id: ProbeId,
        differing: Vec<u16>,
    },
    /// Production's CRC of each 64 KiB block from `offset` (a multiple of 64 KiB), read
    /// after every frame before this: the DR side records them, for drill verification,
    /// once the unit covering `after` is applied.
    Digest {
        offset: u64,
        after: Epoch,
        crcs: Vec<u32>,
    },
}

/// The most blocks one `Digest` frame covers.
pub const MAX_DIGEST_BLOCKS: usize = digests::MAX_BLOCKS_PER_DIGEST as usize;
pub use digests::DIGEST_BLOCK;

/// The most blocks one `Verify` frame covers.
pub const MAX_VERIFY_BLOCKS: usize = 1024;
/// The most bytes one `Verify` frame covers (its block size times its blocks): the DR side
/// reads them at once. Production's probes cover 4 MiB.
pub const MAX_VERIFY_BYTES: u64 = 64 << 20;

#[repr(u8)]
enum Type {
    Hello = 1,
    Welcome = 2,
    Refuse = 3,
    Write = 4,
    WriteAck = 5,
    Flush = 6,
    FlushAck = 7,
    Seal = 8,
    Staged = 9,
    Applied = 10,
    Discard = 11,
    SyncDone = 12,
    Reject = 13,
    Request = 14,
    Response = 15,
    Verify = 16,
    Verified = 17,
    Ungate = 18,
    SyncDoneAck = 19,
    Digest = 20,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {len} bytes is longer than the {MAX_FRAME_LEN}-byte limit")]
    TooLong { len: usize },
    #[error("unknown frame type {0}")]
    UnknownFrame(u8),
    #[error("frame type {ty} is {len} bytes, not what its fields need")]
    BadLength { ty: u8, len: usize },
    #[error("protocol version {0} is not spoken here (this side speaks {current})", current = ProtocolVersion::CURRENT.number())]
    UnknownVersion(u16),
    #[error("unknown replication model {0}")]
    UnknownModel(u8),
    #[error("write flags {0:#x} include unknown bits")]
    UnknownFlags(u8),
    #[error("unknown reject reason {0}")]
    UnknownReason(u8),
    #[error("unknown refusal kind {0}")]
    UnknownRefusal(u8),
    #[error("a string field is not UTF-8")]
    NotUtf8,
    #[error("a range of {len} bytes at {offset} runs past the end of any device")]
    RangeWraps { offset: u64, len: u64 },
}

impl Frame {
    /// Appends the frame to `out`. A `Write`'s payload is appended too; use
    /// [`Frame::encode_write_header`] to send the payload as its own chunk instead.
    pub fn encode(&self, out: &mut BytesMut) {
        if let Frame::Write(header, payload) = self {
            encode_write_header(header, payload.len() as u32, out);
            out.extend_from_slice(payload);
            return;
        }
        let start = out.len();
        out.put_u32(0);
        match self {
            Frame::Hello(h) => {
                out.put_u8(Type::Hello as u8);
                out.put_u16(h.version.number());
                out.put_slice(h.pair.as_bytes());
                out.put_slice(h.volume.as_bytes());
                out.put_u64(h.size);
                out.put_u8(model_code(h.model));
                out.put_u8(h.flags.to_byte());
                put_lineage(out, &h.lineage);
                put_str(out, &h.node);
            }
            Frame::Welcome {
                applied,
                staged,
                consistent,
                lineage,
            } => {
                out.put_u8(Type::Welcome as u8);
                out.put_u64(applied.0);
                out.put_u64(staged.0);
                out.put_u8(u8::from(*consistent));
                put_lineage(out, lineage);
            }
            Frame::Refuse { kind, reason } => {
                out.put_u8(Type::Refuse as u8);
                out.put_u8(*kind as u8);
                put_str(out, reason);
            }
            Frame::Write(..) => unreachable!("encoded above"),
            Frame::WriteAck { seq } => put_u64_frame(out, Type::WriteAck, seq.0),
            Frame::Flush { seq } => put_u64_frame(out, Type::Flush, seq.0),
            Frame::FlushAck { seq } => put_u64_frame(out, Type::FlushAck, seq.0),
            Frame::Seal { epoch, cut_ms } => {
                out.put_u8(Type::Seal as u8);
                out.put_u64(epoch.0);
                out.put_u64(*cut_ms);
            }
            Frame::Staged { epoch } => put_u64_frame(out, Type::Staged, epoch.0),
            Frame::Applied { epoch, cut_ms } => {
                out.put_u8(Type::Applied as u8);
                out.put_u64(epoch.0);
                out.put_u64(*cut_ms);
            }
            Frame::Discard { after } => put_u64_frame(out, Type::Discard, after.0),
            Frame::SyncDone { epoch } => put_u64_frame(out, Type::SyncDone, epoch.0),
            Frame::SyncDoneAck { epoch } => put_u64_frame(out, Type::SyncDoneAck, epoch.0),
            Frame::Ungate { epoch } => put_u64_frame(out, Type::Ungate, epoch.0),
            Frame::Reject { seq, reason } => {
                out.put_u8(Type::Reject as u8);
                out.put_u64(seq.0);
                out.put_u8(*reason as u8);
            }
            Frame::Request(body) => {
                out.put_u8(Type::Request as u8);
                out.put_slice(body);
            }
            Frame::Response(body) => {
                out.put_u8(Type::Response as u8);
                out.put_slice(body);
            }
            Frame::Verify {
                id,
                offset,
                block,
                after,
                crcs,
            } => {
                out.put_u8(Type::Verify as u8);
                out.put_u64(id.0);
                out.put_u64(*offset);
                out.put_u32(*block);
                out.put_u8(u8::from(after.is_some()));
                out.put_u64(after.map_or(0, |e| e.0));
                let crcs = &crcs[..crcs.len().min(MAX_VERIFY_BLOCKS)];
                out.put_u16(crcs.len() as u16);
                for crc in crcs {
                    out.put_u32(*crc);
                }
            }
            Frame::Digest {
                offset,
                after,
                crcs,
            } => {
                out.put_u8(Type::Digest as u8);
                out.put_u64(*offset);
                out.put_u64(after.0);
                let crcs = &crcs[..crcs.len().min(MAX_DIGEST_BLOCKS)];
                out.put_u16(crcs.len() as u16);
                for crc in crcs {
                    out.put_u32(*crc);
                }
            }
            Frame::Verified { id, differing } => {
                out.put_u8(Type::Verified as u8);
                out.put_u64(id.0);
                let differing = &differing[..differing.len().min(MAX_VERIFY_BLOCKS)];
                out.put_u16(differing.len() as u16);
                for index in differing {
                    out.put_u16(*index);
                }
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Takes one whole frame off the front of `buf`, or returns `None` if more bytes are
    /// needed. A `Write`'s payload is split off `buf` without copying.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME_LEN {
            return Err(WireError::TooLong { len });
        }
        if len == 0 {
            return Err(WireError::BadLength { ty: 0, len });
        }
        if buf.len() < 4 + len {
            buf.reserve(4 + len - buf.len());
            return Ok(None);
        }
        buf.advance(4);
        let mut body = buf.split_to(len);
        let ty = body.get_u8();
        let need = |n: usize| {
            if body.len() == n {
                Ok(())
            } else {
                Err(WireError::BadLength { ty, len })
            }
        };
        let frame = match ty {
            t if t == Type::Hello as u8 => {
                if body.len() < 2 + 16 + 16 + 8 + 1 + 1 + LINEAGE_MIN + 2 {
                    return Err(WireError::BadLength { ty, len });
                }
                let version = ProtocolVersion::from_number(body.get_u16())?;
                let pair = PairId::from_bytes(take_16(&mut body));
                let volume = VolumeId::from_bytes(take_16(&mut body));
                let size = body.get_u64();
                let model = model_from(body.get_u8())?;
                let flags = HelloFlags::from_byte(body.get_u8())?;
                let lineage = get_lineage(&mut body, ty, len)?;
                let node = get_str(&mut body, ty, len)?;
                if !body.is_empty() {
                    return Err(WireError::BadLength { ty, len });
                }
                Frame::Hello(Hello {
                    version,
                    pair,
                    volume,
                    size,
                    model,
                    node,
                    lineage,
                    flags,
                })
            }
            t if t == Type::Welcome as u8 => {
                if body.len() < 17 + LINEAGE_MIN {
                    return Err(WireError::BadLength { ty, len });
                }
                let applied = Epoch(body.get_u64());
                let staged = Epoch(body.get_u64());
                let consistent = body.get_u8() != 0;
                let lineage = get_lineage(&mut body, ty, len)?;
                if !body.is_empty() {
                    return Err(WireError::BadLength { ty, len });
                }
                Frame::Welcome {
                    applied,
                    staged,
                    consistent,
                    lineage,
                }
            }
            t if t == Type::Refuse as u8 => {
                if body.is_empty() {
                    return Err(WireError::BadLength { ty, len });
                }
                let kind = match body.get_u8() {
                    1 => RefuseKind::Mismatch,
                    2 => RefuseKind::Diverged,
                    3 => RefuseKind::Failed,
                    other => return Err(WireError::UnknownRefusal(other)),
                };
                let reason = get_str(&mut body, ty, len)?;
                if !body.is_empty() {
                    return Err(WireError::BadLength { ty, len });
                }
                Frame::Refuse { kind, reason }
            }
            t if t == Type::Write as u8 => {
                let header = get_write_header(&mut body, len)?;
                if !payload_fits(&header, body.len()) {
                    return Err(WireError::BadLength { ty, len });
                }
                Frame::Write(header, body.freeze())
            }
            t if t == Type::WriteAck as u8 => {
                need(8)?;
                Frame::WriteAck {
                    seq: WriteSeq(body.get_u64()),
                }
            }
            t if t == Type::Flush as u8 => {
                need(8)?;
                Frame::Flush {
                    seq: WriteSeq(body.get_u64()),
                }
            }
            t if t == Type::FlushAck as u8 => {
                need(8)?;
                Frame::FlushAck {
                    seq: WriteSeq(body.get_u64()),
                }
            }
            t if t == Type::Seal as u8 => {
                need(16)?;
                Frame::Seal {
                    epoch: Epoch(body.get_u64()),
                    cut_ms: body.get_u64(),
                }
            }
            t if t == Type::Staged as u8 => {
                need(8)?;
                Frame::Staged {
                    epoch: Epoch(body.get_u64()),
                }
            }
            t if t == Type::Applied as u8 => {
                need(16)?;
                Frame::Applied {
                    epoch: Epoch(body.get_u64()),
                    cut_ms: body.get_u64(),
                }
            }
            t if t == Type::Discard as u8 => {
                need(8)?;
                Frame::Discard {
                    after: Epoch(body.get_u64()),
                }
            }
            t if t == Type::SyncDone as u8 => {
                need(8)?;
                Frame::SyncDone {
                    epoch: Epoch(body.get_u64()),
                }
            }
            t if t == Type::SyncDoneAck as u8 => {
                need(8)?;
                Frame::SyncDoneAck {
                    epoch: Epoch(body.get_u64()),
                }
            }
            t if t == Type::Ungate as u8 => {
                need(8)?;
                Frame::Ungate {
                    epoch: Epoch(body.get_u64()),
                }
            }
            t if t == Type::Reject as u8 => {
                need(9)?;
                let seq = WriteSeq(body.get_u64());
                let reason = match body.get_u8() {
                    1 => RejectReason::Checksum,
                    2 => RejectReason::StageFull,
                    other => return Err(WireError::UnknownReason(other)),
                };
                Frame::Reject { seq, reason }
            }
            t if t == Type::Request as u8 => Frame::Request(body.freeze()),
            t if t == Type::Response as u8 => Frame::Response(body.freeze()),
            t if t == Type::Verify as u8 => {
                if body.len() < 8 + 8 + 4 + 1 + 8 + 2 {
                    return Err(WireError::BadLength { ty, len });
                }
                let id = ProbeId(body.get_u64());
                let offset = body.get_u64();
                let block = body.get_u32();
                let has_after = body.get_u8() != 0;
                let after = Epoch(body.get_u64());
                let after = has_after.then_some(after);
                let n = body.get_u16() as usize;
                if n > MAX_VERIFY_BLOCKS
                    || block == 0
                    || u64::from(block) * n as u64 > MAX_VERIFY_BYTES
                {
                    return Err(WireError::BadLength { ty, len });
                }
                if body.len() != 4 * n {
                    return Err(WireError::BadLength { ty, len });
                }
                let crcs = (0..n).map(|_| body.get_u32()).collect();
                Frame::Verify {
                    id,
                    offset,
                    block,
                    after,
                    crcs,
                }
            }
            t if t == Type::Digest as u8 => {
                if body.len() < 8 + 8 + 2 {
                    return Err(WireError::BadLength { ty, len });
                }
                let offset = body.get_u64();
                let after = Epoch(body.get_u64());
                let n = body.get_u16() as usize;
                if n > MAX_DIGEST_BLOCKS
                    || !offset.is_multiple_of(DIGEST_BLOCK)
                    || body.len() != 4 * n
                {
                    return Err(WireError::BadLength { ty, len });
                }
                let crcs = (0..n).map(|_| body.get_u32()).collect();
                Frame::Digest {
                    offset,
                    after,
                    crcs,
                }
            }
            t if t == Type::Verified as u8 => {
                if body.len() < 8 + 2 {
                    return Err(WireError::BadLength { ty, len });
                }
                let id = ProbeId(body.get_u64());
                let n = body.get_u16() as usize;
                if n > MAX_VERIFY_BLOCKS {
                    return Err(WireError::BadLength { ty, len });
                }
                if body.len() != 2 * n {
                    return Err(WireError::BadLength { ty, len });
                }
                let differing = (0..n).map(|_| body.get_u16()).collect();
                Frame::Verified { id, differing }
            }
            other => return Err(WireError::UnknownFrame(other)),
        };
        Ok(Some(frame))
    }
}

/// What the front of a reader's buffer holds, read ahead of the frame's end: see
/// [`write_ahead`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteAhead {
    /// A data write's header (neither zeroes nor compressed) whose payload has not all
    /// arrived: a reader may receive that payload into memory of its own rather than
    /// behind the header.
    Data(WriteHeader),
    /// The start of a `Write` frame whose header has not all arrived.
    HeaderIncomplete,
    /// Anything else (too few bytes to tell, another frame, a zero range or a compressed
    /// payload, or the whole frame here already): for [`Frame::decode`].
    Other,
}

/// Reads a `Write` frame's header ahead of its payload, at the front of `buf`. The header
/// is checked as [`Frame::decode`] checks it: a frame `decode` would refuse is refused here
/// with the same error (sooner, before its payload arrives).
pub fn write_ahead(buf: &[u8]) -> Result<WriteAhead, WireError> {
    if buf.len() < FRAME_HEADER_LEN || buf[4] != Type::Write as u8 {
        return Ok(WriteAhead::Other);
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME_LEN {
        return Err(WireError::TooLong { len });
    }
    if buf.len() >= 4 + len {
        return Ok(WriteAhead::Other);
    }
    if buf.len() < WRITE_HEADER_LEN {
        return Ok(WriteAhead::HeaderIncomplete);
    }
    let mut fields = &buf[FRAME_HEADER_LEN..WRITE_HEADER_LEN];
    let header = get_write_header(&mut fields, len)?;
    if header.flags.has(WriteFlags::ZEROES) || header.flags.has(WriteFlags::ZSTD) {
        return Ok(WriteAhead::Other);
    }
    if !payload_fits(&header, len - (WRITE_HEADER_LEN - 4)) {
        return Err(WireError::BadLength {
            ty: Type::Write as u8,
            len,
        });
    }
    Ok(WriteAhead::Data(header))
}

/// A `Write` frame's header fields, from a body `len` bytes long (counting the type byte),
/// checked: known flags, a range that does not wrap.
fn get_write_header(body: &mut impl Buf, len: usize) -> Result<WriteHeader, WireError> {
    let ty = Type::Write as u8;
    if body.remaining() < WRITE_HEADER_LEN - FRAME_HEADER_LEN {
        return Err(WireError::BadLength { ty, len });
    }
    let flags = body.get_u8();
    if flags & !WriteFlags::KNOWN != 0 {
        return Err(WireError::UnknownFlags(flags));
    }
    let header = WriteHeader {
        flags: WriteFlags(flags),
        epoch: Epoch(body.get_u64()),
        seq: WriteSeq(body.get_u64()),
        offset: body.get_u64(),
        len: body.get_u32(),
        crc: body.get_u32(),
    };
    if header.offset.checked_add(u64::from(header.len)).is_none() {
        return Err(WireError::RangeWraps {
            offset: header.offset,
            len: u64::from(header.len),
        });
    }
    Ok(header)
}

/// Whether a payload of `payload_len` bytes is what `header` says it carries.
fn payload_fits(header: &WriteHeader, payload_len: usize) -> bool {
    if header.flags.has(WriteFlags::ZSTD) {
        // Compressed: something, and less than it decompresses to, which is at most what a
        // frame may carry (the DR side decompresses into no more).
        !header.flags.has(WriteFlags::ZEROES)
            && payload_len > 0
            && payload_len < header.len as usize
            && header.len as usize <= MAX_PAYLOAD_LEN
    } else if header.flags.has(WriteFlags::ZEROES) {
        payload_len == 0
    } else {
        payload_len == header.len as usize
    }
}

/// Appends a `Write` frame's header; its payload of `payload_len` bytes must follow
/// (`header.len`, none for zeroes, or the compressed length with [`WriteFlags::ZSTD`]).
pub fn encode_write_header(header: &WriteHeader, payload_len: u32, out: &mut impl BufMut) {
    out.put_u32((WRITE_HEADER_LEN - 4) as u32 + payload_len);
    out.put_u8(Type::Write as u8);
    out.put_u8(header.flags.0);
    out.put_u64(header.epoch.0);
    out.put_u64(header.seq.0);
    out.put_u64(header.offset);
    out.put_u32(header.len);
    out.put_u32(header.crc);
}

fn put_u64_frame(out: &mut BytesMut, ty: Type, value: u64) {
    out.put_u8(ty as u8);
    out.put_u64(value);
}

fn put_str(out: &mut BytesMut, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}

fn get_str(body: &mut BytesMut, ty: u8, len: usize) -> Result<String, WireError> {
    if body.len() < 2 {
        return Err(WireError::BadLength { ty, len });
    }
    let n = body.get_u16() as usize;
    if body.len() < n {
        return Err(WireError::BadLength { ty, len });
    }
    let bytes = body.split_to(n);
    String::from_utf8(bytes.to_vec()).map_err(|_| WireError::NotUtf8)
}

/// Bytes of the shortest lineage: a current generation and no history.
const LINEAGE_MIN: usize = 8 + 1 + 2;

fn put_lineage(out: &mut BytesMut, lineage: &Lineage) {
    out.put_u64(lineage.current.id.0);
    out.put_u8(u8::from(lineage.current.written));
    let history = &lineage.history[lineage.history.len().saturating_sub(u16::MAX as usize)..];
    out.put_u16(history.len() as u16);
    for g in history {
        out.put_u64(g.id.0);
        out.put_u8(u8::from(g.written));
    }
}

fn get_lineage(body: &mut BytesMut, ty: u8, len: usize) -> Result<Lineage, WireError> {
    if body.len() < LINEAGE_MIN {
        return Err(WireError::BadLength { ty, len });
    }
    let current = Generation {
        id: GenerationId(body.get_u64()),
        written: body.get_u8() != 0,
    };
    let n = body.get_u16() as usize;
    if body.len() < 9 * n {
        return Err(WireError::BadLength { ty, len });
    }
    let history = (0..n)
        .map(|_| Generation {
            id: GenerationId(body.get_u64()),
            written: body.get_u8() != 0,
        })
        .collect();
    Ok(Lineage { current, history })
}

fn take_16(body: &mut BytesMut) -> [u8; 16] {
    let mut out = [0u8; 16];
    body.copy_to_slice(&mut out);
    out
}

fn model_code(model: ReplicationModel) -> u8 {
    match model {
        ReplicationModel::Hypermetro => 1,
        ReplicationModel::Async => 2,
    }
}

fn model_from(code: u8) -> Result<ReplicationModel, WireError> {
    match code {
        1 => Ok(ReplicationModel::Hypermetro),
        2 => Ok(ReplicationModel::Async),
        other => Err(WireError::UnknownModel(other)),
    }
}

/// The CRC a `Write` frame carries for its payload.
pub fn payload_crc(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

/// The CRC32 of each `block`-byte block of `data` (the last may be shorter), as a
/// `Verify` frame carries them.
pub fn block_crcs(data: &[u8], block: usize) -> Vec<u32> {
    data.chunks(block).map(crc32fast::hash).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn round_trip(frame: Frame) {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        let mut input = out.clone();
        assert_eq!(Frame::decode(&mut input).unwrap(), Some(frame));
        assert!(input.is_empty());
        // Any strict prefix asks for more bytes.
        for cut in 0..out.len() {
            let mut partial = BytesMut::from(&out[..cut]);
            assert_eq!(
                Frame::decode(&mut partial).unwrap(),
                None,
                "prefix of {cut}"
            );
        }
    }

    fn pair() -> PairId {
        PairId::from_bytes([0x11; 16])
    }

    /// A `Verify` frame makes the DR side read what it covers into memory at once: its
    /// blocks, times their number, are bounded (a block of 0xFFFF_F000 bytes would have the
    /// DR side allocate and read its whole volume).
    #[test]
    fn a_verify_covering_more_than_max_verify_bytes_is_refused() {
        let verify = |block: u32, n: usize| Frame::Verify {
            id: ProbeId(1),
            offset: 0,
            block,
            after: None,
            crcs: vec![0; n],
        };
        let decode = |frame: Frame| {
            let mut out = BytesMut::new();
            frame.encode(&mut out);
            Frame::decode(&mut out)
        };
        round_trip(verify(64 << 10, 64));
        round_trip(verify((MAX_VERIFY_BYTES / 16) as u32, 16));
        for (block, n) in [(0xFFFF_F000, 1), ((MAX_VERIFY_BYTES / 16) as u32, 17)] {
            assert!(
                matches!(decode(verify(block, n)), Err(WireError::BadLength { .. })),
                "{block} × {n}"
            );
        }
    }

    #[test]
    fn a_digest_past_its_blocks_or_off_a_block_is_refused() {
        let decode = |frame: Frame| {
            let mut out = BytesMut::new();
            frame.encode(&mut out);
            Frame::decode(&mut out)
        };
        let digest = |offset: u64| Frame::Digest {
            offset,
            after: Epoch(1),
            crcs: vec![1],
        };
        assert!(matches!(
            decode(digest(4096)),
            Err(WireError::BadLength { .. })
        ));
        // More blocks than a frame carries: encoding stops at the bound, so write it by hand.
        let mut out = BytesMut::new();
        out.put_u32((1 + 8 + 8 + 2 + 4 * 65) as u32);
        out.put_u8(Type::Digest as u8);
        out.put_u64(0);
        out.put_u64(1);
        out.put_u16(65);
        out.put_bytes(0, 4 * 65);
        assert!(matches!(
            Frame::decode(&mut out),
            Err(WireError::BadLength { .. })
        ));
    }

    #[test]
    fn every_frame_round_trips() {
        let mut lineage = Lineage::new(GenerationId(7));
        lineage.mark_written();
        lineage.begin(GenerationId(8));
        let hello = Hello {
            version: ProtocolVersion::V2,
            pair: pair(),
            volume: VolumeId::from_bytes([0x22; 16]),
            size: 1 << 30,
            model: ReplicationModel::Async,
            node: "host-b".into(),
            lineage: lineage.clone(),
            flags: HelloFlags {
                dirty: true,
                full_sync_done: false,
                discard_peer: true,
            },
        };
        let payload = Bytes::from_static(b"abcd");
        let frames = vec![
            Frame::Hello(hello),
            Frame::Welcome {
                applied: Epoch(3),
                staged: Epoch(4),
                consistent: true,
                lineage,
            },
            Frame::Refuse {
                kind: RefuseKind::Diverged,
                reason: "split brain".into(),
            },
            Frame::Verify {
                id: ProbeId(4),
                offset: 1 << 20,
                block: 65536,
                after: Some(Epoch(12)),
                crcs: vec![1, 2, 0xffff_ffff],
            },
            Frame::Verify {
                id: ProbeId(5),
                offset: 0,
                block: 4096,
                after: None,
                crcs: vec![],
            },
            Frame::Verified {
                id: ProbeId(4),
                differing: vec![0, 2],
            },
            Frame::Digest {
                offset: 3 * DIGEST_BLOCK,
                after: Epoch(9),
                crcs: vec![5, 0xffff_ffff],
            },
            Frame::Write(
                WriteHeader {
                    flags: WriteFlags(WriteFlags::DIRECT | WriteFlags::ACK),
                    epoch: Epoch(9),
                    seq: WriteSeq(77),
                    offset: 4096,
                    len: 4,
                    crc: payload_crc(&payload),
                },
                payload,
            ),
            Frame::Write(
                WriteHeader {
                    flags: WriteFlags(WriteFlags::ZEROES),
                    epoch: Epoch(9),
                    seq: WriteSeq(78),
                    offset: 0,
                    len: 1 << 20,
                    crc: payload_crc(&[]),
                },
                Bytes::new(),
            ),
            Frame::WriteAck { seq: WriteSeq(77) },
            Frame::Flush { seq: WriteSeq(5) },
            Frame::FlushAck { seq: WriteSeq(5) },
            Frame::Seal {
                epoch: Epoch(9),
                cut_ms: 1_700_000_000_000,
            },
            Frame::Staged { epoch: Epoch(9) },
            Frame::Applied {
                epoch: Epoch(9),
                cut_ms: 12,
            },
            Frame::Discard { after: Epoch(8) },
            Frame::SyncDone { epoch: Epoch(2) },
            Frame::SyncDoneAck { epoch: Epoch(2) },
            Frame::Ungate { epoch: Epoch(40) },
            Frame::Write(
                WriteHeader {
                    flags: WriteFlags(WriteFlags::DIRECT | WriteFlags::ACK | WriteFlags::GATED),
                    epoch: Epoch(41),
                    seq: WriteSeq(79),
                    offset: 8192,
                    len: 0,
                    crc: payload_crc(&[]),
                },
                Bytes::new(),
            ),
            Frame::Reject {
                seq: WriteSeq(77),
                reason: RejectReason::Checksum,
            },
            Frame::Request(Bytes::from_static(b"{}")),
            Frame::Response(Bytes::from_static(b"{\"ok\":true}")),
        ];
        for frame in frames {
            round_trip(frame);
        }
    }

    /// Pins the bytes of the handshake and of a write header: changing them is a protocol
    /// change, and needs a new version.
    #[test]
    fn golden_bytes() {
        let mut out = BytesMut::new();
        let mut lineage = Lineage::new(GenerationId(0x0102));
        lineage.begin(GenerationId(0x0a0b));
        lineage.mark_written();
        Frame::Hello(Hello {
            version: ProtocolVersion::V2,
            pair: pair(),
            volume: VolumeId::from_bytes([0x22; 16]),
            size: 0x4000_0000,
            model: ReplicationModel::Hypermetro,
            node: "a".into(),
            lineage,
            flags: HelloFlags {
                dirty: true,
                full_sync_done: true,
                discard_peer: false,
            },
        })
        .encode(&mut out);
        let mut expected = vec![0, 0, 0, 68, 1, 0, 2];
        expected.extend([0x11; 16]);
        expected.extend([0x22; 16]);
        expected.extend([0, 0, 0, 0, 0x40, 0, 0, 0, 1, 3]);
        expected.extend([0, 0, 0, 0, 0, 0, 0x0a, 0x0b, 1, 0, 1]);
        expected.extend([0, 0, 0, 0, 0, 0, 0x01, 0x02, 0]);
        expected.extend([0, 1, b'a']);
        assert_eq!(&out[..], &expected[..]);

        let mut out = BytesMut::new();
        encode_write_header(
            &WriteHeader {
                flags: WriteFlags(WriteFlags::FUA),
                epoch: Epoch(2),
                seq: WriteSeq(3),
                offset: 4096,
                len: 4096,
                crc: 0xdead_beef,
            },
            4096,
            &mut out,
        );
        assert_eq!(
            &out[..],
            &[
                0, 0, 0x10, 0x22, 4, 4, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0,
                0, 0, 0x10, 0, 0, 0, 0x10, 0, 0xde, 0xad, 0xbe, 0xef
            ][..]
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut too_long = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 4][..]);
        assert!(matches!(
            Frame::decode(&mut too_long),
            Err(WireError::TooLong { .. })
        ));
        assert_eq!(
            write_ahead(&[0xff, 0xff, 0xff, 0xff, Type::Write as u8]),
            Err(WireError::TooLong {
                len: u32::MAX as usize
            })
        );
        let mut unknown = BytesMut::from(&[0, 0, 0, 1, 200][..]);
        assert_eq!(
            Frame::decode(&mut unknown),
            Err(WireError::UnknownFrame(200))
        );
        let mut short_ack = BytesMut::from(&[0, 0, 0, 3, 5, 0, 0][..]);
        assert!(matches!(
            Frame::decode(&mut short_ack),
            Err(WireError::BadLength { ty: 5, .. })
        ));
        let mut old = BytesMut::new();
        Frame::Hello(Hello {
            version: ProtocolVersion::V2,
            pair: pair(),
            volume: VolumeId::from_bytes([0; 16]),
            size: 1,
            model: ReplicationModel::Async,
            node: String::new(),
            lineage: Lineage::new(GenerationId(1)),
            flags: HelloFlags::default(),
        })
        .encode(&mut old);
        old[5..7].copy_from_slice(&99u16.to_be_bytes());
        assert_eq!(Frame::decode(&mut old), Err(WireError::UnknownVersion(99)));
    }

    /// A write whose range would wrap past `u64::MAX` is refused where it is read, before
    /// anything builds a range of it.
    #[test]
    fn a_write_whose_range_wraps_is_an_error() {
        let mut out = BytesMut::new();
        encode_write_header(
            &WriteHeader {
                flags: WriteFlags(WriteFlags::DIRECT),
                epoch: Epoch(1),
                seq: WriteSeq(1),
                offset: u64::MAX - 4095,
                len: 8192,
                crc: 0,
            },
            8192,
            &mut out,
        );
        out.extend_from_slice(&[0; 8192]);
        assert_eq!(
            Frame::decode(&mut out),
            Err(WireError::RangeWraps {
                offset: u64::MAX - 4095,
                len: 8192
            })
        );
    }

    /// A compressed write carries something, less than it decompresses to, which is at
    /// most what an uncompressed write may carry; and never with the zeroes flag.
    #[test]
    fn a_compressed_write_is_shorter_than_its_length_and_no_longer_than_a_frame() {
        let decode = |flags: u8, len: u32, body: usize| {
            let mut out = BytesMut::new();
            let header = WriteHeader {
                flags: WriteFlags(flags | WriteFlags::ZSTD),
                epoch: Epoch(1),
                seq: WriteSeq(1),
                offset: 0,
                len,
                crc: 0,
            };
            encode_write_header(&header, body as u32, &mut out);
            out.extend_from_slice(&vec![1; body]);
            Frame::decode(&mut out).map(|f| f.is_some())
        };
        assert_eq!(decode(0, 4096, 100), Ok(true));
        for (flags, len, body) in [
            (0, 4096, 0),
            (0, 4096, 4096),
            (0, 4096, 5000),
            (WriteFlags::ZEROES, 4096, 100),
            (0, MAX_PAYLOAD_LEN as u32 + 1, 100),
        ] {
            assert!(
                matches!(decode(flags, len, body), Err(WireError::BadLength { .. })),
                "flags {flags:#x}, len {len}, body {body}"
            );
        }
    }

    proptest! {
        /// Arbitrary bytes, and valid frames with bytes flipped, decode to a frame, an
        /// error or "need more", and never panic.
        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = Frame::decode(&mut buf) {}
        }

        /// A write's header read ahead of its payload agrees with decoding the whole frame:
        /// a data write that decodes is found, with the same header, from any prefix holding
        /// its header but not all its payload; a shorter prefix past the frame's length and
        /// type is an incomplete header; an error found ahead is the one decoding gives;
        /// nothing else is found.
        #[test]
        fn a_data_write_read_ahead_agrees_with_decoding_it_whole(
            flags in prop_oneof![
                Just(0u8),
                Just(WriteFlags::DIRECT | WriteFlags::ACK),
                Just(WriteFlags::ZEROES),
                Just(WriteFlags::ZSTD),
                any::<u8>(),
            ],
            offset in prop_oneof![0u64..1 << 30, u64::MAX - (1 << 16)..=u64::MAX],
            len in 0u32..3000,
            off_by in prop_oneof![Just(0i64), -8i64..8],
            cut in any::<proptest::sample::Index>(),
        ) {
            let header = WriteHeader {
                flags: WriteFlags(flags), epoch: Epoch(3), seq: WriteSeq(9), offset, len, crc: 7,
            };
            let body = (i64::from(len) + off_by).max(0) as usize;
            let mut whole = BytesMut::new();
            encode_write_header(&header, body as u32, &mut whole);
            whole.extend((0..body).map(|i| i as u8));
            let decoded = Frame::decode(&mut whole.clone());
            let at = cut.index(whole.len() + 1);
            let ahead = write_ahead(&whole[..at]);
            let is_data = |h: &WriteHeader| {
                !h.flags.has(WriteFlags::ZEROES) && !h.flags.has(WriteFlags::ZSTD)
            };
            if at < FRAME_HEADER_LEN || at == whole.len() {
                prop_assert_eq!(ahead, Ok(WriteAhead::Other));
            } else if at < WRITE_HEADER_LEN {
                prop_assert_eq!(ahead, Ok(WriteAhead::HeaderIncomplete));
            } else {
                match (&decoded, &ahead) {
                    (Ok(Some(Frame::Write(h, _))), _) if is_data(h) => {
                        prop_assert_eq!(ahead, Ok(WriteAhead::Data(*h)));
                    }
                    (_, Ok(WriteAhead::Data(_) | WriteAhead::HeaderIncomplete)) => {
                        prop_assert!(false, "found ahead: {ahead:?}, decoded: {decoded:?}")
                    }
                    (_, Err(e)) => prop_assert_eq!(decoded.as_ref().err(), Some(e)),
                    (_, Ok(WriteAhead::Other)) => {}
                }
            }
        }

        #[test]
        fn flipped_frames_never_panic(at in 0usize..64, value in any::<u8>()) {
            let mut out = BytesMut::new();
            Frame::Seal { epoch: Epoch(1), cut_ms: 2 }.encode(&mut out);
            Frame::Refuse { kind: RefuseKind::Mismatch, reason: "x".repeat(20) }.encode(&mut out);
            encode_write_header(&WriteHeader {
                flags: WriteFlags(0), epoch: Epoch(1), seq: WriteSeq(1), offset: 0, len: 8, crc: 0,
            }, 8, &mut out);
            out.extend_from_slice(&[7; 8]);
            let at = at % out.len();
            out[at] = value;
            while let Ok(Some(_)) = Frame::decode(&mut out) {}
        }
    }
}
