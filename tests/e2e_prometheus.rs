//! End to end with real components: Debian's `prometheus` (A) scrapes itself and
//! `prometheus-node-exporter` on 127.0.0.1 (found through `file_sd_configs` with target
//! labels, and `relabel_configs`) and remote_writes to the agent (with its in-process
//! server); the agent's count of accepted samples must equal Prometheus's own
//! `prometheus_remote_storage_samples_total`, with nothing failed, retried or dropped.
//! The agent polls A's targets API: the server's query API must show each series' meta
//! and custom tags as `df_NAME`, and `df_` matchers must select by them.
//! A second `prometheus` (B) has no scrape targets and `remote_read`s from the promgate
//! server (`read_recent: true`): a set of PromQL queries, instant and range, must give
//! the same series and values on A and B over the same window (tags never leak into
//! remote_read's labels).
//!
//! A second test stops the polled Prometheus (SIGSTOP, so its API hangs rather than
//! refuses) while another Prometheus keeps remote_writing: the agent keeps its last
//! snapshot (new samples still get its meta tags), marks it stale, and loses nothing.
//!
//! The binaries must be on PATH: `scripts/test.sh` installs them
//! (`apt-get install -y prometheus prometheus-node-exporter`).

mod common;

use common::{
    free_port, metric_sum, start_prometheus, temp_dir, wait_shipped, Agent, Client, Proc,
};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn need(binary: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(binary).is_file()))
        .unwrap_or(false);
    assert!(found, "{binary} is not installed: run scripts/test.sh, or apt-get install -y prometheus prometheus-node-exporter");
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut c = Client::connect(port).ok()?;
    let r = c.request("GET", path, &[], b"").ok()?;
    (r.status == 200).then(|| r.text())
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn prometheus_remote_write_counts_match() {
    need("prometheus");
    need("prometheus-node-exporter");
    let dir = temp_dir("e2e");
    let prom_port = free_port();
    // The agent polls A's targets API for its target-label snapshot.
    let agent_config = dir.join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            r#"[enrich]
prometheus_http_api_addresses = ["http://127.0.0.1:{prom_port}"]
sync_interval = "1s"
[enrich.custom_tags]
region = "eu-1"
team = "platform"
[enrich.meta_tags]
sd_file = "__meta_filepath"
"#
        ),
    )
    .unwrap();
    let agent = Agent::start(
        "e2e-agent",
        &["--shards", "2", "--config", agent_config.to_str().unwrap()],
    );

    let node_port = free_port();
    let _node = Proc(
        Command::new("prometheus-node-exporter")
            .arg(format!("--web.listen-address=127.0.0.1:{node_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("node.log")).unwrap())
            .spawn()
            .expect("start node exporter"),
    );
    let sd_file = dir.join("node.json");
    std::fs::write(
        &sd_file,
        format!(r#"[{{"targets": ["127.0.0.1:{node_port}"], "labels": {{"team": "infra", "cluster": "c1"}}}}]"#),
    )
    .unwrap();
    let config = format!(
        r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: prometheus
    static_configs: [{{targets: ["127.0.0.1:{prom_port}"]}}]
  - job_name: node
    file_sd_configs: [{{files: ["{sd}"], refresh_interval: 1s}}]
    relabel_configs:
      - target_label: env
        replacement: test
      - source_labels: [team]
        regex: (.+)
        target_label: owner
        replacement: team-$1
remote_write:
  - url: http://127.0.0.1:{agent_port}/api/v1/prometheus
    queue_config:
      batch_send_deadline: 1s
      max_shards: 4
    metadata_config:
      send_interval: 2s
"#,
        agent_port = agent.port,
        sd = sd_file.display(),
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let _prom = start_prometheus(&dir, prom_port, &config);
    // B: nothing to scrape; everything it knows comes from promgate's remote_read.
    let b_dir = dir.join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let b_port = free_port();
    let b_config = format!(
        r#"global:
  scrape_interval: 1s
remote_read:
  - url: http://127.0.0.1:{}/api/v1/prom/read
    read_recent: true
"#,
        agent.query_port
    );
    let _prom_b = start_prometheus(&b_dir, b_port, &b_config);

    let prom_metric = |name: &str| get(prom_port, "/metrics").map(|t| metric_sum(&t, name));
    // Real traffic: several scrapes of both targets have been shipped.
    wait_for(
        "Prometheus to send 5000 samples",
        Duration::from_secs(90),
        || prom_metric("prometheus_remote_storage_samples_total").unwrap_or(0.0) >= 5000.0,
    );
    assert_counts_match(prom_port, &agent);
    let agent_text = agent.metrics();
    assert!(
        metric_sum(&agent_text, "promgate_agent_decode_metadata_total") > 0.0,
        "metadata-only requests are accepted"
    );
    assert_eq!(
        metric_sum(&agent_text, "promgate_agent_decode_series_rejected_total"),
        0.0
    );
    let non_2xx: f64 = agent_text
        .lines()
        .filter(|l| {
            l.starts_with("promgate_agent_receive_requests_total") && !l.contains("code=\"2")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(non_2xx, 0.0, "every remote_write request was accepted");

    // The snapshot holds A's two active targets (job prometheus and job node).
    wait_for(
        "the agent's snapshot of A's targets",
        Duration::from_secs(30),
        || {
            let m = agent.metrics();
            metric_sum(&m, "promgate_agent_snapshot_targets") == 2.0
                && metric_sum(&m, "promgate_agent_snapshot_stale") == 0.0
        },
    );

    check_tags(&agent, &sd_file.display().to_string());
    compare_promql(prom_port, b_port, &agent, started);
}

/// `/api/v1/series` of the server for one selector: each series' labels.
fn series(agent: &Agent, selector: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text = get(
        agent.query_port,
        &format!("/api/v1/series?match[]={}", encode(selector)),
    )
    .unwrap_or_else(|| panic!("series {selector} failed"));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_object().unwrap().clone())
        .collect()
}

/// Meta (Kubernetes-style defaults, `host`, a configured one), agent and custom tags
/// are on the stored series; `df_` matchers select by them; remote_read returns
/// the original labels only.
fn check_tags(agent: &Agent, sd_file: &str) {
    // Series first shipped before the agent's first sync are sent again once their
    // target is known; wait for that.
    wait_for(
        "node_load1 to carry its target's meta tags",
        Duration::from_secs(30),
        || {
            series(agent, "node_load1")
                .first()
                .is_some_and(|s| s.contains_key("df_pod_cluster"))
        },
    );
    let node = &series(agent, "node_load1")[0];
    let want = [
        ("job", "node"),
        ("team", "infra"),
        ("cluster", "c1"),
        ("env", "test"),
        ("owner", "team-infra"),
        ("df_host", "127.0.0.1"),
        ("df_pod_cluster", "c1"),
        ("df_region", "eu-1"),
        ("df_sd_file", sd_file),
    ];
    for (n, v) in want {
        assert_eq!(
            node.get(n).and_then(|x| x.as_str()),
            Some(v),
            "{n} of {node:?}"
        );
    }
    assert!(node
        .get("df_agent")
        .is_some_and(|v| v.as_str().is_some_and(|v| !v.is_empty())));
    assert!(node.contains_key("df_agent_host"), "{node:?}");
    assert!(
        !node.contains_key("df_pod"),
        "no Kubernetes discovery here: {node:?}"
    );
    // `df_` matchers select by tag: the cluster tag is only on the node job's series.
    let c1 = series(agent, r#"{df_pod_cluster="c1"}"#);
    assert!(c1.len() > 10, "{} series", c1.len());
    assert!(c1.iter().all(|s| s["job"] == "node"));
    let ups = series(agent, r#"up{df_sd_file=~".+"}"#);
    assert_eq!(ups.len(), 1, "{ups:?}");
    assert_eq!(ups[0]["job"], "node");
    assert_eq!(series(agent, r#"up{df_region="eu-1"}"#).len(), 2);
    assert!(series(agent, r#"up{df_region="us"}"#).is_empty());
    let labels = get(agent.query_port, "/api/v1/labels").unwrap();
    for n in ["df_host", "df_region", "df_sd_file", "team"] {
        assert!(labels.contains(&format!("\"{n}\"")), "{n} not in {labels}");
    }
    let values = get(agent.query_port, "/api/v1/label/df_region/values").unwrap();
    assert!(values.contains("\"eu-1\""), "{values}");
    // remote_read: a df_ matcher filters, and the labels are exactly Prometheus's.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 60_000;
    let body = common::read_request(
        vec![common::query(
            0,
            now,
            &[(0, "__name__", "up"), (0, "df_pod_cluster", "c1")],
        )],
        &[0],
    );
    let read = common::decode_read(&common::remote_read_raw(agent.query_port, &body), 1);
    assert_eq!(read[0].len(), 1);
    let names: Vec<&str> = read[0][0].labels.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec!["__name__", "cluster", "env", "instance", "job", "owner", "team"]
    );
    // The custom tag `team` clashes with the node target's own `team` label: the
    // original wins there; the prometheus job's series, which have no `team`, get it.
    assert!(!node.contains_key("df_team"), "{node:?}");
    let platform = series(agent, r#"{df_team="platform"}"#);
    assert!(!platform.is_empty());
    assert!(platform.iter().all(|s| s["job"] == "prometheus"));
    let m = agent.metrics();
    assert!(metric_sum(&m, "promgate_agent_enrich_hits_total") > 0.0);
    assert!(metric_sum(&m, "promgate_agent_enrich_clashes_total") > 0.0);
}

/// Prometheus's count of samples it sent equals the agent's count of samples it
/// accepted, and Prometheus failed, retried and dropped nothing.
fn assert_counts_match(prom_port: u16, agent: &Agent) {
    let prom_metric = |name: &str| get(prom_port, "/metrics").map(|t| metric_sum(&t, name));
    // Between sends both counters stand still; find such a moment and compare.
    let mut last = (0.0, 0.0);
    let mut matched = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let before = prom_metric("prometheus_remote_storage_samples_total").unwrap();
        let ours = metric_sum(&agent.metrics(), "promgate_agent_decode_samples_total");
        let after = prom_metric("prometheus_remote_storage_samples_total").unwrap();
        assert!(
            ours <= after,
            "agent counted {ours} samples but Prometheus sent only {after}"
        );
        last = (after, ours);
        if before == after && ours == after {
            matched = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        matched,
        "counts never matched: Prometheus {} vs agent {}",
        last.0, last.1
    );
    let text = get(prom_port, "/metrics").unwrap();
    for bad in [
        "prometheus_remote_storage_samples_failed_total",
        "prometheus_remote_storage_samples_retried_total",
        "prometheus_remote_storage_samples_dropped_total",
    ] {
        assert_eq!(metric_sum(&text, bad), 0.0, "{bad} must stay 0");
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The polled Prometheus (P) is stopped while another (W) keeps remote_writing series
/// of the same target: the agent keeps P's last targets (marked stale), still tags new
/// samples with them, answers every request 2xx, and every sample W sent is stored.
#[test]
fn a_stopped_prometheus_api_keeps_the_last_snapshot_and_loses_nothing() {
    need("prometheus");
    need("prometheus-node-exporter");
    let dir = temp_dir("e2e-outage");
    let (p_port, w_port, node_port) = (free_port(), free_port(), free_port());
    let agent_config = dir.join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "[enrich]\nprometheus_http_api_addresses = [\"http://127.0.0.1:{p_port}\"]\nsync_interval = \"500ms\"\nsync_timeout = \"500ms\"\n"
        ),
    )
    .unwrap();
    let agent = Agent::start(
        "e2e-outage-agent",
        &["--shards", "2", "--config", agent_config.to_str().unwrap()],
    );
    let _node = Proc(
        Command::new("prometheus-node-exporter")
            .arg(format!("--web.listen-address=127.0.0.1:{node_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node exporter"),
    );
    let sd_file = dir.join("node.json");
    std::fs::write(
        &sd_file,
        format!(r#"[{{"targets": ["127.0.0.1:{node_port}"], "labels": {{"cluster": "c1"}}}}]"#),
    )
    .unwrap();
    // P: polled only.
    let p_dir = dir.join("p");
    std::fs::create_dir_all(&p_dir).unwrap();
    let p = start_prometheus(
        &p_dir,
        p_port,
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: node\n    file_sd_configs: [{{files: [\"{}\"], refresh_interval: 1s}}]\n",
            sd_file.display()
        ),
    );
    // W: the same target, written to the agent.
    let w_dir = dir.join("w");
    std::fs::create_dir_all(&w_dir).unwrap();
    let _w = start_prometheus(
        &w_dir,
        w_port,
        &format!(
            r#"global:
  scrape_interval: 1s
scrape_configs:
  - job_name: node
    static_configs: [{{targets: ["127.0.0.1:{node_port}"], labels: {{cluster: c1}}}}]
remote_write:
  - url: http://127.0.0.1:{}/api/v1/prometheus
    queue_config:
      batch_send_deadline: 1s
"#,
            agent.port
        ),
    );
    wait_for(
        "the snapshot of P's target",
        Duration::from_secs(60),
        || {
            let m = agent.metrics();
            metric_sum(&m, "promgate_agent_snapshot_targets") == 1.0
                && metric_sum(&m, "promgate_agent_snapshot_stale") == 0.0
        },
    );
    let w_sent = || {
        get(w_port, "/metrics")
            .map(|t| metric_sum(&t, "prometheus_remote_storage_samples_total"))
            .unwrap_or(0.0)
    };
    wait_for("W to send 3000 samples", Duration::from_secs(60), || {
        w_sent() >= 3000.0
    });

    // Stop P: its API now hangs (each sync times out).
    let stopped = Command::new("kill")
        .args(["-STOP", &p.0.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let t_stop = now_ms();
    wait_for(
        "the snapshot to be marked stale",
        Duration::from_secs(20),
        || {
            let m = agent.metrics();
            metric_sum(&m, "promgate_agent_snapshot_stale") == 1.0
                && metric_sum(&m, "promgate_agent_snapshot_sync_errors_total") >= 2.0
        },
    );
    let before = w_sent();
    wait_for(
        "5 s of W's writes during the outage",
        Duration::from_secs(60),
        || now_ms() > t_stop + 5000 && w_sent() > before,
    );
    let m = agent.metrics();
    assert_eq!(
        metric_sum(&m, "promgate_agent_snapshot_targets"),
        1.0,
        "last targets kept"
    );
    assert_counts_match(w_port, &agent);

    // Every sample W has of node_load1 over a window reaching past the stop is stored,
    // and the ones received during the outage carry P's meta tag.
    let end = now_ms() - 3000;
    let highest = || {
        get(w_port, "/metrics").map_or(0.0, |t| {
            metric_sum(
                &t,
                "prometheus_remote_storage_queue_highest_sent_timestamp_seconds",
            )
        })
    };
    wait_for(
        "W to have sent past the window",
        Duration::from_secs(30),
        || highest() * 1000.0 >= (end + 2000) as f64,
    );
    wait_shipped(&agent);
    let window_s = 120;
    let text = get(
        w_port,
        &format!(
            "/api/v1/query?query={}&time={:.3}",
            encode(&format!("node_load1[{window_s}s]")),
            end as f64 / 1000.0
        ),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let w_samples: Vec<(i64, u64)> = v["data"]["result"][0]["values"]
        .as_array()
        .unwrap_or_else(|| panic!("{text}"))
        .iter()
        .map(|p| {
            let t = (p[0].as_f64().unwrap() * 1000.0).round() as i64;
            let x: f64 = p[1].as_str().unwrap().parse().unwrap();
            (t, x.to_bits())
        })
        .collect();
    assert!(w_samples.len() >= 5, "{text}");
    assert!(
        w_samples.iter().any(|(t, _)| *t > t_stop + 1000),
        "the window reaches into the outage: stop {t_stop}, end {end}, {w_samples:?}"
    );
    let body = common::read_request(
        vec![common::query(
            end - window_s * 1000 + 1,
            end,
            &[(0, "__name__", "node_load1"), (0, "df_host", "127.0.0.1")],
        )],
        &[0],
    );
    let read = common::decode_read(&common::remote_read_raw(agent.query_port, &body), 1);
    assert_eq!(read[0].len(), 1, "one node_load1 series, tagged");
    assert_eq!(read[0][0].samples, w_samples);
    let non_2xx: f64 = agent
        .metrics()
        .lines()
        .filter(|l| {
            l.starts_with("promgate_agent_receive_requests_total") && !l.contains("code=\"2")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(non_2xx, 0.0);
    let _ = Command::new("kill")
        .args(["-CONT", &p.0.id().to_string()])
        .status();
}

/// `data.result` of a query API answer, each series as (sorted labels JSON, values),
/// sorted by labels.
fn result(port: u16, path: &str) -> Vec<(String, serde_json::Value)> {
    let text = get(port, path).unwrap_or_else(|| panic!("query {path} on :{port} failed"));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["status"], "success", "{text}");
    let mut out: Vec<(String, serde_json::Value)> = v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let values = s.get("values").or_else(|| s.get("value")).unwrap().clone();
            (s["metric"].to_string(), values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The same PromQL on A (its own TSDB) and B (promgate via remote_read) over a window
/// that A had already sent and the agent had already shipped.
fn compare_promql(a_port: u16, b_port: u16, agent: &Agent, started: f64) {
    let highest = |port| {
        get(port, "/metrics").map(|t| {
            metric_sum(
                &t,
                "prometheus_remote_storage_queue_highest_sent_timestamp_seconds",
            )
        })
    };
    // The window ends well before the newest sample A has sent (its queue shards send
    // independently), and everything the agent took has reached the store.
    // Let A build up 20 s of sent history to compare.
    wait_for(
        "A to have sent 25 s of samples",
        Duration::from_secs(90),
        || highest(a_port).unwrap_or(0.0) >= started + 25.0,
    );
    let sent = highest(a_port).unwrap();
    let end = sent.floor() - 5.0;
    std::thread::sleep(Duration::from_secs(2));
    wait_shipped(agent);
    let start = end - 15.0;
    let queries = [
        "up",
        "node_load1",
        r#"node_cpu_seconds_total{mode=~"idle|user"}"#,
        "rate(node_cpu_seconds_total[5s])",
        "sum by (mode) (rate(node_cpu_seconds_total[5s]))",
        r#"count({__name__=~"node_.+"})"#,
        r#"count by (job) ({__name__=~".+"})"#,
        r#"prometheus_http_requests_total{handler=~"/met.*"}"#,
    ];
    for q in queries {
        let range = format!(
            "/api/v1/query_range?query={}&start={start}&end={end}&step=1",
            encode(q)
        );
        let instant = format!("/api/v1/query?query={}&time={end}", encode(q));
        for path in [range, instant] {
            let (a, b) = (result(a_port, &path), result(b_port, &path));
            assert!(!a.is_empty(), "{q}: A returned nothing for {path}");
            assert_eq!(
                a.iter().map(|x| &x.0).collect::<Vec<_>>(),
                b.iter().map(|x| &x.0).collect::<Vec<_>>(),
                "{q}: different series on A and B ({path})"
            );
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.1, y.1, "{q}: values of {} differ ({path})", x.0);
            }
        }
    }
    // B really read through promgate (Prometheus 2.42's client asks for SAMPLES only).
    let server = get(agent.query_port, "/metrics").unwrap();
    let samples = metric_sum(&server, "promgate_server_read_requests_samples_total");
    let chunks = metric_sum(&server, "promgate_server_read_requests_chunks_total");
    eprintln!("remote_read requests from B: {samples} SAMPLES, {chunks} STREAMED_XOR_CHUNKS");
    assert!(samples + chunks >= queries.len() as f64);
}
