//! The WAL's on-disk format, and the scan that recovery and `promgate wal inspect` use.
//! Pure functions over byte slices: no I/O, so the format is tested exhaustively.
//!
//! ## Segment file
//!
//! One directory per shard (`<data_dir>/wal/shard-<N>/`), holding segment files named
//! by the sequence number of their first record, `<first_seq as 16 hex digits>.wal`.
//!
//! ```text
//! SegmentHeader (64 bytes, little-endian)
//!   magic        [u8; 8]   "PGWALSEG"
//!   version      u32       SEGMENT_VERSION (1)
//!   shard        u32
//!   first_seq    u64       sequence number of the first record in this file
//!   created_ms   u64       wall clock at creation (for age-based retention)
//!   reserved     [u8; 28]  zero
//!   crc32c       u32       CRC-32C of the 60 bytes before it
//! Record*        each starting at an 8-byte-aligned offset
//! ```
//!
//! ## Record
//!
//! ```text
//! Record (little-endian)
//!   len          u32       bytes covered by crc: from `seq` to the end of the payload
//!   crc32c       u32       CRC-32C (Castagnoli) of those `len` bytes
//!   seq          u64       strictly consecutive within a segment
//!   kind         u8        KIND_REMOTE_WRITE (1)
//!   format       u8        payload format version (PAYLOAD_VERSION, 3; 1 and 2 are still read)
//!   reserved     u16       zero
//!   payload      [u8]      len - 12 bytes
//!   padding      [u8]      zeros up to the next multiple of 8
//! ```
//!
//! Payload format 3 (kind 1), one acknowledged remote_write request, its enrichment and
//! its ship-ready columns:
//!
//! ```text
//!   protocol     u8        1 = remote_write 1.0, 2 = remote_write 2.0
//!   reserved     [u8; 3]   zero
//!   rejected     u32       number of series the decoder refused (answered 400)
//!   rejected_ix  [u32]     their indexes in the request, ascending
//!   enrich_len   u32       bytes of the enrichment section that follows
//!   enrichment:
//!     base_tags    pairs   tags of series with no known target (agent, agent_host, custom)
//!     header_tags  pairs   tags taken from this request's headers (`[enrich.header_tags]`)
//!     targets      u32     number of targets, then for each target that has series in
//!                          this request:
//!       job lp, instance lp, labels pairs (target labels), tags pairs (meta, agent, custom)
//!     series     u32       number of accepted series, then per series (in request order,
//!                          refused ones left out) its target's index above as u16, or
//!                          0xffff (NO_TARGET): no known target, base tags
//!   ship_len     u32       bytes of the ship section that follows (0: none)
//!   ship section:
//!     key_id     u64       which fingerprint keys wrote it (random per agent process)
//!     series     u32       n, the accepted series, in request order
//!     samples    u32       m, their samples
//!     fingerprints [u128]  n: keyed hash of each series' labels
//!     ends       [u32]     n: series i's samples are ends[i-1]..ends[i] of the columns
//!     timestamps [i64]     m, milliseconds
//!     values     [u64]     m, f64 bits
//!   body         [u8]      the request body exactly as received (snappy block)
//!
//!   pairs := count u32, (lp(name) lp(value))*, sorted by name;  lp := len u32 | UTF-8 bytes
//! ```
//!
//! Payload format 2 is format 3 without `ship_len` and the ship section, and format 1 is
//! format 2 without `enrich_len` and the enrichment (records written before enrichment
//! existed); both are still read, and format 1's series get no tags.
//!
//! The enrichment is the outcome of enriching the request against the snapshot of the
//! moment it was received: the snapshot may change before the record is shipped, and
//! what was acknowledged must ship with the tags it was acknowledged with. Targets are
//! stored once per record; each series costs two bytes (its target's index).
//!
//! Why the body as received rather than a re-encoded batch: it is the smallest form the
//! data exists in (36–70 bytes per sample on realistic loads, against ~350 for decoded
//! labels and samples), so the disk writes ~5–10x fewer bytes, and appending costs one
//! copy, not an encode. A reader decodes it with the same pure decoder and skips the
//! series listed as rejected, so it sees exactly what was acknowledged. The body stays
//! the only source of truth.
//!
//! The ship section is what the receive path already had in hand: a fingerprint per
//! series and the samples as columns (`crate::prepared`). With it the shipper sends a
//! record whose series its connection already knows without decompressing or decoding
//! the body (about a tenth of the CPU per sample of decoding it again, `cargo bench
//! --bench enrich`). It costs 16 bytes per sample and 20 per series on disk. The ship
//! form itself (rkyv, series interned per connection) depends on the connection and so
//! cannot be precomputed. The section
//! is a cache, never trusted over the body: a reader with other fingerprint keys (the
//! agent restarted), or one that finds the section malformed, decodes the body. It is
//! left empty for requests with histograms, exemplars or metadata, which the shipper
//! always decodes.
//!
//! ## Recovery
//!
//! A segment is read from its header onwards; a record is accepted only if its length
//! fits, its CRC matches and its `seq` is exactly the next one expected. At the first
//! record that fails, the scan looks ahead (8-byte steps) for a valid record with a
//! higher `seq`:
//! - none found: everything from there on is a **torn tail** (a write cut short by a
//!   crash, the old records of a reused (spare) segment file, see
//!   `wal::storage::SPARES_MAX`, or the padding of the last flushed block in segments
//!   written with direct I/O: before 61e397f, and since db85e78 until `close` cuts
//!   them). In the newest segment it is truncated away, and so it is in an older one
//!   when the next segment starts right after its last record (nothing is missing: a
//!   close that did not finish); otherwise it is reported as corruption, with the
//!   sequence numbers lost.
//! - found: the bytes between are a **corrupt record in the middle**, reported with the
//!   sequence numbers it lost (never silently skipped), and the scan continues there.
//!
//! Stale bytes in padding, and a reused file's old records, can be CRC-valid records;
//! the consecutive-`seq` rule and the look-ahead's higher-`seq` rule keep them out, since
//! sequence numbers only grow and a file is reused only once all its records were
//! acknowledged.

