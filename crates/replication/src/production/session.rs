//! One session of a production pair: the handshake and the plan it leads to, then the
//! stream's loop (the DR side's frames, the ticker and the resync reader's end, applied
//! to the machine one at a time, with the sender beside it) until it ends, and the backoff
//! between sessions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockrep_core::pair::probes::VERIFY_BLOCK;
use blockrep_core::pair::production::Transmit;
use blockrep_core::pair::state::PairState;
use blockrep_core::replication::group_cut::Live;
use blockrep_core::replication::lineage::{self, DrView, Plan, ProductionView};
use blockrep_core::replication::{Payload, ReplicationStatus, WriteFrame, WriteSeq};
use blockrep_wire::{
    Frame, Hello, HelloFlags, ProtocolVersion, RefuseKind, WriteFlags, WriteHeader, payload_crc,
};
use bytes::Bytes;

use crate::endpoint::ReplicationStream;
use crate::framed::{FrameReader, FrameWriter};
use crate::link::{Data, PairCounters, PairLink};

use super::error::SessionError;
use super::resync::{ResyncKind, ResyncOutcome};
use super::{ProductionPair, SendLimits};
use crate::compression::{Compression, Compressor};

impl ProductionPair {
    /// One session: the handshake, the plan, then the stream's loops until one ends.
    /// `accepted` says whether the DR side took the stream (the backoff starts over).
    pub(super) async fn session(&self, accepted: &mut bool) -> Result<(), SessionError> {
        let membership = self.membership();
        let lineage = self
            .volume
            .gate()
            .lineage()
            .ok_or_else(|| SessionError::Protocol("the volume has no lineage".into()))?
            .get();
        let flags = HelloFlags {
            dirty: self.link.tracker().dirty_bytes() > 0,
            full_sync_done: membership.full_sync_done,
            discard_peer: membership.discard_peer,
        };
        let hello = Hello {
            version: ProtocolVersion::CURRENT,
            pair: membership.pair,
            volume: membership.peer_volume,
            size: membership.size,
            model: membership.model,
            node: self.node.clone(),
            lineage: lineage.clone(),
            flags,
        };
        let ReplicationStream {
            mut reader,
            mut writer,
        } = self
            .endpoint
            .open_replication(membership.peer_address, &membership.peer_node, hello)
            .await?;
        let (applied, staged, consistent, dr_lineage) = match reader.next().await? {
            Some(Frame::Welcome {
                applied,
                staged,
                consistent,
                lineage,
            }) => (applied, staged, consistent, lineage),
            Some(Frame::Refuse {
                kind: RefuseKind::Diverged,
                reason,
            }) => return Err(SessionError::Diverged(reason)),
            Some(Frame::Refuse { reason, .. }) => return Err(SessionError::Refused(reason)),
            Some(_) => return Err(SessionError::Protocol("expected Welcome".into())),
            None => return Err(SessionError::Protocol("stream closed during Hello".into())),
        };
        // The same decision the DR side made before it answered.
        let plan = lineage::plan(
            ProductionView {
                lineage: &lineage,
                dirty: flags.dirty,
                full_sync_done: flags.full_sync_done,
                discard_peer: flags.discard_peer,
            },
            DrView {
                lineage: &dr_lineage,
                consistent,
            },
        );
        let plan = match plan {
            Plan::Diverged(d) => return Err(SessionError::Diverged(d.to_string())),
            Plan::FullSync(reason) => {
                // Until this copy ends, a reconnect must copy everything again.
                self.membership
                    .update(|m| m.full_sync_done = false)
                    .map_err(|e| SessionError::Resync(format!("record the pair: {e}")))?;
                tracing::info!(pair = %membership.pair, %reason, "copying the whole volume");
                ResyncKind::Full
            }
            Plan::FinishSync => ResyncKind::DirtyDirect,
            Plan::CatchUp if self.link.tracker().dirty_bytes() > 0 => ResyncKind::CatchUp,
            Plan::CatchUp => ResyncKind::None,
        };
        tracing::info!(pair = %membership.pair, peer = %membership.peer_address, %applied, consistent, ?plan, "DR agent accepted the stream");
        *accepted = true;
        self.link.connected(staged, plan != ResyncKind::None)?;
        {
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            status.dr_consistent = consistent;
            if consistent {
                status.consistent = Some((applied, 0));
            }
        }

        let stop_resync = Arc::new(AtomicBool::new(false));
        let resync_thread = self.start_resync(plan, Arc::clone(&stop_resync))?;
        let digest_thread = match super::digests::start(
            Arc::clone(&self.volume),
            Arc::clone(&self.link),
            Arc::clone(&stop_resync),
        ) {
            Ok(thread) => thread,
            Err(e) => {
                stop_resync.store(true, Ordering::SeqCst);
                return Err(SessionError::Local(format!(
                    "cannot start the digest thread: {e}"
                )));
            }
        };
        let mut ticker = Ticker::new(self);
        let result = self
            .stream(&mut reader, &mut writer, &mut ticker, &stop_resync)
            .await;
        stop_resync.store(true, Ordering::SeqCst);
        writer.finish();
        // The machine leaves the stream before the readers are waited for: a write waiting
        // for the DR side holds its blocks until it is answered, a reader may be queued for
        // them, and only leaving the stream answers it (or, in a synchronous group, the
        // group's trip, which the coordinator hears of now). What a reader queues afterwards
        // the machine drops (its blocks stay dirty).
        self.link.disconnected();
        if self.link.trip_wanted() {
            self.report_now.notify_one();
        }
        let catch_up_thread = ticker.catch_up_thread.take();
        // The session's beat ends with its loop, as before the readers are joined.
        drop(ticker);
        // Every resync reader this session started ends with it: an outcome reported
        // later would be taken by the next session as its own.
        for thread in [resync_thread, catch_up_thread, Some(digest_thread)]
            .into_iter()
            .flatten()
        {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        result
    }

    /// The stream's loop, the session's one owner of its inputs: it takes them one at a
    /// time (the DR side's frames that arrived together, the ticker, the resync reader's
    /// end, the pair leaving the streaming states) and applies each to the machine, whose
    /// invariants the link checks after every step. The sender drains the machine's frames
    /// beside it, in the same task; the loop ends with the first error of either.
    async fn stream(
        &self,
        reader: &mut FrameReader,
        writer: &mut FrameWriter,
        ticker: &mut Ticker,
        stop_resync: &Arc<AtomicBool>,
    ) -> Result<(), SessionError> {
        let mut sender = std::pin::pin!(send_loop(
            &self.link,
            writer,
            &self.send_limits,
            &self.throttled_at,
            self.config.compression,
        ));
        let mut states = self.link.states();
        // The counters run across streams; each stream counts from zero.
        let mut counted = reader.bytes_received;
        // Gathers each run of acknowledgements, kept across frames so none allocates.
        let mut acks = Vec::new();
        loop {
            // Each of these futures is cancel-safe: the reader keeps a partial frame in its
            // buffer, the ticker and the notification lose nothing a later tick misses.
            let input = tokio::select! {
                r = &mut sender => return r,
                s = states.wait_for(|s| !s.streaming()) => {
                    return Err(SessionError::Ended(s.map_or(PairState::Stopped, |s| *s)));
                }
                frame = reader.next() => Input::Frame(frame?),
                _ = ticker.interval.tick() => Input::Tick,
                _ = ticker.cut.tick() => Input::Cut,
                _ = self.resync_ended.notified() => Input::Tick,
            };
            match input {
                Input::Frame(frame) => {
                    self.link
                        .counters
                        .bytes_received
                        .fetch_add(reader.bytes_received - counted, Ordering::Relaxed);
                    counted = reader.bytes_received;
                    self.on_frames(frame, reader, &mut acks)?;
                }
                Input::Tick => self.on_tick(ticker, stop_resync).await?,
                Input::Cut => self.on_cut(),
            }
        }
    }

    /// A frame of the DR side and every whole frame that arrived with it, in order; each
    /// run of acknowledgements is one step of the machine, whose answers wake each
    /// connection once.
    fn on_frames(
        &self,
        first: Option<Frame>,
        reader: &mut FrameReader,
        acks: &mut Vec<WriteSeq>,
    ) -> Result<(), SessionError> {
        in_runs(
            first,
            acks,
            || reader.next_received().map_err(SessionError::from),
            |acks| self.link.handle_acks(acks),
            |frame| self.on_frame(frame),
        )
    }

    /// A frame of the DR side other than an acknowledgement (`None`: it closed the stream).
    fn on_frame(&self, frame: Option<Frame>) -> Result<(), SessionError> {
        match frame {
            Some(Frame::Staged { epoch }) => self.link.handle_staged(epoch),
            Some(Frame::SyncDoneAck { epoch }) => self.link.handle_sync_done_ack(epoch),
            Some(Frame::Applied { epoch, cut_ms }) => {
                let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
                status.consistent = Some((epoch, cut_ms));
            }
            Some(Frame::Reject { seq, reason }) => self.link.handle_reject(seq, reason),
            Some(Frame::Verified { id, differing }) => self.link.handle_verified(id, &differing),
            Some(Frame::Refuse { reason, .. }) => return Err(SessionError::Refused(reason)),
            Some(_) => {
                return Err(SessionError::Protocol(
                    "unexpected frame from the DR side".into(),
                ));
            }
            None => {
                return Err(SessionError::Protocol(
                    "the DR side closed the stream".into(),
                ));
            }
        }
        Ok(())
    }

    /// An epoch interval passed: the epoch is cut, unless the pair replicates synchronously
    /// or a consistency group cuts it (never on its own).
    fn on_cut(&self) {
        if self.link.live() != Live::Sync && !self.link.grouped() {
            self.link.advance_epoch();
        }
    }

    /// The ticker fired or the resync reader ended: checks the peer's silence and whether
    /// the stream must end, takes the resync's outcome (cutting at once after an initial
    /// sync), and starts a catch-up when the journal overflowed. Epochs are cut by
    /// [`ProductionPair::on_cut`], on their own timer.
    async fn on_tick(
        &self,
        ticker: &mut Ticker,
        stop_resync: &Arc<AtomicBool>,
    ) -> Result<(), SessionError> {
        ticker.beat.progress();
        // A sender held back by the agent's send limit meanwhile has not sent what would
        // have been answered: that silence is not the peer's (a peer that is gone is still
        // found by QUIC's idle timeout, which keep-alives hold off only while it answers).
        if let Some(waited) = self.link.unanswered_for()
            && waited > self.config.peer_timeout
            && !self.throttled_within(waited)
        {
            return Err(SessionError::Silent(waited));
        }
        if let Some(why) = self.link.stream_must_end() {
            return Err(SessionError::Trip(why));
        }
        let grouped = self.link.grouped();
        let outcome = self
            .resync_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(outcome) = outcome {
            if let Some(resync) = self.resync.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let secs = resync.started.elapsed().as_secs_f64();
                if secs > 0.0 {
                    self.status
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .resync_rate = self.link.resync_acked() as f64 / secs;
                }
            }
            match outcome {
                Ok(ResyncOutcome::Stopped) => {}
                Ok(outcome) => {
                    // Cut at once after an initial sync: the DR side is consistent when the
                    // unit after `SyncDone` is applied, not an interval later.
                    if outcome != ResyncOutcome::CaughtUp
                        && self.link.live() != Live::Sync
                        && !grouped
                    {
                        ticker.cut.reset();
                        self.link.advance_epoch();
                    }
                    self.link.resync_done()?;
                    let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
                    status.dr_consistent = true;
                    status.progress = 1.0;
                    drop(status);
                    self.set_status(ReplicationStatus::Active, "replicating");
                }
                Err(e) => return Err(SessionError::Resync(e)),
            }
        }
        let resync_running = self
            .resync
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if !self.link.needs_catch_up() || resync_running {
            return Ok(());
        }
        if self
            .link
            .stage_full_for()
            .is_some_and(|since| since < STAGE_FULL_RETRY)
        {
            self.set_status(
                ReplicationStatus::Copying,
                format!(
                    "the DR side's stage log is full (replication.stage_log_max_bytes on the DR agent): writes are tracked in the bitmap, the DR volume stays at its last consistent point, and a catch-up is tried again every {} s",
                    STAGE_FULL_RETRY.as_secs()
                ),
            );
            return Ok(());
        }
        if let Some(thread) = ticker.catch_up_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        tracing::info!(pair = %self.membership().pair, "falling back to bitmap mode; catching up");
        ticker.catch_up_thread = self.start_resync(ResyncKind::CatchUp, Arc::clone(stop_resync))?;
        Ok(())
    }
}

