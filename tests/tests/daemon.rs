//! A real daemon serving a file volume to fio, qemu-io and libnbd tools.

use std::process::Command;

use blockrep_tests::{Daemon, preallocated, require_tool, run};

const MIB: u64 = 1 << 20;

#[test]
fn fio_and_qemu_io_write_and_read_back_and_the_volume_survives_restart() {
    require_tool("fio");
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    preallocated(&image, 128 * MIB);
    let daemon = Daemon::start(dir.path(), "").unwrap();
    let added = daemon.add_volume("vol1", &image);
    let id = added["id"].as_str().unwrap().to_owned();
    assert_eq!(added["size_bytes"], 128 * MIB);
    assert_eq!(added["availability_zone"], "az1");
    assert_eq!(added["dirty_bytes"], 0);
    assert_eq!(added["cache_mode"], "direct");
    assert_eq!(added["direct_io"], true);

    // fio's nbd engine: random 4k writes over the first 32 MiB, each verified by crc32c.
    let uri = daemon.nbd_uri("vol1");
    run(Command::new("fio")
        .current_dir(dir.path())
        .args([
            "--name=verify",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
        ])
        .args([
            "--size=32M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
        ])
        .arg(format!("--uri={uri}")));

    // qemu-io: aligned and unaligned patterns, read back through NBD.
    run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args([
            "-c",
            "write -P 0xa5 64M 1M",
            "-c",
            "write -P 0x5a 70000000 3333",
            "-c",
            "write -z 80M 64k",
        ])
        .args([
            "-c",
            "read -P 0xa5 64M 1M",
            "-c",
            "read -P 0x5a 70000000 3333",
            "-c",
            "read -P 0 80M 64k",
        ])
        .arg(&uri));

    // The backing file holds what the clients wrote: compare it with an nbdcopy of the export.
    let copy = dir.path().join("copy.img");
    run(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap(),
        "export and backing file differ"
    );
    let backing = std::fs::read(&image).unwrap();
    assert!(
        backing[64 * MIB as usize..65 * MIB as usize]
            .iter()
            .all(|&b| b == 0xa5)
    );
    assert!(backing[70_000_000..70_003_333].iter().all(|&b| b == 0x5a));

    // Dirty bytes: 32 MiB by fio, 1 MiB + two 4k blocks + 64k by qemu-io.
    let dirty = daemon.dirty_bytes("vol1");
    assert_eq!(dirty, 32 * MIB + MIB + 8192 + 64 * 1024);

    daemon.stop().unwrap();
    let daemon = Daemon::start_with_config(dir.path(), &dir.path().join("blockrepd.toml")).unwrap();
    let shown = daemon.cli_json(&["volume", "show", &id]);
    assert_eq!(shown["name"], "vol1");
    assert_eq!(shown["state"], "online");
    assert_eq!(
        shown["dirty_bytes"], dirty,
        "a clean restart keeps the dirty map exactly"
    );
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0xa5 64M 1M"])
        .arg(&uri));
    daemon.stop().unwrap();
}

#[test]
fn nbdinfo_lists_the_export_with_its_block_sizes_and_tcp_serves_it() {
    require_tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    preallocated(&image, 16 * MIB);
    let port = blockrep_tests::cluster::free_tcp_port();
    let daemon = Daemon::start(
        dir.path(),
        &format!("[nbd]\ntcp_listen = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    daemon.add_volume("vol1", &image);
    let info = run(Command::new("nbdinfo")
        .arg("--json")
        .arg(daemon.nbd_uri("vol1")));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 16 * MIB);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 64 * MIB);
    assert_eq!(info["protocol"], "newstyle-fixed");
    assert_eq!(export["contexts"], serde_json::json!(["base:allocation"]));
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["can_fua"], true);
    // A second volume in writeback cache mode, served on the same TCP address by name.
    let wb_image = dir.path().join("wb.img");
    preallocated(&wb_image, 8 * MIB);
    let wb = daemon.cli_json(&[
        "volume",
        "add",
        "--name",
        "wb",
        "--cache",
        "writeback",
        "--path",
        wb_image.to_str().unwrap(),
    ]);
    assert_eq!(wb["cache_mode"], "writeback");
    assert_eq!(wb["direct_io"], false);
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 9 1M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 9 1M 64k",
        ])
        .arg(format!("nbd://127.0.0.1:{port}/wb")));
    assert!(
        std::fs::read(&wb_image).unwrap()[MIB as usize..][..65536]
            .iter()
            .all(|&b| b == 9),
        "flushed to the file"
    );
    assert_eq!(daemon.dirty_bytes("wb"), 65536);
    let listed = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd://127.0.0.1:{port}")));
    assert!(listed.contains("vol1") && listed.contains("wb"), "{listed}");
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 7 0 4k", "-c", "read -P 7 0 4k"])
        .arg(format!("nbd://127.0.0.1:{port}/vol1")));
    daemon.stop().unwrap();
}

