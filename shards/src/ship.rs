//! The shipper: one task per shard that reads durable records from the shard's WAL,
//! sends them to the server as rkyv batches (`promgate_proto::ship`), and truncates the
//! WAL only up to what the server acknowledged as durable.
//!
//! - **Resume.** Every connection starts with HELLO; the server's WELCOME names the
//!   highest sequence number it has applied for this (agent, shard), and shipping resumes
//!   just after it. The WAL is deleted only up to the server's *durable* sequence number
//!   (its last checkpoint; acks carry it, and an idle shipper asks with SYNC), since a
//!   crash of the server rolls it back there. So a restart of either side, or a lost acknowledgement, resends only
//!   what the server does not have, and the server skips any batch it already applied.
//! - **Stop-and-wait with adaptive batches.** One batch is in flight; everything that
//!   became durable meanwhile goes into the next one (up to `batch_samples_max`), so
//!   batches grow with the load and the per-batch commit cost on the server is shared.
//! - **Series and target interning.** A series' app labels are sent once per connection
//!   with a `u32` reference, its target's labels and tags once per connection for all
//!   the target's series (`ship.split_target_labels`); samples carry only the series'
//!   reference. A series keeps the tags it was first shipped with on a connection.
//! - **No second decode in steady state.** A record whose ship section (written by the
//!   receive path, `crate::prepared`) was made with this process's keys and whose series
//!   are all known on the connection is added from the section's columns; only the rest
//!   is decoded from the record's body again.
//! - **Back-off.** A failed connect, an I/O error, a timeout or an error frame closes the
//!   connection and retries after a capped, jittered exponential delay. Meanwhile the
//!   receive path is untouched: the WAL absorbs the difference until its budget, then the
//!   receiver answers 503 with `Retry-After`.

use crate::metrics::ShardMetrics;
use crate::prepared::SeriesHasher;
use crate::series_refs::SeriesRefs;
use crate::wal::format::{Enrichment, RemoteWritePayload, ShipSection, KIND_REMOTE_WRITE};
use crate::wal::storage::Storage;
use crate::wal::Wal;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use hashbrown::HashMap;
use promgate_proto::batch::Count;
use promgate_proto::messages::{self, histogram as ph};
use promgate_proto::ship::{
    self, ArchivedAck, ArchivedShipError, ArchivedWelcome, ExemplarSample, HistogramSample, Label,
    MetadataEntry, NewSeries, NewTarget, ShipBatch,
};
use promgate_proto::{decode, Batch, Decoded, Limits, Protocol, RejectCounts};
use rkyv::util::AlignedVec;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct ShipConfig {
    /// `HOST:PORT` of the server's ship listener.
    pub server: String,
    /// Stable id of this agent (the server's exactly-once ledger is per agent and shard).
    pub agent_id: String,
    /// A batch is closed once it holds this many samples (plus histograms, exemplars).
    pub batch_samples_max: usize,
    /// A batch is also closed once it introduces this many series (their label sets are
    /// what makes a batch large in memory when many series are new).
    pub batch_new_series_max: usize,
    /// snappy-compress frame bodies.
    pub compress: bool,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long to wait for the server's answer to one frame before reconnecting.
    pub reply_timeout: Duration,
    /// Send target labels once per target rather than in every series' label set.
    pub split_target_labels: bool,
    /// The receive path writes ship sections (`crate::prepared`) into WAL records.
    pub columns_in_wal: bool,
}

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig {
            server: "127.0.0.1:30033".into(),
            agent_id: String::new(),
            batch_samples_max: 100_000,
            batch_new_series_max: 10_000,
            compress: true,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(60),
            split_target_labels: true,
            columns_in_wal: true,
        }
    }
}

/// How many series ahead the copy of a ship section prefetches its dictionary slot:
/// far enough for the load to arrive before it is needed, near enough that it is still
/// in the cache then.
const PREFETCH_AHEAD: usize = 8;

