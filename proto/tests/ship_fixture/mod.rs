//! The fixed values behind the golden ship frames in `testdata/ship/`, shared (through
//! `#[path]`) by `examples/make_ship_golden.rs`, which writes the files, and
//! `tests/ship_golden.rs`, which checks them. Nothing here depends on time or chance:
//! the same source always encodes to the same bytes, so any change to the frame or
//! archive layout shows up as a diff of the committed files.
#![allow(dead_code)]

use promgate_proto::ship::{
    code, write_message, Ack, ExemplarSample, Hello, HistogramSample, Label, MetadataEntry,
    NewSeries, NewTarget, ShipBatch, ShipError, Welcome, FLAG_SNAPPY, HEADER_BYTES, KIND_ACK,
    KIND_BATCH, KIND_ERROR, KIND_HELLO, KIND_WELCOME,
};

/// Prometheus's staleness marker: a NaN with payload 2.
pub const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

/// A remote_write 1.0 `prometheus.Histogram`, hand-encoded canonically (as prost would):
/// count_int 3 (field 1), sum 1.5 (field 3), one positive span {offset 0, length 1}
/// (field 11), positive delta 3 (field 12, packed sint64), timestamp 1_700_000_000_000
/// (field 15).
pub const HISTOGRAM_PROTO: &[u8] = &[
    0x08, 0x03, // count_int = 3
    0x19, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf8, 0x3f, // sum = 1.5
    0x5a, 0x02, 0x10, 0x01, // positive_spans = [{offset 0 (default, omitted), length 1}]
    0x62, 0x01, 0x06, // positive_deltas = [3]
    0x78, 0x80, 0xd0, 0x95, 0xff, 0xbc, 0x31, // timestamp = 1_700_000_000_000
];

pub const AGENT: &str = "agent-01";
pub const SHARD: u32 = 3;

fn label(name: &str, value: &str) -> Label {
    Label {
        name: name.into(),
        value: value.into(),
    }
}

pub fn hello() -> Hello {
    Hello {
        agent: AGENT.into(),
        shard: SHARD,
    }
}

pub fn welcome() -> Welcome {
    Welcome {
        applied_seq: 40,
        durable_seq: 38,
    }
}

pub fn ack() -> Ack {
    Ack {
        seq: 43,
        durable_seq: 40,
    }
}

pub fn ship_error() -> ShipError {
    ShipError {
        code: code::SEQUENCE,
        message: "batch 41..=43 overlaps applied seq 42".into(),
    }
}

pub fn batch() -> ShipBatch {
    ShipBatch {
        agent: AGENT.into(),
        shard: SHARD,
        first_seq: 41,
        last_seq: 43,
        new_targets: vec![
            // Series of no known target: the agent's own and custom tags only.
            NewTarget {
                target_ref: 0,
                labels: vec![],
                tags: vec![label("agent", AGENT), label("region", "eu-1")],
            },
            NewTarget {
                target_ref: 1,
                labels: vec![
                    label("instance", "10.0.0.9:8080"),
                    label("job", "api"),
                    label("zone", "b"),
                ],
                tags: vec![
                    label("agent", AGENT),
                    label("host", "10.0.0.9"),
                    label("pod", "api-7d9f"),
                    label("region", "eu-1"),
                ],
            },
        ],
        new_series: vec![
            // {__name__, city, instance, job, zone}: the target's three labels travel
            // once, with the target.
            NewSeries {
                series_ref: 0,
                target_ref: 1,
                absent: vec![],
                labels: vec![
                    label("__name__", "http_requests_total"),
                    label("city", "Zürich–東京"),
                ],
            },
            NewSeries {
                series_ref: 1,
                target_ref: 0,
                absent: vec![],
                labels: vec![
                    label("__name__", "node_load1"),
                    label("instance", "10.0.0.1:9100"),
                ],
            },
            // honor_labels: this series says zone="a", so the target's zone is absent.
            NewSeries {
                series_ref: 7,
                target_ref: 1,
                absent: vec![2],
                labels: vec![label("__name__", "rpc_latency_seconds"), label("zone", "a")],
            },
        ],
        sample_refs: vec![0, 0, 1, 1],
        sample_ts: vec![
            1_700_000_000_000,
            1_700_000_015_000,
            -1_000,
            1_700_000_015_000,
        ],
        sample_values: vec![
            42f64.to_bits(),
            STALE_NAN,
            0.25f64.to_bits(),
            (-0f64).to_bits(),
        ],
        histograms: vec![HistogramSample {
            series_ref: 7,
            ts: 1_700_000_000_000,
            proto: HISTOGRAM_PROTO.to_vec(),
        }],
        exemplars: vec![ExemplarSample {
            series_ref: 0,
            ts: 1_700_000_000_000,
            value_bits: 0.123f64.to_bits(),
            labels: vec![label("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736")],
        }],
        metadata: vec![MetadataEntry {
            family: "http_requests_total".into(),
            kind: 1, // COUNTER
            help: "Requests served, by city.".into(),
            unit: String::new(),
        }],
    }
}

/// One golden file: its name, the kind it carries, and what it holds.
pub struct Golden {
    pub file: &'static str,
    pub kind: u8,
    pub about: &'static str,
    pub bytes: Vec<u8>,
}

fn frame<T>(kind: u8, value: &T, compress: bool) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    let mut out = Vec::new();
    write_message(kind, value, compress, &mut out);
    out
}

