//! Per-shard telemetry and its Prometheus text exposition.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer (relaxed atomics, updated
//! once per request or commit, never per sample); `/metrics` on any shard reads all of
//! them. This is the one piece of memory shards share, and it is write-by-owner only.

use promgate_proto::Reject;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Status codes the receive path can answer, in exposition order.
pub const STATUSES: [u16; 13] = [
    200, 204, 400, 404, 405, 408, 411, 413, 415, 429, 431, 500, 503,
];

/// Request-level refusals, labelled `reason` on `promgate_agent_receive_rejected_total`.
pub const REQUEST_REJECTS: [&str; 13] = [
    "content_type",
    "content_encoding",
    "body_too_large",
    "decoded_too_large",
    "snappy",
    "protobuf",
    "http",
    "header_too_large",
    "timeout",
    "sink_unavailable",
    "partial",
    "bad_header",
    "body_budget",
];

/// Upper bounds of the time histograms' buckets (decode, fsync), in seconds.
pub const SECONDS_BUCKETS: [f64; 14] = [
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    1.0,
];
/// Upper bounds of the group-commit size histogram, in records per fsync.
pub const RECORDS_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// A fixed-bucket histogram written by one shard.
pub struct Histogram<const N: usize> {
    bounds: &'static [f64; N],
    buckets: [AtomicU64; N],
    count: AtomicU64,
    /// Sum in millionths of the unit, to keep it an integer.
    sum_micro: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    pub const fn new(bounds: &'static [f64; N]) -> Self {
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; N],
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micro.fetch_add((v * 1e6) as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, shard: usize) {
        let mut cumulative = 0;
        for (b, le) in self.buckets.iter().zip(self.bounds.iter()) {
            cumulative += b.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{shard}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{shard=\"{shard}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "{name}_sum{{shard=\"{shard}\"}} {}",
            self.sum_micro.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{shard=\"{shard}\"}} {count}");
    }
}

/// The write-ahead log's telemetry, one per shard.
pub struct WalMetrics {
    pub bytes: AtomicU64,
    pub segments: AtomicU64,
    pub appended_records: AtomicU64,
    pub appended_bytes: AtomicU64,
    pub fsync_seconds: Histogram<{ SECONDS_BUCKETS.len() }>,
    pub commit_records: Histogram<{ RECORDS_BUCKETS.len() }>,
    pub backpressure: AtomicU64,
    pub write_errors: AtomicU64,
    pub recovered_records: AtomicU64,
    pub recovered_segments: AtomicU64,
    pub corrupt_records: AtomicU64,
    pub torn_tail_bytes: AtomicU64,
    pub truncated_segments: AtomicU64,
    pub retention_dropped_records: AtomicU64,
}

impl Default for WalMetrics {
    fn default() -> Self {
        WalMetrics {
            bytes: AtomicU64::new(0),
            segments: AtomicU64::new(0),
            appended_records: AtomicU64::new(0),
            appended_bytes: AtomicU64::new(0),
            fsync_seconds: Histogram::new(&SECONDS_BUCKETS),
            commit_records: Histogram::new(&RECORDS_BUCKETS),
            backpressure: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            recovered_records: AtomicU64::new(0),
            recovered_segments: AtomicU64::new(0),
            corrupt_records: AtomicU64::new(0),
            torn_tail_bytes: AtomicU64::new(0),
            truncated_segments: AtomicU64::new(0),
            retention_dropped_records: AtomicU64::new(0),
        }
    }
}

/// The shard's shipper (WAL → server).
#[derive(Default)]
pub struct ShipMetrics {
    pub connected: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub errors: AtomicU64,
    pub batches: AtomicU64,
    pub records: AtomicU64,
    pub samples: AtomicU64,
    pub histograms: AtomicU64,
    pub exemplars: AtomicU64,
    pub series_sent: AtomicU64,
    pub bytes: AtomicU64,
    pub acked_seq: AtomicU64,
    pub applied_seq: AtomicU64,
    pub skipped_records: AtomicU64,
    pub copied_records: AtomicU64,
}

pub struct ShardMetrics {
    pub requests: [AtomicU64; STATUSES.len()],
    pub request_rejects: [AtomicU64; REQUEST_REJECTS.len()],
    pub series_rejects: [AtomicU64; Reject::ALL.len()],
    pub receive_bytes: AtomicU64,
    pub decode_bytes: AtomicU64,
    pub series: AtomicU64,
    pub samples: AtomicU64,
    pub histograms: AtomicU64,
    pub exemplars: AtomicU64,
    pub metadata: AtomicU64,
    pub decode_seconds: Histogram<{ SECONDS_BUCKETS.len() }>,
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_rejected: AtomicU64,
    /// Bytes of request bodies held beyond each connection's kept buffer.
    pub body_bytes_held: AtomicU64,
    pub wal: WalMetrics,
    pub ship: ShipMetrics,
    pub enrich: crate::enrich::EnrichMetrics,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            requests: Default::default(),
            request_rejects: Default::default(),
            series_rejects: Default::default(),
            receive_bytes: AtomicU64::new(0),
            decode_bytes: AtomicU64::new(0),
            series: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            histograms: AtomicU64::new(0),
            exemplars: AtomicU64::new(0),
            metadata: AtomicU64::new(0),
            decode_seconds: Histogram::new(&SECONDS_BUCKETS),
            connections_open: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections_rejected: AtomicU64::new(0),
            body_bytes_held: AtomicU64::new(0),
            wal: WalMetrics::default(),
            ship: ShipMetrics::default(),
            enrich: Default::default(),
        }
    }
}

impl ShardMetrics {
    pub fn status(&self, code: u16) {
        if let Some(i) = STATUSES.iter().position(|c| *c == code) {
            self.requests[i].fetch_add(1, Relaxed);
        }
    }

    pub fn request_reject(&self, reason: &str) {
        if let Some(i) = REQUEST_REJECTS.iter().position(|r| *r == reason) {
            self.request_rejects[i].fetch_add(1, Relaxed);
        }
    }

    pub fn decode_time(&self, ns: u64) {
        self.decode_seconds.observe(ns as f64 / 1e9);
    }
}

/// Reads one counter of a shard's metrics.
type Getter = fn(&ShardMetrics) -> &AtomicU64;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn per_shard(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    shards: &[ShardMetrics],
    get: impl Fn(&ShardMetrics) -> &AtomicU64,
) {
    family(out, name, kind, help);
    for (i, m) in shards.iter().enumerate() {
        let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(m).load(Relaxed));
    }
}

/// [`per_shard`] for each (name, help, getter) of a table, all of one `kind`.
fn per_shard_all(
    out: &mut String,
    kind: &str,
    table: &[(&str, &str, Getter)],
    shards: &[ShardMetrics],
) {
    for (name, help, get) in table {
        per_shard(out, name, kind, help, shards, get);
    }
}

fn histogram<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    shards: &[ShardMetrics],
    get: impl Fn(&ShardMetrics) -> &Histogram<N>,
) {
    family(out, name, "histogram", help);
    for (i, m) in shards.iter().enumerate() {
        get(m).render(out, name, i);
    }
}

