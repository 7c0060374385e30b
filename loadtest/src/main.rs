//! `promgate-loadtest`: CLI, setup (URL, first connection, ack log), one sender thread per
//! connection, progress on stderr, and the final report (text, plus one JSON line).

mod http;
mod worker;

use anyhow::{bail, Context};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use promgate_loadtest::workload::{connection_share, GenParams, Protocol, MIN_LABELS, TS_RANGE_MS};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use worker::{Shared, Stats, WorkerConfig};

const PROGRESS_POLL_MS: u64 = 100;
const ACK_LOG_FLUSH_INTERVAL_MS: u64 = 1_000;
const PLAIN_PROGRESS_INTERVAL_MS: u64 = 5_000;
const PERCENTILES: [(&str, &str, f64); 4] = [
    ("p50", "p50_ms", 0.50),
    ("p90", "p90_ms", 0.90),
    ("p99", "p99_ms", 0.99),
    ("p99.9", "p999_ms", 0.999),
];

/// Load generator for Prometheus remote_write receivers.
#[derive(Parser, Debug)]
#[command(name = "promgate-loadtest", version)]
struct Cli {
    /// Receiver URL, http://host:port/path
    #[arg(long)]
    url: String,
    /// Keep-alive connections, one sender thread each, each owning a disjoint share of series
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Run time in seconds
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Total samples/s across connections; 0 = flat out (closed loop)
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Distinct series
    #[arg(long, default_value_t = 10_000)]
    series: u64,
    /// Labels per series, including __name__ (at least 5)
    #[arg(long, default_value_t = 10)]
    labels: usize,
    /// Samples per series per request
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// remote_write protocol: 1 (prometheus.WriteRequest) or 2 (io.prometheus.write.v2.Request)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    protocol: u8,
    /// Samples per request (series per request = this / --samples)
    #[arg(long, default_value_t = 2000)]
    samples_per_request: usize,
    /// Stop after this many requests in total (retries not counted); 0 = unlimited
    #[arg(long, default_value_t = 0)]
    max_requests: u64,
    /// Append one line per 2xx-answered request: <connection> <round> <first_series> <n_series> <first_timestamp_ms>
    #[arg(long)]
    ack_log: Option<PathBuf>,
    /// Also print the report as one JSON object on stdout
    #[arg(long)]
    json: bool,
    /// Generator seed (label values)
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Timestamp of round 0 in ms since the epoch; default now
    #[arg(long)]
    start_ms: Option<i64>,
    /// Socket read/write timeout in ms (a timeout counts as a connection error)
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("promgate-loadtest: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.labels < MIN_LABELS {
        bail!("--labels must be at least {MIN_LABELS}");
    }
    if cli.series == 0 || cli.samples == 0 || cli.connections == 0 || cli.samples_per_request == 0 {
        bail!("--series, --samples, --connections and --samples-per-request must be positive");
    }
    if !(cli.duration.is_finite() && cli.duration > 0.0) {
        bail!("--duration must be a positive number of seconds");
    }
    let target = Arc::new(http::parse_url(&cli.url)?);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_millis() as i64;
    let start_ms = cli.start_ms.unwrap_or(now_ms);
    // Leave 2^32 ms (~50 days) of headroom for rounds to advance the timestamps.
    if !TS_RANGE_MS.contains(&start_ms) || !TS_RANGE_MS.contains(&(start_ms + (1 << 32))) {
        bail!("--start-ms must be within {TS_RANGE_MS:?} (minus headroom) so timestamps encode to 6-byte varints");
    }
    let protocol = if cli.protocol == 1 {
        Protocol::V1
    } else {
        Protocol::V2
    };
    let params = GenParams {
        seed: cli.seed,
        labels_per_series: cli.labels,
        samples_per_series: cli.samples,
    };
    let connections = cli
        .connections
        .min(usize::try_from(cli.series).unwrap_or(usize::MAX));
    let series_per_request = (cli.samples_per_request / cli.samples).max(1);
    let io_timeout = Duration::from_millis(cli.timeout_ms.max(1));

    let first = http::Conn::connect(&target.addr, io_timeout)
        .with_context(|| format!("cannot connect to {} ({})", target.addr, cli.url))?;
    let mut conns = vec![Some(first)];
    conns.extend((1..connections).map(|_| http::Conn::connect(&target.addr, io_timeout).ok()));

