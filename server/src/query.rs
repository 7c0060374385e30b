//! The query listener (default port 20416): Prometheus `remote_read`
//! (`POST /api/v1/prom/read`, SAMPLES and STREAMED_XOR_CHUNKS), the label and series
//! APIs in Prometheus's JSON shapes, `/metrics`, `/-/healthy` and `/-/ready`.
//!
//! HTTP/1.1 with httparse on blocking threads (one per connection, capped): queries are
//! few and each is dominated by store reads, so the simplest server is the right one here.

use crate::metrics::{render, ServerMetrics};
use crate::select::{parse_selector, select, MatchKind, Matcher, TagView};
use crate::store::{Labels, Store};
use promgate_proto::messages::read::{
    Chunk, ChunkedReadResponse, ChunkedSeries, QueryResult, ReadRequest, ReadResponse, CHUNK_XOR,
    MATCH_EQ, MATCH_NEQ, MATCH_NRE, MATCH_RE, RESPONSE_SAMPLES, RESPONSE_STREAMED_XOR_CHUNKS,
};
use promgate_proto::messages::{v1, Histogram};
use promgate_proto::xor;
use prost::Message;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct QueryConfig {
    /// Samples one remote_read request may return; above it the answer is 413.
    pub read_samples_max: u64,
    /// Largest request body.
    pub body_bytes_max: usize,
    pub connections_max: usize,
    pub idle_timeout: Duration,
    /// remote_read label sets carry the series' meta tags (under `meta_tag_prefix`).
    pub meta_tags_in_labels: bool,
    /// Meta tags show as `prefix + NAME` in matchers and the labels/series APIs.
    pub meta_tag_prefix: String,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            read_samples_max: 50_000_000,
            body_bytes_max: 32 << 20,
            connections_max: 256,
            idle_timeout: Duration::from_secs(120),
            meta_tags_in_labels: false,
            meta_tag_prefix: "df_".into(),
        }
    }
}

impl QueryContext {
    /// The labels and series APIs always show meta tags (under the prefix).
    fn api_view(&self) -> TagView<'_> {
        TagView {
            prefix: &self.config.meta_tag_prefix,
            tags_in_labels: true,
        }
    }
}

pub struct QueryContext {
    pub store: Arc<Store>,
    pub metrics: Arc<ServerMetrics>,
    pub config: QueryConfig,
    open: AtomicUsize,
}

impl QueryContext {
    pub fn new(store: Arc<Store>, metrics: Arc<ServerMetrics>, config: QueryConfig) -> Self {
        QueryContext {
            store,
            metrics,
            config,
            open: AtomicUsize::new(0),
        }
    }
}

pub fn serve(listener: TcpListener, ctx: Arc<QueryContext>) {
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if ctx.open.fetch_add(1, Relaxed) >= ctx.config.connections_max {
            ctx.open.fetch_sub(1, Relaxed);
            let _ = stream.write_all(
                &Response::text(503, "too many query connections; retry later\n")
                    .header("Retry-After", "1")
                    .encode(false),
            );
            continue;
        }
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("query-conn".into())
            .spawn(move || {
                let _ = connection(stream, &ctx);
                ctx.open.fetch_sub(1, Relaxed);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a query connection thread");
        }
    }
}

pub struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Response {
    fn new(status: u16, content_type: &str, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", content_type.to_string())],
            body,
        }
    }

    fn text(status: u16, body: &str) -> Response {
        Response::new(
            status,
            "text/plain; charset=utf-8",
            body.as_bytes().to_vec(),
        )
    }

    fn header(mut self, name: &'static str, value: &str) -> Response {
        self.headers.push((name, value.to_string()));
        self
    }

    fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            411 => "Length Required",
            413 => "Payload Too Large",
            415 => "Unsupported Media Type",
            422 => "Unprocessable Entity",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "",
        };
        let mut out = format!("HTTP/1.1 {} {reason}\r\n", self.status).into_bytes();
        for (n, v) in &self.headers {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        out.extend_from_slice(
            format!(
                "Content-Length: {}\r\nConnection: {}\r\n\r\n",
                self.body.len(),
                if keep_alive { "keep-alive" } else { "close" }
            )
            .as_bytes(),
        );
        out.extend_from_slice(&self.body);
        out
    }
}

