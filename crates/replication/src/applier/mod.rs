//! The DR side's applier: one thread with its own io_uring that writes a pair's incoming
//! frames to the DR volume, in stream order.
//!
//! - A direct write (hypermetro, initial sync) is written at once; its acknowledgement (if
//!   asked for) is sent once the write is *durable*: a sync of the volume that began after
//!   the write completed has returned (group-committed through
//!   [`AckBarrier`](blockrep_core::replication::AckBarrier): one `fdatasync` in flight
//!   covers every write completed before it; a FUA write is durable when it completes).
//!   Overlapping writes are applied one after the other, in arrival order; disjoint ones
//!   run in parallel.
//! - A staged write (async epochs, catch-ups) is appended to the stage log.
//! - `Flush`, `Seal` and `SyncDone` are barriers: they wait for every earlier write. A seal
//!   syncs the stage log (the unit is now durable: `Staged`), applies the unit's writes,
//!   syncs the volume and records the applied epoch (`Applied`).
//!
//! A payload whose CRC does not match is not written: the sender gets a `Reject`. A direct
//! write's payload the stream received into aligned memory of its own (`dr::received`)
//! goes on the ring as it is; others are copied into one of the worker's aligned buffers.
//!
//! A `Verify` is a barrier too: the blocks it names are read back and their CRCs compared
//! once every earlier frame is on the volume — at once for direct replication, or right
//! after the unit of its epoch is applied (before the next unit) for epochs.
//!
//! The thread is `worker` (its ring and its loop) and `worker::commands` (what each
//! command does); what it decides is the core's `DrSide`, whose shell it is.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use blockrep_core::replication::{Epoch, ProbeId, WriteSeq};
use blockrep_volume::{DIRECT_IO_ALIGN, Volume, Waker};
use blockrep_wire::{RejectReason, WriteFlags, WriteHeader};
use bytes::Bytes;
use tokio::sync::mpsc::UnboundedSender;

use crate::dr_state::DrState;
use crate::stage_log::StageLog;

mod worker;

use worker::Worker;

const RING_ENTRIES: u32 = 256;
const MAX_INFLIGHT: usize = 128;
const UD_WAKE: u64 = u64::MAX;
/// The group-committed sync of the volume (see `blockrep_core::replication::AckBarrier`).
const UD_SYNC: u64 = u64::MAX - 1;
/// The stage log is rewritten once it grows past this (see [`ApplierSetup::compact_after_bytes`]).
pub const COMPACT_BYTES: u64 = 256 << 20;
/// The stage log's records (every copy of a block a catch-up sent again) are refused past
/// this many times `replication.stage_log_max_bytes`, which counts each block once per unit.
pub const RECORDS_PER_CAP: u64 = 2;
/// Zero ranges are written in pieces this large, each one progress for the watchdog.
const ZEROES_PIECE: u64 = 64 << 20;

/// Whether a write goes on the ring with its payload as it is: data, 4 KiB-aligned (others
/// are written by read-modify-write or as zeroes, after every earlier write). A payload in
/// memory aligned for `O_DIRECT` is written without a copy.
pub(crate) fn goes_on_the_ring(header: &WriteHeader) -> bool {
    !header.flags.has(WriteFlags::ZEROES)
        && header.offset.is_multiple_of(DIRECT_IO_ALIGN)
        && u64::from(header.len).is_multiple_of(DIRECT_IO_ALIGN)
}

/// A frame for the applier, in stream order.
#[derive(Debug)]
pub enum ApplyCmd {
    Write {
        header: WriteHeader,
        payload: Bytes,
        /// Bytes of the apply queue's budget it holds, given back once it is handled.
        budget: u32,
        /// The payload was received into aligned memory of its own (`dr::received`): the
        /// ring writes it from there, uncopied.
        placed: bool,
    },
    Flush {
        seq: WriteSeq,
    },
    Seal {
        epoch: Epoch,
        cut_ms: u64,
    },
    Discard {
        after: Epoch,
    },
    SyncDone {
        epoch: Epoch,
    },
    /// A unit found sealed in the stage log at start-up: apply it (it is already durable).
    Replay {
        epoch: Epoch,
        cut_ms: u64,
    },
    Verify(VerifyCmd),
    /// Production's CRCs of the 64 KiB blocks from `offset`, to record once the unit
    /// covering `after` is applied (docs/POINT-IN-TIME.md, "Verifying a drill's content").
    Digest {
        offset: u64,
        after: Epoch,
        crcs: Vec<u32>,
    },
    /// The group committed further: units held for it may apply now.
    Allowed,
    /// Gated direct writes apply once the unit of `epoch` is applied.
    Ungate {
        epoch: Epoch,
    },
}

/// An online verify request: production's CRC of each `block`-byte block from `offset`.
#[derive(Debug)]
pub struct VerifyCmd {
    pub id: ProbeId,
    pub offset: u64,
    pub block: u32,
    pub after: Option<Epoch>,
    pub crcs: Vec<u32>,
}

/// What the applier reports back, to be sent to the production side.
#[derive(Debug, PartialEq, Eq)]
pub enum ApplyEvent {
    /// The write is durable on the DR volume.
    WriteAck(WriteSeq),
    FlushAck(WriteSeq),
    /// The end of the initial sync is recorded durably (with every write before it).
    SyncDoneAck(Epoch),
    Staged(Epoch),
    Applied {
        epoch: Epoch,
        cut_ms: u64,
    },
    Reject {
        seq: WriteSeq,
        reason: RejectReason,
    },
    /// The blocks of verify request `id` whose CRC differs here.
    Verified {
        id: ProbeId,
        differing: Vec<u16>,
    },
    /// The DR volume or its stage log failed: the stream must end.
    Failed(String),
}