    let mut shared = Shared::default();
    if let Some(path) = &cli.ack_log {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open ack log {}", path.display()))?;
        let mut w = BufWriter::new(file);
        let extra = format!(
            "start_ms={start_ms} protocol={} series={} connections={connections} url={}",
            cli.protocol, cli.series, cli.url
        );
        writeln!(w, "{}", params.header_line(&extra)).context("cannot write ack log")?;
        shared.ack_log = Some(Mutex::new(w));
    }
    let shared = Arc::new(shared);
    let ready = Arc::new(Barrier::new(connections + 1));
    let duration = Duration::from_secs_f64(cli.duration);
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(conn_id, conn)| {
            let cfg = WorkerConfig {
                conn_id,
                connections,
                target: target.clone(),
                protocol,
                params,
                share: connection_share(cli.series, connections, conn_id),
                series_per_request,
                start_ms,
                rate_samples_per_s: cli.rate as f64 / connections as f64,
                duration,
                max_requests: cli.max_requests,
                io_timeout,
            };
            let (shared, ready) = (shared.clone(), ready.clone());
            std::thread::Builder::new()
                .name(format!("conn-{conn_id}"))
                .spawn(move || worker::run(cfg, conn, shared, ready))
                .context("cannot spawn sender thread")
        })
        .collect::<anyhow::Result<_>>()?;
    eprintln!(
        "promgate-loadtest: {} protocol {}, {connections} connections, {} series x {} labels, {} samples/request, rate {}, {} s",
        cli.url,
        cli.protocol,
        cli.series,
        cli.labels,
        series_per_request * cli.samples,
        if cli.rate == 0 { "flat out".to_string() } else { format!("{} samples/s", cli.rate) },
        cli.duration
    );
    ready.wait();
    let t0 = Instant::now();
    watch_progress(&handles, &shared, t0, duration);
    let mut total = Stats::new();
    for h in handles {
        total.merge(
            &h.join()
                .map_err(|_| anyhow::anyhow!("a sender thread panicked"))?,
        );
    }
    // The senders' own clocks: exact even for short bounded runs (the poll adds slack).
    let elapsed_s = total.active.as_secs_f64();
    flush_ack_log(&shared);
    if shared.ack_log_failed.load(Relaxed) {
        eprintln!("promgate-loadtest: warning: writing the ack log failed; it is incomplete");
    }
    let report = Report {
        stats: total,
        elapsed_s,
        cpu_s: own_cpu_seconds(),
    };
    print!("{}", report.text(&cli.url, cli.protocol, connections));
    if cli.json {
        println!("{}", report.json());
    }
    Ok(())
}

fn flush_ack_log(shared: &Shared) {
    if let Some(log) = &shared.ack_log {
        let mut w = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if w.flush().is_err() {
            shared.ack_log_failed.store(true, Relaxed);
        }
    }
}