const HEADER_BYTES_MAX: usize = 64 << 10;

fn connection(mut s: TcpStream, ctx: &QueryContext) -> std::io::Result<()> {
    s.set_read_timeout(Some(ctx.config.idle_timeout))?;
    s.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        // Read until the header is complete.
        let (method, target, content_length, keep_alive, header_len, chunked) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let mut cl = None;
                    let mut close = req.version == Some(0);
                    let mut chunked = false;
                    for h in req.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            cl = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse::<usize>().ok());
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            close = h.value.eq_ignore_ascii_case(b"close");
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            chunked = true;
                        }
                    }
                    break (
                        req.method.unwrap_or("").to_string(),
                        req.path.unwrap_or("/").to_string(),
                        cl,
                        !close,
                        n,
                        chunked,
                    );
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > HEADER_BYTES_MAX {
                        s.write_all(
                            &Response::text(431, "request header too large\n").encode(false),
                        )?;
                        return Ok(());
                    }
                    let mut chunk = [0u8; 8192];
                    let n = s.read(&mut chunk)?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) => {
                    s.write_all(
                        &Response::text(400, &format!("malformed HTTP request: {e}\n"))
                            .encode(false),
                    )?;
                    return Ok(());
                }
            }
        };
        if chunked {
            s.write_all(
                &Response::text(
                    411,
                    "chunked request bodies are not accepted; send Content-Length\n",
                )
                .encode(false),
            )?;
            return Ok(());
        }
        let len = content_length.unwrap_or(0);
        if len > ctx.config.body_bytes_max {
            s.write_all(
                &Response::text(
                    413,
                    &format!(
                        "request body of {len} bytes is over the limit of {} bytes\n",
                        ctx.config.body_bytes_max
                    ),
                )
                .encode(false),
            )?;
            return Ok(());
        }
        while buf.len() < header_len + len {
            let mut chunk = vec![0u8; (header_len + len - buf.len()).min(1 << 20)];
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[header_len..header_len + len].to_vec();
        buf.drain(..header_len + len);
        ctx.metrics.http_requests.fetch_add(1, Relaxed);
        let response = route(&method, &target, &body, ctx);
        s.write_all(&response.encode(keep_alive))?;
        if !keep_alive {
            return Ok(());
        }
    }
}

fn route(method: &str, target: &str, body: &[u8], ctx: &QueryContext) -> Response {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut params = parse_form(query);
    if method == "POST" && !body.is_empty() && path != "/api/v1/prom/read" {
        params.extend(parse_form(&String::from_utf8_lossy(body)));
    }
    let allow = |methods: &str, ok: bool, f: &dyn Fn() -> Response| {
        if ok {
            f()
        } else {
            Response::text(405, "method not allowed\n").header("Allow", methods)
        }
    };
    let get_or_post = method == "GET" || method == "POST";
    match path {
        "/api/v1/prom/read" | "/api/v1/read" => {
            allow("POST", method == "POST", &|| remote_read(body, ctx))
        }
        "/api/v1/labels" => allow("GET, POST", get_or_post, &|| labels(&params, ctx)),
        "/api/v1/series" => allow("GET, POST", get_or_post, &|| series(&params, ctx)),
        "/metrics" => allow("GET", method == "GET", &|| {
            Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                render(&ctx.metrics, &ctx.store).into_bytes(),
            )
        }),
        "/-/healthy" | "/-/ready" => Response::text(200, "OK\n"),
        p => match p
            .strip_prefix("/api/v1/label/")
            .and_then(|r| r.strip_suffix("/values"))
        {
            Some(name) => allow("GET", method == "GET", &|| {
                label_values(&percent_decode(name), &params, ctx)
            }),
            None => Response::text(404, &format!("no such endpoint: {p}\n")),
        },
    }
}

