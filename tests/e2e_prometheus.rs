//! End to end with real components: Debian's `prometheus` scrapes itself and
//! `prometheus-node-exporter` on 127.0.0.1 and remote_writes to the agent; the agent's
//! count of accepted samples must equal Prometheus's own
//! `prometheus_remote_storage_samples_total`, with nothing failed, retried or dropped.
//!
//! The binaries must be on PATH: `scripts/test.sh` installs them
//! (`apt-get install -y prometheus prometheus-node-exporter`).

mod common;

use common::{free_port, metric_sum, start_prometheus, temp_dir, Agent, Client, Proc};
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
    let agent = Agent::start("e2e-agent", &["--shards", "2"]);

    let node_port = free_port();
    let _node = Proc(
        Command::new("prometheus-node-exporter")
            .arg(format!("--web.listen-address=127.0.0.1:{node_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("node.log")).unwrap())
            .spawn()
            .expect("start node exporter"),
    );
    let prom_port = free_port();
    let config = format!(
        r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: prometheus
    static_configs: [{{targets: ["127.0.0.1:{prom_port}"]}}]
  - job_name: node
    static_configs: [{{targets: ["127.0.0.1:{node_port}"]}}]
remote_write:
  - url: http://127.0.0.1:{agent_port}/api/v1/prometheus
    queue_config:
      batch_send_deadline: 1s
      max_shards: 4
    metadata_config:
      send_interval: 2s
"#,
        agent_port = agent.port
    );
    let _prom = start_prometheus(&dir, prom_port, &config);

    let prom_metric = |name: &str| get(prom_port, "/metrics").map(|t| metric_sum(&t, name));
    // Real traffic: several scrapes of both targets have been shipped.
    wait_for(
        "Prometheus to send 5000 samples",
        Duration::from_secs(90),
        || prom_metric("prometheus_remote_storage_samples_total").unwrap_or(0.0) >= 5000.0,
    );
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
}
