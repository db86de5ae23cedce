//! The protocol version two hosts speak, with the reason each version came to be.

use crate::frame::WireError;

/// The ALPN every blockrep QUIC connection negotiates; a peer offering anything else is
/// refused during the TLS handshake.
pub const ALPN: &[u8] = b"blockrep/1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// Version 2: the handshake carries both sides' data generations (the DR side refuses a
    /// split brain, newer or unrelated data with a refusal kind), and online verify frames.
    /// Version 1 (a stream without generations) is no longer spoken.
    V2,
}

impl ProtocolVersion {
    pub const CURRENT: ProtocolVersion = ProtocolVersion::V2;

    pub fn number(self) -> u16 {
        match self {
            ProtocolVersion::V2 => 2,
        }
    }

    pub fn from_number(n: u16) -> Result<Self, WireError> {
        match n {
            2 => Ok(ProtocolVersion::V2),
            other => Err(WireError::UnknownVersion(other)),
        }
    }
}
