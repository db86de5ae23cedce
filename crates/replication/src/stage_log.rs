//! The DR side's stage log: writes of units not yet applied, durable before they are
//! acknowledged, replayed after a crash.
//!
//! A unit's writes are appended as they arrive; its `Seal` record follows them, and the log
//! is synced before the seal is acknowledged. Applying the unit writes its data to the
//! volume; the volume is synced, then the applied epoch is recorded in the pair's DR state
//! file. After a crash, a sealed unit above the recorded epoch is applied again (the same
//! writes in the same order: idempotent) and unsealed writes are dropped.
//!
//! Appends gather in an aligned buffer written to the file with `O_DIRECT` (whole 4 KiB
//! blocks, so no page-cache copy and no write-back later); a unit's data also stays in
//! memory until it is applied, so applying reads nothing back, unless the unit is too big
//! to hold.
//!
//! Records: `u32 length | u8 kind | body`, then a CRC32 of kind and body. A length of zero
//! is padding to the next 4 KiB block. Appends go in batches of whole blocks, each opened by
//! a `Batch` record; a sync follows every seal, and a batch is written only once the one
//! before it is synced. So only the batch written after the last sync that returned can be
//! torn, in any of its blocks: a record that is not whole (short, failing its CRC, of no
//! known kind, or whose range does not fit its data) with no whole `Batch` record at any
//! later block is in that torn batch, and ends the log (it holds writes of a unit not yet
//! sealed, or a seal whose sync never returned: nothing acknowledged). A bad record with a
//! later batch after it is corruption of something that was durable: the log is refused,
//! and the file kept as it is for the operator. At open, everything after the last seal
//! (unsealed writes, a torn batch) is cut from the file before anything is appended.
//!
//! ```text
//! Batch  u64 offset of the batch in the file
//! Write  u64 epoch | u64 offset | u32 len | u8 zeroes | data (len bytes unless zeroes)
//! Seal   u64 epoch | u64 cut time (ms)
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use blockrep_core::ByteRange;
use blockrep_core::replication::Epoch;
use blockrep_volume::AlignedBuf;
use bytes::Bytes;

mod distinct;

use distinct::Distinct;

const KIND_WRITE: u8 = 1;
const KIND_SEAL: u8 = 2;
const KIND_BATCH: u8 = 3;
/// Length, kind and CRC around a record's body.
const RECORD_OVERHEAD: usize = 5 + 4;
const BLOCK: u64 = 4096;
/// Appends are gathered up to this size before they are written.
const BATCH_BYTES: usize = 4 << 20;
/// The CRC32 of no bytes.
const EMPTY_CRC: u32 = 0;
/// Staged data kept in memory for applying, at most; beyond it, data is read back.
const MEMORY_BYTES: u64 = 8 << 20;

fn seal_body(epoch: Epoch, cut_ms: u64) -> [u8; 16] {
    let mut body = [0u8; 16];
    body[..8].copy_from_slice(&epoch.0.to_le_bytes());
    body[8..].copy_from_slice(&cut_ms.to_le_bytes());
    body
}

/// A staged write: where its data is in the log, and the data itself while it is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    pub epoch: Epoch,
    pub range: ByteRange,
    pub zeroes: bool,
    /// Offset of the data in the log file.
    pub data_at: u64,
    pub data: Option<Bytes>,
}

/// A seal found in the log (the DR machine's).
pub use blockrep_core::pair::dr::SealRecord;

pub struct StageLog {
    path: PathBuf,
    /// Appends, with `O_DIRECT` where the file system allows it.
    direct: File,
    /// Reads (recovery, data not held in memory).
    file: File,
    /// The end of what is in the file (a multiple of 4 KiB).
    end: u64,
    /// Appended but not yet written.
    batch: AlignedBuf,
    /// Staged writes not yet applied, in log order.
    staged: Vec<Staged>,
    held_bytes: u64,
    /// [`StageLog::records_bytes`], kept as writes come and go.
    staged_bytes: u64,
    /// [`StageLog::distinct_bytes`].
    distinct: Distinct,
    /// A batch was written since the last sync: the next is written only after a sync.
    unsynced: bool,
}

/// The bytes of the writes `staged` holds (data or zero ranges), every copy counted.
fn bytes_of(staged: &[Staged]) -> u64 {
    staged.iter().map(|s| s.range.len).sum()
}

/// What [`StageLog::open`] found.
pub struct Recovered {
    pub log: StageLog,
    /// Seals above the applied epoch, in epoch order: their units must be applied again.
    pub seals: Vec<SealRecord>,
}

