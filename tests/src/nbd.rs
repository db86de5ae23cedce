//! A small blocking NBD client that speaks the wire format directly, so tests can send
//! exactly the bytes they mean (including bad ones).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail, ensure};

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;

pub struct NbdClient {
    pub stream: UnixStream,
    pub size: u64,
    pub transmission_flags: u16,
}

/// A simple reply: its error and handle.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub error: u32,
    pub handle: u64,
}

impl NbdClient {
    /// Connects and negotiates `export` with OPT_GO.
    pub fn connect(socket: &Path, export: &str) -> anyhow::Result<Self> {
        let mut stream =
            UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        ensure!(
            &greeting[..16] == b"NBDMAGICIHAVEOPT",
            "bad greeting {greeting:?}"
        );
        stream.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        stream.write_all(&opt)?;
        let (mut size, mut flags) = (None, 0);
        loop {
            let mut header = [0u8; 20];
            stream.read_exact(&mut header)?;
            let reply = u32::from_be_bytes(header[12..16].try_into()?);
            let len = u32::from_be_bytes(header[16..20].try_into()?) as usize;
            let mut body = vec![0u8; len];
            stream.read_exact(&mut body)?;
            match reply {
                1 => break,
                3 if body.len() == 12 && body[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(body[2..10].try_into()?));
                    flags = u16::from_be_bytes(body[10..12].try_into()?);
                }
                3 => {}
                other => bail!(
                    "OPT_GO refused ({other:#x}): {}",
                    String::from_utf8_lossy(&body)
                ),
            }
        }
        Ok(Self {
            stream,
            size: size.context("no INFO_EXPORT")?,
            transmission_flags: flags,
        })
    }

    pub fn send(
        &mut self,
        command: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        self.stream
            .write_all(&request(command, flags, handle, offset, len))?;
        self.stream.write_all(payload)
    }

    pub fn reply(&mut self) -> anyhow::Result<Reply> {
        read_reply(&mut self.stream)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<u32> {
        self.send(CMD_WRITE, 0, 1, offset, data.len() as u32, data)?;
        Ok(self.reply()?.error)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> anyhow::Result<Vec<u8>> {
        self.send(CMD_READ, 0, 2, offset, len, &[])?;
        let reply = self.reply()?;
        ensure!(
            reply.error == 0,
            "read failed with NBD error {}",
            reply.error
        );
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data)?;
        Ok(data)
    }

    /// Sends NBD_CMD_DISC and waits until the server closes the connection (by then it no
    /// longer counts this client).
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(CMD_DISC, 0, 0, 0, 0, &[])?;
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest)?;
        Ok(())
    }
}

/// A request header in wire format.
pub fn request(command: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(28);
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

pub fn read_reply(stream: &mut impl Read) -> anyhow::Result<Reply> {
    let mut header = [0u8; 16];
    stream.read_exact(&mut header)?;
    let magic = u32::from_be_bytes(header[..4].try_into()?);
    ensure!(magic == REPLY_MAGIC, "bad reply magic {magic:#x}");
    Ok(Reply {
        error: u32::from_be_bytes(header[4..8].try_into()?),
        handle: u64::from_be_bytes(header[8..16].try_into()?),
    })
}
