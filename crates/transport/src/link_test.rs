//! Measuring a link: what one replication stream between two agents moves, with the same
//! TLS, transport settings, framing and CRC checks as a pair, but no disks.
//!
//! The client opens a stream whose `Hello` names the nil pair, sends 1 MiB `Write` frames
//! for the given time, then a `Flush`; the agent checks each frame's CRC, drops the data,
//! and answers the flush once everything before it arrived. The figure is the bytes sent
//! over the time until that answer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blockrep_core::VolumeId;
use blockrep_core::replication::{
    Epoch, GenerationId, Lineage, PairId, ReplicationModel, WriteSeq,
};
use blockrep_wire::{
    Frame, Hello, HelloFlags, ProtocolVersion, WriteFlags, WriteHeader, payload_crc,
};
use bytes::Bytes;

use crate::endpoint::{CallError, ClusterEndpoint, ReplicationStream};
use crate::framed::StreamError;

/// The pair id a link test's `Hello` carries.
pub fn link_test_pair() -> PairId {
    PairId::from_bytes([0; 16])
}

#[derive(Debug, thiserror::Error)]
pub enum LinkTestError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("the agent refused the link test: {0}")]
    Refused(String),
    #[error("{0} of the frames failed their CRC on the way")]
    Corrupted(u64),
}

/// What a link test measured.
#[derive(Clone, Copy, Debug)]
pub struct LinkTestResult {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl LinkTestResult {
    pub fn megabytes_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64()
    }
}

/// Streams data to the agent at `address` for `duration`.
pub async fn run(
    endpoint: &ClusterEndpoint,
    address: SocketAddr,
    server_name: &str,
    duration: Duration,
) -> Result<LinkTestResult, LinkTestError> {
    let hello = Hello {
        version: ProtocolVersion::CURRENT,
        pair: link_test_pair(),
        volume: VolumeId::from_bytes([0; 16]),
        size: 0,
        model: ReplicationModel::Async,
        node: "link-test".into(),
        lineage: Lineage::new(GenerationId(1)),
        flags: HelloFlags::default(),
    };
    let ReplicationStream {
        mut reader,
        mut writer,
    } = endpoint
        .open_replication(address, server_name, hello)
        .await?;
    match reader.next().await? {
        Some(Frame::Welcome { .. }) => {}
        Some(Frame::Refuse { reason, .. }) => return Err(LinkTestError::Refused(reason)),
        _ => return Err(LinkTestError::Refused("no Welcome".into())),
    }
    let payload = Bytes::from(
        (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect::<Vec<u8>>(),
    );
    let crc = payload_crc(&payload);
    let started = Instant::now();
    let mut chunks = Vec::new();
    let mut seq = 0u64;
    while started.elapsed() < duration {
        for _ in 0..8 {
            let header = WriteHeader {
                flags: WriteFlags(0),
                epoch: Epoch(1),
                seq: WriteSeq(seq),
                offset: seq << 20,
                len: payload.len() as u32,
                crc,
            };
            seq += 1;
            writer.push_write(&header, payload.clone(), &mut chunks);
        }
        writer.send_chunks(&mut chunks).await?;
    }
    let sent = writer.bytes_sent;
    writer.send(&Frame::Flush { seq: WriteSeq(seq) }).await?;
    loop {
        match reader.next().await? {
            Some(Frame::FlushAck { .. }) => break,
            Some(Frame::Reject { .. }) => return Err(LinkTestError::Corrupted(1)),
            Some(_) => {}
            None => return Err(LinkTestError::Refused("stream closed early".into())),
        }
    }
    let elapsed = started.elapsed();
    writer.finish();
    Ok(LinkTestResult {
        bytes: sent,
        elapsed,
    })
}

/// The agent's side: check every frame's CRC, drop the data, answer the flush.
pub async fn sink(mut stream: ReplicationStream) {
    let welcome = Frame::Welcome {
        applied: Epoch::ZERO,
        staged: Epoch::ZERO,
        consistent: false,
        lineage: Lineage::new(GenerationId(1)),
    };
    if stream.writer.send(&welcome).await.is_err() {
        return;
    }
    loop {
        match stream.reader.next().await {
            Ok(Some(Frame::Write(header, payload))) => {
                if payload_crc(&payload) != header.crc {
                    let _ = stream
                        .writer
                        .send(&Frame::Reject {
                            seq: header.seq,
                            reason: blockrep_wire::RejectReason::Checksum,
                        })
                        .await;
                }
            }
            Ok(Some(Frame::Flush { seq })) => {
                if stream.writer.send(&Frame::FlushAck { seq }).await.is_err() {
                    return;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}
