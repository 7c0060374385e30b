//! Deterministic workload generator: Kubernetes-like series label sets, remote_write 1.0 /
//! 2.0 body templates with patchable timestamps and values, per-round patching, and the
//! ack-log format with its replay (exactly which samples a receiver acknowledged).
//!
//! Everything is a pure function of `(seed, series index, labels per series, samples per
//! series, round)`: series `i` has labels [`series_labels`]`(seed, i, labels)`; in round
//! `r` its sample `s` has timestamp `start_ms + r * samples + s` (see
//! [`sample_timestamp_ms`]) and value [`sample_value`]`(i, r, samples, s)`.

use crate::patchable;
use anyhow::{bail, Context};
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// `__name__`, `instance`, `job` plus the two labels that make a series unique.
pub const MIN_LABELS: usize = 5;
/// Timestamps are varints of exactly this many bytes, so patching never changes sizes.
pub const TS_VARINT_BYTES: usize = 6;
/// Values are protobuf `double` (fixed64).
pub const VALUE_BYTES: usize = 8;
/// Timestamps in `[2^35, 2^42)` ms (years 1971..2109) encode to exactly 6 varint bytes.
pub const TS_RANGE_MS: Range<i64> = (1 << 35)..(1 << 42);
/// Encoded `Sample` message: tag + double, tag + 6-byte varint.
const SAMPLE_MSG_LEN_BYTES: usize = 1 + VALUE_BYTES + 1 + TS_VARINT_BYTES;
const SPLITMIX_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
const FAMILIES: u64 = 4;
const CONTAINERS_PER_NODE: u64 = 110;
const CPUS_PER_NODE: u64 = 16;
const POD_NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
const NAMESPACES: [&str; 8] = [
    "payments",
    "checkout",
    "search",
    "ingest",
    "identity",
    "catalog",
    "monitoring",
    "default",
];
const APPS: [&str; 8] = [
    "api-gateway",
    "order-service",
    "cart",
    "user-profile",
    "recommendation-engine",
    "inventory-sync",
    "billing-worker",
    "frontend",
];
const TEAMS: [&str; 4] = ["platform", "commerce", "discovery", "sre"];
const CPU_MODES: [&str; 8] = [
    "idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user",
];
const POD_PHASES: [&str; 5] = ["Failed", "Pending", "Running", "Succeeded", "Unknown"];
/// (route, method, status code) of the application histogram family.
const ROUTES: [(&str, &str, &str); 8] = [
    ("/api/v1/users", "GET", "200"),
    ("/api/v1/users/{id}", "PUT", "204"),
    ("/api/v1/orders", "POST", "201"),
    ("/api/v1/orders/{id}/items", "GET", "200"),
    ("/api/v2/search", "GET", "200"),
    ("/login", "POST", "302"),
    ("/healthz", "GET", "200"),
    ("/static/{path}", "GET", "404"),
];
const LE_BUCKETS: [&str; 12] = [
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf",
];
/// remote_write 2.0 metadata type per family: COUNTER, COUNTER, GAUGE, HISTOGRAM.
const FAMILY_METRIC_TYPE: [u8; 4] = [1, 1, 2, 3];

/// Prometheus's staleness marker: a NaN with this exact bit pattern.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;
/// Every this-many-th series gets a staleness marker every [`STALE_ROUND_EVERY`] rounds.
const STALE_SERIES_EVERY: u64 = 5;
const STALE_ROUND_EVERY: u64 = 16;

/// A label as (name, value).
pub type Label = (String, String);

/// splitmix64: a tiny, fast, deterministic PRNG (no `rand` dependency).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(SPLITMIX_GAMMA);
        mix64(self.0)
    }
    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The splitmix64 finalizer; a bijection on `u64`, so distinct inputs give distinct ids.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seeded bijection of `k`: unique per `k` for a fixed `(seed, salt)`.
fn ident(seed: u64, salt: u64, k: u64) -> u64 {
    mix64(k ^ mix64(seed ^ salt.wrapping_mul(SPLITMIX_GAMMA)))
}

fn pick<T: Copy>(items: &[T], x: u64) -> T {
    items[(x % items.len() as u64) as usize]
}

