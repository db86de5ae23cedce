//! Compression of write payloads on the wire (`replication.compression`): worth it on a
//! link slower than the hosts, not on a fast one. Each payload is one zstd frame, sent only
//! if it is smaller than the data (the write says so with `WriteFlags::ZSTD`); its CRC is
//! of the data, checked on the DR side after decompressing, so a corruption anywhere on the
//! way, in the compressed bytes or in the codec, is caught the same way.
//!
//! The DR side decompresses into exactly the write's length, which the frame bounds to
//! `MAX_PAYLOAD_LEN`: a payload that would decompress to more (or less) is refused like a
//! bad checksum, so a hostile peer cannot make it allocate more than an uncompressed write
//! would.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

/// How write payloads go on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    Off,
    Zstd,
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Compression::Off),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!(
                "{other:?} is not a compression: \"zstd\" or \"off\""
            )),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Off => "off",
            Compression::Zstd => "zstd",
        })
    }
}

/// zstd's fastest level that still finds the repeats in block data.
const LEVEL: i32 = 1;
/// Payloads shorter than this go as they are: a frame's overhead eats what they would save.
const MIN_BYTES: usize = 512;
/// The most output buffer a compressor keeps between payloads.
const KEEP_BYTES: usize = 4 << 20;

/// The production side's compressor, kept for the stream (its context is reused).
pub struct Compressor {
    zstd: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

impl Compressor {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            zstd: zstd::bulk::Compressor::new(LEVEL)?,
            out: Vec::new(),
        })
    }

    /// The payload compressed, if that makes it smaller.
    pub fn compress(&mut self, data: &[u8]) -> Option<Bytes> {
        if data.len() < MIN_BYTES {
            return None;
        }
        // Room for less than the data only: what does not shrink is not worth sending so.
        self.out.clear();
        self.out.reserve_exact(data.len() - 1);
        let written = self
            .zstd
            .compress_to_buffer(data, &mut self.out)
            .ok()
            .filter(|&n| n < data.len());
        let packed = written.map(|n| Bytes::copy_from_slice(&self.out[..n]));
        // One large extent does not keep its buffer for the stream's life.
        if self.out.capacity() > KEEP_BYTES {
            self.out = Vec::new();
        }
        packed
    }
}

/// Decompresses a payload that must come to exactly `len` bytes; `None` if it does not (a
/// corrupt or hostile payload), which the DR side treats as a failed checksum.
pub fn decompress(payload: &[u8], len: usize) -> Option<Vec<u8>> {
    thread_local! {
        // One context per applier thread, not one per write.
        static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { RefCell::new(None) };
    }
    let mut out = Vec::with_capacity(len);
    let n = DECOMPRESSOR.with_borrow_mut(|d| {
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().ok()?);
        }
        d.as_mut()?.decompress_to_buffer(payload, &mut out).ok()
    })?;
    (n == len).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_data_goes_smaller_and_comes_back_whole() {
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i / 512) as u8).collect();
        let mut c = Compressor::new().unwrap();
        let packed = c.compress(&data).expect("compressible");
        assert!(packed.len() < data.len() / 4, "{} bytes", packed.len());
        assert_eq!(decompress(&packed, data.len()).unwrap(), data);
    }

    #[test]
    fn random_and_short_data_go_as_they_are() {
        use rand::{Rng, SeedableRng};
        let seed = 0xb10c_2a7e;
        eprintln!("seed {seed:#x}");
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut data = vec![0u8; 64 * 1024];
        rng.fill(&mut data[..]);
        let mut c = Compressor::new().unwrap();
        assert_eq!(c.compress(&data), None);
        assert_eq!(c.compress(&[0; 100]), None);
    }

    #[test]
    fn a_payload_that_decompresses_to_another_length_is_refused() {
        let data = vec![7u8; 1 << 20];
        let packed = Compressor::new().unwrap().compress(&data).unwrap();
        assert_eq!(
            decompress(&packed, data.len() - 1),
            None,
            "more than the write"
        );
        assert_eq!(
            decompress(&packed, data.len() + 1),
            None,
            "less than the write"
        );
        let mut flipped = packed.to_vec();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        assert_ne!(decompress(&flipped, data.len()).as_deref(), Some(&data[..]));
        assert_eq!(decompress(b"not zstd at all", 64), None);
    }
}
