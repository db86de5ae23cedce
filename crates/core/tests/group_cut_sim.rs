//! Seeded simulation of an async consistency group's cuts across three hosts (rule 3),
//! driving the machines the agents and the coordinator run: each production host is the
//! core's `Production` (its epochs, its answer holds, its catch-up units and their spans),
//! each DR side the applier's `DrSide` (units held until the group commits them), the
//! coordinator the core's `CutCoordinator`, cutting at every interval and asking the hosts
//! what they staged between cuts while the last cut is not committed. The harness is
//! `sim::group`, shared with `hypermetro_group_sim`: what it drives, the faults (links cut
//! and healed, agents crashing, some of them just after they switched and restarted at
//! once by systemd, DR hosts losing power, the coordinator crashing, its messages lost or
//! late or twice, answers late (in stream order), frames failing their CRC, a full stage log)
//! and the checks: after every event, what a failover would give (each DR volume, and its
//! sealed staged writes up to the group's commit) holds, for each chain of dependent
//! records, a prefix; after a DR power cut, a block clean at production holds its data on
//! the DR side, and every point in time the DR side's undo journal holds reads back as the
//! image it was (also after every unit applied); at the end, every record answered a second
//! before is on its DR side.
//!
//! Each mutation check switches on one deliberate bug (`Broken`) and must be caught.
//! A failure prints its seed; `BLOCKREP_SEED=n` replays one, `BLOCKREP_SIM_SEEDS` sets how
//! many run, `BLOCKREP_TRACE` prints the events.

use blockrep_core::replication::ReplicationModel;
use sim::group::{Broken, Sim};

mod sim;

#[test]
fn async_groups_stay_a_crash_image_through_crashes_link_cuts_and_lost_messages() {
    let (mut answered, mut abandoned, mut mid_unit) = (0, 0, 0);
    let (mut kept, mut replayed, mut points) = (0, 0, 0);
    let mut drill_reads = 0;
    for seed in sim::seeds(300) {
        let mut sim = Sim::new(seed, ReplicationModel::Async, Broken::Nothing);
        if let Err(e) = sim.run() {
            panic!("seed {seed} (replay with BLOCKREP_SEED={seed}): {e}");
        }
        answered += sim.answered();
        abandoned += sim.abandoned_cuts();
        mid_unit += sim.cuts_mid_unit();
        let (k, r, p) = sim.undo_counts();
        (kept, replayed, points) = (kept + k, replayed + r, points + p);
        drill_reads += sim.drill_reads();
    }
    eprintln!(
        "{answered} records answered; {abandoned} cuts abandoned; {mid_unit} DR power cuts mid-unit; undo kept for {kept} units, found kept by {replayed} replays, {points} points held at the ends; {drill_reads} drill blocks read and checked"
    );
    assert!(
        kept > 0 && replayed > 0,
        "the undo journal was not exercised"
    );
    assert!(drill_reads > 0, "no drill read anything");
}

/// Runs seeds with `broken` until one fails: the seed and what caught it.
fn caught(broken: Broken) -> (u64, String) {
    for seed in 0..300 {
        if let Err(e) = Sim::new(seed, ReplicationModel::Async, broken).run() {
            eprintln!("{broken:?} caught by BLOCKREP_SEED={seed}: {e}");
            return (seed, e);
        }
    }
    panic!("300 seeds did not catch {broken:?}");
}

/// A host that gives the answers it held at the cut itself (not at the release) answers a
/// write of the new epoch while another host still admits in the old one: a failover at
/// the old epoch's commit can hold its dependant and not the write.
#[test]
fn releasing_on_the_cut_is_caught() {
    let (_, e) = caught(Broken::ReleaseOnCut);
    assert!(e.contains("would hold chain"), "{e}");
}

/// A restarted agent that forgets the catch-up unit its record names lets the coordinator
/// commit inside a unit whose span no ack reported.
#[test]
fn forgetting_the_recorded_unit_at_a_restart_is_caught() {
    let (_, e) = caught(Broken::ForgetRecordedUnit);
    assert!(e.contains("inside host"), "{e}");
}

/// A coordinator that takes a staged epoch asked between rounds without the catch-up units
/// that came with it commits inside a unit whose end a DR side staged.
#[test]
fn a_staged_epoch_taken_without_its_units_is_caught() {
    let (_, e) = caught(Broken::StagedWithoutUnits);
    assert!(e.contains("inside host"), "{e}");
}

/// A DR side that takes a replayed unit's undo again reads it from the volume the unit
/// half changed before the power cut: the point before the unit reads the unit's data
/// where the disk had written it.
#[test]
fn taking_a_replayed_units_undo_again_is_caught() {
    let (_, e) = caught(Broken::UndoTakenAgainOnReplay);
    assert!(e.contains("the image at point"), "{e}");
}

/// A drill whose view does not take a unit's undo before the unit applies reads the unit's
/// data where its point had older data.
#[test]
fn a_drill_view_not_extended_before_a_unit_is_caught() {
    let (_, e) = caught(Broken::DrillViewNotExtended);
    assert!(e.contains("a drill at point"), "{e}");
}

/// A DR side that records a unit applied when it begins applying it loses the rest of the
/// unit at a power cut in the middle: its stage log is skipped up to the recorded epoch
/// when it is opened again, and a failover misses records later ones depend on.
#[test]
fn recording_a_unit_applied_at_its_start_is_caught() {
    let (_, e) = caught(Broken::RecordUnitAtItsStart);
    assert!(e.contains("would hold chain"), "{e}");
}