/// `<10 chars>-<5 chars>` in the Kubernetes name alphabet; encodes all 64 bits of `id`.
fn pod_suffix(mut id: u64) -> String {
    let mut s = String::with_capacity(16);
    for i in 0..15 {
        if i == 10 {
            s.push('-');
        }
        s.push(POD_NAME_ALPHABET[(id % 27) as usize] as char);
        id /= 27;
    }
    s
}

fn uuid(a: u64) -> String {
    let b = mix64(a);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

fn ip(prefix: &str, n: u64) -> String {
    format!("{prefix}.{}.{}", (n >> 8) & 255, n & 255)
}

fn node_ip(node: u64) -> String {
    ip(&format!("10.{}", (node >> 16) & 255), node)
}

/// The label set of global series `series`: `n_labels` labels (at least [`MIN_LABELS`]),
/// sorted by name, names unique, always with `__name__`, `instance` and `job`. Families
/// rotate with `series % 4`: cadvisor, node-exporter, kube-state-metrics, app histogram.
/// Label sets are unique across series for any `n_labels >= MIN_LABELS`.
pub fn series_labels(seed: u64, series: u64, n_labels: usize) -> Vec<Label> {
    assert!(n_labels >= MIN_LABELS, "need at least {MIN_LABELS} labels");
    let (family, k) = (series % FAMILIES, series / FAMILIES);
    let s = |v: &str| v.to_string();
    // Priority order: the first MIN_LABELS identify the series; the rest are padding.
    let (mut labels, node, pod_id): (Vec<(&str, String)>, u64, u64) = match family {
        0 => {
            let (node, pod) = (k / CONTAINERS_PER_NODE, k / 2);
            let pod_id = ident(seed, 1, pod);
            let (ns, app) = (pick(&NAMESPACES, pod_id), pick(&APPS, pod_id >> 8));
            let pod_name = format!("{app}-{}", pod_suffix(pod_id));
            let uid = uuid(pod_id);
            let sidecar = k % 2 == 1;
            let container = if sidecar { "istio-proxy" } else { app };
            let image = if sidecar {
                s("docker.io/istio/proxyv2:1.20.3")
            } else {
                format!(
                    "registry.example.com/{ns}/{app}:v1.{}.{}",
                    (pod_id >> 16) % 20,
                    (pod_id >> 24) % 10
                )
            };
            let cid = ident(seed, 2, k);
            let id = format!(
                "/kubepods/burstable/pod{uid}/{cid:016x}{:016x}{:016x}{:016x}",
                mix64(cid),
                mix64(cid ^ 1),
                mix64(cid ^ 2)
            );
            let name = format!("k8s_{container}_{pod_name}_{ns}_{uid}_0");
            let labels = vec![
                ("__name__", s("container_cpu_usage_seconds_total")),
                ("instance", format!("{}:10250", node_ip(node))),
                ("job", s("kubelet")),
                ("id", id),
                ("container", s(container)),
                ("cpu", s("total")),
                ("image", image),
                ("name", name),
                ("namespace", s(ns)),
                ("pod", pod_name),
                ("metrics_path", s("/metrics/cadvisor")),
            ];
            (labels, node, pod_id)
        }
        1 => {
            let per_node = CPUS_PER_NODE * CPU_MODES.len() as u64;
            let (node, j) = (k / per_node, k % per_node);
            let pod_id = ident(seed, 3, node);
            let labels = vec![
                ("__name__", s("node_cpu_seconds_total")),
                ("instance", format!("{}:9100", node_ip(node))),
                ("job", s("node-exporter")),
                ("cpu", (j / CPU_MODES.len() as u64).to_string()),
                ("mode", s(pick(&CPU_MODES, j))),
                ("namespace", s("monitoring")),
                (
                    "pod",
                    format!("node-exporter-{}", &pod_suffix(pod_id)[11..]),
                ),
                ("service", s("node-exporter")),
            ];
            (labels, node, pod_id)
        }
        2 => {
            let pod_id = ident(seed, 4, k / POD_PHASES.len() as u64);
            let (ns, app) = (pick(&NAMESPACES, pod_id), pick(&APPS, pod_id >> 8));
            let labels = vec![
                ("__name__", s("kube_pod_status_phase")),
                ("instance", s("100.64.0.10:8080")),
                ("job", s("kube-state-metrics")),
                ("pod", format!("{app}-{}", pod_suffix(pod_id))),
                ("phase", s(pick(&POD_PHASES, k))),
                ("namespace", s(ns)),
                ("uid", uuid(pod_id)),
                ("service", s("kube-state-metrics")),
            ];
            (labels, pod_id % 500, pod_id)
        }
        _ => {
            let per_pod = (ROUTES.len() * LE_BUCKETS.len()) as u64;
            let (pod, j) = (k / per_pod, k % per_pod);
            let pod_id = ident(seed, 5, pod);
            let (ns, app) = (pick(&NAMESPACES, pod_id), pick(&APPS, pod_id >> 8));
            let (route, method, code) = ROUTES[(j / LE_BUCKETS.len() as u64) as usize];
            let labels = vec![
                ("__name__", s("http_request_duration_seconds_bucket")),
                (
                    "instance",
                    format!(
                        "{}:8080",
                        ip(&format!("100.{}", 64 + ((pod >> 16) & 63)), pod)
                    ),
                ),
                ("job", format!("{ns}/{app}")),
                ("route", s(route)),
                ("le", s(pick(&LE_BUCKETS, j))),
                ("method", s(method)),
                ("status_code", s(code)),
                ("namespace", s(ns)),
                ("pod", format!("{app}-{}", pod_suffix(pod_id))),
                ("service", s(app)),
            ];
            (labels, pod_id % 500, pod_id)
        }
    };
    let pads = [
        ("cluster", s("prod-eu-west-1")),
        (
            "node",
            format!(
                "ip-{}.eu-west-1.compute.internal",
                node_ip(node).replace('.', "-")
            ),
        ),
        ("region", s("eu-west-1")),
        ("zone", format!("eu-west-1{}", pick(&['a', 'b', 'c'], node))),
        ("env", s("production")),
        ("team", s(pick(&TEAMS, pod_id >> 4))),
        ("endpoint", s("http-metrics")),
        ("prometheus", s("monitoring/k8s")),
        ("prometheus_replica", s("prometheus-k8s-0")),
    ];
    for (name, value) in pads {
        if labels.len() < n_labels && labels.iter().all(|(n, _)| *n != name) {
            labels.push((name, value));
        }
    }
    labels.truncate(n_labels);
    let mut out: Vec<Label> = labels
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    for i in out.len()..n_labels {
        out.push((
            format!("label_{i:03}"),
            format!("value-{:x}", mix64(i as u64) >> 40),
        ));
    }
    out.sort();
    out
}

/// Timestamp (ms) of sample `sample` of any series in round `round`.
pub fn sample_timestamp_ms(
    start_ms: i64,
    round: u64,
    samples_per_series: usize,
    sample: usize,
) -> i64 {
    start_ms + (round * samples_per_series as u64 + sample as u64) as i64
}

/// Value of sample `sample` of series `series` in round `round`: a counter that grows by a
/// per-series step (a multiple of 0.5, so exactly representable) every sample.
pub fn sample_value(series: u64, round: u64, samples_per_series: usize, sample: usize) -> f64 {
    // A deterministic sprinkling of Prometheus staleness markers, so receivers are
    // checked for carrying that exact NaN payload through.
    if series.is_multiple_of(STALE_SERIES_EVERY)
        && (round + sample as u64) % STALE_ROUND_EVERY == STALE_ROUND_EVERY - 1
    {
        return f64::from_bits(STALE_NAN_BITS);
    }
    let step = (series.wrapping_mul(7919) % 97 + 1) as f64 * 0.5;
    (round * samples_per_series as u64 + sample as u64 + 1) as f64 * step
}

/// Disjoint contiguous share of the global series owned by connection `conn`.
pub fn connection_share(total_series: u64, connections: usize, conn: usize) -> Range<u64> {
    let c = connections as u64;
    (total_series * conn as u64 / c)..(total_series * (conn as u64 + 1) / c)
}

/// Splits a share into request-sized `(first_series, n_series)` chunks.
pub fn body_chunks(share: Range<u64>, series_per_request: usize) -> Vec<(u64, usize)> {
    let step = series_per_request.max(1) as u64;
    (share.start..share.end)
        .step_by(step as usize)
        .map(|first| (first, (share.end - first).min(step) as usize))
        .collect()
}

/// remote_write protocol version of the generated bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    V1,
    V2,
}

