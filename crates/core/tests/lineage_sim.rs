//! Seeded simulation of what two sides of a pair decide when they connect (rule 5: never
//! resync in the wrong direction), driven by the core's generations and [`plan`].
//!
//! Two volumes of a few blocks, each block holding the id of the write that put it there.
//! A seeded scheduler, on a virtual clock, interleaves: writes on whichever side takes
//! them, a network that replicates, drops what is in flight, cuts and heals, production
//! crashes (its bitmap comes back over-marked, as the activity log replays), forced
//! promotions of the DR side, pair deletes and re-creates, and the operator resolving a
//! divergence towards a random side. At every connection the plan is checked against the
//! ground truth:
//!
//! - a copy (catch-up, finish or full sync) never overwrites a write only the DR side has,
//!   unless the operator chose to discard it;
//! - a catch-up's bitmap covers every block where the sides differ;
//! - a divergence is reported only when the DR side holds a write production lacks;
//! - after the network heals and divergences are resolved, the copies converge.
//!
//! A failure prints its seed; `BLOCKREP_SEED=n` replays one, `BLOCKREP_SIM_SEEDS` sets how
//! many run.

use std::collections::BTreeSet;

use blockrep_core::replication::lineage::{
    Divergence, DrView, FullSyncReason, GenerationId, Lineage, Plan, ProductionView, plan,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BLOCKS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Production,
    Dr,
}

/// One side: its data (write id per block), its lineage, and (production) its bitmap.
#[derive(Clone, Debug)]
struct Volume {
    /// Which volume this is ('A' or 'B'): sides swap, volumes do not.
    name: char,
    data: [u64; BLOCKS],
    lineage: Lineage,
    dirty: BTreeSet<usize>,
    /// Every write id this volume ever held.
    seen: BTreeSet<u64>,
}

impl Volume {
    fn put(&mut self, block: usize, id: u64) {
        self.data[block] = id;
        self.seen.insert(id);
    }
}

