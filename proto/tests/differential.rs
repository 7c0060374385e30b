//! Differential property test: the in-place decoder and prost agree on generated
//! remote_write 1.0 and 2.0 bodies, including invalid series, which the decoder must
//! drop exactly when a plain reference check says so.

mod common;

use common::OwnedSeries;
use promgate_proto::messages::{histogram, v1, v2, BucketSpan, Histogram};
use promgate_proto::{decode, Batch, Decoded, Limits, Protocol, RejectCounts};
use proptest::prelude::*;
use prost::Message;

const NAMES: &[&str] = &["__name__", "a", "instance", "job", "le", "zone"];
const VALUES: &[&str] = &[
    "",
    "x",
    "node",
    "10.0.0.1:9100",
    "ünï",
    "line\nbreak",
    "+Inf",
];

fn arb_labels() -> impl Strategy<Value = Vec<(String, String)>> {
    (
        prop::collection::vec((0..NAMES.len(), 0..VALUES.len()), 0..6),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(picks, sort, with_name)| {
            let mut labels: Vec<(String, String)> = picks
                .into_iter()
                .map(|(n, v)| (NAMES[n].to_string(), VALUES[v].to_string()))
                .collect();
            if with_name {
                labels.push(("__name__".into(), "metric".into()));
            }
            if sort {
                labels.sort();
                labels.dedup_by(|a, b| a.0 == b.0);
            }
            labels
        })
}

/// A histogram and whether it is consistent.
fn arb_histogram() -> impl Strategy<Value = (Histogram, bool)> {
    (
        prop::collection::vec(0i64..5, 0..5),
        0u64..3,
        any::<bool>(),
        any::<i64>(),
        any::<bool>(),
    )
        .prop_map(|(counts, zero, float, ts, break_count)| {
            let total: u64 = counts.iter().map(|c| *c as u64).sum::<u64>() + zero;
            let spans = vec![BucketSpan {
                offset: 0,
                length: counts.len() as u32,
            }];
            let mut h = Histogram {
                schema: 2,
                positive_spans: spans,
                timestamp: ts,
                sum: 1.5,
                ..Default::default()
            };
            let bump = u64::from(break_count);
            if float {
                h.count = Some(histogram::Count::CountFloat((total + bump) as f64));
                h.zero_count = Some(histogram::ZeroCount::ZeroCountFloat(zero as f64));
                h.positive_counts = counts.iter().map(|c| *c as f64).collect();
                // A float histogram may have a count above its buckets; only below is wrong.
                if break_count {
                    h.count = Some(histogram::Count::CountFloat(total as f64 - 0.5));
                }
            } else {
                h.count = Some(histogram::Count::CountInt(total + bump));
                h.zero_count = Some(histogram::ZeroCount::ZeroCountInt(zero));
                let mut prev = 0;
                h.positive_deltas = counts
                    .iter()
                    .map(|c| {
                        let d = c - prev;
                        prev = *c;
                        d
                    })
                    .collect();
            }
            (h, !break_count)
        })
}

#[derive(Debug, Clone)]
struct GenSeries {
    labels: Vec<(String, String)>,
    samples: Vec<(u64, i64)>,
    histograms: Vec<(Histogram, bool)>,
    exemplars: Vec<(common::Labels, u64, i64)>,
}

fn arb_series() -> impl Strategy<Value = GenSeries> {
    (
        arb_labels(),
        prop::collection::vec((any::<u64>(), any::<i64>()), 0..4),
        prop::collection::vec(arb_histogram(), 0..2),
        prop::collection::vec((arb_labels(), any::<u64>(), any::<i64>()), 0..2),
    )
        .prop_map(|(labels, samples, histograms, exemplars)| GenSeries {
            labels,
            samples,
            histograms,
            exemplars,
        })
}

