//! The fixed-newstyle handshake, done with blocking I/O before the transmission loop starts.

use std::io::{self, Read, Write};
use std::sync::Arc;

use blockrep_core::replication::WriteVerdict;
use blockrep_volume::Volume;

use crate::device::{BlockDevice, Export};
use crate::proto::*;

/// The exports a server offers, looked up by name.
pub trait ExportSet: Send + Sync {
    fn find(&self, name: &str) -> Option<Arc<Volume>>;
    fn names(&self) -> Vec<String>;
    /// An export that is not a volume (a drill's), if `name` is one.
    fn find_device(&self, _name: &str) -> Option<Arc<dyn BlockDevice>> {
        None
    }
}

/// The export `name` names: a volume, or else a device.
fn find(exports: &dyn ExportSet, name: &str) -> Option<Export> {
    exports
        .find(name)
        .map(Export::Volume)
        .or_else(|| exports.find_device(name).map(Export::Device))
}

/// What the client and server agreed on for the transmission phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged: reads answer with chunks.
    pub structured_replies: bool,
    /// `base:allocation` was selected for the chosen export: BLOCK_STATUS is served.
    pub base_allocation: bool,
}

/// How the handshake ended.
pub enum Outcome {
    /// The client chose this export; transmission starts.
    Transmit(Export, Negotiated),
    /// The client sent OPT_ABORT or asked for an export that does not exist (OPT_EXPORT_NAME
    /// cannot be refused gracefully).
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake I/O: {0}")]
    Io(#[from] io::Error),
    #[error("client flags {0:#x} include unknown bits")]
    UnknownClientFlags(u32),
    #[error("client does not speak fixed newstyle")]
    NotFixedNewstyle,
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {option} carries {len} bytes, more than {MAX_OPTION_LEN}")]
    OptionTooLong { option: u32, len: u32 },
}

/// The flags sent with every export: what transmission supports. With structured replies
/// negotiated, [`TFLAG_SEND_DF`] is added (a read is always one chunk).
pub const TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

/// Block sizes advertised: any alignment works (unaligned writes are read-modify-write),
/// 4 KiB is fast, 64 MiB is the most one read or write may carry.
pub const BLOCK_SIZES: (u32, u32, u32) = (1, 4096, MAX_PAYLOAD);

/// The flags for `volume`: [`TRANSMISSION_FLAGS`], plus `SEND_DF` with structured replies
/// and `READ_ONLY` while the volume's role refuses writes (the DR side of a pair).
fn transmission_flags(negotiated: &Negotiated, export: &Export) -> u16 {
    let mut flags = TRANSMISSION_FLAGS;
    if negotiated.structured_replies {
        flags |= TFLAG_SEND_DF;
    }
    if let Export::Volume(volume) = export
        && volume.gate().role().write_verdict() == WriteVerdict::Refuse
    {
        flags |= TFLAG_READ_ONLY;
    }
    flags
}

/// Metadata contexts selected with `NBD_OPT_SET_META_CONTEXT`: for which export.
struct MetaSelection {
    export: String,
}

pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    exports: &dyn ExportSet,
) -> Result<Outcome, HandshakeError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting)?;
    stream.flush()?;

    let client_flags = read_u32(stream)?;
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(HandshakeError::UnknownClientFlags(client_flags));
    }
    if client_flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(HandshakeError::NotFixedNewstyle);
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    let mut negotiated = Negotiated::default();
    let mut meta: Option<MetaSelection> = None;
    // Block status is served for the export the contexts were selected for.
    let chosen =
        |export: &Export, negotiated: Negotiated, meta: &Option<MetaSelection>| Negotiated {
            base_allocation: matches!(export, Export::Volume(_))
                && meta.as_ref().is_some_and(|m| m.export == export.name()),
            ..negotiated
        };

    loop {
        let mut header = [0u8; 16];
        stream.read_exact(&mut header)?;
        let magic = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        let option = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        if len > MAX_OPTION_LEN {
            return Err(HandshakeError::OptionTooLong { option, len });
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;

        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(volume) = find(exports, &name) else {
                    tracing::info!(export = %name, "client asked for an unknown export; closing");
                    return Ok(Outcome::Closed);
                };
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&volume.size().to_be_bytes());
                reply.extend_from_slice(&transmission_flags(&negotiated, &volume).to_be_bytes());
                if !no_zeroes {
                    reply.resize(reply.len() + 124, 0);
                }
                stream.write_all(&reply)?;
                stream.flush()?;
                let negotiated = chosen(&volume, negotiated, &meta);
                return Ok(Outcome::Transmit(volume, negotiated));
            }
            OPT_ABORT => {
                // The client may already be gone; the acknowledgement is best effort.
                let _ = option_reply(stream, option, REP_ACK, &[]);
                return Ok(Outcome::Closed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(stream, option, REP_ERR_INVALID, b"OPT_LIST takes no data")?;
                    continue;
                }
                for name in exports.names() {
                    let mut entry = Vec::with_capacity(4 + name.len());
                    entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    entry.extend_from_slice(name.as_bytes());
                    option_reply(stream, option, REP_SERVER, &entry)?;
                }
                option_reply(stream, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info_request(&data) else {
                    option_reply(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        b"malformed OPT_INFO/OPT_GO data",
                    )?;
                    continue;
                };
                let Some(volume) = find(exports, &name) else {
                    let msg = format!("no export named {name:?}");
                    option_reply(stream, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&volume.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags(&negotiated, &volume).to_be_bytes());
                option_reply(stream, option, REP_INFO, &info)?;
                let (min, preferred, max) = BLOCK_SIZES;
                let mut sizes = Vec::with_capacity(14);
                sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                for v in [min, preferred, max] {
                    sizes.extend_from_slice(&v.to_be_bytes());
                }
                option_reply(stream, option, REP_INFO, &sizes)?;
                if requests.contains(&INFO_NAME) {
                    let mut named = INFO_NAME.to_be_bytes().to_vec();
                    named.extend_from_slice(volume.name().as_bytes());
                    option_reply(stream, option, REP_INFO, &named)?;
                }
                option_reply(stream, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    let negotiated = chosen(&volume, negotiated, &meta);
                    return Ok(Outcome::Transmit(volume, negotiated));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(stream, option, REP_ERR_INVALID, b"takes no data")?;
                } else if negotiated.structured_replies {
                    option_reply(stream, option, REP_ERR_INVALID, b"already negotiated")?;
                } else {
                    negotiated.structured_replies = true;
                    option_reply(stream, option, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !negotiated.structured_replies {
                    let msg = b"negotiate structured replies first";
                    option_reply(stream, option, REP_ERR_INVALID, msg)?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&data) else {
                    option_reply(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        b"malformed meta context request",
                    )?;
                    continue;
                };
                let Some(export) = find(exports, &name) else {
                    let msg = format!("no export named {name:?}");
                    option_reply(stream, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let Export::Volume(volume) = export else {
                    // A device has no block status: no context is selected.
                    if option == OPT_SET_META_CONTEXT {
                        meta = None;
                    }
                    option_reply(stream, option, REP_ACK, &[])?;
                    continue;
                };
                let listing = option == OPT_LIST_META_CONTEXT;
                let selects_allocation = if listing && queries.is_empty() {
                    true
                } else {
                    queries
                        .iter()
                        .any(|q| q == "base:" || q == META_BASE_ALLOCATION)
                };
                if !listing {
                    meta = None;
                }
                if selects_allocation {
                    // Listing replies carry id 0, as the spec asks.
                    let id = if listing { 0 } else { META_BASE_ALLOCATION_ID };
                    let mut reply = id.to_be_bytes().to_vec();
                    reply.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    option_reply(stream, option, REP_META_CONTEXT, &reply)?;
                    if !listing {
                        meta = Some(MetaSelection {
                            export: volume.name().to_owned(),
                        });
                    }
                }
                option_reply(stream, option, REP_ACK, &[])?;
            }
            _ => option_reply(stream, option, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

/// `u32 name length, name, u16 count, count × u16`.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + name_len)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((String::from_utf8(name.to_vec()).ok()?, requests))
}

/// `u32 name length, name, u32 count, count × (u32 length, query)`.
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut at = 0;
    let string = |at: &mut usize| -> Option<String> {
        let len = u32::from_be_bytes(data.get(*at..*at + 4)?.try_into().ok()?) as usize;
        let bytes = data.get(*at + 4..*at + 4 + len)?;
        *at += 4 + len;
        String::from_utf8(bytes.to_vec()).ok()
    };
    let name = string(&mut at)?;
    let count = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
    at += 4;
    let mut queries = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        queries.push(string(&mut at)?);
    }
    (at == data.len()).then_some((name, queries))
}

fn option_reply<S: Write>(stream: &mut S, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    stream.write_all(&out)?;
    stream.flush()
}

fn read_u32<S: Read>(stream: &mut S) -> io::Result<u32> {
    let mut b = [0u8; 4];
    stream.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_request_parsing() {
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"vol");
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&15u32.to_be_bytes());
        data.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta_request(&data),
            Some(("vol".into(), vec!["base:allocation".into()]))
        );
        assert_eq!(parse_meta_request(&data[..data.len() - 1]), None);
        data.push(0);
        assert_eq!(parse_meta_request(&data), None, "trailing bytes");
    }

    #[test]
    fn info_request_parsing() {
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"vol");
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&data),
            Some(("vol".into(), vec![INFO_BLOCK_SIZE]))
        );
        assert_eq!(
            parse_info_request(&data[..data.len() - 1]),
            None,
            "truncated list"
        );
        assert_eq!(
            parse_info_request(&[0, 0, 0, 9, b'x']),
            None,
            "name past the end"
        );
    }

    /// A scripted client on one side of an in-memory stream.
    struct Scripted {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct NoExports;
    impl ExportSet for NoExports {
        fn find(&self, _: &str) -> Option<Arc<Volume>> {
            None
        }
        fn names(&self) -> Vec<String> {
            vec!["a".into()]
        }
    }

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn greeting_list_and_abort_golden_bytes() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(OPT_LIST, &[]));
        input.extend(option(OPT_ABORT, &[]));
        let mut s = Scripted {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        assert!(matches!(negotiate(&mut s, &NoExports), Ok(Outcome::Closed)));
        let mut expected = b"NBDMAGICIHAVEOPT\x00\x03".to_vec();
        let reply = |ty: u32, data: &[u8]| {
            let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&OPT_LIST.to_be_bytes());
            r.extend_from_slice(&ty.to_be_bytes());
            r.extend_from_slice(&(data.len() as u32).to_be_bytes());
            r.extend_from_slice(data);
            r
        };
        expected.extend(reply(REP_SERVER, b"\x00\x00\x00\x01a"));
        expected.extend(reply(REP_ACK, b""));
        let mut abort = reply(REP_ACK, b"");
        abort[8..12].copy_from_slice(&OPT_ABORT.to_be_bytes());
        expected.extend(abort);
        assert_eq!(s.output, expected);
    }

    #[test]
    fn unknown_export_and_unknown_option_get_errors() {
        let mut input = 1u32.to_be_bytes().to_vec();
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"nope");
        go.extend_from_slice(&0u16.to_be_bytes());
        input.extend(option(OPT_GO, &go));
        input.extend(option(42, b"xyz"));
        let mut s = Scripted {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        let err = negotiate(&mut s, &NoExports)
            .err()
            .expect("EOF after the options");
        assert!(matches!(err, HandshakeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof));
        let types: Vec<u32> = {
            let mut at = 18;
            let mut types = Vec::new();
            while at + 20 <= s.output.len() {
                types.push(u32::from_be_bytes(
                    s.output[at + 12..at + 16].try_into().unwrap(),
                ));
                let len =
                    u32::from_be_bytes(s.output[at + 16..at + 20].try_into().unwrap()) as usize;
                at += 20 + len;
            }
            types
        };
        assert_eq!(types, vec![REP_ERR_UNKNOWN, REP_ERR_UNSUP]);
    }

    #[test]
    fn bad_option_magic_and_huge_options_are_refused() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend_from_slice(&[0u8; 16]);
        let mut s = Scripted {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        assert!(matches!(
            negotiate(&mut s, &NoExports),
            Err(HandshakeError::BadOptionMagic(0))
        ));

        let mut input = 1u32.to_be_bytes().to_vec();
        let mut opt = option(OPT_GO, &[]);
        opt[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        input.extend(opt);
        let mut s = Scripted {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        assert!(matches!(
            negotiate(&mut s, &NoExports),
            Err(HandshakeError::OptionTooLong { .. })
        ));
    }
}