pub const SEGMENT_MAGIC: &[u8; 8] = b"PGWALSEG";
pub const SEGMENT_VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 64;
/// `len` and `crc32c` before the covered bytes.
pub const RECORD_PREFIX_BYTES: usize = 8;
/// `seq`, `kind`, `format`, `reserved` at the start of the covered bytes.
pub const RECORD_META_BYTES: usize = 12;
pub const RECORD_ALIGN_BYTES: usize = 8;
pub const KIND_REMOTE_WRITE: u8 = 1;
/// The payload format written; formats 1 and 2 are still read.
pub const PAYLOAD_VERSION: u8 = 3;
/// A record longer than this is not believed during recovery.
pub const RECORD_BYTES_MAX: usize = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u32,
    pub first_seq: u64,
    pub created_ms: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.shard.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, String> {
        if b.len() < HEADER_BYTES {
            return Err(format!(
                "segment shorter than its {HEADER_BYTES}-byte header"
            ));
        }
        if &b[0..8] != SEGMENT_MAGIC {
            return Err("not a promgate WAL segment (bad magic)".into());
        }
        if crc32c::crc32c(&b[..60]) != u32::from_le_bytes(le4(&b[60..64])) {
            return Err("segment header checksum mismatch".into());
        }
        let version = u32::from_le_bytes(le4(&b[8..12]));
        if version != SEGMENT_VERSION {
            return Err(format!(
                "segment version {version} is not supported (want {SEGMENT_VERSION})"
            ));
        }
        Ok(SegmentHeader {
            shard: u32::from_le_bytes(le4(&b[12..16])),
            first_seq: u64::from_le_bytes(le8(&b[16..24])),
            created_ms: u64::from_le_bytes(le8(&b[24..32])),
        })
    }
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:016x}.wal")
}

pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// Bytes a record with this payload occupies on disk, padding included.
pub fn record_disk_bytes(payload_len: usize) -> usize {
    let raw = RECORD_PREFIX_BYTES + RECORD_META_BYTES + payload_len;
    raw.div_ceil(RECORD_ALIGN_BYTES) * RECORD_ALIGN_BYTES
}

/// Appends one record to `out` (which must end 8-byte aligned relative to the segment).
/// `payload` is written by the closure so callers can build it in place.
pub fn append_record(
    out: &mut Vec<u8>,
    seq: u64,
    kind: u8,
    format: u8,
    payload: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_PREFIX_BYTES]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&[kind, format, 0, 0]);
    payload(out);
    let covered = out.len() - start - RECORD_PREFIX_BYTES;
    assert!(
        covered <= RECORD_BYTES_MAX,
        "record of {covered} bytes over the format limit"
    );
    let crc = crc32c::crc32c(&out[start + RECORD_PREFIX_BYTES..]);
    out[start..start + 4].copy_from_slice(&(covered as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    let padded = record_disk_bytes(covered - RECORD_META_BYTES);
    out.resize(start + padded, 0);
}

/// Writes payload format 3: the rejected series, the enrichment section (written by
/// `enrichment`, see [`put_pairs`]), the ship section (written by `ship`, see
/// [`ShipSection`]; writing nothing leaves it empty), and the request body as received.
pub fn remote_write_payload(
    out: &mut Vec<u8>,
    protocol: u8,
    rejected: &[u32],
    enrichment: impl FnOnce(&mut Vec<u8>),
    ship: impl FnOnce(&mut Vec<u8>),
    body: &[u8],
) {
    out.extend_from_slice(&[protocol, 0, 0, 0]);
    out.extend_from_slice(&(rejected.len() as u32).to_le_bytes());
    for ix in rejected {
        out.extend_from_slice(&ix.to_le_bytes());
    }
    length_prefixed(out, enrichment);
    length_prefixed(out, ship);
    out.extend_from_slice(body);
}

/// Writes a `u32` length, then what `section` writes, then patches the length in.
fn length_prefixed(out: &mut Vec<u8>, section: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    section(out);
    let n = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&n.to_le_bytes());
}

/// Bytes of a ship section before its columns.
pub const SHIP_HEADER_BYTES: usize = 16;

/// The start of a ship section: the key id and the counts. The caller writes the
/// columns after it.
pub fn put_ship_header(out: &mut Vec<u8>, key_id: u64, series: usize, samples: usize) {
    out.extend_from_slice(&key_id.to_le_bytes());
    out.extend_from_slice(&(series as u32).to_le_bytes());
    out.extend_from_slice(&(samples as u32).to_le_bytes());
}

/// A record's ship section, checked for consistency and borrowing the payload. Columns
/// are read unaligned: a payload sits at no particular alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShipSection<'a> {
    pub key_id: u64,
    fingerprints: &'a [u8],
    ends: &'a [u8],
    timestamps: &'a [u8],
    values: &'a [u8],
}

impl<'a> ShipSection<'a> {
    /// `Ok(None)` for an empty section.
    pub fn parse(b: &'a [u8]) -> Result<Option<Self>, String> {
        if b.is_empty() {
            return Ok(None);
        }
        if b.len() < SHIP_HEADER_BYTES {
            return Err(format!(
                "ship section of {} bytes is shorter than its header",
                b.len()
            ));
        }
        let key_id = u64::from_le_bytes(le8(&b[0..8]));
        let n = u32::from_le_bytes(le4(&b[8..12])) as usize;
        let m = u32::from_le_bytes(le4(&b[12..16])) as usize;
        if b.len() - SHIP_HEADER_BYTES != 20 * n + 16 * m {
            return Err(format!(
                "ship section holds {} bytes for {n} series and {m} samples",
                b.len()
            ));
        }
        let (fingerprints, rest) = b[SHIP_HEADER_BYTES..].split_at(16 * n);
        let (ends, rest) = rest.split_at(4 * n);
        let (timestamps, values) = rest.split_at(8 * m);
        let mut last = 0;
        for e in ends.chunks_exact(4) {
            let e = u32::from_le_bytes(le4(e)) as usize;
            if e < last || e > m {
                return Err(format!(
                    "ship section: sample end {e} out of order or beyond {m}"
                ));
            }
            last = e;
        }
        if last != m {
            return Err(format!("ship section: series end at sample {last} of {m}"));
        }
        Ok(Some(ShipSection {
            key_id,
            fingerprints,
            ends,
            timestamps,
            values,
        }))
    }

