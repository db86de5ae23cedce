//! Memory the DR side receives large writes' payloads into, so that the applier puts them
//! on its ring as they came: aligned for `O_DIRECT` (no copy into an aligned buffer before
//! the write), and pooled (no fresh buffer per write, whose pages fault in as it fills).

use blockrep_volume::{PooledBuf, SharedPool};
use blockrep_wire::WriteHeader;

use crate::applier::goes_on_the_ring;

/// Smaller payloads are received behind their header and copied into the ring's buffers:
/// a buffer of their own saves little.
const PLACED_MIN_BYTES: u32 = 64 << 10;
/// Idle buffers a stream keeps (each stream its own pool, freed with the stream): a
/// hypermetro window of 1 MiB writes, or a resync's pieces in flight, come back as fast as
/// the next ones are received.
const IDLE_BYTES: usize = 16 << 20;

/// A stream's pool of payload memory.
pub(super) struct PayloadMemory {
    pool: SharedPool,
}

impl PayloadMemory {
    pub(super) fn new() -> Self {
        Self {
            pool: SharedPool::with_idle_limit(IDLE_BYTES),
        }
    }

    /// Memory for the payload of `header`, if it is aligned data the applier's ring could
    /// write as it is and large enough to be worth it; back to the pool when the last
    /// reference to the payload goes: a direct write's once the ring wrote it, a staged
    /// write's once it is copied into the stage log (a gated write's is held until it is
    /// let go). Only a power-of-two length is placed: the pool's buffer then holds it
    /// exactly, so the memory held is the bytes received (what the applier's queue counts).
    pub(super) fn place(&self, header: &WriteHeader) -> Option<PooledBuf> {
        let placed = header.len >= PLACED_MIN_BYTES
            && header.len.is_power_of_two()
            && goes_on_the_ring(header);
        placed.then(|| self.pool.returning(self.pool.take(header.len as usize)))
    }
}

#[cfg(test)]
mod tests {
    use blockrep_core::replication::{Epoch, WriteSeq};
    use blockrep_volume::DIRECT_IO_ALIGN;
    use blockrep_wire::WriteFlags;

    use super::*;

    fn write(flags: u8, offset: u64, len: u32) -> WriteHeader {
        WriteHeader {
            flags: WriteFlags(flags),
            epoch: Epoch(1),
            seq: WriteSeq(1),
            offset,
            len,
            crc: 0,
        }
    }

    /// Large aligned data writes get aligned memory of their length; what the ring would
    /// not take as it is, or is small, or would leave part of a pooled buffer unused, does
    /// not.
    #[test]
    fn large_aligned_data_writes_are_placed_in_aligned_memory() {
        let memory = PayloadMemory::new();
        for header in [
            write(WriteFlags::DIRECT, 0, 1 << 20),
            write(0, 1 << 30, 64 << 10),
        ] {
            let placed = memory.place(&header).expect("placed");
            assert_eq!(placed.as_ref().len(), header.len as usize);
            assert_eq!(
                placed.as_ref().as_ptr() as usize % DIRECT_IO_ALIGN as usize,
                0
            );
        }
        for header in [
            write(WriteFlags::DIRECT, 0, 32 << 10),
            write(WriteFlags::DIRECT, 512, 1 << 20),
            write(WriteFlags::DIRECT, 0, (1 << 20) + 4096),
            write(WriteFlags::ZEROES, 0, 1 << 20),
        ] {
            assert!(memory.place(&header).is_none(), "{header:?}");
        }
    }
}
