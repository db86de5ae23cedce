//! Online verify: the production side compares CRCs of its blocks with the DR side's while
//! the pair replicates, and can have the blocks that differ copied again.
//!
//! The runner reads a chunk of the volume with its blocks locked through the write gate, so
//! no write to them is in flight, and queues a *probe* (the blocks' CRCs) on the link, in
//! stream order behind every write admitted before the read. The DR side compares once
//! those writes are on its volume: at once for direct replication, or right after the unit
//! of the probe's epoch is applied for epochs. A probe is only conclusive for:
//!
//! - blocks clean on production when read (a dirty block may legitimately differ: a resync
//!   will copy it), and
//! - a chunk nothing wrote since the read. A write admitted later spoils the probe (the DR
//!   side may compare after applying it), which is then taken again, up to
//!   [`MAX_ATTEMPTS`] times, and otherwise reported as not verified.
//!
//! With repair, the blocks found different are marked dirty (durably, like a write) and a
//! catch-up copies them from production.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockrep_core::ByteRange;
use blockrep_core::pair::probes::{Probe, ProbeResult, VERIFY_BLOCK};
use blockrep_core::replication::ProbeId;
use blockrep_volume::{AlignedBuf, DIRECT_IO_ALIGN, Volume, Waker};
use blockrep_wire::block_crcs;

use crate::link::PairLink;

/// Blocks per probe.
const BLOCKS_PER_PROBE: u64 = 64;
/// Probes waiting for the DR side at once.
const MAX_OUTSTANDING: usize = 8;
/// Times a chunk is read again after a write spoiled its probe.
pub const MAX_ATTEMPTS: u32 = 4;
/// A probe with no answer after this long is taken again.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Differing ranges listed in the status (all are repaired).
const MAX_LISTED: usize = 1000;

/// A verify as `pair show` and the coordinator see it.
#[derive(Clone, Debug, Default)]
pub struct VerifyStatus {
    pub job_id: String,
    pub progress: f64,
    pub done: bool,
    pub error: String,
    pub differing: Vec<ByteRange>,
    pub differing_bytes: u64,
    pub repairing: bool,
    pub verified_bytes: u64,
    /// Bytes not compared: dirty on production, or written on every attempt.
    pub unverified_bytes: u64,
    /// The differing ranges were copied again.
    pub repaired: bool,
}

impl VerifyStatus {
    /// Bytes compared or given up on.
    fn done_bytes(&self) -> u64 {
        self.verified_bytes + self.unverified_bytes
    }
}

/// Runs one verify of a pair's production volume.
pub struct VerifyRunner {
    pub volume: Arc<Volume>,
    pub link: Arc<PairLink>,
    pub status: Arc<Mutex<VerifyStatus>>,
    pub repair: bool,
    pub stop: Arc<AtomicBool>,
}

struct Outstanding {
    range: ByteRange,
    attempt: u32,
    sent: Instant,
    /// Bytes of the range left out for being dirty.
    skipped: u64,
}