impl Protocol {
    pub fn content_type(self) -> &'static str {
        match self {
            Protocol::V1 => "application/x-protobuf",
            Protocol::V2 => "application/x-protobuf;proto=io.prometheus.write.v2.Request",
        }
    }
    pub fn version_header(self) -> &'static str {
        match self {
            Protocol::V1 => "0.1.0",
            Protocol::V2 => "2.0.0",
        }
    }
}

/// What the generator needs besides the series range and round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenParams {
    pub seed: u64,
    pub labels_per_series: usize,
    pub samples_per_series: usize,
}

impl GenParams {
    /// Ack-log header line (`#`-prefixed `key=value` pairs); `extra` is appended verbatim.
    pub fn header_line(&self, extra: &str) -> String {
        format!(
            "# promgate-loadtest seed={} labels={} samples={} {extra}",
            self.seed, self.labels_per_series, self.samples_per_series
        )
    }

    /// Parses a line written by [`GenParams::header_line`].
    pub fn parse_header(line: &str) -> anyhow::Result<Self> {
        let get = |key: &str| -> anyhow::Result<u64> {
            let value = line
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .with_context(|| format!("ack-log header lacks {key}="))?;
            value
                .parse()
                .with_context(|| format!("bad {key}= in ack-log header"))
        };
        Ok(GenParams {
            seed: get("seed")?,
            labels_per_series: get("labels")? as usize,
            samples_per_series: get("samples")? as usize,
        })
    }
}

