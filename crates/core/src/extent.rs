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
    /// A range the program made itself. Panics if it would end past `u64::MAX`: a range from
    /// outside (the network, a client, a file) is built with [`ByteRange::within`], which
    /// checks, so that no range's [`ByteRange::end`] can wrap past a bounds check.
    pub const fn new(offset: u64, len: u64) -> Self {
        assert!(
            offset.checked_add(len).is_some(),
            "a byte range ends past u64::MAX"
        );
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

/// Ranges read with one I/O: `range` covers every piece, and the gaps between them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadSpan {
    pub range: ByteRange,
    pub pieces: Vec<ByteRange>,
}

impl ReadSpan {
    /// The bytes of the pieces (what is sent; the gaps are only read).
    pub fn piece_bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.len).sum()
    }
}

/// Groups sorted, disjoint `runs` into spans of at most `max_span` bytes, each read with one
/// I/O: a run joins the span before it when the gap between them is at most `max_gap`;
/// a run longer than `max_span` is split. Scattered small runs (a catch-up after random
/// writes) then cost one read per span instead of one per run.
pub fn read_spans(runs: &[ByteRange], max_span: u64, max_gap: u64) -> Vec<ReadSpan> {
    assert!(max_span > 0, "a span holds at least one byte");
    let mut out = Vec::new();
    let mut current: Option<ReadSpan> = None;
    for run in runs {
        let mut at = run.offset;
        while at < run.end() {
            if let Some(span) = current.as_mut() {
                let span_end = span.range.offset + max_span;
                if at >= span.range.end() && at - span.range.end() <= max_gap && at < span_end {
                    let piece = ByteRange::new(at, (run.end() - at).min(span_end - at));
                    span.pieces.push(piece);
                    span.range.len = piece.end() - span.range.offset;
                    at = piece.end();
                    continue;
                }
                out.extend(current.take());
            }
            let piece = ByteRange::new(at, (run.end() - at).min(max_span));
            current = Some(ReadSpan {
                range: piece,
                pieces: vec![piece],
            });
            at = piece.end();
        }
    }
    out.extend(current);
    out
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.offset, self.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, len: u64) -> ByteRange {
        ByteRange::new(offset, len)
    }

    #[test]
    fn read_spans_join_close_runs_and_split_long_ones() {
        let runs = [r(0, 4), r(6, 2), r(20, 4), r(24 + 2, 30)];
        let spans = read_spans(&runs, 16, 2);
        assert_eq!(
            spans,
            vec![
                ReadSpan {
                    range: r(0, 8),
                    pieces: vec![r(0, 4), r(6, 2)]
                },
                ReadSpan {
                    range: r(20, 16),
                    pieces: vec![r(20, 4), r(26, 10)]
                },
                ReadSpan {
                    range: r(36, 16),
                    pieces: vec![r(36, 16)]
                },
                ReadSpan {
                    range: r(52, 4),
                    pieces: vec![r(52, 4)]
                },
            ]
        );
        // Every run's bytes are in exactly one piece, in order.
        let pieces: Vec<_> = spans.iter().flat_map(|s| s.pieces.clone()).collect();
        assert_eq!(pieces.iter().map(|p| p.len).sum::<u64>(), 4 + 2 + 4 + 30);
        assert!(pieces.windows(2).all(|w| w[0].end() <= w[1].offset));
        assert!(spans.iter().all(|s| s.range.len <= 16));
    }

    #[test]
    fn read_spans_without_gaps_allowed_keep_runs_apart() {
        assert_eq!(read_spans(&[r(0, 4), r(5, 4)], 64, 0).len(), 2);
        assert_eq!(read_spans(&[r(0, 4), r(4, 4)], 64, 0).len(), 1);
        assert!(read_spans(&[], 64, 8).is_empty());
    }

    #[test]
    #[should_panic(expected = "ends past u64::MAX")]
    fn an_unchecked_range_never_wraps() {
        let _ = ByteRange::new(u64::MAX - 10, 4096);
    }

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
