//! Every status the receive path can give, against the real binary, each followed by a
//! valid request on the same keep-alive connection; another connection opened first
//! must still work at the end; the agent's sample counter must equal what was accepted.

mod common;

use common::{golden, metric_sum, Agent, Client, V1, V2};
use promgate_proto::messages::v2;
use prost::Message;
use std::io::Write;

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
    status: u16,
    /// Expected 2.0 Written headers (samples, histograms, exemplars); None: must be absent.
    written: Option<(u64, u64, u64)>,
    /// Text the response body must contain.
    says: &'static str,
    /// Float samples this request adds to the agent's accepted count.
    accepted: u64,
}

fn golden_raw(name: &str) -> Vec<u8> {
    snap::raw::Decoder::new()
        .decompress_vec(&golden(name))
        .unwrap()
}

fn snappy(raw: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new().compress_vec(raw).unwrap()
}

fn with(
    base: &[(&'static str, &'static str)],
    replace: &[(&'static str, &'static str)],
) -> Vec<(&'static str, &'static str)> {
    let mut h: Vec<_> = base
        .iter()
        .filter(|(n, _)| !replace.iter().any(|(r, _)| r == n))
        .copied()
        .collect();
    h.extend_from_slice(replace);
    h
}

fn cases() -> Vec<Case> {
    let v1_basic = golden("v1_basic.bin");
    let mut bomb = Vec::new();
    let mut n: u64 = 1 << 30;
    while n >= 0x80 {
        bomb.push((n as u8) | 0x80);
        n >>= 7;
    }
    bomb.push(n as u8);
    let empty_v2 = snappy(
        &v2::Request {
            symbols: vec![String::new()],
            timeseries: vec![],
        }
        .encode_to_vec(),
    );
    let c =
        |name, method, path, headers: Vec<_>, body: Vec<u8>, status, written, says, accepted| {
            Case {
                name,
                method,
                path,
                headers,
                body,
                status,
                written,
                says,
                accepted,
            }
        };
    vec![
        c(
            "v1 ok",
            "POST",
            "/api/v1/prometheus",
            V1.to_vec(),
            v1_basic.clone(),
            204,
            None,
            "",
            6,
        ),
        c(
            "v1 ok on /api/v1/write",
            "POST",
            "/api/v1/write",
            V1.to_vec(),
            v1_basic.clone(),
            204,
            None,
            "",
            6,
        ),
        c(
            "v1 without content headers",
            "POST",
            "/api/v1/write",
            vec![],
            v1_basic.clone(),
            204,
            None,
            "",
            6,
        ),
        c(
            "v1 histograms and exemplars",
            "POST",
            "/api/v1/write",
            V1.to_vec(),
            golden("v1_histograms_exemplars.bin"),
            204,
            None,
            "",
            1,
        ),
        c(
            "v2 ok",
            "POST",
            "/api/v1/write",
            V2.to_vec(),
            golden("v2_basic.bin"),
            204,
            Some((2, 2, 1)),
            "",
            2,
        ),
        c(
            "json",
            "POST",
            "/api/v1/write",
            with(V1, &[("Content-Type", "application/json")]),
            b"{}".to_vec(),
            415,
            None,
            "Content-Type",
            0,
        ),
        c(
            "png",
            "POST",
            "/api/v1/write",
            with(V1, &[("Content-Type", "image/png")]),
            v1_basic.clone(),
            415,
            None,
            "Content-Type",
            0,
        ),
        c(
            "unknown proto",
            "POST",
            "/api/v1/write",
            with(
                V1,
                &[("Content-Type", "application/x-protobuf;proto=foo.Bar")],
            ),
            v1_basic.clone(),
            415,
            None,
            "Content-Type",
            0,
        ),
        c(
            "gzip",
            "POST",
            "/api/v1/write",
            with(V1, &[("Content-Encoding", "gzip")]),
            v1_basic.clone(),
            415,
            None,
            "Content-Encoding",
            0,
        ),
        c(
            "v2 deflate",
            "POST",
            "/api/v1/write",
            with(V2, &[("Content-Encoding", "deflate")]),
            v1_basic.clone(),
            415,
            Some((0, 0, 0)),
            "Content-Encoding",
            0,
        ),
        c(
            "corrupt snappy",
            "POST",
            "/api/v1/write",
            V1.to_vec(),
            {
                let v = snappy(&golden_raw("v1_basic.bin"));
                v[..v.len() - 5].to_vec()
            },
            400,
            None,
            "snappy",
            0,
        ),
        c(
            "corrupt protobuf",
            "POST",
            "/api/v1/write",
            V1.to_vec(),
            snappy(b"\x0a\xff\x01garbage"),
            400,
            None,
            "corrupt protobuf",
            0,
        ),
        c(
            "v2 corrupt protobuf",
            "POST",
            "/api/v1/write",
            V2.to_vec(),
            snappy(b"\x2a\x05ab"),
            400,
            Some((0, 0, 0)),
            "corrupt protobuf",
            0,
        ),
        c(
            "v1 invalid series",
            "POST",
            "/api/v1/write",
            V1.to_vec(),
            golden("v1_mixed_invalid.bin"),
            400,
            None,
            "series 1 {job=\"no_name\"}: no __name__ label",
            2,
        ),
        c(
            "v2 invalid series",
            "POST",
            "/api/v1/write",
            V2.to_vec(),
            golden("v2_mixed_invalid.bin"),
            400,
            Some((1, 0, 0)),
            "4 of 5 series rejected",
            1,
        ),
        c(
            "v2 empty",
            "POST",
            "/api/v1/write",
            V2.to_vec(),
            empty_v2,
            400,
            Some((0, 0, 0)),
            "empty request",
            0,
        ),
        c(
            "snappy bomb",
            "POST",
            "/api/v1/write",
            V1.to_vec(),
            bomb,
            413,
            None,
            "over the limit",
            0,
        ),
        c(
            "body over limit",
            "POST",
            "/api/v1/write",
            V1.to_vec(),
            vec![7u8; 100_000],
            413,
            None,
            "over the limit",
            0,
        ),
        c(
            "v2 body over limit",
            "POST",
            "/api/v1/write",
            V2.to_vec(),
            vec![7u8; 100_000],
            413,
            Some((0, 0, 0)),
            "over the limit",
            0,
        ),
        c(
            "GET on write",
            "GET",
            "/api/v1/write",
            vec![],
            vec![],
            405,
            None,
            "POST",
            0,
        ),
        c(
            "POST on metrics",
            "POST",
            "/metrics",
            vec![],
            b"x".to_vec(),
            405,
            None,
            "GET",
            0,
        ),
        c(
            "unknown path",
            "GET",
            "/nope",
            vec![],
            vec![],
            404,
            None,
            "not found",
            0,
        ),
        c(
            "unknown path with body",
            "POST",
            "/api/v2/write",
            V1.to_vec(),
            v1_basic.clone(),
            404,
            None,
            "not found",
            0,
        ),
        c(
            "healthy",
            "GET",
            "/-/healthy",
            vec![],
            vec![],
            200,
            None,
            "OK",
            0,
        ),
        c(
            "ready",
            "GET",
            "/-/ready",
            vec![],
            vec![],
            200,
            None,
            "ready",
            0,
        ),
        c(
            "metrics",
            "GET",
            "/metrics?x=1",
            vec![],
            vec![],
            200,
            None,
            "promgate_agent_decode_samples_total",
            0,
        ),
    ]
}