impl StageLog {
    /// Opens the log and reads what a crash left: writes and seals above `applied`.
    pub fn open(path: &Path, applied: Epoch) -> io::Result<Recovered> {
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let direct = match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                OpenOptions::new().write(true).open(path)?
            }
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        let Records {
            mut staged,
            mut seals,
            sealed_end,
        } = read_records(&file, len, applied)?;
        // In epoch order, whatever their order in the file (an earlier build could append a
        // seal of an epoch a later seal covered): the last is the newest for every reader.
        seals.sort_by_key(|s| s.epoch);
        seals.dedup_by_key(|s| s.epoch);
        // What follows the last seal was never acknowledged: writes of units never sealed,
        // and a torn tail. It is cut from the file, not only skipped: left there, a torn
        // record would stand in front of the next records (corruption at the next restart),
        // and unsealed writes behind a later seal of the same epoch number would join it.
        let last_seal = seals.last().map_or(applied, |s| s.epoch);
        staged.retain(|s| s.epoch <= last_seal && s.data_at < sealed_end);
        // New records start at the next block; the rest of the seal's block is zeroes
        // (padding), and the cut is durable before anything is appended after it.
        let end = sealed_end.div_ceil(BLOCK) * BLOCK;
        if len > sealed_end {
            file.set_len(sealed_end)?;
            file.set_len(end)?;
            file.sync_all()?;
        }
        if created {
            // The file itself survives a power cut before the first seal's sync.
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        let mut batch = AlignedBuf::new(BATCH_BYTES);
        batch.set_len(0);
        let sealed: Vec<Epoch> = seals.iter().map(|s| s.epoch).collect();
        let log = StageLog {
            path: path.to_owned(),
            direct,
            file,
            end,
            batch,
            staged_bytes: bytes_of(&staged),
            distinct: Distinct::of(&staged, &sealed),
            staged,
            held_bytes: 0,
            unsynced: false,
        };
        Ok(Recovered { log, seals })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a write (its data is `data`, empty for a zero range). The data is held in
    /// memory until its unit is applied, within a bound.
    pub fn append_write(
        &mut self,
        epoch: Epoch,
        range: ByteRange,
        zeroes: bool,
        data: &Bytes,
    ) -> io::Result<()> {
        self.append_write_with_crc(epoch, range, zeroes, data, crc32fast::hash(data))
    }

    /// [`StageLog::append_write`] for data whose CRC32 the caller has just checked (a
    /// write's CRC from the wire): the record's CRC is combined from it, not computed over
    /// the data again.
    pub fn append_write_with_crc(
        &mut self,
        epoch: Epoch,
        range: ByteRange,
        zeroes: bool,
        data: &Bytes,
        data_crc: u32,
    ) -> io::Result<()> {
        debug_assert_eq!(crc32fast::hash(data), data_crc, "the data's CRC");
        let mut body = [0u8; 21];
        body[..8].copy_from_slice(&epoch.0.to_le_bytes());
        body[8..16].copy_from_slice(&range.offset.to_le_bytes());
        body[16..20].copy_from_slice(&(range.len as u32).to_le_bytes());
        body[20] = u8::from(zeroes);
        let data_at = self.append(KIND_WRITE, &body, data, data_crc)? + 5 + 21;
        let held = !data.is_empty() && self.held_bytes + data.len() as u64 <= MEMORY_BYTES;
        if held {
            self.held_bytes += data.len() as u64;
        }
        self.staged.push(Staged {
            epoch,
            range,
            zeroes,
            data_at,
            data: held.then(|| data.clone()),
        });
        self.staged_bytes += range.len;
        self.distinct.add(epoch, range);
        Ok(())
    }

    /// Appends the seal of `epoch` and makes the log durable up to it.
    pub fn seal(&mut self, epoch: Epoch, cut_ms: u64) -> io::Result<()> {
        self.append(KIND_SEAL, &seal_body(epoch, cut_ms), &[], EMPTY_CRC)?;
        self.flush()?;
        self.sync()?;
        self.distinct.seal(epoch, &self.staged);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.direct.sync_data()?;
        self.unsynced = false;
        Ok(())
    }

    /// The staged writes of epochs ≤ `epoch`, in log order, taken out of the log's index.
    pub fn take_unit(&mut self, epoch: Epoch) -> Vec<Staged> {
        let (unit, rest): (Vec<Staged>, Vec<Staged>) =
            self.staged.drain(..).partition(|s| s.epoch <= epoch);
        self.staged = rest;
        self.staged_bytes -= bytes_of(&unit);
        self.distinct.take(epoch);
        self.held_bytes -= unit
            .iter()
            .filter_map(|s| s.data.as_ref())
            .map(|d| d.len() as u64)
            .sum::<u64>();
        unit
    }

    /// Drops staged writes of epochs after `after` (they will never be sealed).
    pub fn discard_after(&mut self, after: Epoch) {
        let dropped: u64 = self
            .staged
            .iter()
            .filter(|s| s.epoch > after)
            .filter_map(|s| s.data.as_ref())
            .map(|d| d.len() as u64)
            .sum();
        self.held_bytes -= dropped;
        self.staged.retain(|s| s.epoch <= after);
        self.staged_bytes = bytes_of(&self.staged);
        self.distinct.discarded(&self.staged);
    }

    /// A staged write's data: from memory, or read back from the log.
    pub fn read(&mut self, staged: &Staged, out: &mut [u8]) -> io::Result<()> {
        if let Some(data) = &staged.data {
            out.copy_from_slice(data);
            return Ok(());
        }
        self.flush()?;
        self.file.read_exact_at(out, staged.data_at)
    }

    /// Empties the log once nothing staged is left in it. Called after a unit was applied
    /// and recorded.
    pub fn truncate_if_empty(&mut self) -> io::Result<bool> {
        if !self.staged.is_empty() || !self.batch.is_empty() {
            return Ok(false);
        }
        self.file.set_len(0)?;
        // Durable before anything is appended at the start again: old records must never
        // reappear behind new ones after a power cut.
        self.file.sync_all()?;
        self.unsynced = false;
        self.end = 0;
        Ok(true)
    }

    /// Rewrites the log to hold only what is still staged, once it has grown past
    /// `threshold` bytes: under steady load the next epoch's writes are always there, so
    /// the log is never empty to truncate. The copy is synced and renamed over the log; a
    /// crash before the rename leaves the old log, whose extra records are all applied.
    /// `progress` is called after each write copied (the copy may be long).
    pub fn compact(
        &mut self,
        threshold: u64,
        held: &[SealRecord],
        progress: &dyn Fn(),
    ) -> io::Result<bool> {
        if self.bytes() < threshold || (self.staged.is_empty() && held.is_empty()) {
            return Ok(false);
        }
        self.flush()?;
        let tmp = self.path.with_extension("compact");
        let _ = std::fs::remove_file(&tmp);
        let Recovered { log: mut fresh, .. } = StageLog::open(&tmp, Epoch::ZERO)?;
        let staged = std::mem::take(&mut self.staged);
        for s in &staged {
            let data = match &s.data {
                Some(d) => d.clone(),
                None if s.zeroes => Bytes::new(),
                None => {
                    let mut buf = vec![0u8; s.range.len as usize];
                    self.file.read_exact_at(&mut buf, s.data_at)?;
                    Bytes::from(buf)
                }
            };
            fresh.append_write(s.epoch, s.range, s.zeroes, &data)?;
            progress();
        }
        // Units sealed but not applied (held for their group's commit, or still to replay)
        // keep their seals, in order, after their writes: a seal covers the writes of its
        // epoch and earlier before it.
        for seal in held {
            fresh.append(
                KIND_SEAL,
                &seal_body(seal.epoch, seal.cut_ms),
                &[],
                EMPTY_CRC,
            )?;
        }
        fresh.flush()?;
        fresh.sync()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        fresh.path = self.path.clone();
        // The same records: what they count is unchanged (the copy counted them all as open).
        fresh.distinct = std::mem::take(&mut self.distinct);
        *self = fresh;
        Ok(true)
    }

    pub fn staged_len(&self) -> usize {
        self.staged.len()
    }

    /// Bytes of the writes staged and not yet applied (sealed or not), every copy of a block
    /// counted: what their records hold. The file is compacted once it grows past a
    /// threshold, so it stays within this plus that threshold.
    pub fn records_bytes(&self) -> u64 {
        self.staged_bytes
    }

    /// Bytes of the volume the units staged and not yet applied change, each block once per
    /// unit: what the stage log's cap counts.
    pub fn distinct_bytes(&self) -> u64 {
        self.distinct.bytes()
    }

    /// [`StageLog::distinct_bytes`] once a write of `range` is staged too.
    pub fn distinct_bytes_with(&self, range: ByteRange) -> u64 {
        self.distinct.bytes_with(range)
    }

    /// Bytes the log holds on disk and in its append buffer.
    pub fn bytes(&self) -> u64 {
        self.end + self.batch.len() as u64
    }

    /// Appends a record to the batch (opening a batch first if none is); returns the
    /// record's offset in the log. `data_crc` is the CRC32 of `data`.
    fn append(&mut self, kind: u8, body: &[u8], data: &[u8], data_crc: u32) -> io::Result<u64> {
        let record = RECORD_OVERHEAD + body.len() + data.len();
        if !self.batch.is_empty() && self.batch.len() + record > self.batch.capacity() {
            self.flush()?;
        }
        if self.batch.is_empty() {
            let opened = RECORD_OVERHEAD + 8 + record;
            if opened > self.batch.capacity() {
                // A record bigger than the batch gets a bigger buffer, kept for the next
                // ones up to twice the batch's size (a catch-up's extents are all alike).
                self.batch = AlignedBuf::new(opened.next_multiple_of(BLOCK as usize));
                self.batch.set_len(0);
            }
            self.put(KIND_BATCH, &self.end.to_le_bytes(), &[], EMPTY_CRC);
        }
        let at = self.end + self.batch.len() as u64;
        self.put(kind, body, data, data_crc);
        Ok(at)
    }

    /// Puts a record at the end of the batch, which has room for it.
    fn put(&mut self, kind: u8, body: &[u8], data: &[u8], data_crc: u32) {
        let record = RECORD_OVERHEAD + body.len() + data.len();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&[kind]);
        hasher.update(body);
        hasher.combine(&crc32fast::Hasher::new_with_initial_len(
            data_crc,
            data.len() as u64,
        ));
        let len = self.batch.len();
        self.batch.set_len(len + record);
        let out = &mut self.batch[len..];
        out[..4].copy_from_slice(&((body.len() + data.len()) as u32).to_le_bytes());
        out[4] = kind;
        out[5..5 + body.len()].copy_from_slice(body);
        out[5 + body.len()..5 + body.len() + data.len()].copy_from_slice(data);
        out[record - 4..].copy_from_slice(&hasher.finalize().to_le_bytes());
    }

