//! Everything the CLI prints goes through here: when the reader of its output has gone
//! away (`blockrep ... | grep -q active`, `| head`), the CLI ends quietly, as other Unix
//! tools do, instead of panicking on a broken pipe.

use std::io::Write;

/// Exit status of a process that stopped because its output pipe closed (128 + SIGPIPE),
/// as a shell reports a tool killed by SIGPIPE.
const CLOSED_PIPE_STATUS: i32 = 128 + libc::SIGPIPE;

/// Writes `text` to standard output and flushes it.
pub fn write(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(CLOSED_PIPE_STATUS);
        }
        eprintln!("blockrep: writing the output: {e}");
        std::process::exit(1);
    }
}

/// `print!` through [`write`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::stdout::write(&format!($($arg)*))
    };
}

/// `println!` through [`write`].
macro_rules! sayln {
    () => {
        $crate::stdout::write("\n")
    };
    ($($arg:tt)*) => {
        $crate::stdout::write(&format!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {say, sayln};
