//! Byte ranges on a volume.

use std::fmt;

/// A half-open byte range `[offset, offset + len)` on a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RangeError {
    #[error("range at offset {offset} with length {len} overflows a 64-bit offset")]
    Overflow { offset: u64, len: u64 },
    #[error("range {offset}+{len} ends past the end of the volume ({size} bytes)")]
    PastEnd { offset: u64, len: u64, size: u64 },
}

impl ByteRange {
    pub const fn new(offset: u64, len: u64) -> Self {
        Self { offset, len }
    }

    /// Builds a range and checks it lies inside a volume of `size` bytes.
    pub fn within(offset: u64, len: u64, size: u64) -> Result<Self, RangeError> {
        let end = offset
            .checked_add(len)
            .ok_or(RangeError::Overflow { offset, len })?;
        if end > size {
            return Err(RangeError::PastEnd { offset, len, size });
        }
        Ok(Self { offset, len })
    }

    pub const fn end(&self) -> u64 {
        self.offset + self.len
    }

    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the two ranges share a byte.
    pub const fn overlaps(&self, other: &ByteRange) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }

    /// Whether offset and length are both multiples of `align` (a power of two).
    pub const fn is_aligned(&self, align: u64) -> bool {
        (self.offset | self.len) & (align - 1) == 0
    }

    /// The smallest range aligned to `align` (a power of two) that covers this one.
    pub const fn align_out(&self, align: u64) -> Self {
        let start = self.offset & !(align - 1);
        let end = (self.end() + align - 1) & !(align - 1);
        Self {
            offset: start,
            len: end - start,
        }
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.offset, self.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_rejects_past_end_and_overflow() {
        assert_eq!(
            ByteRange::within(0, 4096, 4096),
            Ok(ByteRange::new(0, 4096))
        );
        assert_eq!(
            ByteRange::within(4096, 1, 4096),
            Err(RangeError::PastEnd {
                offset: 4096,
                len: 1,
                size: 4096
            })
        );
        assert_eq!(
            ByteRange::within(u64::MAX, 2, u64::MAX),
            Err(RangeError::Overflow {
                offset: u64::MAX,
                len: 2
            })
        );
    }

    #[test]
    fn align_out_covers_the_range() {
        let r = ByteRange::new(5000, 100).align_out(4096);
        assert_eq!(r, ByteRange::new(4096, 4096));
        let r = ByteRange::new(4095, 2).align_out(4096);
        assert_eq!(r, ByteRange::new(0, 8192));
        assert!(ByteRange::new(8192, 4096).is_aligned(4096));
        assert!(!ByteRange::new(8192, 512).is_aligned(4096));
    }
}