    /// Writes the batch to the file, padded to whole blocks (not synced). The batch before
    /// it is synced first, so a power cut can tear only the last batch written.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        if self.unsynced {
            self.sync()?;
        }
        let used = self.batch.len();
        let mut padded = used.next_multiple_of(BLOCK as usize);
        if (1..4).contains(&(padded - used)) {
            // Padding must hold a zero length field (four bytes) to read as padding.
            padded += BLOCK as usize;
            if padded > self.batch.capacity() {
                let mut bigger = AlignedBuf::new(padded);
                bigger.set_len(used);
                bigger[..used].copy_from_slice(&self.batch[..used]);
                self.batch = bigger;
            }
        }
        self.batch.set_len(padded);
        self.batch[used..].fill(0);
        self.direct.write_all_at(&self.batch, self.end)?;
        self.unsynced = true;
        self.end += padded as u64;
        self.batch.set_len(0);
        if self.batch.capacity() > 2 * BATCH_BYTES {
            self.batch = AlignedBuf::new(BATCH_BYTES);
            self.batch.set_len(0);
        }
        Ok(())
    }
}

/// What the log holds above an applied epoch: every write record (sealed or not) and every
/// seal, in log order, and where the last seal record (of any epoch) ends.
struct Records {
    staged: Vec<Staged>,
    seals: Vec<SealRecord>,
    sealed_end: u64,
}

