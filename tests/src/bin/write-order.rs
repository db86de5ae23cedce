//! The write-order checker as a program, for the demo and for operators trying a group:
//!
//! ```text
//! write-order write [--from N] [--max M] SOCKET:EXPORT...
//!     numbered, checksummed records, one 4 KiB block each, on the exports in turn, each
//!     written once the one before was answered; until record M, a write fails, or
//!     SIGTERM/SIGINT. Prints how many were answered.
//! write-order check [--max M] IMAGE...
//!     the records the images hold together, among the first M: exactly a prefix (no hole,
//!     no torn record), or an error naming the first offender.
//! ```
//!
//! Records `n` lives on image `n % images`, block `n / images`: with `--max`, the blocks
//! past the records' area are the application's own.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use blockrep_tests::NbdClient;
use blockrep_tests::records::{place, prefix_length_across, record};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: write-order write [--from N] [--max M] SOCKET:EXPORT...\n       write-order check [--max M] IMAGE..."
    );
    ExitCode::from(2)
}

/// `--from N` and `--max M` (in any order) before the positional arguments.
fn options(mut args: &[String]) -> Option<(u64, Option<u64>, &[String])> {
    let (mut from, mut max) = (0, None);
    loop {
        match args {
            [flag, n, rest @ ..] if flag == "--from" => {
                from = n.parse().ok()?;
                args = rest;
            }
            [flag, n, rest @ ..] if flag == "--max" => {
                max = Some(n.parse().ok()?);
                args = rest;
            }
            rest => return Some((from, max, rest)),
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("write") => write(&args[1..]),
        Some("check") => check(&args[1..]),
        _ => usage(),
    }
}

fn write(args: &[String]) -> ExitCode {
    let Some((from, max, targets)) = options(args) else {
        return usage();
    };
    if targets.is_empty() {
        return usage();
    }
    let max = max.unwrap_or(u64::MAX);
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc_signal(on_signal);
    }
    let mut clients = Vec::new();
    for target in targets {
        let Some((socket, export)) = target.split_once(':') else {
            return usage();
        };
        match NbdClient::connect(Path::new(socket), export) {
            Ok(c) => clients.push(c),
            Err(e) => {
                eprintln!("write-order: {target}: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut next = from;
    let why = loop {
        if STOP.load(Ordering::SeqCst) {
            break "stopped".to_owned();
        }
        if next >= max {
            break format!("the last of {max} records written");
        }
        let (volume, offset) = place(next, clients.len());
        match clients[volume].write(offset, &record(next)) {
            Ok(0) => next += 1,
            Ok(errno) => break format!("record {next} refused with NBD error {errno}"),
            Err(e) => break format!("record {next}: {e:#}"),
        }
    };
    println!("{next}");
    eprintln!("write-order: records {from}..{next} answered ({why})");
    ExitCode::SUCCESS
}

fn check(args: &[String]) -> ExitCode {
    let Some((_, max, paths)) = options(args) else {
        return usage();
    };
    if paths.is_empty() {
        return usage();
    }
    let images: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
    let fits = images
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len() / 4096))
        .min()
        .unwrap_or(0)
        * images.len() as u64;
    let max = max.unwrap_or(fits).min(fits);
    let refs: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    match prefix_length_across(&refs, max) {
        Ok(n) => {
            println!("{n}");
            eprintln!("write-order: the images hold records 0..{n}, exactly a prefix");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("write-order: NOT a prefix: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Installs `handler` for SIGINT and SIGTERM.
unsafe fn libc_signal(handler: extern "C" fn(i32)) {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler is async-signal-safe (an atomic store).
        let _ = unsafe { signal(sig, SigHandler::Handler(handler)) };
    }
}
