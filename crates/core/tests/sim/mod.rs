//! What the seeded simulations share: events on a virtual clock, the faults they inject,
//! the hosts' names, the production machine's shell, and the group harness.

// Several test binaries share this module, each using part of it.
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Range;

use blockrep_core::replication::group_cut::CutMessage;
use rand::Rng;

pub mod group;
pub mod shell;

/// Events due at virtual times (ms); events due at the same time come in the order they
/// were scheduled.
pub struct Clock<E> {
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: Vec<Option<E>>,
}

impl<E> Clock<E> {
    pub fn new() -> Self {
        Self {
            now: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
        }
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn at(&mut self, when: u64, event: E) {
        self.events.push(Some(event));
        self.queue
            .push(Reverse((when, self.events.len() as u64 - 1)));
    }

    pub fn after(&mut self, delay: u64, event: E) {
        self.at(self.now + delay, event);
    }

    /// The next event due no later than `end`; the clock moves to it.
    pub fn next(&mut self, end: u64) -> Option<E> {
        let Reverse((when, index)) = self.queue.pop()?;
        if when > end {
            return None;
        }
        self.now = when;
        self.events[index as usize].take()
    }
}

/// The seeds to run: `BLOCKREP_SEED` replays one; else `BLOCKREP_SIM_SEEDS` of them (by
/// default `default`), from 0.
pub fn seeds(default: u64) -> Vec<u64> {
    if let Ok(seed) = std::env::var("BLOCKREP_SEED") {
        return vec![seed.parse().expect("BLOCKREP_SEED is a number")];
    }
    let n = std::env::var("BLOCKREP_SIM_SEEDS")
        .map(|n| n.parse().expect("BLOCKREP_SIM_SEEDS is a number"))
        .unwrap_or(default);
    (0..n).collect()
}

/// The simulated hosts are named `host-<index>`.
pub fn host_name(index: usize) -> String {
    format!("host-{index}")
}

/// The index of the host a coordinator message is for.
pub fn host_of(message: &CutMessage) -> usize {
    let (CutMessage::Cut { host, .. } | CutMessage::Release { host, .. }) = message;
    host.strip_prefix("host-")
        .and_then(|n| n.parse().ok())
        .expect("a host name")
}

/// A fault a simulation injects.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    HostCrash(usize),
    CoordinatorCrash,
    LinkCut(usize),
}

/// When faults come and which: one every `gap_ms` from `first_ms` until `until_ms`, each of
/// `kinds` equally likely draws: a host crash, a coordinator crash, or (the rest) a link
/// cut; the host drawn among `hosts`.
pub struct FaultPlan {
    pub hosts: usize,
    pub first_ms: u64,
    pub until_ms: u64,
    pub gap_ms: Range<u64>,
    pub kinds: u32,
}

impl FaultPlan {
    /// Schedules the faults on `clock`, as the simulation's events.
    pub fn schedule<E: From<Fault>>(&self, rng: &mut impl Rng, clock: &mut Clock<E>) {
        for (t, fault) in self.draw(rng) {
            clock.at(t, fault.into());
        }
    }

    /// The faults at their seeded moments.
    pub fn draw(&self, rng: &mut impl Rng) -> Vec<(u64, Fault)> {
        let mut faults = Vec::new();
        let mut t = self.first_ms;
        while t < self.until_ms {
            let fault = match rng.random_range(0..self.kinds) {
                0 => Fault::HostCrash(rng.random_range(0..self.hosts)),
                1 => Fault::CoordinatorCrash,
                _ => Fault::LinkCut(rng.random_range(0..self.hosts)),
            };
            faults.push((t, fault));
            t += rng.random_range(self.gap_ms.clone());
        }
        faults
    }
}
