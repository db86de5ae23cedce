//! The NBD handshake as the server runs it, fed what a client sends: option haggling
//! (OPT_GO and OPT_INFO with their information requests, export names, structured replies,
//! meta contexts, lists, aborts). Any bytes end in a negotiated export, a closed
//! connection or an error, never a panic or a hang.
#![no_main]

use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;

#[path = "volume.rs"]
mod volume;

/// The client's bytes in, the server's replies out (kept to a bound).
struct Client<'a> {
    input: &'a [u8],
    replies: usize,
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.replies += buf.len();
        if self.replies > 16 << 20 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut client = Client {
        input: data,
        replies: 0,
    };
    let _ = blockrep_nbd::negotiate(&mut client, &volume::One);
});
