//! The WAL with the real binaries: a 2xx means durable. `promgate-loadtest` drives the
//! agent and logs every request answered 2xx; whatever happens to the agent (SIGKILL
//! mid-stream, its disk budget reached, its disk full), `promgate wal inspect --dump`
//! must then show every acknowledged sample, bit for bit, staleness markers included.

mod common;

use common::{free_port, metric_sum, temp_dir, Agent, Client, V1};
use promgate_loadtest::{
    acked_samples, replay_ack_log, AckedSample, BodyTemplate, GenParams, Protocol,
};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;
/// Ship to an address where nothing listens: these tests look at the WAL itself, so
/// nothing may be shipped and truncated away under them.
const UNSHIPPED: &str = "127.0.0.1:9";

/// `wal inspect --dump` as a set of `{labels} ts=T bits=B` keys; also checks that
/// plain `wal inspect` finds no corruption.
fn dumped(data_dir: &Path) -> HashSet<String> {
    let check = inspect(data_dir, false);
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "wal inspect found problems:\n{report}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!report.contains("CORRUPT"), "{report}");
    let out = inspect(data_dir, true);
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.contains(" histogram ") && !l.contains(" metadata "))
        .map(|l| {
            let labels_start = l.find('{').expect("labels");
            let ts = l.rfind(" ts=").expect("ts");
            let value = l.rfind(" value=").expect("value");
            let bits = l.rfind(" bits=").expect("bits");
            format!("{}{}{}", &l[labels_start..ts], &l[ts..value], &l[bits..])
        })
        .collect()
}

/// `promgate wal inspect` (with `--dump` if `dump`) on `data_dir`.
fn inspect(data_dir: &Path, dump: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_promgate"));
    cmd.args(["wal", "inspect"]);
    if dump {
        cmd.arg("--dump");
    }
    cmd.arg("--data-dir").arg(data_dir).output().unwrap()
}

fn key(s: &AckedSample) -> String {
    let labels: Vec<String> = s.labels.iter().map(|(n, v)| format!("{n}={v:?}")).collect();
    format!(
        "{{{}}} ts={} bits={:016x}",
        labels.join(", "),
        s.timestamp_ms,
        s.value.to_bits()
    )
}

fn assert_all_present(acked: &[AckedSample], on_disk: &HashSet<String>) {
    let missing: Vec<String> = acked
        .iter()
        .map(key)
        .filter(|k| !on_disk.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged samples are not in the WAL, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(3)]
    );
}

#[test]
fn sigkill_mid_stream_loses_no_acknowledged_sample() {
    let dir = temp_dir("wal-crash");
    let data = dir.join("data");
    let port = free_port();
    let mut agent = Agent::start_in(&dir, &data, port, &["--shards", "2", "--server", UNSHIPPED]);
    let acks = dir.join("acks.log");
    let mut load = common::loadtest_command(port, &dir, &acks)
        .args([
            "--connections",
            "4",
            "--duration",
            "5",
            "--rate",
            "60000",
            "--series",
            "4000",
            "--samples-per-request",
            "500",
        ])
        .spawn()
        .unwrap();
    // Let it run, then kill the agent the hard way while requests are in flight.
    std::thread::sleep(Duration::from_millis(1500));
    let before_kill = metric_sum(
        &agent.metrics(),
        "promgate_agent_wal_appended_records_total",
    );
    assert!(before_kill > 0.0, "nothing was written before the kill");
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    // Restart on the same data: recovery, then the harness reconnects and goes on.
    let agent = Agent::start_in(&dir, &data, port, &["--shards", "2", "--server", UNSHIPPED]);
    let recovered = metric_sum(
        &agent.metrics(),
        "promgate_agent_wal_recovered_records_total",
    );
    assert!(
        recovered >= before_kill,
        "recovered {recovered} records, but {before_kill} were durable before the kill"
    );
    assert!(
        load.wait().unwrap().success(),
        "the harness failed: {}",
        std::fs::read_to_string(dir.join("loadtest.log")).unwrap()
    );
    drop(agent);

    let acked = replay_ack_log(&std::fs::read_to_string(&acks).unwrap()).unwrap();
    assert!(
        acked.len() > 10_000,
        "too little load to mean anything: {} samples acknowledged",
        acked.len()
    );
    assert!(
        acked.iter().any(|s| s.value.to_bits() == STALE_NAN_BITS),
        "the load carried no staleness markers"
    );
    let on_disk = dumped(&data);
    assert_all_present(&acked, &on_disk);

    // A spare file renamed to a new segment whose new header never reached the disk
    // (here: a copy of the oldest segment, named after the newest): inspect says what
    // it is and counts none of its old records.
    use promgate_shards::wal::format::segment_file_name;
    use promgate_shards::wal::storage::list_segments;
    let shard = data.join("wal").join("shard-0");
    let segments = list_segments(&shard).unwrap();
    let renamed = shard.join(segment_file_name(segments.last().unwrap() + 1_000_000));
    std::fs::copy(shard.join(segment_file_name(segments[0])), &renamed).unwrap();
    let dump_lines = || {
        let out = inspect(&data, true);
        String::from_utf8(out.stdout).unwrap().lines().count()
    };
    let with_spare = dump_lines();
    let report = String::from_utf8_lossy(&inspect(&data, false).stdout).to_string();
    assert!(
        report.contains("a spare file whose new header never became durable"),
        "{report}"
    );
    std::fs::remove_file(&renamed).unwrap();
    assert_eq!(
        with_spare,
        dump_lines(),
        "inspect counted the spare's old records"
    );
    assert_eq!(dumped(&data), on_disk);
}

