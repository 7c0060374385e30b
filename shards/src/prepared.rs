//! Ship-ready copies of the newest WAL records, so the shipper need not decode them again.
//!
//! The receive path has every request decoded already. When it appends a record to the
//! WAL it also leaves here, keyed by the record's sequence number, what the shipper needs
//! from a record whose series the server already knows: one 128-bit fingerprint of each
//! accepted series' labels and the series' samples as columns. The shipper takes the
//! entry when it reads that record back and, if every series is known on its connection,
//! copies the columns into the batch: no snappy decompression, no protobuf pass, no
//! label hashing. Anything else (an entry that is missing, a series new to the
//! connection, a request with histograms, exemplars or metadata) goes the general way,
//! decoding the record from its WAL bytes, which stay the only source of truth.
//!
//! - **Bounded.** At most `samples_max` samples are held per shard; past that new
//!   records are not prepared (the shipper is behind and decodes them later instead).
//! - **No allocation once warm.** Entries come from a per-shard pool and go back to it
//!   when the shipper is done with them.
//! - **Fingerprints.** SipHash-1-3 with 128-bit output under random keys drawn when the
//!   shard starts: a sender cannot aim collisions at keys it never sees, and chance
//!   collisions are ~n²/2¹²⁹ for n series. The same [`SeriesHasher`] computes them in
//!   both ways, so a series has one identity on a connection whichever way it came.

use promgate_proto::batch::Run;
use promgate_proto::Decoded;
use siphasher::sip128::{Hasher128, SipHasher13};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::hash::Hasher;

/// The per-shard keyed hash of series label sets.
#[derive(Clone, Copy)]
pub struct SeriesHasher {
    keys: (u64, u64),
}

impl SeriesHasher {
    /// Fresh random keys.
    pub fn random() -> Self {
        use std::hash::BuildHasher;
        let s = std::hash::RandomState::new();
        SeriesHasher {
            keys: (s.hash_one(1u8), s.hash_one(2u8)),
        }
    }

