//! One connection's sender loop: builds the bodies for its disjoint share of series once,
//! then per round patches and sends them one at a time (closed loop, or paced by `--rate`
//! with latency measured from the intended send time), retries 429/503 and connection
//! errors with the same body, writes ack-log lines, and keeps per-connection statistics.

use crate::http::{request_head, Conn, Target};
use hdrhistogram::Histogram;
use promgate_loadtest::workload::{body_chunks, AckRecord, BodyTemplate, GenParams, Protocol};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

/// Wait before retrying a 429/503 without `Retry-After`, or after a connection error;
/// doubles per consecutive failure up to [`RETRY_WAIT_CAP_MS`].
const INITIAL_BACKOFF_MS: u64 = 10;
/// Longest the harness waits before a retry, whatever `Retry-After` says.
const RETRY_WAIT_CAP_MS: u64 = 1_000;
/// Latency histogram range: 1 µs .. 1 h, 3 significant digits.
const LATENCY_MAX_US: u64 = 3_600_000_000;
const LATENCY_SIGFIG: u8 = 3;

/// Counters shared with the progress display, plus the ack log.
#[derive(Default)]
pub struct Shared {
    pub requests: AtomicU64,
    pub samples_acked: AtomicU64,
    pub non_2xx: AtomicU64,
    /// Bodies started so far (retries excluded), for `--max-requests`.
    pub bodies_claimed: AtomicU64,
    pub ack_log: Option<Mutex<BufWriter<File>>>,
    pub ack_log_failed: AtomicBool,
}

impl Shared {
    fn ack(&self, rec: &AckRecord) {
        if let Some(log) = &self.ack_log {
            let mut w = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if writeln!(w, "{rec}").is_err() {
                self.ack_log_failed.store(true, Relaxed);
            }
        }
    }
}

/// Everything one connection needs.
pub struct WorkerConfig {
    pub conn_id: usize,
    /// Number of connections, to spread their paced sends evenly over each interval.
    pub connections: usize,
    pub target: Arc<Target>,
    pub protocol: Protocol,
    pub params: GenParams,
    pub share: Range<u64>,
    pub series_per_request: usize,
    pub start_ms: i64,
    /// Samples/s for this connection; 0 = closed loop (flat out).
    pub rate_samples_per_s: f64,
    pub duration: Duration,
    /// Total bodies across all connections; 0 = unlimited.
    pub max_requests: u64,
    pub io_timeout: Duration,
}

/// Per-connection results, merged by the caller.
pub struct Stats {
    pub latency_us: Histogram<u64>,
    pub status: BTreeMap<u16, u64>,
    pub requests: u64,
    pub retries: u64,
    pub conn_errors: u64,
    pub samples_sent: u64,
    pub samples_acked: u64,
    pub wire_bytes_sent: u64,
    pub body_bytes_sent: u64,
    /// Time from the common start to this connection's last answer (max when merged).
    pub active: Duration,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            latency_us: Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIG)
                .expect("static histogram bounds"),
            status: BTreeMap::new(),
            requests: 0,
            retries: 0,
            conn_errors: 0,
            samples_sent: 0,
            samples_acked: 0,
            wire_bytes_sent: 0,
            body_bytes_sent: 0,
            active: Duration::ZERO,
        }
    }

    pub fn merge(&mut self, o: &Stats) {
        self.latency_us
            .add(&o.latency_us)
            .expect("same histogram bounds");
        for (code, n) in &o.status {
            *self.status.entry(*code).or_default() += n;
        }
        self.requests += o.requests;
        self.retries += o.retries;
        self.conn_errors += o.conn_errors;
        self.samples_sent += o.samples_sent;
        self.samples_acked += o.samples_acked;
        self.wire_bytes_sent += o.wire_bytes_sent;
        self.body_bytes_sent += o.body_bytes_sent;
        self.active = self.active.max(o.active);
    }
}

/// A body ready to send: HTTP head followed by the patchable snappy body.
struct Prepared {
    template: BodyTemplate,
    request: Vec<u8>,
    head_len: usize,
}

enum Outcome {
    Answered,
    DeadlineReached,
}