/// Counters the applier keeps.
#[derive(Debug, Default)]
pub struct ApplyCounters {
    pub bytes_written: std::sync::atomic::AtomicU64,
    pub extents_rejected: std::sync::atomic::AtomicU64,
}

struct Inbox {
    cmds: Mutex<VecDeque<ApplyCmd>>,
    waker: Arc<Waker>,
    stop: std::sync::atomic::AtomicBool,
    /// Payload bytes received and not yet handled may not pass this (rule 6): the stream is
    /// read no further until the applier catches up, so the sender is pushed back by QUIC's
    /// flow control.
    budget: Arc<tokio::sync::Semaphore>,
    budget_bytes: u32,
}

/// What an applier starts from.
pub struct ApplierSetup {
    /// For the thread's name.
    pub label: String,
    pub volume: Arc<Volume>,
    pub log: StageLog,
    /// Units the stage log holds sealed above the applied epoch: applied first.
    pub replay: Vec<crate::stage_log::SealRecord>,
    pub state: DrState,
    pub state_path: PathBuf,
    /// The last epoch the pair's consistency group committed (`u64::MAX`: the pair is in
    /// no group, every sealed unit applies at once). Units above it stay staged.
    pub allowed: Arc<AtomicU64>,
    /// The most payload bytes received and not yet handled.
    pub queue_bytes: u64,
    /// The most bytes the stage log may take on disk; a staged write past it is rejected
    /// (`StageFull`) and the pair falls back to the bitmap.
    pub stage_log_max_bytes: u64,
    /// The stage log is rewritten to hold only what is still staged once it grows past
    /// this ([`COMPACT_BYTES`]).
    pub compact_after_bytes: u64,
    /// The volume's points: the undo of each unit is kept before it applies while the
    /// group's retention is on.
    pub points: Arc<crate::undo_journal::Points>,
}

/// The handle the stream task feeds.
pub struct Applier {
    inbox: Arc<Inbox>,
    thread: Option<JoinHandle<()>>,
}

impl Applier {
    /// Starts the applier thread for `setup.volume`.
    pub fn start(
        setup: ApplierSetup,
        events: UnboundedSender<ApplyEvent>,
        counters: Arc<ApplyCounters>,
    ) -> io::Result<Self> {
        let label = setup.label.clone();
        let queue_bytes = setup.queue_bytes;
        let waker = Arc::new(Waker::new()?);
        let budget_bytes = u32::try_from(queue_bytes).unwrap_or(u32::MAX);
        let inbox = Arc::new(Inbox {
            cmds: Mutex::new(VecDeque::new()),
            waker: Arc::clone(&waker),
            stop: std::sync::atomic::AtomicBool::new(false),
            budget: Arc::new(tokio::sync::Semaphore::new(budget_bytes as usize)),
            budget_bytes,
        });
        let worker = Worker::new(setup, events, counters, Arc::clone(&inbox), waker)?;
        let thread = std::thread::Builder::new()
            .name(format!("apply-{label}"))
            .spawn(move || {
                // A bug must not free what the ring still points at, nor leave the stream
                // waiting: a panic ends the applier like an error.
                let mut worker = worker;
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
                let error = match run {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(panic) => format!("the DR applier panicked: {}", panic_message(&panic)),
                };
                tracing::error!(error = %error, "DR applier stopped");
                // Nothing the ring still holds may be freed before it is done with it.
                worker.drain_ring();
                worker.emit(ApplyEvent::Failed(error));
            })?;
        Ok(Self {
            inbox,
            thread: Some(thread),
        })
    }

    /// A handle that wakes the applier when its group committed further.
    pub fn nudge(&self) -> Nudge {
        Nudge(Arc::clone(&self.inbox))
    }

    /// Hands the applier the stream's next frame, once the apply queue has room for its
    /// payload (a gated write takes none: it must never hold back the `Ungate` behind it).
    pub async fn submit(&self, mut cmd: ApplyCmd) {
        if let ApplyCmd::Write {
            header,
            payload,
            budget,
            ..
        } = &mut cmd
            && !header.flags.has(WriteFlags::GATED)
        {
            let want = u32::try_from(payload.len() + 64)
                .unwrap_or(u32::MAX)
                .min(self.inbox.budget_bytes);
            if let Ok(permit) = self.inbox.budget.acquire_many(want).await {
                permit.forget();
                *budget = want;
            }
        }
        self.inbox
            .cmds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(cmd);
        self.inbox.waker.wake();
    }