#[test]
fn qemu_img_converts_into_and_out_of_a_volume() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    preallocated(&image, 32 * MIB);
    let source = dir.path().join("source.raw");
    let data: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&source, &data).unwrap();
    let daemon = Daemon::start(dir.path(), "").unwrap();
    daemon.add_volume("vol1", &image);
    let uri = daemon.nbd_uri("vol1");

    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&uri));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 32 * MIB);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&source)
        .arg(&uri));
    let back = dir.path().join("back.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&back));
    let back = std::fs::read(&back).unwrap();
    assert!(
        back[..data.len()] == data[..],
        "qemu-img round trip differs"
    );
    assert!(back[data.len()..].iter().all(|&b| b == 0));
    daemon.stop().unwrap();
}

/// An agent's threads do not grow with its volumes: one thread flushes every bitmap.
#[test]
fn forty_more_volumes_take_no_more_threads() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "").unwrap();
    let threads = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap()
    };
    let add = |i: u32| {
        let file = dir.path().join(format!("v{i}.img"));
        std::fs::File::create(&file)
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
        daemon.add_volume(&format!("v{i}"), &file);
    };
    add(0);
    let with_one = threads();
    for i in 1..=40 {
        add(i);
    }
    let with_many = threads();
    assert!(
        with_many <= with_one + 2,
        "{with_one} threads with one volume, {with_many} with 41"
    );
    daemon.stop().unwrap();
}

/// A thread's scheduling policy (field 41 of its `stat`: 0 `SCHED_OTHER`, 3 `SCHED_BATCH`).
fn policy_of(stat: &str) -> u32 {
    let after_name = &stat[stat.rfind(')').expect("a stat line") + 1..];
    after_name
        .split_whitespace()
        .nth(38)
        .unwrap()
        .parse()
        .unwrap()
}

/// The policies of an agent's threads serving a client, by thread name.
fn thread_policies_serving_a_client(extra: &str) -> Vec<(String, u32)> {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), extra).unwrap();
    let file = dir.path().join("v.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    daemon.add_volume("v", &file);
    let mut client = blockrep_tests::NbdClient::connect(&daemon.nbd_socket("v"), "v").unwrap();
    // Answered: its connection's thread is running.
    client.write(0, &[7; 4096]).unwrap();
    let mut policies = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", daemon.pid())).unwrap() {
        let task = task.unwrap().path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue;
        };
        policies.push((name.trim().to_owned(), policy_of(&stat)));
    }
    drop(client);
    daemon.stop().unwrap();
    policies
}

/// Every thread of the agent runs under `SCHED_BATCH` (`scheduling`'s default): the
/// allocator's, which starts before `main`, the runtime's, the connections' (which runtime
/// threads start) and their io_uring workers; with `scheduling = "normal"`, every one runs
/// as the agent was started.
#[test]
fn the_agents_threads_run_under_the_configured_scheduling() {
    let started = policy_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
    assert_ne!(
        started, 3,
        "the test must run outside SCHED_BATCH to tell them apart"
    );
    for (extra, want) in [("", 3), ("scheduling = \"normal\"\n", started)] {
        let policies = thread_policies_serving_a_client(extra);
        for named in ["tokio-rt-worker", "nbd-conn", "jemalloc_bg_thd"] {
            assert!(
                policies.iter().any(|(name, _)| name.starts_with(named)),
                "no {named} thread among {policies:?}"
            );
        }
        assert!(
            policies.iter().all(|&(_, policy)| policy == want),
            "with {extra:?} every thread should have policy {want}: {policies:?}"
        );
    }
}

