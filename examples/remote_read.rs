//! Times one remote_read request against a promgate server, in both response types:
//!
//! ```sh
//! cargo run --release --example remote_read -- 127.0.0.1:20416 '.+' [START_MS END_MS]
//! ```
//!
//! Prints, per type: wall time, response bytes, series and samples. The samples are
//! decoded (chunks too), so the time includes what a client would spend reading them.

use promgate_proto::messages::read::{
    ChunkedReadResponse, LabelMatcher, Query, ReadRequest, ReadResponse, MATCH_RE,
    RESPONSE_SAMPLES, RESPONSE_STREAMED_XOR_CHUNKS,
};
use prost::Message;
use std::io::{Read, Write};
use std::time::Instant;

fn post(addr: &str, body: &[u8]) -> (String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let head = format!(
        "POST /api/v1/prom/read HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-protobuf\r\n\
         Content-Encoding: snappy\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    (head, all[split..].to_vec())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).map_or("127.0.0.1:20416", |s| s.as_str());
    let re = args.get(2).map_or(".+", |s| s.as_str());
    let start: i64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    let end: i64 = args
        .get(4)
        .and_then(|s| s.parse().ok())
        .unwrap_or(i64::MAX / 2);
    for (name, kind) in [
        ("SAMPLES", RESPONSE_SAMPLES),
        ("STREAMED_XOR_CHUNKS", RESPONSE_STREAMED_XOR_CHUNKS),
    ] {
        let req = ReadRequest {
            queries: vec![Query {
                start_timestamp_ms: start,
                end_timestamp_ms: end,
                matchers: vec![LabelMatcher {
                    r#type: MATCH_RE,
                    name: "__name__".into(),
                    value: re.into(),
                }],
                hints: None,
            }],
            accepted_response_types: vec![kind],
        };
        let body = snap::raw::Encoder::new()
            .compress_vec(&req.encode_to_vec())
            .unwrap();
        let t = Instant::now();
        let (head, resp) = post(addr, &body);
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "{head}{}",
            String::from_utf8_lossy(&resp)
        );
        let (mut series, mut samples) = (0usize, 0usize);
        if kind == RESPONSE_SAMPLES {
            let raw = snap::raw::Decoder::new().decompress_vec(&resp).unwrap();
            let r = ReadResponse::decode(raw.as_slice()).unwrap();
            for ts in &r.results[0].timeseries {
                series += 1;
                samples += ts.samples.len();
            }
        } else {
            let mut b = resp.as_slice();
            while !b.is_empty() {
                let (mut len, mut shift, mut i) = (0usize, 0, 0);
                loop {
                    let x = b[i];
                    len |= usize::from(x & 0x7f) << shift;
                    shift += 7;
                    i += 1;
                    if x < 0x80 {
                        break;
                    }
                }
                let m = ChunkedReadResponse::decode(&b[i + 4..i + 4 + len]).unwrap();
                for cs in m.chunked_series {
                    series += 1;
                    for c in cs.chunks {
                        samples += promgate_proto::xor::decode(&c.data).unwrap().len();
                    }
                }
                b = &b[i + 4 + len..];
            }
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{name}: {secs:.3} s, {} response bytes, {series} series, {samples} samples ({:.1} M samples/s)",
            resp.len(),
            samples as f64 / secs / 1e6
        );
    }
}
