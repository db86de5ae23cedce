//! NBD wire format: magic numbers, flags and the fixed-size headers, parsed without I/O.
//!
//! Reference: the NBD protocol document (`doc/proto.md` of the NBD project).

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FLAGS_KNOWN: u32 = (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) as u32;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

/// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

/// Information types of OPT_INFO / OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Largest request payload we accept (and advertise as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload we read during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;

/// A transmission-phase command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    /// A command we do not serve (CACHE, BLOCK_STATUS, RESIZE, or unknown): EINVAL.
    Unsupported(u16),
}

impl Command {
    fn from_wire(ty: u16) -> Self {
        match ty {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            other => Command::Unsupported(other),
        }
    }

    /// The command flags this command may carry.
    pub fn allowed_flags(self) -> u16 {
        match self {
            Command::Write | Command::Trim => CMD_FLAG_FUA,
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => 0,
        }
    }
}

/// A request header, as received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl Request {
    pub fn parse(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, BadMagic> {
        let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let be16 = |at: usize| u16::from_be_bytes(bytes[at..at + 2].try_into().expect("2 bytes"));
        let magic = be32(0);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(Self {
            flags: be16(4),
            command: Command::from_wire(be16(6)),
            handle: be64(8),
            offset: be64(16),
            len: be32(24),
        })
    }

    /// Whether the client sends `len` bytes of payload after this header.
    pub fn has_payload(&self) -> bool {
        self.command == Command::Write
    }

    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }
}

/// Appends a simple reply header.
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, handle: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// NBD error values (they match Linux errno for the ones NBD defines).
pub fn nbd_error(errno: i32) -> u32 {
    match errno {
        libc::EPERM
        | libc::EIO
        | libc::ENOMEM
        | libc::EINVAL
        | libc::ENOSPC
        | libc::EOVERFLOW
        | libc::ENOTSUP
        | libc::ESHUTDOWN => errno as u32,
        _ => libc::EIO as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_write_header() {
        let bytes: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // WRITE
            0, 0, 0, 0, 0, 0, 0, 42, // handle
            0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
            0, 0, 0x10, 0, // length 4096
        ];
        let req = Request::parse(&bytes).unwrap();
        assert_eq!(
            req,
            Request {
                flags: CMD_FLAG_FUA,
                command: Command::Write,
                handle: 42,
                offset: 4096,
                len: 4096
            }
        );
        assert!(req.fua() && req.has_payload());
    }

    #[test]
    fn rejects_bad_magic_and_maps_unknown_commands() {
        let mut bytes = [0u8; 28];
        assert_eq!(Request::parse(&bytes), Err(BadMagic(0)));
        bytes[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        bytes[7] = 99;
        assert_eq!(
            Request::parse(&bytes).unwrap().command,
            Command::Unsupported(99)
        );
    }

    #[test]
    fn simple_reply_golden_bytes() {
        let mut out = Vec::new();
        put_simple_reply(&mut out, 22, 7);
        assert_eq!(
            out,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
    }

    #[test]
    fn errors_outside_the_protocol_become_eio() {
        assert_eq!(nbd_error(libc::ENOSPC), 28);
        assert_eq!(nbd_error(libc::EBADF), 5);
    }
}
