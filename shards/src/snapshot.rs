//! The target-label snapshot (agent control plane): what each polled Prometheus says
//! about its active targets (`GET /api/v1/targets?state=active`) and its scrape jobs
//! (`GET /api/v1/status/config`), merged into one immutable, versioned [`Snapshot`].
//!
//! The poller runs on its own thread and publishes each new snapshot into a
//! [`SnapshotCell`]; shards read it with one atomic load per batch (`arc-swap`), never a
//! lock. A Prometheus that cannot be reached keeps its last good targets in the
//! snapshot, which is then marked stale (metrics and log); ingestion never waits for it.
//!
//! Each target's tags (meta, agent, custom) are computed when a snapshot is built, not
//! per series: the receive path copies them into the WAL record of every request that
//! has series of that target (`crate::enrich`).

use crate::enrich::{target_tags, EnrichConfig};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

pub type Labels = Vec<(String, String)>;

/// One active target, as its Prometheus reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub job: String,
    pub instance: String,
    /// Target labels after relabelling (sorted by name): every series scraped from this
    /// target carries them (unless `honor_labels` lets the target override them).
    pub labels: Labels,
    /// Discovered labels before relabelling (`__address__`, `__meta_*`, ...), sorted.
    pub discovered: Labels,
    pub scrape_pool: String,
    pub scrape_interval_ms: u64,
    pub honor_labels: bool,
    /// Meta, agent and custom tags (sorted by name), computed once when the snapshot is
    /// built ([`crate::enrich::target_tags`]), so the receive path only copies them.
    pub tags: Labels,
}

/// Every known target, by job then instance (so a lookup borrows the series' label
/// values and allocates nothing). Immutable once published.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Increases with every published snapshot; 0 is the empty one before the first sync.
    pub version: u64,
    /// hashbrown's default (foldhash) hasher: one lookup per series on the receive path.
    /// Lookups never insert, so a sender's label values cannot grow or skew the table.
    by_job: hashbrown::HashMap<String, hashbrown::HashMap<String, Arc<Target>>>,
    len: usize,
}

impl Snapshot {
    pub fn target(&self, job: &str, instance: &str) -> Option<&Arc<Target>> {
        self.by_job.get(job)?.get(instance)
    }

    /// Number of targets.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn targets(&self) -> impl Iterator<Item = &Arc<Target>> {
        self.by_job.values().flat_map(|m| m.values())
    }
}

/// Where shards read the current snapshot from.
pub struct SnapshotCell(ArcSwap<Snapshot>);

impl Default for SnapshotCell {
    fn default() -> Self {
        SnapshotCell(ArcSwap::from_pointee(Snapshot::default()))
    }
}

impl SnapshotCell {
    /// The current snapshot: one atomic load.
    pub fn load(&self) -> Arc<Snapshot> {
        self.0.load_full()
    }

    pub fn publish(&self, s: Snapshot) {
        self.0.store(Arc::new(s));
    }
}

fn sorted_labels(v: &serde_json::Value) -> Labels {
    let mut out: Labels = v
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Parses Prometheus's duration strings as the targets API prints them (`15s`, `1m`,
/// `1m30s`, `500ms`).
pub fn parse_prometheus_duration_ms(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let mult = promgate_proto::duration::unit_ms(&rest[..unit_len])?;
        total = total.checked_add(n.checked_mul(mult)?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// The active targets of one `/api/v1/targets` answer. `honor_labels` comes from the
/// job's configuration ([`parse_honor_labels`]), by scrape pool.
pub fn parse_targets(
    body: &[u8],
    honor_labels: &HashMap<String, bool>,
) -> Result<Vec<Target>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("targets answer is not JSON: {e}"))?;
    if v["status"] != "success" {
        return Err(format!("targets answer has status {}", v["status"]));
    }
    let active = v["data"]["activeTargets"]
        .as_array()
        .ok_or("targets answer has no data.activeTargets")?;
    let mut out = Vec::with_capacity(active.len());
    for t in active {
        let labels = sorted_labels(&t["labels"]);
        let get = |name: &str| {
            labels
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let (Some(job), Some(instance)) = (get("job"), get("instance")) else {
            continue; // a target without job or instance cannot be matched to series
        };
        let scrape_pool = t["scrapePool"].as_str().unwrap_or(&job).to_string();
        out.push(Target {
            honor_labels: honor_labels.get(&scrape_pool).copied().unwrap_or(false),
            scrape_interval_ms: t["scrapeInterval"]
                .as_str()
                .and_then(parse_prometheus_duration_ms)
                .unwrap_or(0),
            discovered: sorted_labels(&t["discoveredLabels"]),
            job,
            instance,
            labels,
            scrape_pool,
            tags: Labels::new(),
        });
    }
    Ok(out)
}

/// `honor_labels` per `job_name` from a `/api/v1/status/config` answer. Prometheus
/// prints its loaded configuration as canonical YAML (`scrape_configs:` then `- job_name:`
/// items whose keys are indented two spaces), so a line scan of that shape suffices; no
/// YAML library is needed for two keys.
pub fn parse_honor_labels(body: &[u8]) -> Result<HashMap<String, bool>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("config answer is not JSON: {e}"))?;
    let yaml = v["data"]["yaml"]
        .as_str()
        .ok_or("config answer has no data.yaml")?;
    let mut out = HashMap::new();
    let mut job: Option<String> = None;
    let mut in_scrape = false;
    for line in yaml.lines() {
        if !line.starts_with(' ') && !line.starts_with('-') {
            in_scrape = line.trim_end() == "scrape_configs:";
            job = None;
            continue;
        }
        if !in_scrape {
            continue;
        }
        let unquote = |s: &str| s.trim().trim_matches('"').trim_matches('\'').to_string();
        if let Some(name) = line.strip_prefix("- job_name:") {
            let name = unquote(name);
            out.insert(name.clone(), false);
            job = Some(name);
        } else if let Some(value) = line.strip_prefix("  honor_labels:") {
            if let Some(j) = &job {
                out.insert(j.clone(), value.trim() == "true");
            }
        }
    }
    Ok(out)
}

