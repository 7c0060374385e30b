//! The whole promgate path in one process (agent + embedded server): what the load
//! harness had acknowledged comes back from remote_read, sample for sample, in both
//! response types; matchers, the sample limit, bad requests and the label/series APIs.

mod common;

use common::{
    acked_keys, by_key, decode_read, free_port, loadtest_binary, metric_sum, query, read_request,
    remote_read_raw, temp_dir, wait_shipped, Agent, Client, Key, ReadSeries,
};
use promgate_loadtest::replay_ack_log;
use promgate_proto::messages::read::{
    MATCH_EQ, MATCH_NEQ, MATCH_NRE, MATCH_RE, RESPONSE_SAMPLES, RESPONSE_STREAMED_XOR_CHUNKS,
};
use std::process::{Command, Stdio};

#[test]
fn acknowledged_samples_come_back_through_remote_read_in_both_response_types() {
    let dir = temp_dir("server-read");
    let config = dir.join("agent.toml");
    std::fs::write(&config, "[server]\nread_samples_max = 150000\n").unwrap();
    let port = free_port();
    let agent = Agent::start_in(
        &dir,
        &dir.join("data"),
        port,
        &["--shards", "2", "--config", config.to_str().unwrap()],
    );
    let acks = dir.join("acks.log");
    let status = Command::new(loadtest_binary())
        .args([
            "--url",
            &format!("http://127.0.0.1:{port}/api/v1/prometheus"),
        ])
        .args([
            "--connections",
            "2",
            "--series",
            "500",
            "--samples-per-request",
            "250",
        ])
        .args([
            "--max-requests",
            "400",
            "--duration",
            "30",
            "--start-ms",
            &common::recent_ms().to_string(),
        ])
        .arg("--ack-log")
        .arg(&acks)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("loadtest.log")).unwrap())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(dir.join("loadtest.log")).unwrap()
    );
    let acked = replay_ack_log(&std::fs::read_to_string(&acks).unwrap()).unwrap();
    assert_eq!(acked.len(), 100_000, "400 requests x 250 samples");
    wait_shipped(&agent);
    let q = agent.query_port;

    // Everything, in both response types: the same series, sorted, sample for sample.
    let all = || query(0, 1_800_000_000_000, &[(MATCH_RE, "__name__", ".+")]);
    let samples = decode_read(
        &remote_read_raw(q, &read_request(vec![all()], &[RESPONSE_SAMPLES])),
        1,
    );
    let chunks = decode_read(
        &remote_read_raw(
            q,
            &read_request(
                vec![all()],
                &[RESPONSE_STREAMED_XOR_CHUNKS, RESPONSE_SAMPLES],
            ),
        ),
        1,
    );
    assert_eq!(samples, chunks, "SAMPLES and STREAMED_XOR_CHUNKS disagree");
    let mut sorted = samples[0].clone();
    sorted.sort_by(|a, b| a.labels.cmp(&b.labels));
    assert_eq!(sorted, samples[0], "series are not sorted by labels");
    assert_eq!(samples[0].len(), 500);
    let stored = by_key(&samples[0]);
    let want = acked_keys(&acked);
    let missing: Vec<&Key> = want.keys().filter(|k| !stored.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged samples missing, e.g. {:?}",
        missing.len(),
        &missing[..1]
    );
    for (k, bits) in &want {
        assert_eq!(stored[k], *bits, "value of {k:?} (bit-exact)");
    }
    assert_eq!(
        stored.len(),
        want.len(),
        "samples stored that were never acknowledged"
    );
    assert!(
        want.values().any(|b| *b == 0x7ff0_0000_0000_0002),
        "no staleness markers in the load"
    );

    // Several queries in one request, each answered in order; time windows cut samples.
    let one = &samples[0][7];
    let name = one
        .labels
        .iter()
        .find(|(n, _)| n == "__name__")
        .unwrap()
        .1
        .clone();
    let (t0, t1) = (one.samples[10].0, one.samples[20].0);
    let eqs: Vec<(i32, &str, &str)> = one
        .labels
        .iter()
        .map(|(n, v)| (MATCH_EQ, n.as_str(), v.as_str()))
        .collect();
    for accepted in [[RESPONSE_SAMPLES], [RESPONSE_STREAMED_XOR_CHUNKS]] {
        let body = read_request(
            vec![
                query(t0, t1, &eqs),
                query(0, 1_800_000_000_000, &[(MATCH_EQ, "__name__", &name)]),
            ],
            &accepted,
        );
        let r = decode_read(&remote_read_raw(q, &body), 2);
        assert_eq!(r[0].len(), 1);
        assert_eq!(r[0][0].labels, one.labels);
        if accepted[0] == RESPONSE_SAMPLES {
            assert_eq!(r[0][0].samples, one.samples[10..=20].to_vec());
        } else {
            // Chunks overlapping the window come whole; the client cuts them.
            let cut: Vec<(i64, u64)> = r[0][0]
                .samples
                .iter()
                .copied()
                .filter(|(t, _)| (t0..=t1).contains(t))
                .collect();
            assert_eq!(cut, one.samples[10..=20].to_vec());
        }
        let same_name = samples[0]
            .iter()
            .filter(|s| s.labels.iter().any(|l| l.0 == "__name__" && l.1 == name))
            .count();
        assert_eq!(r[1].len(), same_name);
    }

    // Matcher semantics on real data: anchored regexes, != and !~.
    let count = |ms: &[(i32, &str, &str)]| {
        decode_read(
            &remote_read_raw(q, &read_request(vec![query(0, 1_800_000_000_000, ms)], &[])),
            1,
        )[0]
        .len()
    };
    let prefix = &name[..name.len() - 1];
    assert_eq!(
        count(&[(MATCH_RE, "__name__", prefix)]),
        0,
        "regex matched a prefix: not anchored"
    );
    assert_eq!(
        count(&[(MATCH_RE, "__name__", &format!("{prefix}."))]),
        count(&[(MATCH_EQ, "__name__", &name)])
    );
    assert_eq!(
        count(&[(MATCH_RE, "__name__", ".+"), (MATCH_NEQ, "__name__", &name)])
            + count(&[(MATCH_EQ, "__name__", &name)]),
        500
    );
    assert_eq!(
        count(&[(MATCH_RE, "__name__", ".+"), (MATCH_NRE, "__name__", ".*")]),
        0
    );

    // Over the sample limit: 413 with a reason, not an exhausted server.
    let wide = query(0, 1_800_000_000_000, &[(MATCH_RE, "__name__", ".+")]);
    let r = remote_read_raw(
        q,
        &read_request(vec![wide.clone(), wide], &[RESPONSE_SAMPLES]),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("read_samples_max"), "{}", r.text());
    // Bad requests: 400 naming the problem; the server keeps serving.
    let r = remote_read_raw(q, b"not snappy at all");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("snappy"), "{}", r.text());
    let bad_re = read_request(vec![query(0, 1, &[(MATCH_RE, "job", "(")])], &[]);
    let r = remote_read_raw(q, &bad_re);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("regex"), "{}", r.text());

    // The label and series APIs, in Prometheus's JSON shapes.
    let mut c = Client::connect(q).unwrap();
    let labels = c.request("GET", "/api/v1/labels", &[], b"").unwrap();
    assert_eq!(labels.status, 200);
    assert!(
        labels
            .text()
            .starts_with("{\"status\":\"success\",\"data\":[\"__name__\""),
        "{}",
        labels.text()
    );
    let values = c
        .request("GET", "/api/v1/label/__name__/values", &[], b"")
        .unwrap();
    assert!(
        values.text().contains(&format!("\"{name}\"")),
        "{}",
        values.text()
    );
    let enc = |s: &str| {
        s.replace('{', "%7B")
            .replace('}', "%7D")
            .replace('"', "%22")
            .replace('=', "%3D")
    };
    let series = c
        .request(
            "GET",
            &format!("/api/v1/series?match[]={}", enc(&name)),
            &[],
            b"",
        )
        .unwrap();
    assert_eq!(series.status, 200, "{}", series.text());
    assert_eq!(
        series.text().matches("{\"__name__\"").count(),
        r_count(&samples[0], &name)
    );
    // A window before any data selects nothing.
    let early = c
        .request(
            "GET",
            &format!("/api/v1/series?match[]={}&start=1&end=2", enc(&name)),
            &[],
            b"",
        )
        .unwrap();
    assert_eq!(early.text(), "{\"status\":\"success\",\"data\":[]}");
    let none = c.request("GET", "/api/v1/series", &[], b"").unwrap();
    assert_eq!(none.status, 400);
    let server_metrics = c.request("GET", "/metrics", &[], b"").unwrap().text();
    assert_eq!(
        metric_sum(&server_metrics, "promgate_server_samples_appended_total"),
        100_000.0
    );
    assert!(
        metric_sum(
            &server_metrics,
            "promgate_server_read_requests_chunks_total"
        ) >= 2.0
    );
}

fn r_count(series: &[ReadSeries], name: &str) -> usize {
    series
        .iter()
        .filter(|s| s.labels.iter().any(|l| l.0 == "__name__" && l.1 == name))
        .count()
}

#[test]
fn server_check_config_accepts_the_shipped_file_and_names_bad_keys() {
    let run = |file: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_promgate"))
            .args(["server", "--check-config", "--config"])
            .arg(file)
            .output()
            .unwrap()
    };
    let ok = run(&common::repo_root().join("config/server.toml"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let dir = temp_dir("server-badconfig");
    for (text, names) in [
        ("[server]\nretention = \"15 days\"\n", "server.retention"),
        (
            "[server]\nquery_listen = \"nowhere\"\n",
            "server.query_listen",
        ),
        ("[server]\nretentoin = \"1d\"\n", "retentoin"),
    ] {
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let out = run(&bad);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(names), "{text}: {err}");
    }
}
