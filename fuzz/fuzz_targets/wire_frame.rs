//! The replication wire's frame decoder: any bytes decode to frames, an error or "need
//! more", never a panic; every frame decoded encodes back to bytes that decode to itself.
//! A write's header read ahead of its payload agrees with decoding the frame once its
//! payload is there: the same header, or the same error.
#![no_main]

use blockrep_wire::{Frame, WriteAhead};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// Whatever `write_ahead` finds in `data`, decoding `data` padded to the frame's declared
/// length (up to 1 MiB) finds too.
fn check_write_ahead(data: &[u8]) {
    let ahead = blockrep_wire::write_ahead(data);
    if data.len() < 4 {
        return;
    }
    let declared = 4 + u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
    if declared > 1 << 20 || declared <= data.len() {
        return;
    }
    let mut padded = BytesMut::from(data);
    padded.resize(declared, 0);
    let decoded = Frame::decode(&mut padded);
    match ahead {
        Ok(WriteAhead::Data(header)) => {
            assert!(matches!(decoded, Ok(Some(Frame::Write(h, _))) if h == header), "{decoded:?}");
        }
        Err(e) => assert_eq!(decoded, Err(e)),
        Ok(WriteAhead::HeaderIncomplete | WriteAhead::Other) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    check_write_ahead(data);
    let mut input = BytesMut::from(data);
    while let Ok(Some(frame)) = Frame::decode(&mut input) {
        let mut encoded = BytesMut::new();
        frame.encode(&mut encoded);
        let again = Frame::decode(&mut encoded)
            .expect("an encoded frame decodes")
            .expect("an encoded frame is whole");
        assert_eq!(frame, again);
        assert!(encoded.is_empty(), "one frame, all of it");
    }
});
