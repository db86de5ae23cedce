//! The device or file a volume lives on, opened for direct I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use blockrep_core::{ByteRange, CacheMode};

/// Offsets, lengths and memory of direct I/O are multiples of this.
pub const DIRECT_IO_ALIGN: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingKind {
    BlockDevice,
    File,
}

impl std::fmt::Display for BackingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackingKind::BlockDevice => "block device",
            BackingKind::File => "file",
        })
    }
}

/// A run of a volume with one allocation status (NBD `base:allocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// A hole: unallocated, reads as zeroes.
    pub hole: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is neither a block device nor a regular file")]
    NotABlockDeviceOrFile { path: PathBuf },
    #[error("cannot read the size of {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error("{path} is empty")]
    Empty { path: PathBuf },
    #[error("{path} is {size} bytes, not a multiple of {DIRECT_IO_ALIGN}")]
    Unaligned { path: PathBuf, size: u64 },
}

/// A backing device or file. Reads and writes through the fd are direct (`O_DIRECT`)
/// when the file system allows it; `is_direct` says which.
#[derive(Debug)]
pub struct Backing {
    file: File,
    path: PathBuf,
    kind: BackingKind,
    /// The volume's size: the file's or device's, or less (an extend that did not finish).
    size: AtomicU64,
    direct: bool,
    /// The test-only backing that loses unsynced writes at a power cut: `file` is then its
    /// in-memory overlay (see [`crate::volatile`]).
    #[cfg(any(test, feature = "fault-injection"))]
    volatile: Option<crate::volatile::Volatile>,
}

/// Why a volume cannot grow.
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("{size} bytes is not a multiple of {DIRECT_IO_ALIGN}")]
    Unaligned { size: u64 },
    #[error("the volume is {current} bytes; a volume grows, it never shrinks")]
    Shrink { current: u64 },
    #[error("the file system of {path} has no room for {size} bytes: {source}")]
    NoRoom {
        path: PathBuf,
        size: u64,
        source: io::Error,
    },
    #[error("the device {path} is {device} bytes: grow it to {size} first (lvextend, losetup -c)")]
    DeviceTooSmall {
        path: PathBuf,
        device: u64,
        size: u64,
    },
    #[error("cannot read the size of {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
}

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);

impl Backing {
    /// Opens `path` with `O_DIRECT` for [`CacheMode::Direct`] (falling back to buffered I/O,
    /// with a warning, where the file system refuses it), or buffered for `Writeback`.
    ///
    /// With the `fault-injection` feature and `BLOCKREP_FAULT_VOLATILE_WRITES` set in the
    /// environment, the volume is opened as [`Backing::open_volatile`] instead (a test that
    /// cuts the power of a DR host).
    pub fn open(path: &Path, cache: CacheMode) -> Result<Self, OpenError> {
        #[cfg(feature = "fault-injection")]
        if std::env::var_os("BLOCKREP_FAULT_VOLATILE_WRITES").is_some() {
            tracing::warn!(path = %path.display(), "fault injection: writes are volatile until synced");
            return Self::open_volatile(path);
        }
        Self::open_real(path, cache)
    }

    fn open_real(path: &Path, cache: CacheMode) -> Result<Self, OpenError> {
        let open_err = |source| OpenError::Open {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let kind = if meta.file_type().is_block_device() {
            BackingKind::BlockDevice
        } else if meta.is_file() {
            BackingKind::File
        } else {
            return Err(OpenError::NotABlockDeviceOrFile {
                path: path.to_owned(),
            });
        };
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match cache {
            CacheMode::Writeback => (open(0).map_err(open_err)?, false),
            CacheMode::Direct => match open(libc::O_DIRECT) {
                Ok(file) => (file, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(path = %path.display(), "file system refuses O_DIRECT; using buffered I/O");
                    (open(0).map_err(open_err)?, false)
                }
                Err(e) => return Err(open_err(e)),
            },
        };
        let size = match kind {
            BackingKind::File => meta.len(),
            BackingKind::BlockDevice => {
                let mut size = 0u64;
                // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
                unsafe { blk_get_size64(file.as_raw_fd(), &mut size) }.map_err(|e| {
                    OpenError::Size {
                        path: path.to_owned(),
                        source: io::Error::from(e),
                    }
                })?;
                size
            }
        };
        if size == 0 {
            return Err(OpenError::Empty {
                path: path.to_owned(),
            });
        }
        if size % DIRECT_IO_ALIGN != 0 {
            return Err(OpenError::Unaligned {
                path: path.to_owned(),
                size,
            });
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            kind,
            size: AtomicU64::new(size),
            direct,
            #[cfg(any(test, feature = "fault-injection"))]
            volatile: None,
        })
    }

