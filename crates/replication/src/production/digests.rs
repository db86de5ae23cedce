//! Production's digests of each sealed epoch's blocks, while the group keeps points in time
//! (docs/POINT-IN-TIME.md, "Verifying a drill's content"): a thread per session reads the
//! 64 KiB blocks a sealed epoch touched, with them locked through the write gate so no
//! write to them is in flight, and queues their CRCs on the link in stream order. The
//! journal drops what was read if it left journal mode meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use blockrep_core::ByteRange;
use blockrep_volume::{AlignedBuf, DIRECT_IO_ALIGN, Volume, Waker};
use blockrep_wire::{DIGEST_BLOCK, block_crcs};

use crate::link::PairLink;

/// Starts the digest thread of a session; it ends when `stop` is set.
pub(super) fn start(
    volume: Arc<Volume>,
    link: Arc<PairLink>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let waker = Arc::new(Waker::new()?);
    std::thread::Builder::new()
        .name("digests".into())
        .spawn(move || {
            if let Err(e) = run(&volume, &link, &stop, &waker) {
                // Only drill verification misses these blocks: replication goes on.
                tracing::warn!(error = %e, "production's digests stop for this session");
            }
        })
}

fn run(
    volume: &Volume,
    link: &PairLink,
    stop: &AtomicBool,
    waker: &Arc<Waker>,
) -> std::io::Result<()> {
    let stopped = || stop.load(Ordering::SeqCst);
    while link.wait_digests_due(&stopped) {
        let (round, due) = link.take_digests_due(volume.size());
        for range in due {
            if stopped() {
                return Ok(());
            }
            digest(volume, link, round, range, waker)?;
        }
    }
    Ok(())
}

/// Reads `range` with its blocks locked and queues their CRCs.
fn digest(
    volume: &Volume,
    link: &PairLink,
    round: u64,
    range: ByteRange,
    waker: &Arc<Waker>,
) -> std::io::Result<()> {
    let gate = volume.gate();
    let lock = gate.lock_blocking(range, waker)?;
    let read = (|| {
        let aligned = range.align_out(DIRECT_IO_ALIGN);
        let mut buf = AlignedBuf::new(aligned.len as usize);
        volume.backing().read_exact_at(&mut buf, aligned.offset)?;
        let start = (range.offset - aligned.offset) as usize;
        let crcs = block_crcs(
            &buf[start..start + range.len as usize],
            DIGEST_BLOCK as usize,
        );
        // Queued before the blocks are unlocked: no write to them can come before it.
        link.push_digest(round, range.offset, crcs);
        Ok(())
    })();
    gate.leave(lock);
    read
}
