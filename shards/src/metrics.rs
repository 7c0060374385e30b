//! Per-shard telemetry and its Prometheus text exposition.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer (relaxed atomics, updated
//! once per request, never per sample); `/metrics` on any shard reads all of them. This
//! is the one piece of memory shards share, and it is write-by-owner only.

use promgate_proto::Reject;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Status codes the receive path can answer, in exposition order.
pub const STATUSES: [u16; 13] = [
    200, 204, 400, 404, 405, 408, 411, 413, 415, 429, 431, 500, 503,
];

/// Request-level refusals, labelled `reason` on `promgate_agent_receive_rejected_total`.
pub const REQUEST_REJECTS: [&str; 11] = [
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
];

/// Upper bounds of the decode-time histogram buckets, in seconds.
pub const DECODE_BUCKETS_S: [f64; 12] = [
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

#[derive(Default)]
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
    pub decode_buckets: [AtomicU64; DECODE_BUCKETS_S.len()],
    pub decode_count: AtomicU64,
    pub decode_ns_sum: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_rejected: AtomicU64,
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
        let s = ns as f64 / 1e9;
        if let Some(i) = DECODE_BUCKETS_S.iter().position(|b| s <= *b) {
            self.decode_buckets[i].fetch_add(1, Relaxed);
        }
        self.decode_count.fetch_add(1, Relaxed);
        self.decode_ns_sum.fetch_add(ns, Relaxed);
    }
}

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

/// Renders every shard's metrics, plus process CPU and memory, in text format 0.0.4.
pub fn render(shards: &[ShardMetrics], out: &mut String) {
    family(
        out,
        "promgate_agent_receive_requests_total",
        "counter",
        "remote_write and other HTTP requests answered, by status code.",
    );
    for (i, m) in shards.iter().enumerate() {
        for (j, code) in STATUSES.iter().enumerate() {
            let v = m.requests[j].load(Relaxed);
            if v > 0 {
                let _ = writeln!(
                    out,
                    "promgate_agent_receive_requests_total{{shard=\"{i}\",code=\"{code}\"}} {v}"
                );
            }
        }
    }
    family(
        out,
        "promgate_agent_receive_rejected_total",
        "counter",
        "Requests refused as a whole, by reason.",
    );
    for (i, m) in shards.iter().enumerate() {
        for (j, reason) in REQUEST_REJECTS.iter().enumerate() {
            let _ = writeln!(
                out,
                "promgate_agent_receive_rejected_total{{shard=\"{i}\",reason=\"{reason}\"}} {}",
                m.request_rejects[j].load(Relaxed)
            );
        }
    }
    per_shard(
        out,
        "promgate_agent_receive_bytes_total",
        "counter",
        "Compressed remote_write body bytes received.",
        shards,
        |m| &m.receive_bytes,
    );
    per_shard(
        out,
        "promgate_agent_decode_bytes_total",
        "counter",
        "Decompressed remote_write body bytes decoded.",
        shards,
        |m| &m.decode_bytes,
    );
    per_shard(
        out,
        "promgate_agent_decode_series_total",
        "counter",
        "Valid series decoded and accepted.",
        shards,
        |m| &m.series,
    );
    per_shard(
        out,
        "promgate_agent_decode_samples_total",
        "counter",
        "Float samples decoded and accepted.",
        shards,
        |m| &m.samples,
    );
    per_shard(
        out,
        "promgate_agent_decode_histograms_total",
        "counter",
        "Native histogram samples decoded and accepted.",
        shards,
        |m| &m.histograms,
    );
    per_shard(
        out,
        "promgate_agent_decode_exemplars_total",
        "counter",
        "Exemplars decoded and accepted.",
        shards,
        |m| &m.exemplars,
    );
    per_shard(
        out,
        "promgate_agent_decode_metadata_total",
        "counter",
        "Metric metadata entries decoded and accepted.",
        shards,
        |m| &m.metadata,
    );
    family(
        out,
        "promgate_agent_decode_series_rejected_total",
        "counter",
        "Series refused by validation, by reason.",
    );
    for (i, m) in shards.iter().enumerate() {
        for (j, reason) in Reject::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "promgate_agent_decode_series_rejected_total{{shard=\"{i}\",reason=\"{}\"}} {}",
                reason.as_str(),
                m.series_rejects[j].load(Relaxed)
            );
        }
    }
    family(
        out,
        "promgate_agent_decode_seconds",
        "histogram",
        "Time to decompress, decode and validate one request body.",
    );
    for (i, m) in shards.iter().enumerate() {
        let mut cumulative = 0;
        for (j, le) in DECODE_BUCKETS_S.iter().enumerate() {
            cumulative += m.decode_buckets[j].load(Relaxed);
            let _ = writeln!(
                out,
                "promgate_agent_decode_seconds_bucket{{shard=\"{i}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let count = m.decode_count.load(Relaxed);
        let _ = writeln!(
            out,
            "promgate_agent_decode_seconds_bucket{{shard=\"{i}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "promgate_agent_decode_seconds_sum{{shard=\"{i}\"}} {}",
            m.decode_ns_sum.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "promgate_agent_decode_seconds_count{{shard=\"{i}\"}} {count}"
        );
    }
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
    process(out);
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
