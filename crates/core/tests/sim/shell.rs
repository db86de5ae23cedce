//! What a simulation that drives the production machine needs of its shell: the payload
//! (a value per block), the blocks a range covers, and the catch-up's unsent runs.

use blockrep_core::ByteRange;
use blockrep_core::dirty_map::DirtyMap;
use blockrep_core::replication::{PayloadLen, TicketRegistry};

pub const BLOCK: u64 = 4096;

/// A write's data: the value each block it covers takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value(pub Vec<u64>);

impl PayloadLen for Value {
    fn payload_len(&self) -> u64 {
        self.0.len() as u64 * BLOCK
    }
}

/// The blocks `range` covers.
pub fn blocks(range: ByteRange) -> std::ops::Range<u64> {
    range.offset / BLOCK..range.end() / BLOCK
}

/// Dirty runs minus the unspoiled parts of live tickets (what the tracker's `unsent_runs`
/// computes).
pub fn unsent_runs(dirty: &DirtyMap, tickets: &TicketRegistry) -> Vec<ByteRange> {
    let sent = tickets.unspoiled_ranges();
    let mut out = Vec::new();
    for run in dirty.runs() {
        let mut at = run.offset;
        for s in sent
            .iter()
            .filter(|s| s.end() > run.offset && s.offset < run.end())
        {
            if s.offset > at {
                out.push(ByteRange::new(at, s.offset - at));
            }
            at = at.max(s.end());
        }
        if at < run.end() {
            out.push(ByteRange::new(at, run.end() - at));
        }
    }
    out
}
