//! Leaving an io_uring safely: an operation in flight points at memory its owner holds (a
//! payload, a receive buffer), and the kernel may read or write it until the operation
//! completes. An owner that stops on an error must not free that memory first.

use std::io;

use io_uring::{IoUring, types};

/// How long [`drain`] waits without a completion before it gives up.
pub const DRAIN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits for `outstanding` completions on `ring`, handing each one's user data to `reaped`
/// (to release what the operation held). Returns how many it reaped. An `Err` means the ring
/// failed, or went `patience` without a completion (an operation that never reached it):
/// the caller must then leak the memory its operations point at instead of freeing it.
pub fn drain(
    ring: &mut IoUring,
    outstanding: usize,
    patience: std::time::Duration,
    mut reaped: impl FnMut(u64),
) -> io::Result<usize> {
    let mut done = 0;
    let wait = types::Timespec::from(patience);
    while done < outstanding {
        let args = types::SubmitArgs::new().timespec(&wait);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} of {outstanding} operations still in flight after {patience:?}",
                        outstanding - done
                    ),
                ));
            }
            Err(e) => return Err(e),
        }
        for completion in ring.completion() {
            reaped(completion.user_data());
            done += 1;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;

    use io_uring::opcode;

    use super::*;

    #[test]
    fn a_drain_returns_only_once_every_operation_completed() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let mut ring = IoUring::new(8).unwrap();
        let mut bufs = vec![[0u8; 1]; 3];
        for (i, buf) in bufs.iter_mut().enumerate() {
            let sqe = opcode::Read::new(types::Fd(reader.as_raw_fd()), buf.as_mut_ptr(), 1)
                .build()
                .user_data(i as u64);
            // SAFETY: the buffers outlive the ring's use of them: the drain below waits.
            unsafe { ring.submission().push(&sqe).unwrap() };
        }
        ring.submit().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let drainer = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let n = drain(&mut ring, 3, DRAIN_PATIENCE, |ud| {
                seen.push(ud);
                tx.send(()).unwrap();
            })
            .unwrap();
            (n, seen, bufs)
        });
        // One byte at a time: each read completes only when its byte arrives.
        for _ in 0..3 {
            writer.write_all(b"x").unwrap();
            rx.recv().unwrap();
        }
        let (n, mut seen, bufs) = drainer.join().unwrap();
        seen.sort_unstable();
        assert_eq!((n, seen), (3, vec![0, 1, 2]));
        assert!(bufs.iter().all(|b| b == b"x"));
    }

    #[test]
    fn a_drain_gives_up_on_an_operation_that_never_completes() {
        let mut ring = IoUring::new(8).unwrap();
        let err = drain(&mut ring, 1, std::time::Duration::from_millis(1), |_| {}).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
