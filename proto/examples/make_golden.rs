//! Writes the golden remote_write bodies under `testdata/remote_write/`.
//!
//! Run once with `cargo run -p promgate-proto --example make_golden`; the bodies are
//! committed, and `tests/golden.rs` checks the decoder against the reviewed `.txt`
//! expectations beside them. Bodies are encoded with prost (an independent encoder),
//! some with hand-appended unknown fields, so the golden files do not depend on the
//! decoder under test.

use promgate_proto::messages::{histogram, v1, v2, BucketSpan, Histogram};
use prost::Message;

const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

fn label(n: &str, v: &str) -> v1::Label {
    v1::Label {
        name: n.into(),
        value: v.into(),
    }
}

fn int_histogram(ts: i64) -> Histogram {
    // Buckets (absolute): 2, 1, 3 positive; 1 negative; zero bucket 1 => count 8.
    Histogram {
        count: Some(histogram::Count::CountInt(8)),
        sum: 12.5,
        schema: 1,
        zero_threshold: 0.001,
        zero_count: Some(histogram::ZeroCount::ZeroCountInt(1)),
        negative_spans: vec![BucketSpan {
            offset: 0,
            length: 1,
        }],
        negative_deltas: vec![1],
        positive_spans: vec![
            BucketSpan {
                offset: -1,
                length: 2,
            },
            BucketSpan {
                offset: 3,
                length: 1,
            },
        ],
        positive_deltas: vec![2, -1, 2],
        timestamp: ts,
        ..Default::default()
    }
}

fn float_histogram(ts: i64) -> Histogram {
    Histogram {
        count: Some(histogram::Count::CountFloat(6.5)),
        sum: 3.25,
        schema: 0,
        zero_count: Some(histogram::ZeroCount::ZeroCountFloat(0.5)),
        positive_spans: vec![BucketSpan {
            offset: 0,
            length: 3,
        }],
        positive_counts: vec![1.0, 2.5, 2.5],
        reset_hint: 2,
        timestamp: ts,
        ..Default::default()
    }
}

fn custom_histogram(ts: i64) -> Histogram {
    Histogram {
        count: Some(histogram::Count::CountInt(7)),
        sum: 40.0,
        schema: -53,
        positive_spans: vec![
            BucketSpan {
                offset: 0,
                length: 2,
            },
            BucketSpan {
                offset: 1,
                length: 1,
            },
        ],
        positive_deltas: vec![1, 2, 0], // absolute 1, 3, 3: count 7
        custom_values: vec![0.1, 1.0, 10.0],
        timestamp: ts,
        ..Default::default()
    }
}

/// Unknown fields of every wire type: varint 20, fixed64 21, bytes 22, group 23, fixed32 24.
fn unknown_fields() -> Vec<u8> {
    use prost::encoding::{encode_key, WireType};
    let mut b = Vec::new();
    encode_key(20, WireType::Varint, &mut b);
    b.extend_from_slice(&[0x96, 0x01]);
    encode_key(21, WireType::SixtyFourBit, &mut b);
    b.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    encode_key(22, WireType::LengthDelimited, &mut b);
    b.extend_from_slice(&[3, b'x', b'y', b'z']);
    encode_key(23, WireType::StartGroup, &mut b);
    encode_key(1, WireType::Varint, &mut b);
    b.push(7);
    encode_key(23, WireType::EndGroup, &mut b);
    encode_key(24, WireType::ThirtyTwoBit, &mut b);
    b.extend_from_slice(&[9, 9, 9, 9]);
    b
}

fn write(name: &str, raw: &[u8]) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/remote_write");
    let body = snap::raw::Encoder::new()
        .compress_vec(raw)
        .expect("compress");
    std::fs::write(format!("{dir}/{name}.bin"), body).expect("write golden body");
    println!("wrote {name}.bin ({} bytes decoded)", raw.len());
}

