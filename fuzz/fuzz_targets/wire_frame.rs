//! The replication wire's frame decoder: any bytes decode to frames, an error or "need
//! more", never a panic; every frame decoded encodes back to bytes that decode to itself.
//! A data write's header read ahead of its payload is found only where decoding needs more.
#![no_main]

use blockrep_wire::Frame;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(_)) = blockrep_wire::pending_data_write(data) {
        assert_eq!(Frame::decode(&mut BytesMut::from(data)), Ok(None));
    }
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
