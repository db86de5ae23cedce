//! A link's online verify probes, from the production side: each waits for the DR side's
//! answer, and a write admitted into its range after the read spoils it (the runner that
//! reads and queues them is `blockrep_replication::verify`).

use std::collections::HashMap;

use crate::ByteRange;
use crate::replication::ProbeId;

/// Bytes each CRC covers: the granularity differences are reported at.
pub const VERIFY_BLOCK: u32 = 64 << 10;
/// A probe on its way: production's CRCs of `range`, in `VERIFY_BLOCK` blocks.
#[derive(Debug)]
pub struct Probe {
    pub range: ByteRange,
    pub crcs: Vec<u32>,
    /// Blocks dirty on production when read: not compared.
    pub skip: Vec<bool>,
    /// A write was admitted into the range after the read.
    pub spoiled: bool,
}

/// What the DR side's answer to a probe says.
#[derive(Debug, PartialEq, Eq)]
pub enum ProbeResult {
    /// The blocks compared, and the ranges among them that differ.
    Compared { differing: Vec<ByteRange> },
    /// Written since the read, or lost with the stream: take it again.
    Inconclusive,
}

/// The probes of a link: waiting for answers, and answered.
#[derive(Debug, Default)]
pub struct Probes {
    live: HashMap<ProbeId, Probe>,
    done: Vec<(ProbeId, ProbeResult)>,
}

impl Probes {
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub fn insert(&mut self, id: ProbeId, probe: Probe) {
        self.live.insert(id, probe);
    }

    pub fn get(&self, id: ProbeId) -> Option<&Probe> {
        self.live.get(&id)
    }

    /// A write was admitted into `range`.
    pub fn spoil(&mut self, range: ByteRange) {
        for probe in self.live.values_mut() {
            if probe.range.overlaps(&range) {
                probe.spoiled = true;
            }
        }
    }

    /// The stream dropped what was queued: no live probe will be answered.
    pub fn lose_all(&mut self) {
        for (id, _) in self.live.drain() {
            self.done.push((id, ProbeResult::Inconclusive));
        }
    }

    /// The DR side's answer: the indices of the blocks whose CRC differs there.
    pub fn answer(&mut self, id: ProbeId, differing: &[u16]) {
        let Some(probe) = self.live.remove(&id) else {
            return;
        };
        let result = if probe.spoiled {
            ProbeResult::Inconclusive
        } else {
            let block = u64::from(VERIFY_BLOCK);
            ProbeResult::Compared {
                differing: differing
                    .iter()
                    .map(|&i| usize::from(i))
                    .filter(|&i| i < probe.crcs.len() && !probe.skip[i])
                    .map(|i| {
                        let offset = probe.range.offset + i as u64 * block;
                        ByteRange::new(offset, block.min(probe.range.end() - offset))
                    })
                    .collect(),
            }
        };
        self.done.push((id, result));
    }

    pub fn take_done(&mut self) -> Vec<(ProbeId, ProbeResult)> {
        std::mem::take(&mut self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(range: ByteRange, skip: Vec<bool>) -> Probe {
        Probe {
            range,
            crcs: vec![0; skip.len()],
            skip,
            spoiled: false,
        }
    }

    #[test]
    fn answers_name_differing_clean_blocks_only() {
        let mut probes = Probes::default();
        let block = u64::from(VERIFY_BLOCK);
        probes.insert(
            ProbeId(1),
            probe(ByteRange::new(0, 3 * block), vec![false, true, false]),
        );
        probes.answer(ProbeId(1), &[1, 2]);
        assert_eq!(
            probes.take_done(),
            vec![(
                ProbeId(1),
                ProbeResult::Compared {
                    differing: vec![ByteRange::new(2 * block, block)]
                }
            )]
        );
    }

    #[test]
    fn a_write_after_the_read_makes_the_probe_inconclusive() {
        let mut probes = Probes::default();
        probes.insert(
            ProbeId(1),
            probe(ByteRange::new(0, 1 << 20), vec![false; 16]),
        );
        probes.insert(
            ProbeId(2),
            probe(ByteRange::new(1 << 20, 1 << 20), vec![false; 16]),
        );
        probes.spoil(ByteRange::new(4096, 4096));
        probes.answer(ProbeId(1), &[]);
        probes.answer(ProbeId(2), &[]);
        assert_eq!(
            probes.take_done(),
            vec![
                (ProbeId(1), ProbeResult::Inconclusive),
                (ProbeId(2), ProbeResult::Compared { differing: vec![] })
            ]
        );
    }

    #[test]
    fn lost_probes_are_inconclusive() {
        let mut probes = Probes::default();
        probes.insert(ProbeId(7), probe(ByteRange::new(0, 4096), vec![false]));
        probes.lose_all();
        probes.answer(ProbeId(7), &[0]);
        assert_eq!(
            probes.take_done(),
            vec![(ProbeId(7), ProbeResult::Inconclusive)]
        );
    }
}
