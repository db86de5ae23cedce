//! The checks after every event.

use super::*;

impl Sim {
    /// A DR volume's block changes: the record whose write owns it may join or leave what
    /// a failover finds.
    pub(super) fn set_dr_block(&mut self, h: usize, b: u64, value: u64) {
        let before = self.drs[h].image[b as usize];
        self.drs[h].image[b as usize] = value;
        let w = self.owners[h][b as usize];
        if w == usize::MAX {
            return;
        }
        let write = &self.writes[w];
        if (before == write.value) != (value == write.value) {
            self.touched.insert((write.chain, write.record));
        }
    }

    /// The group's commit: the highest any DR side or the coordinator knows.
    pub(super) fn commit_known(&self) -> Epoch {
        self.drs
            .iter()
            .map(|d| d.allowed)
            .max()
            .unwrap_or(Epoch::ZERO)
            .max(self.cut.committed())
    }

    /// What a failover would give (each DR volume, and the sealed units of its stage log up
    /// to the group's commit) holds, for each chain, a prefix of its records.
    pub(super) fn check(&mut self) -> Result<(), String> {
        if let Some(failure) = self.undo_failure.take() {
            return Err(failure);
        }
        let commit = self.commit_known();
        let mut in_logs = BTreeSet::new();
        for (h, dr) in self.drs.iter().enumerate() {
            let keep = commit.min(dr.last_seal);
            for (_, b, v, _) in dr.staged.iter().filter(|(e, ..)| *e <= keep) {
                let w = self.owners[h][*b as usize];
                if w != usize::MAX && self.writes[w].value == *v {
                    in_logs.insert(w);
                }
            }
        }
        let changed = in_logs.symmetric_difference(&self.in_logs);
        let changed: Vec<_> = changed
            .map(|&w| (self.writes[w].chain, self.writes[w].record))
            .collect();
        self.touched.extend(changed);
        self.in_logs = in_logs;
        let touched = std::mem::take(&mut self.touched);
        for (chain, record) in touched {
            let present = self.present(chain, record);
            if present && record > 0 && !self.present(chain, record - 1) {
                return Err(self.gap(chain, record, commit));
            }
            if !present && self.present(chain, record + 1) {
                return Err(self.gap(chain, record + 1, commit));
            }
        }
        for (h, host) in self.hosts.iter().enumerate() {
            if host.up
                && let Err(broken) = host.machine.check_invariants()
            {
                return Err(format!("at {} ms host {h}: {broken}", self.clock.now()));
            }
        }
        for (h, dr) in self.drs.iter().enumerate() {
            if let Err(broken) = dr.side.check_invariants() {
                return Err(format!(
                    "at {} ms host {h}'s DR side: {broken}",
                    self.clock.now()
                ));
            }
        }
        Ok(())
    }

    /// Whether a failover finds record `record` of `chain`: the write whose answer let the
    /// next record be issued, once one was answered (an earlier attempt, lost in a crash,
    /// does not stand for it); before, any attempt.
    pub(super) fn present(&self, chain: usize, record: u64) -> bool {
        let Some(attempts) = self.attempts[chain].get(record as usize) else {
            return false;
        };
        match attempts.iter().find(|&&w| self.writes[w].answered) {
            Some(&w) => self.holds(w),
            None => attempts.iter().any(|&w| self.holds(w)),
        }
    }

    /// Whether a failover finds write `w`: on its DR volume, or staged and committed.
    fn holds(&self, w: usize) -> bool {
        let write = &self.writes[w];
        self.drs[write.host].image[write.block as usize] == write.value || self.in_logs.contains(&w)
    }

    pub(super) fn gap(&self, chain: usize, record: u64, commit: Epoch) -> String {
        format!(
            "at {} ms a failover (commit {}) would hold chain {chain}'s record {record} but not record {}, answered before it was issued; {}; {}",
            self.clock.now(),
            commit.0,
            record - 1,
            self.describe(chain, record),
            self.describe(chain, record - 1)
        )
    }

    /// Where the writes of a record are, for a failure's message.
    pub(super) fn describe(&self, chain: usize, record: u64) -> String {
        let mut out = Vec::new();
        for (w, write) in self.writes.iter().enumerate() {
            if write.chain != chain || write.record != record {
                continue;
            }
            let dr = &self.drs[write.host];
            let staged: Vec<u64> = dr
                .staged
                .iter()
                .filter(|(_, b, v, _)| *b == write.block && *v == write.value)
                .map(|(e, ..)| e.0)
                .collect();
            out.push(format!(
                "record {record} is write {w} ({:?}) on host {} block {} (answered {}, on the DR volume {}, staged in {staged:?}; DR sealed {} applied {} allowed {})",
                write.kind,
                write.host,
                write.block,
                write.answered,
                dr.image[write.block as usize] == write.value,
                dr.last_seal.0,
                dr.side.applied().0,
                dr.allowed.0
            ));
        }
        out.join("; ")
    }
}