    /// Stops once every command already submitted is done.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.inbox
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inbox.waker.signal();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Wakes an applier to apply the units its group committed since (it may be gone).
pub struct Nudge(Arc<Inbox>);

impl Nudge {
    pub fn nudge(&self) {
        self.0
            .cmds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(ApplyCmd::Allowed);
        self.0.waker.wake();
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Test-only faults, compiled in only with the `fault-injection` feature.
mod fault {
    /// With `BLOCKREP_FAULT_DISK_MBPS=N`, the applier takes as long over each write as a
    /// disk writing N MB/s would: a slow DR disk.
    #[cfg(feature = "fault-injection")]
    pub fn slow_disk(bytes: u64) {
        static MBPS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        let mbps = MBPS.get_or_init(|| {
            std::env::var("BLOCKREP_FAULT_DISK_MBPS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
        });
        if let Some(mbps) = mbps {
            std::thread::sleep(std::time::Duration::from_micros(bytes / mbps));
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    #[inline]
    pub fn slow_disk(_bytes: u64) {}

    /// In unit tests, the applier labelled this has the ring refuse its writes from the
    /// fourth on, as a submission that fails does.
    #[cfg(test)]
    pub const PUSH_FAILS: &str = "push-fails";

    #[cfg(test)]
    pub fn refuse_write() -> std::io::Result<()> {
        thread_local!(static PUSHED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
        let named = std::thread::current().name() == Some(&format!("apply-{PUSH_FAILS}"));
        if named && PUSHED.replace(PUSHED.get() + 1) >= 3 {
            return Err(std::io::Error::other(
                "fault injection: the ring refuses the write",
            ));
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline]
    pub fn refuse_write() -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use blockrep_core::ByteRange;
    use blockrep_volume::Backing;
    use blockrep_wire::payload_crc;
    use std::os::unix::fs::FileExt;

    use super::*;

    const SIZE: u64 = 1 << 20;

    fn staged_write(epoch: u64, seq: u64, offset: u64, byte: u8, corrupt: bool) -> ApplyCmd {
        let payload = Bytes::from(vec![byte; 4096]);
        let crc = payload_crc(&payload) ^ u32::from(corrupt);
        ApplyCmd::Write {
            header: WriteHeader {
                flags: WriteFlags(0),
                epoch: Epoch(epoch),
                seq: WriteSeq(seq),
                offset,
                len: 4096,
                crc,
            },
            payload,
            budget: 0,
            placed: false,
        }
    }

    fn seal(epoch: u64, cut_ms: u64) -> ApplyCmd {
        ApplyCmd::Seal {
            epoch: Epoch(epoch),
            cut_ms,
        }
    }

    /// Events until the flush of `seq` is answered (everything submitted before it is done).
    fn events_until_flush(
        events: &mut tokio::sync::mpsc::UnboundedReceiver<ApplyEvent>,
        seq: WriteSeq,
    ) -> Vec<ApplyEvent> {
        let mut seen = Vec::new();
        loop {
            let event = events.blocking_recv().expect("the applier runs");
            if event == ApplyEvent::FlushAck(seq) {
                return seen;
            }
            seen.push(event);
        }
    }

    fn direct_write(seq: u64, offset: u64, len: u32, byte: u8) -> ApplyCmd {
        let payload = Bytes::from(vec![byte; len as usize]);
        ApplyCmd::Write {
            header: WriteHeader {
                flags: WriteFlags(WriteFlags::DIRECT | WriteFlags::ACK),
                epoch: Epoch(1),
                seq: WriteSeq(seq),
                offset,
                len,
                crc: payload_crc(&payload),
            },
            payload,
            budget: 0,
            placed: false,
        }
    }

    /// A payload received into aligned memory of its own (`dr::received`) is written, after
    /// an overlapping write it waited for (put back with its payload meanwhile), and its
    /// buffer goes back to its pool once written, not held or leaked by the ring's slot.
    /// (That the ring writes it uncopied is not seen from here: a profile of the hypermetro
    /// 1M bench row shows the applier thread without a copy.)
    #[test]
    fn a_placed_payload_is_written_and_its_buffer_returns_once_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dr.img");
        let (applier, mut events, runtime) = start_applier(dir.path(), &path, SIZE);
        let submit = |cmd| runtime.block_on(applier.submit(cmd));
        let pool = blockrep_volume::SharedPool::with_idle_limit(1 << 20);
        let mut buf = pool.returning(pool.take(64 << 10));
        buf.fill(0x3c);
        let at = buf.as_ptr().addr();
        let payload = Bytes::from_owner(buf);
        submit(direct_write(1, 0, 128 << 10, 0x11));
        let ApplyCmd::Write { header, .. } = direct_write(2, 0, 64 << 10, 0) else {
            unreachable!("a write")
        };
        submit(ApplyCmd::Write {
            header: WriteHeader {
                crc: payload_crc(&payload),
                ..header
            },
            payload,
            budget: 0,
            placed: true,
        });
        submit(ApplyCmd::Flush { seq: WriteSeq(3) });
        let seen = events_until_flush(&mut events, WriteSeq(3));
        assert!(
            !seen.iter().any(|e| matches!(e, ApplyEvent::Reject { .. })),
            "{seen:?}"
        );
        assert_eq!(
            pool.take(64 << 10).as_ptr().addr(),
            at,
            "back in its pool once written"
        );
        applier.stop();
        let file = std::fs::File::open(&path).unwrap();
        let mut data = vec![0u8; 128 << 10];
        file.read_exact_at(&mut data, 0).unwrap();
        assert!(data[..64 << 10].iter().all(|&b| b == 0x3c));
        assert!(data[64 << 10..].iter().all(|&b| b == 0x11));
    }

    /// An applier on a `size`-byte volume at `path` (created sparse if missing), its stage
    /// log in `dir`.
    fn start_applier(
        dir: &std::path::Path,
        path: &std::path::Path,
        size: u64,
    ) -> (
        Applier,
        tokio::sync::mpsc::UnboundedReceiver<ApplyEvent>,
        tokio::runtime::Runtime,
    ) {
        let recovered = StageLog::open(&dir.join("stage-log"), Epoch::ZERO).unwrap();
        start_applier_on(
            dir,
            path,
            recovered,
            Setup {
                size,
                ..Setup::default()
            },
        )
    }

    /// How a test's applier differs from the usual one.
    struct Setup {
        label: &'static str,
        /// The volume's size, if it is created.
        size: u64,
        compact_after_bytes: u64,
        /// `replication.stage_log_max_bytes`.
        stage_cap: u64,
        /// The group's committed epoch: units above it stay staged.
        allowed: Arc<AtomicU64>,
        /// The group's retention of points.
        retention: blockrep_core::replication::undo::Retention,
    }

    impl Default for Setup {
        fn default() -> Self {
            Self {
                label: "test",
                size: SIZE,
                compact_after_bytes: COMPACT_BYTES,
                stage_cap: 64 << 20,
                allowed: Arc::new(AtomicU64::new(u64::MAX)),
                retention: Default::default(),
            }
        }
    }

    /// An applier that starts from the stage log `recovered` (replaying its seals).
    fn start_applier_on(
        dir: &std::path::Path,
        path: &std::path::Path,
        recovered: crate::stage_log::Recovered,
        setup: Setup,
    ) -> (
        Applier,
        tokio::sync::mpsc::UnboundedReceiver<ApplyEvent>,
        tokio::runtime::Runtime,
    ) {
        let Setup {
            label,
            size,
            compact_after_bytes,
            stage_cap,
            allowed,
            retention,
        } = setup;
        if !path.exists() {
            std::fs::File::create(path).unwrap().set_len(size).unwrap();
        }
        let volume = Arc::new(Volume::new(
            "dr".into(),
            Backing::open(path, blockrep_core::CacheMode::Writeback).unwrap(),
            None,
        ));
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let applier = Applier::start(
            ApplierSetup {
                label: label.into(),
                volume,
                log: recovered.log,
                replay: recovered.seals,
                state: DrState::default(),
                state_path: dir.join("dr.json"),
                allowed,
                queue_bytes: 64 << 20,
                stage_log_max_bytes: stage_cap,
                compact_after_bytes,
                points: Arc::new(crate::undo_journal::Points::new(dir, retention)),
            },
            tx,
            Arc::new(ApplyCounters::default()),
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        (applier, events, runtime)
    }

    /// The events until the applier's thread ends (its channel closes).
    fn events_until_the_end(
        events: &mut tokio::sync::mpsc::UnboundedReceiver<ApplyEvent>,
    ) -> Vec<ApplyEvent> {
        std::iter::from_fn(|| events.blocking_recv()).collect()
    }

    /// A write whose range wraps past u64::MAX (the wire refuses one, but the applier must
    /// not trust that), or runs past the volume's end, ends the applier with an error, and
    /// nothing behind it in the stream is applied.
    #[test]
    fn a_malformed_write_ends_the_applier_and_nothing_after_it_applies() {
        for bad_offset in [u64::MAX - 4095, SIZE] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("dr.img");
            let (applier, mut events, runtime) = start_applier(dir.path(), &path, SIZE);
            runtime.block_on(applier.submit(direct_write(1, bad_offset, 8192, 0xee)));
            runtime.block_on(applier.submit(direct_write(2, 0, 4096, 0xaa)));
            runtime.block_on(applier.submit(ApplyCmd::Flush { seq: WriteSeq(3) }));
            let seen = events_until_the_end(&mut events);
            assert!(
                matches!(seen.as_slice(), [ApplyEvent::Failed(reason)] if reason.contains("a write for the DR volume")),
                "offset {bad_offset}: {seen:?}"
            );
            applier.stop();
            let mut block = [1u8; 4096];
            std::fs::File::open(&path)
                .unwrap()
                .read_exact_at(&mut block, 0)
                .unwrap();
            assert_eq!(
                block, [0; 4096],
                "offset {bad_offset}: a later write applied"
            );
        }
    }

    /// A tmpfs of `size` mounted at a new directory, unmounted when dropped (needs root).
    struct SmallTmpfs(tempfile::TempDir);

    impl SmallTmpfs {
        fn mount(size: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "mount tmpfs (this test needs root)");
            Self(dir)
        }
    }

    impl Drop for SmallTmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    /// Writes on the ring that fail together (a full file system: each answers ENOSPC) end
    /// the applier at once: every completion after the first error is accounted for, so the
    /// ring's drain waits for none of them (it would wait its 30 s patience, then leak).
    #[test]
    fn writes_failing_together_end_the_applier_at_once() {
        let fs = SmallTmpfs::mount("64k");
        let dir = tempfile::tempdir().unwrap();
        let path = fs.0.path().join("dr.img");
        let (applier, mut events, runtime) = start_applier(dir.path(), &path, 4 * SIZE);
        for i in 0..16u64 {
            runtime.block_on(applier.submit(direct_write(i, i * (128 << 10), 128 << 10, 0x5a)));
        }
        let started = std::time::Instant::now();
        let seen = events_until_the_end(&mut events);
        let waited = started.elapsed();
        assert!(
            matches!(seen.last(), Some(ApplyEvent::Failed(reason)) if reason.contains("space")),
            "{seen:?}"
        );
        assert!(
            waited < std::time::Duration::from_secs(10),
            "the applier took {waited:?} to end: it waited for completions it had taken"
        );
        applier.stop();
    }

    #[test]
    fn a_refused_staged_write_spoils_its_unit_until_the_discard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dr.img");
        let (applier, mut events, runtime) = start_applier(dir.path(), &path, SIZE);
        let submit = |cmd| runtime.block_on(applier.submit(cmd));

        // Epoch 2's first write fails its CRC; its second and its seal follow in the stream
        // before the production side hears of it.
        submit(staged_write(2, 1, 0, 0xaa, true));
        submit(staged_write(2, 2, 8192, 0xbb, false));
        submit(seal(2, 5));
        submit(ApplyCmd::Flush { seq: WriteSeq(9) });
        let seen = events_until_flush(&mut events, WriteSeq(9));
        assert!(
            seen.contains(&ApplyEvent::Reject {
                seq: WriteSeq(1),
                reason: RejectReason::Checksum
            }),
            "{seen:?}"
        );
        assert!(
            !seen
                .iter()
                .any(|e| matches!(e, ApplyEvent::Staged(_) | ApplyEvent::Applied { .. })),
            "a unit missing a write was staged or applied: {seen:?}"
        );

        // The production side fell back: its Discard, then its catch-up's unit.
        submit(ApplyCmd::Discard { after: Epoch(1) });
        submit(staged_write(3, 3, 0, 0xcc, false));
        submit(seal(3, 6));
        submit(ApplyCmd::Flush { seq: WriteSeq(10) });
        let seen = events_until_flush(&mut events, WriteSeq(10));
        assert!(seen.contains(&ApplyEvent::Staged(Epoch(3))), "{seen:?}");
        assert!(
            seen.iter()
                .any(|e| matches!(e, ApplyEvent::Applied { epoch, .. } if *epoch == Epoch(3))),
            "{seen:?}"
        );
        applier.stop();
        let file = std::fs::File::open(&path).unwrap();
        let mut block = [0u8; 4096];
        file.read_exact_at(&mut block, 0).unwrap();
        assert_eq!(block, [0xcc; 4096]);
        file.read_exact_at(&mut block, 8192).unwrap();
        assert_eq!(
            block, [0; 4096],
            "the spoiled epoch's other write was dropped"
        );
    }

    /// A catch-up sends a block again when it was written after the pass that read it. The
    /// cap counts each block of a unit once, so a catch-up whose blocks fit it completes
    /// however many passes it takes, and the last copy of each block is what applies; a
    /// block more than the cap holds is refused, and so are records past twice the cap.
    #[test]
    fn a_catch_ups_blocks_sent_again_count_once_against_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dr.img");
        let recovered = StageLog::open(&dir.path().join("stage-log"), Epoch::ZERO).unwrap();
        let (applier, mut events, runtime) = start_applier_on(
            dir.path(),
            &path,
            recovered,
            Setup {
                stage_cap: 16 * 4096,
                ..Setup::default()
            },
        );
        let submit = |cmd| runtime.block_on(applier.submit(cmd));
        let mut seq = 0;
        let mut next = || {
            seq += 1;
            seq
        };
        // Two passes over the same 16 blocks: 32 blocks of records, 16 of the volume.
        for pass in 0..2u8 {
            for block in 0..16u64 {
                submit(staged_write(2, next(), block * 4096, 0x10 + pass, false));
            }
        }
        submit(seal(2, 7));
        let flush = WriteSeq(next());
        submit(ApplyCmd::Flush { seq: flush });
        let seen = events_until_flush(&mut events, flush);
        assert!(
            !seen.iter().any(|e| matches!(e, ApplyEvent::Reject { .. })),
            "a block sent again was counted again: {seen:?}"
        );
        assert!(
            seen.iter()
                .any(|e| matches!(e, ApplyEvent::Applied { epoch, .. } if *epoch == Epoch(2))),
            "{seen:?}"
        );

        // Whether a write sent since the last flush was refused for want of room.
        let mut refused_since = |seq: u64| {
            submit(ApplyCmd::Flush { seq: WriteSeq(seq) });
            let seen = events_until_flush(&mut events, WriteSeq(seq));
            seen.iter().any(|e| {
                matches!(
                    e,
                    ApplyEvent::Reject {
                        reason: RejectReason::StageFull,
                        ..
                    }
                )
            })
        };

        // The next unit: one block past the cap is refused.
        for block in 0..17u64 {
            submit(staged_write(3, next(), block * 4096, 0x20, false));
        }
        assert!(refused_since(next()), "a block past the cap was taken");

        // After the discard, a unit whose records pass twice the cap is refused too.
        submit(ApplyCmd::Discard { after: Epoch(2) });
        for _pass in 0..3 {
            for block in 0..16u64 {
                submit(staged_write(4, next(), block * 4096, 0x30, false));
            }
        }
        assert!(
            refused_since(next()),
            "records past twice the cap were taken"
        );
        applier.stop();
        let file = std::fs::File::open(&path).unwrap();
        let mut block = [0u8; 4096];
        for b in 0..16u64 {
            file.read_exact_at(&mut block, b * 4096).unwrap();
            assert_eq!(
                block, [0x11; 4096],
                "block {b}: the last pass's copy applies"
            );
        }
    }

    /// A compressed write, staged or direct, lands as the data it decompresses to; one that
    /// decompresses to another length, or to data whose CRC differs, is refused as a bad
    /// checksum (the production side sends it again) and nothing of it is written.
    #[test]
    fn compressed_writes_apply_decompressed_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dr.img");
        let (applier, mut events, runtime) = start_applier(dir.path(), &path, SIZE);
        let submit = |cmd| runtime.block_on(applier.submit(cmd));
        let data: Vec<u8> = (0..8192u32).map(|i| (i / 700) as u8 + 1).collect();
        let packed = crate::compression::Compressor::new()
            .unwrap()
            .compress(&data)
            .unwrap();
        let compressed = |flags, seq, offset, len: u32, crc| ApplyCmd::Write {
            header: WriteHeader {
                flags: WriteFlags(flags | WriteFlags::ZSTD),
                epoch: Epoch(1),
                seq: WriteSeq(seq),
                offset,
                len,
                crc,
            },
            payload: packed.clone(),
            placed: false,
            budget: 0,
        };
        let crc = payload_crc(&data);
        submit(compressed(0, 1, 0, 8192, crc));
        submit(seal(1, 5));
        submit(compressed(
            WriteFlags::DIRECT | WriteFlags::ACK,
            2,
            16384,
            8192,
            crc,
        ));
        submit(compressed(
            WriteFlags::DIRECT | WriteFlags::ACK,
            3,
            32768,
            4096,
            crc,
        ));
        submit(compressed(
            WriteFlags::DIRECT | WriteFlags::ACK,
            4,
            49152,
            8192,
            !crc,
        ));
        submit(ApplyCmd::Flush { seq: WriteSeq(9) });
        let seen = events_until_flush(&mut events, WriteSeq(9));
        assert!(
            seen.contains(&ApplyEvent::WriteAck(WriteSeq(2))),
            "{seen:?}"
        );
        for seq in [3, 4] {
            assert!(
                seen.contains(&ApplyEvent::Reject {
                    seq: WriteSeq(seq),
                    reason: RejectReason::Checksum
                }),
                "write {seq}: {seen:?}"
            );
        }
        applier.stop();
        let file = std::fs::File::open(&path).unwrap();
        let mut block = vec![0u8; 8192];
        for offset in [0, 16384] {
            file.read_exact_at(&mut block, offset).unwrap();
            assert_eq!(block, data, "at {offset}");
        }
        for offset in [32768, 49152] {
            file.read_exact_at(&mut block, offset).unwrap();
            assert_eq!(
                block,
                vec![0; 8192],
                "nothing of a refused write at {offset}"
            );
        }
    }

    /// Units replayed at start are applied one by one, and the stage log may be compacted
    /// after each: the seals of the units still to replay are durable and acknowledged, so
    /// the compacted log keeps them. Here the second unit's apply fails (its volume's file
    /// system is full): its seal must still be in the log for the next start.
    #[test]
    fn compaction_during_replay_keeps_the_seals_still_to_replay() {
        let fs = SmallTmpfs::mount("64k");
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("stage-log");
        let mut log = StageLog::open(&log_path, Epoch::ZERO).unwrap().log;
        let first = ByteRange::new(0, 4096);
        let second = ByteRange::new(1 << 20, 256 << 10);
        log.append_write(Epoch(1), first, false, &Bytes::from(vec![0x11; 4096]))
            .unwrap();
        log.seal(Epoch(1), 10).unwrap();
        log.append_write(Epoch(2), second, false, &Bytes::from(vec![0x22; 256 << 10]))
            .unwrap();
        log.seal(Epoch(2), 20).unwrap();
        drop(log);

        let recovered = StageLog::open(&log_path, Epoch::ZERO).unwrap();
        assert_eq!(recovered.seals.len(), 2);
        let path = fs.0.path().join("dr.img");
        let setup = Setup {
            size: 4 * SIZE,
            compact_after_bytes: 0,
            ..Setup::default()
        };
        let (applier, mut events, _runtime) = start_applier_on(dir.path(), &path, recovered, setup);
        let seen = events_until_the_end(&mut events);
        applier.stop();
        assert!(
            matches!(seen.as_slice(), [ApplyEvent::Applied { epoch: Epoch(1), .. }, ApplyEvent::Failed(reason)] if reason.contains("space")),
            "{seen:?}"
        );

        let again = StageLog::open(&log_path, Epoch(1)).unwrap();
        assert_eq!(
            again.seals,
            [crate::stage_log::SealRecord {
                epoch: Epoch(2),
                cut_ms: 20
            }],
            "the second unit's seal was dropped from the stage log"
        );
        assert_eq!(again.log.records_bytes(), second.len);
        assert_eq!(again.log.distinct_bytes(), second.len);
    }

    /// A unit with no writes, sealed and held for its group's commit while an earlier unit
    /// applies, leaves nothing staged: the log must keep its seal all the same (it was
    /// acknowledged), not be emptied.
    #[test]
    fn an_empty_unit_held_for_its_group_keeps_its_seal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dr.img");
        let log_path = dir.path().join("stage-log");
        let recovered = StageLog::open(&log_path, Epoch::ZERO).unwrap();
        let allowed = Arc::new(AtomicU64::new(0));
        let setup = Setup {
            allowed: Arc::clone(&allowed),
            ..Setup::default()
        };
        let (applier, mut events, runtime) = start_applier_on(dir.path(), &path, recovered, setup);
        let submit = |cmd| runtime.block_on(applier.submit(cmd));
        submit(staged_write(1, 1, 0, 0xaa, false));
        submit(seal(1, 10));
        submit(seal(2, 20));
        submit(ApplyCmd::Flush { seq: WriteSeq(9) });
        let seen = events_until_flush(&mut events, WriteSeq(9));
        assert_eq!(
            seen,
            [ApplyEvent::Staged(Epoch(1)), ApplyEvent::Staged(Epoch(2))]
        );

        // The group commits the first unit only.
        allowed.store(1, std::sync::atomic::Ordering::SeqCst);
        submit(ApplyCmd::Allowed);
        submit(ApplyCmd::Flush { seq: WriteSeq(10) });
        let seen = events_until_flush(&mut events, WriteSeq(10));
        assert!(
            matches!(
                seen.as_slice(),
                [ApplyEvent::Applied {
                    epoch: Epoch(1),
                    ..
                }]
            ),
            "{seen:?}"
        );
        applier.stop();

        let again = StageLog::open(&log_path, Epoch(1)).unwrap();
        assert_eq!(
            again.seals,
            [crate::stage_log::SealRecord {
                epoch: Epoch(2),
                cut_ms: 20
            }],
            "the empty unit's acknowledged seal was dropped from the stage log"
        );
    }

    /// A write the ring refuses (its submission fails) is not in flight: the applier ends
    /// at once, not after waiting out its drain's patience for a completion that cannot
    /// come (and leaking every buffer).
    #[test]
    fn a_write_the_ring_refuses_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dr.img");
        let recovered = StageLog::open(&dir.path().join("stage-log"), Epoch::ZERO).unwrap();
        let setup = Setup {
            label: fault::PUSH_FAILS,
            size: 4 * SIZE,
            ..Setup::default()
        };
        let (applier, mut events, runtime) = start_applier_on(dir.path(), &path, recovered, setup);
        for i in 0..8u64 {
            runtime.block_on(applier.submit(direct_write(i, i * (128 << 10), 128 << 10, 0x5a)));
        }
        let started = std::time::Instant::now();
        let seen = events_until_the_end(&mut events);
        let waited = started.elapsed();
        applier.stop();
        assert!(
            matches!(seen.last(), Some(ApplyEvent::Failed(reason)) if reason.contains("refuses")),
            "{seen:?}"
        );
        assert!(
            waited < std::time::Duration::from_secs(10),
            "the applier took {waited:?} to end: it waited for a write never on the ring"
        );
    }