// ---------------------------------------------------------------- remote_read

fn read_error(ctx: &QueryContext, status: u16, m: String) -> Response {
    ctx.metrics.read_requests_failed.fetch_add(1, Relaxed);
    Response::text(status, &(m + "\n"))
}

/// Samples in an XOR chunk: its big-endian 16-bit header.
fn chunk_samples(chunk: &[u8]) -> u64 {
    u64::from(u16::from_be_bytes([chunk[0], chunk[1]]))
}

/// One query's selected series with their data, before encoding.
struct Selected {
    labels: Labels,
    data: crate::store::SeriesData,
}

fn remote_read(body: &[u8], ctx: &QueryContext) -> Response {
    let started = std::time::Instant::now();
    let raw = match snap::raw::Decoder::new().decompress_vec(body) {
        Ok(r) => r,
        Err(e) => return read_error(ctx, 400, format!("body is not a snappy block: {e}")),
    };
    let req = match ReadRequest::decode(raw.as_slice()) {
        Ok(r) => r,
        Err(e) => return read_error(ctx, 400, format!("body is not a ReadRequest: {e}")),
    };
    // The first accepted type this server supports wins; none listed means SAMPLES.
    let wanted = req
        .accepted_response_types
        .iter()
        .copied()
        .find(|t| *t == RESPONSE_SAMPLES || *t == RESPONSE_STREAMED_XOR_CHUNKS)
        .unwrap_or(RESPONSE_SAMPLES);
    if !req.accepted_response_types.is_empty()
        && !req
            .accepted_response_types
            .iter()
            .any(|t| *t == RESPONSE_SAMPLES || *t == RESPONSE_STREAMED_XOR_CHUNKS)
    {
        return read_error(
            ctx,
            400,
            format!(
                "none of the accepted response types {:?} is supported (0 SAMPLES, 1 STREAMED_XOR_CHUNKS)",
                req.accepted_response_types
            ),
        );
    }
    let reader = match ctx.store.reader() {
        Ok(r) => r,
        Err(e) => return read_error(ctx, 500, format!("cannot read the store: {e:#}")),
    };
    let mut results: Vec<Vec<Selected>> = Vec::with_capacity(req.queries.len());
    let mut samples_total: u64 = 0;
    let mut has_histograms = false;
    for (qi, q) in req.queries.iter().enumerate() {
        let mut matchers = Vec::with_capacity(q.matchers.len());
        for m in &q.matchers {
            let kind = match m.r#type {
                MATCH_EQ => MatchKind::Equal,
                MATCH_NEQ => MatchKind::NotEqual,
                MATCH_RE => MatchKind::Regex,
                MATCH_NRE => MatchKind::NotRegex,
                t => return read_error(ctx, 400, format!("query {qi}: unknown matcher type {t}")),
            };
            match Matcher::new(kind, &m.name, &m.value) {
                Ok(m) => matchers.push(m),
                Err(e) => return read_error(ctx, 400, format!("query {qi}: {e}")),
            }
        }
        let (start, end) = (q.start_timestamp_ms, q.end_timestamp_ms);
        let view = TagView {
            prefix: &ctx.config.meta_tag_prefix,
            tags_in_labels: ctx.config.meta_tags_in_labels,
        };
        let series = match select(&reader, &matchers, view) {
            Ok(s) => s,
            Err(e) => return read_error(ctx, 500, format!("query {qi}: {e:#}")),
        };
        let mut out = Vec::with_capacity(series.len());
        for (sid, labels) in series {
            let data = match reader.series_data(sid, start, end) {
                Ok(d) => d,
                Err(e) => return read_error(ctx, 500, format!("query {qi}: {e:#}")),
            };
            if data.chunks.is_empty() && data.histograms.is_empty() {
                continue;
            }
            samples_total += data
                .chunks
                .iter()
                .map(|(_, _, c)| chunk_samples(c))
                .sum::<u64>()
                + data.histograms.len() as u64;
            has_histograms |= !data.histograms.is_empty();
            if samples_total > ctx.config.read_samples_max {
                return read_error(
                    ctx,
                    413,
                    format!(
                        "the request selects more than {} samples (query.read_samples_max); narrow the time range or the matchers",
                        ctx.config.read_samples_max
                    ),
                );
            }
            out.push(Selected { labels, data });
        }
        results.push(out);
    }
    let streamed = wanted == RESPONSE_STREAMED_XOR_CHUNKS;
    let samples_ok = req.accepted_response_types.is_empty()
        || req.accepted_response_types.contains(&RESPONSE_SAMPLES);
    let response = if streamed && has_histograms {
        // Histogram chunks are not written yet: never leave histograms out silently.
        if samples_ok {
            samples_response(&req, results, ctx)
        } else {
            return read_error(
                ctx,
                422,
                "the selected series hold native histograms, which this server returns only as SAMPLES; accept SAMPLES too".into(),
            );
        }
    } else if streamed {
        chunks_response(&req, results, ctx)
    } else {
        samples_response(&req, results, ctx)
    };
    ctx.metrics
        .read_micros
        .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
    response
}