/// How often an idle shipper asks the server whether its applied records are durable.
const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Samples (plus histograms, exemplars) added to a batch between two chances for the
/// shard's other tasks to run.
const SLICE_ITEMS: usize = 20_000;

/// Decoding limits for replay: the record says which series were refused at receive
/// time, so replay refuses nothing itself and skips the per-series validation the
/// receive path already did (the record is CRC-checked).
const REPLAY_LIMITS: Limits = Limits {
    labels_per_series_max: u32::MAX,
    label_name_bytes_max: u32::MAX,
    label_value_bytes_max: u32::MAX,
    trusted: true,
};

/// Calls `visit` with the accepted part of one WAL record's request and its enrichment:
/// exactly what was acknowledged to the sender.
pub fn replay_payload(
    format: u8,
    payload: &[u8],
    visit: impl FnOnce(Decoded<'_>, &Enrichment<'_>),
) -> Result<(), String> {
    let mut batch = Batch::default();
    let mut raw = Vec::new();
    let p = RemoteWritePayload::parse(format, payload)?;
    let e = Enrichment::parse(p.enrichment)?;
    replay_payload_into(&p, &e, &mut batch, &mut raw)?;
    visit(
        Decoded {
            batch: &batch,
            body: &raw,
        },
        &e,
    );
    Ok(())
}

/// [`replay_payload`] of a parsed record into caller-owned buffers (reused across
/// records).
fn replay_payload_into(
    p: &RemoteWritePayload<'_>,
    enrichment: &Enrichment<'_>,
    batch: &mut Batch,
    raw: &mut Vec<u8>,
) -> Result<(), String> {
    let check_series = !p.enrichment.is_empty();
    let protocol = match p.protocol {
        1 => Protocol::V1,
        2 => Protocol::V2,
        other => return Err(format!("unknown protocol byte {other}")),
    };
    let n = snap::raw::decompress_len(p.body).map_err(|e| format!("snappy: {e}"))?;
    raw.clear();
    raw.resize(n, 0);
    snap::raw::Decoder::new()
        .decompress(p.body, raw)
        .map_err(|e| format!("snappy: {e}"))?;
    decode(
        protocol,
        raw,
        &REPLAY_LIMITS,
        batch,
        &mut RejectCounts::default(),
    )
    .map_err(|e| e.to_string())?;
    let rejected: Vec<u32> = p.rejected().collect();
    if !rejected.is_empty() {
        batch
            .series
            .retain(|s| rejected.binary_search(&s.index).is_err());
    }
    if check_series && enrichment.series() != batch.series.len() {
        return Err(format!(
            "the record's enrichment covers {} series, its request has {}",
            enrichment.series(),
            batch.series.len()
        ));
    }
    Ok(())
}

/// A native histogram of a decoded batch as a remote_write 1.0 message.
pub fn histogram_message(
    d: &Decoded<'_>,
    h: &promgate_proto::batch::Histogram,
) -> messages::Histogram {
    let b = d.batch;
    let spans = |r: promgate_proto::batch::Run| {
        b.spans[r.range()]
            .iter()
            .map(|s| messages::BucketSpan {
                offset: s.offset,
                length: s.length,
            })
            .collect()
    };
    messages::Histogram {
        count: h.count.map(|c| match c {
            Count::Int(n) => ph::Count::CountInt(n),
            Count::Float(f) => ph::Count::CountFloat(f),
        }),
        sum: h.sum,
        schema: h.schema,
        zero_threshold: h.zero_threshold,
        zero_count: h.zero_count.map(|c| match c {
            Count::Int(n) => ph::ZeroCount::ZeroCountInt(n),
            Count::Float(f) => ph::ZeroCount::ZeroCountFloat(f),
        }),
        negative_spans: spans(h.negative_spans),
        negative_deltas: b.deltas[h.negative_deltas.range()].to_vec(),
        negative_counts: b.floats[h.negative_counts.range()].to_vec(),
        positive_spans: spans(h.positive_spans),
        positive_deltas: b.deltas[h.positive_deltas.range()].to_vec(),
        positive_counts: b.floats[h.positive_counts.range()].to_vec(),
        reset_hint: h.reset_hint,
        timestamp: h.timestamp_ms,
        custom_values: b.floats[h.custom_values.range()].to_vec(),
    }
}