/// Merges the targets of every address (later addresses win on equal keys), giving
/// each its tags under `cfg`.
pub fn merge(version: u64, per_address: &[Vec<Target>], cfg: &EnrichConfig) -> Snapshot {
    let mut by_job: hashbrown::HashMap<String, hashbrown::HashMap<String, Arc<Target>>> =
        hashbrown::HashMap::new();
    for list in per_address {
        for t in list {
            let mut t = t.clone();
            t.tags = target_tags(Some(&t), cfg);
            by_job
                .entry(t.job.clone())
                .or_default()
                .insert(t.instance.clone(), Arc::new(t));
        }
    }
    let len = by_job.values().map(|m| m.len()).sum();
    Snapshot {
        version,
        by_job,
        len,
    }
}

/// A plain HTTP/1.1 GET (`http://` only) with a timeout; the body (chunked or not).
pub fn http_get(base: &str, path: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let rest = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("{base}: only http:// addresses are supported"))?;
    let hostport = rest.trim_end_matches('/');
    let hostport = hostport.split('/').next().unwrap_or(hostport);
    let prefix = &rest.trim_end_matches('/')[hostport.len()..];
    use std::net::ToSocketAddrs;
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport} resolves to no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {prefix}{path} HTTP/1.1\r\nHost: {hostport}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(&all).map_err(|e| e.to_string())? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Err(format!("{addr}: truncated answer")),
    };
    if resp.code != Some(200) {
        return Err(format!("{base}{path}: HTTP {}", resp.code.unwrap_or(0)));
    }
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding") && h.value.eq_ignore_ascii_case(b"chunked")
    });
    let body = &all[n..];
    if !chunked {
        return Ok(body.to_vec());
    }
    let mut out = Vec::new();
    let mut b = body;
    loop {
        let line_end = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunked body")?;
        let size_text = std::str::from_utf8(&b[..line_end]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size: {e}"))?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..size).ok_or("truncated chunk")?);
        b = b.get(size + 2..).ok_or("truncated chunk")?;
    }
}

/// Poller telemetry.
#[derive(Default)]
pub struct SnapshotMetrics {
    pub version: AtomicU64,
    pub targets: AtomicU64,
    /// Unix ms of the last sync in which every address answered.
    pub last_success_ms: AtomicU64,
    /// 1 while at least one address failed its last sync (its old targets are kept).
    pub stale: AtomicU64,
    /// Failed syncs per address, in `addresses` order.
    pub sync_errors: Vec<AtomicU64>,
}

/// Polls every address once and publishes a new snapshot; `last` keeps each address's
/// last good targets. Returns the errors of this round.
pub fn sync_once(
    addresses: &[String],
    timeout: Duration,
    last: &mut [Option<Vec<Target>>],
    version: &mut u64,
    cell: &SnapshotCell,
    metrics: &SnapshotMetrics,
    cfg: &EnrichConfig,
) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, base) in addresses.iter().enumerate() {
        let result = http_get(base, "/api/v1/status/config", timeout)
            .and_then(|b| parse_honor_labels(&b))
            .and_then(|honor| {
                http_get(base, "/api/v1/targets?state=active", timeout)
                    .and_then(|b| parse_targets(&b, &honor))
            });
        match result {
            Ok(targets) => last[i] = Some(targets),
            Err(e) => {
                if let Some(c) = metrics.sync_errors.get(i) {
                    c.fetch_add(1, Relaxed);
                }
                errors.push(format!("{base}: {e}"));
            }
        }
    }
    *version += 1;
    let lists: Vec<Vec<Target>> = last.iter().flatten().cloned().collect();
    let snapshot = merge(*version, &lists, cfg);
    metrics.version.store(*version, Relaxed);
    metrics.targets.store(snapshot.len() as u64, Relaxed);
    metrics.stale.store(u64::from(!errors.is_empty()), Relaxed);
    if errors.is_empty() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        metrics.last_success_ms.store(now, Relaxed);
    }
    cell.publish(snapshot);
    errors
}