    /// The fingerprint of one series' label set, from its raw bytes (the request was
    /// validated when it was received, so no UTF-8 check here). Lengths go in before
    /// bytes, so no two different sets feed the same stream. The stream is staged in a
    /// stack buffer and hashed in few large writes: SipHash's per-write cost would
    /// otherwise exceed its per-byte cost on short label names and values.
    pub fn labels(&self, d: &Decoded<'_>, labels: Run) -> u128 {
        let mut h = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        let mut buf = [0u8; 512];
        let mut at = 0;
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

/// One record's series fingerprints and sample columns.
#[derive(Clone, Default)]
pub struct PreparedRecord {
    pub seq: u64,
    /// One per accepted series, in the record's order (the order of its enrichment).
    pub fingerprints: Vec<u128>,
    /// Series `i`'s samples are `ends[i-1]..ends[i]` of the columns.
    pub ends: Vec<u32>,
    pub timestamps: Vec<i64>,
    pub values: Vec<u64>,
}

impl PreparedRecord {
    fn clear(&mut self) {
        self.fingerprints.clear();
        self.ends.clear();
        self.timestamps.clear();
        self.values.clear();
    }

    /// Series `i`'s samples as (timestamps, value bits).
    pub fn samples(&self, i: usize) -> (&[i64], &[u64]) {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let end = self.ends[i] as usize;
        (&self.timestamps[start..end], &self.values[start..end])
    }
}

/// The shard's prepared records, oldest first.
pub struct Prepared {
    hasher: SeriesHasher,
    queue: RefCell<VecDeque<PreparedRecord>>,
    pool: RefCell<Vec<PreparedRecord>>,
    samples: Cell<usize>,
    samples_max: usize,
}

impl Prepared {
    pub fn new(hasher: SeriesHasher, samples_max: usize) -> Self {
        Prepared {
            hasher,
            queue: RefCell::default(),
            pool: RefCell::default(),
            samples: Cell::new(0),
            samples_max,
        }
    }

    pub fn hasher(&self) -> SeriesHasher {
        self.hasher
    }

    /// Samples held now.
    pub fn samples(&self) -> usize {
        self.samples.get()
    }

    /// Prepares record `seq` from its decoded request (refused series already left
    /// out). Returns whether it was kept: not for requests with histograms, exemplars or
    /// metadata, nor past the budget.
    pub fn insert(&self, seq: u64, d: &Decoded<'_>) -> bool {
        let b = d.batch;
        if !(b.histograms.is_empty() && b.exemplars.is_empty() && b.metadata.is_empty())
            || self.samples.get() + b.samples.len() > self.samples_max
        {
            return false;
        }
        let mut q = self.queue.borrow_mut();
        if q.back().is_some_and(|r| r.seq >= seq) {
            // Sequence numbers only grow; anything else means the queue no longer
            // matches the WAL, and the shipper must not trust it.
            while let Some(r) = q.pop_front() {
                self.release(r);
            }
        }
        let mut r = self.pool.borrow_mut().pop().unwrap_or_default();
        r.seq = seq;
        for s in &b.series {
            r.fingerprints.push(self.hasher.labels(d, s.labels));
            for x in d.samples(s) {
                r.timestamps.push(x.timestamp_ms);
                r.values.push(x.value.to_bits());
            }
            r.ends.push(r.timestamps.len() as u32);
        }
        self.samples.set(self.samples.get() + r.timestamps.len());
        q.push_back(r);
        true
    }

    /// The entry of record `seq`, if it was prepared; entries of older records (never
    /// to be read now) go back to the pool.
    pub fn take(&self, seq: u64) -> Option<PreparedRecord> {
        let mut q = self.queue.borrow_mut();
        while q.front().is_some_and(|r| r.seq < seq) {
            let r = q.pop_front().expect("front exists");
            self.release(r);
        }
        if q.front().is_some_and(|r| r.seq == seq) {
            let r = q.pop_front().expect("front exists");
            self.samples.set(self.samples.get() - r.timestamps.len());
            Some(r)
        } else {
            None
        }
    }

    /// Returns a taken entry's buffers to the pool.
    pub fn give_back(&self, mut r: PreparedRecord) {
        r.clear();
        self.pool.borrow_mut().push(r);
    }

    fn release(&self, r: PreparedRecord) {
        self.samples.set(self.samples.get() - r.timestamps.len());
        self.give_back(r);
    }
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
    fn fingerprints_identify_label_sets_and_entries_follow_sequence_numbers() {
        let raw = request(&[("a", 1.0), ("b", 2.0), ("a", 3.0)]);
        let mut batch = Batch::default();
        decoded(&raw, &mut batch);
        let d = Decoded {
            batch: &batch,
            body: &raw,
        };
        let p = Prepared::new(SeriesHasher::random(), 5);
        assert!(p.insert(7, &d));
        assert!(!p.insert(8, &d), "6 samples exceed the budget of 5");
        assert_eq!(p.samples(), 3);
        let r = p.take(7).unwrap();
        assert_eq!(r.fingerprints.len(), 3);
        assert_eq!(r.fingerprints[0], r.fingerprints[2]);
        assert_ne!(r.fingerprints[0], r.fingerprints[1]);
        assert_eq!(r.samples(1), (&[5i64][..], &[2f64.to_bits()][..]));
        assert_eq!(p.samples(), 0);
        p.give_back(r);
        // Older entries are dropped on the way to a newer one; a missing one is None.
        assert!(p.insert(9, &d));
        assert!(p.take(10).is_none());
        assert_eq!(p.samples(), 0);
        // Another hasher gives other fingerprints.
        let other = SeriesHasher::random().labels(&d, batch.series[0].labels);
        assert_ne!(other, p.hasher().labels(&d, batch.series[0].labels));
    }

    /// The staged writes hash exactly the stream `(u32 LE length, bytes)` per name and
    /// value, whatever the lengths (filling the stage buffer exactly, or longer than it).
    #[test]
    fn fingerprints_hash_the_length_prefixed_stream() {
        let lengths = [1usize, 7, 200, 487, 488, 489, 505, 600, 1500];
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
            let mut stream = Vec::new();
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
}
