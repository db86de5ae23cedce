//! Dependent records for consistency checks: record `n` is written only once record `n-1`
//! was answered, each in its own 4 KiB block, so any crash-consistent image of the volume
//! holds exactly records `0..k` for some `k`.

use std::os::unix::fs::FileExt;
use std::path::Path;

pub const RECORD: u64 = 4096;
const MAGIC: u64 = 0x6272_6563_6f72_6421; // "brecord!"

/// Record `n`: its number, a magic word, and bytes derived from `n`, with a CRC at the end.
pub fn record(n: u64) -> Vec<u8> {
    let mut r = vec![0u8; RECORD as usize];
    r[..8].copy_from_slice(&n.to_le_bytes());
    r[8..16].copy_from_slice(&MAGIC.to_le_bytes());
    for (i, b) in r[16..RECORD as usize - 4].iter_mut().enumerate() {
        *b = (n as u8).wrapping_mul(31).wrapping_add(i as u8) | 1;
    }
    let crc = crc32(&r[..RECORD as usize - 4]);
    r[RECORD as usize - 4..].copy_from_slice(&crc.to_le_bytes());
    r
}

/// Bitwise CRC-32 (IEEE); the tests need no speed.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// How many records the image holds, checking they are exactly a prefix: records 0..n
/// whole and in place, nothing after.
pub fn prefix_length(image: &Path, max: u64) -> Result<u64, String> {
    prefix_length_across(&[image], max)
}

/// Where record `n` lives when records go to `volumes` volumes in turn: the volume, and the
/// block in it.
pub fn place(n: u64, volumes: usize) -> (usize, u64) {
    ((n % volumes as u64) as usize, n / volumes as u64 * RECORD)
}

/// How many records a group of images holds together, checking they are exactly a prefix
/// of the sequence (records written to the images in turn, see [`place`]): records
/// `0..n` whole and in place, nothing after, in any image.
pub fn prefix_length_across(images: &[&Path], max: u64) -> Result<u64, String> {
    let files: Vec<std::fs::File> = images
        .iter()
        .map(|p| std::fs::File::open(p).unwrap())
        .collect();
    let mut block = vec![0u8; RECORD as usize];
    let read = |n: u64, block: &mut [u8]| {
        let (volume, offset) = place(n, files.len());
        files[volume].read_exact_at(block, offset).unwrap();
    };
    let mut n = 0;
    while n < max {
        read(n, &mut block);
        if block.iter().all(|&b| b == 0) {
            break;
        }
        if block != record(n) {
            return Err(format!("record {n} is torn or wrong"));
        }
        n += 1;
    }
    for later in n..max {
        read(later, &mut block);
        if block.iter().any(|&b| b != 0) {
            let (volume, _) = place(later, files.len());
            return Err(format!(
                "record {later} (volume {volume}) is present but record {n} is not: not a prefix"
            ));
        }
    }
    Ok(n)
}
