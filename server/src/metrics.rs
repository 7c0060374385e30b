//! The server's own `/metrics` (Prometheus text format).

use crate::store::Store;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct ServerMetrics {
    pub ship_connections: AtomicU64,
    pub ship_frames: AtomicU64,
    pub ship_bytes: AtomicU64,
    /// Error frames sent, by code (index = code, 0 unused).
    pub ship_errors: [AtomicU64; 8],
    pub read_requests_samples: AtomicU64,
    pub read_requests_chunks: AtomicU64,
    pub read_requests_failed: AtomicU64,
    pub read_series: AtomicU64,
    pub read_samples: AtomicU64,
    pub read_micros: AtomicU64,
    pub http_requests: AtomicU64,
}

fn line(out: &mut String, name: &str, help: &str, kind: &str, v: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
    );
}

pub fn render(m: &ServerMetrics, store: &Store) -> String {
    let mut out = String::new();
    let s = &store.metrics;
    line(
        &mut out,
        "promgate_server_ship_connections",
        "Agent connections open.",
        "gauge",
        m.ship_connections.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_ship_frames_total",
        "Frames received from agents.",
        "counter",
        m.ship_frames.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_ship_bytes_total",
        "Bytes received from agents (frames as on the wire).",
        "counter",
        m.ship_bytes.load(Relaxed),
    );
    out.push_str("# HELP promgate_server_ship_errors_total Error frames sent to agents, by code.\n# TYPE promgate_server_ship_errors_total counter\n");
    for (c, v) in m.ship_errors.iter().enumerate().skip(1) {
        let _ = writeln!(
            out,
            "promgate_server_ship_errors_total{{code=\"{c}\"}} {}",
            v.load(Relaxed)
        );
    }
    line(
        &mut out,
        "promgate_server_batches_applied_total",
        "Ship batches stored.",
        "counter",
        s.batches_applied.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_batches_replayed_total",
        "Ship batches skipped because they were already applied (replays).",
        "counter",
        s.batches_replayed.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_series_created_total",
        "Series added to the index.",
        "counter",
        s.series_created.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_samples_appended_total",
        "Float samples stored.",
        "counter",
        s.samples_appended.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_samples_duplicate_total",
        "Samples not stored because the same timestamp and value were already stored (resends).",
        "counter",
        s.samples_duplicate.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_samples_out_of_order_total",
        "Samples stored although their series already had a newer one (put in time order into an older chunk).",
        "counter",
        s.samples_out_of_order.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_samples_conflicting_total",
        "Samples not stored because their series already had another value at that timestamp (the first is kept).",
        "counter",
        s.samples_conflicting.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_chunks_sealed_total",
        "XOR chunks sealed.",
        "counter",
        s.chunks_sealed.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_histograms_stored_total",
        "Native histogram samples stored.",
        "counter",
        s.histograms_stored.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_histograms_duplicate_total",
        "Native histogram samples already stored (resends).",
        "counter",
        s.histograms_duplicate.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_exemplars_stored_total",
        "Exemplars stored.",
        "counter",
        s.exemplars_stored.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_metadata_stored_total",
        "Metadata entries stored.",
        "counter",
        s.metadata_stored.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_commit_errors_total",
        "Store commits that failed (a batch was not acknowledged, or a checkpoint did not happen).",
        "counter",
        s.commit_errors.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_commit_seconds_total",
        "Time spent applying and committing batches (without fsync; see checkpoints).",
        "counter",
        s.commit_micros.load(Relaxed) as f64 / 1e6,
    );
    line(
        &mut out,
        "promgate_server_checkpoints_total",
        "Durable commits of the open chunks changed since the previous one (each makes every batch applied before it durable).",
        "counter",
        s.checkpoints.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_checkpoint_seconds_total",
        "Time spent in checkpoints.",
        "counter",
        s.checkpoint_micros.load(Relaxed) as f64 / 1e6,
    );
    line(
        &mut out,
        "promgate_server_retention_partitions_deleted_total",
        "Time partitions deleted by retention.",
        "counter",
        s.retention_partitions_deleted.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_head_series",
        "Series with an open chunk.",
        "gauge",
        store.head_series() as u64,
    );
    line(
        &mut out,
        "promgate_server_read_requests_samples_total",
        "remote_read requests answered as SAMPLES.",
        "counter",
        m.read_requests_samples.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_read_requests_chunks_total",
        "remote_read requests answered as STREAMED_XOR_CHUNKS.",
        "counter",
        m.read_requests_chunks.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_read_requests_failed_total",
        "remote_read requests refused (4xx/5xx).",
        "counter",
        m.read_requests_failed.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_read_series_total",
        "Series returned by remote_read.",
        "counter",
        m.read_series.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_read_samples_total",
        "Samples returned by remote_read (in samples or chunks).",
        "counter",
        m.read_samples.load(Relaxed),
    );
    line(
        &mut out,
        "promgate_server_http_requests_total",
        "HTTP requests on the query listener.",
        "counter",
        m.http_requests.load(Relaxed),
    );
    out
}