fn labels_of<'a>(it: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<Label> {
    it.map(|(n, v)| Label {
        name: n.to_string(),
        value: v.to_string(),
    })
    .collect()
}

fn put_key_bytes(key: &mut Vec<u8>, n: &[u8], v: &[u8]) {
    key.extend_from_slice(&(n.len() as u32).to_le_bytes());
    key.extend_from_slice(n);
    key.extend_from_slice(&(v.len() as u32).to_le_bytes());
    key.extend_from_slice(v);
}

fn put_key<'a>(key: &mut Vec<u8>, pairs: impl Iterator<Item = (&'a str, &'a str)>) {
    for (n, v) in pairs {
        put_key_bytes(key, n.as_bytes(), v.as_bytes());
    }
}

/// Builds batches for one connection: series and target references live as long as it
/// does.
pub struct BatchBuilder {
    /// (series fingerprint, target reference) → series reference. The fingerprint is a
    /// 128-bit keyed hash of the labels (`crate::prepared::SeriesHasher`), not the label
    /// bytes (24 bytes an entry): the dictionary costs ~32-64 bytes per series instead
    /// of ~350, so the agent's memory does not grow with the label sets of a million
    /// series.
    refs: SeriesRefs,
    hasher: SeriesHasher,
    targets: HashMap<Vec<u8>, u32>,
    pub batch: ShipBatch,
    decoded: Batch,
    raw: Vec<u8>,
    split: bool,
    /// Per record: its targets' connection references, resolved on first use.
    record_refs: Vec<Option<u32>>,
    /// Per record added from its ship section: its series' references.
    series_refs: Vec<u32>,
    /// Records of the current batch added from their ship section.
    pub copied_records: u64,
}

impl BatchBuilder {
    /// `hasher` must be the one the shard's receive path writes ship sections with.
    pub fn new(agent: &str, shard: u32, split_target_labels: bool, hasher: SeriesHasher) -> Self {
        let mut b = BatchBuilder {
            refs: SeriesRefs::default(),
            hasher,
            targets: HashMap::new(),
            batch: ShipBatch::default(),
            decoded: Batch::default(),
            raw: Vec::new(),
            split: split_target_labels,
            record_refs: Vec::new(),
            series_refs: Vec::new(),
            copied_records: 0,
        };
        b.batch.agent = agent.to_string();
        b.batch.shard = shard;
        b
    }

    /// Items (samples, histograms, exemplars) in the current batch.
    pub fn items(&self) -> usize {
        self.batch.sample_refs.len() + self.batch.histograms.len() + self.batch.exemplars.len()
    }

    /// Starts a new batch; the references sent in the previous one stay known. (A
    /// batch that is not acknowledged ends the connection, and with it the builder, so
    /// references are never left pointing at series the server did not get.)
    pub fn reset(&mut self) {
        self.batch.clear();
        self.batch.first_seq = 0;
        self.batch.last_seq = 0;
        self.copied_records = 0;
    }

    /// The connection's reference for a series with this label set and target. A series
    /// whose target (or tags) changed since it was sent is sent again under a new
    /// reference, so the server updates its tags.
    fn series_ref(
        &mut self,
        d: &Decoded<'_>,
        s: &promgate_proto::batch::Series,
        target_ref: u32,
        target_labels: &[(&str, &str)],
    ) -> u32 {
        let labels = s.labels;
        let fingerprint = self.hasher.series(d, s);
        if let Some(r) = self.refs.get(fingerprint, target_ref) {
            return r;
        }
        let r = self.refs.len() as u32;
        self.refs.insert(fingerprint, target_ref, r);
        let pairs: Vec<(&str, &str)> = d.labels(labels).collect();
        let (mut absent, mut app) = (Vec::new(), Vec::new());
        crate::enrich::split(&pairs, target_labels.iter().copied(), &mut absent, &mut app);
        self.batch.new_series.push(NewSeries {
            series_ref: r,
            target_ref,
            absent,
            labels: labels_of(app.iter().map(|&i| pairs[i as usize])),
        });
        r
    }