fn main() {
    let t = 1_700_000_000_000i64;
    let basic = v1::WriteRequest {
        timeseries: vec![
            v1::TimeSeries {
                labels: vec![
                    label("__name__", "up"),
                    label("instance", "10.0.0.1:9100"),
                    label("job", "node"),
                ],
                samples: vec![
                    v1::Sample {
                        value: 1.0,
                        timestamp: t,
                    },
                    v1::Sample {
                        value: f64::from_bits(STALE_NAN),
                        timestamp: t + 15_000,
                    },
                ],
                ..Default::default()
            },
            v1::TimeSeries {
                labels: vec![
                    label("__name__", "weird.name with spaces"),
                    label("le", "+Inf"),
                    label("path", "line1\nline2"),
                ],
                samples: vec![
                    v1::Sample {
                        value: f64::NAN,
                        timestamp: t + 1,
                    },
                    v1::Sample {
                        value: f64::INFINITY,
                        timestamp: t + 2,
                    },
                    v1::Sample {
                        value: f64::NEG_INFINITY,
                        timestamp: t + 3,
                    },
                    v1::Sample {
                        value: -0.0,
                        timestamp: -5,
                    },
                ],
                ..Default::default()
            },
        ],
        metadata: vec![v1::MetricMetadata {
            r#type: 1,
            metric_family_name: "http_requests_total".into(),
            help: "Requests served.".into(),
            unit: "".into(),
        }],
    };
    write("v1_basic", &basic.encode_to_vec());

    let mut unknown = basic.encode_to_vec();
    unknown.extend_from_slice(&unknown_fields());
    // An unknown field inside a series too: series 3 = labels + unknown + sample.
    let ts = v1::TimeSeries {
        labels: vec![label("__name__", "with_unknown"), label("job", "x")],
        samples: vec![v1::Sample {
            value: 2.0,
            timestamp: t,
        }],
        ..Default::default()
    };
    let mut inner = ts.encode_to_vec();
    inner.extend_from_slice(&unknown_fields());
    unknown.push((1 << 3) | 2);
    prost::encoding::encode_varint(inner.len() as u64, &mut unknown);
    unknown.extend_from_slice(&inner);
    write("v1_unknown_fields", &unknown);

    let hist = v1::WriteRequest {
        timeseries: vec![
            v1::TimeSeries {
                labels: vec![
                    label("__name__", "rpc_latency_seconds"),
                    label("job", "app"),
                ],
                histograms: vec![
                    int_histogram(t),
                    float_histogram(t + 1000),
                    custom_histogram(t + 2000),
                ],
                ..Default::default()
            },
            v1::TimeSeries {
                labels: vec![label("__name__", "requests_total"), label("job", "app")],
                samples: vec![v1::Sample {
                    value: 42.0,
                    timestamp: t,
                }],
                exemplars: vec![
                    v1::Exemplar {
                        labels: vec![label("trace_id", "abc123")],
                        value: 0.25,
                        timestamp: t,
                    },
                    v1::Exemplar {
                        labels: vec![],
                        value: 1.0,
                        timestamp: t - 86_400_000,
                    },
                    v1::Exemplar {
                        labels: vec![label("span", "ünïcødé")],
                        value: f64::NAN,
                        timestamp: t,
                    },
                ],
                ..Default::default()
            },
        ],
        metadata: vec![],
    };
    write("v1_histograms_exemplars", &hist.encode_to_vec());

    let mut bad_hist = int_histogram(t);
    bad_hist.count = Some(histogram::Count::CountInt(9));
    let mixed = v1::WriteRequest {
        timeseries: vec![
            v1::TimeSeries {
                labels: vec![label("__name__", "ok_one"), label("job", "a")],
                samples: vec![v1::Sample {
                    value: 1.0,
                    timestamp: t,
                }],
                ..Default::default()
            },
            v1::TimeSeries {
                labels: vec![label("job", "no_name")],
                samples: vec![v1::Sample {
                    value: 1.0,
                    timestamp: t,
                }],
                ..Default::default()
            },
            v1::TimeSeries {
                labels: vec![
                    label("__name__", "unsorted"),
                    label("zone", "z"),
                    label("job", "a"),
                ],
                samples: vec![
                    v1::Sample {
                        value: 1.0,
                        timestamp: t,
                    },
                    v1::Sample {
                        value: 2.0,
                        timestamp: t + 1,
                    },
                ],
                ..Default::default()
            },
            v1::TimeSeries {
                labels: vec![label("__name__", "bad_histogram"), label("job", "a")],
                histograms: vec![bad_hist],
                ..Default::default()
            },
            v1::TimeSeries {
                labels: vec![label("__name__", "ok_two"), label("job", "a")],
                samples: vec![v1::Sample {
                    value: 3.0,
                    timestamp: t,
                }],
                ..Default::default()
            },
        ],
        metadata: vec![],
    };
    write("v1_mixed_invalid", &mixed.encode_to_vec());

    let symbols: Vec<String> = [
        "",
        "__name__",
        "http_requests_total",
        "job",
        "api",
        "instance",
        "10.0.0.2:8080",
        "trace_id",
        "f00d",
        "Total requests.",
        "requests",
        "rpc_seconds",
        "method",
        "GET",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let v2basic = v2::Request {
        symbols: symbols.clone(),
        timeseries: vec![
            v2::TimeSeries {
                labels_refs: vec![1, 2, 5, 6, 3, 4],
                samples: vec![
                    v2::Sample {
                        value: 10.0,
                        timestamp: t,
                        start_timestamp: t - 60_000,
                    },
                    v2::Sample {
                        value: f64::from_bits(STALE_NAN),
                        timestamp: t + 15_000,
                        start_timestamp: 0,
                    },
                ],
                exemplars: vec![v2::Exemplar {
                    labels_refs: vec![7, 8],
                    value: 10.0,
                    timestamp: t,
                }],
                metadata: Some(v2::Metadata {
                    r#type: 1,
                    help_ref: 9,
                    unit_ref: 10,
                }),
                created_timestamp: 0,
                ..Default::default()
            },
            v2::TimeSeries {
                labels_refs: vec![1, 11, 3, 4, 12, 13],
                histograms: vec![int_histogram(t), custom_histogram(t + 1)],
                metadata: Some(v2::Metadata {
                    r#type: 3,
                    help_ref: 0,
                    unit_ref: 0,
                }),
                created_timestamp: t - 1000,
                ..Default::default()
            },
        ],
    };
    write("v2_basic", &v2basic.encode_to_vec());

    let v2mixed = v2::Request {
        symbols,
        timeseries: vec![
            v2::TimeSeries {
                labels_refs: vec![1, 2, 3, 4],
                samples: vec![v2::Sample {
                    value: 1.0,
                    timestamp: t,
                    start_timestamp: 0,
                }],
                ..Default::default()
            },
            v2::TimeSeries {
                labels_refs: vec![1, 2, 3, 99],
                samples: vec![v2::Sample {
                    value: 1.0,
                    timestamp: t,
                    start_timestamp: 0,
                }],
                ..Default::default()
            },
            v2::TimeSeries {
                labels_refs: vec![1, 2, 3],
                samples: vec![v2::Sample {
                    value: 1.0,
                    timestamp: t,
                    start_timestamp: 0,
                }],
                ..Default::default()
            },
            v2::TimeSeries {
                labels_refs: vec![1, 11, 3, 4],
                samples: vec![v2::Sample {
                    value: 1.0,
                    timestamp: t,
                    start_timestamp: 0,
                }],
                histograms: vec![int_histogram(t)],
                ..Default::default()
            },
            v2::TimeSeries {
                labels_refs: vec![3, 4],
                samples: vec![v2::Sample {
                    value: 1.0,
                    timestamp: t,
                    start_timestamp: 0,
                }],
                ..Default::default()
            },
        ],
    };
    write("v2_mixed_invalid", &v2mixed.encode_to_vec());
}