/// An uncompressed body plus where each sample's value and timestamp bytes are.
pub struct RawBody {
    pub bytes: Vec<u8>,
    /// Per sample (series-major), offset of the 8 little-endian value bytes.
    pub value_offsets: Vec<usize>,
    /// Per sample (series-major), offset of the 6-byte timestamp varint.
    pub ts_offsets: Vec<usize>,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_len_field(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn write_ts_varint6(out: &mut [u8], ts_ms: i64) {
    assert!(
        TS_RANGE_MS.contains(&ts_ms),
        "timestamp {ts_ms} ms does not encode to 6 bytes"
    );
    let mut v = ts_ms as u64;
    for b in &mut out[..TS_VARINT_BYTES - 1] {
        *b = v as u8 | 0x80;
        v >>= 7;
    }
    out[TS_VARINT_BYTES - 1] = v as u8;
}

/// Encodes the round-0 protobuf body for series `first_series..first_series + n_series`.
pub fn encode_raw(
    p: &GenParams,
    protocol: Protocol,
    first_series: u64,
    n_series: usize,
    start_ms: i64,
) -> RawBody {
    let mut part = Vec::new();
    let (mut value_offsets, mut ts_offsets) = (Vec::new(), Vec::new());
    let mut symbols: HashMap<String, u32> = HashMap::from([(String::new(), 0)]);
    let mut symbol_list = vec![String::new()];
    let mut msg = Vec::new();
    let mut scratch = Vec::new();
    for series in first_series..first_series + n_series as u64 {
        msg.clear();
        let labels = series_labels(p.seed, series, p.labels_per_series);
        if protocol == Protocol::V1 {
            for (name, value) in &labels {
                scratch.clear();
                put_len_field(&mut scratch, 1, name.as_bytes());
                put_len_field(&mut scratch, 2, value.as_bytes());
                put_len_field(&mut msg, 1, &scratch);
            }
        } else {
            scratch.clear();
            for s in labels.iter().flat_map(|(n, v)| [n, v]) {
                let next = symbols.len() as u32;
                let r = *symbols.entry(s.clone()).or_insert_with(|| {
                    symbol_list.push(s.clone());
                    next
                });
                put_varint(&mut scratch, r as u64);
            }
            put_len_field(&mut msg, 1, &scratch);
        }
        let (vals, tss) = (msg.len() + 3, msg.len() + 4 + VALUE_BYTES);
        for s in 0..p.samples_per_series {
            msg.extend_from_slice(&[2 << 3 | 2, SAMPLE_MSG_LEN_BYTES as u8, 1 << 3 | 1]);
            msg.extend_from_slice(&sample_value(series, 0, p.samples_per_series, s).to_le_bytes());
            msg.extend_from_slice(&[2 << 3, 0, 0, 0, 0, 0, 0]);
            let at = msg.len() - TS_VARINT_BYTES;
            write_ts_varint6(
                &mut msg[at..],
                sample_timestamp_ms(start_ms, 0, p.samples_per_series, s),
            );
        }
        if protocol == Protocol::V2 {
            let metric_type = FAMILY_METRIC_TYPE[(series % FAMILIES) as usize];
            put_len_field(&mut msg, 5, &[1 << 3, metric_type]);
        }
        put_len_field(
            &mut part,
            if protocol == Protocol::V1 { 1 } else { 5 },
            &msg,
        );
        let base = part.len() - msg.len();
        for s in 0..p.samples_per_series {
            value_offsets.push(base + vals + s * (SAMPLE_MSG_LEN_BYTES + 2));
            ts_offsets.push(base + tss + s * (SAMPLE_MSG_LEN_BYTES + 2));
        }
    }
    let mut bytes = Vec::new();
    if protocol == Protocol::V2 {
        for s in &symbol_list {
            put_len_field(&mut bytes, 4, s.as_bytes());
        }
    }
    let shift = bytes.len();
    bytes.extend_from_slice(&part);
    value_offsets
        .iter_mut()
        .chain(ts_offsets.iter_mut())
        .for_each(|o| *o += shift);
    RawBody {
        bytes,
        value_offsets,
        ts_offsets,
    }
}

/// A pre-built, snappy-compressed body whose timestamps and values are patched per round.
pub struct BodyTemplate {
    pub first_series: u64,
    pub n_series: usize,
    pub samples_per_series: usize,
    pub uncompressed_len: usize,
    /// Snappy block (round 0); patch a copy of it with [`BodyTemplate::patch`].
    pub compressed: Vec<u8>,
    value_offsets: Vec<usize>,
    ts_offsets: Vec<usize>,
}

impl BodyTemplate {
    pub fn build(
        p: &GenParams,
        protocol: Protocol,
        first_series: u64,
        n_series: usize,
        start_ms: i64,
    ) -> Self {
        let raw = encode_raw(p, protocol, first_series, n_series, start_ms);
        let ranges: Vec<Range<usize>> = (raw.value_offsets.iter().map(|&o| o..o + VALUE_BYTES))
            .chain(raw.ts_offsets.iter().map(|&o| o..o + TS_VARINT_BYTES))
            .collect();
        let packed = patchable::compress(&raw.bytes, &ranges);
        let n = raw.value_offsets.len();
        BodyTemplate {
            first_series,
            n_series,
            samples_per_series: p.samples_per_series,
            uncompressed_len: raw.bytes.len(),
            compressed: packed.bytes,
            value_offsets: packed.offsets[..n].to_vec(),
            ts_offsets: packed.offsets[n..].to_vec(),
        }
    }

    pub fn n_samples(&self) -> usize {
        self.value_offsets.len()
    }

    /// Rewrites timestamps and values for `round` in `compressed` (a copy of `self.compressed`).
    pub fn patch(&self, compressed: &mut [u8], start_ms: i64, round: u64) {
        let spp = self.samples_per_series;
        for (i, (&vo, &to)) in self.value_offsets.iter().zip(&self.ts_offsets).enumerate() {
            let (series, s) = (self.first_series + (i / spp) as u64, i % spp);
            let value = sample_value(series, round, spp, s);
            compressed[vo..vo + VALUE_BYTES].copy_from_slice(&value.to_le_bytes());
            write_ts_varint6(
                &mut compressed[to..],
                sample_timestamp_ms(start_ms, round, spp, s),
            );
        }
    }

    /// The ack-log record for this body answered 2xx in `round`.
    pub fn ack_record(&self, connection: usize, round: u64, start_ms: i64) -> AckRecord {
        AckRecord {
            connection,
            round,
            first_series: self.first_series,
            n_series: self.n_series,
            first_timestamp_ms: sample_timestamp_ms(start_ms, round, self.samples_per_series, 0),
        }
    }
}

/// One ack-log line: `<connection> <round> <first_series_index> <n_series> <first_timestamp_ms>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckRecord {
    pub connection: usize,
    pub round: u64,
    pub first_series: u64,
    pub n_series: usize,
    pub first_timestamp_ms: i64,
}

impl fmt::Display for AckRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self;
        write!(
            f,
            "{} {} {} {} {}",
            r.connection, r.round, r.first_series, r.n_series, r.first_timestamp_ms
        )
    }
}