/// Every golden frame, encoded now from the fixed values.
pub fn goldens() -> Vec<Golden> {
    vec![
        Golden {
            file: "hello.bin",
            kind: KIND_HELLO,
            about: "agent → server, first frame of a connection: \
                    `Hello { agent: \"agent-01\", shard: 3 }`, plain.",
            bytes: frame(KIND_HELLO, &hello(), false),
        },
        Golden {
            file: "welcome.bin",
            kind: KIND_WELCOME,
            about: "server → agent, answer to the hello: `Welcome { applied_seq: 40, durable_seq: 38 }`, plain.",
            bytes: frame(KIND_WELCOME, &welcome(), false),
        },
        Golden {
            file: "ack.bin",
            kind: KIND_ACK,
            about: "server → agent, after the batch is applied: `Ack { seq: 43, durable_seq: 40 }`, plain.",
            bytes: frame(KIND_ACK, &ack(), false),
        },
        Golden {
            file: "error.bin",
            kind: KIND_ERROR,
            about: "server → agent, before closing: `ShipError { code: 5 (SEQUENCE), \
                    message: \"batch 41..=43 overlaps applied seq 42\" }`, plain.",
            bytes: frame(KIND_ERROR, &ship_error(), false),
        },
        Golden {
            file: "batch_plain.bin",
            kind: KIND_BATCH,
            about: "agent → server: a `ShipBatch` for agent-01 shard 3, WAL records 41..=43, \
                    uncompressed. Three new series (ref 0 has the non-ASCII label value \
                    `city=\"Zürich–東京\"`), four float samples (42.0; the staleness NaN \
                    0x7ff0000000000002; 0.25 at ts -1000; -0.0), one native histogram (ref 7, \
                    a 25-byte remote_write 1.0 `Histogram` message), one exemplar (ref 0, \
                    `trace_id` label) and one metadata entry (counter `http_requests_total`).",
            bytes: frame(KIND_BATCH, &batch(), false),
        },
        Golden {
            file: "batch_snappy.bin",
            kind: KIND_BATCH,
            about: "the same `ShipBatch` as `batch_plain.bin`, body snappy-compressed \
                    (FLAG_SNAPPY); the CRC covers the compressed bytes.",
            bytes: frame(KIND_BATCH, &batch(), true),
        },
    ]
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_HELLO => "KIND_HELLO",
        KIND_WELCOME => "KIND_WELCOME",
        KIND_BATCH => "KIND_BATCH",
        KIND_ACK => "KIND_ACK",
        KIND_ERROR => "KIND_ERROR",
        _ => "unknown",
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `testdata/ship/README.md`, generated from the frames so it cannot go stale.
pub fn readme(goldens: &[Golden]) -> String {
    let mut s = String::from(
        "# Golden ship-protocol frames\n\
         \n\
         Written by `cargo run -p promgate-proto --example make_ship_golden` from the fixed\n\
         values in `proto/tests/ship_fixture/mod.rs`; this README is generated too.\n\
         `proto/tests/ship_golden.rs` re-encodes the same values and requires byte-identical\n\
         output, decodes every file back to the exact values, and checks the refusals.\n\
         A diff in these files is a wire-format change: agents and servers of different\n\
         builds would no longer understand each other, so it needs a `FRAME_VERSION` bump.\n\
         \n\
         ## Frame header (16 bytes, see `proto/src/ship.rs`)\n\
         \n\
         ```text\n\
         offset     size  field\n\
         0x00..0x04  4    magic    \"PGSF\" = 50 47 53 46\n\
         0x04        1    version  FRAME_VERSION = 01\n\
         0x05        1    kind     01 HELLO | 02 WELCOME | 03 BATCH | 04 ACK | 05 ERROR\n\
         0x06..0x08  2    flags    u16 LE; bit 0 = FLAG_SNAPPY (body is one snappy block),\n\
         \x20                         every other bit must be 0\n\
         0x08..0x0c  4    length   u32 LE, body bytes on the wire (at most 64 MiB)\n\
         0x0c..0x10  4    crc32c   u32 LE, CRC-32C (Castagnoli) of the body as on the wire\n\
         0x10..           body     rkyv 0.8 archive of the kind's type (root at the end),\n\
         \x20                         snappy-compressed when flagged\n\
         ```\n\
         \n\
         ## Files\n",
    );
    for g in goldens {
        let b = &g.bytes;
        let h = &b[..HEADER_BYTES];
        let flags = u16::from_le_bytes([h[6], h[7]]);
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let flag_text = if flags & FLAG_SNAPPY != 0 {
            "FLAG_SNAPPY"
        } else {
            "none"
        };
        s.push_str(&format!(
            "\n### `{}` ({} bytes)\n\n{}\n\n```text\n\
             0x00..0x04  {}  magic \"PGSF\"\n\
             0x04        {}           version {}\n\
             0x05        {}           kind {} ({})\n\
             0x06..0x08  {}        flags {:#06x} ({})\n\
             0x08..0x0c  {}  length {}\n\
             0x0c..0x10  {}  crc32c {:#010x}\n\
             0x10..{:#06x}  body ({} bytes)\n```\n",
            g.file,
            b.len(),
            g.about,
            hex(&h[0..4]),
            hex(&h[4..5]),
            h[4],
            hex(&h[5..6]),
            h[5],
            kind_name(g.kind),
            hex(&h[6..8]),
            flags,
            flag_text,
            hex(&h[8..12]),
            len,
            hex(&h[12..16]),
            crc,
            b.len(),
            len,
        ));
        let body = &b[HEADER_BYTES..];
        if body.len() <= 64 {
            s.push_str("\nbody (rkyv archive, root object at the end):\n\n```text\n");
            for (i, row) in body.chunks(16).enumerate() {
                s.push_str(&format!("{:#06x}  {}\n", HEADER_BYTES + i * 16, hex(row)));
            }
            s.push_str("```\n");
        }
    }
    s
}

/// `testdata/ship/` of the workspace.
pub fn golden_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/ship")
}