/// One record as it lies in the log.
#[derive(Debug, PartialEq, Eq)]
enum Record {
    Write {
        epoch: Epoch,
        range: ByteRange,
        zeroes: bool,
        /// Where its data starts in the log.
        data_at: u64,
    },
    Seal(SealRecord),
    /// The start of a batch.
    Batch,
    /// Zeroes up to the next block.
    Padding,
}

/// What is at an offset of the log.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// A record, and the offset after it.
    Record(Record, u64),
    /// Not a record: too short, a length past the file, a CRC that fails, an unknown kind
    /// or a body that does not fit its kind.
    Bad(&'static str),
}

/// The longest record body: a 64 MiB write and its fields.
const MAX_BODY: u64 = (64 << 20) + 64;

/// Reads the record at `at` of `log` (`len` bytes long).
fn record_at(log: &(impl ReadAt + ?Sized), len: u64, at: u64) -> io::Result<Found> {
    let to_boundary = BLOCK - at % BLOCK;
    if to_boundary < 4 && at + to_boundary < len {
        // Zeroes too short for a header up to a block boundary where a batch starts: the
        // padding of a batch that ended just short of it.
        let mut rest = [0u8; 3];
        let rest = &mut rest[..to_boundary as usize];
        log.read_at(rest, at)?;
        if rest.iter().all(|&b| b == 0)
            && let Found::Record(Record::Batch, _) = record_at(log, len, at + to_boundary)?
        {
            return Ok(Found::Record(Record::Padding, at + to_boundary));
        }
    }
    let mut header = [0u8; 5];
    if at + 5 > len {
        return Ok(Found::Bad("a record header cut short"));
    }
    log.read_at(&mut header, at)?;
    let body_len = u64::from(u32::from_le_bytes(header[..4].try_into().expect("4")));
    if body_len == 0 {
        return Ok(Found::Record(Record::Padding, (at / BLOCK + 1) * BLOCK));
    }
    let kind = header[4];
    let fits_kind = match kind {
        KIND_WRITE => body_len >= 21,
        KIND_SEAL => body_len == 16,
        KIND_BATCH => body_len == 8,
        _ => return Ok(Found::Bad("a record of an unknown kind")),
    };
    if !fits_kind {
        return Ok(Found::Bad("a record whose length does not fit its kind"));
    }
    if body_len > MAX_BODY || at + 5 + body_len + 4 > len {
        return Ok(Found::Bad("a record longer than what follows it"));
    }
    let mut body = vec![0u8; body_len as usize];
    log.read_at(&mut body, at + 5)?;
    let mut crc = [0u8; 4];
    log.read_at(&mut crc, at + 5 + body_len)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(&body);
    if hasher.finalize() != u32::from_le_bytes(crc) {
        return Ok(Found::Bad("a record that fails its CRC"));
    }
    let next = at + 5 + body_len + 4;
    let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8"));
    let record = match kind {
        KIND_WRITE if body.len() >= 21 => {
            let offset = u64_at(8);
            let range_len = u64::from(u32::from_le_bytes(body[16..20].try_into().expect("4")));
            let zeroes = body[20] != 0;
            // A data write carries exactly its range's bytes; no range wraps.
            if offset.checked_add(range_len).is_none()
                || (!zeroes && body.len() as u64 != 21 + range_len)
            {
                return Ok(Found::Bad(
                    "a write record whose range does not fit its data",
                ));
            }
            Record::Write {
                epoch: Epoch(u64_at(0)),
                range: ByteRange::new(offset, range_len),
                zeroes,
                data_at: at + 5 + 21,
            }
        }
        KIND_SEAL if body.len() == 16 => Record::Seal(SealRecord {
            epoch: Epoch(u64_at(0)),
            cut_ms: u64_at(8),
        }),
        // A batch names where it starts: one found elsewhere is not this file's.
        KIND_BATCH if body.len() == 8 && u64_at(0) == at => Record::Batch,
        KIND_BATCH => return Ok(Found::Bad("a batch record out of its place")),
        _ => return Ok(Found::Bad("a record of an unknown kind")),
    };
    Ok(Found::Record(record, next))
}

/// Reads the log's records above `applied`. A record that is not whole ends the log if no
/// whole batch starts at any later block: it is in the last batch written, after the last
/// sync that returned (a batch is written only once the one before it is synced, and a sync
/// follows every seal), so that batch holds only writes of a unit not yet sealed, or a seal
/// whose sync never returned: nothing acknowledged. A bad record with a later batch after it
/// is corruption of something that was durable: an error, and the file is left as it is.
fn read_records(log: &(impl ReadAt + ?Sized), len: u64, applied: Epoch) -> io::Result<Records> {
    let mut staged = Vec::new();
    let mut seals = Vec::new();
    let mut sealed_end = 0u64;
    let mut at = 0u64;
    // Padding ends a batch, and only a batch follows it. Zeroes elsewhere are a block of
    // the torn batch that never reached the disk, and what follows them is the middle of
    // that batch, not records.
    let mut after_padding = false;
    while at < len {
        let found = match record_at(log, len, at)? {
            Found::Record(record, _)
                if after_padding && !matches!(record, Record::Batch | Record::Padding) =>
            {
                Found::Bad("a record after padding, where a batch should start")
            }
            // The log starts with a batch; zeroes there are its lost first block.
            Found::Record(Record::Padding, _) if at == 0 => {
                Found::Bad("zeroes where the log's first batch should start")
            }
            found => found,
        };
        let (record, next) = match found {
            Found::Record(record, next) => (record, next),
            Found::Bad(what) => {
                if let Some(later) = batch_after(log, len, at)? {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the stage log is corrupt: {what} at offset {at}, with a later batch \
                             at offset {later} (not a torn tail); it is kept as it is"
                        ),
                    ));
                }
                break;
            }
        };
        match record {
            Record::Write {
                epoch,
                range,
                zeroes,
                data_at,
            } if epoch > applied => staged.push(Staged {
                epoch,
                range,
                zeroes,
                data_at,
                data: None,
            }),
            Record::Seal(seal) => {
                sealed_end = next;
                if seal.epoch > applied {
                    seals.push(seal);
                }
            }
            _ => {}
        }
        after_padding = record == Record::Padding;
        at = next;
    }
    Ok(Records {
        staged,
        seals,
        sealed_end,
    })
}

