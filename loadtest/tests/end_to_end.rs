//! End-to-end: runs the `promgate-loadtest` binary against an in-process receiver that
//! decodes every body, answers some requests 429 (Retry-After: 0) or with
//! `Connection: close`, and checks that the ack log replays to exactly the acknowledged
//! samples, that per-series timestamps only increase, and that errors exit non-zero.

use promgate_loadtest::replay_ack_log;
use promgate_proto::messages::{v1, v2};
use prost::Message;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// (sorted labels, timestamp ms, value bits)
type Key = (Vec<(String, String)>, i64, u64);

#[derive(Default)]
struct Receiver {
    requests: AtomicU64,
    acked: Mutex<Vec<Key>>,
    bad_headers: AtomicU64,
}

fn header<'a>(req: &'a httparse::Request, name: &str) -> &'a str {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map_or("", |h| std::str::from_utf8(h.value).unwrap_or(""))
}

fn decode(content_type: &str, body: &[u8]) -> Vec<Key> {
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .expect("snappy body");
    let mut out = Vec::new();
    if content_type.contains("v2.Request") {
        let req = v2::Request::decode(&raw[..]).expect("v2 body");
        for ts in req.timeseries {
            let labels: Vec<_> = ts
                .labels_refs
                .chunks(2)
                .map(|p| {
                    (
                        req.symbols[p[0] as usize].clone(),
                        req.symbols[p[1] as usize].clone(),
                    )
                })
                .collect();
            out.extend(
                ts.samples
                    .iter()
                    .map(|s| (labels.clone(), s.timestamp, s.value.to_bits())),
            );
        }
    } else {
        for ts in v1::WriteRequest::decode(&raw[..])
            .expect("v1 body")
            .timeseries
        {
            let labels: Vec<_> = ts.labels.into_iter().map(|l| (l.name, l.value)).collect();
            out.extend(
                ts.samples
                    .iter()
                    .map(|s| (labels.clone(), s.timestamp, s.value.to_bits())),
            );
        }
    }
    out
}

fn serve(mut s: TcpStream, rx: Arc<Receiver>, protocol: u8) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = req.parse(&buf) else {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let body_len: usize = header(&req, "content-length")
            .parse()
            .expect("content-length");
        if buf.len() < head_len + body_len {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        }
        let (want_type, want_version) = if protocol == 1 {
            ("application/x-protobuf", "0.1.0")
        } else {
            (
                "application/x-protobuf;proto=io.prometheus.write.v2.Request",
                "2.0.0",
            )
        };
        if header(&req, "content-type") != want_type
            || header(&req, "content-encoding") != "snappy"
            || header(&req, "x-prometheus-remote-write-version") != want_version
        {
            rx.bad_headers.fetch_add(1, Ordering::Relaxed);
        }
        let content_type = header(&req, "content-type").to_string();
        let samples = decode(&content_type, &buf[head_len..head_len + body_len]);
        buf.drain(..head_len + body_len);
        let n = rx.requests.fetch_add(1, Ordering::Relaxed);
        let reply: &[u8] = if n % 5 == 3 {
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nContent-Length: 4\r\n\r\nslow"
        } else if n % 7 == 6 {
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        } else {
            b"HTTP/1.1 204 No Content\r\n\r\n"
        };
        if !reply.starts_with(b"HTTP/1.1 429") {
            rx.acked.lock().expect("lock").extend(samples);
        }
        if s.write_all(reply).is_err() || reply.windows(6).any(|w| w == b"close\r") {
            return;
        }
    }
}

fn start_receiver(protocol: u8) -> (String, Arc<Receiver>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let rx = Arc::new(Receiver::default());
    let rx2 = rx.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let rx = rx2.clone();
            std::thread::spawn(move || serve(s, rx, protocol));
        }
    });
    (addr, rx)
}

fn json_number(json: &str, key: &str) -> f64 {
    let rest = &json[json.find(&format!("\"{key}\":")).expect(key) + key.len() + 3..];
    rest[..rest.find([',', '}']).expect("end")]
        .parse()
        .expect("number")
}

#[test]
fn ack_log_replays_exactly_the_acknowledged_samples() {
    for protocol in [1u8, 2] {
        let (addr, rx) = start_receiver(protocol);
        let ack_path = std::env::temp_dir().join(format!(
            "promgate-loadtest-e2e-{}-{protocol}.log",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&ack_path);
        let out = Command::new(env!("CARGO_BIN_EXE_promgate-loadtest"))
            .args([
                "--url",
                &format!("http://{addr}/api/v1/write"),
                "--connections",
                "3",
                "--series",
                "300",
            ])
            .args([
                "--labels",
                "7",
                "--samples",
                "2",
                "--samples-per-request",
                "40",
                "--max-requests",
                "60",
            ])
            .args([
                "--duration",
                "60",
                "--protocol",
                &protocol.to_string(),
                "--json",
                "--ack-log",
            ])
            .arg(&ack_path)
            .output()
            .expect("run harness");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{stdout}");
        let json = stdout
            .lines()
            .find(|l| l.starts_with('{'))
            .expect("json line");

        let mut acked = rx.acked.lock().expect("lock").clone();
        // 60 bodies of 20 series x 2 samples, every one eventually acknowledged.
        assert_eq!(acked.len(), 60 * 40);
        assert_eq!(json_number(json, "samples_acked") as usize, acked.len());
        assert!(json_number(json, "retries") >= 1.0, "{json}");
        assert_eq!(rx.bad_headers.load(Ordering::Relaxed), 0);

        // Per series, timestamps strictly increase in arrival order.
        let mut last_ts = std::collections::HashMap::new();
        for (labels, ts, _) in &acked {
            if let Some(prev) = last_ts.insert(labels.clone(), *ts) {
                assert!(*ts > prev, "{labels:?}: {ts} after {prev}");
            }
        }
        let log = std::fs::read_to_string(&ack_path).expect("ack log");
        let mut replayed: Vec<Key> = replay_ack_log(&log)
            .expect("replay")
            .into_iter()
            .map(|s| (s.labels, s.timestamp_ms, s.value.to_bits()))
            .collect();
        acked.sort();
        replayed.sort();
        assert_eq!(replayed, acked, "protocol {protocol}");
        let _ = std::fs::remove_file(&ack_path);
    }
}

#[test]
fn bad_url_and_unreachable_receiver_exit_nonzero() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    for url in [
        "ftp://x/".to_string(),
        "http://h:notaport/".to_string(),
        format!("http://{closed}/w"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_promgate-loadtest"))
            .args(["--url", &url, "--duration", "1"])
            .output()
            .expect("run harness");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("error"), "{stderr}");
    }
}