/// Renders every shard's metrics, plus process CPU and memory, in text format 0.0.4.
pub fn render(shards: &[ShardMetrics], out: &mut String) {
    let name = "promgate_agent_receive_requests_total";
    family(
        out,
        name,
        "counter",
        "remote_write and other HTTP requests answered, by status code.",
    );
    for (i, m) in shards.iter().enumerate() {
        for (j, code) in STATUSES.iter().enumerate() {
            let v = m.requests[j].load(Relaxed);
            if v > 0 {
                let _ = writeln!(out, "{name}{{shard=\"{i}\",code=\"{code}\"}} {v}");
            }
        }
    }
    let name = "promgate_agent_receive_rejected_total";
    family(
        out,
        name,
        "counter",
        "Requests refused as a whole, by reason.",
    );
    for (i, m) in shards.iter().enumerate() {
        for (j, reason) in REQUEST_REJECTS.iter().enumerate() {
            let v = m.request_rejects[j].load(Relaxed);
            let _ = writeln!(out, "{name}{{shard=\"{i}\",reason=\"{reason}\"}} {v}");
        }
    }
    let counters: [(&str, &str, Getter); 7] = [
        (
            "promgate_agent_receive_bytes_total",
            "Compressed remote_write body bytes received.",
            |m| &m.receive_bytes,
        ),
        (
            "promgate_agent_decode_bytes_total",
            "Decompressed remote_write body bytes decoded.",
            |m| &m.decode_bytes,
        ),
        (
            "promgate_agent_decode_series_total",
            "Valid series decoded and accepted.",
            |m| &m.series,
        ),
        (
            "promgate_agent_decode_samples_total",
            "Float samples decoded and accepted.",
            |m| &m.samples,
        ),
        (
            "promgate_agent_decode_histograms_total",
            "Native histogram samples decoded and accepted.",
            |m| &m.histograms,
        ),
        (
            "promgate_agent_decode_exemplars_total",
            "Exemplars decoded and accepted.",
            |m| &m.exemplars,
        ),
        (
            "promgate_agent_decode_metadata_total",
            "Metric metadata entries decoded and accepted.",
            |m| &m.metadata,
        ),
    ];
    per_shard_all(out, "counter", &counters, shards);
    let name = "promgate_agent_decode_series_rejected_total";
    family(
        out,
        name,
        "counter",
        "Series refused by validation, by reason.",
    );
    for (i, m) in shards.iter().enumerate() {
        for (j, reason) in Reject::ALL.iter().enumerate() {
            let v = m.series_rejects[j].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}{{shard=\"{i}\",reason=\"{}\"}} {v}",
                reason.as_str()
            );
        }
    }
    histogram(
        out,
        "promgate_agent_decode_seconds",
        "Time to decompress, decode and validate one request body.",
        shards,
        |m| &m.decode_seconds,
    );
    per_shard(
        out,
        "promgate_agent_receive_connections",
        "gauge",
        "Open client connections.",
        shards,
        |m| &m.connections_open,
    );
    per_shard(
        out,
        "promgate_agent_receive_connections_total",
        "counter",
        "Client connections accepted.",
        shards,
        |m| &m.connections_total,
    );
    per_shard(
        out,
        "promgate_agent_receive_connections_rejected_total",
        "counter",
        "Connections refused at the per-shard limit.",
        shards,
        |m| &m.connections_rejected,
    );
    per_shard(
        out,
        "promgate_agent_receive_body_bytes_held",
        "gauge",
        "Bytes the shard's connections hold for request bodies beyond each one's kept buffer (bounded by receive.bodies_bytes_max).",
        shards,
        |m| &m.body_bytes_held,
    );
    render_wal(shards, out);
    render_ship(shards, out);
    let counters: [(&str, &str, Getter); 3] = [
        (
            "promgate_agent_enrich_hits_total",
            "Series (one per series per request) whose target was found in the snapshot.",
            |m| &m.enrich.hits,
        ),
        (
            "promgate_agent_enrich_misses_total",
            "Series (one per series per request) with no known target: agent and custom tags only.",
            |m| &m.enrich.misses,
        ),
        (
            "promgate_agent_enrich_clashes_total",
            "Tags not given to a series because it has a label of that name (the original wins).",
            |m| &m.enrich.clashes,
        ),
    ];
    per_shard_all(out, "counter", &counters, shards);
    render_snapshot(out);
    process(out);
}