/// The first block boundary after `at` where a whole batch starts, if any: written only
/// once everything before it was synced.
fn batch_after(log: &(impl ReadAt + ?Sized), len: u64, at: u64) -> io::Result<Option<u64>> {
    let mut block = (at / BLOCK + 1) * BLOCK;
    while block < len {
        // Only a batch record's header is read whole: a block may start inside a write's
        // data with what reads as a header of a long record.
        let mut header = [0u8; 5];
        if block + 5 <= len {
            log.read_at(&mut header, block)?;
        }
        if header == batch_header()
            && let Found::Record(Record::Batch, _) = record_at(log, len, block)?
        {
            return Ok(Some(block));
        }
        block += BLOCK;
    }
    Ok(None)
}

/// The five bytes a batch record starts with.
fn batch_header() -> [u8; 5] {
    let mut header = [0u8; 5];
    header[..4].copy_from_slice(&8u32.to_le_bytes());
    header[4] = KIND_BATCH;
    header
}

/// Positional reads: of the log file, or of its bytes in memory (the fuzzer's).
pub trait ReadAt {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset)
            .ok()
            .filter(|&s| s <= self.len() && self.len() - s >= buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(&self[start..start + buf.len()]);
        Ok(())
    }
}

/// What a stage log's bytes hold above `applied`: its staged writes' ranges and its seals,
/// or why it is corrupt. The same reading the agent does at start-up, over bytes in memory
/// (for the fuzzer).
pub fn parse(bytes: &[u8], applied: Epoch) -> io::Result<(Vec<ByteRange>, Vec<SealRecord>)> {
    let Records { staged, seals, .. } = read_records(bytes, bytes.len() as u64, applied)?;
    Ok((staged.into_iter().map(|s| s.range).collect(), seals))
}