    /// Test only: opens `path` as a disk with a volatile write cache. Reads and writes go to
    /// an in-memory copy; [`Backing::sync_data`] makes what was written durable in `path`,
    /// and a power cut ([`Backing::power_cut`], or the process dying) loses the rest.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn open_volatile(path: &Path) -> Result<Self, OpenError> {
        let real = Self::open_real(path, CacheMode::Writeback)?;
        let size = real.size();
        let (volatile, overlay) =
            crate::volatile::Volatile::new(real.file, size).map_err(|source| OpenError::Open {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            file: overlay,
            path: real.path,
            kind: real.kind,
            size: real.size,
            direct: false,
            volatile: Some(volatile),
        })
    }

    /// Test only: the power goes; every write since the last sync is lost.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn power_cut(&self) -> io::Result<()> {
        match &self.volatile {
            Some(v) => v.power_cut(&self.file),
            None => Ok(()),
        }
    }

    /// A write of `range` through [`Backing::fd`] (a ring's) completed. Only the test-only
    /// volatile backing needs to know; for a real device or file this does nothing.
    #[inline]
    pub fn note_written(&self, range: ByteRange) {
        #[cfg(any(test, feature = "fault-injection"))]
        if let Some(v) = &self.volatile {
            v.note_written(range);
        }
        let _ = range;
    }

    /// Whether an `fsync` of [`Backing::fd`] (a ring's) makes completed writes durable. True
    /// for every real device and file; false for the test-only volatile backing, whose
    /// writes become durable only through [`Backing::sync_data`].
    pub fn ring_sync_is_durable(&self) -> bool {
        #[cfg(any(test, feature = "fault-injection"))]
        if self.volatile.is_some() {
            return false;
        }
        true
    }

    /// Serves only the first `size` bytes (the volume's registered size, when the file or
    /// device is bigger: an extend that did not finish, or a device grown ahead of it).
    pub fn limit_to(&self, size: u64) {
        self.size.fetch_min(size, Ordering::SeqCst);
    }

    /// Grows the volume to `size` bytes: [`Backing::allocate`], then the volume is that big.
    pub fn grow(&self, size: u64) -> Result<(), GrowError> {
        self.allocate(size)?;
        self.size.store(size, Ordering::SeqCst);
        Ok(())
    }

    /// Makes room for `size` bytes without growing the volume yet: a file is extended with
    /// its blocks allocated, so it fails at once if the file system has no room; a block
    /// device must be that big already. Refuses an unaligned or smaller size; the size it
    /// has needs nothing. (A file left longer than the volume by a grow that went no
    /// further is used up to the volume's recorded size only: [`Backing::limit_to`].)
    pub fn allocate(&self, size: u64) -> Result<(), GrowError> {
        let current = self.size();
        if !size.is_multiple_of(DIRECT_IO_ALIGN) {
            return Err(GrowError::Unaligned { size });
        }
        if size < current {
            return Err(GrowError::Shrink { current });
        }
        if size == current {
            return Ok(());
        }
        match self.kind {
            BackingKind::File => {
                let have = self
                    .file
                    .metadata()
                    .map_err(|source| GrowError::Size {
                        path: self.path.clone(),
                        source,
                    })?
                    .len();
                if have < size {
                    // SAFETY: plain syscall on an fd we own; no memory is passed.
                    let rc = unsafe {
                        libc::fallocate64(
                            self.file.as_raw_fd(),
                            0,
                            have as i64,
                            (size - have) as i64,
                        )
                    };
                    if rc != 0 {
                        return Err(GrowError::NoRoom {
                            path: self.path.clone(),
                            size,
                            source: io::Error::last_os_error(),
                        });
                    }
                }
            }
            BackingKind::BlockDevice => {
                let mut device = 0u64;
                // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
                unsafe { blk_get_size64(self.file.as_raw_fd(), &mut device) }.map_err(|e| {
                    GrowError::Size {
                        path: self.path.clone(),
                        source: io::Error::from(e),
                    }
                })?;
                if device < size {
                    return Err(GrowError::DeviceTooSmall {
                        path: self.path.clone(),
                        device,
                        size,
                    });
                }
            }
        }
        #[cfg(any(test, feature = "fault-injection"))]
        if let Some(v) = &self.volatile {
            v.grow(&self.file, size)
                .map_err(|source| GrowError::NoRoom {
                    path: self.path.clone(),
                    size,
                    source,
                })?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Blocking aligned read, for the slow paths (read-modify-write).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Blocking aligned write, for the slow paths.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        self.note_written(ByteRange::new(offset, buf.len() as u64));
        Ok(())
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn sync_data(&self) -> io::Result<()> {
        #[cfg(any(test, feature = "fault-injection"))]
        if let Some(v) = &self.volatile {
            return v.sync(&self.file);
        }
        self.file.sync_data()
    }

    /// The allocation of `range` as at most `max_extents` runs (at least one) that start at
    /// `range.offset`, cover no more than `range`, and alternate between data and hole.
    /// A file is read with `SEEK_DATA`/`SEEK_HOLE`; a block device (or a file system without
    /// them) is reported as data throughout.
    pub fn allocation(&self, range: ByteRange, max_extents: usize) -> io::Result<Vec<Extent>> {
        let mut extents: Vec<Extent> = Vec::new();
        if range.is_empty() {
            return Ok(extents);
        }
        if self.kind == BackingKind::BlockDevice {
            extents.push(Extent {
                len: range.len,
                hole: false,
            });
            return Ok(extents);
        }
        let end = range.end();
        let mut at = range.offset;
        while at < end && extents.len() < max_extents.max(1) {
            let data = match self.seek(at, libc::SEEK_DATA) {
                Ok(data) => data.min(end),
                // No data at or after `at`: the rest is a hole.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // SEEK_DATA unsupported here: report data.
                    extents.push(Extent {
                        len: end - at,
                        hole: false,
                    });
                    break;
                }
                Err(e) => return Err(e),
            };
            let (len, hole) = if data > at {
                (data - at, true)
            } else {
                let hole = match self.seek(at, libc::SEEK_HOLE) {
                    Ok(hole) => hole.min(end),
                    Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                    Err(e) => return Err(e),
                };
                (hole.max(at + 1) - at, false)
            };
            match extents.last_mut() {
                Some(last) if last.hole == hole => last.len += len,
                _ => extents.push(Extent { len, hole }),
            }
            at += len;
        }
        Ok(extents)
    }

    fn seek(&self, offset: u64, whence: i32) -> io::Result<u64> {
        // SAFETY: plain syscall on an fd we own. The file position it moves is not used:
        // all I/O here is positional.
        let at = unsafe { libc::lseek64(self.file.as_raw_fd(), offset as i64, whence) };
        if at < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(at as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_follows_seek_data_and_seek_hole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let file = File::create(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[7u8; 4096], 64 << 10).unwrap();
        file.sync_all().unwrap();
        let backing = Backing::open(&path, CacheMode::Writeback).unwrap();
        let all = backing.allocation(ByteRange::new(0, 1 << 20), 16).unwrap();
        let data: Vec<_> = all.iter().filter(|e| !e.hole).collect();
        assert_eq!(all.iter().map(|e| e.len).sum::<u64>(), 1 << 20);
        assert_eq!(data.len(), 1, "{all:?}");
        // The file system may allocate more than the 4 KiB written, never less.
        let before: u64 = all.iter().take_while(|e| e.hole).map(|e| e.len).sum();
        assert!(
            before <= 64 << 10 && before + data[0].len >= (64 << 10) + 4096,
            "{all:?}"
        );
        let one = backing.allocation(ByteRange::new(0, 1 << 20), 1).unwrap();
        assert_eq!(one.len(), 1);
        assert!(one[0].hole);
    }
}