fn to_labels(l: &Labels) -> Vec<v1::Label> {
    l.iter()
        .map(|(n, v)| v1::Label {
            name: n.clone(),
            value: v.clone(),
        })
        .collect()
}

fn samples_response(
    req: &ReadRequest,
    results: Vec<Vec<Selected>>,
    ctx: &QueryContext,
) -> Response {
    let mut resp = ReadResponse::default();
    for (q, selected) in req.queries.iter().zip(results) {
        let (start, end) = (q.start_timestamp_ms, q.end_timestamp_ms);
        let mut qr = QueryResult::default();
        for s in selected {
            let mut ts = v1::TimeSeries {
                labels: to_labels(&s.labels),
                ..Default::default()
            };
            for (_, _, c) in &s.data.chunks {
                match xor::decode(c) {
                    Ok(samples) => ts.samples.extend(
                        samples
                            .into_iter()
                            .filter(|(t, _)| (start..=end).contains(t))
                            .map(|(t, v)| v1::Sample {
                                value: v,
                                timestamp: t,
                            }),
                    ),
                    Err(e) => {
                        return read_error(ctx, 500, format!("a stored chunk is unreadable: {e:?}"))
                    }
                }
            }
            for (_, h) in &s.data.histograms {
                match Histogram::decode(h.as_slice()) {
                    Ok(h) => ts.histograms.push(h),
                    Err(e) => {
                        return read_error(
                            ctx,
                            500,
                            format!("a stored histogram is unreadable: {e}"),
                        )
                    }
                }
            }
            if ts.samples.is_empty() && ts.histograms.is_empty() {
                continue;
            }
            ctx.metrics.read_series.fetch_add(1, Relaxed);
            ctx.metrics
                .read_samples
                .fetch_add((ts.samples.len() + ts.histograms.len()) as u64, Relaxed);
            qr.timeseries.push(ts);
        }
        resp.results.push(qr);
    }
    ctx.metrics.read_requests_samples.fetch_add(1, Relaxed);
    let raw = resp.encode_to_vec();
    let body = snap::raw::Encoder::new()
        .compress_vec(&raw)
        .expect("snappy compresses any input");
    Response::new(200, "application/x-protobuf", body).header("Content-Encoding", "snappy")
}

/// Largest ChunkedReadResponse message before a new frame is started.
const FRAME_BYTES_TARGET: usize = 1 << 20;

