//! `kill -9` during a write workload: after restart, the dirty map covers every write the
//! daemon acknowledged (rule 2: over-marking allowed, never under-marking).

use std::collections::HashMap;
use std::io::Write;
use std::sync::mpsc;

use blockrep_tests::nbd::{CMD_WRITE, read_reply, request};
use blockrep_tests::{Daemon, NbdClient, seed, sparse_file};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 1 << 30;
const BLOCK: u64 = 4096;
/// Even rounds: a small activity log with fast flushes, so regions are retired and re-added
/// all the time and recovery leans on the bitmap file. Odd rounds: a log that holds every
/// region and a bitmap flushed only at shutdown, so recovery leans on the log alone.
const CONFIGS: [&str; 2] = [
    "[bitmap]\nregion_size = \"1MiB\"\nactive_regions = 80\nflush_interval_ms = 20\n",
    "[bitmap]\nregion_size = \"1MiB\"\nactive_regions = 1024\nflush_interval_ms = 60000\n",
];

fn restart(dir: &std::path::Path, round: u64) -> Daemon {
    let config = dir.join("blockrepd.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let base = text.split("[bitmap]").next().unwrap();
    std::fs::write(&config, format!("{base}{}", CONFIGS[(round % 2) as usize])).unwrap();
    Daemon::start_with_config(dir, &config).unwrap()
}

fn covered(extents: &[(u64, u64)], offset: u64, len: u64) -> bool {
    // Extents are sorted and maximal; find the one holding `offset`.
    let i = extents.partition_point(|(o, _)| *o <= offset);
    i > 0 && {
        let (o, l) = extents[i - 1];
        offset + len <= o + l
    }
}

#[test]
fn kill_9_never_loses_an_acknowledged_write() {
    let base = seed(20261123);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    sparse_file(&image, SIZE);
    let mut daemon = Daemon::start(dir.path(), CONFIGS[0]).unwrap();
    daemon.add_volume("vol1", &image);
    let mut acked: Vec<(u64, u64)> = Vec::new();

    for round in 0..6u64 {
        let mut rng = SmallRng::seed_from_u64(base.wrapping_add(round));
        // Kill after a seeded number of acknowledgements, with writes still in flight.
        let kill_after = rng.random_range(200..3000usize);
        let client = NbdClient::connect(&daemon.nbd_socket("vol1"), "vol1").unwrap();
        let mut writer = client.stream.try_clone().unwrap();
        let mut reader = client.stream;
        let (tx, rx) = mpsc::channel::<(u64, u64, u64)>();
        let sender = std::thread::spawn(move || {
            let payload = vec![0xabu8; 64 * BLOCK as usize];
            for handle in 0.. {
                // Mostly 4k writes, some up to 256k, clustered in a few hot areas and spread
                // over the whole volume.
                let blocks = if rng.random_range(0..8) == 0 {
                    rng.random_range(2..64)
                } else {
                    1
                };
                let offset = if rng.random_bool(0.5) {
                    rng.random_range(0..64u64) * (16 << 20) + rng.random_range(0..256u64) * BLOCK
                } else {
                    rng.random_range(0..SIZE / BLOCK - 64) * BLOCK
                };
                let len = blocks * BLOCK;
                if tx.send((handle, offset, len)).is_err() {
                    return;
                }
                let mut frame = request(CMD_WRITE, 0, handle, offset, len as u32);
                frame.extend_from_slice(&payload[..len as usize]);
                if writer.write_all(&frame).is_err() {
                    return;
                }
            }
        });
        let mut in_flight: HashMap<u64, (u64, u64)> = HashMap::new();
        let mut acks = 0;
        while acks < kill_after {
            let reply = read_reply(&mut reader).expect("daemon answers until killed");
            assert_eq!(reply.error, 0);
            while !in_flight.contains_key(&reply.handle) {
                let (h, o, l) = rx.recv().unwrap();
                in_flight.insert(h, (o, l));
            }
            acked.push(in_flight.remove(&reply.handle).unwrap());
            acks += 1;
        }
        daemon.kill9();
        drop(rx);
        drop(reader);
        sender.join().unwrap();

        // Recover with the configuration the crash happened under, then switch for the next round.
        daemon = restart(dir.path(), round);
        let extents = daemon.dirty_extents("vol1");
        let lost: Vec<_> = acked
            .iter()
            .filter(|(o, l)| !covered(&extents, *o, *l))
            .take(5)
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: acknowledged writes {lost:?} are not dirty after kill -9 (seed {base})"
        );
        let dirty: u64 = extents.iter().map(|(_, l)| l).sum();
        assert!(
            dirty < SIZE,
            "round {round}: the whole volume is dirty; recovery over-marked everything"
        );
        eprintln!(
            "round {round}: {} acknowledged writes covered, {dirty} bytes dirty",
            acked.len()
        );
        daemon.stop().unwrap();
        daemon = restart(dir.path(), round + 1);
    }
    daemon.stop().unwrap();
}