/// The reference rules, written plainly.
fn labels_valid(labels: &[(String, String)]) -> bool {
    labels.iter().any(|(n, _)| n == "__name__")
        && labels.iter().all(|(n, v)| !n.is_empty() && !v.is_empty())
        && labels.windows(2).all(|w| w[0].0 < w[1].0)
}

fn exemplar_labels_valid(labels: &[(String, String)]) -> bool {
    labels.iter().all(|(n, _)| !n.is_empty())
}

fn series_valid(s: &GenSeries, v2: bool) -> bool {
    labels_valid(&s.labels)
        && s.histograms.iter().all(|(_, ok)| *ok)
        && s.exemplars.iter().all(|(l, _, _)| exemplar_labels_valid(l))
        && !(v2 && !s.samples.is_empty() && !s.histograms.is_empty())
}

fn decode_ours(protocol: Protocol, raw: &[u8]) -> (Vec<OwnedSeries>, u32) {
    let mut batch = Batch::default();
    let mut reasons = RejectCounts::default();
    decode(protocol, raw, &Limits::default(), &mut batch, &mut reasons)
        .expect("valid protobuf decodes");
    let d = Decoded {
        batch: &batch,
        body: raw,
    };
    (common::from_batch(&d), batch.rejected.series)
}

fn label_pairs(l: &[(String, String)]) -> Vec<v1::Label> {
    l.iter()
        .map(|(n, v)| v1::Label {
            name: n.clone(),
            value: v.clone(),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn v1_matches_prost(series in prop::collection::vec(arb_series(), 0..8)) {
        let req = v1::WriteRequest {
            timeseries: series.iter().map(|s| v1::TimeSeries {
                labels: label_pairs(&s.labels),
                samples: s.samples.iter().map(|(v, t)| v1::Sample { value: f64::from_bits(*v), timestamp: *t }).collect(),
                exemplars: s.exemplars.iter().map(|(l, v, t)| v1::Exemplar { labels: label_pairs(l), value: f64::from_bits(*v), timestamp: *t }).collect(),
                histograms: s.histograms.iter().map(|(h, _)| h.clone()).collect(),
            }).collect(),
            metadata: vec![],
        };
        let raw = req.encode_to_vec();
        let reference = common::from_prost_v1(&v1::WriteRequest::decode(&raw[..]).unwrap());
        let expected: Vec<OwnedSeries> = reference.into_iter().zip(&series)
            .filter(|(_, g)| series_valid(g, false)).map(|(r, _)| r).collect();
        let (ours, rejected) = decode_ours(Protocol::V1, &raw);
        prop_assert_eq!(&ours, &expected);
        prop_assert_eq!(rejected as usize, series.len() - expected.len());

        // Trusted decoding (the shipper reading a WAL record back) keeps every series;
        // leaving out the ones the validating decode refused gives the same batch.
        let mut checked = Batch::default();
        decode(Protocol::V1, &raw, &Limits::default(), &mut checked, &mut RejectCounts::default()).unwrap();
        let refused = checked.rejected.indexes.clone();
        let mut trusted = Batch::default();
        let limits = Limits { trusted: true, ..Limits::default() };
        decode(Protocol::V1, &raw, &limits, &mut trusted, &mut RejectCounts::default()).unwrap();
        prop_assert_eq!(trusted.series.len(), series.len());
        trusted.series.retain(|s| !refused.contains(&s.index));
        let d = Decoded { batch: &trusted, body: &raw };
        prop_assert_eq!(&common::from_batch(&d), &expected);
    }

    #[test]
    fn v2_matches_prost(series in prop::collection::vec(arb_series(), 1..8)) {
        let mut symbols: Vec<String> = vec![String::new()];
        let mut intern = |s: &str| -> u32 {
            match symbols.iter().position(|x| x == s) {
                Some(i) => i as u32,
                None => { symbols.push(s.to_string()); (symbols.len() - 1) as u32 }
            }
        };
        let mut timeseries = Vec::new();
        for s in &series {
            let labels_refs = s.labels.iter().flat_map(|(n, v)| [intern(n), intern(v)]).collect();
            let exemplars = s.exemplars.iter().map(|(l, v, t)| v2::Exemplar {
                labels_refs: l.iter().flat_map(|(n, v)| [intern(n), intern(v)]).collect(),
                value: f64::from_bits(*v), timestamp: *t,
            }).collect();
            let help_ref = intern("help text");
            timeseries.push(v2::TimeSeries {
                labels_refs,
                samples: s.samples.iter().map(|(v, t)| v2::Sample { value: f64::from_bits(*v), timestamp: *t, start_timestamp: 0 }).collect(),
                histograms: s.histograms.iter().map(|(h, _)| h.clone()).collect(),
                exemplars,
                metadata: Some(v2::Metadata { r#type: 2, help_ref, unit_ref: 0 }),
                created_timestamp: 0,
            });
        }
        let req = v2::Request { symbols, timeseries };
        let raw = req.encode_to_vec();
        let reference = common::from_prost_v2(&v2::Request::decode(&raw[..]).unwrap());
        let expected: Vec<OwnedSeries> = reference.into_iter().zip(&series)
            .filter(|(_, g)| series_valid(g, true)).map(|(r, _)| r).collect();
        let (ours, rejected) = decode_ours(Protocol::V2, &raw);
        prop_assert_eq!(&ours, &expected);
        prop_assert_eq!(rejected as usize, series.len() - expected.len());
    }

    /// Labels and samples written in other shapes than prost's (fields swapped, given
    /// twice, followed by unknown fields, long keys): the decoder's fast paths for the
    /// common shapes must fall back and agree with prost on every one.
    #[test]
    fn v1_other_field_shapes_match_prost(
        series in prop::collection::vec((arb_labels(), prop::collection::vec((any::<u64>(), any::<i64>()), 0..3)), 1..6),
        shapes in prop::collection::vec(0u8..5, 64),
    ) {
        let mut shape = shapes.iter().cycle().copied();
        let mut raw = Vec::new();
        for (labels, samples) in &series {
            let mut ts = Vec::new();
            for (n, v) in labels {
                let mut m = Vec::new();
                match shape.next().unwrap() {
                    0 => { put_len(&mut m, 0x0a, n.as_bytes()); put_len(&mut m, 0x12, v.as_bytes()); }
                    1 => { put_len(&mut m, 0x12, v.as_bytes()); put_len(&mut m, 0x0a, n.as_bytes()); }
                    2 => { put_len(&mut m, 0x0a, b"first"); put_len(&mut m, 0x12, v.as_bytes()); put_len(&mut m, 0x0a, n.as_bytes()); }
                    3 => { put_len(&mut m, 0x0a, n.as_bytes()); put_len(&mut m, 0x12, v.as_bytes()); m.extend_from_slice(&[0x18, 0x05]); }
                    _ => { m.extend_from_slice(&[0x8a, 0x00]); put_varint(&mut m, n.len() as u64); m.extend_from_slice(n.as_bytes()); put_len(&mut m, 0x12, v.as_bytes()); }
                }
                put_len(&mut ts, 0x0a, &m);
            }
            for (v, t) in samples {
                let mut m = Vec::new();
                match shape.next().unwrap() {
                    0 => { m.push(0x09); m.extend_from_slice(&v.to_le_bytes()); m.push(0x10); put_varint(&mut m, *t as u64); }
                    1 => { m.push(0x10); put_varint(&mut m, *t as u64); m.push(0x09); m.extend_from_slice(&v.to_le_bytes()); }
                    2 => { m.push(0x09); m.extend_from_slice(&v.to_le_bytes()); m.push(0x10); put_varint(&mut m, *t as u64); m.extend_from_slice(&[0x20, 0x01]); }
                    3 => { m.push(0x09); m.extend_from_slice(&0u64.to_le_bytes()); m.push(0x09); m.extend_from_slice(&v.to_le_bytes()); m.push(0x10); put_varint(&mut m, *t as u64); }
                    _ => { m.push(0x09); m.extend_from_slice(&v.to_le_bytes()); }
                }
                put_len(&mut ts, 0x12, &m);
            }
            put_len(&mut raw, 0x0a, &ts);
        }
        let reference = common::from_prost_v1(&v1::WriteRequest::decode(&raw[..]).unwrap());
        let expected: Vec<OwnedSeries> = reference.into_iter().zip(&series)
            .filter(|(r, _)| labels_valid(&r.labels)).map(|(r, _)| r).collect();
        let (ours, _) = decode_ours(Protocol::V1, &raw);
        prop_assert_eq!(&ours, &expected);
    }

    /// Arbitrary bytes never panic the decoder (the fuzz target explores further).
    #[test]
    fn arbitrary_bytes_never_panic(raw in prop::collection::vec(any::<u8>(), 0..512), v2 in any::<bool>()) {
        let mut batch = Batch::default();
        let mut reasons = RejectCounts::default();
        let protocol = if v2 { Protocol::V2 } else { Protocol::V1 };
        let _ = decode(protocol, &raw, &Limits::default(), &mut batch, &mut reasons);
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_len(out: &mut Vec<u8>, key: u8, bytes: &[u8]) {
    out.push(key);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A 1.0 series with these raw label fields (name, value bytes) and one sample.
fn v1_series_raw(labels: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut ts = Vec::new();
    for (n, v) in labels {
        let mut l = Vec::new();
        put_len(&mut l, 0x0a, n);
        put_len(&mut l, 0x12, v);
        put_len(&mut ts, 0x0a, &l);
    }
    let mut s = vec![0x09];
    s.extend_from_slice(&1.5f64.to_le_bytes());
    s.push(0x10);
    put_varint(&mut s, 1_700_000_000_000);
    put_len(&mut ts, 0x12, &s);
    ts
}

/// UTF-8 in 1.0 labels is checked once per series when all its label bytes are ASCII,
/// else label by label: both ways accept valid non-ASCII text and refuse a series with
/// invalid bytes in a name or a value, keeping the others.
#[test]
fn v1_labels_with_invalid_utf8_are_refused_and_valid_non_ascii_kept() {
    let long_ascii = vec![b'x'; 200]; // its length byte is not ASCII
    let mut long_bad = long_ascii.clone();
    long_bad[150] = 0xc3;
    let series: Vec<(&str, Vec<u8>)> = vec![
        (
            "ok_ascii",
            v1_series_raw(&[(b"__name__", b"ok_ascii"), (b"v", b"plain")]),
        ),
        (
            "ok_utf8",
            v1_series_raw(&[(b"__name__", b"ok_utf8"), (b"v", "Zürich".as_bytes())]),
        ),
        (
            "bad_value",
            v1_series_raw(&[(b"__name__", b"bad_value"), (b"v", b"Z\xffrich")]),
        ),
        (
            "bad_name",
            v1_series_raw(&[(b"__name__", b"bad_name"), (b"\xc3v", b"x")]),
        ),
        (
            "ok_long",
            v1_series_raw(&[(b"__name__", b"ok_long"), (b"v", &long_ascii)]),
        ),
        (
            "bad_long",
            v1_series_raw(&[(b"__name__", b"bad_long"), (b"v", &long_bad)]),
        ),
    ];
    let mut body = Vec::new();
    for (_, s) in &series {
        put_len(&mut body, 0x0a, s);
    }
    let (got, rejected) = decode_ours(Protocol::V1, &body);
    let names: Vec<&str> = got
        .iter()
        .map(|s| {
            s.labels
                .iter()
                .find(|l| l.0 == "__name__")
                .unwrap()
                .1
                .as_str()
        })
        .collect();
    assert_eq!(names, ["ok_ascii", "ok_utf8", "ok_long"]);
    assert_eq!(rejected, 3);
}
