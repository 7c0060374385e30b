//! The ship protocol: how an agent's shard hands acknowledged data to the server, over
//! one TCP connection (default port 30033). Pure encode/validate functions; the agent's
//! shipper (`shards/src/ship.rs`) and the server (`server/src/ingest.rs`) do the I/O.
//!
//! ## Frame (every message, both directions)
//!
//! ```text
//! offset size  field
//!  0      4    magic      "PGSF"
//!  4      1    version    FRAME_VERSION (3); anything else is answered with an error frame
//!  5      1    kind       KIND_HELLO 1 | KIND_WELCOME 2 | KIND_BATCH 3 | KIND_ACK 4 | KIND_ERROR 5
//!                         | KIND_SYNC 6
//!  6      2    flags      u16 LE; bit 0 (FLAG_SNAPPY): the body is one snappy block;
//!                         other bits must be zero
//!  8      4    length     u32 LE, bytes of body on the wire (at most FRAME_BODY_MAX)
//! 12      4    crc32c     u32 LE, CRC-32C (Castagnoli) of the body as on the wire
//! 16      ...  body       an rkyv archive (after snappy decompression when flagged)
//! ```
//!
//! The body, once decompressed, is an rkyv 0.8 archive (little-endian, aligned, relative
//! pointers; the root object at the end) of the type the kind names: [`Hello`],
//! [`Welcome`], [`ShipBatch`], [`Ack`], [`ShipError`] or [`Sync`]. The receiver copies it into a
//! 16-byte-aligned buffer and validates the whole archive with bytecheck
//! ([`access`]) before reading a field; [`check_batch`] then checks what bytecheck
//! cannot (column lengths agree, label sets are well formed).
//!
//! ## Conversation
//!
//! ```text
//! agent                                   server
//!   HELLO {agent, shard}          ──▶
//!                                 ◀──  WELCOME {applied_seq, durable_seq}
//!   BATCH {first_seq..last_seq}   ──▶                           (stop-and-wait: one in flight)
//!                                 ◀──  ACK {seq = last_seq, durable_seq}   after the store commit
//!   ...
//!   SYNC {seq}                    ──▶                           (idle, durable_seq behind)
//!                                 ◀──  ACK {seq, durable_seq}
//!                                 ◀──  ERROR {code, message}    then the server closes
//! ```
//!
//! Two sequence numbers come back. `applied_seq` (and an ack's `seq`) is what the store
//! holds and answers queries from: the next batch starts after it. `durable_seq` is what
//! survives a crash of the server: the store commits batches without an fsync and makes
//! them durable together at its periodic checkpoint. The agent may delete WAL records
//! only up to `durable_seq`; after a server crash the WELCOME names the durable point
//! and the agent resends from there. So the agent's WAL is the server's log too, and the
//! store does not rewrite every series' open chunk on every batch.
//!
//! ## Batch layout ([`ShipBatch`])
//!
//! - `agent`, `shard`, `first_seq`, `last_seq`: the WAL records this batch carries, all of
//!   them, in order. The server stores the batch and the new `applied_seq = last_seq` for
//!   (agent, shard) in one transaction, and skips a batch whose `last_seq` is at or below
//!   the applied one (a replay after a crash), so each record is applied exactly once.
//! - `new_targets`: `(ref, target labels, tags)` for each target this connection has not
//!   sent before. The target labels are the pairs every series of the target carries
//!   (after relabelling); the tags are the meta, agent and custom tags enrichment gave
//!   the target (see `shards/src/enrich.rs`). A series of no known target refers to a
//!   target with no labels and the agent and custom tags only.
//! - `new_series`: `(ref, target ref, absent, app labels)` for each series reference
//!   this connection has not sent before. The series' labels are its app labels plus
//!   its target's labels except the indexes in `absent` (those it carries with another
//!   value, or not at all: `honor_labels`), merged in name order; its tags are the
//!   target's tags not named like one of its labels. References are per connection: a
//!   label set crosses the wire once per connection, a target's labels and tags once per
//!   connection for all its series, then samples carry only the series' `u32` reference.
//! - samples as three columns of equal length: `sample_refs` (u32), `sample_ts`
//!   (i64 ms) and `sample_values` (the f64's bit pattern as u64, so every NaN payload,
//!   including Prometheus's staleness marker, survives exactly).
//! - `histograms`: `(ref, ts, proto)`, where `proto` is the native histogram as a
//!   remote_write 1.0 `prometheus.Histogram` message (prost-encoded), so the server can
//!   hand it back to remote_read unchanged.
//! - `exemplars`: `(ref, ts, value bits, labels)`.
//! - `metadata`: `(family, type, help, unit)`, as remote_write sent it.