#[test]
fn every_status_keeps_the_connection_and_others_alive() {
    let agent = Agent::start(
        "http",
        &[
            "--shards",
            "2",
            "--body-bytes-max",
            "65536",
            "--decoded-bytes-max",
            "1048576",
        ],
    );
    let mut bystander = Client::connect(agent.port).unwrap();
    let mut conn = Client::connect(agent.port).unwrap();
    let ok_body = golden("v1_basic.bin");
    let mut accepted = 0u64;
    for case in cases() {
        let r = conn
            .request(case.method, case.path, &case.headers, &case.body)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(r.status, case.status, "{}: {}", case.name, r.text());
        assert!(
            r.text().contains(case.says),
            "{}: body {:?} lacks {:?}",
            case.name,
            r.text(),
            case.says
        );
        let written = ["Samples", "Histograms", "Exemplars"].map(|k| {
            r.header(&format!("X-Prometheus-Remote-Write-{k}-Written"))
                .map(|v| v.parse::<u64>().unwrap())
        });
        match case.written {
            Some((s, h, e)) => assert_eq!(
                written,
                [Some(s), Some(h), Some(e)],
                "{}: Written headers",
                case.name
            ),
            None => assert_eq!(
                written,
                [None, None, None],
                "{}: 1.0 answers carry no Written headers",
                case.name
            ),
        }
        if case.status == 405 {
            assert!(
                r.header("Allow").is_some(),
                "{}: 405 without Allow",
                case.name
            );
        }
        if case.status == 204 {
            assert!(r.body.is_empty(), "{}: 204 with a body", case.name);
        }
        accepted += case.accepted;
        // The same connection serves the next request.
        let again = conn
            .request("POST", "/api/v1/write", V1, &ok_body)
            .unwrap_or_else(|e| panic!("after {}: {e}", case.name));
        assert_eq!(again.status, 204, "after {}: {}", case.name, again.text());
        accepted += 6;
    }
    let r = bystander
        .request("POST", "/api/v1/prometheus", V1, &ok_body)
        .unwrap();
    assert_eq!(r.status, 204, "the other connection still works");
    accepted += 6;
    let text = agent.metrics();
    assert_eq!(
        metric_sum(&text, "promgate_agent_decode_samples_total"),
        accepted as f64,
        "samples counted once each"
    );
    assert!(metric_sum(&text, "promgate_agent_decode_series_rejected_total") >= 7.0);
    assert!(metric_sum(&text, "promgate_agent_receive_rejected_total") >= 12.0);
}

