//! Fuzzes the remote_write decoder. The first byte picks the protocol and whether the
//! rest goes through the snappy path first; the decoder must never panic, every span
//! and run it keeps must lie inside the body and its arrays, and for 1.0 bodies that
//! prost also accepts, kept plus rejected series must account for all of prost's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use promgate_proto::messages::v1;
use promgate_proto::remote_write;
use promgate_proto::{decode, Batch, Limits, Protocol, RejectCounts};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let protocol = if mode & 1 == 0 { Protocol::V1 } else { Protocol::V2 };
    let mut decompressed = Vec::new();
    let body: &[u8] = if mode & 2 != 0 {
        match remote_write::decompress(rest, 1 << 20, &mut snap::raw::Decoder::new(), &mut decompressed) {
            Ok(n) => &decompressed[..n],
            Err(_) => return,
        }
    } else {
        rest
    };
    let mut batch = Batch::default();
    let mut reasons = RejectCounts::default();
    if decode(protocol, body, &Limits::default(), &mut batch, &mut reasons).is_err() {
        assert!(batch.series.is_empty(), "a failed decode keeps nothing");
        return;
    }
    let in_body = |s: promgate_proto::batch::Span| (s.start as usize + s.len as usize) <= body.len();
    for l in &batch.labels {
        assert!(in_body(l.name) && in_body(l.value));
    }
    for s in &batch.series {
        assert!(s.labels.end as usize <= batch.labels.len());
        assert!(s.samples.end as usize <= batch.samples.len());
        assert!(s.histograms.end as usize <= batch.histograms.len());
        assert!(s.exemplars.end as usize <= batch.exemplars.len());
        for l in &batch.labels[s.labels.range()] {
            assert!(std::str::from_utf8(&body[l.name.range()]).is_ok());
            assert!(std::str::from_utf8(&body[l.value.range()]).is_ok());
        }
    }
    if protocol == Protocol::V1 {
        if let Ok(req) = v1::WriteRequest::decode(body) {
            assert_eq!(batch.series.len() + batch.rejected.series as usize, req.timeseries.len());
        }
    }
});
