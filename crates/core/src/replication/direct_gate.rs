//! The DR side's gate for the direct writes of a hypermetro group's pair (docs/GROUPS.md,
//! "Hypermetro: the group trip and the way back").
//!
//! When a group goes back to synchronous, each pair's first direct writes are *gated*: they
//! may not reach the DR volume before the journaled epochs that came before them, on every
//! pair of the group, are applied — or a failover could find a direct write whose
//! predecessor (journaled on another pair) is missing. The coordinator's release of the direct
//! cut tells each production side, which sends `Ungate(S)`: the gated writes may go once
//! epoch `S` is applied here.
//!
//! ```text
//!  gated direct write ─► aside (waits for an Ungate that comes after it)
//!  direct write ───────► aside while anything is aside, or an Ungate's epoch is not applied
//!  flush, verify ──────► aside while anything is aside (they answer for what came before)
//!  Ungate(S) and S applied ─► everything aside goes, in order, gated no more
//! ```
//!
//! Journaled writes, seals and commits never wait here: they are staged and applied by the
//! group's commits, which is what the writes aside wait for.

use std::collections::VecDeque;

use super::Epoch;

/// What an incoming command is, for the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gating {
    /// A direct write sent gated.
    Gated,
    /// A direct write sent ungated.
    Direct,
    /// A flush or verify: it answers for the writes before it.
    Ordered,
}

/// Commands held aside, unwritten and unanswered, and the stream's last `Ungate`.
#[derive(Debug)]
pub struct DirectGate<T> {
    aside: VecDeque<T>,
    ungate: Option<Epoch>,
}

impl<T> Default for DirectGate<T> {
    fn default() -> Self {
        Self {
            aside: VecDeque::new(),
            ungate: None,
        }
    }
}

impl<T> DirectGate<T> {
    /// Whether a command of kind `gating` must wait aside now. `applied` is the last epoch
    /// applied (`None` while a unit is being applied).
    pub fn must_wait(&self, gating: Gating, applied: Option<Epoch>) -> bool {
        !self.aside.is_empty()
            || match gating {
                Gating::Gated => true,
                Gating::Direct => self.ungate.is_some() && !self.open(applied),
                Gating::Ordered => false,
            }
    }

    /// Keeps a command that must wait, after those already aside.
    pub fn set_aside(&mut self, gating: Gating, cmd: T) {
        if gating == Gating::Gated {
            // It waits for an Ungate that comes after it: one before was for an earlier gate.
            self.ungate = None;
        }
        self.aside.push_back(cmd);
    }

    /// The stream's `Ungate(epoch)`.
    pub fn ungate(&mut self, epoch: Epoch) {
        self.ungate = Some(self.ungate.map_or(epoch, |e| e.max(epoch)));
    }

    /// Everything aside, in order, once the last `Ungate`'s epoch is applied (its writes are
    /// gated no more); empty otherwise.
    pub fn let_go(&mut self, applied: Option<Epoch>) -> VecDeque<T> {
        if self.aside.is_empty() || !self.open(applied) {
            return VecDeque::new();
        }
        std::mem::take(&mut self.aside)
    }

    pub fn is_empty(&self) -> bool {
        self.aside.is_empty()
    }

    fn open(&self, applied: Option<Epoch>) -> bool {
        matches!((self.ungate, applied), (Some(u), Some(a)) if a >= u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command back if it may go now; else it waits aside.
    fn offer(
        gate: &mut DirectGate<u32>,
        gating: Gating,
        cmd: u32,
        applied: Option<Epoch>,
    ) -> Option<u32> {
        if gate.must_wait(gating, applied) {
            gate.set_aside(gating, cmd);
            return None;
        }
        Some(cmd)
    }

    #[test]
    fn gated_writes_wait_for_an_ungate_after_them_and_their_epoch_applied() {
        let mut gate = DirectGate::default();
        // An Ungate before a gated write is for an earlier gate.
        gate.ungate(Epoch(3));
        assert_eq!(offer(&mut gate, Gating::Gated, 1, Some(Epoch(9))), None);
        // What follows waits behind it, in order.
        assert_eq!(offer(&mut gate, Gating::Direct, 2, Some(Epoch(9))), None);
        assert_eq!(offer(&mut gate, Gating::Ordered, 3, Some(Epoch(9))), None);
        assert!(gate.let_go(Some(Epoch(9))).is_empty());
        gate.ungate(Epoch(10));
        assert!(gate.let_go(Some(Epoch(9))).is_empty());
        assert!(gate.let_go(None).is_empty(), "a unit is being applied");
        assert_eq!(Vec::from(gate.let_go(Some(Epoch(10)))), vec![1, 2, 3]);
        assert!(gate.is_empty());
        assert_eq!(
            offer(&mut gate, Gating::Direct, 4, Some(Epoch(10))),
            Some(4)
        );
    }

    #[test]
    fn a_direct_write_after_an_ungate_waits_for_its_epoch() {
        let mut gate = DirectGate::default();
        assert_eq!(
            offer(&mut gate, Gating::Direct, 1, Some(Epoch(2))),
            Some(1),
            "never gated"
        );
        gate.ungate(Epoch(5));
        assert_eq!(offer(&mut gate, Gating::Direct, 2, Some(Epoch(4))), None);
        assert_eq!(offer(&mut gate, Gating::Ordered, 3, Some(Epoch(4))), None);
        assert_eq!(Vec::from(gate.let_go(Some(Epoch(5)))), vec![2, 3]);
        assert_eq!(
            offer(&mut gate, Gating::Ordered, 4, Some(Epoch(5))),
            Some(4)
        );
    }
}
