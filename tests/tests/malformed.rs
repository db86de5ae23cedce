//! Malformed NBD input: each bad case gets an NBD error or a disconnect; the daemon stays
//! up and the volume's bytes and dirty map do not change. Also the flags and sizes the NBD
//! spec says a server must accept.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use blockrep_tests::Daemon;
use blockrep_tests::nbd::{self, CMD_READ, CMD_WRITE, NbdClient, read_reply, request};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 16 << 20;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// Reads until the server closes the connection; fails if it answers instead.
fn expect_disconnect(stream: &mut UnixStream) {
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("server closes the connection");
    assert!(
        rest.is_empty(),
        "server answered {} bytes before closing",
        rest.len()
    );
}

#[test]
fn malformed_requests_get_errors_or_disconnects_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    std::fs::write(&image, vec![0x11u8; SIZE as usize]).unwrap();
    let daemon = Daemon::start(dir.path(), "").unwrap();
    daemon.add_volume("vol1", &image);
    let socket = daemon.nbd_socket("vol1");
    let before = std::fs::read(&image).unwrap();
    let connect = || NbdClient::connect(&socket, "vol1").unwrap();

    // Errors answered in place; the connection stays usable.
    let mut c = connect();
    let answered: &[(&str, Vec<u8>, u32)] = &[
        ("unknown command", request(99, 0, 1, 0, 4096), EINVAL),
        (
            "BLOCK_STATUS without negotiation",
            request(7, 0, 2, 0, 4096),
            EINVAL,
        ),
        (
            "unknown flag on read",
            request(CMD_READ, 1 << 9, 3, 0, 4096),
            EINVAL,
        ),
        (
            "no-hole flag on read",
            request(CMD_READ, 2, 4, 0, 4096),
            EINVAL,
        ),
        (
            "read past the end",
            request(CMD_READ, 0, 5, SIZE - 4096, 8192),
            EINVAL,
        ),
        (
            "read offset overflow",
            request(CMD_READ, 0, 6, u64::MAX - 10, 4096),
            EINVAL,
        ),
        (
            "read over 64 MiB",
            request(CMD_READ, 0, 7, 0, (64 << 20) + 4096),
            EINVAL,
        ),
        (
            "trim past the end",
            request(nbd::CMD_TRIM, 0, 8, SIZE, 4096),
            EINVAL,
        ),
        (
            "zeroes past the end",
            request(nbd::CMD_WRITE_ZEROES, 0, 9, SIZE - 512, 4096),
            ENOSPC,
        ),
    ];
    for (case, bytes, errno) in answered {
        c.stream.write_all(bytes).unwrap();
        let reply = c.reply().unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(reply.error, *errno, "{case}");
    }
    // A write past the end: its payload is consumed, then ENOSPC; the next request works.
    c.send(CMD_WRITE, 0, 10, SIZE - 4096, 8192, &[0xee; 8192])
        .unwrap();
    assert_eq!(c.reply().unwrap().error, ENOSPC);
    c.send(CMD_WRITE, 1 << 9, 11, 0, 4096, &[0xee; 4096])
        .unwrap();
    assert_eq!(c.reply().unwrap().error, EINVAL, "unknown flag on write");
    // A write over the 64 MiB limit: its payload is read and dropped, then EINVAL.
    let huge = (64 << 20) + 1;
    c.send(CMD_WRITE, 0, 12, 0, huge, &vec![0xee; huge as usize])
        .unwrap();
    assert_eq!(c.reply().unwrap().error, EINVAL, "write over 64 MiB");
    assert_eq!(
        c.read(0, 4096).unwrap(),
        vec![0x11; 4096],
        "connection still in step"
    );
    c.disconnect().unwrap();

    // Cases the server answers by closing the connection.
    let mut bad_magic = request(CMD_WRITE, 0, 1, 0, 4096);
    bad_magic[0] ^= 0xff;
    let closing: Vec<(&str, Vec<u8>)> =
        vec![("bad request magic", [bad_magic, vec![0xee; 4096]].concat())];
    for (case, bytes) in closing {
        let mut c = connect();
        c.stream.write_all(&bytes).unwrap();
        eprintln!("case: {case}");
        expect_disconnect(&mut c.stream);
    }

    // Truncated frames: half a header, and a write whose payload never fully arrives.
    for partial in [
        request(CMD_WRITE, 0, 1, 0, 4096)[..13].to_vec(),
        [request(CMD_WRITE, 0, 1, 0, 4096), vec![0xee; 1000]].concat(),
    ] {
        let mut c = connect();
        c.stream.write_all(&partial).unwrap();
        c.stream.shutdown(std::net::Shutdown::Write).unwrap();
        expect_disconnect(&mut c.stream);
    }

    // Handshake abuse: garbage client flags, bad option magic, a huge option length.
    for bytes in [
        vec![0xff; 4],
        [3u32.to_be_bytes().to_vec(), vec![0u8; 16]].concat(),
        {
            let mut v = 3u32.to_be_bytes().to_vec();
            v.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
            v.extend_from_slice(&7u32.to_be_bytes());
            v.extend_from_slice(&u32::MAX.to_be_bytes());
            v
        },
    ] {
        let mut s = UnixStream::connect(&socket).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(&bytes).unwrap();
        expect_disconnect(&mut s);
    }
    // An unknown export over OPT_GO is refused politely.
    assert!(NbdClient::connect(&socket, "other").is_err());

    // Seeded garbage: frames with a valid magic and random everything else (but never a
    // command that writes), mixed with random bytes, on many connections.
    let seed = blockrep_tests::seed(0xbad);
    let mut rng = SmallRng::seed_from_u64(seed);
    for _ in 0..40 {
        let mut c = connect();
        let mut bytes = Vec::new();
        for _ in 0..rng.random_range(1..20) {
            let mut frame = request(0, 0, 0, 0, 0);
            rng.fill(&mut frame[4..]);
            let command = loop {
                let c: u16 = rng.random_range(0..12);
                if ![CMD_WRITE, nbd::CMD_TRIM, nbd::CMD_WRITE_ZEROES].contains(&c) {
                    break c;
                }
            };
            frame[6..8].copy_from_slice(&command.to_be_bytes());
            if rng.random_bool(0.5) {
                // Mostly small lengths, so reads are served rather than refused.
                frame[24..28].copy_from_slice(&rng.random_range(0u32..70_000).to_be_bytes());
                frame[16..24].copy_from_slice(&rng.random_range(0..SIZE + 8192).to_be_bytes());
            }
            bytes.extend_from_slice(&frame);
            if rng.random_bool(0.1) {
                let mut junk = vec![0u8; rng.random_range(1..64)];
                rng.fill(&mut junk[..]);
                bytes.extend_from_slice(&junk);
            }
        }
        // The server may close on the junk before reading it all; that is fine.
        let _ = c.stream.write_all(&bytes);
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = c.stream.read_to_end(&mut rest);
    }

    // The daemon is up, the data untouched, nothing marked dirty.
    let status = daemon.cli_json(&["status"]);
    assert_eq!(status["volumes"][0]["state"], "online");
    assert_eq!(daemon.dirty_bytes("vol1"), 0);
    assert!(
        std::fs::read(&image).unwrap() == before,
        "volume bytes changed"
    );
    let mut c = connect();
    c.send(CMD_READ, 0, 77, 4096, 4096, &[]).unwrap();
    let reply = read_reply(&mut c.stream).unwrap();
    assert_eq!((reply.error, reply.handle), (0, 77));
    daemon.stop().unwrap();
}

