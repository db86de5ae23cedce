//! The NBD transmission phase as the server runs it: the request parser, the checks of
//! every command (offsets, lengths, flags), and the write path through the volume's gate,
//! fed a client's bytes over a socket pair. The first byte chooses what was negotiated
//! (structured replies, base:allocation). Any bytes get answers or a closed connection,
//! never a panic, a hang or a write outside the volume.
#![no_main]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use blockrep_nbd::{Connection, Negotiated};
use libfuzzer_sys::fuzz_target;

#[path = "volume.rs"]
mod volume;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, requests)) = data.split_first() else {
        return;
    };
    let negotiated = Negotiated {
        structured_replies: choice & 1 != 0,
        base_allocation: choice & 2 != 0,
    };
    let (mut client, server) = UnixStream::pair().unwrap();
    let volume = volume::volume();
    let serving = std::thread::spawn(move || {
        let connection = Connection::new(server.as_raw_fd(), volume, negotiated).unwrap();
        let stats = connection.run();
        drop(server);
        stats
    });
    let mut reader = client.try_clone().unwrap();
    let draining = std::thread::spawn(move || {
        let mut sink = [0u8; 64 << 10];
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    });
    let _ = client.write_all(requests);
    let _ = client.shutdown(std::net::Shutdown::Write);
    let _ = serving.join().unwrap();
    drop(client);
    draining.join().unwrap();
});