use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

pub const MAGIC: [u8; 4] = *b"PGSF";
pub const FRAME_VERSION: u8 = 3;
pub const HEADER_BYTES: usize = 16;
pub const KIND_HELLO: u8 = 1;
pub const KIND_WELCOME: u8 = 2;
pub const KIND_BATCH: u8 = 3;
pub const KIND_ACK: u8 = 4;
pub const KIND_ERROR: u8 = 5;
pub const KIND_SYNC: u8 = 6;
pub const FLAG_SNAPPY: u16 = 1;
/// Largest body on the wire.
pub const FRAME_BODY_MAX: usize = 64 << 20;
/// Largest body after decompression.
pub const ARCHIVE_BYTES_MAX: usize = 256 << 20;
/// A label set on the ship link holds at most this many labels.
pub const LABELS_PER_SERIES_MAX: usize = 1024;

/// Error codes of [`ShipError`].
pub mod code {
    /// The frame itself is wrong (magic, flags, CRC, length, snappy).
    pub const BAD_FRAME: u16 = 1;
    /// A frame version this server does not speak.
    pub const UNSUPPORTED_VERSION: u16 = 2;
    /// The archive failed validation, or a batch is inconsistent.
    pub const BAD_ARCHIVE: u16 = 3;
    /// A frame of a kind not expected now (a batch before hello, say).
    pub const UNEXPECTED: u16 = 4;
    /// The batch's sequence range overlaps what is already applied in a way a replay
    /// cannot produce.
    pub const SEQUENCE: u16 = 5;
    /// The server could not make the batch durable; retry later.
    pub const STORAGE: u16 = 6;
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub agent: String,
    pub shard: u32,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Highest sequence number of this (agent, shard) already stored; 0 for none.
    pub applied_seq: u64,
    /// Highest one that survives a crash of the server (at most `applied_seq`).
    pub durable_seq: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The batch's `last_seq` (for a SYNC: the applied sequence number).
    pub seq: u64,
    /// Highest sequence number of this (agent, shard) that survives a crash of the
    /// server: the agent may delete its WAL up to here.
    pub durable_seq: u64,
}

