//! The protocol version two hosts speak, with the reason each version came to be.

use crate::frame::WireError;

/// The ALPN every blockrep QUIC connection negotiates; a peer offering anything else is
/// refused during the TLS handshake.
pub const ALPN: &[u8] = b"blockrep/1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// The first: a replication stream opened with `Hello`, writes with a CRC per extent,
    /// acknowledgements, epochs sealed and staged; control requests as JSON.
    V1,
}

impl ProtocolVersion {
    pub const CURRENT: ProtocolVersion = ProtocolVersion::V1;

    pub fn number(self) -> u16 {
        match self {
            ProtocolVersion::V1 => 1,
        }
    }

    pub fn from_number(n: u16) -> Result<Self, WireError> {
        match n {
            1 => Ok(ProtocolVersion::V1),
            other => Err(WireError::UnknownVersion(other)),
        }
    }
}
