//! What crosses between hosts: the frames of a replication stream (data and its
//! acknowledgements), the envelope of control requests (protobuf messages of
//! `proto/blockrep/v1/cluster.proto`), and the protocol version.
//!
//! No I/O: the agent's QUIC tasks read bytes into a buffer and ask [`Frame::decode`] for
//! whole frames, and encode frames into buffers they write.

pub mod frame;
pub mod version;

pub use frame::{
    DIGEST_BLOCK, FRAME_HEADER_LEN, Frame, Hello, HelloFlags, MAX_FRAME_LEN, MAX_PAYLOAD_LEN,
    MAX_VERIFY_BLOCKS, RefuseKind, RejectReason, WRITE_HEADER_LEN, WireError, WriteAhead,
    WriteFlags, WriteHeader, block_crcs, encode_write_header, payload_crc, write_ahead,
};
pub use version::{ALPN, ProtocolVersion};
