//! Prometheus's XOR chunks, checked against a real Prometheus (Debian's 2.42) on
//! 127.0.0.1: its own `/api/v1/read` streams STREAMED_XOR_CHUNKS; every chunk must
//! decode (with `promgate_proto::xor`) to exactly the samples the same query returns as
//! SAMPLES, and re-encoding those samples must give Prometheus's bytes back.

mod common;

use common::{free_port, start_prometheus, temp_dir, Client};
use promgate_proto::messages::read::{
    self, ChunkedReadResponse, LabelMatcher, Query, ReadRequest, ReadResponse,
};
use promgate_proto::xor::{self, XorEncoder};
use prost::Message;
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type Series = BTreeMap<String, Vec<(i64, u64)>>;

/// How long Prometheus scrapes itself before it is read back.
const SCRAPE_WINDOW_S: u64 = 8;

fn key(labels: &[promgate_proto::messages::v1::Label]) -> String {
    labels
        .iter()
        .map(|l| format!("{}={:?}", l.name, l.value))
        .collect::<Vec<_>>()
        .join(",")
}

fn read(port: u16, response_type: i32, start: i64, end: i64) -> common::Response {
    let req = ReadRequest {
        queries: vec![Query {
            start_timestamp_ms: start,
            end_timestamp_ms: end,
            matchers: vec![LabelMatcher {
                r#type: read::MATCH_RE,
                name: "__name__".into(),
                value: "prometheus_.*|up|scrape_.*".into(),
            }],
            hints: None,
        }],
        accepted_response_types: vec![response_type],
    };
    let body = snap::raw::Encoder::new()
        .compress_vec(&req.encode_to_vec())
        .unwrap();
    let headers = [
        ("Content-Type", "application/x-protobuf"),
        ("Content-Encoding", "snappy"),
        ("X-Prometheus-Remote-Read-Version", "0.1.0"),
    ];
    let r = Client::connect(port)
        .unwrap()
        .request("POST", "/api/v1/read", &headers, &body)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

#[test]
fn decodes_and_reproduces_the_chunks_a_real_prometheus_streams() {
    let dir = temp_dir("xor");
    let port = free_port();
    let config = format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: prometheus\n    static_configs: [{{targets: [\"127.0.0.1:{port}\"]}}]\n");
    let _prom = start_prometheus(&dir, port, &config);
    let now_ms = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let start = now_ms() - 3_600_000;
    // Ready, then enough 1 s scrapes for chunks with many samples.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    while !Client::connect(port).is_ok_and(|mut c| {
        c.request("GET", "/-/ready", &[], b"")
            .is_ok_and(|r| r.status == 200)
    }) {
        assert!(Instant::now() < deadline, "prometheus did not come up");
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(SCRAPE_WINDOW_S).saturating_sub(started.elapsed()));
    // The window ends in the past, so scrapes between the two reads below cannot make
    // them differ. Chunks come whole, so their samples are cut to the window to compare.
    let end = now_ms() - 1_500;

    let samples_body = read(port, read::RESPONSE_SAMPLES, start, end);
    let raw = snap::raw::Decoder::new()
        .decompress_vec(&samples_body.body)
        .unwrap();
    let mut expected = Series::new();
    for ts in &ReadResponse::decode(&raw[..]).unwrap().results[0].timeseries {
        expected.insert(
            key(&ts.labels),
            ts.samples
                .iter()
                .map(|s| (s.timestamp, s.value.to_bits()))
                .collect(),
        );
    }

    let streamed = read(port, read::RESPONSE_STREAMED_XOR_CHUNKS, start, end);
    assert!(streamed
        .header("Content-Type")
        .unwrap_or("")
        .contains("ChunkedReadResponse"));
    let mut got = Series::new();
    let (mut chunks, mut reproduced) = (0, 0);
    let mut rest = &streamed.body[..];
    while !rest.is_empty() {
        // Frame: uvarint length, big-endian CRC-32C of the data, the data.
        let (mut len, mut shift, mut i) = (0usize, 0, 0);
        loop {
            let b = rest[i];
            len |= ((b & 0x7f) as usize) << shift;
            i += 1;
            if b < 0x80 {
                break;
            }
            shift += 7;
        }
        let crc = u32::from_be_bytes(rest[i..i + 4].try_into().unwrap());
        let data = &rest[i + 4..i + 4 + len];
        assert_eq!(crc32c::crc32c(data), crc, "frame checksum");
        rest = &rest[i + 4 + len..];
        for s in ChunkedReadResponse::decode(data).unwrap().chunked_series {
            let series = key(&s.labels);
            for c in s.chunks {
                assert_eq!(c.r#type, read::CHUNK_XOR);
                let decoded = xor::decode(&c.data)
                    .unwrap_or_else(|e| panic!("chunk of {} unreadable: {e:?}", key(&s.labels)));
                assert!(!decoded.is_empty());
                assert_eq!(
                    (decoded[0].0, decoded.last().unwrap().0),
                    (c.min_time_ms, c.max_time_ms)
                );
                let mut e = XorEncoder::default();
                for (t, v) in &decoded {
                    e.append(*t, *v);
                }
                chunks += 1;
                if e.bytes() == c.data.as_slice() {
                    reproduced += 1;
                }
                let in_window: Vec<(i64, u64)> = decoded
                    .iter()
                    .filter(|(t, _)| (start..=end).contains(t))
                    .map(|(t, v)| (*t, v.to_bits()))
                    .collect();
                if !in_window.is_empty() {
                    got.entry(series.clone()).or_default().extend(in_window);
                }
            }
        }
    }
    assert!(chunks >= 50, "too few chunks to mean anything: {chunks}");
    assert_eq!(
        got, expected,
        "streamed chunks decode to exactly the SAMPLES answer"
    );
    assert_eq!(
        reproduced, chunks,
        "re-encoding reproduces Prometheus's chunk bytes"
    );
}