    /// The connection's reference for target `ix` of a record (`None`: no known
    /// target), with the record's header tags merged in.
    fn record_target_ref(&mut self, e: &Enrichment<'_>, ix: Option<usize>) -> u32 {
        let t = ix.map(|i| &e.targets[i]);
        let (labels, tags) = match t {
            Some(t) if self.split => (&t.labels[..], &t.tags[..]),
            Some(t) => (&[][..], &t.tags[..]),
            None => (&[][..], &e.base_tags[..]),
        };
        let mut merged: Vec<(&str, &str)> = tags.to_vec();
        for h in &e.header_tags {
            if !tags.iter().any(|(n, _)| *n == h.0) {
                merged.push(*h);
            }
        }
        merged.sort_unstable();
        self.target_ref(labels, &merged)
    }

    fn target_ref(&mut self, labels: &[(&str, &str)], tags: &[(&str, &str)]) -> u32 {
        let mut key = Vec::new();
        put_key(&mut key, labels.iter().copied());
        key.push(0xff); // never the first byte of a length below 2^24
        put_key(&mut key, tags.iter().copied());
        if let Some(r) = self.targets.get(&key) {
            return *r;
        }
        let r = self.targets.len() as u32;
        self.targets.insert(key, r);
        self.batch.new_targets.push(NewTarget {
            target_ref: r,
            labels: labels_of(labels.iter().copied()),
            tags: labels_of(tags.iter().copied()),
        });
        r
    }

    /// Adds one WAL record, from its ship section when that was written with this
    /// builder's keys and all its series are known on this connection, else by decoding
    /// the record's body. Returns an error (and adds nothing) if it cannot be read.
    pub fn add_record(
        &mut self,
        seq: u64,
        kind: u8,
        format: u8,
        payload: &[u8],
    ) -> Result<(), String> {
        if self.batch.first_seq == 0 {
            self.batch.first_seq = seq;
        }
        self.batch.last_seq = seq;
        if kind != KIND_REMOTE_WRITE {
            return Err(format!("unknown record kind {kind} format {format}"));
        }
        let record = RemoteWritePayload::parse(format, payload)?;
        let e = Enrichment::parse(record.enrichment)?;
        // A malformed section is only a lost shortcut: the body is the truth.
        let section = ShipSection::parse(record.ship).ok().flatten();
        if let Some(c) = section.filter(|c| c.key_id == self.hasher.id()) {
            if self.add_columns(&e, !record.enrichment.is_empty(), &c) {
                self.copied_records += 1;
                return Ok(());
            }
        }
        let mut decoded = std::mem::take(&mut self.decoded);
        let mut raw = std::mem::take(&mut self.raw);
        let result = replay_payload_into(&record, &e, &mut decoded, &mut raw).map(|()| {
            self.add_decoded(
                Decoded {
                    batch: &decoded,
                    body: &raw,
                },
                &e,
            )
        });
        self.decoded = decoded;
        self.raw = raw;
        result
    }

    /// The connection reference of the target of the record's `i`th series, through
    /// `record_refs` (cleared per record; its last slot is "no known target").
    fn series_target_ref(&mut self, e: &Enrichment<'_>, i: usize) -> (Option<usize>, u32) {
        let ix = e.target_index(i);
        let slot = ix.unwrap_or(e.targets.len());
        let r = match self.record_refs[slot] {
            Some(r) => r,
            None => {
                let r = self.record_target_ref(e, ix);
                self.record_refs[slot] = Some(r);
                r
            }
        };
        (ix, r)
    }

    fn start_record(&mut self, e: &Enrichment<'_>) {
        self.record_refs.clear();
        self.record_refs.resize(e.targets.len() + 1, None);
    }