struct Sim {
    rng: SmallRng,
    clock: u64,
    next_write: u64,
    next_generation: u64,
    /// Which volume each write id was made on.
    origin: std::collections::HashMap<u64, char>,
    /// `p` is the production side, `d` the DR side (they swap when a resolve keeps DR).
    p: Volume,
    d: Volume,
    paired: bool,
    /// The DR side was promoted while the pair exists (its writes go on locally).
    d_promoted: bool,
    link_up: bool,
    connected: bool,
    full_sync_done: bool,
    d_consistent: bool,
    discard_peer: bool,
    diverged: bool,
    /// Writes on their way to the DR side: (block, write id).
    in_flight: Vec<(usize, u64)>,
    /// Writes the operator discarded by resolving a divergence towards the other side: a
    /// later copy over them is the operator's choice, whatever the pair went through since
    /// (a delete and re-create forgets `discard_peer`, not the choice).
    discarded: BTreeSet<u64>,
    log: Vec<String>,
    /// How often each kind of decision came up.
    decisions: std::collections::BTreeMap<&'static str, u64>,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut sim = Self {
            rng: SmallRng::seed_from_u64(seed),
            clock: 0,
            next_write: 1,
            next_generation: 1,
            origin: Default::default(),
            p: Volume {
                name: 'A',
                data: [0; BLOCKS],
                lineage: Lineage::new(GenerationId(1000)),
                dirty: BTreeSet::new(),
                seen: BTreeSet::new(),
            },
            d: Volume {
                name: 'B',
                data: [0; BLOCKS],
                lineage: Lineage::new(GenerationId(2000)),
                dirty: BTreeSet::new(),
                seen: BTreeSet::new(),
            },
            paired: false,
            d_promoted: false,
            link_up: true,
            connected: false,
            full_sync_done: false,
            d_consistent: false,
            discard_peer: false,
            diverged: false,
            in_flight: Vec::new(),
            discarded: BTreeSet::new(),
            log: Vec::new(),
            decisions: Default::default(),
        };
        sim.create_pair();
        sim
    }

    fn generation(&mut self) -> GenerationId {
        self.next_generation += 1;
        GenerationId(self.next_generation)
    }

    fn note(&mut self, what: String) {
        self.log.push(format!("t={} {what}", self.clock));
    }

    fn create_pair(&mut self) {
        let g = self.generation();
        self.p.lineage.begin(g);
        self.paired = true;
        self.d_promoted = false;
        self.connected = false;
        self.full_sync_done = false;
        self.d_consistent = false;
        self.discard_peer = false;
        self.diverged = false;
        self.note("pair created".into());
    }

    fn delete_pair(&mut self) {
        let (gp, gd) = (self.generation(), self.generation());
        self.p.lineage.begin(gp);
        self.d.lineage.begin(gd);
        self.paired = false;
        self.connected = false;
        self.in_flight.clear();
        self.note("pair deleted".into());
    }

    fn write(&mut self, side: Origin) {
        let block = self.rng.random_range(0..BLOCKS);
        let id = self.next_write;
        self.next_write += 1;
        let volume = match side {
            Origin::Production => self.p.name,
            Origin::Dr => self.d.name,
        };
        self.origin.insert(id, volume);
        match side {
            Origin::Production => {
                self.p.put(block, id);
                self.p.lineage.mark_written();
                self.p.dirty.insert(block);
                if self.connected {
                    self.in_flight.push((block, id));
                }
            }
            Origin::Dr => {
                self.d.put(block, id);
                self.d.lineage.mark_written();
            }
        }
        self.note(format!("{side:?} writes #{id} to block {block}"));
    }

    /// The network delivers the oldest write in flight; the bit clears if nothing wrote
    /// the block since (the ticket).
    fn deliver(&mut self) {
        if self.in_flight.is_empty() {
            return;
        }
        let (block, id) = self.in_flight.remove(0);
        self.d.put(block, id);
        if self.p.data[block] == id {
            self.p.dirty.remove(&block);
        }
    }

    fn disconnect(&mut self) {
        self.connected = false;
        self.in_flight.clear();
    }

    /// Blocks holding a write the DR side's volume made and production never held.
    fn dr_only_writes(&self) -> Vec<usize> {
        (0..BLOCKS)
            .filter(|&b| {
                let id = self.d.data[b];
                id != 0 && self.origin.get(&id) == Some(&self.d.name) && !self.p.seen.contains(&id)
            })
            .collect()
    }

    /// Of those, the ones no resolve discarded: a copy must not overwrite these. (A
    /// divergence over discarded writes only is still allowed: a re-created pair asks the
    /// operator again.)
    fn dr_only_writes_kept(&self) -> Vec<usize> {
        self.dr_only_writes()
            .into_iter()
            .filter(|&b| !self.discarded.contains(&self.d.data[b]))
            .collect()
    }

    fn connect(&mut self) -> Result<(), String> {
        let decision = plan(
            ProductionView {
                lineage: &self.p.lineage,
                dirty: !self.p.dirty.is_empty(),
                full_sync_done: self.full_sync_done,
                discard_peer: self.discard_peer,
            },
            DrView {
                lineage: &self.d.lineage,
                consistent: self.d_consistent,
            },
        );
        self.note(format!("connect: {decision:?}"));
        let kind = match decision {
            Plan::CatchUp => "catch-up",
            Plan::FinishSync => "finish sync",
            Plan::FullSync(FullSyncReason::Initial) => "full sync (initial)",
            Plan::FullSync(FullSyncReason::OlderGeneration(_)) => "full sync (older generation)",
            Plan::FullSync(FullSyncReason::Resolved) => "full sync (resolved)",
            Plan::Diverged(Divergence::SplitBrain { .. }) => "split brain",
            Plan::Diverged(Divergence::DrNewer { .. }) => "DR newer",
            Plan::Diverged(Divergence::Unrelated { .. }) => "unrelated",
        };
        *self.decisions.entry(kind).or_insert(0) += 1;
        let dr_only = self.dr_only_writes();
        let dr_kept = self.dr_only_writes_kept();
        let copies = !matches!(decision, Plan::Diverged(_));
        // Creating a pair replaces the DR volume's data when it never shared a generation
        // with production (unrelated data); the operator chose it as the DR volume.
        let ids = |l: &Lineage| -> BTreeSet<u64> {
            l.history
                .iter()
                .chain([&l.current])
                .map(|g| g.id.0)
                .collect()
        };
        let unrelated = ids(&self.p.lineage).is_disjoint(&ids(&self.d.lineage));
        let allowed = match decision {
            Plan::FullSync(FullSyncReason::Resolved) => true,
            Plan::FullSync(FullSyncReason::Initial) => unrelated,
            _ => false,
        };
        if copies && !dr_kept.is_empty() && !allowed {
            return Err(format!(
                "{decision:?} would overwrite DR-only writes in blocks {dr_kept:?} (production {} {:?} {:?}, DR {} {:?} {:?})",
                self.p.name, self.p.data, self.p.lineage, self.d.name, self.d.data, self.d.lineage
            ));
        }
        if let Plan::Diverged(d) = decision {
            if dr_only.is_empty() {
                return Err(format!(
                    "{d:?} reported, but the DR side holds nothing of its own"
                ));
            }
            if matches!(d, Divergence::DrNewer { .. })
                && (0..BLOCKS)
                    .any(|b| self.p.data[b] != self.d.data[b] && self.p.dirty.contains(&b))
            {
                return Err("DrNewer reported while production holds unsent writes".into());
            }
            self.diverged = true;
            return Ok(());
        }
        if matches!(decision, Plan::CatchUp | Plan::FinishSync) {
            for b in 0..BLOCKS {
                if self.p.data[b] != self.d.data[b] && !self.p.dirty.contains(&b) {
                    return Err(format!(
                        "{decision:?}: block {b} differs (#{} vs #{}) but is clean",
                        self.p.data[b], self.d.data[b]
                    ));
                }
            }
        }
        // Copy: the DR side adopts production's generation and gets its data.
        self.d.lineage.adopt(self.p.lineage.current.id);
        let blocks: Vec<usize> = match decision {
            Plan::FullSync(_) => (0..BLOCKS).collect(),
            _ => self.p.dirty.iter().copied().collect(),
        };
        for b in blocks {
            let id = self.p.data[b];
            self.d.put(b, id);
        }
        self.p.dirty.clear();
        self.full_sync_done = true;
        self.d_consistent = true;
        self.discard_peer = false;
        self.d_promoted = false;
        self.connected = true;
        Ok(())
    }

    /// The operator keeps one side of a diverged pair.
    fn resolve(&mut self) {
        let keep_dr = self.rng.random_bool(0.5);
        self.note(format!(
            "resolve keeping {}",
            if keep_dr { "DR" } else { "production" }
        ));
        let (kept, dropped) = if keep_dr {
            (&self.d, &self.p)
        } else {
            (&self.p, &self.d)
        };
        let lost: Vec<u64> = dropped
            .data
            .iter()
            .copied()
            .filter(|id| *id != 0 && !kept.seen.contains(id))
            .collect();
        // What the kept side holds is kept, whatever an earlier resolve said of it.
        let kept_ids: Vec<u64> = kept.data.to_vec();
        self.discarded.extend(lost);
        for id in kept_ids {
            self.discarded.remove(&id);
        }
        if keep_dr {
            std::mem::swap(&mut self.p, &mut self.d);
            self.d.dirty.clear();
            let g = self.generation();
            self.p.lineage.begin(g);
            self.d_consistent = false;
        }
        self.discard_peer = true;
        self.diverged = false;
        self.d_promoted = false;
    }

    fn step(&mut self) -> Result<(), String> {
        self.clock += 1 + self.rng.random_range(0..5);
        match self.rng.random_range(0..100) {
            0..35 => self.write(Origin::Production),
            35..55 => {
                for _ in 0..self.rng.random_range(1..4) {
                    self.deliver();
                }
            }
            55..60 => {
                // Lost in flight: the blocks stay dirty.
                self.in_flight.clear();
                self.disconnect();
                self.note("stream broke".into());
            }
            60..65 => {
                self.link_up = !self.link_up;
                if !self.link_up {
                    self.disconnect();
                }
                self.note(format!(
                    "link {}",
                    if self.link_up { "healed" } else { "cut" }
                ));
            }
            65..68 => {
                // Production crashes: the activity log over-marks, the lineage survives.
                self.disconnect();
                let extra = self.rng.random_range(0..BLOCKS);
                self.p.dirty.insert(extra);
                self.note(format!("production crashed; block {extra} replayed dirty"));
            }
            68..71 if self.paired && !self.d_promoted && !self.connected => {
                let g = self.generation();
                self.d.lineage.begin(g);
                self.d_promoted = true;
                self.note("DR side promoted".into());
            }
            71..80 if self.d_promoted || !self.paired => self.write(Origin::Dr),
            80..82 if self.paired && !self.diverged => {
                self.delete_pair();
            }
            82..86 if !self.paired => self.create_pair(),
            86..90 if self.diverged => self.resolve(),
            _ => {}
        }
        if self.paired && self.link_up && !self.connected && !self.diverged && !self.d_promoted {
            self.connect()?;
        }
        Ok(())
    }

    /// Heal everything; resolve what diverged; the copies must end equal.
    fn settle(&mut self) -> Result<(), String> {
        self.link_up = true;
        if !self.paired {
            self.create_pair();
        }
        for _ in 0..4 {
            if self.diverged {
                self.resolve();
            }
            self.d_promoted = false;
            if !self.connected {
                self.connect()?;
            }
            while !self.in_flight.is_empty() {
                self.deliver();
            }
            if !self.diverged {
                break;
            }
        }
        if self.p.data != self.d.data {
            return Err(format!(
                "did not converge: {:?} vs {:?}",
                self.p.data, self.d.data
            ));
        }
        Ok(())
    }
}