/// FUA is accepted on every command once SEND_FUA is advertised (and ignored where it
/// means nothing); reads and writes up to 64 MiB are served.
#[test]
fn fua_on_any_command_and_64_mib_requests_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    let size: u64 = 128 << 20;
    blockrep_tests::sparse_file(&image, size);
    let daemon = Daemon::start(dir.path(), "").unwrap();
    daemon.add_volume("vol1", &image);
    let mut c = NbdClient::connect(&daemon.nbd_socket("vol1"), "vol1").unwrap();
    assert_ne!(c.transmission_flags & (1 << 3), 0, "SEND_FUA advertised");
    let big = 64u32 << 20;
    let data: Vec<u8> = (0..big).map(|i| (i % 251) as u8).collect();
    c.send(CMD_WRITE, nbd::FLAG_FUA, 1, 4096, big, &data)
        .unwrap();
    assert_eq!(
        c.reply().unwrap(),
        nbd::Reply {
            error: 0,
            handle: 1
        }
    );
    c.send(CMD_READ, nbd::FLAG_FUA, 2, 4096, big, &[]).unwrap();
    assert_eq!(
        c.reply().unwrap(),
        nbd::Reply {
            error: 0,
            handle: 2
        },
        "FUA on read"
    );
    let mut back = vec![0u8; big as usize];
    c.stream.read_exact(&mut back).unwrap();
    assert!(back == data, "64 MiB read back");
    c.send(nbd::CMD_FLUSH, nbd::FLAG_FUA, 3, 0, 0, &[]).unwrap();
    assert_eq!(
        c.reply().unwrap(),
        nbd::Reply {
            error: 0,
            handle: 3
        },
        "FUA on flush"
    );
    c.send(nbd::CMD_TRIM, nbd::FLAG_FUA, 4, 0, 4096, &[])
        .unwrap();
    assert_eq!(
        c.reply().unwrap(),
        nbd::Reply {
            error: 0,
            handle: 4
        },
        "FUA on trim"
    );
    c.disconnect().unwrap();
    daemon.stop().unwrap();
}
