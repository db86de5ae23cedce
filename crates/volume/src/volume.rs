//! A served volume: its backing, its dirty tracker and the slow paths of its I/O.
//!
//! The NBD server submits aligned reads and writes straight to the backing with io_uring;
//! what is left (unaligned writes, zeroing, discard) goes through the blocking methods here.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use blockrep_core::ByteRange;

use crate::backing::{Backing, DIRECT_IO_ALIGN};
use crate::buf::AlignedBuf;
use crate::tracker::{DirtyTracker, TrackerError};

#[derive(Debug, thiserror::Error)]
pub enum VolumeIoError {
    #[error("dirty tracking: {0}")]
    Tracker(#[from] TrackerError),
    #[error("backing I/O: {0}")]
    Io(#[from] io::Error),
}

impl VolumeIoError {
    /// The errno an NBD client should see.
    pub fn errno(&self) -> i32 {
        match self {
            VolumeIoError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => libc::ENOSPC,
            _ => libc::EIO,
        }
    }
}

pub struct Volume {
    name: String,
    backing: Backing,
    tracker: Option<Arc<DirtyTracker>>,
    /// Held across read-modify-write cycles, so two unaligned writes into one block do not
    /// undo each other. Aligned writes never take it: they overlap an unaligned write into
    /// the same block only when the client sent overlapping writes at once.
    rmw: Mutex<()>,
    clients: AtomicUsize,
}

impl Volume {
    pub fn new(name: String, backing: Backing, tracker: Option<Arc<DirtyTracker>>) -> Self {
        Self {
            name,
            backing,
            tracker,
            rmw: Mutex::new(()),
            clients: AtomicUsize::new(0),
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

    pub fn tracker(&self) -> Option<&Arc<DirtyTracker>> {
        self.tracker.as_ref()
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

    /// Records writes about to be submitted; returns once a crash cannot lose track of them.
    pub fn admit_writes(&self, ranges: &[ByteRange]) -> Result<(), TrackerError> {
        match &self.tracker {
            Some(tracker) => tracker.admit(ranges),
            None => Ok(()),
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
    /// `data == None` writes zeroes.
    pub fn write_unaligned(
        &self,
        range: ByteRange,
        data: Option<&[u8]>,
        fua: bool,
    ) -> Result<(), VolumeIoError> {
        self.admit_writes(&[range])?;
        self.read_modify_write(range, data, fua)
    }

    /// The read-modify-write of [`Volume::write_unaligned`], for a range already admitted.
    fn read_modify_write(
        &self,
        range: ByteRange,
        data: Option<&[u8]>,
        fua: bool,
    ) -> Result<(), VolumeIoError> {
        let outer = range.align_out(DIRECT_IO_ALIGN);
        let mut buf = AlignedBuf::new(outer.len as usize);
        let _rmw = self.rmw.lock().unwrap_or_else(|e| e.into_inner());
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
        Ok(())
    }

    /// Zeroes a range; `may_trim` lets the blocks be deallocated (NBD without NO_HOLE).
    pub fn write_zeroes(
        &self,
        range: ByteRange,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), VolumeIoError> {
        let inner_start = range.offset.next_multiple_of(DIRECT_IO_ALIGN);
        let inner_end = range.end() / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN;
        self.admit_writes(&[range])?;
        if inner_start >= inner_end {
            return self.read_modify_write(range, None, fua);
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
                return Err(e.into());
            }
            self.write_zero_blocks(inner)?;
        }
        if fua {
            self.backing.sync_data()?;
        }
        Ok(())
    }

    /// Discards a range. Only whole blocks are discarded; discard is advisory, but the range
    /// still counts as written, since the peer must see what the device now returns.
    pub fn trim(&self, range: ByteRange, fua: bool) -> Result<(), VolumeIoError> {
        let start = range.offset.next_multiple_of(DIRECT_IO_ALIGN);
        let end = range.end() / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN;
        if start >= end {
            return Ok(());
        }
        let inner = ByteRange::new(start, end - start);
        self.admit_writes(&[inner])?;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, inner) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {}
            Err(e) => return Err(e.into()),
        }
        if fua {
            self.backing.sync_data()?;
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, range: ByteRange) -> io::Result<()> {
        let fd = self.backing.fd().as_raw_fd();
        // A block device punches or zeroes through the same call (blkdev_fallocate).
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let rc = unsafe { libc::fallocate64(fd, mode, range.offset as i64, range.len as i64) };
        if rc == 0 {
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