    /// A record whose series are all known on this connection: its ship section's
    /// sample columns go into the batch as they are. `false` (and nothing added, bar
    /// targets new to the connection) when a series is new or the section does not
    /// match the record.
    fn add_columns(&mut self, e: &Enrichment<'_>, enriched: bool, p: &ShipSection<'_>) -> bool {
        if enriched && e.series() != p.series() {
            return false;
        }
        self.start_record(e);
        let mut series_refs = std::mem::take(&mut self.series_refs);
        series_refs.clear();
        let mut known = true;
        let n = p.series();
        for i in 0..PREFETCH_AHEAD.min(n) {
            self.prefetch_ref(e, p, i);
        }
        for i in 0..n {
            if i + PREFETCH_AHEAD < n {
                self.prefetch_ref(e, p, i + PREFETCH_AHEAD);
            }
            if p.samples(i).is_empty() {
                series_refs.push(u32::MAX);
                continue;
            }
            let (_, target_ref) = self.series_target_ref(e, i);
            match self.refs.get(p.fingerprint(i), target_ref) {
                Some(r) => series_refs.push(r),
                None => {
                    known = false;
                    break;
                }
            }
        }
        if known {
            let b = &mut self.batch;
            for (i, r) in series_refs.iter().enumerate() {
                let samples = p.samples(i);
                if *r != u32::MAX {
                    b.sample_refs.extend(std::iter::repeat_n(*r, samples.len()));
                    b.sample_ts.extend(p.timestamps(samples.clone()));
                    b.sample_values.extend(p.values(samples));
                }
            }
        }
        self.series_refs = series_refs;
        known
    }

    /// Starts loading the dictionary slot of the section's `i`th series, if it has
    /// samples (a series without them is not shipped, nor is its target). Resolving
    /// its target ahead of the copy adds no target the record would not add anyway:
    /// if the copy stops at a new series, the record is decoded and every series with
    /// samples resolves its target.
    #[inline]
    fn prefetch_ref(&mut self, e: &Enrichment<'_>, p: &ShipSection<'_>, i: usize) {
        if !p.samples(i).is_empty() {
            let (_, target_ref) = self.series_target_ref(e, i);
            self.refs.prefetch(p.fingerprint(i), target_ref);
        }
    }