/// Sent by an idle agent whose records are applied but not yet durable, to learn the
/// durable point; `seq` is the applied sequence number it was last acknowledged.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Sync {
    pub seq: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ShipError {
    pub code: u16,
    pub message: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub name: String,
    pub value: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NewSeries {
    pub series_ref: u32,
    /// The target this series belongs to (a [`NewTarget`] of this connection).
    pub target_ref: u32,
    /// Indexes (ascending) into the target's labels of those this series does not carry
    /// with the target's value; usually empty.
    pub absent: Vec<u16>,
    /// The series' app labels: its labels minus the target's labels it carries.
    pub labels: Vec<Label>,
}

/// A target's labels and meta tags, sent once per connection and referenced by series.
/// Every series refers to one; series with no known target refer to one with no labels
/// and the agent's own and custom tags.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NewTarget {
    pub target_ref: u32,
    /// Target labels, sorted by name.
    pub labels: Vec<Label>,
    /// Meta, agent and custom tags, sorted by name. A series keeps those not named like
    /// one of its own labels (originals win).
    pub tags: Vec<Label>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HistogramSample {
    pub series_ref: u32,
    pub ts: i64,
    /// A remote_write 1.0 `prometheus.Histogram` message.
    pub proto: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ExemplarSample {
    pub series_ref: u32,
    pub ts: i64,
    pub value_bits: u64,
    pub labels: Vec<Label>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MetadataEntry {
    pub family: String,
    /// remote_write's `MetricType` number.
    pub kind: i32,
    pub help: String,
    pub unit: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ShipBatch {
    pub agent: String,
    pub shard: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    pub new_targets: Vec<NewTarget>,
    pub new_series: Vec<NewSeries>,
    pub sample_refs: Vec<u32>,
    pub sample_ts: Vec<i64>,
    pub sample_values: Vec<u64>,
    pub histograms: Vec<HistogramSample>,
    pub exemplars: Vec<ExemplarSample>,
    pub metadata: Vec<MetadataEntry>,
}

impl ShipBatch {
    pub fn clear(&mut self) {
        self.new_targets.clear();
        self.new_series.clear();
        self.sample_refs.clear();
        self.sample_ts.clear();
        self.sample_values.clear();
        self.histograms.clear();
        self.exemplars.clear();
        self.metadata.clear();
    }

    pub fn samples(&self) -> usize {
        self.sample_refs.len()
    }
}

/// Why a frame or archive was refused. Each maps to an error [`code`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    BadMagic([u8; 4]),
    UnsupportedVersion(u8),
    UnknownFlags(u16),
    TooLarge(usize),
    Crc { expected: u32, actual: u32 },
    Snappy(String),
    Archive(String),
    Batch(String),
}

impl FrameError {
    pub fn code(&self) -> u16 {
        match self {
            FrameError::UnsupportedVersion(_) => code::UNSUPPORTED_VERSION,
            FrameError::Archive(_) | FrameError::Batch(_) => code::BAD_ARCHIVE,
            _ => code::BAD_FRAME,
        }
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadMagic(m) => write!(f, "bad frame magic {m:02x?} (want \"PGSF\")"),
            FrameError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "unsupported frame version {v} (this side speaks {FRAME_VERSION})"
                )
            }
            FrameError::UnknownFlags(x) => write!(f, "unknown frame flags {x:#06x}"),
            FrameError::TooLarge(n) => write!(f, "frame body of {n} bytes is over the limit"),
            FrameError::Crc { expected, actual } => write!(
                f,
                "frame CRC mismatch: header says {expected:#010x}, body has {actual:#010x}"
            ),
            FrameError::Snappy(e) => write!(f, "frame body is not valid snappy: {e}"),
            FrameError::Archive(e) => write!(f, "invalid archive: {e}"),
            FrameError::Batch(e) => write!(f, "inconsistent batch: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub flags: u16,
    pub len: usize,
    pub crc: u32,
}

/// Parses and checks the 16-byte header (magic, version, flags, length).
pub fn parse_header(b: &[u8; HEADER_BYTES]) -> Result<FrameHeader, FrameError> {
    let magic = [b[0], b[1], b[2], b[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if b[4] != FRAME_VERSION {
        return Err(FrameError::UnsupportedVersion(b[4]));
    }
    let flags = u16::from_le_bytes([b[6], b[7]]);
    if flags & !FLAG_SNAPPY != 0 {
        return Err(FrameError::UnknownFlags(flags));
    }
    let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
    if len > FRAME_BODY_MAX {
        return Err(FrameError::TooLarge(len));
    }
    Ok(FrameHeader {
        kind: b[5],
        flags,
        len,
        crc: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
    })
}

/// Checks the body's CRC and puts the archive (decompressed if flagged) into `out`.
pub fn open_body(h: &FrameHeader, wire: &[u8], out: &mut AlignedVec) -> Result<(), FrameError> {
    let actual = crc32c::crc32c(wire);
    if actual != h.crc {
        return Err(FrameError::Crc {
            expected: h.crc,
            actual,
        });
    }
    out.clear();
    if h.flags & FLAG_SNAPPY != 0 {
        let n = snap::raw::decompress_len(wire).map_err(|e| FrameError::Snappy(e.to_string()))?;
        if n > ARCHIVE_BYTES_MAX {
            return Err(FrameError::TooLarge(n));
        }
        out.resize(n, 0);
        snap::raw::Decoder::new()
            .decompress(wire, out.as_mut_slice())
            .map_err(|e| FrameError::Snappy(e.to_string()))?;
    } else {
        out.extend_from_slice(wire);
    }
    Ok(())
}

/// Appends one frame: header, then `archive` (snappy-compressed when `compress`).
pub fn write_frame(kind: u8, archive: &[u8], compress: bool, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    let flags = if compress {
        let max = snap::raw::max_compress_len(archive.len());
        out.resize(start + HEADER_BYTES + max, 0);
        let n = snap::raw::Encoder::new()
            .compress(archive, &mut out[start + HEADER_BYTES..])
            .expect("the buffer has max_compress_len bytes");
        out.truncate(start + HEADER_BYTES + n);
        FLAG_SNAPPY
    } else {
        out.extend_from_slice(archive);
        0
    };
    let body = &out[start + HEADER_BYTES..];
    let len = body.len() as u32;
    let crc = crc32c::crc32c(body);
    let h = &mut out[start..start + HEADER_BYTES];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = FRAME_VERSION;
    h[5] = kind;
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Serializes `value` into an rkyv archive.
pub fn archive<T>(value: &T) -> AlignedVec
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            RkyvError,
        >,
    >,
{
    rkyv::to_bytes::<RkyvError>(value).expect("serializing into memory cannot fail")
}

/// Appends a whole frame holding `value`.
pub fn write_message<T>(kind: u8, value: &T, compress: bool, out: &mut Vec<u8>)
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            RkyvError,
        >,
    >,
{
    write_frame(kind, &archive(value), compress, out);
}

/// Validates the whole archive with bytecheck and returns its root.
pub fn access<T>(bytes: &[u8]) -> Result<&T, FrameError>
where
    T: rkyv::Portable
        + for<'a> rkyv::bytecheck::CheckBytes<
            rkyv::api::high::HighValidator<'a, rkyv::rancor::BoxedError>,
        >,
{
    // BoxedError keeps the reason in release builds too (rancor's `Error` only does in
    // debug builds), so an error frame says what was wrong.
    rkyv::access::<T, rkyv::rancor::BoxedError>(bytes)
        .map_err(|e| FrameError::Archive(e.to_string()))
}

/// What bytecheck cannot see: equal column lengths, sane label sets and sequence range.
pub fn check_batch(b: &ArchivedShipBatch) -> Result<(), FrameError> {
    let n = b.sample_refs.len();
    if b.sample_ts.len() != n || b.sample_values.len() != n {
        return Err(FrameError::Batch(format!(
            "sample columns differ in length: refs {n}, timestamps {}, values {}",
            b.sample_ts.len(),
            b.sample_values.len()
        )));
    }
    let (first, last) = (b.first_seq.to_native(), b.last_seq.to_native());
    if first == 0 || first > last {
        return Err(FrameError::Batch(format!(
            "bad sequence range {first}..={last}"
        )));
    }
    for t in b.new_targets.iter() {
        let r = t.target_ref;
        check_labels(&t.labels, false)
            .map_err(|e| FrameError::Batch(format!("target ref {r}: labels: {e}")))?;
        check_labels(&t.tags, false)
            .map_err(|e| FrameError::Batch(format!("target ref {r}: tags: {e}")))?;
    }
    for s in b.new_series.iter() {
        check_labels(&s.labels, false)
            .map_err(|e| FrameError::Batch(format!("series ref {}: {e}", s.series_ref)))?;
        if s.absent.windows(2).any(|w| w[0] >= w[1]) {
            return Err(FrameError::Batch(format!(
                "series ref {}: absent target labels not ascending",
                s.series_ref
            )));
        }
    }
    for e in b.exemplars.iter() {
        check_labels(&e.labels, false)
            .map_err(|m| FrameError::Batch(format!("exemplar of ref {}: {m}", e.series_ref)))?;
    }
    Ok(())
}

/// A series label set: sorted by name, no duplicates, no empty name or value, and
/// (for series) a `__name__`.
fn check_labels(labels: &[ArchivedLabel], series: bool) -> Result<(), String> {
    if labels.len() > LABELS_PER_SERIES_MAX {
        return Err(format!(
            "{} labels (at most {LABELS_PER_SERIES_MAX})",
            labels.len()
        ));
    }
    let mut prev: Option<&str> = None;
    for l in labels {
        if l.name.is_empty() || l.value.is_empty() {
            return Err(format!("empty label name or value ({:?})", l.name.as_str()));
        }
        if let Some(p) = prev {
            if p >= l.name.as_str() {
                return Err(format!(
                    "labels not sorted or duplicated at {:?}",
                    l.name.as_str()
                ));
            }
        }
        prev = Some(l.name.as_str());
    }
    if series && !labels.iter().any(|l| l.name == "__name__") {
        return Err("no __name__ label".into());
    }
    Ok(())
}

/// Reads whole frames out of a byte stream buffer: `Ok(Some((header, body range, used)))`
/// once a complete frame is present.
pub fn split_frame(
    buf: &[u8],
) -> Result<Option<(FrameHeader, std::ops::Range<usize>)>, FrameError> {
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let h = parse_header(buf[..HEADER_BYTES].try_into().expect("16 bytes"))?;
    if buf.len() < HEADER_BYTES + h.len {
        return Ok(None);
    }
    Ok(Some((h, HEADER_BYTES..HEADER_BYTES + h.len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_batch() -> ShipBatch {
        ShipBatch {
            agent: "a1".into(),
            shard: 0,
            first_seq: 1,
            last_seq: 2,
            new_targets: vec![NewTarget {
                target_ref: 0,
                labels: vec![],
                tags: vec![Label {
                    name: "agent".into(),
                    value: "a1".into(),
                }],
            }],
            new_series: vec![NewSeries {
                series_ref: 0,
                target_ref: 0,
                absent: vec![],
                labels: vec![
                    Label {
                        name: "__name__".into(),
                        value: "up".into(),
                    },
                    Label {
                        name: "job".into(),
                        value: "x".into(),
                    },
                ],
            }],
            sample_refs: vec![0, 0],
            sample_ts: vec![1000, 2000],
            sample_values: vec![1f64.to_bits(), 0x7ff0_0000_0000_0002],
            ..Default::default()
        }
    }

    fn round_trip(compress: bool) {
        let b = sample_batch();
        let mut out = Vec::new();
        write_message(KIND_BATCH, &b, compress, &mut out);
        let (h, range) = split_frame(&out).unwrap().unwrap();
        assert_eq!(range.end, out.len());
        assert_eq!(h.kind, KIND_BATCH);
        let mut body = AlignedVec::new();
        open_body(&h, &out[range], &mut body).unwrap();
        let a = access::<ArchivedShipBatch>(&body).unwrap();
        check_batch(a).unwrap();
        let back: ShipBatch = rkyv::deserialize::<ShipBatch, RkyvError>(a).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn frames_round_trip_plain_and_snappy() {
        round_trip(false);
        round_trip(true);
    }

    #[test]
    fn every_flipped_bit_is_refused_or_harmless() {
        let mut out = Vec::new();
        write_message(KIND_BATCH, &sample_batch(), false, &mut out);
        for i in 0..out.len() * 8 {
            let mut f = out.clone();
            f[i / 8] ^= 1 << (i % 8);
            let r = split_frame(&f).and_then(|x| match x {
                None => Ok(()),
                Some((h, range)) => {
                    let mut body = AlignedVec::new();
                    open_body(&h, &f[range], &mut body)?;
                    access::<ArchivedShipBatch>(&body).and_then(check_batch)
                }
            });
            // The CRC covers the body; the header fields are checked one by one. A flip
            // in the kind byte or the CRC's own bytes is the only way to pass or fail
            // differently, and either way nothing panics.
            if i / 8 >= HEADER_BYTES {
                assert!(r.is_err(), "bit {i} flipped in the body was not caught");
            }
        }
    }

    #[test]
    fn inconsistent_batches_are_refused() {
        let mut b = sample_batch();
        b.sample_ts.pop();
        let bytes = archive(&b);
        let a = access::<ArchivedShipBatch>(&bytes).unwrap();
        assert!(matches!(check_batch(a), Err(FrameError::Batch(m)) if m.contains("columns")));
        let mut b = sample_batch();
        b.new_series[0].labels.swap(0, 1);
        let bytes = archive(&b);
        let a = access::<ArchivedShipBatch>(&bytes).unwrap();
        assert!(matches!(check_batch(a), Err(FrameError::Batch(m)) if m.contains("sorted")));
    }
}