fn render_wal(shards: &[ShardMetrics], out: &mut String) {
    let gauges: [(&str, &str, Getter); 2] = [
        (
            "promgate_agent_wal_bytes",
            "Bytes of WAL segments on disk (and being written).",
            |m| &m.wal.bytes,
        ),
        ("promgate_agent_wal_segments", "WAL segment files.", |m| {
            &m.wal.segments
        }),
    ];
    per_shard_all(out, "gauge", &gauges, shards);
    let counters: [(&str, &str, Getter); 10] = [
        (
            "promgate_agent_wal_appended_records_total",
            "Records (requests) made durable.",
            |m| &m.wal.appended_records,
        ),
        (
            "promgate_agent_wal_appended_bytes_total",
            "Record bytes made durable.",
            |m| &m.wal.appended_bytes,
        ),
        (
            "promgate_agent_wal_backpressure_total",
            "Requests answered 503 because the WAL budget was reached.",
            |m| &m.wal.backpressure,
        ),
        (
            "promgate_agent_wal_write_errors_total",
            "WAL writes or fsyncs that failed (their requests got 503).",
            |m| &m.wal.write_errors,
        ),
        (
            "promgate_agent_wal_recovered_records_total",
            "Records found intact at start-up.",
            |m| &m.wal.recovered_records,
        ),
        (
            "promgate_agent_wal_recovered_segments_total",
            "Segments read at start-up.",
            |m| &m.wal.recovered_segments,
        ),
        (
            "promgate_agent_wal_corrupt_records_total",
            "Records lost to corruption found at start-up (reported, never hidden).",
            |m| &m.wal.corrupt_records,
        ),
        (
            "promgate_agent_wal_torn_tail_bytes_total",
            "Bytes cut off segments at start-up after their last record (the newest one, or one with nothing missing after it): a torn write, the zeros after direct writes, or a reused segment file's old records.",
            |m| &m.wal.torn_tail_bytes,
        ),
        (
            "promgate_agent_wal_truncated_segments_total",
            "Segments deleted after being acknowledged downstream.",
            |m| &m.wal.truncated_segments,
        ),
        (
            "promgate_agent_wal_retention_dropped_records_total",
            "Records deleted by wal.retention_* before being shipped.",
            |m| &m.wal.retention_dropped_records,
        ),
    ];
    per_shard_all(out, "counter", &counters, shards);
    histogram(
        out,
        "promgate_agent_wal_fsync_seconds",
        "Time of one WAL commit: writing its records out and the fdatasync after.",
        shards,
        |m| &m.wal.fsync_seconds,
    );
    histogram(
        out,
        "promgate_agent_wal_commit_records",
        "Records made durable by one group commit.",
        shards,
        |m| &m.wal.commit_records,
    );
}