    pub fn series(&self) -> usize {
        self.ends.len() / 4
    }

    /// Series `i`'s fingerprint.
    pub fn fingerprint(&self, i: usize) -> u128 {
        u128::from_le_bytes(
            self.fingerprints[16 * i..16 * i + 16]
                .try_into()
                .expect("16"),
        )
    }

    /// Series `i`'s samples: indexes into the columns.
    pub fn samples(&self, i: usize) -> std::ops::Range<usize> {
        let end = |i: usize| u32::from_le_bytes(le4(&self.ends[4 * i..4 * i + 4])) as usize;
        (if i == 0 { 0 } else { end(i - 1) })..end(i)
    }

    /// The timestamps of the samples in `r`.
    pub fn timestamps(&self, r: std::ops::Range<usize>) -> impl Iterator<Item = i64> + 'a {
        self.timestamps[8 * r.start..8 * r.end]
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(le8(c)))
    }

    /// The value bits of the samples in `r`.
    pub fn values(&self, r: std::ops::Range<usize>) -> impl Iterator<Item = u64> + 'a {
        self.values[8 * r.start..8 * r.end]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(le8(c)))
    }
}

fn put_lp(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Writes `pairs` (count, then name and value of each).
pub fn put_pairs<'a>(out: &mut Vec<u8>, pairs: impl ExactSizeIterator<Item = (&'a str, &'a str)>) {
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (n, v) in pairs {
        put_lp(out, n);
        put_lp(out, v);
    }
}

/// Writes one target entry of the enrichment section.
pub fn put_target(
    out: &mut Vec<u8>,
    job: &str,
    instance: &str,
    labels: &[(String, String)],
    tags: &[(String, String)],
) {
    put_lp(out, job);
    put_lp(out, instance);
    put_pairs(out, labels.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    put_pairs(out, tags.iter().map(|(n, v)| (n.as_str(), v.as_str())));
}

/// The series target index of a series with no known target.
pub const NO_TARGET: u16 = u16::MAX;

/// Writes the per-series target indexes that end the enrichment section.
pub fn put_series_targets(out: &mut Vec<u8>, ix: &[u16]) {
    out.extend_from_slice(&(ix.len() as u32).to_le_bytes());
    for i in ix {
        out.extend_from_slice(&i.to_le_bytes());
    }
}

/// A decoded payload (format 1, 2 or 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteWritePayload<'a> {
    pub protocol: u8,
    pub rejected: &'a [u8],
    /// The enrichment section; empty for format 1.
    pub enrichment: &'a [u8],
    /// The ship section ([`ShipSection`]); empty before format 3.
    pub ship: &'a [u8],
    pub body: &'a [u8],
}