fn chunks_response(req: &ReadRequest, results: Vec<Vec<Selected>>, ctx: &QueryContext) -> Response {
    let mut body = Vec::new();
    let mut msg = ChunkedReadResponse::default();
    let mut msg_bytes = 0usize;
    let flush = |msg: &mut ChunkedReadResponse, body: &mut Vec<u8>| {
        let raw = msg.encode_to_vec();
        // Frame: uvarint length, CRC-32C (big-endian) of the message, the message.
        let mut n = raw.len() as u64;
        while n >= 0x80 {
            body.push(n as u8 | 0x80);
            n >>= 7;
        }
        body.push(n as u8);
        body.extend_from_slice(&crc32c::crc32c(&raw).to_be_bytes());
        body.extend_from_slice(&raw);
        msg.chunked_series.clear();
    };
    for (qi, (_, selected)) in req.queries.iter().zip(results).enumerate() {
        msg.query_index = qi as i64;
        for s in selected {
            let mut cs = ChunkedSeries {
                labels: to_labels(&s.labels),
                chunks: Vec::with_capacity(s.data.chunks.len()),
            };
            let mut samples = 0u64;
            for (min_t, max_t, c) in s.data.chunks {
                samples += chunk_samples(&c);
                msg_bytes += c.len() + 24;
                cs.chunks.push(Chunk {
                    min_time_ms: min_t,
                    max_time_ms: max_t,
                    r#type: CHUNK_XOR,
                    data: c,
                });
            }
            ctx.metrics.read_series.fetch_add(1, Relaxed);
            ctx.metrics.read_samples.fetch_add(samples, Relaxed);
            msg.chunked_series.push(cs);
            if msg_bytes >= FRAME_BYTES_TARGET {
                flush(&mut msg, &mut body);
                msg_bytes = 0;
            }
        }
        if !msg.chunked_series.is_empty() {
            flush(&mut msg, &mut body);
            msg_bytes = 0;
        }
    }
    ctx.metrics.read_requests_chunks.fetch_add(1, Relaxed);
    Response::new(
        200,
        "application/x-streamed-protobuf; proto=prometheus.ChunkedReadResponse",
        body,
    )
}

// ---------------------------------------------------------------- JSON APIs

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_ok(data: String) -> Response {
    Response::new(
        200,
        "application/json",
        format!("{{\"status\":\"success\",\"data\":{data}}}").into_bytes(),
    )
}

fn json_error(status: u16, kind: &str, m: &str) -> Response {
    let mut e = String::new();
    json_string(&mut e, m);
    Response::new(
        status,
        "application/json",
        format!("{{\"status\":\"error\",\"errorType\":\"{kind}\",\"error\":{e}}}").into_bytes(),
    )
}

fn json_list(items: &[String]) -> String {
    let mut out = String::from("[");
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(&mut out, s);
    }
    out.push(']');
    out
}

/// Parses Prometheus's time parameter: RFC 3339 is not supported, Unix seconds (with
/// fraction) are.
fn parse_time(v: &str) -> Result<i64, String> {
    v.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(|f| (f * 1000.0).round() as i64)
        .ok_or_else(|| format!("cannot parse {v:?} as a Unix timestamp in seconds"))
}

/// `(start, end)` in ms from the parameters; open ends are unbounded.
fn time_range(params: &[(String, String)]) -> Result<(i64, i64), String> {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let start = get("start")
        .map(parse_time)
        .transpose()?
        .unwrap_or(i64::MIN / 2);
    let end = get("end")
        .map(parse_time)
        .transpose()?
        .unwrap_or(i64::MAX / 2);
    if start > end {
        return Err("end timestamp must not be before start time".into());
    }
    Ok((start, end))
}