type Decisions = std::collections::BTreeMap<&'static str, u64>;

fn run(seed: u64) -> Result<Decisions, (String, Vec<String>)> {
    let mut sim = Sim::new(seed);
    for _ in 0..400 {
        if let Err(e) = sim.step() {
            return Err((e, sim.log));
        }
    }
    sim.settle().map_err(|e| (e, sim.log.clone()))?;
    Ok(sim.decisions)
}

#[test]
fn connections_never_resync_in_the_wrong_direction() {
    let seeds: Vec<u64> = match std::env::var("BLOCKREP_SEED") {
        Ok(s) => vec![s.parse().expect("BLOCKREP_SEED is a number")],
        Err(_) => (0..std::env::var("BLOCKREP_SIM_SEEDS")
            .map(|n| n.parse().expect("BLOCKREP_SIM_SEEDS is a number"))
            .unwrap_or(500))
            .collect(),
    };
    // A replay or a short run need not reach every kind of decision.
    let check_coverage = seeds.len() >= 100;
    let mut total = Decisions::new();
    for seed in seeds {
        match run(seed) {
            Ok(decisions) => {
                for (kind, n) in decisions {
                    *total.entry(kind).or_insert(0) += n;
                }
            }
            Err((e, log)) => {
                let tail = log[log.len().saturating_sub(30)..].join("\n  ");
                panic!("seed {seed} (replay with BLOCKREP_SEED={seed}): {e}\n  {tail}");
            }
        }
    }
    eprintln!("decisions checked: {total:?}");
    if !check_coverage {
        return;
    }
    // Every kind of decision the simulation can reach came up.
    for kind in [
        "catch-up",
        "full sync (initial)",
        "full sync (older generation)",
        "full sync (resolved)",
        "split brain",
        "DR newer",
    ] {
        assert!(
            total.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} in the run"
        );
    }
}

/// The checks above can fail: a plan that ignores generations and always catches up is
/// caught overwriting DR-only writes.
#[test]
fn a_plan_blind_to_generations_is_caught() {
    let mut caught = false;
    for seed in 0..200 {
        let mut sim = Sim::new(seed);
        for _ in 0..400 {
            if sim.step().is_err() {
                break;
            }
            // Blind: pretend the DR side never moved on.
            if sim.d_promoted && !sim.dr_only_writes().is_empty() {
                sim.d.lineage = sim.p.lineage.clone();
                sim.d_promoted = false;
                if sim.connect().is_err() {
                    caught = true;
                }
                break;
            }
        }
        if caught {
            break;
        }
    }
    assert!(caught, "no seed exposed a plan blind to generations");
}