    /// The image at `point` of the volume at `path`, read through the undo journal in `dir`.
    fn image_at(dir: &std::path::Path, path: &std::path::Path, point: Epoch) -> Vec<u8> {
        let points = crate::undo_journal::Points::new(dir, Default::default());
        let mut guard = points.journal().unwrap();
        let journal = guard.as_mut().unwrap();
        let volume = std::fs::read(path).unwrap();
        let mut out = Vec::new();
        for piece in journal.view(point).unwrap().pieces(ByteRange::new(0, SIZE)) {
            match piece {
                blockrep_core::replication::undo::Piece::Undo { range, .. } => {
                    let mut buf = vec![0; range.len as usize];
                    journal.read_piece(piece, &mut buf).unwrap();
                    out.extend_from_slice(&buf);
                }
                blockrep_core::replication::undo::Piece::Volume { range } => {
                    out.extend_from_slice(&volume[range.offset as usize..range.end() as usize])
                }
            }
        }
        out
    }

    /// The points of the DR volume in `dir`, as an agent that starts finds them.
    fn listed_points(dir: &std::path::Path) -> crate::undo_journal::Points {
        let points = crate::undo_journal::Points::new(dir, KEEP_A_DAY);
        points.set_applied(crate::dr_state::load(&dir.join("dr.json")).unwrap().applied);
        points
    }