impl FromStr for AckRecord {
    type Err = anyhow::Error;
    fn from_str(line: &str) -> anyhow::Result<Self> {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 5 {
            bail!("ack-log line needs 5 fields: {line:?}");
        }
        let bad = || format!("bad ack-log line {line:?}");
        Ok(AckRecord {
            connection: f[0].parse().with_context(bad)?,
            round: f[1].parse().with_context(bad)?,
            first_series: f[2].parse().with_context(bad)?,
            n_series: f[3].parse().with_context(bad)?,
            first_timestamp_ms: f[4].parse().with_context(bad)?,
        })
    }
}

/// One acknowledged sample, regenerated from an ack record.
#[derive(Clone, Debug, PartialEq)]
pub struct AckedSample {
    pub series: u64,
    pub labels: Vec<Label>,
    pub timestamp_ms: i64,
    pub value: f64,
}

/// Every (labels, timestamp, value) carried by the body that `rec` acknowledges.
pub fn acked_samples(p: &GenParams, rec: &AckRecord) -> Vec<AckedSample> {
    let mut out = Vec::with_capacity(rec.n_series * p.samples_per_series);
    for series in rec.first_series..rec.first_series + rec.n_series as u64 {
        let labels = series_labels(p.seed, series, p.labels_per_series);
        for s in 0..p.samples_per_series {
            out.push(AckedSample {
                series,
                labels: labels.clone(),
                timestamp_ms: rec.first_timestamp_ms + s as i64,
                value: sample_value(series, rec.round, p.samples_per_series, s),
            });
        }
    }
    out
}

