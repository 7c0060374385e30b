//! The whole promgate path in one process (agent + embedded server): what the load
//! harness had acknowledged comes back from remote_read, sample for sample, in both
//! response types; matchers, the sample limit, bad requests and the label/series APIs.

mod common;

use common::{
    acked_keys, by_key, decode_read, free_port, metric_sum, query, read_request, remote_read_raw,
    temp_dir, wait_shipped, Agent, Client, Key, ReadSeries,
};
use promgate_loadtest::replay_ack_log;
use promgate_proto::messages::read::{
    MATCH_EQ, MATCH_NEQ, MATCH_NRE, MATCH_RE, RESPONSE_SAMPLES, RESPONSE_STREAMED_XOR_CHUNKS,
};
use promgate_proto::ship;
use std::process::Command;

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
    let status = common::loadtest_command(port, &dir, &acks)
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

#[test]
fn native_histograms_exemplars_and_metadata_are_stored_and_read_back() {
    use prost::Message;
    let agent = Agent::start("server-histograms", &["--shards", "1"]);
    let mut c = Client::connect(agent.port).unwrap();
    let v1 = common::golden("v1_histograms_exemplars.bin");
    let r = c.request("POST", "/api/v1/write", common::V1, &v1).unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
    let r = c
        .request(
            "POST",
            "/api/v1/write",
            common::V2,
            &common::golden("v2_basic.bin"),
        )
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
    wait_shipped(&agent);
    let q = agent.query_port;

    // What Prometheus sent, decoded by the reference (prost) decoder.
    let raw = snap::raw::Decoder::new().decompress_vec(&v1).unwrap();
    let sent = promgate_proto::messages::v1::WriteRequest::decode(raw.as_slice()).unwrap();
    let sent_h = &sent
        .timeseries
        .iter()
        .find(|t| t.labels.iter().any(|l| l.value == "rpc_latency_seconds"))
        .unwrap()
        .histograms;
    assert_eq!(sent_h.len(), 3);

    let hq = || query(0, 1_800_000_000_000, &[(MATCH_RE, "__name__", "rpc_.*")]);
    let samples = remote_read_raw(q, &read_request(vec![hq()], &[RESPONSE_SAMPLES]));
    let raw = snap::raw::Decoder::new()
        .decompress_vec(&samples.body)
        .unwrap();
    let resp = promgate_proto::messages::read::ReadResponse::decode(raw.as_slice()).unwrap();
    let series = &resp.results[0].timeseries;
    assert_eq!(series.len(), 2, "rpc_latency_seconds and rpc_seconds");
    assert_eq!(
        &series[0].histograms, sent_h,
        "histograms differ from what was sent"
    );
    assert_eq!(series[1].histograms.len(), 2);

    // Chunks are asked for first, but histograms cannot be chunked yet: SAMPLES instead,
    // never a silent omission.
    let r = remote_read_raw(
        q,
        &read_request(
            vec![hq()],
            &[RESPONSE_STREAMED_XOR_CHUNKS, RESPONSE_SAMPLES],
        ),
    );
    assert_eq!(r.header("Content-Type"), Some("application/x-protobuf"));
    assert_eq!(
        decode_read(&r, 1)[0]
            .iter()
            .map(|s| s.histograms)
            .sum::<usize>(),
        5
    );
    let r = remote_read_raw(
        q,
        &read_request(vec![hq()], &[RESPONSE_STREAMED_XOR_CHUNKS]),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("histograms"), "{}", r.text());

    let m = String::from_utf8(
        Client::connect(q)
            .unwrap()
            .request("GET", "/metrics", &[], b"")
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(
        metric_sum(&m, "promgate_server_histograms_stored_total"),
        5.0
    );
    assert_eq!(
        metric_sum(&m, "promgate_server_exemplars_stored_total"),
        4.0
    );
    assert!(metric_sum(&m, "promgate_server_metadata_stored_total") >= 2.0);
    // The float samples of both requests are there too, staleness marker included.
    let floats = decode_read(
        &remote_read_raw(
            q,
            &read_request(
                vec![query(
                    0,
                    1_800_000_000_000,
                    &[(MATCH_RE, "__name__", ".*_total")],
                )],
                &[],
            ),
        ),
        1,
    );
    let all: Vec<(i64, u64)> = floats[0].iter().flat_map(|s| s.samples.clone()).collect();
    assert!(
        all.contains(&(1_700_000_015_000, 0x7ff0_0000_0000_0002)),
        "{all:?}"
    );
    assert!(
        all.contains(&(1_700_000_000_000, 42f64.to_bits())),
        "{all:?}"
    );
}

/// Reads one frame from the server: (kind, archive bytes).
fn read_frame(s: &mut std::net::TcpStream) -> (u8, rkyv::util::AlignedVec) {
    use std::io::Read;
    let mut h = [0u8; ship::HEADER_BYTES];
    s.read_exact(&mut h).unwrap();
    let h = ship::parse_header(&h).unwrap();
    let mut wire = vec![0u8; h.len];
    s.read_exact(&mut wire).unwrap();
    let mut body = rkyv::util::AlignedVec::new();
    ship::open_body(&h, &wire, &mut body).unwrap();
    (h.kind, body)
}

fn error_code(s: &mut std::net::TcpStream) -> (u16, String) {
    let (kind, body) = read_frame(s);
    assert_eq!(kind, ship::KIND_ERROR);
    let e = ship::access::<ship::ArchivedShipError>(&body).unwrap();
    (e.code.to_native(), e.message.to_string())
}

/// Agent "t" shard 0, WAL record 1: one sample of series `x` (ref 0, target ref 0),
/// without the target itself.
fn one_sample_batch() -> ship::ShipBatch {
    ship::ShipBatch {
        agent: "t".into(),
        first_seq: 1,
        last_seq: 1,
        new_series: vec![ship::NewSeries {
            series_ref: 0,
            target_ref: 0,
            absent: vec![],
            labels: vec![ship::Label {
                name: "__name__".into(),
                value: "x".into(),
            }],
        }],
        sample_refs: vec![0],
        sample_ts: vec![common::recent_ms()],
        sample_values: vec![1f64.to_bits()],
        ..Default::default()
    }
}

/// `batch` with target ref 0 (no labels, no tags) sent along.
fn with_target(batch: ship::ShipBatch) -> ship::ShipBatch {
    ship::ShipBatch {
        new_targets: vec![ship::NewTarget {
            target_ref: 0,
            labels: vec![],
            tags: vec![],
        }],
        ..batch
    }
}

#[test]
fn the_server_answers_bad_frames_with_error_frames_and_keeps_serving() {
    use std::io::Write;
    let dir = temp_dir("server-frames");
    let (ship_port, qport) = (free_port(), free_port());
    let _server = common::Server::start_in(&dir, &dir.join("data"), ship_port, qport, &[]);
    let connect = || std::net::TcpStream::connect(("127.0.0.1", ship_port)).unwrap();
    let hello = |out: &mut Vec<u8>| {
        ship::write_message(
            ship::KIND_HELLO,
            &ship::Hello {
                agent: "t".into(),
                shard: 0,
            },
            false,
            out,
        )
    };

    // A frame version this server does not speak.
    let mut out = Vec::new();
    hello(&mut out);
    out[4] = 9;
    let mut s = connect();
    s.write_all(&out).unwrap();
    let (code, msg) = error_code(&mut s);
    assert_eq!(code, ship::code::UNSUPPORTED_VERSION, "{msg}");

    // A batch before HELLO.
    let batch = one_sample_batch();
    let mut out = Vec::new();
    ship::write_message(ship::KIND_BATCH, &batch, true, &mut out);
    let mut s = connect();
    s.write_all(&out).unwrap();
    assert_eq!(error_code(&mut s).0, ship::code::UNEXPECTED);

    // Garbage behind a correct CRC: only archive validation can catch it.
    let mut out = Vec::new();
    hello(&mut out);
    ship::write_frame(ship::KIND_BATCH, &[0xa5; 200], false, &mut out);
    let mut s = connect();
    s.write_all(&out).unwrap();
    assert_eq!(read_frame(&mut s).0, ship::KIND_WELCOME);
    let (code, msg) = error_code(&mut s);
    assert_eq!(code, ship::code::BAD_ARCHIVE, "{msg}");

    // A body whose CRC does not match.
    let mut out = Vec::new();
    hello(&mut out);
    let start = out.len();
    ship::write_message(ship::KIND_BATCH, &batch, false, &mut out);
    let last = out.len() - 1;
    out[last] ^= 0xff;
    assert!(out.len() > start);
    let mut s = connect();
    s.write_all(&out).unwrap();
    assert_eq!(read_frame(&mut s).0, ship::KIND_WELCOME);
    assert_eq!(error_code(&mut s).0, ship::code::BAD_FRAME);

    // A series that refers to a target the connection never sent.
    let mut out = Vec::new();
    hello(&mut out);
    ship::write_message(ship::KIND_BATCH, &batch, true, &mut out);
    let mut s = connect();
    s.write_all(&out).unwrap();
    assert_eq!(read_frame(&mut s).0, ship::KIND_WELCOME);
    let (code, msg) = error_code(&mut s);
    assert_eq!(code, ship::code::BAD_ARCHIVE, "{msg}");
    assert!(msg.contains("unknown target ref 0"), "{msg}");

    // And a good conversation still works: WELCOME at 0, ACK, then WELCOME at 1.
    let batch = with_target(batch);
    let mut out = Vec::new();
    hello(&mut out);
    ship::write_message(ship::KIND_BATCH, &batch, true, &mut out);
    let mut s = connect();
    s.write_all(&out).unwrap();
    let (k, w) = read_frame(&mut s);
    assert_eq!(k, ship::KIND_WELCOME);
    assert_eq!(
        ship::access::<ship::ArchivedWelcome>(&w)
            .unwrap()
            .applied_seq,
        0
    );
    let (k, a) = read_frame(&mut s);
    assert_eq!(k, ship::KIND_ACK);
    assert_eq!(ship::access::<ship::ArchivedAck>(&a).unwrap().seq, 1);
    let mut out = Vec::new();
    hello(&mut out);
    let mut s = connect();
    s.write_all(&out).unwrap();
    let (_, w) = read_frame(&mut s);
    assert_eq!(
        ship::access::<ship::ArchivedWelcome>(&w)
            .unwrap()
            .applied_seq,
        1
    );
}

#[test]
fn a_deleted_wal_starts_a_new_epoch_instead_of_being_taken_for_a_replay() {
    let dir = temp_dir("server-wal-epoch");
    let data = dir.join("data");
    let send = |agent: &Agent, golden: &str, headers: &[(&str, &str)]| {
        let mut c = Client::connect(agent.port).unwrap();
        let r = c
            .request("POST", "/api/v1/write", headers, &common::golden(golden))
            .unwrap();
        assert_eq!(r.status, 204, "{}", r.text());
        wait_shipped(agent);
    };
    let agent = Agent::start_in(&dir, &data, free_port(), &["--shards", "1"]);
    send(&agent, "v1_basic.bin", common::V1);
    drop(agent);
    // The operator wipes the WAL (its sequence numbers start again at 1) but keeps the
    // store and the agent id.
    std::fs::remove_dir_all(data.join("wal")).unwrap();
    let agent = Agent::start_in(&dir, &data, free_port(), &["--shards", "1"]);
    send(&agent, "v2_basic.bin", common::V2);
    let r = decode_read(
        &remote_read_raw(
            agent.query_port,
            &read_request(
                vec![query(
                    0,
                    1_800_000_000_000,
                    &[(MATCH_EQ, "__name__", "http_requests_total")],
                )],
                &[],
            ),
        ),
        1,
    );
    let samples: Vec<(i64, u64)> = r[0].iter().flat_map(|s| s.samples.clone()).collect();
    assert!(
        samples.contains(&(1_700_000_015_000, 0x7ff0_0000_0000_0002)),
        "the new WAL's first record was skipped as a replay: {samples:?}"
    );
}

/// `[enrich.header_tags]`: a named request header becomes a tag of every series of the
/// request (`df_tenant`); an over-long value is a 400 naming the header, and nothing of
/// that request is written; the connection keeps serving.
#[test]
fn request_headers_become_tags_within_their_length_limit() {
    let agent = Agent::start_with_config(
        "server-header-tags",
        "[query]\nmeta_tags_in_labels = true\n[enrich]\nheader_tag_bytes_max = 16\n[enrich.header_tags]\nX-Tenant = \"tenant\"\n",
    );
    let mut c = Client::connect(agent.port).unwrap();
    let with = |tenant: &str| {
        let mut h: Vec<(&str, &str)> = common::V1.to_vec();
        h.push(("x-tenant", tenant));
        h.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let send = |c: &mut Client, tenant: &str| {
        let h = with(tenant);
        let h: Vec<(&str, &str)> = h.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        c.request("POST", "/api/v1/write", &h, &common::golden("v1_basic.bin"))
            .unwrap()
    };
    let r = send(&mut c, "a-tenant-name-over-16");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("x-tenant"), "{}", r.text());
    assert_eq!(
        metric_sum(&agent.metrics(), "promgate_agent_decode_samples_total"),
        0.0
    );
    let r = send(&mut c, "acme");
    assert_eq!(r.status, 204, "{}", r.text());
    wait_shipped(&agent);
    let get = |path: &str| {
        let mut q = Client::connect(agent.query_port).unwrap();
        q.request("GET", path, &[], b"").unwrap().text()
    };
    let all: serde_json::Value =
        serde_json::from_str(&get("/api/v1/series?match[]=%7B__name__%3D~%22.%2B%22%7D")).unwrap();
    let tagged: serde_json::Value =
        serde_json::from_str(&get("/api/v1/series?match[]=%7Bdf_tenant%3D%22acme%22%7D")).unwrap();
    let n = all["data"].as_array().unwrap().len();
    assert!(n > 0);
    assert_eq!(tagged["data"].as_array().unwrap().len(), n, "{tagged}");
    // `[query] meta_tags_in_labels = true`: remote_read's label sets carry the tags.
    let body = read_request(
        vec![query(
            i64::MIN / 2,
            i64::MAX / 2,
            &[(0, "df_tenant", "acme")],
        )],
        &[0],
    );
    let read = decode_read(&remote_read_raw(agent.query_port, &body), 1);
    assert_eq!(read[0].len(), n);
    for s in &read[0] {
        assert!(
            s.labels.contains(&("df_tenant".into(), "acme".into())),
            "{:?}",
            s.labels
        );
        assert!(
            s.labels.iter().any(|(n, _)| n == "df_agent"),
            "{:?}",
            s.labels
        );
        assert!(
            s.labels.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted: {:?}",
            s.labels
        );
    }
}

/// Batches are durable at checkpoints; a stopped server (SIGTERM) makes a last one, so
/// after a restart it still has everything it acknowledged and says so (`durable_seq`).
#[test]
fn a_stopped_server_checkpoints_what_it_applied() {
    use std::io::Write;
    let dir = temp_dir("server-stop-checkpoint");
    let config = dir.join("server.toml");
    // No checkpoint on its own during the test: only the one at the stop.
    std::fs::write(&config, "[server]\ncheckpoint_interval = \"1h\"\n").unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let (ship_port, qport) = (free_port(), free_port());
    let data = dir.join("data");
    let welcome = |s: &mut std::net::TcpStream| {
        let mut out = Vec::new();
        let hello = ship::Hello {
            agent: "t".into(),
            shard: 0,
        };
        ship::write_message(ship::KIND_HELLO, &hello, false, &mut out);
        s.write_all(&out).unwrap();
        let (k, w) = read_frame(s);
        assert_eq!(k, ship::KIND_WELCOME);
        let w = ship::access::<ship::ArchivedWelcome>(&w).unwrap();
        (w.applied_seq.to_native(), w.durable_seq.to_native())
    };
    let mut server = common::Server::start_in(&dir, &data, ship_port, qport, &args);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", ship_port)).unwrap();
    assert_eq!(welcome(&mut s), (0, 0));
    let batch = with_target(one_sample_batch());
    let mut out = Vec::new();
    ship::write_message(ship::KIND_BATCH, &batch, true, &mut out);
    s.write_all(&out).unwrap();
    let (k, a) = read_frame(&mut s);
    assert_eq!(k, ship::KIND_ACK);
    let a = ship::access::<ship::ArchivedAck>(&a).unwrap();
    assert_eq!(
        (a.seq.to_native(), a.durable_seq.to_native()),
        (1, 0),
        "applied, not yet durable"
    );
    drop(s);
    // SAFETY: signals a child process this test started.
    assert_eq!(
        unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) },
        0
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "the server stopped with {status}");
    let _server = common::Server::start_in(&dir, &data, ship_port, qport, &args);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", ship_port)).unwrap();
    assert_eq!(
        welcome(&mut s),
        (1, 1),
        "the stop's checkpoint kept batch 1"
    );
}