impl<'a> RemoteWritePayload<'a> {
    pub fn parse(format: u8, payload: &'a [u8]) -> Result<Self, String> {
        if !(1..=3).contains(&format) {
            return Err(format!("unknown payload format {format}"));
        }
        if payload.len() < 8 {
            return Err("payload shorter than its 8-byte header".into());
        }
        let n = u32::from_le_bytes(le4(&payload[4..8])) as usize;
        let end = n
            .checked_mul(4)
            .and_then(|b| b.checked_add(8))
            .filter(|e| *e <= payload.len());
        let end = end.ok_or("rejected-series list overruns the payload")?;
        let mut at = end;
        let mut section = |present: bool, what: &str| -> Result<&'a [u8], String> {
            if !present {
                return Ok(&payload[at..at]);
            }
            let len = payload
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(le4(b)) as usize)
                .ok_or_else(|| format!("payload ends before its {what} length"))?;
            let s = payload
                .get(at + 4..at + 4 + len)
                .ok_or_else(|| format!("{what} section overruns the payload"))?;
            at += 4 + len;
            Ok(s)
        };
        let enrichment = section(format >= 2, "enrichment")?;
        let ship = section(format >= 3, "ship")?;
        Ok(RemoteWritePayload {
            protocol: payload[0],
            rejected: &payload[8..end],
            enrichment,
            ship,
            body: &payload[at..],
        })
    }

    pub fn rejected(&self) -> impl Iterator<Item = u32> + 'a {
        self.rejected
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(le4(c)))
    }
}

pub type Pairs<'a> = Vec<(&'a str, &'a str)>;

/// One target of a record's enrichment section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordTarget<'a> {
    pub job: &'a str,
    pub instance: &'a str,
    pub labels: Pairs<'a>,
    pub tags: Pairs<'a>,
}

/// A record's enrichment section, parsed (borrowing the payload).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Enrichment<'a> {
    pub base_tags: Pairs<'a>,
    pub header_tags: Pairs<'a>,
    pub targets: Vec<RecordTarget<'a>>,
    /// u16 LE per accepted series; empty for format 1.
    series_targets: &'a [u8],
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.0.get(..4).ok_or("enrichment section truncated")?;
        self.0 = &self.0[4..];
        Ok(u32::from_le_bytes(le4(b)))
    }

    fn str(&mut self) -> Result<&'a str, String> {
        let n = self.u32()? as usize;
        let b = self.0.get(..n).ok_or("enrichment section truncated")?;
        self.0 = &self.0[n..];
        std::str::from_utf8(b).map_err(|e| format!("enrichment section: {e}"))
    }

    fn pairs(&mut self) -> Result<Pairs<'a>, String> {
        let n = self.u32()? as usize;
        // Each pair takes at least 8 bytes: never allocate more than the input can hold.
        let mut out = Vec::with_capacity(n.min(self.0.len() / 8));
        for _ in 0..n {
            out.push((self.str()?, self.str()?));
        }
        Ok(out)
    }
}

impl<'a> Enrichment<'a> {
    pub fn parse(b: &'a [u8]) -> Result<Self, String> {
        if b.is_empty() {
            return Ok(Enrichment::default());
        }
        let mut r = Reader(b);
        let base_tags = r.pairs()?;
        let header_tags = r.pairs()?;
        let n = r.u32()? as usize;
        let mut targets = Vec::with_capacity(n.min(b.len() / 16));
        for _ in 0..n {
            targets.push(RecordTarget {
                job: r.str()?,
                instance: r.str()?,
                labels: r.pairs()?,
                tags: r.pairs()?,
            });
        }
        let series = r.u32()? as usize;
        let series_targets = r.0;
        if series_targets.len() != series * 2 {
            return Err(format!(
                "enrichment section holds {} bytes for {series} series target indexes",
                series_targets.len()
            ));
        }
        if let Some(bad) = series_targets
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .find(|&i| i != NO_TARGET && usize::from(i) >= targets.len())
        {
            return Err(format!(
                "series target index {bad} beyond the record's {} targets",
                targets.len()
            ));
        }
        Ok(Enrichment {
            base_tags,
            header_tags,
            targets,
            series_targets,
        })
    }

    /// Number of series the section has a target index for (0 for format 1).
    pub fn series(&self) -> usize {
        self.series_targets.len() / 2
    }

