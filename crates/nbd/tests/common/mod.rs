//! What the NBD tests share: a volume on a file, a client connected to it over a socket
//! pair, and requests and replies as they are on the wire. (Each test crate uses some.)
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use blockrep_nbd::{ClientStream, ExportSet, serve};
use blockrep_volume::{Backing, DirtyTracker, TrackerConfig, Volume};

/// A simple request header: `command` on `handle` for `len` bytes at `offset`.
pub fn request(command: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut out = 0x2560_9513u32.to_be_bytes().to_vec();
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

struct One(Arc<Volume>);
impl ExportSet for One {
    fn find(&self, _: &str) -> Option<Arc<Volume>> {
        Some(Arc::clone(&self.0))
    }
    fn names(&self) -> Vec<String> {
        vec!["v".into()]
    }
}

pub const SIZE: u64 = 4 << 20;

pub fn volume(dir: &std::path::Path) -> Arc<Volume> {
    let path = dir.join("v.img");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    let backing = Backing::open(&path, blockrep_core::CacheMode::Direct).unwrap();
    let config = TrackerConfig {
        region_size: 1 << 20,
        active_regions: 80,
        ..TrackerConfig::default()
    };
    let (tracker, _) = DirtyTracker::open(&dir.join("state"), SIZE, config).unwrap();
    Arc::new(Volume::new("v".into(), backing, Some(Arc::new(tracker))))
}

/// Connects a client over a socket pair, negotiating with NBD_OPT_EXPORT_NAME.
pub fn client(volume: &Arc<Volume>) -> (UnixStream, std::thread::JoinHandle<()>) {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let exports = One(Arc::clone(volume));
    let server = std::thread::spawn(move || {
        serve(ClientStream::Unix(theirs), &exports).unwrap();
    });
    let mut greeting = [0u8; 18];
    ours.read_exact(&mut greeting).unwrap();
    ours.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
    opt.extend_from_slice(&0u32.to_be_bytes());
    ours.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    ours.read_exact(&mut info).unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (ours, server)
}

/// (error, handle) of the next simple reply.
pub fn reply(stream: &mut UnixStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    stream.read_exact(&mut r).unwrap();
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    )
}