fn render_ship(shards: &[ShardMetrics], out: &mut String) {
    let gauges: [(&str, &str, Getter); 3] = [
        (
            "promgate_agent_ship_connected",
            "1 while the shard's shipper holds a connection to the server (an idle shipper notices a lost server at its next batch).",
            |m| &m.ship.connected,
        ),
        (
            "promgate_agent_ship_acked_seq",
            "Highest WAL sequence number the server has made durable; the WAL is deleted up to it.",
            |m| &m.ship.acked_seq,
        ),
        (
            "promgate_agent_ship_applied_seq",
            "Highest WAL sequence number the server has applied (queries see it; durable at its next checkpoint).",
            |m| &m.ship.applied_seq,
        ),
    ];
    per_shard_all(out, "gauge", &gauges, shards);
    let counters: [(&str, &str, Getter); 12] = [
        ("promgate_agent_ship_connects_total", "Connections made to the server.", |m| &m.ship.connects),
        ("promgate_agent_ship_connect_failures_total", "Failed connection attempts (retried with back-off).", |m| &m.ship.connect_failures),
        ("promgate_agent_ship_errors_total", "Connections ended by an error (error frame, I/O, timeout); the batch is resent.", |m| &m.ship.errors),
        ("promgate_agent_ship_batches_total", "Batches acknowledged by the server.", |m| &m.ship.batches),
        ("promgate_agent_ship_records_total", "WAL records acknowledged by the server.", |m| &m.ship.records),
        ("promgate_agent_ship_samples_total", "Samples acknowledged by the server.", |m| &m.ship.samples),
        ("promgate_agent_ship_histograms_total", "Native histogram samples acknowledged by the server.", |m| &m.ship.histograms),
        ("promgate_agent_ship_exemplars_total", "Exemplars acknowledged by the server.", |m| &m.ship.exemplars),
        ("promgate_agent_ship_series_sent_total", "Label sets sent (once per series per connection).", |m| &m.ship.series_sent),
        ("promgate_agent_ship_bytes_total", "Frame bytes sent to the server.", |m| &m.ship.bytes),
        ("promgate_agent_ship_skipped_records_total", "WAL records that could not be read back (corrupt or unknown format) and were not shipped.", |m| &m.ship.skipped_records),
        ("promgate_agent_ship_copied_records_total", "Records acknowledged by the server that were shipped from the receive path's ship-ready copy instead of being decoded from the WAL again.", |m| &m.ship.copied_records),
    ];
    per_shard_all(out, "counter", &counters, shards);
}