#[test]
fn chunked_and_pipelined_requests() {
    let agent = Agent::start("chunked", &["--shards", "1"]);
    let mut conn = Client::connect(agent.port).unwrap();
    let body = golden("v1_basic.bin");
    let (a, b) = body.split_at(body.len() / 2);
    let mut req = b"POST /api/v1/write HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: application/x-protobuf\r\n\r\n".to_vec();
    for part in [a, b] {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    // Two requests in one write: the second must not be lost.
    let mut two = req.clone();
    two.extend_from_slice(&req);
    assert_eq!(conn.raw(&two).unwrap().status, 204);
    assert_eq!(conn.read_response().unwrap().status, 204);
    assert_eq!(
        metric_sum(&agent.metrics(), "promgate_agent_decode_samples_total"),
        12.0
    );
}

#[test]
fn malformed_head_gets_400_and_others_keep_working() {
    let agent = Agent::start("malformed", &["--shards", "1"]);
    let mut bad = Client::connect(agent.port).unwrap();
    let r = bad.raw(b"\x16\x03\x01 not http at all\r\n\r\n").unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.header("Connection"), Some("close"));
    let mut good = Client::connect(agent.port).unwrap();
    assert_eq!(
        good.request("POST", "/api/v1/write", V1, &golden("v1_basic.bin"))
            .unwrap()
            .status,
        204
    );
}

