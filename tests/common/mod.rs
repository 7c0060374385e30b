//! Test support: start the real `promgate` binary on a free loopback port, and a small
//! blocking HTTP/1.1 client that keeps its connection open between requests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts Debian's `prometheus` on 127.0.0.1:`port` with `config` (YAML) and a fresh
/// TSDB under `dir`; its log goes to `dir/prometheus.log`.
pub fn start_prometheus(dir: &Path, port: u16, config: &str) -> Proc {
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    Proc(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus (scripts/test.sh installs it)"),
    )
}

/// A real, small filesystem mounted at `dir` (root is needed; CI runs as root);
/// unmounted on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a {size} tmpfs failed (this test needs root)"
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Spawns `cmd` with stdout discarded and stderr appended to `log`.
fn spawn_logged(cmd: &mut Command, log: &Path, what: &str) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"))
}

/// A loopback port that was free a moment ago and that no other call in this test
/// process has handed out. Tests of one binary run in parallel, and the kernel can give
/// a port just released here to the next `bind(0)`: two tests' agents then both passed
/// their port probe before either listened, both listened (`SO_REUSEPORT`), and each
/// test's Prometheus wrote to the other's agent too (seen once in CI: the two tests'
/// counts were off by the same 3036 samples, in opposite directions).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("promgate-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running agent; killed when dropped.
pub struct Agent {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    /// The embedded server's query port (0 when the agent ships elsewhere).
    pub query_port: u16,
}

impl Agent {
    pub fn start(name: &str, extra: &[&str]) -> Agent {
        let dir = temp_dir(name);
        Agent::start_in(&dir, &dir.join("data"), free_port(), extra)
    }

    /// Starts a one-shard agent with `toml` as its configuration file.
    pub fn start_with_config(name: &str, toml: &str) -> Agent {
        let dir = temp_dir(name);
        let config = dir.join("agent.toml");
        std::fs::write(&config, toml).unwrap();
        let config = config.to_str().unwrap();
        Agent::start_in(
            &dir,
            &dir.join("data"),
            free_port(),
            &["--shards", "1", "--config", config],
        )
    }