/// The series chosen by `match[]` (any of them) with data in the time range, sorted;
/// `None` when no `match[]` was given.
fn matched_series(
    params: &[(String, String)],
    ctx: &QueryContext,
    require: bool,
) -> Result<Option<Vec<Labels>>, Response> {
    let selectors: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k == "match[]")
        .map(|(_, v)| v.as_str())
        .collect();
    if selectors.is_empty() {
        if require {
            return Err(json_error(400, "bad_data", "no match[] parameter provided"));
        }
        return Ok(None);
    }
    let (start, end) = time_range(params).map_err(|e| json_error(400, "bad_data", &e))?;
    let reader = ctx
        .store
        .reader()
        .map_err(|e| json_error(500, "internal", &format!("{e:#}")))?;
    let mut all: Vec<(u64, Labels)> = Vec::new();
    for sel in selectors {
        let matchers = parse_selector(sel).map_err(|e| json_error(400, "bad_data", &e))?;
        let found = select(&reader, &matchers, ctx.api_view())
            .map_err(|e| json_error(500, "internal", &format!("{e:#}")))?;
        all.extend(found);
    }
    all.sort_by(|a, b| a.1.cmp(&b.1));
    all.dedup_by_key(|x| x.0);
    let mut out = Vec::with_capacity(all.len());
    for (sid, labels) in all {
        let has = reader
            .has_data(sid, start, end)
            .map_err(|e| json_error(500, "internal", &format!("{e:#}")))?;
        if has {
            out.push(labels);
        }
    }
    Ok(Some(out))
}

fn labels(params: &[(String, String)], ctx: &QueryContext) -> Response {
    match matched_series(params, ctx, false) {
        Err(r) => r,
        Ok(Some(series)) => {
            let mut names: Vec<String> = series
                .into_iter()
                .flat_map(|l| l.into_iter().map(|(n, _)| n))
                .collect();
            names.sort();
            names.dedup();
            json_ok(json_list(&names))
        }
        Ok(None) => match ctx.store.reader().and_then(|r| r.label_names()) {
            Ok(names) => {
                let view = ctx.api_view();
                let mut names: Vec<String> = names.iter().map(|n| view.shown_name(n)).collect();
                names.sort();
                json_ok(json_list(&names))
            }
            Err(e) => json_error(500, "internal", &format!("{e:#}")),
        },
    }
}

fn label_values(name: &str, params: &[(String, String)], ctx: &QueryContext) -> Response {
    match matched_series(params, ctx, false) {
        Err(r) => r,
        Ok(Some(series)) => {
            let mut values: Vec<String> = series
                .into_iter()
                .filter_map(|l| l.into_iter().find(|(n, _)| n == name).map(|(_, v)| v))
                .collect();
            values.sort();
            values.dedup();
            json_ok(json_list(&values))
        }
        Ok(None) => match ctx
            .store
            .reader()
            .and_then(|r| r.values_of(&ctx.api_view().index_name(name)))
        {
            Ok(v) => {
                let mut values: Vec<String> = v.into_iter().map(|(v, _)| v).collect();
                values.sort();
                json_ok(json_list(&values))
            }
            Err(e) => json_error(500, "internal", &format!("{e:#}")),
        },
    }
}

fn series(params: &[(String, String)], ctx: &QueryContext) -> Response {
    match matched_series(params, ctx, true) {
        Err(r) => r,
        Ok(series) => {
            let mut out = String::from("[");
            for (i, labels) in series.unwrap_or_default().iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('{');
                for (j, (n, v)) in labels.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    json_string(&mut out, n);
                    out.push(':');
                    json_string(&mut out, v);
                }
                out.push('}');
            }
            out.push(']');
            json_ok(out)
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(x) => {
                        out.push(x);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_form(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode() {
        let f = parse_form("match%5B%5D=up%7Bjob%3D%22a%22%7D&start=1.5&x");
        assert_eq!(f[0], ("match[]".into(), "up{job=\"a\"}".into()));
        assert_eq!(parse_time(&f[1].1), Ok(1500));
        assert_eq!(f[2], ("x".into(), "".into()));
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
