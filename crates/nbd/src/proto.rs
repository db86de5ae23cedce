//! NBD wire format: magic numbers, flags and the fixed-size headers, parsed without I/O.
//!
//! Reference: the NBD protocol document (`doc/proto.md` of the NBD project).

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

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
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
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
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// The one metadata context served, and the id it gets once selected.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const META_BASE_ALLOCATION_ID: u32 = 1;
/// `base:allocation` extent flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Largest read or write we serve (and advertise as the maximum block size). Larger reads
/// are refused with EINVAL; larger writes have their payload read and dropped, then EINVAL.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Largest option payload we read during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;

/// A transmission-phase command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
    /// A command we do not serve (CACHE, RESIZE, or unknown): EINVAL.
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
            7 => Command::BlockStatus,
            other => Command::Unsupported(other),
        }
    }

    /// The command flags this command may carry. FUA is allowed on every command (the
    /// spec lets a client send it anywhere once `SEND_FUA` is advertised; where it means
    /// nothing it is ignored); DF only once structured replies are negotiated.
    pub fn allowed_flags(self, structured: bool) -> u16 {
        match self {
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            Command::Read if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            Command::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => CMD_FLAG_FUA,
        }
    }

    /// Whether the command changes the volume (and so passes the write gate).
    pub fn writes(self) -> bool {
        matches!(self, Command::Write | Command::WriteZeroes | Command::Trim)
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

/// Appends a structured reply chunk header; `len` bytes of payload follow.
pub fn put_chunk_header(out: &mut Vec<u8>, flags: u16, ty: u16, handle: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends the final chunk of a read: `OFFSET_DATA` with the offset; `len` data bytes
/// follow. A read of nothing gets a `NONE` chunk.
pub fn put_read_chunk(out: &mut Vec<u8>, handle: u64, offset: u64, len: u32) {
    if len == 0 {
        put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
        return;
    }
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        8 + len,
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends a final `ERROR` chunk (no message).
pub fn put_error_chunk(out: &mut Vec<u8>, handle: u64, error: u32) {
    put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// Appends a final `BLOCK_STATUS` chunk for one context: (length, flags) per extent.
pub fn put_block_status(out: &mut Vec<u8>, handle: u64, context: u32, extents: &[(u32, u32)]) {
    let len = 4 + 8 * extents.len() as u32;
    put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, len);
    out.extend_from_slice(&context.to_be_bytes());
    for (length, flags) in extents {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
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
    fn structured_chunks_golden_bytes() {
        let mut out = Vec::new();
        put_read_chunk(&mut out, 7, 4096, 2);
        out.extend_from_slice(b"hi");
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0,
                10, // header
                0, 0, 0, 0, 0, 0, 0x10, 0, b'h', b'i'
            ]
        );
        out.clear();
        put_error_chunk(&mut out, 9, 22);
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 6, 0, 0, 0,
                22, 0, 0
            ]
        );
        out.clear();
        put_block_status(&mut out, 3, 1, &[(4096, 3), (8192, 0)]);
        assert_eq!(out.len(), 20 + 4 + 16);
        assert_eq!(&out[4..8], &[0, 1, 0, 5]);
        assert_eq!(&out[20..28], &[0, 0, 0, 1, 0, 0, 0x10, 0]);
    }

    #[test]
    fn fua_is_allowed_on_every_command() {
        for command in [
            Command::Read,
            Command::Flush,
            Command::Trim,
            Command::BlockStatus,
        ] {
            assert_ne!(
                command.allowed_flags(false) & CMD_FLAG_FUA,
                0,
                "{command:?}"
            );
        }
        assert_eq!(Command::Read.allowed_flags(false) & CMD_FLAG_DF, 0);
        assert_ne!(Command::Read.allowed_flags(true) & CMD_FLAG_DF, 0);
    }

    #[test]
    fn errors_outside_the_protocol_become_eio() {
        assert_eq!(nbd_error(libc::ENOSPC), 28);
        assert_eq!(nbd_error(libc::EBADF), 5);
    }
}