    const KEEP_A_DAY: blockrep_core::replication::undo::Retention =
        blockrep_core::replication::undo::Retention {
            max_age_secs: 86_400,
            max_bytes: 0,
            keep_hourly: 0,
        };

    /// An applier of a new DR volume in `dir` (`dr.img`, `stage-log`) whose group keeps
    /// points a day, its initial sync done: a consistent image from the start.
    fn keeping_points(
        dir: &std::path::Path,
    ) -> (
        Applier,
        tokio::sync::mpsc::UnboundedReceiver<ApplyEvent>,
        tokio::runtime::Runtime,
    ) {
        let recovered = StageLog::open(&dir.join("stage-log"), Epoch::ZERO).unwrap();
        let setup = Setup {
            retention: KEEP_A_DAY,
            ..Setup::default()
        };
        let started = start_applier_on(dir, &dir.join("dr.img"), recovered, setup);
        started
            .2
            .block_on(started.0.submit(ApplyCmd::SyncDone { epoch: Epoch(0) }));
        started
    }

    /// Production's digests are recorded at the unit covering their epoch and saved; a
    /// save that fails (here: a directory where its temporary file goes) is logged, and units go on
    /// applying: drill verification only loses those records at a crash.
    #[test]
    fn a_failed_save_of_the_digest_records_does_not_stop_the_applier() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("undo/digests.bin.tmp/in-the-way")).unwrap();
        let (applier, mut events, runtime) = keeping_points(dir.path());
        let submit = |cmd| runtime.block_on(applier.submit(cmd));
        for e in 1..=3u64 {
            submit(staged_write(e, e, 0, e as u8, false));
            submit(ApplyCmd::Digest {
                offset: 0,
                after: Epoch(e),
                crcs: vec![7],
            });
            submit(seal(e, e * 1000));
            submit(ApplyCmd::Flush {
                seq: WriteSeq(20 + e),
            });
            events_until_flush(&mut events, WriteSeq(20 + e));
        }
        applier.stop();
        let points = listed_points(dir.path());
        let guard = points.journal().unwrap();
        let journal = guard.as_ref().unwrap();
        assert_eq!(journal.newest(), Some(Epoch(3)), "every unit applied");
        assert!(
            !dir.path().join("undo/digests.bin").exists(),
            "nothing was saved"
        );
    }

    /// With the group's retention on, each unit's undo is kept before it applies: every
    /// unit applied is a point, and the image at each reads back as the volume was then.
    /// A crash after a unit's undo was durable, in the middle of its apply, replays the
    /// unit as an apply only: its undo is not taken again from the half-written volume.
    #[test]
    fn each_unit_is_a_point_and_a_replay_after_its_undo_applies_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dr.img");
        let log_path = dir.path().join("stage-log");
        let (applier, mut events, runtime) = keeping_points(dir.path());
        let submit = |cmd| runtime.block_on(applier.submit(cmd));
        let mut images = Vec::new();
        for e in 1..=4u64 {
            submit(staged_write(e, e, 0, e as u8, false));
            submit(staged_write(e, 10 + e, e * 4096, 0x10 + e as u8, false));
            submit(seal(e, e * 1000));
            submit(ApplyCmd::Flush {
                seq: WriteSeq(20 + e),
            });
            events_until_flush(&mut events, WriteSeq(20 + e));
            images.push(std::fs::read(&path).unwrap());
        }
        applier.stop();
        let points = listed_points(dir.path());
        let listed: Vec<u64> = points
            .list()
            .unwrap()
            .iter()
            .map(|p| p.point.epoch.0)
            .collect();
        assert_eq!(listed, [1, 2, 3, 4]);
        drop(points);
        for e in 1..=4u64 {
            assert!(
                image_at(dir.path(), &path, Epoch(e)) == images[e as usize - 1],
                "the image at {e}"
            );
        }

        // Unit 5: staged and sealed, its undo kept, then half of it applied when the power
        // went (block 0 written, block 5 not).
        let mut log = StageLog::open(&log_path, Epoch(4)).unwrap().log;
        log.append_write(
            Epoch(5),
            ByteRange::new(0, 4096),
            false,
            &Bytes::from(vec![0x55; 4096]),
        )
        .unwrap();
        log.append_write(
            Epoch(5),
            ByteRange::new(5 * 4096, 4096),
            false,
            &Bytes::from(vec![0x56; 4096]),
        )
        .unwrap();
        log.seal(Epoch(5), 5000).unwrap();
        drop(log);
        {
            let points = crate::undo_journal::Points::new(dir.path(), KEEP_A_DAY);
            let mut guard = points.journal().unwrap();
            let volume = std::fs::read(&path).unwrap();
            guard
                .as_mut()
                .unwrap()
                .keep_unit(
                    Epoch(5),
                    5000,
                    &[ByteRange::new(0, 4096), ByteRange::new(5 * 4096, 4096)],
                    |r, out| {
                        out.copy_from_slice(&volume[r.offset as usize..r.end() as usize]);
                        Ok(())
                    },
                )
                .unwrap();
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[0x55; 4096], 0)
            .unwrap();

        let recovered = StageLog::open(&log_path, Epoch(4)).unwrap();
        let state = crate::dr_state::load(&dir.path().join("dr.json")).unwrap();
        assert_eq!(state.applied, Epoch(4));
        let setup = Setup {
            retention: KEEP_A_DAY,
            ..Setup::default()
        };
        let (applier, mut events, runtime) = start_applier_on(dir.path(), &path, recovered, setup);
        runtime.block_on(applier.submit(ApplyCmd::Flush { seq: WriteSeq(99) }));
        let seen = events_until_flush(&mut events, WriteSeq(99));
        assert!(
            seen.iter()
                .any(|e| matches!(e, ApplyEvent::Applied { epoch, .. } if *epoch == Epoch(5))),
            "{seen:?}"
        );
        applier.stop();
        let points = listed_points(dir.path());
        let listed: Vec<u64> = points
            .list()
            .unwrap()
            .iter()
            .map(|p| p.point.epoch.0)
            .collect();
        assert_eq!(listed, [1, 2, 3, 4, 5]);
        drop(points);
        assert!(
            image_at(dir.path(), &path, Epoch(4)) == images[3],
            "the image at 4 after the replay of 5"
        );
    }

    /// A direct write changes the volume outside any unit: the points held are dropped
    /// before it lands, and the journal starts again after the next unit.
    #[test]
    fn a_direct_write_drops_the_points_first() {
        let dir = tempfile::tempdir().unwrap();
        let (applier, mut events, runtime) = keeping_points(dir.path());
        let submit = |cmd| runtime.block_on(applier.submit(cmd));
        for e in 1..=2u64 {
            submit(staged_write(e, e, 0, e as u8, false));
            submit(seal(e, e * 1000));
        }
        submit(direct_write(5, 8192, 4096, 0x77));
        submit(ApplyCmd::Flush { seq: WriteSeq(9) });
        events_until_flush(&mut events, WriteSeq(9));
        let list = |dir: &std::path::Path| -> Vec<u64> {
            listed_points(dir)
                .list()
                .unwrap()
                .iter()
                .map(|p| p.point.epoch.0)
                .collect()
        };
        submit(staged_write(3, 6, 0, 3, false));
        submit(seal(3, 3000));
        submit(staged_write(4, 7, 0, 4, false));
        submit(seal(4, 4000));
        submit(ApplyCmd::Flush { seq: WriteSeq(10) });
        events_until_flush(&mut events, WriteSeq(10));
        applier.stop();
        assert_eq!(
            list(dir.path()),
            [3, 4],
            "points from before the direct write"
        );
    }

    /// A seal of an epoch already covered by a later seal is answered (its writes are
    /// staged) but not appended: the log's seals stay in epoch order.
    #[test]
    fn a_seal_of_an_epoch_already_sealed_is_not_appended_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dr.img");
        let log_path = dir.path().join("stage-log");
        let recovered = StageLog::open(&log_path, Epoch::ZERO).unwrap();
        let setup = Setup {
            allowed: Arc::new(AtomicU64::new(0)),
            ..Setup::default()
        };
        let (applier, mut events, runtime) = start_applier_on(dir.path(), &path, recovered, setup);
        let submit = |cmd| runtime.block_on(applier.submit(cmd));
        submit(staged_write(4, 1, 0, 0xaa, false));
        submit(staged_write(5, 2, 8192, 0xbb, false));
        submit(seal(5, 5));
        submit(seal(4, 4));
        submit(ApplyCmd::Flush { seq: WriteSeq(9) });
        let seen = events_until_flush(&mut events, WriteSeq(9));
        assert_eq!(
            seen,
            [ApplyEvent::Staged(Epoch(5)), ApplyEvent::Staged(Epoch(4))]
        );
        applier.stop();
        let again = StageLog::open(&log_path, Epoch::ZERO).unwrap();
        assert_eq!(
            again.seals.iter().map(|s| s.epoch).collect::<Vec<_>>(),
            [Epoch(5)]
        );
    }
}