    fn add_decoded(&mut self, d: Decoded<'_>, e: &Enrichment<'_>) {
        self.start_record(e);
        for (i, s) in d.batch.series.iter().enumerate() {
            let samples = d.samples(s);
            let histograms = d.histograms(s);
            let exemplars = d.exemplars(s);
            if samples.is_empty() && histograms.is_empty() && exemplars.is_empty() {
                continue;
            }
            let (ix, target_ref) = self.series_target_ref(e, i);
            let target_labels = match ix {
                Some(i) if self.split => &e.targets[i].labels[..],
                _ => &[][..],
            };
            let r = self.series_ref(&d, s, target_ref, target_labels);
            for x in samples {
                self.batch.sample_refs.push(r);
                self.batch.sample_ts.push(x.timestamp_ms);
                self.batch.sample_values.push(x.value.to_bits());
            }
            for h in histograms {
                use prost::Message;
                self.batch.histograms.push(HistogramSample {
                    series_ref: r,
                    ts: h.timestamp_ms,
                    proto: histogram_message(&d, h).encode_to_vec(),
                });
            }
            for e in exemplars {
                self.batch.exemplars.push(ExemplarSample {
                    series_ref: r,
                    ts: e.timestamp_ms,
                    value_bits: e.value.to_bits(),
                    labels: labels_of(d.labels(e.labels)),
                });
            }
        }
        for m in &d.batch.metadata {
            self.batch.metadata.push(MetadataEntry {
                family: d.text(m.family).to_string(),
                kind: m.kind,
                help: d.text(m.help).to_string(),
                unit: d.text(m.unit).to_string(),
            });
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum Ended {
    Io(std::io::Error),
    Refused(u16, String),
    Protocol(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Io(e) => write!(f, "{e}"),
            Ended::Refused(c, m) => write!(f, "server refused (code {c}): {m}"),
            Ended::Protocol(m) => write!(f, "{m}"),
        }
    }
}

impl From<std::io::Error> for Ended {
    fn from(e: std::io::Error) -> Self {
        Ended::Io(e)
    }
}

pub struct Shipper<S: Storage> {
    pub shard: u32,
    pub wal: Rc<Wal<S>>,
    pub config: ShipConfig,
    pub metrics: Arc<Vec<ShardMetrics>>,
    /// The fingerprint keys the shard's receive path writes ship sections with.
    pub hasher: SeriesHasher,
}

/// A small xorshift for back-off jitter (no need for a crate).
fn jitter(state: &mut u64, d: Duration) -> Duration {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    // 50%..150% of d.
    let f = 0.5 + (*state % 1000) as f64 / 1000.0;
    d.mul_f64(f)
}

impl<S: Storage + 'static> Shipper<S> {
    fn m(&self) -> &crate::metrics::ShipMetrics {
        &self.metrics[self.shard as usize].ship
    }

    /// Runs for the life of the shard.
    pub async fn run(self) {
        let mut backoff = self.config.backoff_min;
        let mut seed = (std::process::id() as u64) << 32 | u64::from(self.shard) | 1;
        let mut announced_down = false;
        loop {
            let addr = match resolve(&self.config.server) {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(shard = self.shard, server = %self.config.server, error = %e, "cannot resolve the server address");
                    glommio::timer::sleep(self.config.backoff_max).await;
                    continue;
                }
            };
            let stream =
                glommio::net::TcpStream::connect_timeout(addr, Duration::from_secs(5)).await;
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    self.m().connect_failures.fetch_add(1, Relaxed);
                    if !announced_down {
                        tracing::warn!(shard = self.shard, server = %addr, error = %e, "server unreachable; the WAL keeps everything until it is back");
                        announced_down = true;
                    }
                    glommio::timer::sleep(jitter(&mut seed, backoff)).await;
                    backoff = (backoff * 2).min(self.config.backoff_max);
                    continue;
                }
            };
            self.m().connects.fetch_add(1, Relaxed);
            self.m().connected.store(1, Relaxed);
            let result = self.session(stream, &mut backoff).await;
            self.m().connected.store(0, Relaxed);
            if let Err(e) = result {
                self.m().errors.fetch_add(1, Relaxed);
                tracing::warn!(shard = self.shard, server = %addr, error = %e, "shipping connection ended; reconnecting");
                announced_down = false;
                glommio::timer::sleep(jitter(&mut seed, backoff)).await;
                backoff = (backoff * 2).min(self.config.backoff_max);
            }
        }
    }

    async fn session(
        &self,
        mut s: glommio::net::TcpStream,
        backoff: &mut Duration,
    ) -> Result<(), Ended> {
        s.set_nodelay(true)
            .map_err(|e| Ended::Protocol(e.to_string()))?;
        s.set_read_timeout(Some(self.config.reply_timeout))
            .map_err(|e| Ended::Protocol(e.to_string()))?;
        s.set_write_timeout(Some(self.config.reply_timeout))
            .map_err(|e| Ended::Protocol(e.to_string()))?;
        let mut out = Vec::new();
        let mut body = AlignedVec::<16>::new();
        ship::write_message(
            ship::KIND_HELLO,
            &ship::Hello {
                agent: self.config.agent_id.clone(),
                shard: self.shard,
            },
            false,
            &mut out,
        );
        s.write_all(&out).await?;
        let kind = read_frame(&mut s, &mut body).await?;
        let (applied, durable) = match kind {
            ship::KIND_WELCOME => {
                let w = ship::access::<ArchivedWelcome>(&body)
                    .map_err(|e| Ended::Protocol(e.to_string()))?;
                (w.applied_seq.to_native(), w.durable_seq.to_native())
            }
            k => return Err(unexpected(k, &body)),
        };
        tracing::info!(
            shard = self.shard,
            applied_seq = applied,
            durable_seq = durable,
            "connected to the server"
        );
        // The WAL is deleted only up to what the server made durable; the rest stays
        // until its checkpoint (a crash of the server rolls back to the last one).
        let mut durable = durable.min(applied);
        self.m().applied_seq.store(applied, Relaxed);
        self.acked(durable);
        let mut next = applied + 1;
        let mut builder = BatchBuilder::new(
            &self.config.agent_id,
            self.shard,
            self.config.split_target_labels,
            self.hasher,
        );
        loop {
            // Wait for durable records at or after `next`. Meanwhile, if the server has
            // applied records it has not made durable yet, ask now and then how far it
            // got, so an idle agent's WAL is deleted too.
            while self.wal.durable_seq() < next {
                if durable + 1 >= next {
                    self.wal.wait_commit().await;
                    continue;
                }
                let committed = futures_lite::future::or(
                    async {
                        self.wal.wait_commit().await;
                        true
                    },
                    async {
                        glommio::timer::sleep(SYNC_INTERVAL).await;
                        false
                    },
                )
                .await;
                if !committed {
                    durable = self.sync(&mut s, &mut out, &mut body, next - 1).await?;
                }
            }
            builder.reset();
            let mut records = 0u64;
            let mut skipped = 0u64;
            let max = self.config.batch_samples_max;
            let new_series_max = self.config.batch_new_series_max;
            // The batch is built in slices of SLICE_ITEMS, yielding to the shard's
            // receive tasks between them: a batch of a million samples is about a
            // second of CPU, which must not stall the requests waiting on this core.
            // Records behind the WAL's memory tail are read from their segment file a
            // window at a time on the blocking thread (`prefetch`), never on this one.
            let mut from = next;
            loop {
                self.wal.prefetch(from).await?;
                let slice_end = builder.items() + SLICE_ITEMS;
                let (mut full, mut sliced) = (false, false);
                // A Cell: read between the two replays, while `visit` holds the rest.
                let last = std::cell::Cell::new(None);
                let mut visit = |seq, kind, format, payload: &[u8]| {
                    let added = builder.add_record(seq, kind, format, payload);
                    if let Err(e) = added {
                        skipped += 1;
                        tracing::error!(shard = self.shard, seq, error = %e, "a WAL record cannot be read back; it is skipped");
                    }
                    records += 1;
                    last.set(Some(seq));
                    full =
                        builder.items() >= max || builder.batch.new_series.len() >= new_series_max;
                    sliced = builder.items() >= slice_end;
                    !full && !sliced
                };
                let mut not_read = self.wal.replay_ready(from, &mut visit)?;
                if not_read && last.get().is_none() {
                    // The prefetched window did not hold the record (it was read while
                    // the record was being written): read it here, this once.
                    self.wal.replay(from, &mut visit)?;
                    not_read = false;
                }
                match last.get() {
                    Some(seq) if (sliced || not_read) && !full => from = seq + 1,
                    _ => break,
                }
                glommio::yield_if_needed().await;
            }
            if records == 0 {
                // Everything up to `durable` was lost to a failed write: nothing to send.
                next = self.wal.durable_seq() + 1;
                continue;
            }
            self.m().skipped_records.fetch_add(skipped, Relaxed);
            out.clear();
            ship::write_message(
                ship::KIND_BATCH,
                &builder.batch,
                self.config.compress,
                &mut out,
            );
            let sent = s.write_all(&out).await;
            let reply = match sent {
                Ok(()) => read_frame(&mut s, &mut body).await,
                Err(e) => Err(Ended::Io(e)),
            };
            let kind = reply?;
            if kind != ship::KIND_ACK {
                return Err(unexpected(kind, &body));
            }
            let ack =
                ship::access::<ArchivedAck>(&body).map_err(|e| Ended::Protocol(e.to_string()))?;
            let (seq, durable_seq) = (ack.seq.to_native(), ack.durable_seq.to_native());
            if seq != builder.batch.last_seq {
                return Err(Ended::Protocol(format!(
                    "server acknowledged {seq}, expected {}",
                    builder.batch.last_seq
                )));
            }
            let m = self.m();
            m.batches.fetch_add(1, Relaxed);
            m.records.fetch_add(records, Relaxed);
            m.copied_records.fetch_add(builder.copied_records, Relaxed);
            m.samples
                .fetch_add(builder.batch.sample_refs.len() as u64, Relaxed);
            m.histograms
                .fetch_add(builder.batch.histograms.len() as u64, Relaxed);
            m.exemplars
                .fetch_add(builder.batch.exemplars.len() as u64, Relaxed);
            m.series_sent
                .fetch_add(builder.batch.new_series.len() as u64, Relaxed);
            m.bytes.fetch_add(out.len() as u64, Relaxed);
            durable = durable_seq.min(seq);
            self.m().applied_seq.store(seq, Relaxed);
            self.acked(durable);
            next = seq + 1;
            *backoff = self.config.backoff_min;
        }
    }

    /// Asks the server how far the records it applied (up to `applied`) are durable,
    /// and deletes the WAL up to there. Returns the durable sequence number.
    async fn sync(
        &self,
        s: &mut glommio::net::TcpStream,
        out: &mut Vec<u8>,
        body: &mut AlignedVec<16>,
        applied: u64,
    ) -> Result<u64, Ended> {
        out.clear();
        ship::write_message(ship::KIND_SYNC, &ship::Sync { seq: applied }, false, out);
        s.write_all(out).await?;
        let kind = read_frame(s, body).await?;
        if kind != ship::KIND_ACK {
            return Err(unexpected(kind, body));
        }
        let ack = ship::access::<ArchivedAck>(body).map_err(|e| Ended::Protocol(e.to_string()))?;
        if ack.seq.to_native() != applied {
            return Err(Ended::Protocol(format!(
                "server answered a sync at {applied} with {}",
                ack.seq
            )));
        }
        let durable = ack.durable_seq.to_native().min(applied);
        self.acked(durable);
        Ok(durable)
    }

    /// Starts this shipper as a task on the current shard's executor.
    pub fn spawn(self) {
        glommio::spawn_local(self.run()).detach();
    }

    fn acked(&self, seq: u64) {
        if seq == 0 {
            return;
        }
        self.m().acked_seq.store(seq, Relaxed);
        // Its own task: deleting waits for the disk, and the shipper need not.
        let (wal, shard) = (self.wal.clone(), self.shard);
        glommio::spawn_local(async move {
            if let Err(e) = wal.ack(seq).await {
                tracing::warn!(shard, error = %e, "could not delete acknowledged WAL segments; will retry at the next acknowledgement");
            }
        })
        .detach();
    }
}

fn unexpected(kind: u8, body: &[u8]) -> Ended {
    if kind == ship::KIND_ERROR {
        match ship::access::<ArchivedShipError>(body) {
            Ok(e) => Ended::Refused(e.code.to_native(), e.message.to_string()),
            Err(e) => Ended::Protocol(format!("unreadable error frame: {e}")),
        }
    } else {
        Ended::Protocol(format!("unexpected frame kind {kind} from the server"))
    }
}

async fn read_frame(
    s: &mut glommio::net::TcpStream,
    body: &mut AlignedVec<16>,
) -> Result<u8, Ended> {
    let mut header = [0u8; ship::HEADER_BYTES];
    s.read_exact(&mut header).await?;
    let h = ship::parse_header(&header).map_err(|e| Ended::Protocol(e.to_string()))?;
    let mut wire = vec![0u8; h.len];
    s.read_exact(&mut wire).await?;
    ship::open_body(&h, &wire, body).map_err(|e| Ended::Protocol(e.to_string()))?;
    Ok(h.kind)
}

fn resolve(server: &str) -> std::io::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    server.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{server} resolves to no address"),
        )
    })
}
