//! Fuzzes the ship protocol's receive path. If the first byte is even (as a real frame's
//! "P" is), the whole input is a byte stream: frames are split off one after another,
//! CRC-checked, decompressed and validated by kind. If it is odd, the CRC is skipped so
//! the fuzzer reaches bytecheck directly: bits 1.. pick the kind and the rest is the
//! archive itself. Nothing may panic; a batch that validates must deserialize, survive
//! an archive round trip unchanged, and get the same `check_batch` verdict both times.
#![no_main]

use libfuzzer_sys::fuzz_target;
use promgate_proto::ship::{
    access, archive, check_batch, open_body, split_frame, write_frame, ArchivedAck, ArchivedHello,
    ArchivedShipBatch, ArchivedShipError, ArchivedWelcome, ShipBatch, FLAG_SNAPPY, HEADER_BYTES,
    KIND_ACK, KIND_BATCH, KIND_ERROR, KIND_HELLO, KIND_WELCOME,
};
use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;

fn validate(kind: u8, body: &[u8]) {
    match kind {
        KIND_HELLO => {
            if let Ok(h) = access::<ArchivedHello>(body) {
                let _ = (h.agent.as_str().len(), h.shard.to_native());
            }
        }
        KIND_WELCOME => {
            if let Ok(w) = access::<ArchivedWelcome>(body) {
                let _ = w.applied_seq.to_native();
            }
        }
        KIND_ACK => {
            if let Ok(a) = access::<ArchivedAck>(body) {
                let _ = a.seq.to_native();
            }
        }
        KIND_ERROR => {
            if let Ok(e) = access::<ArchivedShipError>(body) {
                let _ = (e.code.to_native(), e.message.as_str().len());
            }
        }
        KIND_BATCH => {
            let Ok(a) = access::<ArchivedShipBatch>(body) else {
                return;
            };
            let verdict = check_batch(a);
            let owned: ShipBatch = rkyv::deserialize::<ShipBatch, RkyvError>(a)
                .expect("a validated archive deserializes");
            let again = archive(&owned);
            let b = access::<ArchivedShipBatch>(&again).expect("a fresh archive validates");
            assert_eq!(check_batch(b).is_ok(), verdict.is_ok());
            let back: ShipBatch = rkyv::deserialize::<ShipBatch, RkyvError>(b).unwrap();
            assert_eq!(back, owned);
            if verdict.is_ok() {
                assert_eq!(owned.sample_ts.len(), owned.samples());
                assert_eq!(owned.sample_values.len(), owned.samples());
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(&mode) = data.first() else { return };
    let mut body = AlignedVec::new();
    if mode & 1 == 1 {
        let kind = (mode >> 1) % 5 + 1;
        body.extend_from_slice(&data[1..]);
        validate(kind, &body);
        return;
    }
    let mut at = 0;
    while let Ok(Some((h, range))) = split_frame(&data[at..]) {
        assert!(range.start == HEADER_BYTES && range.end <= data.len() - at);
        let wire = &data[at + range.start..at + range.end];
        at += range.end;
        if open_body(&h, wire, &mut body).is_err() {
            continue;
        }
        // What was accepted re-frames to the same bytes when it came uncompressed.
        if h.flags & FLAG_SNAPPY == 0 {
            let mut again = Vec::new();
            write_frame(h.kind, &body, false, &mut again);
            assert_eq!(&again[HEADER_BYTES..], wire);
            assert_eq!(
                &again[8..16],
                &data[at - range.end + 8..at - range.end + 16]
            );
        }
        validate(h.kind, &body);
    }
});