/// Shows progress until every sender thread has finished; flushes the ack log each second.
fn watch_progress(
    handles: &[std::thread::JoinHandle<Stats>],
    shared: &Shared,
    t0: Instant,
    duration: Duration,
) {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(duration.as_millis().max(1) as u64);
        if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:25}] {wide_msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    let (mut last_flush, mut last_line) = (t0, t0);
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(PROGRESS_POLL_MS));
        let elapsed = t0.elapsed();
        let rate = shared.samples_acked.load(Relaxed) as f64 / elapsed.as_secs_f64().max(1e-9);
        let (requests, non_2xx) = (shared.requests.load(Relaxed), shared.non_2xx.load(Relaxed));
        if let Some(bar) = &bar {
            bar.set_position(elapsed.as_millis() as u64);
            bar.set_message(format!(
                "{rate:.0} samples/s, {requests} req, {non_2xx} non-2xx"
            ));
        } else if last_line.elapsed() >= Duration::from_millis(PLAIN_PROGRESS_INTERVAL_MS) {
            last_line = Instant::now();
            eprintln!(
                "progress: {:.1} s, {rate:.0} samples/s acked, {requests} requests, {non_2xx} non-2xx",
                elapsed.as_secs_f64()
            );
        }
        if last_flush.elapsed() >= Duration::from_millis(ACK_LOG_FLUSH_INTERVAL_MS) {
            last_flush = Instant::now();
            flush_ack_log(shared);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// User + system CPU seconds used by this process (getrusage RUSAGE_SELF).
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the zero-initialised struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

struct Report {
    stats: Stats,
    elapsed_s: f64,
    cpu_s: f64,
}

impl Report {
    fn per_s(&self, n: u64) -> f64 {
        n as f64 / self.elapsed_s.max(1e-9)
    }
    fn bytes_per_sample(&self) -> f64 {
        self.stats.body_bytes_sent as f64 / self.stats.samples_sent.max(1) as f64
    }
    /// Latency at quantile `q` in ms (0 when nothing was answered).
    fn latency_ms(&self, q: f64) -> f64 {
        self.stats.latency_us.value_at_quantile(q) as f64 / 1e3
    }
    fn max_ms(&self) -> f64 {
        self.stats.latency_us.max() as f64 / 1e3
    }

    fn text(&self, url: &str, protocol: u8, connections: usize) -> String {
        let s = &self.stats;
        let mut out = String::new();
        let status: Vec<String> = s.status.iter().map(|(c, n)| format!("{c}: {n}")).collect();
        let pcts: String = PERCENTILES
            .iter()
            .map(|(name, _, q)| format!("{name} {:.3}  ", self.latency_ms(*q)))
            .collect();
        let _ = writeln!(
            out,
            "promgate-loadtest report: {url} (protocol {protocol}, {connections} connections)"
        );
        let _ = writeln!(out, "  duration          {:.2} s", self.elapsed_s);
        let _ = writeln!(
            out,
            "  requests          {} ({:.1}/s), retries {}, connection errors {}",
            s.requests,
            self.per_s(s.requests),
            s.retries,
            s.conn_errors
        );
        let _ = writeln!(
            out,
            "  samples sent      {} ({:.0}/s)",
            s.samples_sent,
            self.per_s(s.samples_sent)
        );
        let _ = writeln!(
            out,
            "  samples acked     {} ({:.0}/s, 2xx only)",
            s.samples_acked,
            self.per_s(s.samples_acked)
        );
        let _ = writeln!(
            out,
            "  wire bytes sent   {} ({:.2} MB/s), {:.2} compressed body bytes/sample",
            s.wire_bytes_sent,
            self.per_s(s.wire_bytes_sent) / 1e6,
            self.bytes_per_sample()
        );
        let _ = writeln!(
            out,
            "  latency ms        {pcts}max {:.3}  ({} answers)",
            self.max_ms(),
            s.latency_us.len()
        );
        let _ = writeln!(
            out,
            "  status            {}",
            if status.is_empty() {
                "none".to_string()
            } else {
                status.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "  harness cpu       {:.2} s ({:.0}% of one core)",
            self.cpu_s,
            100.0 * self.cpu_s / self.elapsed_s.max(1e-9)
        );
        out
    }

    fn json(&self) -> String {
        let s = &self.stats;
        let status: Vec<String> = s
            .status
            .iter()
            .map(|(c, n)| format!("\"{c}\":{n}"))
            .collect();
        let pcts: String = PERCENTILES
            .iter()
            .map(|(_, key, q)| format!("\"{key}\":{:.3},", self.latency_ms(*q)))
            .collect();
        format!(
            "{{\"duration_s\":{:.3},\"requests\":{},\"samples_sent\":{},\"samples_acked\":{},\"samples_per_s\":{:.1},\
             \"requests_per_s\":{:.1},\"bytes_per_s\":{:.1},\"bytes_per_sample\":{:.3},{pcts}\"max_ms\":{:.3},\
             \"status\":{{{}}},\"retries\":{},\"conn_errors\":{},\"cpu_s\":{:.3}}}",
            self.elapsed_s,
            s.requests,
            s.samples_sent,
            s.samples_acked,
            self.per_s(s.samples_acked),
            self.per_s(s.requests),
            self.per_s(s.wire_bytes_sent),
            self.bytes_per_sample(),
            self.max_ms(),
            status.join(","),
            s.retries,
            s.conn_errors,
            self.cpu_s
        )
    }
}
