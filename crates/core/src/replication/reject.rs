//! Why a DR side rejects a write it was sent.

/// Why the DR side rejected a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectReason {
    /// The payload did not match its CRC: send it again.
    Checksum = 1,
    /// A staged write that does not fit under the DR side's stage log cap: the pair falls
    /// back to the bitmap, and the DR volume stays at its last consistent point.
    StageFull = 2,
}