#[test]
fn connection_limit_answers_503_with_retry_after() {
    let agent = Agent::start(
        "connlimit",
        &["--shards", "1", "--connections-per-shard-max", "1"],
    );
    // The readiness probes' connections may still be closing on the agent's side: wait
    // until a connection is admitted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut first = loop {
        let mut c = Client::connect(agent.port).unwrap();
        if c.request("GET", "/-/healthy", &[], b"")
            .is_ok_and(|r| r.status == 200)
        {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no connection was ever admitted"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut second = Client::connect(agent.port).unwrap();
    let r = second.read_response().unwrap();
    assert_eq!(r.status, 503);
    assert!(r.header("Retry-After").is_some());
    assert_eq!(
        first.request("GET", "/-/healthy", &[], b"").unwrap().status,
        200,
        "the admitted connection is unaffected"
    );
}

#[test]
fn check_config_accepts_the_shipped_file_and_names_bad_keys() {
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_promgate"))
        .args(["agent", "--check-config", "--config"])
        .arg(common::repo_root().join("config/agent.toml"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("config OK"));
    let dir = common::temp_dir("badconfig");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[receive]\nbody_bytes_max = 5\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_promgate"))
        .args(["agent", "--check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("receive.body_bytes_max"));
}

#[test]
fn too_little_locked_memory_exits_with_one_clear_line() {
    let dir = common::temp_dir("memlock");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -l 64 && exec {} agent --listen 127.0.0.1:{} --data-dir {}",
            env!("CARGO_BIN_EXE_promgate"),
            common::free_port(),
            dir.display()
        ))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the agent must not run without enough locked memory"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("promgate: error:"))
        .unwrap_or_else(|| panic!("no error line in {stderr}"));
    assert!(line.contains("locked-memory limit is 64 KiB"), "{line}");
    assert!(
        line.contains("ulimit -l unlimited") && line.contains("LimitMEMLOCK=infinity"),
        "{line}"
    );
}

#[test]
fn a_stalled_request_gets_408_and_an_idle_connection_is_closed() {
    let agent = Agent::start(
        "timeouts",
        &[
            "--shards",
            "1",
            "--read-timeout-ms",
            "300",
            "--idle-timeout-ms",
            "600",
        ],
    );
    // Half a head, then nothing: 408 once the read timeout passes, and the connection closes.
    let mut stalled = Client::connect(agent.port).unwrap();
    let t = std::time::Instant::now();
    let r = stalled
        .raw(b"POST /api/v1/write HTTP/1.1\r\nContent-Le")
        .unwrap();
    assert_eq!(r.status, 408, "{}", r.text());
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(250),
        "answered before the timeout"
    );
    // Half a body, then nothing: the same.
    let mut slow_body = Client::connect(agent.port).unwrap();
    let r = slow_body
        .raw(b"POST /api/v1/write HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly a part")
        .unwrap();
    assert_eq!(r.status, 408, "{}", r.text());
    // An idle keep-alive connection is closed after the idle timeout, without an answer.
    let mut idle = Client::connect(agent.port).unwrap();
    assert_eq!(
        idle.request("GET", "/-/healthy", &[], b"").unwrap().status,
        200
    );
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let closed = idle.request("GET", "/-/healthy", &[], b"");
    assert!(
        closed.is_err(),
        "the idle connection was still open: {closed:?}"
    );
    // Others are unaffected.
    let mut fresh = Client::connect(agent.port).unwrap();
    assert_eq!(
        fresh.request("GET", "/-/healthy", &[], b"").unwrap().status,
        200
    );
}

#[test]
fn check_config_validates_the_enrich_section() {
    let dir = common::temp_dir("enrichconfig");
    let run = |text: &str| {
        let f = dir.join("enrich.toml");
        std::fs::write(&f, text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_promgate"))
            .args(["agent", "--check-config", "--config"])
            .arg(&f)
            .output()
            .unwrap()
    };
    let ok = run("[enrich]\nprometheus_http_api_addresses = [\"http://127.0.0.1:9090\"]\nsync_interval = \"10s\"\n[enrich.custom_tags]\nregion = \"eu-1\"\n");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("(\"region\", \"eu-1\")"));
    for (text, names) in [
        (
            "[enrich]\nprometheus_http_api_addresses = [\"https://x:9090\"]\n",
            "http://",
        ),
        (
            "[enrich]\nsync_interval = \"soon\"\n",
            "enrich.sync_interval",
        ),
        ("[enrich.custom_tags]\n\"bad-name\" = \"x\"\n", "bad-name"),
        (
            "[enrich.custom_tags]\nempty = \"\"\n",
            "enrich.custom_tags.empty",
        ),
    ] {
        let out = run(text);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(names),
            "{text}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Request bodies are bounded per shard, not per connection: while one connection holds
/// most of `receive.bodies_bytes_max` for a large body still arriving, another large body
/// gets 503 with Retry-After (its connection kept), and once the first request is done
/// its buffer is given back and the same body goes through.
#[test]
fn bodies_over_the_shard_budget_get_503_until_the_budget_comes_back() {
    let agent = Agent::start_with_config(
        "bodybudget",
        "[receive]\nbody_bytes_max = 1048576\nbodies_bytes_max = 1048576\n",
    );
    let body = vec![0x55u8; 800_000];
    let head = format!(
        "POST /api/v1/write HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Encoding: snappy\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let held = |a: &Agent| metric_sum(&a.metrics(), "promgate_agent_receive_body_bytes_held");
    // First: the head and a little of the body; it reserves ~540 KB of the 1 MiB.
    let mut first = Client::connect(agent.port).unwrap();
    first.stream.write_all(head.as_bytes()).unwrap();
    first.stream.write_all(&body[..100]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while held(&agent) < 500_000.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first body was never reserved"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut whole = head.clone().into_bytes();
    whole.extend_from_slice(&body);
    let mut second = Client::connect(agent.port).unwrap();
    let r = second.raw(&whole).unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("Retry-After").is_some());
    assert!(r.text().contains("bodies_bytes_max"), "{}", r.text());
    // The first request completes (its body is not snappy: 400, past the budget).
    first.stream.write_all(&body[100..]).unwrap();
    let r = first.read_response().unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(held(&agent), 0.0, "the first body's buffer was given back");
    // The refused connection still works, and now its body fits.
    let r = second.raw(&whole).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    let m = agent.metrics();
    let rejected = m
        .lines()
        .filter(|l| {
            l.starts_with("promgate_agent_receive_rejected_total") && l.contains("body_budget")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum::<f64>();
    assert_eq!(rejected, 1.0);
}
