//! Memory the DR side receives large writes' payloads into, so that the applier puts them
//! on its ring as they came: aligned for `O_DIRECT` (no copy into an aligned buffer before
//! the write), and pooled (no fresh buffer per write, whose pages fault in as it fills).

use blockrep_volume::{PooledBuf, SharedPool};
use blockrep_wire::{WriteFlags, WriteHeader};

use crate::applier::goes_on_the_ring;

/// Smaller payloads are received behind their header and copied into the ring's buffers:
/// a buffer of their own saves little.
const PLACED_MIN_BYTES: u32 = 64 << 10;
/// Idle buffers a stream keeps (each stream its own pool, freed with the stream): a
/// hypermetro window of eight 1 MiB writes, or two initial-sync extents of 4 MiB, come back
/// as fast as the next ones are received.
const IDLE_BYTES: usize = 8 << 20;

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

    /// Memory for the payload of `header`, if it is a direct write of aligned data the
    /// applier's ring writes as it is, large enough to be worth it; back to the pool once
    /// the ring wrote it (a gated write's is held until it is let go). A staged write is
    /// not placed: it is copied into the stage log whatever memory it came in. Only a
    /// power-of-two length is placed: the pool's buffer then holds it exactly, so the
    /// memory held is the bytes received (what the applier's queue counts).
    pub(super) fn place(&self, header: &WriteHeader) -> Option<PooledBuf> {
        let placed = header.flags.has(WriteFlags::DIRECT)
            && header.len >= PLACED_MIN_BYTES
            && header.len.is_power_of_two()
            && goes_on_the_ring(header);
        placed.then(|| self.pool.returning(self.pool.take(header.len as usize)))
    }
}

#[cfg(test)]
mod tests {
    use blockrep_core::replication::{Epoch, WriteSeq};
    use blockrep_volume::DIRECT_IO_ALIGN;

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

    /// Large aligned direct writes get aligned memory of their length; a staged write, or
    /// what the ring would not take as it is, or is small, or would leave part of a pooled
    /// buffer unused, does not.
    #[test]
    fn large_aligned_data_writes_are_placed_in_aligned_memory() {
        let memory = PayloadMemory::new();
        for header in [
            write(WriteFlags::DIRECT, 0, 1 << 20),
            write(WriteFlags::DIRECT | WriteFlags::ACK, 1 << 30, 64 << 10),
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
            write(WriteFlags::DIRECT | WriteFlags::ZEROES, 0, 1 << 20),
            write(0, 1 << 30, 1 << 20),
        ] {
            assert!(memory.place(&header).is_none(), "{header:?}");
        }
    }
}
