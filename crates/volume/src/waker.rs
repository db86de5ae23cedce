//! Waking a connection's loop from another thread: an eventfd its ring reads.
//!
//! A connection thread sleeps in `io_uring_enter` until its socket or disk has something for
//! it. When another thread changes something it waits for (a range lock it queued for is
//! granted; later, the peer acknowledged a write whose answer is held), that thread calls
//! [`Waker::wake`], which completes the read the ring keeps posted on the eventfd. Wake-ups
//! coalesce: while one is pending, further calls cost an atomic swap and no system call.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
    pending: AtomicBool,
}

impl Waker {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd it returns is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: `fd` is a new descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            pending: AtomicBool::new(false),
        })
    }

    /// The eventfd, for the owner's ring to read 8 bytes from.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Wakes the owner, unless a wake-up is already on its way.
    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.signal();
        }
    }

    /// The owner saw a wake-up: later changes wake it again. Call before looking at what
    /// changed, so a change made meanwhile is not missed.
    pub fn reset(&self) {
        self.pending.store(false, Ordering::Release);
    }

    /// Makes the eventfd readable regardless of `pending`: the owner uses it to complete its
    /// own posted read when it shuts down.
    pub fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an eventfd we own. An eventfd write
        // fails only when the counter would overflow, and then the fd is readable anyway.
        unsafe { libc::write(self.fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Blocks the calling thread until woken, for owners that have no ring (a resync reader
    /// waiting for a range lock).
    pub fn wait_blocking(&self) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one pollfd, valid for the call.
            let n = unsafe { libc::poll(&mut pfd, 1, -1) };
            if n >= 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer; EAGAIN (someone else read it) is harmless.
        unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        self.reset();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_wake_from_another_thread_ends_a_blocking_wait() {
        let waker = Arc::new(Waker::new().unwrap());
        let other = Arc::clone(&waker);
        let thread = std::thread::spawn(move || other.wake());
        waker.wait_blocking().unwrap();
        thread.join().unwrap();
        // Pending was reset: the next wake signals again.
        assert!(!waker.pending.load(Ordering::Acquire));
    }
}