/// The runtime's workers in the agent's start-up line.
fn runtime_workers_when_started_by(wrapper: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = Daemon::write_config(dir.path(), "").unwrap();
    let daemon = Daemon::start_wrapped(
        wrapper,
        &blockrep_tests::binary("blockrepd"),
        dir.path(),
        &config,
        &[],
    )
    .unwrap();
    // Logged before the daemon says it is ready.
    let log = daemon.log_text();
    daemon.stop().unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("blockrepd ready"))
        .unwrap_or_else(|| panic!("no start-up line in {log}"));
    let workers = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("runtime_workers="))
        .unwrap_or_else(|| panic!("no runtime_workers in {line}"));
    workers.to_owned()
}

/// An agent allowed one CPU runs one runtime worker: a second would only add a thread
/// switch to every hand-over between its tasks (the sender and quinn's driver). With two
/// CPUs or more it runs two.
#[test]
fn the_runtime_has_a_worker_per_allowed_cpu_up_to_two() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc/self/status");
    // The first CPU this test may run on ("0-1", "2,5", "3").
    let first = allowed
        .trim()
        .split([',', '-'])
        .next()
        .expect("an allowed CPU");
    assert_eq!(
        runtime_workers_when_started_by(&["taskset", "-c", first]),
        "1"
    );
    let cpus = std::thread::available_parallelism().unwrap().get();
    if cpus >= 2 {
        assert_eq!(runtime_workers_when_started_by(&[]), "2");
    }
}

/// SIGTERM with writes in flight: every request the daemon read is answered, the daemon
/// exits cleanly, and after restart every answered write is on disk and dirty.
#[test]
fn sigterm_answers_writes_in_flight_then_exits_cleanly() {
    use std::io::Write;

    use blockrep_tests::NbdClient;
    use blockrep_tests::nbd::{CMD_WRITE, read_reply, request};

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    preallocated(&image, 64 * MIB);
    let daemon = Daemon::start(dir.path(), "").unwrap();
    daemon.add_volume("vol1", &image);
    let client = NbdClient::connect(&daemon.nbd_socket("vol1"), "vol1").unwrap();
    let mut writer = client.stream.try_clone().unwrap();
    let mut reader = client.stream;

    // 512 writes of 64 KiB, pipelined without waiting for answers.
    const WRITES: u64 = 512;
    let sender = std::thread::spawn(move || {
        for handle in 0..WRITES {
            let mut frame = request(CMD_WRITE, 0, handle, handle * 65536, 65536);
            frame.extend(std::iter::repeat_n((handle % 200) as u8 + 1, 65536));
            if writer.write_all(&frame).is_err() {
                return;
            }
        }
    });
    // Once the first write is answered, stop the daemon while the rest are in flight.
    let first = read_reply(&mut reader).unwrap();
    assert_eq!(first.error, 0);
    let mut answered = vec![first.handle];
    daemon.stop_in_background();
    while let Ok(reply) = read_reply(&mut reader) {
        assert_eq!(
            reply.error, 0,
            "write {} failed during shutdown",
            reply.handle
        );
        answered.push(reply.handle);
    }
    sender.join().unwrap();
    daemon.wait_exit_success().unwrap();

    let disk = std::fs::read(&image).unwrap();
    for &h in &answered {
        let block = &disk[(h * 65536) as usize..][..65536];
        assert!(
            block.iter().all(|&b| b == (h % 200) as u8 + 1),
            "answered write {h} is not on disk"
        );
    }
    let daemon = Daemon::start_with_config(dir.path(), &dir.path().join("blockrepd.toml")).unwrap();
    let extents = daemon.dirty_extents("vol1");
    for &h in &answered {
        let (o, l) = (h * 65536, 65536);
        assert!(
            extents.iter().any(|(eo, el)| *eo <= o && o + l <= eo + el),
            "answered write {h} not dirty"
        );
    }
    eprintln!(
        "{} of {WRITES} writes answered before the daemon exited",
        answered.len()
    );
    daemon.stop().unwrap();
}