    /// Starts an agent on a given data directory and port (also to restart one);
    /// its log is appended to `dir/agent.log`.
    /// Without `--server` in `extra`, the agent runs its server in-process on free
    /// loopback ports (`query_port`).
    pub fn start_in(dir: &Path, data_dir: &Path, port: u16, extra: &[&str]) -> Agent {
        let log = dir.join("agent.log");
        let query_port = if extra.contains(&"--server") {
            0
        } else {
            free_port()
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_promgate"));
        cmd.args([
            "agent",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra);
        if query_port != 0 {
            cmd.args([
                "--server-listen",
                &format!("127.0.0.1:{}", free_port()),
                "--query-listen",
                &format!("127.0.0.1:{query_port}"),
            ]);
        }
        let child = spawn_logged(&mut cmd, &log, "promgate agent");
        let agent = Agent {
            child,
            port,
            log,
            query_port,
        };
        wait_ready(agent.port, &agent.log, "agent");
        agent
    }

    pub fn metrics(&self) -> String {
        let mut c = Client::connect(self.port).unwrap();
        String::from_utf8(c.request("GET", "/metrics", &[], b"").unwrap().body).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_ready(port: u16, log: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut c) = Client::connect(port) {
            if let Ok(r) = c.request("GET", "/-/ready", &[], b"") {
                if r.status == 200 {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what} did not become ready; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A running `promgate server`; killed when dropped.
pub struct Server {
    pub child: Child,
    pub ship_port: u16,
    pub query_port: u16,
    pub log: PathBuf,
}

impl Server {
    /// Starts `promgate server` on the given ports and data directory; its log is
    /// appended to `dir/server.log`.
    pub fn start_in(
        dir: &Path,
        data_dir: &Path,
        ship_port: u16,
        query_port: u16,
        extra: &[&str],
    ) -> Server {
        let log = dir.join("server.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_promgate"));
        cmd.args([
            "server",
            "--listen",
            &format!("127.0.0.1:{ship_port}"),
            "--query-listen",
            &format!("127.0.0.1:{query_port}"),
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra);
        let child = spawn_logged(&mut cmd, &log, "promgate server");
        let server = Server {
            child,
            ship_port,
            query_port,
            log,
        };
        wait_ready(query_port, &server.log, "server");
        server
    }

    pub fn metrics(&self) -> String {
        Server::metrics_at(self.query_port)
    }

    pub fn metrics_at(query_port: u16) -> String {
        let mut c = Client::connect(query_port).unwrap();
        String::from_utf8(c.request("GET", "/metrics", &[], b"").unwrap().body).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One series as remote_read returned it: sorted labels, (t, value bits), histograms.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadSeries {
    pub labels: Vec<(String, String)>,
    pub samples: Vec<(i64, u64)>,
    pub histograms: usize,
}

pub fn read_request(
    queries: Vec<promgate_proto::messages::read::Query>,
    accepted: &[i32],
) -> Vec<u8> {
    use prost::Message;
    let req = promgate_proto::messages::read::ReadRequest {
        queries,
        accepted_response_types: accepted.to_vec(),
    };
    snap::raw::Encoder::new()
        .compress_vec(&req.encode_to_vec())
        .unwrap()
}

pub fn query(
    start: i64,
    end: i64,
    matchers: &[(i32, &str, &str)],
) -> promgate_proto::messages::read::Query {
    promgate_proto::messages::read::Query {
        start_timestamp_ms: start,
        end_timestamp_ms: end,
        matchers: matchers
            .iter()
            .map(|(t, n, v)| promgate_proto::messages::read::LabelMatcher {
                r#type: *t,
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
        hints: None,
    }
}

/// POSTs a remote_read request; returns the raw response.
pub fn remote_read_raw(port: u16, body: &[u8]) -> Response {
    let mut c = Client::connect(port).unwrap();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    c.request(
        "POST",
        "/api/v1/prom/read",
        &[
            ("Content-Type", "application/x-protobuf"),
            ("Content-Encoding", "snappy"),
            ("X-Prometheus-Remote-Read-Version", "0.1.0"),
        ],
        body,
    )
    .unwrap()
}

/// Decodes a remote_read answer of either type into one list of series per query;
/// chunked answers are checked frame by frame (length, CRC-32C) and chunk by chunk.
pub fn decode_read(r: &Response, queries: usize) -> Vec<Vec<ReadSeries>> {
    use promgate_proto::messages::read::{ChunkedReadResponse, ReadResponse};
    use prost::Message;
    assert_eq!(r.status, 200, "remote_read failed: {}", r.text());
    let ct = r.header("Content-Type").unwrap_or("");
    let mut out: Vec<Vec<ReadSeries>> = vec![Vec::new(); queries];
    if ct.starts_with("application/x-streamed-protobuf") {
        let mut b = r.body.as_slice();
        while !b.is_empty() {
            let (mut len, mut shift, mut i) = (0u64, 0, 0);
            loop {
                let x = b[i];
                len |= u64::from(x & 0x7f) << shift;
                shift += 7;
                i += 1;
                if x < 0x80 {
                    break;
                }
            }
            let crc = u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
            let msg = &b[i + 4..i + 4 + len as usize];
            assert_eq!(crc32c::crc32c(msg), crc, "frame CRC");
            let m = ChunkedReadResponse::decode(msg).unwrap();
            for cs in m.chunked_series {
                let mut samples = Vec::new();
                for c in cs.chunks {
                    assert_eq!(c.r#type, 1, "XOR chunk");
                    let s = promgate_proto::xor::decode(&c.data).unwrap();
                    assert_eq!(s.first().unwrap().0, c.min_time_ms);
                    assert_eq!(s.last().unwrap().0, c.max_time_ms);
                    samples.extend(s.into_iter().map(|(t, v)| (t, v.to_bits())));
                }
                out[m.query_index as usize].push(ReadSeries {
                    labels: cs.labels.into_iter().map(|l| (l.name, l.value)).collect(),
                    samples,
                    histograms: 0,
                });
            }
            b = &b[i + 4 + len as usize..];
        }
    } else {
        assert_eq!(ct, "application/x-protobuf");
        let raw = snap::raw::Decoder::new().decompress_vec(&r.body).unwrap();
        let resp = ReadResponse::decode(raw.as_slice()).unwrap();
        assert_eq!(resp.results.len(), queries);
        for (q, res) in resp.results.into_iter().enumerate() {
            for ts in res.timeseries {
                out[q].push(ReadSeries {
                    labels: ts.labels.into_iter().map(|l| (l.name, l.value)).collect(),
                    samples: ts
                        .samples
                        .iter()
                        .map(|s| (s.timestamp, s.value.to_bits()))
                        .collect(),
                    histograms: ts.histograms.len(),
                });
            }
        }
    }
    out
}

/// Sums a metric over all its series (all shards and labels) in a text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(port: u16) -> std::io::Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    /// Sends raw bytes as a request and reads one response.
    pub fn raw(&mut self, bytes: &[u8]) -> std::io::Result<Response> {
        self.stream.write_all(bytes)?;
        self.read_response()
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.raw(&bytes)
    }

    pub fn read_response(&mut self) -> std::io::Result<Response> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) =
                resp.parse(&self.buf).map_err(std::io::Error::other)?
            {
                let status = resp.code.unwrap_or(0);
                let hs: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let chunked = hs.iter().any(|(k, v)| {
                    k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
                });
                if chunked {
                    self.buf.drain(..n);
                    let body = self.read_chunked()?;
                    return Ok(Response {
                        status,
                        headers: hs,
                        body,
                    });
                }
                let len: usize = hs
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse().unwrap())
                    .unwrap_or(0);
                while self.buf.len() < n + len {
                    self.fill()?;
                }
                let body = self.buf[n..n + len].to_vec();
                self.buf.drain(..n + len);
                return Ok(Response {
                    status,
                    headers: hs,
                    body,
                });
            }
            self.fill()?;
        }
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            self.fill()?;
        }
    }

    fn read_chunked(&mut self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(std::io::Error::other)?;
            if size == 0 {
                while !self.read_line()?.is_empty() {}
                return Ok(body);
            }
            while self.buf.len() < size + 2 {
                self.fill()?;
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

pub fn golden(name: &str) -> Vec<u8> {
    std::fs::read(repo_root().join("testdata/remote_write").join(name)).unwrap()
}

pub const V1: &[(&str, &str)] = &[
    ("Content-Type", "application/x-protobuf"),
    ("Content-Encoding", "snappy"),
    ("X-Prometheus-Remote-Write-Version", "0.1.0"),
];
pub const V2: &[(&str, &str)] = &[
    (
        "Content-Type",
        "application/x-protobuf;proto=io.prometheus.write.v2.Request",
    ),
    ("Content-Encoding", "snappy"),
    ("X-Prometheus-Remote-Write-Version", "2.0.0"),
];

pub fn loadtest_binary() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_promgate")).with_file_name("promgate-loadtest");
    assert!(
        p.exists(),
        "{} is missing: cargo build --release -p promgate-loadtest",
        p.display()
    );
    p
}

/// `promgate-loadtest` against the agent listening on `port`, logging each acknowledged
/// request to `acks` and its own stderr to `dir/loadtest.log`; the caller adds the flags
/// of the load and runs it.
pub fn loadtest_command(port: u16, dir: &Path, acks: &Path) -> Command {
    let mut c = Command::new(loadtest_binary());
    c.args([
        "--url",
        &format!("http://127.0.0.1:{port}/api/v1/prometheus"),
    ])
    .arg("--ack-log")
    .arg(acks)
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(dir.join("loadtest.log")).unwrap());
    c
}

/// Waits until every record the agent's WAL took has been acknowledged by the server.
pub fn wait_shipped(agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = agent.metrics();
        let written = metric_sum(&m, "promgate_agent_wal_appended_records_total");
        let shipped = metric_sum(&m, "promgate_agent_ship_records_total");
        if written > 0.0 && shipped >= written {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "shipping did not catch up: {shipped} of {written} records"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub type Key = (Vec<(String, String)>, i64);

pub fn by_key(series: &[ReadSeries]) -> std::collections::HashMap<Key, u64> {
    let mut out = std::collections::HashMap::new();
    for s in series {
        for (t, bits) in &s.samples {
            let dup = out.insert((s.labels.clone(), *t), *bits);
            assert!(dup.is_none(), "{:?} has two samples at {t}", s.labels);
        }
    }
    out
}

pub fn acked_keys(acked: &[promgate_loadtest::AckedSample]) -> std::collections::HashMap<Key, u64> {
    acked
        .iter()
        .map(|s| {
            let mut labels: Vec<(String, String)> = s.labels.clone();
            labels.sort();
            ((labels, s.timestamp_ms), s.value.to_bits())
        })
        .collect()
}

/// Ten minutes ago in ms: a load start well inside the server's retention.
pub fn recent_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 600_000
}