/// Builds the bodies, waits on `ready` (so all connections start together), then sends
/// until the duration or the request budget is used up.
pub fn run(
    cfg: WorkerConfig,
    mut conn: Option<Conn>,
    shared: Arc<Shared>,
    ready: Arc<Barrier>,
) -> Stats {
    let mut bodies: Vec<Prepared> = body_chunks(cfg.share.clone(), cfg.series_per_request)
        .into_iter()
        .map(|(first, n)| {
            let mut template =
                BodyTemplate::build(&cfg.params, cfg.protocol, first, n, cfg.start_ms);
            let mut request = request_head(&cfg.target, cfg.protocol, template.compressed.len());
            let head_len = request.len();
            request.append(&mut template.compressed);
            Prepared {
                template,
                request,
                head_len,
            }
        })
        .collect();
    let mut stats = Stats::new();
    ready.wait();
    let t0 = Instant::now();
    let deadline = t0 + cfg.duration;
    // With --rate, connection i starts i/N of one request interval late, so the N
    // connections' sends interleave instead of arriving together as a burst.
    let phase = if cfg.rate_samples_per_s > 0.0 {
        let interval_s = (cfg.series_per_request * cfg.params.samples_per_series) as f64
            / cfg.rate_samples_per_s;
        Duration::from_secs_f64(interval_s * cfg.conn_id as f64 / cfg.connections.max(1) as f64)
    } else {
        Duration::ZERO
    };
    let t0 = t0 + phase;
    let mut scheduled_samples = 0u64;
    let (mut round, mut budget_used_up) = (0u64, false);
    'run: while !bodies.is_empty() {
        for body in &mut bodies {
            if Instant::now() >= deadline {
                break 'run;
            }
            if cfg.max_requests > 0
                && shared.bodies_claimed.fetch_add(1, Relaxed) >= cfg.max_requests
            {
                budget_used_up = true;
                break 'run;
            }
            body.template
                .patch(&mut body.request[body.head_len..], cfg.start_ms, round);
            let intended = if cfg.rate_samples_per_s > 0.0 {
                let at =
                    t0 + Duration::from_secs_f64(scheduled_samples as f64 / cfg.rate_samples_per_s);
                if at >= deadline {
                    break 'run;
                }
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                at
            } else {
                Instant::now()
            };
            scheduled_samples += body.template.n_samples() as u64;
            let outcome = send(
                &cfg, &mut conn, body, round, intended, deadline, &shared, &mut stats,
            );
            if let Outcome::DeadlineReached = outcome {
                break 'run;
            }
        }
        round += 1;
    }
    // Stopped by the clock (possibly early, to skip a retry wait past the deadline): the
    // run lasted the configured duration. Stopped by --max-requests: it lasted until now.
    stats.active = if budget_used_up {
        t0.elapsed()
    } else {
        t0.elapsed().max(cfg.duration)
    };
    stats
}

/// Sends one body until it gets a final answer (anything but 429/503) or time runs out.
#[allow(clippy::too_many_arguments)]
fn send(
    cfg: &WorkerConfig,
    conn: &mut Option<Conn>,
    body: &Prepared,
    round: u64,
    intended: Instant,
    deadline: Instant,
    shared: &Shared,
    stats: &mut Stats,
) -> Outcome {
    let n_samples = body.template.n_samples() as u64;
    let mut backoff_ms = INITIAL_BACKOFF_MS;
    loop {
        let result = match conn {
            Some(c) => c.round_trip(&body.request),
            None => Conn::connect(&cfg.target.addr, cfg.io_timeout)
                .and_then(|c| conn.insert(c).round_trip(&body.request)),
        };
        let wait_ms = match result {
            Err(_) => {
                stats.conn_errors += 1;
                *conn = None;
                backoff_ms
            }
            Ok(answer) => {
                stats.requests += 1;
                stats.samples_sent += n_samples;
                stats.wire_bytes_sent += body.request.len() as u64;
                stats.body_bytes_sent += (body.request.len() - body.head_len) as u64;
                *stats.status.entry(answer.status).or_default() += 1;
                shared.requests.fetch_add(1, Relaxed);
                if answer.close {
                    *conn = None;
                }
                let ok = (200..300).contains(&answer.status);
                if !ok {
                    shared.non_2xx.fetch_add(1, Relaxed);
                }
                if answer.status != 429 && answer.status != 503 {
                    stats
                        .latency_us
                        .saturating_record(intended.elapsed().as_micros() as u64);
                    if ok {
                        stats.samples_acked += n_samples;
                        shared.samples_acked.fetch_add(n_samples, Relaxed);
                        shared.ack(&body.template.ack_record(cfg.conn_id, round, cfg.start_ms));
                    }
                    return Outcome::Answered;
                }
                stats.retries += 1;
                answer.retry_after_ms.unwrap_or(backoff_ms)
            }
        };
        let wait = Duration::from_millis(wait_ms.min(RETRY_WAIT_CAP_MS));
        if Instant::now() + wait >= deadline {
            return Outcome::DeadlineReached;
        }
        std::thread::sleep(wait);
        backoff_ms = (backoff_ms * 2).min(RETRY_WAIT_CAP_MS);
    }
}