/// Replays a whole ack log (possibly several runs, each starting with its header line).
pub fn replay_ack_log(text: &str) -> anyhow::Result<Vec<AckedSample>> {
    let mut params = None;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with('#') {
            params = Some(GenParams::parse_header(line)?);
        } else {
            let p = params
                .as_ref()
                .context("ack-log record before any header line")?;
            out.extend(acked_samples(p, &line.parse()?));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use promgate_proto::messages::{v1, v2};
    use prost::Message;
    use std::collections::HashSet;

    const START_MS: i64 = 1_700_000_000_000;

    fn params(labels: usize, samples: usize) -> GenParams {
        GenParams {
            seed: 1,
            labels_per_series: labels,
            samples_per_series: samples,
        }
    }

    fn decompress(b: &[u8]) -> Vec<u8> {
        snap::raw::Decoder::new()
            .decompress_vec(b)
            .expect("valid snappy")
    }

    #[test]
    fn label_sets_are_sorted_complete_and_unique() {
        for n_labels in [MIN_LABELS, 10, 30] {
            let mut seen = HashSet::new();
            for series in 0..40_000 {
                let labels = series_labels(1, series, n_labels);
                assert_eq!(labels.len(), n_labels);
                assert!(labels.windows(2).all(|w| w[0].0 < w[1].0), "{labels:?}");
                for required in ["__name__", "instance", "job"] {
                    assert!(labels.iter().any(|(n, v)| n == required && !v.is_empty()));
                }
                assert!(
                    seen.insert(labels),
                    "duplicate label set for series {series}"
                );
            }
        }
        assert_ne!(
            series_labels(1, 0, 10),
            series_labels(2, 0, 10),
            "seed has no effect"
        );
    }

    /// One decoded sample with its series' labels.
    type Decoded = (Vec<Label>, i64, f64);

    /// Decompresses and decodes a body with prost, for either protocol.
    fn decode(protocol: Protocol, body: &[u8]) -> Vec<Decoded> {
        let raw = decompress(body);
        let mut out = Vec::new();
        let mut push = |labels: Vec<Label>, samples: Vec<(i64, f64)>| {
            out.extend(samples.into_iter().map(|(ts, v)| (labels.clone(), ts, v)));
        };
        match protocol {
            Protocol::V1 => {
                for ts in v1::WriteRequest::decode(&raw[..]).expect("v1").timeseries {
                    let labels = ts.labels.into_iter().map(|l| (l.name, l.value)).collect();
                    push(
                        labels,
                        ts.samples.iter().map(|s| (s.timestamp, s.value)).collect(),
                    );
                }
            }
            Protocol::V2 => {
                let req = v2::Request::decode(&raw[..]).expect("v2");
                assert_eq!(req.symbols[0], "");
                let sym = |r: u32| req.symbols[r as usize].clone();
                for ts in &req.timeseries {
                    let labels = ts.labels_refs.chunks(2).map(|p| (sym(p[0]), sym(p[1])));
                    push(
                        labels.collect(),
                        ts.samples.iter().map(|s| (s.timestamp, s.value)).collect(),
                    );
                }
            }
        }
        out
    }

    #[test]
    fn patchable_bodies_decompress_to_the_template() {
        for protocol in [Protocol::V1, Protocol::V2] {
            for (n_series, samples) in [(1, 1), (7, 3), (500, 1), (2000, 1), (100, 20)] {
                let p = params(10, samples);
                let raw = encode_raw(&p, protocol, 123, n_series, START_MS);
                let t = BodyTemplate::build(&p, protocol, 123, n_series, START_MS);
                assert_eq!(
                    decompress(&t.compressed),
                    raw.bytes,
                    "{protocol:?} {n_series}x{samples}"
                );
                assert_eq!(t.n_samples(), n_series * samples);
            }
        }
    }

    #[test]
    fn patched_round_decodes_to_new_samples_and_replays_from_ack_record() {
        for protocol in [Protocol::V1, Protocol::V2] {
            let p = params(12, 3);
            let t = BodyTemplate::build(&p, protocol, 1000, 50, START_MS);
            let mut body = t.compressed.clone();
            for round in [0, 1, 7, 100_000] {
                t.patch(&mut body, START_MS, round);
                let rec: AckRecord = t
                    .ack_record(4, round, START_MS)
                    .to_string()
                    .parse()
                    .expect("parse");
                let expected = acked_samples(&p, &rec);
                let flat = decode(protocol, &body);
                assert_eq!(flat.len(), expected.len());
                for (got, want) in flat.iter().zip(&expected) {
                    assert_eq!(
                        (&got.0, got.1, got.2),
                        (&want.labels, want.timestamp_ms, want.value)
                    );
                }
                assert_eq!(rec.first_timestamp_ms, START_MS + round as i64 * 3);
                assert!(flat[0].1 == START_MS + round as i64 * 3 && flat[2].1 == flat[0].1 + 2);
            }
        }
    }

    #[test]
    fn compression_ratio_is_close_to_snap() {
        for protocol in [Protocol::V1, Protocol::V2] {
            let p = params(10, 1);
            let raw = encode_raw(&p, protocol, 0, 2000, START_MS);
            let ours = BodyTemplate::build(&p, protocol, 0, 2000, START_MS)
                .compressed
                .len();
            let snap = snap::raw::Encoder::new()
                .compress_vec(&raw.bytes)
                .expect("snap")
                .len();
            println!(
                "{protocol:?}: raw {} B, snap {snap} B ({:.2}x), patchable {ours} B ({:.2}x), ratio {:.2}",
                raw.bytes.len(),
                raw.bytes.len() as f64 / snap as f64,
                raw.bytes.len() as f64 / ours as f64,
                ours as f64 / snap as f64
            );
            assert!(
                ours as f64 <= snap as f64 * 1.5,
                "patchable {ours} vs snap {snap}"
            );
            // All-literal output would be ~1.0x; realistic bodies compress ~2-5x.
            assert!(
                ours * 3 < raw.bytes.len() * 2,
                "patchable encoder barely compresses"
            );
        }
    }

    #[test]
    fn ack_log_replay_handles_headers_and_rejects_garbage() {
        let p = params(6, 2);
        let rec = AckRecord {
            connection: 0,
            round: 3,
            first_series: 10,
            n_series: 2,
            first_timestamp_ms: START_MS + 6,
        };
        let log = format!("{}\n{rec}\n", p.header_line("start_ms=1"));
        let samples = replay_ack_log(&log).expect("replay");
        assert_eq!(samples.len(), 4);
        assert_eq!(samples[3].series, 11);
        assert_eq!(samples[3].timestamp_ms, START_MS + 7);
        assert_eq!(samples[3].value, sample_value(11, 3, 2, 1));
        assert!(replay_ack_log("0 1 2 3 4\n").is_err());
        assert!(replay_ack_log(&format!("{}\n0 1 2\n", p.header_line(""))).is_err());
    }

    #[test]
    fn shares_are_disjoint_and_cover_all_series() {
        let chunks: Vec<(u64, usize)> = (0..3)
            .flat_map(|c| body_chunks(connection_share(1001, 3, c), 100))
            .collect();
        let mut next = 0;
        for (first, n) in chunks {
            assert_eq!(first, next);
            assert!(n > 0 && n <= 100);
            next += n as u64;
        }
        assert_eq!(next, 1001);
    }
}