/// Starts the poller thread: one sync at once, then every `interval`.
pub fn spawn_poller(
    addresses: Vec<String>,
    interval: Duration,
    timeout: Duration,
    cell: Arc<SnapshotCell>,
    metrics: Arc<SnapshotMetrics>,
    cfg: EnrichConfig,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("snapshot".into())
        .spawn(move || {
            let mut last: Vec<Option<Vec<Target>>> = vec![None; addresses.len()];
            let mut version = 0;
            loop {
                for e in sync_once(&addresses, timeout, &mut last, &mut version, &cell, &metrics, &cfg)
                {
                    tracing::warn!(error = %e, "target snapshot sync failed; keeping the last good targets");
                }
                std::thread::sleep(interval);
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGETS: &str = r#"{"status":"success","data":{"activeTargets":[
      {"discoveredLabels":{"__address__":"10.0.0.7:9100","__meta_kubernetes_pod_name":"node-exporter-abc","__meta_kubernetes_namespace":"monitoring","job":"node"},
       "labels":{"instance":"10.0.0.7:9100","job":"node","team":"infra"},
       "scrapePool":"node","scrapeUrl":"http://10.0.0.7:9100/metrics","health":"up","scrapeInterval":"1m30s","scrapeTimeout":"10s"},
      {"discoveredLabels":{"__address__":"x"},"labels":{"job":"nojob-instance"},"scrapePool":"broken"}
    ],"droppedTargets":[]}}"#;

    const CONFIG: &str = r#"{"status":"success","data":{"yaml":"global:\n  scrape_interval: 15s\nscrape_configs:\n- job_name: node\n  honor_labels: true\n  scrape_interval: 1m30s\n  static_configs:\n  - targets:\n    - 10.0.0.7:9100\n- job_name: \"other\"\n  honor_timestamps: true\nremote_write:\n- url: http://x\n"}}"#;

    #[test]
    fn targets_and_honor_labels_parse() {
        let honor = parse_honor_labels(CONFIG.as_bytes()).unwrap();
        assert_eq!(honor.get("node"), Some(&true));
        assert_eq!(honor.get("other"), Some(&false));
        let t = parse_targets(TARGETS.as_bytes(), &honor).unwrap();
        assert_eq!(t.len(), 1, "a target without instance is skipped");
        let t = &t[0];
        assert_eq!(
            (t.job.as_str(), t.instance.as_str()),
            ("node", "10.0.0.7:9100")
        );
        assert!(t.honor_labels);
        assert_eq!(t.scrape_interval_ms, 90_000);
        assert_eq!(t.labels[1], ("job".into(), "node".into()));
        assert!(t
            .discovered
            .contains(&("__meta_kubernetes_namespace".into(), "monitoring".into())));
        assert!(parse_targets(b"{\"status\":\"error\"}", &honor).is_err());
        assert!(parse_targets(b"not json", &honor).is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_prometheus_duration_ms("15s"), Some(15_000));
        assert_eq!(parse_prometheus_duration_ms("1m30s"), Some(90_000));
        assert_eq!(parse_prometheus_duration_ms("500ms"), Some(500));
        assert_eq!(parse_prometheus_duration_ms("1x"), None);
    }

    #[test]
    fn an_unreachable_address_keeps_its_last_targets_and_marks_the_snapshot_stale() {
        let honor = parse_honor_labels(CONFIG.as_bytes()).unwrap();
        let good = parse_targets(TARGETS.as_bytes(), &honor).unwrap();
        let cell = SnapshotCell::default();
        assert_eq!(cell.load().version, 0);
        let metrics = SnapshotMetrics {
            sync_errors: vec![AtomicU64::new(0)],
            ..Default::default()
        };
        // Nothing listens on port 9 of loopback.
        let addresses = vec!["http://127.0.0.1:9".to_string()];
        let mut last = vec![Some(good)];
        let mut version = 4;
        let errors = sync_once(
            &addresses,
            Duration::from_millis(500),
            &mut last,
            &mut version,
            &cell,
            &metrics,
            &EnrichConfig::default(),
        );
        assert_eq!(errors.len(), 1);
        let s = cell.load();
        assert_eq!(s.version, 5);
        assert!(s.target("node", "10.0.0.7:9100").is_some());
        assert_eq!(metrics.stale.load(Relaxed), 1);
        assert_eq!(metrics.sync_errors[0].load(Relaxed), 1);
    }
}
