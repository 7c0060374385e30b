//! Ship-ready columns of each WAL record, so the shipper need not decode it again.
//!
//! The receive path has every request decoded already. When it appends a record to the
//! WAL it writes into the same record what the shipper needs from a record whose series
//! the server already knows (the ship section, `crate::wal::format`): one 128-bit
//! fingerprint of each accepted series' labels and the series' samples as columns. The
//! shipper reads the section with the record and, if every series is known on its
//! connection, copies the columns into the batch: no snappy decompression, no protobuf
//! pass, no label hashing. Anything else (an empty section, a series new to the
//! connection, fingerprints made with other keys) goes the general way, decoding the
//! record's body, which stays the only source of truth.
//!
//! - **In the record, not beside it.** An earlier version kept these copies in memory
//!   under a budget; flat out the shipper fell behind the budget within a second and
//!   decoded 97% of records a second time (about half of the agent's CPU). In the record
//!   they cost 16 bytes per sample and 20 per series of disk, and hold however far
//!   behind the shipper is, across a lost server connection too.
//! - **No allocation.** The section is written straight into the WAL's pending buffer.
//! - **Fingerprints.** SipHash-1-3 with 128-bit output under random keys drawn when the
//!   agent starts, with a random key id written into each section: a sender cannot aim
//!   collisions at keys it never sees, chance collisions are ~n²/2¹²⁹ for n series, and
//!   after a restart (new keys) the old sections are ignored. The same [`SeriesHasher`]
//!   computes them in both ways, so a series has one identity on a connection whichever
//!   way it came.

use crate::wal::format::{put_ship_header, ShipSection};
use promgate_proto::batch::{Run, Series};
use promgate_proto::Decoded;
use siphasher::sip128::{Hasher128, SipHasher13};
use std::hash::Hasher;

/// First byte of a fingerprint's stream: label fields as they were in the body ...
const DOMAIN_BODY_BYTES: u8 = 1;
/// ... or length-prefixed names and values.
const DOMAIN_LENGTH_PREFIXED: u8 = 0;

/// The per-shard keyed hash of series label sets.
#[derive(Clone, Copy)]
pub struct SeriesHasher {
    keys: (u64, u64),
    id: u64,
}

impl SeriesHasher {
    /// Fresh random keys.
    pub fn random() -> Self {
        use std::hash::BuildHasher;
        let s = std::hash::RandomState::new();
        SeriesHasher {
            keys: (s.hash_one(1u8), s.hash_one(2u8)),
            id: s.hash_one(3u8),
        }
    }

    /// The id written into ship sections, so a reader knows whether their fingerprints
    /// are its own.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The fingerprint of one series' label set. From its label fields' bytes in the
    /// body as they are when it has them ([`Series::label_bytes`], 1.0: those bytes
    /// determine the labels, so different sets never feed the same stream), else from
    /// [`Self::labels`]. A leading domain byte keeps the two kinds of stream apart. The
    /// same set sent in two encodings gets two fingerprints; that costs a second series
    /// reference on a ship connection (the server stores both under one series), never
    /// a merge. Hashing the body's bytes in one write saves staging them: about a fifth
    /// of the fingerprint's cost.
    pub fn series(&self, d: &Decoded<'_>, s: &Series) -> u128 {
        if s.label_bytes.len == 0 {
            return self.labels(d, s.labels);
        }
        let mut h = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        h.write_u8(DOMAIN_BODY_BYTES);
        h.write(d.bytes(s.label_bytes));
        h.finish128().as_u128()
    }

    /// The fingerprint of a label set from its names and values (the request was
    /// validated when it was received, so no UTF-8 check here). Lengths go in before
    /// bytes, so no two different sets feed the same stream. The stream is staged in a
    /// stack buffer and hashed in few large writes: SipHash's per-write cost would
    /// otherwise exceed its per-byte cost on short label names and values.
    pub fn labels(&self, d: &Decoded<'_>, labels: Run) -> u128 {
        let mut h = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        let mut buf = [0u8; 512];
        buf[0] = DOMAIN_LENGTH_PREFIXED;
        let mut at = 1;
        for l in &d.batch.labels[labels.range()] {
            for s in [d.bytes(l.name), d.bytes(l.value)] {
                if at + 4 + s.len() > buf.len() {
                    h.write(&buf[..at]);
                    at = 0;
                }
                buf[at..at + 4].copy_from_slice(&(s.len() as u32).to_le_bytes());
                at += 4;
                if s.len() > buf.len() - at {
                    h.write(&buf[..at]);
                    h.write(s);
                    at = 0;
                } else {
                    buf[at..at + s.len()].copy_from_slice(s);
                    at += s.len();
                }
            }
        }
        h.write(&buf[..at]);
        h.finish128().as_u128()
    }
}

