//! Exports that are not volumes: a [`BlockDevice`] (a drill volume: reads through layers,
//! writes to a private overlay) served with blocking I/O: one thread reads the requests,
//! a few handle them at once and answer as each completes. Such an export is writable, has
//! no block status, and takes FLUSH (it covers every write answered before it), FUA, TRIM
//! and WRITE_ZEROES.

use std::io::{self, Read, Write};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use crate::handshake::Negotiated;
use crate::proto::*;

/// A block device served over NBD.
pub trait BlockDevice: Send + Sync {
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset` (inside the device).
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset` (inside the device).
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Writes `len` zero bytes at `offset` (WRITE_ZEROES and TRIM).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
}

/// What an export name leads to.
#[derive(Clone)]
pub enum Export {
    Volume(Arc<blockrep_volume::Volume>),
    Device(Arc<dyn BlockDevice>),
}

impl Export {
    pub fn name(&self) -> &str {
        match self {
            Export::Volume(v) => v.name(),
            Export::Device(d) => d.name(),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Export::Volume(v) => v.size(),
            Export::Device(d) => d.size(),
        }
    }
}

/// Requests of one connection handled at once: a client's queue depth is served by this
/// many threads (replies go out as each completes, in any order, as NBD allows).
const WORKERS: usize = 8;

/// A request read off the socket, with its payload.
struct Job {
    request: Request,
    data: Vec<u8>,
}

/// Serves `device` until the client disconnects: requests are read from `reader` here and
/// handled by [`WORKERS`] threads, each answering on `writer` as it completes. Returns the
/// requests served.
pub fn serve_device<R: Read, W: Write + Send>(
    reader: &mut R,
    writer: W,
    device: &dyn BlockDevice,
    negotiated: Negotiated,
) -> io::Result<u64> {
    let writer = Mutex::new(writer);
    let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(WORKERS * 4);
    let queue = Mutex::new(queue);
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| answer_jobs(&queue, &writer, device, negotiated));
        }
        // Closing the queue (dropping `jobs`) lets the workers finish what is queued.
        read_requests(reader, jobs)
    })
}

/// Reads requests until the client disconnects, queueing each for the workers.
fn read_requests<R: Read>(reader: &mut R, jobs: SyncSender<Job>) -> io::Result<u64> {
    let mut served = 0u64;
    let mut header = [0u8; REQUEST_HEADER_LEN];
    loop {
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(served),
            Err(e) => return Err(e),
        }
        let request = Request::parse(&header)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let mut data = Vec::new();
        if request.has_payload() {
            if request.len > MAX_PAYLOAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a write of {} bytes, more than {MAX_PAYLOAD}", request.len),
                ));
            }
            data.resize(request.len as usize, 0);
            reader.read_exact(&mut data)?;
        }
        if request.command == Command::Disconnect {
            return Ok(served);
        }
        served += 1;
        if jobs.send(Job { request, data }).is_err() {
            // Every worker stopped: the client can no longer be answered.
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
    }
}

/// A worker: takes queued requests, does each, and writes its reply.
fn answer_jobs<W: Write>(
    queue: &Mutex<Receiver<Job>>,
    writer: &Mutex<W>,
    device: &dyn BlockDevice,
    negotiated: Negotiated,
) {
    let mut out = Vec::new();
    loop {
        let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(Job { request, mut data }) = job else {
            return;
        };
        out.clear();
        match handle(device, &request, &mut data, negotiated) {
            Ok(Some(read)) => {
                if negotiated.structured_replies {
                    put_read_chunk(&mut out, request.handle, request.offset, read.len() as u32);
                } else {
                    put_simple_reply(&mut out, 0, request.handle);
                }
                out.extend_from_slice(read);
            }
            Ok(None) => put_simple_reply(&mut out, 0, request.handle),
            Err(errno) if negotiated.structured_replies && request.command == Command::Read => {
                put_error_chunk(&mut out, request.handle, nbd_error(errno));
            }
            Err(errno) => put_simple_reply(&mut out, nbd_error(errno), request.handle),
        }
        let mut writer = writer.lock().unwrap_or_else(|e| e.into_inner());
        if writer
            .write_all(&out)
            .and_then(|()| writer.flush())
            .is_err()
        {
            // The client is gone; the reader sees it too.
            return;
        }
    }
}

/// Does one request: the bytes read for a READ, nothing for the others, or an errno.
fn handle<'a>(
    device: &dyn BlockDevice,
    request: &Request,
    data: &'a mut Vec<u8>,
    negotiated: Negotiated,
) -> Result<Option<&'a [u8]>, i32> {
    if request.flags & !request.command.allowed_flags(negotiated.structured_replies) != 0 {
        return Err(libc::EINVAL);
    }
    let len = u64::from(request.len);
    let in_bounds = request
        .offset
        .checked_add(len)
        .is_some_and(|end| end <= device.size());
    let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    match request.command {
        Command::Read | Command::Write | Command::Trim | Command::WriteZeroes if !in_bounds => {
            Err(libc::EINVAL)
        }
        Command::Read if request.len > MAX_PAYLOAD => Err(libc::EOVERFLOW),
        Command::Read => {
            data.resize(request.len as usize, 0);
            device.read(request.offset, data).map_err(errno)?;
            Ok(Some(&data[..]))
        }
        Command::Write => {
            device.write(request.offset, data).map_err(errno)?;
            if request.fua() {
                device.flush().map_err(errno)?;
            }
            Ok(None)
        }
        Command::Trim | Command::WriteZeroes => {
            device.write_zeroes(request.offset, len).map_err(errno)?;
            if request.fua() {
                device.flush().map_err(errno)?;
            }
            Ok(None)
        }
        Command::Flush => device.flush().map(|()| None).map_err(errno),
        Command::BlockStatus | Command::Unsupported(_) | Command::Disconnect => Err(libc::EINVAL),
    }
}