/// The ranges of every write a stage log holds for epochs after `after`, sealed or not, and
/// the newest seal in it: what a promotion drops, found before the log is opened (which
/// forgets unsealed writes).
pub fn writes_after(path: &Path, after: Epoch) -> io::Result<(Vec<ByteRange>, Option<SealRecord>)> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let Records { staged, seals, .. } = read_records(&file, len, Epoch::ZERO)?;
    let ranges = staged
        .into_iter()
        .filter(|s| s.epoch > after)
        .map(|s| s.range)
        .collect();
    Ok((ranges, seals.iter().max_by_key(|s| s.epoch).copied()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    /// A sealed unit holding an empty write (the log takes one) opens again, and counts
    /// nothing for it.
    #[test]
    fn a_sealed_empty_write_opens_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage-log");
        {
            let Recovered { mut log, .. } = StageLog::open(&path, Epoch(0)).unwrap();
            log.append_write(Epoch(1), ByteRange::new(0, 0), false, &Bytes::new())
                .unwrap();
            log.append_write(Epoch(1), ByteRange::new(0, 4), false, &b(b"aaaa"))
                .unwrap();
            log.seal(Epoch(1), 1).unwrap();
        }
        let Recovered { log, seals } = StageLog::open(&path, Epoch(0)).unwrap();
        assert_eq!(seals.len(), 1);
        assert_eq!(log.distinct_bytes(), 4);
    }

    /// Records whose CRC is combined from the writes' own CRCs, one of them bigger than a
    /// batch (its grown buffer is kept for the small ones after it), read back whole after
    /// a restart: recovery checks each record's CRC over its bytes.
    #[test]
    fn records_with_combined_crcs_read_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage-log");
        let data = |len: usize, seed: u8| -> Bytes {
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect()
        };
        let writes = [
            (ByteRange::new(0, 4096), data(4096, 1)),
            (ByteRange::new(8 << 20, 5 << 20), data(5 << 20, 2)),
            (ByteRange::new(4096, 1000), data(1000, 3)),
            (ByteRange::new(16 << 20, 1 << 20), data(1 << 20, 4)),
        ];
        {
            let Recovered { mut log, .. } = StageLog::open(&path, Epoch(0)).unwrap();
            for (range, d) in &writes {
                log.append_write_with_crc(Epoch(1), *range, false, d, crc32fast::hash(d))
                    .unwrap();
            }
            log.seal(Epoch(1), 7).unwrap();
        }
        let Recovered { mut log, seals } = StageLog::open(&path, Epoch(0)).unwrap();
        assert_eq!(seals.len(), 1, "the seal behind the records was found");
        let unit = log.take_unit(Epoch(1));
        assert_eq!(unit.len(), writes.len(), "every record passed its CRC");
        for (staged, (range, d)) in unit.iter().zip(&writes) {
            assert_eq!(staged.range, *range);
            let mut back = vec![0u8; d.len()];
            log.read(staged, &mut back).unwrap();
            assert!(back == d[..], "the data of {range} read back");
        }
    }

    #[test]
    fn sealed_units_are_replayed_and_unsealed_writes_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage-log");
        {
            let Recovered { mut log, seals } = StageLog::open(&path, Epoch(0)).unwrap();
            assert!(seals.is_empty());
            log.append_write(Epoch(1), ByteRange::new(0, 4), false, &b(b"aaaa"))
                .unwrap();
            log.append_write(Epoch(2), ByteRange::new(8, 4), false, &b(b"bbbb"))
                .unwrap();
            log.seal(Epoch(1), 111).unwrap();
            log.append_write(Epoch(2), ByteRange::new(16, 4096), true, &Bytes::new())
                .unwrap();
            log.flush().unwrap();
            // Crash: epoch 2 was never sealed.
        }
        let Recovered { mut log, seals } = StageLog::open(&path, Epoch(0)).unwrap();
        assert_eq!(
            seals,
            vec![SealRecord {
                epoch: Epoch(1),
                cut_ms: 111
            }]
        );
        let unit = log.take_unit(Epoch(1));
        assert_eq!(unit.len(), 1);
        assert!(unit[0].data.is_none(), "read back after a restart");
        let mut data = [0u8; 4];
        log.read(&unit[0], &mut data).unwrap();
        assert_eq!(&data, b"aaaa");
        assert_eq!(log.staged_len(), 0, "epoch 2's writes were dropped");
        assert!(log.truncate_if_empty().unwrap());

        // Once epoch 1 is recorded as applied, nothing is replayed.
        let Recovered { seals, .. } = StageLog::open(&path, Epoch(1)).unwrap();
        assert!(seals.is_empty());
    }

    #[test]
    fn compaction_keeps_only_what_is_still_staged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage-log");
        let Recovered { mut log, .. } = StageLog::open(&path, Epoch(0)).unwrap();
        log.append_write(Epoch(1), ByteRange::new(0, 4), false, &b(b"aaaa"))
            .unwrap();
        log.append_write(Epoch(2), ByteRange::new(4, 4), false, &b(b"bbbb"))
            .unwrap();
        log.seal(Epoch(1), 1).unwrap();
        let unit = log.take_unit(Epoch(1));
        let mut data = [0u8; 4];
        log.read(&unit[0], &mut data).unwrap();
        assert_eq!(&data, b"aaaa", "held in memory");
        let before = log.bytes();
        assert!(log.compact(0, &[], &|| {}).unwrap());
        assert!(log.bytes() <= before);
        log.seal(Epoch(2), 2).unwrap();
        drop(log);
        let Recovered { mut log, seals } = StageLog::open(&path, Epoch(1)).unwrap();
        assert_eq!(seals.len(), 1);
        let unit = log.take_unit(Epoch(2));
        log.read(&unit[0], &mut data).unwrap();
        assert_eq!(&data, b"bbbb");
    }

    #[test]
    fn compaction_keeps_the_seals_of_units_held_for_their_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage-log");
        let Recovered { mut log, .. } = StageLog::open(&path, Epoch(0)).unwrap();
        for (epoch, data) in [(1, b"aaaa"), (2, b"bbbb"), (3, b"cccc")] {
            log.append_write(Epoch(epoch), ByteRange::new(0, 4), false, &b(data))
                .unwrap();
            log.seal(Epoch(epoch), epoch * 10).unwrap();
        }
        log.take_unit(Epoch(1));
        let held = [
            SealRecord {
                epoch: Epoch(2),
                cut_ms: 20,
            },
            SealRecord {
                epoch: Epoch(3),
                cut_ms: 30,
            },
        ];
        assert!(log.compact(0, &held, &|| {}).unwrap());
        drop(log);
        // Applied up to 1: the two held units are still sealed after the rewrite.
        let Recovered { mut log, seals } = StageLog::open(&path, Epoch(1)).unwrap();
        assert_eq!(seals, held.to_vec());
        let mut data = [0u8; 4];
        let unit = log.take_unit(Epoch(3));
        assert_eq!(unit.len(), 2);
        log.read(&unit[1], &mut data).unwrap();
        assert_eq!(&data, b"cccc");
    }

    /// A log of two units, each a write and its seal, in two synced batches.
    fn two_sealed_batches(dir: &Path) -> PathBuf {
        let path = dir.join("stage-log");
        let Recovered { mut log, .. } = StageLog::open(&path, Epoch(0)).unwrap();
        for (epoch, data) in [(1, b"aaaa"), (2, b"cccc")] {
            log.append_write(Epoch(epoch), ByteRange::new(0, 4), false, &b(data))
                .unwrap();
            log.seal(Epoch(epoch), epoch + 4).unwrap();
        }
        path
    }

    fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
        let file = OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(bytes, at).unwrap();
    }

    #[test]
    fn a_bad_record_with_whole_records_after_it_is_corruption_and_the_file_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = two_sealed_batches(dir.path());
        // A bit flips in the first batch, which was synced and acknowledged long ago.
        overwrite(&path, 30, b"X");
        let before = std::fs::read(&path).unwrap();
        let err = StageLog::open(&path, Epoch(0)).err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("corrupt"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "the file is kept");
        assert!(writes_after(&path, Epoch(0)).is_err());
    }

    /// A record as the log holds it: length, kind, body, CRC.
    fn encoded(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.push(kind);
        out.extend_from_slice(body);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&[kind]);
        hasher.update(body);
        out.extend_from_slice(&hasher.finalize().to_le_bytes());
        out
    }

    fn write_body(offset: u64, len: u32, zeroes: bool, data: &[u8]) -> Vec<u8> {
        let mut body = 1u64.to_le_bytes().to_vec();
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
        body.push(u8::from(zeroes));
        body.extend_from_slice(data);
        body
    }

    #[test]
    fn records_whose_range_does_not_fit_their_data_are_not_records() {
        let whole = encoded(KIND_WRITE, &write_body(4096, 4, false, b"abcd"));
        assert_eq!(
            parse(&whole, Epoch(0)).unwrap().0,
            vec![ByteRange::new(4096, 4)]
        );
        // A range that wraps past u64::MAX; a write claiming more data than it carries.
        for bad in [
            write_body(u64::MAX, 4, true, b""),
            write_body(0, 4096, false, b"abcd"),
        ] {
            let log = encoded(KIND_WRITE, &bad);
            assert_eq!(
                parse(&log, Epoch(0)).unwrap(),
                (vec![], vec![]),
                "a torn tail"
            );
        }
    }

    #[test]
    fn a_torn_tail_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = two_sealed_batches(dir.path());
        // Tear the second batch: its seal record no longer checks.
        overwrite(&path, BLOCK + 30, b"XX");
        let Recovered { mut log, seals } = StageLog::open(&path, Epoch(0)).unwrap();
        assert_eq!(seals.len(), 1);
        assert_eq!(log.take_unit(Epoch(1)).len(), 1);
        assert_eq!(log.staged_len(), 0);
    }

    /// A power cut tears the last batch in the middle of a block. The agent restarts, stages
    /// and seals a new unit, and the power fails again: the new unit is whole in the log and
    /// replayed (the torn record's bytes were cut, not left in front of it), and the writes
    /// of the unit that was never sealed are gone from the file too, so a later seal of the
    /// same epoch number cannot take them in.
    #[test]
    fn a_torn_last_batch_is_dropped_and_what_follows_it_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage-log");
        {
            let Recovered { mut log, .. } = StageLog::open(&path, Epoch(0)).unwrap();
            log.append_write(Epoch(1), ByteRange::new(0, 4), false, &b(b"aaaa"))
                .unwrap();
            log.seal(Epoch(1), 5).unwrap();
            // The next batch: two writes of a unit not yet sealed, the second torn.
            log.append_write(Epoch(2), ByteRange::new(4096, 4), false, &b(b"bbbb"))
                .unwrap();
            log.append_write(Epoch(2), ByteRange::new(8192, 4), false, &b(b"cccc"))
                .unwrap();
            log.flush().unwrap();
        }
        let batch_record = (RECORD_OVERHEAD + 8) as u64;
        let second_write = BLOCK + batch_record + (RECORD_OVERHEAD + 21 + 4) as u64;
        overwrite(&path, second_write + 30, b"XX");
        {
            let Recovered { mut log, seals } = StageLog::open(&path, Epoch(0)).unwrap();
            assert_eq!(seals.len(), 1);
            log.append_write(Epoch(2), ByteRange::new(12288, 4), false, &b(b"dddd"))
                .unwrap();
            log.seal(Epoch(2), 6).unwrap();
        }
        let Recovered { mut log, seals } = StageLog::open(&path, Epoch(0))
            .expect("a torn tail cut at the restart is not corruption after the next one");
        assert_eq!(
            seals.iter().map(|s| s.epoch).collect::<Vec<_>>(),
            vec![Epoch(1), Epoch(2)]
        );
        let ranges: Vec<u64> = log
            .take_unit(Epoch(2))
            .iter()
            .map(|s| s.range.offset)
            .collect();
        assert_eq!(
            ranges,
            vec![0, 12288],
            "the unsealed writes of the first epoch 2 are gone"
        );
    }

    /// A block of the last batch that never reached the disk reads as zeroes, like the
    /// padding at a batch's end. What follows it is the middle of the batch, not the start
    /// of another: a write's data that holds the bytes of a seal record there must not be
    /// taken for a seal (only a batch can follow padding).
    #[test]
    fn a_lost_block_of_the_torn_batch_is_not_padding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage-log");
        let data_at = BLOCK + (RECORD_OVERHEAD + 8 + 5 + 21) as u64;
        let mut data = vec![0x5a_u8; 8192];
        let forged = encoded(KIND_SEAL, &seal_body(Epoch(2), 99));
        let inside = (2 * BLOCK - data_at) as usize;
        data[inside..inside + forged.len()].copy_from_slice(&forged);
        {
            let Recovered { mut log, .. } = StageLog::open(&path, Epoch(0)).unwrap();
            log.append_write(Epoch(1), ByteRange::new(0, 4), false, &b(b"aaaa"))
                .unwrap();
            log.seal(Epoch(1), 5).unwrap();
            // The next batch, never synced: one write of a unit not sealed.
            log.append_write(Epoch(2), ByteRange::new(1 << 20, 8192), false, &b(&data))
                .unwrap();
            log.flush().unwrap();
        }
        // The batch's first block was lost at the power cut.
        overwrite(&path, BLOCK, &[0; BLOCK as usize]);
        let Recovered { log, seals } = StageLog::open(&path, Epoch(0)).unwrap();
        assert_eq!(
            seals.iter().map(|s| s.epoch).collect::<Vec<_>>(),
            vec![Epoch(1)],
            "a seal was read out of a write's data"
        );
        assert_eq!(log.staged_len(), 1);
    }

    /// A batch whose records end 1 to 3 bytes before a block boundary is padded by fewer
    /// bytes than a record header: the log reads on as the next batch, not as a record that
    /// straddles the boundary. The same for such a log written before padding was at least
    /// a header long.
    #[test]
    fn a_batch_ending_just_short_of_a_block_is_followed_by_the_next() {
        for short in 1..=4usize {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("stage-log");
            // The batch record, a write and a seal: 17 + (30 + n) + 25 bytes.
            let n = BLOCK as usize - short - (RECORD_OVERHEAD + 8) - (RECORD_OVERHEAD + 21) - 25;
            {
                let Recovered { mut log, .. } = StageLog::open(&path, Epoch(0)).unwrap();
                let range = ByteRange::new(0, n as u64);
                log.append_write(Epoch(1), range, false, &b(&vec![1; n]))
                    .unwrap();
                log.seal(Epoch(1), 5).unwrap();
                log.append_write(Epoch(2), ByteRange::new(8192, 4), false, &b(b"bbbb"))
                    .unwrap();
                log.seal(Epoch(2), 6).unwrap();
            }
            let Recovered { log, seals } = StageLog::open(&path, Epoch(0))
                .unwrap_or_else(|e| panic!("{short} bytes short of a block: {e}"));
            assert_eq!(seals.len(), 2, "{short} bytes short of a block");
            assert_eq!(log.staged_len(), 2);

            // Written the old way: the second batch right at the next boundary.
            let bytes = std::fs::read(&path).unwrap();
            let mut old = bytes[..BLOCK as usize - short].to_vec();
            old.resize(BLOCK as usize, 0);
            old.extend(encoded(KIND_BATCH, &BLOCK.to_le_bytes()));
            let second = bytes.len() - BLOCK as usize;
            old.extend(&bytes[second + RECORD_OVERHEAD + 8..]);
            let Records { seals, .. } = read_records(old.as_slice(), old.len() as u64, Epoch(0))
                .unwrap_or_else(|e| panic!("{short} bytes short, the old way: {e}"));
            assert_eq!(seals.len(), 2, "{short} bytes short, the old way");
        }
    }

    /// A seal of an earlier epoch after a later one (a production side that should never
    /// send it) does not hide the later unit's writes: what the log holds sealed is
    /// everything up to its highest seal.
    #[test]
    fn a_seal_of_an_earlier_epoch_after_a_later_one_keeps_the_later_unit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage-log");
        {
            let Recovered { mut log, .. } = StageLog::open(&path, Epoch(3)).unwrap();
            log.append_write(Epoch(4), ByteRange::new(0, 4), false, &b(b"aaaa"))
                .unwrap();
            log.append_write(Epoch(5), ByteRange::new(4096, 4), false, &b(b"bbbb"))
                .unwrap();
            log.seal(Epoch(5), 5).unwrap();
            log.seal(Epoch(4), 4).unwrap();
        }
        // Every reader takes the highest seal as the newest: the replay, the staged epoch
        // the DR side reports, a promotion.
        let (_, newest) = writes_after(&path, Epoch(3)).unwrap();
        assert_eq!(newest.map(|s| s.epoch), Some(Epoch(5)));
        let Recovered { log, seals } = StageLog::open(&path, Epoch(3)).unwrap();
        assert_eq!(log.staged_len(), 2, "the unit of epoch 5 lost a write");
        assert_eq!(
            seals.iter().map(|s| s.epoch).collect::<Vec<_>>(),
            [Epoch(4), Epoch(5)],
            "the seals to replay, in epoch order"
        );
    }

    /// The same when the lost block is the log's first.
    #[test]
    fn a_lost_first_block_is_not_padding_either() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage-log");
        let data_at = (RECORD_OVERHEAD + 8 + 5 + 21) as u64;
        let mut data = vec![0x5a_u8; 8192];
        let forged = encoded(KIND_SEAL, &seal_body(Epoch(1), 99));
        let inside = (BLOCK - data_at) as usize;
        data[inside..inside + forged.len()].copy_from_slice(&forged);
        {
            let Recovered { mut log, .. } = StageLog::open(&path, Epoch(0)).unwrap();
            log.append_write(Epoch(1), ByteRange::new(1 << 20, 8192), false, &b(&data))
                .unwrap();
            log.flush().unwrap();
        }
        overwrite(&path, 0, &[0; BLOCK as usize]);
        let Recovered { seals, .. } = StageLog::open(&path, Epoch(0)).unwrap();
        assert!(seals.is_empty(), "a seal was read out of a write's data");
    }

    /// A unit of 6 MiB spans two batches; the first was synced before the second was
    /// written. A power cut can tear the second anywhere, even before a record of it that
    /// made it whole: that is the torn tail, not corruption. A bad record in the first batch,
    /// which a later batch proves synced, is corruption.
    #[test]
    fn only_the_batch_after_the_last_sync_can_be_torn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage-log");
        let mib = Bytes::from(vec![7u8; 1 << 20]);
        {
            let Recovered { mut log, .. } = StageLog::open(&path, Epoch(0)).unwrap();
            log.append_write(Epoch(1), ByteRange::new(0, 4), false, &b(b"aaaa"))
                .unwrap();
            log.seal(Epoch(1), 5).unwrap();
            for i in 0..6 {
                log.append_write(Epoch(2), ByteRange::new(i << 20, 1 << 20), false, &mib)
                    .unwrap();
            }
            log.flush().unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        // The second batch of epoch 2 starts at the last batch record in the file.
        let file = File::open(&path).unwrap();
        let batches: Vec<u64> = (0..len / BLOCK)
            .map(|b| b * BLOCK)
            .filter(|&at| {
                matches!(
                    record_at(&file, len, at).unwrap(),
                    Found::Record(Record::Batch, _)
                )
            })
            .collect();
        assert_eq!(
            batches.len(),
            3,
            "the seal's batch and epoch 2's two: {batches:?}"
        );
        let last = batches[2];

        let torn = dir.path().join("torn");
        std::fs::copy(&path, &torn).unwrap();
        // The first record of the last batch is torn; the records after it are whole.
        overwrite(&torn, last + 100, b"XX");
        let Recovered { log, seals } = StageLog::open(&torn, Epoch(0)).expect("a torn tail");
        assert_eq!(seals.len(), 1);
        assert_eq!(log.staged_len(), 1, "epoch 1's write only");

        let corrupt = dir.path().join("corrupt");
        std::fs::copy(&path, &corrupt).unwrap();
        overwrite(&corrupt, batches[1] + 100, b"XX");
        let err = StageLog::open(&corrupt, Epoch(0)).err().expect("refused");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