impl VerifyRunner {
    /// Compares the whole volume, then repairs if asked; records the end in the status.
    pub fn run(self) {
        let outcome = self.compare_all().and_then(|differing| {
            if self.repair && !differing.is_empty() {
                self.repair(&differing)?;
                self.lock_status().repaired = true;
            }
            Ok(())
        });
        let mut status = self.lock_status();
        if let Err(e) = outcome {
            status.error = e;
        }
        status.repairing = false;
        status.done = true;
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, VerifyStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn compare_all(&self) -> Result<Vec<ByteRange>, String> {
        let waker = Arc::new(Waker::new().map_err(|e| e.to_string())?);
        let size = self.volume.size();
        let chunk = u64::from(VERIFY_BLOCK) * BLOCKS_PER_PROBE;
        let mut todo: Vec<(ByteRange, u32)> = (0..size.div_ceil(chunk))
            .rev()
            .map(|i| {
                let offset = i * chunk;
                (ByteRange::new(offset, chunk.min(size - offset)), 0)
            })
            .collect();
        let mut outstanding: HashMap<ProbeId, Outstanding> = HashMap::new();
        let mut differing = Vec::new();
        let mut next_id = ProbeId(1);
        while !todo.is_empty() || !outstanding.is_empty() {
            if self.stopped() {
                return Err("the pair stopped during the verify".into());
            }
            while outstanding.len() < MAX_OUTSTANDING
                && let Some((range, attempt)) = todo.pop()
            {
                if attempt >= MAX_ATTEMPTS {
                    let mut status = self.lock_status();
                    status.unverified_bytes += range.len;
                    status.progress = status.done_bytes() as f64 / size as f64;
                    continue;
                }
                let id = next_id;
                next_id = ProbeId(next_id.0 + 1);
                match self.probe(id, range, &waker)? {
                    Some(skipped) => {
                        outstanding.insert(
                            id,
                            Outstanding {
                                range,
                                attempt: attempt + 1,
                                sent: Instant::now(),
                                skipped,
                            },
                        );
                    }
                    None => {
                        // Nothing reaches the DR side now (link down, bitmap mode): later.
                        todo.push((range, attempt));
                        break;
                    }
                }
            }
            for (id, result) in self.link.wait_verify_results(Duration::from_millis(200)) {
                let Some(o) = outstanding.remove(&id) else {
                    continue;
                };
                match result {
                    ProbeResult::Compared { differing: found } => {
                        let mut status = self.lock_status();
                        status.verified_bytes += o.range.len - o.skipped;
                        status.unverified_bytes += o.skipped;
                        status.progress = status.done_bytes() as f64 / size as f64;
                        for r in found {
                            status.differing_bytes += r.len;
                            if status.differing.len() < MAX_LISTED {
                                status.differing.push(r);
                            }
                            differing.push(r);
                        }
                    }
                    ProbeResult::Inconclusive => todo.push((o.range, o.attempt)),
                }
            }
            let expired: Vec<ProbeId> = outstanding
                .iter()
                .filter(|(_, o)| o.sent.elapsed() > ANSWER_TIMEOUT)
                .map(|(&id, _)| id)
                .collect();
            for id in expired {
                let o = outstanding.remove(&id).expect("listed");
                todo.push((o.range, o.attempt));
            }
        }
        let mut status = self.lock_status();
        status.progress = 1.0;
        Ok(differing)
    }

    /// Reads `range` with its blocks locked and queues its probe. Returns the bytes left
    /// out for being dirty, or `None` if the link takes no probe now.
    fn probe(
        &self,
        id: ProbeId,
        range: ByteRange,
        waker: &Arc<Waker>,
    ) -> Result<Option<u64>, String> {
        let gate = self.volume.gate();
        let lock = gate
            .lock_blocking(range, waker)
            .map_err(|e| e.to_string())?;
        let result = (|| {
            let aligned = range.align_out(DIRECT_IO_ALIGN);
            let mut buf = AlignedBuf::new(aligned.len as usize);
            self.volume
                .backing()
                .read_exact_at(&mut buf, aligned.offset)
                .map_err(|e| format!("read {range}: {e}"))?;
            let start = (range.offset - aligned.offset) as usize;
            let data = &buf[start..start + range.len as usize];
            let crcs = block_crcs(data, VERIFY_BLOCK as usize);
            let tracker = self.link.tracker();
            let block = u64::from(VERIFY_BLOCK);
            let skip: Vec<bool> = (0..crcs.len() as u64)
                .map(|i| {
                    let offset = range.offset + i * block;
                    tracker.any_dirty(ByteRange::new(offset, block.min(range.end() - offset)))
                })
                .collect();
            let skipped = skip
                .iter()
                .enumerate()
                .filter(|(_, s)| **s)
                .map(|(i, _)| block.min(range.end() - (range.offset + i as u64 * block)))
                .sum();
            let probe = Probe {
                range,
                crcs,
                skip,
                spoiled: false,
            };
            Ok(self.link.push_verify(id, probe).then_some(skipped))
        })();
        gate.leave(lock);
        result
    }

    /// Marks the differing ranges dirty and waits until a catch-up has copied them.
    fn repair(&self, differing: &[ByteRange]) -> Result<(), String> {
        self.lock_status().repairing = true;
        let tracker = self.link.tracker();
        tracker
            .admit(differing)
            .map_err(|e| format!("mark the differing ranges dirty: {e}"))?;
        self.link.request_catch_up();
        while differing.iter().any(|r| tracker.any_dirty(*r)) {
            if self.stopped() {
                return Err("the pair stopped during the repair".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}