/// A client that stops taking its replies cannot hold shutdown up past the grace period.
#[test]
fn sigterm_disconnects_a_client_that_does_not_read_its_replies() {
    use std::io::Write;

    use blockrep_tests::NbdClient;
    use blockrep_tests::nbd::{CMD_READ, read_reply, request};

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    preallocated(&image, 64 * MIB);
    let daemon = Daemon::start(dir.path(), "shutdown_grace_ms = 300\n").unwrap();
    daemon.add_volume("vol1", &image);
    let mut client = NbdClient::connect(&daemon.nbd_socket("vol1"), "vol1").unwrap();
    // 100 reads of 1 MiB: far more reply data than the socket buffers hold, never read.
    let requests: Vec<u8> = (0..100)
        .flat_map(|h| request(CMD_READ, 0, h, h * MIB % (63 * MIB), MIB as u32))
        .collect();
    client.stream.write_all(&requests).unwrap();
    // Once the first reply header arrives the daemon is answering; the rest stays unread.
    let first = read_reply(&mut client.stream).unwrap();
    assert_eq!(first.error, 0);
    let started = std::time::Instant::now();
    daemon.stop().unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "shutdown waited {:?}",
        started.elapsed()
    );
}

/// A hung I/O loop stops the service manager's watchdog pings (so systemd restarts the
/// agent); while every loop makes progress they come. The loop is hung by a test-only
/// fault: a connection that stops for good with a write in flight.
#[test]
fn a_hung_io_loop_stops_the_watchdog_pings() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    preallocated(&image, 16 * MIB);
    let config = dir.path().join("blockrepd.toml");
    std::fs::write(
        &config,
        format!(
            "node_name = \"host-a\"\navailability_zone = \"az1\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n",
            dir.path().join("state").display(),
            dir.path().join("run").display()
        ),
    )
    .unwrap();
    // A 2 s watchdog: pings every 0.5 s, none once a loop is stuck for 1 s.
    let env = [
        ("WATCHDOG_USEC".to_owned(), "2000000".to_owned()),
        ("BLOCKREP_FAULT_STALL_NBD_AFTER".to_owned(), "50".to_owned()),
    ];
    let daemon = Daemon::start_program_with_env(
        &blockrep_tests::binary("blockrepd"),
        dir.path(),
        &config,
        &env,
    )
    .unwrap();
    assert!(
        daemon
            .log_text()
            .contains("built with test-only fault injection"),
        "this test needs the daemon built with --features blockrepd/fault-injection (scripts/test.sh does it)"
    );
    daemon.add_volume("vol1", &image);
    let ping = |daemon: &Daemon| {
        daemon
            .next_notification(std::time::Duration::from_secs(2))
            .is_some_and(|n| n.lines().any(|l| l == "WATCHDOG=1"))
    };
    assert!(ping(&daemon), "no watchdog ping from a healthy agent");

    // 60 writes: the connection stops for good at its 50th request, a write in flight.
    let socket = daemon.nbd_socket("vol1");
    let writer = std::thread::spawn(move || {
        let mut client = blockrep_tests::NbdClient::connect(&socket, "vol1").unwrap();
        for i in 0..60u64 {
            if client.write(i * 4096, &[1u8; 4096]).is_err() {
                return;
            }
        }
    });
    let log = daemon.log.clone();
    blockrep_tests::cluster::wait_until(
        std::time::Duration::from_secs(20),
        "the agent to see the stuck loop",
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("watchdog pings stop")
        },
    );
    // Whatever was sent before is read; then nothing comes for a whole interval.
    while daemon
        .next_notification(std::time::Duration::from_millis(10))
        .is_some()
    {}
    assert!(
        daemon
            .next_notification(std::time::Duration::from_secs(2))
            .is_none(),
        "the watchdog was pinged while a loop was stuck"
    );
    let text = daemon.log_text();
    assert!(text.contains("NBD connection to vol1"), "{text}");
    // What the service manager does next: kill and restart it (crash recovery).
    daemon.kill9();
    let _ = writer.join();
}
