//! A test-only backing that loses power: writes since its last sync are kept apart and are
//! gone at a power cut (built with the `fault-injection` feature, and in tests).
//!
//! The volume is served from an *overlay*: an anonymous in-memory file holding the whole
//! volume, which every read and write (io_uring or blocking) goes to. The real file is the
//! *durable* image. Writers say what they wrote once it completed
//! ([`super::Backing::note_written`]); a sync copies those ranges from the overlay to the
//! durable file and syncs it. A power cut ([`Volatile::power_cut`], or the process dying:
//! the overlay is in its memory) leaves exactly the durable image: what a disk with a
//! volatile write cache holds after it loses power, at the granularity of whole writes.
//!
//! The daemon opens its volumes this way when `BLOCKREP_FAULT_VOLATILE_WRITES` is set (see
//! `Backing::open`); the durable file is what survives its `kill -9`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use blockrep_core::ByteRange;

const COPY_CHUNK: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct Volatile {
    durable: File,
    /// Ranges written to the overlay since the last sync, in completion order.
    written: Mutex<Vec<ByteRange>>,
}

impl Volatile {
    /// Makes the overlay for `durable` (of `size` bytes): an in-memory copy of it.
    pub(crate) fn new(durable: File, size: u64) -> io::Result<(Self, File)> {
        let fd = nix::sys::memfd::memfd_create(
            c"blockrep-volatile",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let overlay = File::from(fd);
        overlay.set_len(size)?;
        copy(&durable, &overlay, ByteRange::new(0, size))?;
        Ok((
            Self {
                durable,
                written: Mutex::new(Vec::new()),
            },
            overlay,
        ))
    }

    fn written(&self) -> std::sync::MutexGuard<'_, Vec<ByteRange>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn note_written(&self, range: ByteRange) {
        if !range.is_empty() {
            self.written().push(range);
        }
    }

    /// Makes what was written so far durable: copies it to the durable file and syncs it.
    pub(crate) fn sync(&self, overlay: &File) -> io::Result<()> {
        let ranges = std::mem::take(&mut *self.written());
        for range in &ranges {
            if let Err(e) = copy(overlay, &self.durable, *range) {
                // Not durable after all: the next sync tries again.
                self.written().extend(ranges);
                return Err(e);
            }
        }
        self.durable.sync_data()
    }

    /// The power goes: every write since the last sync is lost, in the overlay too.
    pub(crate) fn power_cut(&self, overlay: &File) -> io::Result<()> {
        let ranges = std::mem::take(&mut *self.written());
        for range in ranges {
            copy(&self.durable, overlay, range)?;
        }
        Ok(())
    }

    /// The durable file grew with the overlay (an extend).
    pub(crate) fn grow(&self, overlay: &File, size: u64) -> io::Result<()> {
        let have = self.durable.metadata()?.len();
        if have < size {
            self.durable.set_len(size)?;
        }
        if overlay.metadata()?.len() < size {
            overlay.set_len(size)?;
        }
        Ok(())
    }
}

fn copy(from: &File, to: &File, range: ByteRange) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK.min(range.len as usize)];
    let mut at = range.offset;
    while at < range.end() {
        let n = (range.end() - at).min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..n], at)?;
        to.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    use blockrep_core::ByteRange;

    use crate::Backing;

    #[test]
    fn only_synced_writes_survive_a_power_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let backing = Backing::open_volatile(&path).unwrap();
        assert!(!backing.ring_sync_is_durable());
        // A write through the fd (as a ring's), then one more after the sync.
        let fd = backing.fd().as_raw_fd();
        let pwrite = |data: &[u8], at: u64| {
            // SAFETY: a plain pwrite of a live buffer on an open fd.
            let n = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), at as i64) };
            assert_eq!(n as usize, data.len());
        };
        pwrite(&[1; 4096], 0);
        backing.note_written(ByteRange::new(0, 4096));
        backing.sync_data().unwrap();
        pwrite(&[2; 4096], 4096);
        backing.note_written(ByteRange::new(4096, 4096));
        let mut buf = [0u8; 4096];
        backing.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [2; 4096], "reads see unsynced writes");
        backing.power_cut().unwrap();
        backing.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0; 4096], "the unsynced write is gone");
        let durable = std::fs::File::open(&path).unwrap();
        durable.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1; 4096], "the synced write is in the file");
        durable.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0; 4096]);
    }
}