/// What the session's loop takes in, one at a time.
enum Input {
    /// A frame of the DR side (`None`: it closed the stream).
    Frame(Option<Frame>),
    /// The ticker fired, or the resync reader ended.
    Tick,
    /// An epoch interval passed.
    Cut,
}

/// The session's clock work: when it ticks, when it cuts an epoch, the catch-up reader it
/// started, and its beat for the watchdog.
struct Ticker {
    interval: tokio::time::Interval,
    /// Every epoch interval, on its own timer: a cut on the housekeeping tick would wait
    /// for the first tick after the interval, stretching epochs by up to a tick.
    cut: tokio::time::Interval,
    catch_up_thread: Option<std::thread::JoinHandle<()>>,
    beat: Arc<blockrep_volume::liveness::Beat>,
}

impl Ticker {
    fn new(pair: &ProductionPair) -> Self {
        let mut interval =
            tokio::time::interval(pair.config.epoch_interval.min(Duration::from_millis(200)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let period = pair.config.epoch_interval;
        let mut cut = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        cut.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // For the watchdog: a session ticks at least every 200 ms.
        let beat = blockrep_volume::liveness::Liveness::global()
            .register(format!("session of pair {}", pair.membership().pair));
        beat.expect(true);
        Self {
            interval,
            cut,
            catch_up_thread: None,
            beat,
        }
    }
}

/// Sends the link's frames, payloads as their own chunks, no faster than the agent's and
/// the pair's send limits let them go: under a limit, chunk by chunk as the limit allows (the DR side
/// answers what reached it meanwhile), noting in `throttled_at` when it last had to wait.
async fn send_loop(
    link: &PairLink,
    writer: &mut FrameWriter,
    send_limit: &SendLimits,
    throttled_at: &Mutex<Option<Instant>>,
    compression: Compression,
) -> Result<(), SessionError> {
    let mut compressor = match compression {
        Compression::Off => None,
        Compression::Zstd => Some(
            Compressor::new()
                .map_err(|e| SessionError::Local(format!("cannot start zstd: {e}")))?,
        ),
    };
    let mut frames = Vec::new();
    let mut chunks: Vec<Bytes> = Vec::new();
    let counters = Arc::clone(&link.counters);
    let fault = fault::CorruptExtent::from_env();
    // The counters run across streams; each stream counts from zero.
    let mut counted = writer.bytes_sent;
    loop {
        let notified = link.wake_sender.notified();
        link.take_frames(8 << 20, &mut frames);
        if frames.is_empty() {
            notified.await;
            continue;
        }
        let compressing = compressor.is_some();
        let mut encode = || {
            encode_frames(
                &mut frames,
                writer,
                &mut chunks,
                compressor.as_mut(),
                &fault,
                &counters,
            )
        };
        if compressing
            && tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread
        {
            // Compression is CPU work of milliseconds a batch: off the runtime's workers'
            // other tasks (NBD answers, the QUIC driver, heartbeats).
            tokio::task::block_in_place(encode);
        } else {
            encode();
        }
        if send_limit.is_set() {
            writer.close_batch(&mut chunks);
            for chunk in std::mem::take(&mut chunks) {
                send_limit
                    .take(chunk.len() as u64, || {
                        *throttled_at.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(Instant::now());
                    })
                    .await;
                writer.send_bytes(chunk).await?;
            }
        } else {
            writer.send_chunks(&mut chunks).await?;
        }
        counters
            .bytes_sent
            .fetch_add(writer.bytes_sent - counted, Ordering::Relaxed);
        counted = writer.bytes_sent;
    }
}

/// Encodes a batch of the link's frames into `chunks` (payloads as their own chunks),
/// compressing payloads with `compressor` when it has one.
fn encode_frames(
    frames: &mut Vec<Transmit<Data>>,
    writer: &mut FrameWriter,
    chunks: &mut Vec<Bytes>,
    mut compressor: Option<&mut Compressor>,
    fault: &fault::CorruptExtent,
    counters: &PairCounters,
) {
    for frame in frames.drain(..) {
        match frame {
            Transmit::Write(WriteFrame {
                epoch,
                seq,
                range,
                payload,
                direct,
                fua,
                gated,
            }) => {
                let mut flags = 0;
                if direct {
                    flags |= WriteFlags::DIRECT | WriteFlags::ACK;
                }
                if gated {
                    flags |= WriteFlags::GATED;
                }
                if fua {
                    flags |= WriteFlags::FUA;
                }
                let bytes = match payload {
                    Payload::Data(Data(bytes)) => bytes,
                    Payload::Zeroes => {
                        flags |= WriteFlags::ZEROES;
                        Bytes::new()
                    }
                };
                // The CRC is of the data, whatever happens to it on the way.
                let crc = payload_crc(&bytes);
                let mut bytes = fault.apply(bytes);
                if let Some(packed) = compressor.as_mut().and_then(|c| c.compress(&bytes)) {
                    flags |= WriteFlags::ZSTD;
                    bytes = packed;
                }
                let header = WriteHeader {
                    flags: WriteFlags(flags),
                    epoch,
                    seq,
                    offset: range.offset,
                    len: range.len as u32,
                    crc,
                };
                counters.extents_sent.fetch_add(1, Ordering::Relaxed);
                writer.push_write(&header, bytes, chunks);
            }
            Transmit::Flush { seq } => writer.push_frame(&Frame::Flush { seq }, chunks),
            Transmit::Seal { epoch, cut_ms } => {
                writer.push_frame(&Frame::Seal { epoch, cut_ms }, chunks)
            }
            Transmit::Discard { after } => writer.push_frame(&Frame::Discard { after }, chunks),
            Transmit::SyncDone { epoch } => writer.push_frame(&Frame::SyncDone { epoch }, chunks),
            Transmit::Ungate { epoch } => writer.push_frame(&Frame::Ungate { epoch }, chunks),
            Transmit::Digest {
                offset,
                after,
                crcs,
            } => writer.push_frame(
                &Frame::Digest {
                    offset,
                    after,
                    crcs,
                },
                chunks,
            ),
            Transmit::Verify {
                id,
                offset,
                after,
                crcs,
            } => writer.push_frame(
                &Frame::Verify {
                    id,
                    offset,
                    block: VERIFY_BLOCK,
                    after,
                    crcs,
                },
                chunks,
            ),
        }
    }
}

/// How long a pair whose DR stage log was full waits before it tries a catch-up again.
const STAGE_FULL_RETRY: Duration = Duration::from_secs(5);

/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Reconnect delays: doubling from 200 ms up to [`MAX_BACKOFF`], with ±25% jitter from a
/// seeded generator (the seed is the pair's, so two pairs do not retry in step).
pub(super) struct Backoff {
    next: Duration,
    rng: u64,
}

impl Backoff {
    pub(super) fn new(seed: u64) -> Self {
        Self {
            next: Duration::from_millis(200),
            rng: seed | 1,
        }
    }

    pub(super) fn next(&mut self) -> Duration {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let jitter = 0.75 + (self.rng % 1000) as f64 / 2000.0;
        let wait = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(MAX_BACKOFF);
        wait
    }
}

/// Hands `first`, then each frame `next` has at once after it, on in order: each run of
/// acknowledgements to `on_acks` together (gathered in `acks`, empty before and after), any
/// other frame (`None`: the stream ended) to `on_frame`. Acknowledgements received before
/// `next` fails are handed on before the error: the DR side holds those writes durably.
fn in_runs<E>(
    first: Option<Frame>,
    acks: &mut Vec<WriteSeq>,
    mut next: impl FnMut() -> Result<Option<Frame>, E>,
    mut on_acks: impl FnMut(&[WriteSeq]),
    mut on_frame: impl FnMut(Option<Frame>) -> Result<(), E>,
) -> Result<(), E> {
    let mut hand_on = |acks: &mut Vec<WriteSeq>| {
        if !acks.is_empty() {
            on_acks(acks);
            acks.clear();
        }
    };
    let mut frame = first;
    loop {
        match frame {
            Some(Frame::WriteAck { seq } | Frame::FlushAck { seq }) => acks.push(seq),
            other => {
                hand_on(acks);
                on_frame(other)?;
            }
        }
        match next() {
            Ok(Some(following)) => frame = Some(following),
            Ok(None) => break,
            Err(e) => {
                hand_on(acks);
                return Err(e);
            }
        }
    }
    hand_on(acks);
    Ok(())
}

/// Test-only faults, compiled in only with the `fault-injection` feature.
mod fault {
    use bytes::Bytes;

    /// Corrupts the payload of the N-th data extent sent (N from
    /// `BLOCKREP_FAULT_CORRUPT_EXTENT`), after its CRC was computed.
    pub struct CorruptExtent {
        /// Extents left before the one to corrupt; 0 when none is.
        #[cfg(feature = "fault-injection")]
        countdown: std::sync::atomic::AtomicU64,
    }

    impl CorruptExtent {
        #[cfg(feature = "fault-injection")]
        pub fn from_env() -> Self {
            let n = std::env::var("BLOCKREP_FAULT_CORRUPT_EXTENT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Self {
                countdown: std::sync::atomic::AtomicU64::new(n),
            }
        }

        #[cfg(not(feature = "fault-injection"))]
        pub fn from_env() -> Self {
            Self {}
        }

        #[cfg(feature = "fault-injection")]
        pub fn apply(&self, bytes: Bytes) -> Bytes {
            use std::sync::atomic::Ordering;
            let n = self.countdown.load(Ordering::Relaxed);
            if n == 0 || bytes.is_empty() {
                return bytes;
            }
            self.countdown.store(n - 1, Ordering::Relaxed);
            if n > 1 {
                return bytes;
            }
            let mut bad = bytes.to_vec();
            bad[0] ^= 0xff;
            tracing::warn!("fault injection: corrupting an extent in flight");
            Bytes::from(bad)
        }

        #[cfg(not(feature = "fault-injection"))]
        pub fn apply(&self, bytes: Bytes) -> Bytes {
            bytes
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use blockrep_core::replication::Epoch;

    use super::*;

    /// What `in_runs` hands on for `first` followed by `rest`, and how it ends (`on_frame`
    /// refuses a `Reject`).
    fn runs_of(
        first: Option<Frame>,
        rest: Vec<Result<Option<Frame>, &'static str>>,
    ) -> (Vec<String>, Result<(), &'static str>) {
        let seen = RefCell::new(Vec::new());
        let mut rest = rest.into_iter();
        let mut acks = Vec::new();
        let ended = in_runs(
            first,
            &mut acks,
            || rest.next().unwrap_or(Ok(None)),
            |acks| {
                let seqs: Vec<u64> = acks.iter().map(|s| s.0).collect();
                seen.borrow_mut().push(format!("acks {seqs:?}"));
            },
            |frame| {
                seen.borrow_mut().push(format!("{frame:?}"));
                match frame {
                    Some(Frame::Reject { .. }) => Err("refused"),
                    _ => Ok(()),
                }
            },
        );
        assert!(acks.is_empty(), "every ack gathered was handed on");
        (seen.into_inner(), ended)
    }

    fn ack(seq: u64) -> Result<Option<Frame>, &'static str> {
        Ok(Some(Frame::WriteAck { seq: WriteSeq(seq) }))
    }

    #[test]
    fn frames_received_together_go_on_in_order_with_each_run_of_acks_at_once() {
        let (seen, ended) = runs_of(
            Some(Frame::WriteAck { seq: WriteSeq(1) }),
            vec![
                ack(2),
                Ok(Some(Frame::FlushAck { seq: WriteSeq(3) })),
                Ok(Some(Frame::Staged { epoch: Epoch(7) })),
                ack(4),
            ],
        );
        assert_eq!(ended, Ok(()));
        assert_eq!(
            seen,
            [
                "acks [1, 2, 3]".to_owned(),
                format!("{:?}", Some(Frame::Staged { epoch: Epoch(7) })),
                "acks [4]".to_owned(),
            ]
        );
    }

    /// Acknowledgements received before a bad frame are still taken: the DR side holds
    /// those writes durably, so their blocks need not stay dirty.
    #[test]
    fn acks_received_before_a_bad_frame_are_taken_before_the_error() {
        let (seen, ended) = runs_of(
            Some(Frame::WriteAck { seq: WriteSeq(1) }),
            vec![ack(2), Err("a bad frame")],
        );
        assert_eq!(ended, Err("a bad frame"));
        assert_eq!(seen, ["acks [1, 2]"]);
    }

    #[test]
    fn a_run_of_acks_ending_what_was_received_goes_on_and_so_does_the_end_of_the_stream() {
        let (seen, ended) = runs_of(Some(Frame::WriteAck { seq: WriteSeq(1) }), vec![]);
        assert_eq!((seen, ended), (vec!["acks [1]".to_owned()], Ok(())));
        let (seen, _) = runs_of(None, vec![]);
        assert_eq!(seen, ["None"]);
    }

    /// A frame the session refuses ends the run: the acks before it went on, none after.
    #[test]
    fn a_refused_frame_ends_the_run_after_the_acks_before_it() {
        let reject = Frame::Reject {
            seq: WriteSeq(2),
            reason: blockrep_wire::RejectReason::Checksum,
        };
        let (seen, ended) = runs_of(
            Some(Frame::WriteAck { seq: WriteSeq(1) }),
            vec![Ok(Some(reject.clone())), ack(3)],
        );
        assert_eq!(ended, Err("refused"));
        assert_eq!(seen, ["acks [1]".to_owned(), format!("{:?}", Some(reject))]);
    }
}