/// Writes the ship section of a decoded request (refused series already left out), or
/// nothing (an empty section) for requests with histograms, exemplars or metadata.
pub fn put_ship_section(out: &mut Vec<u8>, hasher: &SeriesHasher, d: &Decoded<'_>) {
    let b = d.batch;
    if !(b.histograms.is_empty() && b.exemplars.is_empty() && b.metadata.is_empty()) {
        return;
    }
    let samples: usize = b.series.iter().map(|s| d.samples(s).len()).sum();
    put_ship_header(out, hasher.id(), b.series.len(), samples);
    out.reserve(20 * b.series.len() + 16 * samples);
    for s in &b.series {
        out.extend_from_slice(&hasher.series(d, s).to_le_bytes());
    }
    let mut end = 0u32;
    for s in &b.series {
        end += d.samples(s).len() as u32;
        out.extend_from_slice(&end.to_le_bytes());
    }
    for s in &b.series {
        for x in d.samples(s) {
            out.extend_from_slice(&x.timestamp_ms.to_le_bytes());
        }
    }
    for s in &b.series {
        for x in d.samples(s) {
            out.extend_from_slice(&x.value.to_bits().to_le_bytes());
        }
    }
}

/// Checks a ship section against the record's decoded body: the same series, and for
/// each the same samples, bit for bit. (The fingerprints need the writer's keys, which
/// no other process has, so they are not checked.) `promgate wal inspect` reports a
/// record that fails this: the shipper would have sent the section's samples.
pub fn check_ship_section(section: &ShipSection<'_>, d: &Decoded<'_>) -> Result<(), String> {
    let b = d.batch;
    if section.series() != b.series.len() {
        return Err(format!(
            "ship section has {} series, the body {}",
            section.series(),
            b.series.len()
        ));
    }
    for (i, s) in b.series.iter().enumerate() {
        let samples = d.samples(s);
        let range = section.samples(i);
        if range.len() != samples.len() {
            return Err(format!(
                "series {i}: ship section has {} samples, the body {}",
                range.len(),
                samples.len()
            ));
        }
        let columns = section.timestamps(range.clone()).zip(section.values(range));
        for (j, ((ts, bits), x)) in columns.zip(samples).enumerate() {
            if ts != x.timestamp_ms || bits != x.value.to_bits() {
                return Err(format!(
                    "series {i} sample {j}: ship section has ({ts}, {bits:#x}), the body ({}, {:#x})",
                    x.timestamp_ms,
                    x.value.to_bits()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use promgate_proto::{decode, Batch, Limits, Protocol, RejectCounts};

    fn request(series: &[(&str, f64)]) -> Vec<u8> {
        use promgate_proto::messages::v1;
        use prost::Message;
        v1::WriteRequest {
            timeseries: series
                .iter()
                .map(|(job, v)| v1::TimeSeries {
                    labels: vec![
                        v1::Label {
                            name: "__name__".into(),
                            value: "up".into(),
                        },
                        v1::Label {
                            name: "job".into(),
                            value: (*job).into(),
                        },
                    ],
                    samples: vec![v1::Sample {
                        value: *v,
                        timestamp: 5,
                    }],
                    ..Default::default()
                })
                .collect(),
            metadata: vec![],
        }
        .encode_to_vec()
    }

    fn decoded(raw: &[u8], batch: &mut Batch) {
        decode(
            Protocol::V1,
            raw,
            &Limits::default(),
            batch,
            &mut RejectCounts::default(),
        )
        .unwrap();
    }

    #[test]
    fn sections_hold_fingerprints_and_columns_of_the_accepted_series() {
        let raw = request(&[("a", 1.0), ("b", 2.0), ("a", 3.0)]);
        let mut batch = Batch::default();
        decoded(&raw, &mut batch);
        let d = Decoded {
            batch: &batch,
            body: &raw,
        };
        let hasher = SeriesHasher::random();
        let mut out = vec![9u8];
        put_ship_section(&mut out, &hasher, &d);
        assert_eq!(out[0], 9, "written after what was there");
        let s = ShipSection::parse(&out[1..]).unwrap().unwrap();
        assert_eq!((s.key_id, s.series()), (hasher.id(), 3));
        assert_eq!(s.fingerprint(0), s.fingerprint(2));
        assert_ne!(s.fingerprint(0), s.fingerprint(1));
        assert_eq!(s.fingerprint(1), hasher.series(&d, &batch.series[1]));
        assert_eq!(s.samples(1), 1..2);
        assert_eq!(s.timestamps(s.samples(1)).collect::<Vec<_>>(), vec![5]);
        assert_eq!(
            s.values(0..3).collect::<Vec<_>>(),
            vec![1f64.to_bits(), 2f64.to_bits(), 3f64.to_bits()]
        );
        // Another hasher gives other fingerprints and another id.
        let other = SeriesHasher::random();
        assert_ne!(other.series(&d, &batch.series[0]), s.fingerprint(0));
        assert_ne!(other.id(), hasher.id());
        // Every truncation or cut of a count is an error, never a panic.
        for cut in 1..out.len() - 1 {
            assert!(
                ShipSection::parse(&out[1..1 + cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut bad = out[1..].to_vec();
        bad[16 + 48..16 + 52].copy_from_slice(&7u32.to_le_bytes());
        assert!(ShipSection::parse(&bad).unwrap_err().contains("end 7"));
        // The section agrees with the body; one changed value bit or timestamp does not.
        assert_eq!(check_ship_section(&s, &d), Ok(()));
        let values_at = out.len() - 3 * 8;
        for at in [values_at - 3 * 8 + 8, values_at + 8 + 7] {
            let mut changed = out[1..].to_vec();
            changed[at - 1] ^= 1;
            let c = ShipSection::parse(&changed).unwrap().unwrap();
            let e = check_ship_section(&c, &d).unwrap_err();
            assert!(e.starts_with("series 1 sample 0"), "{e}");
        }
        // A request with metadata gets an empty section.
        batch.metadata.push(Default::default());
        let d = Decoded {
            batch: &batch,
            body: &raw,
        };
        let mut none = Vec::new();
        put_ship_section(&mut none, &hasher, &d);
        assert!(none.is_empty());
        assert_eq!(ShipSection::parse(&none), Ok(None));
    }

    /// The staged writes hash exactly the stream `(u32 LE length, bytes)` per name and
    /// value, whatever the lengths (filling the stage buffer exactly, or longer than it).
    #[test]
    fn fingerprints_hash_the_length_prefixed_stream() {
        let mut lengths = vec![1usize, 7, 200, 505, 600, 1500];
        lengths.extend(476..=492);
        let jobs: Vec<String> = lengths.iter().map(|n| "x".repeat(*n)).collect();
        let series: Vec<(&str, f64)> = jobs.iter().map(|j| (j.as_str(), 1.0)).collect();
        let raw = request(&series);
        let mut batch = Batch::default();
        decoded(&raw, &mut batch);
        let d = Decoded {
            batch: &batch,
            body: &raw,
        };
        let hasher = SeriesHasher::random();
        for (s, job) in batch.series.iter().zip(&jobs) {
            let mut stream = vec![DOMAIN_LENGTH_PREFIXED];
            for text in ["__name__", "up", "job", job.as_str()] {
                stream.extend_from_slice(&(text.len() as u32).to_le_bytes());
                stream.extend_from_slice(text.as_bytes());
            }
            let mut h = SipHasher13::new_with_keys(hasher.keys.0, hasher.keys.1);
            h.write(&stream);
            assert_eq!(
                hasher.labels(&d, s.labels),
                h.finish128().as_u128(),
                "job of {} bytes",
                job.len()
            );
        }
    }

    /// A 1.0 series whose label fields follow each other is hashed from those bytes
    /// as they are; one with a sample between its labels from its names and values.
    #[test]
    fn fingerprints_hash_contiguous_label_fields_as_they_are_in_the_body() {
        use promgate_proto::messages::v1;
        use prost::Message;
        let label = |n: &str, v: &str| {
            v1::Label {
                name: n.into(),
                value: v.into(),
            }
            .encode_to_vec()
        };
        let field = |key: u8, m: &[u8]| {
            let mut f = vec![key, m.len() as u8];
            f.extend_from_slice(m);
            f
        };
        let sample = v1::Sample {
            value: 1.0,
            timestamp: 5,
        }
        .encode_to_vec();
        let (name, job) = (
            field(0x0a, &label("__name__", "up")),
            field(0x0a, &label("job", "a")),
        );
        let series = |parts: &[&[u8]]| field(0x0a, &parts.concat());
        let raw = [
            series(&[&name, &job, &field(0x12, &sample)]),
            series(&[&name, &field(0x12, &sample), &job]),
        ]
        .concat();
        let mut batch = Batch::default();
        decoded(&raw, &mut batch);
        let d = Decoded {
            batch: &batch,
            body: &raw,
        };
        let (together, apart) = (&batch.series[0], &batch.series[1]);
        assert_eq!(
            d.bytes(together.label_bytes),
            [&name[..], &job[..]].concat()
        );
        assert_eq!(apart.label_bytes.len, 0);
        let hasher = SeriesHasher::random();
        let mut h = SipHasher13::new_with_keys(hasher.keys.0, hasher.keys.1);
        h.write(&[DOMAIN_BODY_BYTES]);
        h.write(&[&name[..], &job[..]].concat());
        assert_eq!(hasher.series(&d, together), h.finish128().as_u128());
        assert_eq!(hasher.series(&d, apart), hasher.labels(&d, apart.labels));
        // The same label set, two streams: two fingerprints (never one for two sets).
        assert_ne!(hasher.series(&d, together), hasher.series(&d, apart));
    }
}