/// The target snapshot poller's metrics, when it runs (one per process).
static SNAPSHOT: std::sync::OnceLock<(
    std::sync::Arc<crate::snapshot::SnapshotMetrics>,
    Vec<String>,
)> = std::sync::OnceLock::new();

/// Makes `/metrics` include the snapshot poller's metrics.
pub fn set_snapshot_metrics(
    m: std::sync::Arc<crate::snapshot::SnapshotMetrics>,
    addresses: Vec<String>,
) {
    let _ = SNAPSHOT.set((m, addresses));
}

fn render_snapshot(out: &mut String) {
    let Some((m, addresses)) = SNAPSHOT.get() else {
        return;
    };
    let gauges: [(&str, &str, &AtomicU64); 4] = [
        (
            "promgate_agent_snapshot_version",
            "Version of the published target snapshot.",
            &m.version,
        ),
        (
            "promgate_agent_snapshot_targets",
            "Targets in the published snapshot.",
            &m.targets,
        ),
        (
            "promgate_agent_snapshot_last_success_timestamp_ms",
            "When every address last answered (Unix ms).",
            &m.last_success_ms,
        ),
        (
            "promgate_agent_snapshot_stale",
            "1 while an address failed its last sync (its last good targets are kept).",
            &m.stale,
        ),
    ];
    for (name, help, v) in gauges {
        family(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {}", v.load(Relaxed));
    }
    let last = m.last_success_ms.load(Relaxed);
    if last > 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let name = "promgate_agent_snapshot_age_seconds";
        family(out, name, "gauge", "Seconds since every address last answered (how old the snapshot's oldest part may be).");
        let _ = writeln!(out, "{name} {:.3}", now.saturating_sub(last) as f64 / 1e3);
    }
    let name = "promgate_agent_snapshot_sync_errors_total";
    family(out, name, "counter", "Failed syncs, per polled Prometheus.");
    for (a, c) in addresses.iter().zip(&m.sync_errors) {
        let _ = writeln!(out, "{name}{{address=\"{a}\"}} {}", c.load(Relaxed));
    }
}

/// Process CPU seconds and resident memory, so a load test can read the agent's cost.
fn process(out: &mut String) {
    // SAFETY: getrusage writes into the zeroed struct we pass and has no other effects.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    family(
        out,
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent.",
    );
    let _ = writeln!(
        out,
        "process_cpu_seconds_total {}",
        secs(usage.ru_utime) + secs(usage.ru_stime)
    );
    let page = 4096u64;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    family(
        out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size.",
    );
    let _ = writeln!(out, "process_resident_memory_bytes {}", rss * page);
    family(
        out,
        "process_max_resident_memory_bytes",
        "gauge",
        "Peak resident memory size.",
    );
    let _ = writeln!(
        out,
        "process_max_resident_memory_bytes {}",
        usage.ru_maxrss as u64 * 1024
    );
}
