//! A served volume: its backing, its write gate and dirty tracker, and the slow paths of
//! its I/O.
//!
//! The NBD server submits aligned reads and writes straight to the backing with io_uring;
//! what is left (unaligned writes, zeroing, discard) goes through the blocking methods here.
//! Every write, fast or slow, holds its blocks through the [`WriteGate`] first.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use blockrep_core::ByteRange;

use crate::backing::{Backing, DIRECT_IO_ALIGN, Extent};
use crate::buf::AlignedBuf;
use crate::gate::WriteGate;
use crate::tracker::DirtyTracker;

/// Why a volume could not grow.
#[derive(Debug, thiserror::Error)]
pub enum GrowVolumeError {
    #[error(transparent)]
    Backing(#[from] crate::backing::GrowError),
    #[error("grow the dirty tracker: {0}")]
    Tracker(#[from] crate::tracker::TrackerError),
}

pub struct Volume {
    name: String,
    backing: Backing,
    gate: WriteGate,
    clients: AtomicUsize,
    counters: IoCounters,
}

/// Bytes the volume's clients read and wrote since it came online.
#[derive(Debug, Default)]
pub struct IoCounters {
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

impl Volume {
    pub fn new(name: String, backing: Backing, tracker: Option<Arc<DirtyTracker>>) -> Self {
        Self {
            name,
            backing,
            gate: WriteGate::new(tracker),
            clients: AtomicUsize::new(0),
            counters: IoCounters::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    pub fn size(&self) -> u64 {
        self.backing.size()
    }

    /// Grows the volume to `size` bytes, online: the dirty tracker first (its new blocks
    /// clean), then the backing; clients that connect from then on see the new size. A size
    /// the backing cannot hold is refused before the tracker grows for it (its map for an
    /// absurd size would exhaust memory).
    pub fn grow(&self, size: u64) -> Result<(), GrowVolumeError> {
        self.backing.allocate(size)?;
        if size > self.size()
            && let Some(tracker) = self.tracker()
        {
            tracker.grow(size)?;
        }
        self.backing.grow(size)?;
        Ok(())
    }

    /// Every write-like command passes here; see [`WriteGate`].
    pub fn gate(&self) -> &WriteGate {
        &self.gate
    }

    pub fn tracker(&self) -> Option<&Arc<DirtyTracker>> {
        self.gate.tracker()
    }

    pub fn counters(&self) -> &IoCounters {
        &self.counters
    }

    pub fn connected_clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Counts a client until the guard drops.
    pub fn connect_client(self: &Arc<Self>) -> ClientGuard {
        self.clients.fetch_add(1, Ordering::Relaxed);
        ClientGuard {
            volume: Arc::clone(self),
        }
    }

    /// Reads any range (aligned or not) with a blocking bounce read.
    pub fn read_unaligned(&self, range: ByteRange, out: &mut [u8]) -> io::Result<()> {
        let outer = range.align_out(DIRECT_IO_ALIGN);
        let mut buf = AlignedBuf::new(outer.len as usize);
        self.backing.read_exact_at(&mut buf, outer.offset)?;
        let start = (range.offset - outer.offset) as usize;
        out.copy_from_slice(&buf[start..start + range.len as usize]);
        Ok(())
    }

    /// Writes `data` at any offset: the edge blocks are read, patched and written whole.
    /// `data == None` writes zeroes. The caller holds the range's blocks through the gate
    /// and has admitted the range. Returns the whole blocks as written (the range aligned
    /// out to [`DIRECT_IO_ALIGN`]): what a peer needs to hold the same blocks.
    pub fn read_modify_write(
        &self,
        range: ByteRange,
        data: Option<&[u8]>,
        fua: bool,
    ) -> io::Result<AlignedBuf> {
        let outer = range.align_out(DIRECT_IO_ALIGN);
        let mut buf = AlignedBuf::new(outer.len as usize);
        let block = DIRECT_IO_ALIGN as usize;
        if range.offset != outer.offset {
            self.backing
                .read_exact_at(&mut buf[..block], outer.offset)?;
        }
        if range.end() != outer.end()
            && (outer.len as usize > block || range.offset == outer.offset)
        {
            let last = outer.len as usize - block;
            self.backing
                .read_exact_at(&mut buf[last..], outer.end() - block as u64)?;
        }
        let start = (range.offset - outer.offset) as usize;
        let target = &mut buf[start..start + range.len as usize];
        match data {
            Some(data) => target.copy_from_slice(data),
            None => target.fill(0),
        }
        self.backing.write_all_at(&buf, outer.offset)?;
        if fua {
            self.backing.sync_data()?;
        }
        Ok(buf)
    }

    /// Zeroes a range; `may_trim` lets the blocks be deallocated (NBD without NO_HOLE).
    /// The caller holds the range's blocks and has admitted the range.
    pub fn write_zeroes(&self, range: ByteRange, may_trim: bool, fua: bool) -> io::Result<()> {
        let inner_start = range.offset.next_multiple_of(DIRECT_IO_ALIGN);
        let inner_end = range.end() / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN;
        if inner_start >= inner_end {
            return self.read_modify_write(range, None, fua).map(drop);
        }
        if range.offset < inner_start {
            self.read_modify_write(
                ByteRange::new(range.offset, inner_start - range.offset),
                None,
                false,
            )?;
        }
        if inner_end < range.end() {
            self.read_modify_write(
                ByteRange::new(inner_end, range.end() - inner_end),
                None,
                false,
            )?;
        }
        let inner = ByteRange::new(inner_start, inner_end - inner_start);
        let mode = if may_trim {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if let Err(e) = self.fallocate(mode, inner) {
            if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) {
                return Err(e);
            }
            self.write_zero_blocks(inner)?;
        }
        if fua {
            self.backing.sync_data()?;
        }
        Ok(())
    }

    /// The whole blocks inside `range`: what [`Volume::trim`] discards.
    pub fn trim_blocks(range: ByteRange) -> ByteRange {
        let start = range.offset.next_multiple_of(DIRECT_IO_ALIGN);
        let end = range.end() / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN;
        ByteRange::new(start, end.saturating_sub(start))
    }

    /// Discards the whole blocks of a range. Discard is advisory, but the range still counts
    /// as written (the caller admits it), since the peer must see what the device now returns.
    /// Returns whether the blocks were punched (and now read as zeroes); a device that
    /// cannot punch leaves them as they were.
    pub fn trim(&self, range: ByteRange, fua: bool) -> io::Result<bool> {
        let inner = Self::trim_blocks(range);
        let mut punched = false;
        if !inner.is_empty() {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, inner) {
                Ok(()) => punched = true,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {}
                Err(e) => return Err(e),
            }
        }
        if fua {
            self.backing.sync_data()?;
        }
        Ok(punched)
    }

    /// Which parts of `range` are allocated, for NBD block status; see
    /// [`Backing::allocation`].
    pub fn allocation(&self, range: ByteRange, max_extents: usize) -> io::Result<Vec<Extent>> {
        self.backing.allocation(range, max_extents)
    }

    fn fallocate(&self, mode: i32, range: ByteRange) -> io::Result<()> {
        let fd = self.backing.fd().as_raw_fd();
        // A block device punches or zeroes through the same call (blkdev_fallocate).
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let rc = unsafe { libc::fallocate64(fd, mode, range.offset as i64, range.len as i64) };
        if rc == 0 {
            self.backing.note_written(range);
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zero_blocks(&self, range: ByteRange) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = AlignedBuf::new(CHUNK as usize);
        let mut offset = range.offset;
        while offset < range.end() {
            let n = CHUNK.min(range.end() - offset) as usize;
            self.backing.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// A connected client of a volume; the count drops with the guard.
pub struct ClientGuard {
    volume: Arc<Volume>,
}

impl ClientGuard {
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.volume.clients.fetch_sub(1, Ordering::Relaxed);
    }
}
