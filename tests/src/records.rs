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
    let crc = crc32fast::hash(&r[..RECORD as usize - 4]);
    r[RECORD as usize - 4..].copy_from_slice(&crc.to_le_bytes());
    r
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
    let zero = vec![0u8; RECORD as usize];
    let mut block = vec![0u8; RECORD as usize];
    let read = |n: u64, block: &mut [u8]| {
        let (volume, offset) = place(n, files.len());
        files[volume].read_exact_at(block, offset).unwrap();
    };
    let mut n = 0;
    while n < max {
        read(n, &mut block);
        if block == zero {
            break;
        }
        if block != record(n) {
            return Err(format!("record {n} is torn or wrong"));
        }
        n += 1;
    }
    // Nothing after the prefix, in any image (read in large pieces: the rest is most of it).
    const CHUNK: usize = 256;
    let mut chunk = vec![0u8; CHUNK * RECORD as usize];
    for (volume, file) in files.iter().enumerate() {
        let volumes = files.len() as u64;
        // The first block of this volume at or after record n.
        let first = (n..n + volumes).find(|r| place(*r, files.len()).0 == volume);
        let Some(first) = first else { continue };
        let mut block_index = place(first, files.len()).1 / RECORD;
        let end = max.saturating_sub(volume as u64).div_ceil(volumes);
        while block_index < end {
            let count = ((end - block_index) as usize).min(CHUNK);
            let bytes = &mut chunk[..count * RECORD as usize];
            file.read_exact_at(bytes, block_index * RECORD).unwrap();
            for (i, b) in bytes.chunks(RECORD as usize).enumerate() {
                if b != zero {
                    let later = (block_index + i as u64) * volumes + volume as u64;
                    return Err(format!(
                        "record {later} (volume {volume}) is present but record {n} is not: not a prefix"
                    ));
                }
            }
            block_index += count as u64;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1000;

    /// Two images holding records `0..n`, and then also the records of `extra`.
    fn images(n: u64, extra: &[u64]) -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<_> = (0..2)
            .map(|i| dir.path().join(format!("{i}.img")))
            .collect();
        let files: Vec<_> = paths
            .iter()
            .map(|p| {
                let f = std::fs::File::create(p).unwrap();
                f.set_len(MAX.div_ceil(2) * RECORD).unwrap();
                f
            })
            .collect();
        for r in (0..n).chain(extra.iter().copied()) {
            let (volume, offset) = place(r, 2);
            files[volume].write_all_at(&record(r), offset).unwrap();
        }
        (dir, paths)
    }

    fn check(paths: &[std::path::PathBuf]) -> Result<u64, String> {
        prefix_length_across(&[&paths[0], &paths[1]], MAX)
    }

    #[test]
    fn a_prefix_is_measured_on_either_volume_and_up_to_the_end() {
        for n in [0, 1, 2, 517, MAX - 1, MAX] {
            let (_dir, paths) = images(n, &[]);
            assert_eq!(check(&paths), Ok(n));
        }
    }

    #[test]
    fn a_record_after_a_hole_is_found_on_either_volume_and_at_the_end() {
        for late in [101, 102, 600, MAX - 2, MAX - 1] {
            let (_dir, paths) = images(100, &[late]);
            let err = check(&paths).unwrap_err();
            assert!(err.contains(&format!("record {late} ")), "{late}: {err}");
        }
    }

    #[test]
    fn a_torn_record_is_found() {
        let (_dir, paths) = images(50, &[]);
        let (volume, offset) = place(20, 2);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&paths[volume])
            .unwrap();
        f.write_all_at(&[0xff; 512], offset + 1024).unwrap();
        assert_eq!(check(&paths), Err("record 20 is torn or wrong".into()));
    }
}