/// A realistic body and the samples it carries after patching for `round`.
fn body(round: u64) -> (Vec<u8>, Vec<AckedSample>) {
    let params = GenParams {
        seed: 7,
        labels_per_series: 10,
        samples_per_series: 1,
    };
    let start_ms = 1_700_000_000_000;
    let t = BodyTemplate::build(&params, Protocol::V1, 0, 300, start_ms);
    let mut bytes = t.compressed.clone();
    t.patch(&mut bytes, start_ms, round);
    (
        bytes,
        acked_samples(&params, &t.ack_record(0, round, start_ms)),
    )
}

/// Sends the body of `round`, which must be accepted, and records its samples.
fn send_accepted(client: &mut Client, round: u64, acked: &mut Vec<AckedSample>) {
    let (b, samples) = body(round);
    let r = client.request("POST", "/api/v1/write", V1, &b).unwrap();
    assert_eq!(r.status, 204, "round {round}: {}", r.text());
    acked.extend(samples);
}

/// Sends bodies until one is refused; returns the samples of those answered 204.
fn fill_until_refused(
    client: &mut Client,
    first_round: u64,
    limit: u64,
) -> (Vec<AckedSample>, common::Response, u64) {
    let mut acked = Vec::new();
    for round in first_round..first_round + limit {
        let (b, samples) = body(round);
        let r = client.request("POST", "/api/v1/write", V1, &b).unwrap();
        if r.status != 204 {
            return (acked, r, round);
        }
        acked.extend(samples);
    }
    panic!("{limit} requests were all accepted; the limit was never reached");
}

#[test]
fn disk_budget_answers_503_with_retry_after_and_keeps_everything() {
    let dir = temp_dir("wal-budget");
    let data = dir.join("data");
    let port = free_port();
    let small = [
        "--shards",
        "1",
        "--wal-max-bytes",
        "262144",
        "--wal-segment-bytes",
        "65536",
        "--server",
        UNSHIPPED,
    ];
    let agent = Agent::start_in(&dir, &data, port, &small);
    let mut client = Client::connect(port).unwrap();
    let (mut acked, refused, round) = fill_until_refused(&mut client, 0, 1000);
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused
            .header("Retry-After")
            .is_some_and(|v| v.parse::<u32>().is_ok()),
        "503 without Retry-After"
    );
    assert!(refused.text().contains("disk budget"), "{}", refused.text());
    // Refused again while full; the connection and the rest of the agent keep working.
    assert_eq!(
        client
            .request("POST", "/api/v1/write", V1, &body(round).0)
            .unwrap()
            .status,
        503
    );
    assert_eq!(
        client
            .request("GET", "/-/healthy", &[], b"")
            .unwrap()
            .status,
        200
    );
    assert!(metric_sum(&agent.metrics(), "promgate_agent_wal_backpressure_total") >= 2.0);
    drop(agent);
    // Space returns (here: a larger budget): accepted again, and nothing was lost.
    let agent = Agent::start_in(
        &dir,
        &data,
        port,
        &[
            "--shards",
            "1",
            "--wal-max-bytes",
            "1048576",
            "--server",
            UNSHIPPED,
        ],
    );
    let mut client = Client::connect(port).unwrap();
    send_accepted(&mut client, round, &mut acked);
    drop(agent);
    assert_all_present(&acked, &dumped(&data));
}

#[test]
fn full_disk_answers_503_and_recovers_when_space_returns() {
    let dir = temp_dir("wal-enospc");
    let mnt = dir.join("mnt");
    let _guard = common::Tmpfs::mount(&mnt, "2m");
    // Most of the space is taken by something else.
    std::fs::write(mnt.join("filler"), vec![1u8; 1536 * 1024]).unwrap();
    let data = mnt.join("data");
    let port = free_port();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        "[wal]\nretry_after_s = 1\nsegment_bytes = 131072\n",
    )
    .unwrap();
    let agent = Agent::start_in(
        &dir,
        &data,
        port,
        &[
            "--shards",
            "1",
            "--config",
            config.to_str().unwrap(),
            "--server",
            UNSHIPPED,
        ],
    );
    let mut client = Client::connect(port).unwrap();
    let (mut acked, refused, round) = fill_until_refused(&mut client, 0, 200);
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused.header("Retry-After").is_some(),
        "503 without Retry-After"
    );
    assert!(
        refused.text().contains("No space left"),
        "{}",
        refused.text()
    );
    assert!(metric_sum(&agent.metrics(), "promgate_agent_wal_write_errors_total") >= 1.0);
    assert_eq!(
        client.request("GET", "/-/ready", &[], b"").unwrap().status,
        200,
        "the agent stays up"
    );
    // Space returns: within a few retry intervals the same request is accepted.
    std::fs::remove_file(mnt.join("filler")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let (b, samples) = body(round);
    loop {
        let r = client.request("POST", "/api/v1/write", V1, &b).unwrap();
        if r.status == 204 {
            acked.extend(samples);
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(
            Instant::now() < deadline,
            "still refused after space returned: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // And the following ones go through normally.
    for r in round + 1..round + 4 {
        send_accepted(&mut client, r, &mut acked);
    }
    drop(agent);
    assert_all_present(&acked, &dumped(&data));
}