    /// The index into `targets` of the `i`th accepted series' target, if it had one.
    pub fn target_index(&self, i: usize) -> Option<usize> {
        let b = self.series_targets.get(2 * i..2 * i + 2)?;
        let ix = usize::from(u16::from_le_bytes([b[0], b[1]]));
        (ix < self.targets.len()).then_some(ix)
    }

    /// The target of the `i`th accepted series of the record, if it had one.
    pub fn target_of(&self, i: usize) -> Option<&RecordTarget<'a>> {
        self.target_index(i).map(|ix| &self.targets[ix])
    }
}

/// One valid record found by [`scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef {
    pub seq: u64,
    pub kind: u8,
    pub format: u8,
    /// Byte range of the payload within the segment.
    pub payload: (usize, usize),
    /// Offset just past the record (and its padding).
    pub end: usize,
}

/// Bytes that could not be read as records, between two valid ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    pub offset: usize,
    pub bytes: usize,
    /// Sequence numbers that should have been there: `[first, last]`.
    pub lost_seqs: (u64, u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scan {
    pub header: SegmentHeader,
    pub records: Vec<RecordRef>,
    /// Offset just past the last valid record: where a torn tail starts.
    pub valid_end: usize,
    /// Bytes after `valid_end` that are not records (torn tail or padding).
    pub tail_bytes: usize,
    pub corruption: Vec<Corruption>,
}

/// Reads the record at `at` if it is valid and has a sequence number `> after`
/// (or exactly `exact` when given).
pub fn record_at(seg: &[u8], at: usize, after: u64, exact: Option<u64>) -> Option<RecordRef> {
    let prefix = seg.get(at..at + RECORD_PREFIX_BYTES + RECORD_META_BYTES)?;
    let len = covered_len_at(seg, at)?;
    if !(RECORD_META_BYTES..=RECORD_BYTES_MAX).contains(&len) {
        return None;
    }
    let r = record_fields(seg, at, len)?;
    match exact {
        Some(want) if r.seq != want => return None,
        None if r.seq <= after => return None,
        _ => {}
    }
    let covered = &seg[at + RECORD_PREFIX_BYTES..r.payload.1];
    if crc32c::crc32c(covered) != u32::from_le_bytes(le4(&prefix[4..8])) {
        return None;
    }
    Some(r)
}

/// The record at `at` as its meta fields describe it, given its length field `len`
/// (at least [`RECORD_META_BYTES`]); nothing is checked but that its bytes are there.
fn record_fields(seg: &[u8], at: usize, len: usize) -> Option<RecordRef> {
    let covered = seg.get(at + RECORD_PREFIX_BYTES..at + RECORD_PREFIX_BYTES + len)?;
    Some(RecordRef {
        seq: u64::from_le_bytes(le8(&covered[0..8])),
        kind: covered[8],
        format: covered[9],
        payload: (
            at + RECORD_PREFIX_BYTES + RECORD_META_BYTES,
            at + RECORD_PREFIX_BYTES + len,
        ),
        end: (at + record_disk_bytes(len - RECORD_META_BYTES)).min(seg.len()),
    })
}

/// The length field of the record starting at `at`: the bytes its CRC covers (meta and
/// payload), unchecked. `None` when fewer than its 4 bytes are there.
pub fn covered_len_at(seg: &[u8], at: usize) -> Option<usize> {
    seg.get(at..at + 4)
        .map(|b| u32::from_le_bytes(le4(b)) as usize)
}

/// The record at `at` of a buffer this process built (a commit buffer), read by its
/// length and meta fields without checking its CRC: `None` past the last record, or if
/// the record there is not `seq`.
pub fn record_unchecked_at(buf: &[u8], at: usize, seq: u64) -> Option<RecordRef> {
    let len = covered_len_at(buf, at)?;
    if len < RECORD_META_BYTES {
        return None;
    }
    record_fields(buf, at, len).filter(|r| r.seq == seq)
}

/// Reads every valid record of one segment (see the module doc for the rules).
pub fn scan(seg: &[u8]) -> Result<Scan, String> {
    let header = SegmentHeader::decode(seg)?;
    let mut records = Vec::new();
    let mut corruption = Vec::new();
    let mut at = HEADER_BYTES;
    let mut next = header.first_seq;
    let mut valid_end = at;
    while at < seg.len() {
        if let Some(r) = record_at(seg, at, 0, Some(next)) {
            next = r.seq + 1;
            at = r.end;
            valid_end = at;
            records.push(r);
            continue;
        }
        // Not the expected record: look ahead for any later valid one.
        let last = next.wrapping_sub(1);
        let mut probe = at + RECORD_ALIGN_BYTES;
        let mut found = None;
        while probe + RECORD_PREFIX_BYTES + RECORD_META_BYTES <= seg.len() {
            if let Some(r) = record_at(seg, probe, last, None) {
                found = Some((probe, r));
                break;
            }
            probe += RECORD_ALIGN_BYTES;
        }
        match found {
            Some((probe, r)) => {
                corruption.push(Corruption {
                    offset: at,
                    bytes: probe - at,
                    lost_seqs: (next, r.seq - 1),
                });
                at = probe;
                next = r.seq;
            }
            None => break,
        }
    }
    Ok(Scan {
        header,
        records,
        valid_end,
        tail_bytes: seg.len() - valid_end,
        corruption,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(first_seq: u64, payloads: &[&[u8]]) -> Vec<u8> {
        let mut seg = SegmentHeader {
            shard: 3,
            first_seq,
            created_ms: 42,
        }
        .encode()
        .to_vec();
        for (i, p) in payloads.iter().enumerate() {
            append_record(
                &mut seg,
                first_seq + i as u64,
                KIND_REMOTE_WRITE,
                PAYLOAD_VERSION,
                |o| o.extend_from_slice(p),
            );
        }
        seg
    }

    #[test]
    fn header_round_trip_and_refusals() {
        let h = SegmentHeader {
            shard: 1,
            first_seq: 99,
            created_ms: 7,
        };
        assert_eq!(SegmentHeader::decode(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[20] ^= 1;
        assert!(SegmentHeader::decode(&bad)
            .unwrap_err()
            .contains("checksum"));
        assert!(SegmentHeader::decode(b"short").is_err());
        assert_eq!(
            parse_segment_file_name(&segment_file_name(0xabc)),
            Some(0xabc)
        );
        assert_eq!(parse_segment_file_name("x.wal"), None);
    }

    #[test]
    fn records_round_trip_aligned() {
        let seg = segment(10, &[b"a", b"bcdefghij", b""]);
        let s = scan(&seg).unwrap();
        assert_eq!(
            s.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![10, 11, 12]
        );
        assert_eq!(
            &seg[s.records[1].payload.0..s.records[1].payload.1],
            b"bcdefghij"
        );
        assert!(s.records.iter().all(|r| r.end % RECORD_ALIGN_BYTES == 0));
        assert_eq!(
            (s.valid_end, s.tail_bytes, s.corruption.len()),
            (seg.len(), 0, 0)
        );
    }

    #[test]
    fn every_truncation_point_keeps_the_complete_prefix() {
        let seg = segment(1, &[b"one", b"two two", b"three three three"]);
        let full = scan(&seg).unwrap();
        for cut in HEADER_BYTES..=seg.len() {
            let s = scan(&seg[..cut]).unwrap();
            // A record is intact once its checksummed bytes are all there (padding aside).
            let complete = full.records.iter().filter(|r| r.payload.1 <= cut).count();
            assert_eq!(s.records.len(), complete, "cut at {cut}");
            assert!(
                s.corruption.is_empty(),
                "a torn tail is not corruption (cut {cut})"
            );
        }
    }

    #[test]
    fn a_corrupt_middle_record_is_reported_with_its_seq() {
        let mut seg = segment(5, &[b"first", b"second", b"third"]);
        let s = scan(&seg).unwrap();
        seg[s.records[1].payload.0] ^= 0xff;
        let s2 = scan(&seg).unwrap();
        assert_eq!(
            s2.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![5, 7]
        );
        assert_eq!(s2.corruption.len(), 1);
        assert_eq!(s2.corruption[0].lost_seqs, (6, 6));
    }

    #[test]
    fn stale_old_records_in_the_tail_are_not_resurrected() {
        let mut seg = segment(1, &[b"a", b"b"]);
        let stale = segment(1, &[b"old"]);
        seg.extend_from_slice(&stale[HEADER_BYTES..]);
        let s = scan(&seg).unwrap();
        assert_eq!(s.records.len(), 2);
        assert!(s.tail_bytes > 0);
    }

    #[test]
    fn payload_round_trip() {
        let labels = vec![("instance".to_string(), "h:1".to_string())];
        let tags = vec![("pod".to_string(), "p-1".to_string())];
        let mut p = Vec::new();
        remote_write_payload(
            &mut p,
            2,
            &[1, 5],
            |o| {
                put_pairs(o, [("agent", "a")].into_iter());
                put_pairs(o, std::iter::empty());
                o.extend_from_slice(&1u32.to_le_bytes());
                put_target(o, "j", "h:1", &labels, &tags);
                put_series_targets(o, &[0, NO_TARGET]);
            },
            |o| o.extend_from_slice(b"SHIP"),
            b"BODY",
        );
        let r = RemoteWritePayload::parse(3, &p).unwrap();
        assert_eq!(
            (r.protocol, r.ship, r.body),
            (2, &b"SHIP"[..], &b"BODY"[..])
        );
        assert_eq!(r.rejected().collect::<Vec<_>>(), vec![1, 5]);
        let e = Enrichment::parse(r.enrichment).unwrap();
        assert_eq!(e.base_tags, vec![("agent", "a")]);
        assert!(e.header_tags.is_empty());
        let t = e.target_of(0).unwrap();
        assert_eq!((t.job, t.instance), ("j", "h:1"));
        assert_eq!(
            (t.labels.clone(), t.tags.clone()),
            (vec![("instance", "h:1")], vec![("pod", "p-1")])
        );
        assert!(e.target_of(1).is_none());
        assert_eq!(e.series(), 2);
        // An index beyond the targets is refused.
        let mut bad = r.enrichment.to_vec();
        let n = bad.len();
        bad[n - 4..n - 2].copy_from_slice(&5u16.to_le_bytes());
        assert!(Enrichment::parse(&bad).unwrap_err().contains("index 5"));
        assert!(RemoteWritePayload::parse(3, &p[..5]).is_err());
        // A ship length past the end is an error.
        let ship_len_at = p.len() - 4 - 4 - 4;
        let mut long = p.clone();
        long[ship_len_at..ship_len_at + 4].copy_from_slice(&9u32.to_le_bytes());
        assert!(RemoteWritePayload::parse(3, &long)
            .unwrap_err()
            .contains("ship section overruns"));
        // Format 2 (no ship section) is still read: the same payload without it.
        let mut v2 = p[..ship_len_at].to_vec();
        v2.extend_from_slice(b"BODY");
        let r2 = RemoteWritePayload::parse(2, &v2).unwrap();
        assert_eq!(
            (r2.enrichment, r2.ship, r2.body),
            (r.enrichment, &b""[..], &b"BODY"[..])
        );
        // Every truncation of the section is an error, never a panic.
        for cut in 0..r.enrichment.len() {
            assert!(Enrichment::parse(&r.enrichment[..cut]).is_err() || cut == 0);
        }
        // Format 1 (no enrichment) is still read.
        let mut v1 = vec![1, 0, 0, 0, 0, 0, 0, 0];
        v1.extend_from_slice(b"OLD");
        let r = RemoteWritePayload::parse(1, &v1).unwrap();
        assert_eq!((r.enrichment, r.body), (&b""[..], &b"OLD"[..]));
        assert!(RemoteWritePayload::parse(4, &v1).is_err());
    }
}
