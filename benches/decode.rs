//! Decode cost per sample for remote_write 1.0 and 2.0 bodies, beside the floor.
//!
//! A program, not a timed test: `cargo bench --bench decode`. Bodies come from the
//! load-test generator (Kubernetes-like series, 10 labels, 2000 samples per request,
//! one sample per series, as Prometheus sends them). For each protocol it reports, in
//! ns per sample (median of several timed runs of at least 200 ms each):
//! - `snappy`: decompression alone;
//! - `floor`: decompression plus one pass over every protobuf field (no validation, no
//!   output): the least any decoder of these bytes can do;
//! - `promgate`: decompression plus the in-place decode and full validation;
//! - `prost`: decompression plus prost's owning decode, for comparison.

use promgate_loadtest::{BodyTemplate, GenParams, Protocol as GenProtocol};
use promgate_proto::messages::{v1, v2};
use promgate_proto::wire::{Reader, LEN};
use promgate_proto::{decode, Batch, Limits, Protocol, RejectCounts};
use prost::Message;
use std::hint::black_box;

mod common;
use common::{median_ns_per, RUNS};

const SAMPLES_PER_REQUEST: usize = 2000;
const BODIES: usize = 16;

/// Visits every field of every message, descending into the nested ones that
/// remote_write has (series → labels/samples/...), and touches nothing else.
fn walk(mut r: Reader<'_>, depth: u32) -> u64 {
    let mut fields = 0;
    while !r.at_end() {
        let Ok((field, wt)) = r.key() else {
            return fields;
        };
        fields += 1;
        if wt == LEN && depth < 2 && !(depth == 0 && field == 4) {
            let Ok(m) = r.message() else { return fields };
            fields += walk(m, depth + 1);
        } else if r.skip(field, wt).is_err() {
            return fields;
        }
    }
    fields
}

/// Median ns per sample of `f` over all bodies.
fn measure(bodies: &[Vec<u8>], mut f: impl FnMut(&[u8]) -> u64) -> f64 {
    median_ns_per(bodies.len() * SAMPLES_PER_REQUEST, || {
        for b in bodies {
            black_box(f(b));
        }
    })
}

fn main() {
    let params = GenParams {
        seed: 1,
        labels_per_series: 10,
        samples_per_series: 1,
    };
    println!("decode cost, ns/sample ({SAMPLES_PER_REQUEST} samples/request, 10 labels/series, median of {RUNS} runs)");
    println!(
        "{:<9} {:>8} {:>8} {:>9} {:>8} {:>9} {:>12}",
        "protocol", "snappy", "floor", "promgate", "prost", "vs floor", "bytes/sample"
    );
    // PROMGATE_BENCH_PROTOCOL=1.0 or 2.0 limits the run to one protocol (for profiling).
    let only = std::env::var("PROMGATE_BENCH_PROTOCOL").ok();
    for (name, gen, protocol) in [
        ("1.0", GenProtocol::V1, Protocol::V1),
        ("2.0", GenProtocol::V2, Protocol::V2),
    ] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let bodies: Vec<Vec<u8>> = (0..BODIES)
            .map(|i| {
                let first = (i * SAMPLES_PER_REQUEST) as u64;
                BodyTemplate::build(&params, gen, first, SAMPLES_PER_REQUEST, 1_700_000_000_000)
                    .compressed
            })
            .collect();
        let wire_bytes = bodies.iter().map(Vec::len).sum::<usize>() as f64
            / (BODIES * SAMPLES_PER_REQUEST) as f64;
        let mut snappy = snap::raw::Decoder::new();
        let mut buf = vec![0u8; 8 << 20];
        let mut unsnappy =
            |b: &[u8], buf: &mut Vec<u8>| snappy.decompress(b, buf).expect("valid body");
        let t_snappy = measure(&bodies, |b| unsnappy(b, &mut buf) as u64);
        let t_floor = measure(&bodies, |b| {
            let n = unsnappy(b, &mut buf);
            walk(Reader::new(&buf[..n]), 0)
        });
        let mut batch = Batch::default();
        let mut reasons = RejectCounts::default();
        let limits = Limits::default();
        let t_ours = measure(&bodies, |b| {
            let n = unsnappy(b, &mut buf);
            decode(protocol, &buf[..n], &limits, &mut batch, &mut reasons).expect("valid body");
            assert_eq!(
                batch.samples.len(),
                SAMPLES_PER_REQUEST,
                "every sample decoded"
            );
            batch.samples.len() as u64
        });
        let t_prost = measure(&bodies, |b| {
            let n = unsnappy(b, &mut buf);
            match protocol {
                Protocol::V1 => v1::WriteRequest::decode(&buf[..n])
                    .expect("valid")
                    .timeseries
                    .len() as u64,
                Protocol::V2 => v2::Request::decode(&buf[..n])
                    .expect("valid")
                    .timeseries
                    .len() as u64,
            }
        });
        println!(
            "{name:<9} {t_snappy:>8.1} {t_floor:>8.1} {t_ours:>9.1} {t_prost:>8.1} {:>8.2}x {wire_bytes:>12.1}",
            t_ours / t_floor
        );
    }
}
