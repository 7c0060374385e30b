//! receive: the per-shard HTTP/1.1 server that takes remote_write requests.
//!
//! One task per connection, pinned to the shard that accepted it. The chain for a
//! write is one screen long (see [`Conn::write`]): check headers (415 before the body
//! is touched) → read the body within its cap (413) → [`remote_write::decompress`]
//! (declared length checked first) → [`decode`] → [`Sink::write`] → answer. Every
//! buffer (input, decompressed body, batch arrays, output) belongs to the connection
//! and is reused for its next request, so steady-state requests allocate nothing.
//! A bad request gets its status and the connection keeps serving; only framing
//! errors (where the next request's start is unknown) close it.

use crate::http::{self, Chunked, ChunkedError, Head, Method};
use crate::metrics::ShardMetrics;
use crate::sink::{Accepted, Sink};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use promgate_proto::remote_write::{self, RequestError};
use promgate_proto::{decode, Batch, Decoded, Limits, Protocol, RejectCounts};
use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The receive path's settings; every limit is named with its unit.
#[derive(Clone, Debug)]
pub struct ReceiveConfig {
    pub connections_per_shard_max: usize,
    pub header_bytes_max: usize,
    /// Largest compressed body accepted (413 above).
    pub body_bytes_max: usize,
    /// Bytes a shard's connections may hold together for request bodies beyond each
    /// one's kept buffer ([`INPUT_BYTES_KEPT`]); a body that does not fit gets 503 with
    /// `Retry-After`. Chunked bodies are outside it: one at a time per shard.
    pub bodies_bytes_max: usize,
    /// Largest decompressed body accepted, checked against the snappy header (413).
    pub decoded_bytes_max: usize,
    /// A refused body up to this size is read and dropped so the connection survives;
    /// above it the connection is closed after the answer.
    pub drain_bytes_max: usize,
    pub idle_timeout_ms: u64,
    pub read_timeout_ms: u64,
    pub write_timeout_ms: u64,
    /// `Retry-After` sent with the 503 that refuses a connection over the shard limit.
    pub retry_after_s: u32,
    pub limits: Limits,
    /// `[enrich.header_tags]`: (header name in lowercase, tag name), sorted by tag name.
    pub header_tags: Vec<(String, String)>,
    /// Longest header value taken as a tag (400 above).
    pub header_tag_bytes_max: usize,
}

impl Default for ReceiveConfig {
    fn default() -> Self {
        ReceiveConfig {
            connections_per_shard_max: 1024,
            header_bytes_max: 16 * 1024,
            body_bytes_max: 16 << 20,
            bodies_bytes_max: 64 << 20,
            decoded_bytes_max: 64 << 20,
            drain_bytes_max: 64 << 20,
            idle_timeout_ms: 300_000,
            read_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            retry_after_s: 5,
            limits: Limits::default(),
            header_tags: Vec::new(),
            header_tag_bytes_max: 256,
        }
    }
}

/// What every connection task of a shard shares (all single-threaded but `metrics`).
pub struct ShardContext<S> {
    pub id: usize,
    pub config: ReceiveConfig,
    pub metrics: Arc<Vec<ShardMetrics>>,
    pub ready: Arc<AtomicBool>,
    pub sink: S,
    open: Cell<usize>,
    /// Bytes held by connections for bodies beyond [`INPUT_BYTES_KEPT`] each (at most
    /// `config.bodies_bytes_max`).
    body_bytes_held: Cell<usize>,
    /// A connection is reading a chunked body (its size is unknown until read).
    chunked_in_flight: Cell<bool>,
    /// The header names of `config.header_tags`, for the head parser.
    header_names: Vec<String>,
    /// Decompression and decode buffers, shared by the shard's connections: a request
    /// is decoded and handed to the sink without a suspension point in between, so
    /// one set per shard serves them all (memory does not grow with connections).
    scratch: std::cell::RefCell<Scratch>,
}

/// What [`Conn::take`] did with a request body.
struct Taken {
    /// `None`: nothing valid to write.
    ticket: Option<Result<u64, crate::sink::SinkError>>,
    counts: promgate_proto::batch::Counts,
    /// Some series were refused.
    partial: Option<Partial>,
}

struct Partial {
    series: u32,
    samples: u32,
    histograms: u32,
    exemplars: u32,
    first: String,
    reasons: RejectCounts,
}

#[derive(Default)]
struct Scratch {
    decoded: Vec<u8>,
    batch: Batch,
    snappy: snap::raw::Decoder,
    reasons: RejectCounts,
}

impl<S> ShardContext<S> {
    pub fn new(
        id: usize,
        config: ReceiveConfig,
        metrics: Arc<Vec<ShardMetrics>>,
        ready: Arc<AtomicBool>,
        sink: S,
    ) -> Self {
        ShardContext {
            id,
            header_names: config.header_tags.iter().map(|(h, _)| h.clone()).collect(),
            config,
            metrics,
            ready,
            sink,
            open: Cell::new(0),
            body_bytes_held: Cell::new(0),
            chunked_in_flight: Cell::new(false),
            scratch: Default::default(),
        }
    }

    fn metrics(&self) -> &ShardMetrics {
        &self.metrics[self.id]
    }
}

/// Accepts connections forever, one task each.
pub async fn serve<S: Sink + 'static>(listener: TcpListener, ctx: Rc<ShardContext<S>>) {
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(shard = ctx.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let m = ctx.metrics();
        if ctx.open.get() >= ctx.config.connections_per_shard_max {
            m.connections_rejected.fetch_add(1, Relaxed);
            glommio::spawn_local(refuse(stream, ctx.config.retry_after_s)).detach();
            continue;
        }
        ctx.open.set(ctx.open.get() + 1);
        m.connections_total.fetch_add(1, Relaxed);
        m.connections_open.fetch_add(1, Relaxed);
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            let _ = stream.set_nodelay(true);
            let mut conn = Conn::new(stream, ctx.clone());
            if let Err(e) = conn.run().await {
                tracing::debug!(shard = ctx.id, error = %e, "connection ended");
            }
            ctx.open.set(ctx.open.get() - 1);
            ctx.metrics().connections_open.fetch_sub(1, Relaxed);
        })
        .detach();
    }
}

async fn refuse(mut stream: TcpStream, retry_after_s: u32) {
    let mut out = Vec::new();
    let retry = retry_after_s.to_string();
    http::write_response(
        &mut out,
        503,
        &[("Retry-After", &retry)],
        "text/plain; charset=utf-8",
        b"too many connections on this shard\n",
        true,
    );
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&out).await;
}

enum Route {
    Write,
    Metrics,
    Healthy,
    Ready,
    NotFound,
}

/// How a request ends: its status, extra headers, and message.
struct Answer {
    status: u16,
    message: String,
    /// 2.0 only: (samples, histograms, exemplars) written.
    written: Option<(u64, u64, u64)>,
    retry_after_s: Option<u32>,
    /// For 405: the method the path takes.
    allow: Option<&'static str>,
    /// The connection cannot be reused (framing lost or body too large to drain).
    close: bool,
}

impl Answer {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Answer {
            status,
            message: message.into(),
            written: None,
            retry_after_s: None,
            allow: None,
            close: false,
        }
    }

    fn not_allowed(allow: &'static str) -> Self {
        let mut a = Answer::new(405, format!("method not allowed: use {allow}"));
        a.allow = Some(allow);
        a
    }
}

struct Conn<S> {
    stream: TcpStream,
    ctx: Rc<ShardContext<S>>,
    input: Vec<u8>,
    filled: usize,
    chunked_body: Vec<u8>,
    out: Vec<u8>,
    /// Bytes of `input` beyond [`INPUT_BYTES_KEPT`] counted in the shard's
    /// `body_bytes_held`.
    held: usize,
    /// This connection is the shard's one chunked body in flight.
    chunked: bool,
}

impl<S> Drop for Conn<S> {
    fn drop(&mut self) {
        self.set_held(0);
        if self.chunked {
            self.ctx.chunked_in_flight.set(false);
        }
    }
}

impl<S> Conn<S> {
    /// Sets this connection's share of the shard's `body_bytes_held`.
    fn set_held(&mut self, held: usize) {
        let shard = self.ctx.body_bytes_held.get() + held - self.held;
        self.ctx.body_bytes_held.set(shard);
        self.ctx
            .metrics()
            .body_bytes_held
            .store(shard as u64, Relaxed);
        self.held = held;
    }
}

/// First size of a connection's input buffer.
const INPUT_BYTES_INITIAL: usize = 64 * 1024;
/// What a connection keeps between requests: a larger body's buffer is given back after
/// its request, so idle connections hold at most this each.
pub const INPUT_BYTES_KEPT: usize = 256 * 1024;

impl<S: Sink> Conn<S> {
    fn new(stream: TcpStream, ctx: Rc<ShardContext<S>>) -> Self {
        Conn {
            stream,
            ctx,
            input: vec![0; INPUT_BYTES_INITIAL],
            filled: 0,
            chunked_body: Vec::new(),
            out: Vec::new(),
            held: 0,
            chunked: false,
        }
    }

    /// Reserves what the body of `head` needs beyond [`INPUT_BYTES_KEPT`] from the
    /// shard's budget (or the shard's one chunked slot); `false` if it does not fit.
    fn reserve_body(&mut self, head: &Head) -> bool {
        if head.chunked {
            if self.ctx.chunked_in_flight.get() {
                return false;
            }
            self.ctx.chunked_in_flight.set(true);
            self.chunked = true;
            return true;
        }
        let end = head.len + head.content_length.unwrap_or(0) as usize;
        let need = end.max(self.input.len()).saturating_sub(INPUT_BYTES_KEPT);
        let extra = need.saturating_sub(self.held);
        let held = self.ctx.body_bytes_held.get();
        if held + extra > self.ctx.config.bodies_bytes_max {
            return false;
        }
        self.set_held(need);
        true
    }

    /// Gives back a large body's buffers after its request, and its reservation.
    fn release_body(&mut self) {
        if self.input.len() > INPUT_BYTES_KEPT && self.filled <= INPUT_BYTES_KEPT {
            self.input.truncate(INPUT_BYTES_KEPT);
            self.input.shrink_to_fit();
        }
        if self.chunked_body.capacity() > INPUT_BYTES_KEPT {
            self.chunked_body = Vec::new();
        }
        if std::mem::take(&mut self.chunked) {
            self.ctx.chunked_in_flight.set(false);
        }
        // Pipelined bytes beyond the kept size stay counted until they are used.
        self.set_held(self.input.len().saturating_sub(INPUT_BYTES_KEPT));
    }

    /// Reads more bytes into `input`; `Ok(0)` is end of stream.
    async fn fill(&mut self, timeout_ms: u64) -> io::Result<usize> {
        if self.filled == self.input.len() {
            let grown = self.input.len() * 2;
            self.input.resize(grown, 0);
        }
        self.stream
            .set_read_timeout(Some(Duration::from_millis(timeout_ms.max(1))))?;
        let n = self.stream.read(&mut self.input[self.filled..]).await?;
        self.filled += n;
        Ok(n)
    }

    /// Drops the first `n` bytes of input, keeping any pipelined bytes after them.
    fn consume(&mut self, n: usize) {
        self.input.copy_within(n..self.filled, 0);
        self.filled -= n;
    }

    async fn run(&mut self) -> io::Result<()> {
        loop {
            let Some(head) = self.read_head().await? else {
                return Ok(());
            };
            let answer = self.handle(&head).await?;
            self.release_body();
            let close = answer.close || head.close;
            self.respond(&answer, close).await?;
            if close {
                return Ok(());
            }
        }
    }

    /// The next request head, or `None` when the client is gone (or was answered and
    /// closed because its head was unusable).
    async fn read_head(&mut self) -> io::Result<Option<Head>> {
        let cfg = &self.ctx.config;
        let (idle_ms, read_ms, header_max) = (
            cfg.idle_timeout_ms,
            cfg.read_timeout_ms,
            cfg.header_bytes_max,
        );
        loop {
            if self.filled > 0 {
                match http::parse_head_with(&self.input[..self.filled], &self.ctx.header_names) {
                    Ok(Some(head)) => return Ok(Some(head)),
                    Ok(None) => {}
                    Err(e) => {
                        self.ctx.metrics().request_reject("http");
                        let mut a = Answer::new(400, e.to_string());
                        a.close = true;
                        self.respond(&a, true).await?;
                        return Ok(None);
                    }
                }
                if self.filled >= header_max {
                    self.ctx.metrics().request_reject("header_too_large");
                    let mut a = Answer::new(431, format!("request head over {header_max} bytes"));
                    a.close = true;
                    self.respond(&a, true).await?;
                    return Ok(None);
                }
            }
            let timeout = if self.filled == 0 { idle_ms } else { read_ms };
            match self.fill(timeout).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut && self.filled > 0 => {
                    self.ctx.metrics().request_reject("timeout");
                    let mut a = Answer::new(408, "timed out reading the request head");
                    a.close = true;
                    self.respond(&a, true).await?;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn handle(&mut self, head: &Head) -> io::Result<Answer> {
        let route = match &self.input[head.path.clone()] {
            b"/api/v1/prometheus" | b"/api/v1/write" => Route::Write,
            b"/metrics" => Route::Metrics,
            b"/-/healthy" => Route::Healthy,
            b"/-/ready" => Route::Ready,
            _ => Route::NotFound,
        };
        let allowed = match route {
            Route::Write => head.method == Method::Post,
            Route::NotFound => true,
            _ => head.method == Method::Get,
        };
        if !allowed || !matches!(route, Route::Write) {
            // Nothing to read from these bodies: drop them and answer.
            let mut answer = match (allowed, route) {
                (false, Route::Write) => Answer::not_allowed("POST"),
                (false, _) => Answer::not_allowed("GET"),
                (true, Route::NotFound) => Answer::new(404, "not found"),
                (true, Route::Metrics) => {
                    let mut text = String::new();
                    crate::metrics::render(&self.ctx.metrics, &mut text);
                    Answer::new(200, text)
                }
                (true, Route::Healthy) => Answer::new(200, "OK"),
                (true, Route::Ready) if self.ctx.ready.load(Relaxed) => Answer::new(200, "ready"),
                (true, _) => Answer::new(503, "starting"),
            };
            answer.close |= !self.skip_body(head).await?;
            return Ok(answer);
        }
        self.write(head).await
    }

    /// Tags from the request's headers (`[enrich.header_tags]`), sorted by tag name; an
    /// over-long or non-UTF-8 value is an error naming the header.
    fn header_tags(&self, head: &Head) -> Result<Vec<(String, String)>, String> {
        let cfg = &self.ctx.config;
        let mut out = Vec::with_capacity(head.wanted.len());
        for (i, range) in &head.wanted {
            let (header, tag) = &cfg.header_tags[*i];
            let v = std::str::from_utf8(&self.input[range.clone()])
                .map_err(|_| format!("header {header} is not UTF-8"))?
                .trim();
            if v.len() > cfg.header_tag_bytes_max {
                return Err(format!(
                    "header {header} is {} bytes, over the {} allowed for tag {tag}",
                    v.len(),
                    cfg.header_tag_bytes_max
                ));
            }
            if !v.is_empty() && !out.iter().any(|(n, _)| n == tag) {
                out.push((tag.clone(), v.to_string()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The remote_write chain.
    async fn write(&mut self, head: &Head) -> io::Result<Answer> {
        let ctx = self.ctx.clone();
        let metrics = ctx.metrics();
        // Headers first: 415 before any byte of the body is looked at.
        let content_type = head.content_type.clone().map(|r| &self.input[r]);
        let content_encoding = head.content_encoding.clone().map(|r| &self.input[r]);
        let checked = remote_write::protocol_for(content_type)
            .and_then(|p| remote_write::check_encoding(content_encoding).map(|_| p))
            .map_err(|e| (e, remote_write::protocol_for(content_type).ok()));
        let protocol = match checked {
            Ok(p) => p,
            Err((e, protocol)) => {
                let mut answer = self.refused(&e, protocol);
                answer.close |= !self.skip_body(head).await?;
                return Ok(answer);
            }
        };
        let header_tags = match self.header_tags(head) {
            Ok(t) => t,
            Err(message) => {
                metrics.request_reject("bad_header");
                let mut answer = Answer::new(400, message);
                answer.written = (protocol == Protocol::V2).then_some((0, 0, 0));
                answer.close |= !self.skip_body(head).await?;
                return Ok(answer);
            }
        };
        let body_max = self.ctx.config.body_bytes_max;
        if head.content_length.is_some_and(|n| n > body_max as u64) {
            metrics.request_reject("body_too_large");
            let mut answer = Answer::new(
                413,
                format!(
                    "body of {} bytes is over the limit of {body_max}",
                    head.content_length.unwrap_or(0)
                ),
            );
            answer.written = (protocol == Protocol::V2).then_some((0, 0, 0));
            answer.close |= !self.skip_body(head).await?;
            return Ok(answer);
        }
        if !self.reserve_body(head) {
            metrics.request_reject("body_budget");
            let mut answer = Answer::new(
                503,
                format!(
                    "the shard's request bodies in flight are at receive.bodies_bytes_max ({} bytes); retry",
                    self.ctx.config.bodies_bytes_max
                ),
            );
            answer.retry_after_s = Some(self.ctx.config.retry_after_s);
            answer.written = (protocol == Protocol::V2).then_some((0, 0, 0));
            answer.close |= !self.skip_body(head).await?;
            return Ok(answer);
        }
        if head.expect_continue {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await?;
        }
        let body = match self.read_body(head).await? {
            Ok(range) => range,
            Err(mut answer) => {
                answer.written = (protocol == Protocol::V2).then_some((0, 0, 0));
                return Ok(answer);
            }
        };
        let started = Instant::now();
        let body_len = body.1.len();
        let answer = self
            .decode_and_sink(protocol, body.0, body.1, started, &header_tags)
            .await;
        metrics.receive_bytes.fetch_add(body_len as u64, Relaxed);
        Ok(answer)
    }

    async fn decode_and_sink(
        &mut self,
        protocol: Protocol,
        consumed: usize,
        body: std::ops::Range<usize>,
        started: Instant,
        header_tags: &[(String, String)],
    ) -> Answer {
        let taken = self.take(protocol, consumed, body, started, header_tags);
        self.finish_body(consumed);
        let taken = match taken {
            Ok(t) => t,
            Err(refused) => return refused,
        };
        let ctx = self.ctx.clone();
        let metrics = ctx.metrics();
        let written = match taken.ticket {
            Some(Ok(ticket)) => ctx.sink.settled(ticket).await,
            Some(Err(e)) => Err(e),
            None => Ok(()),
        };
        if let Err(e) = written {
            metrics.request_reject("sink_unavailable");
            let mut a = Answer::new(503, e.to_string());
            a.retry_after_s = Some(e.retry_after_s());
            a.written = (protocol == Protocol::V2).then_some((0, 0, 0));
            return a;
        }
        let counts = taken.counts;
        metrics.series.fetch_add(counts.series, Relaxed);
        metrics.samples.fetch_add(counts.samples, Relaxed);
        metrics.histograms.fetch_add(counts.histograms, Relaxed);
        metrics.exemplars.fetch_add(counts.exemplars, Relaxed);
        metrics.metadata.fetch_add(counts.metadata, Relaxed);
        let written = (protocol == Protocol::V2).then_some((
            counts.samples,
            counts.histograms,
            counts.exemplars,
        ));
        let Some(rj) = taken.partial else {
            let mut a = Answer::new(204, "");
            a.written = written;
            return a;
        };
        // Record reasons only when something was refused (batch-level telemetry).
        for (i, n) in rj.reasons.0.iter().enumerate() {
            if *n > 0 {
                metrics.series_rejects[i].fetch_add(u64::from(*n), Relaxed);
            }
        }
        metrics.request_reject("partial");
        let total = counts.series + u64::from(rj.series);
        let mut a = Answer::new(
            400,
            format!(
                "{} of {total} series rejected ({} samples, {} histograms, {} exemplars not written); first: {}",
                rj.series, rj.samples, rj.histograms, rj.exemplars, rj.first
            ),
        );
        a.written = written;
        a
    }

    /// Decompresses and decodes the body into the shard's scratch buffers and hands
    /// what is valid to the sink, all without a suspension point (the buffers are free
    /// for the next request when this returns). `Err`: the answer for a body that is
    /// refused whole.
    fn take(
        &self,
        protocol: Protocol,
        consumed: usize,
        body: std::ops::Range<usize>,
        started: Instant,
        header_tags: &[(String, String)],
    ) -> Result<Taken, Answer> {
        let ctx = &self.ctx;
        let metrics = ctx.metrics();
        let cfg = &ctx.config;
        let compressed: &[u8] = if consumed == 0 {
            &self.chunked_body[body]
        } else {
            &self.input[body]
        };
        let mut scratch = ctx.scratch.borrow_mut();
        let sc = &mut *scratch;
        let decoded_len = remote_write::decompress(
            compressed,
            cfg.decoded_bytes_max,
            &mut sc.snappy,
            &mut sc.decoded,
        )
        .map_err(|e| self.refused(&e, Some(protocol)))?;
        let raw = &sc.decoded[..decoded_len];
        let result = decode(protocol, raw, &cfg.limits, &mut sc.batch, &mut sc.reasons);
        metrics.decode_time(started.elapsed().as_nanos() as u64);
        metrics.decode_bytes.fetch_add(decoded_len as u64, Relaxed);
        // The reasons go with this request only (and reach the metrics only if it is
        // answered); the scratch starts the next one from zero.
        let reasons = std::mem::take(&mut sc.reasons);
        if let Err(e) = result {
            return Err(self.refused(&RequestError::Decode(e), Some(protocol)));
        }
        let counts = sc.batch.counts();
        let tag_refs: Vec<(&str, &str)> = header_tags
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let ticket = (!sc.batch.is_empty()).then(|| {
            ctx.sink.accept(Accepted {
                protocol,
                compressed,
                decoded: Decoded {
                    batch: &sc.batch,
                    body: raw,
                },
                header_tags: &tag_refs,
            })
        });
        let rj = &sc.batch.rejected;
        let partial = (rj.series > 0).then(|| Partial {
            series: rj.series,
            samples: rj.samples,
            histograms: rj.histograms,
            exemplars: rj.exemplars,
            first: rj.first.clone().unwrap_or_else(|| "?".into()),
            reasons,
        });
        Ok(Taken {
            ticket,
            counts,
            partial,
        })
    }

    fn refused(&self, e: &RequestError, protocol: Option<Protocol>) -> Answer {
        self.ctx.metrics().request_reject(e.reason());
        let mut a = Answer::new(e.status(), e.to_string());
        a.written = (protocol == Some(Protocol::V2)).then_some((0, 0, 0));
        a
    }

    /// Reads a whole body. Returns (bytes of input to consume after use, or 0 when the
    /// body was de-chunked into `chunked_body`; the body's range), or the answer that
    /// refuses it.
    async fn read_body(
        &mut self,
        head: &Head,
    ) -> io::Result<Result<(usize, std::ops::Range<usize>), Answer>> {
        let body_max = self.ctx.config.body_bytes_max;
        let read_ms = self.ctx.config.read_timeout_ms;
        if head.chunked {
            loop {
                match http::dechunk(
                    &self.input[head.len..self.filled],
                    &mut self.chunked_body,
                    body_max,
                ) {
                    Ok(Chunked::Done { consumed }) => {
                        self.consume(head.len + consumed);
                        let n = self.chunked_body.len();
                        return Ok(Ok((0, 0..n)));
                    }
                    Ok(Chunked::NeedMore) => {}
                    Err(ChunkedError::TooLarge) => {
                        self.ctx.metrics().request_reject("body_too_large");
                        let mut a = Answer::new(
                            413,
                            format!("chunked body over the limit of {body_max} bytes"),
                        );
                        a.close = true;
                        return Ok(Err(a));
                    }
                    Err(ChunkedError::Malformed) => {
                        self.ctx.metrics().request_reject("http");
                        let mut a = Answer::new(400, "malformed chunked body");
                        a.close = true;
                        return Ok(Err(a));
                    }
                }
                if self.read_more(read_ms).await?.is_err() {
                    return Ok(Err(self.timed_out()));
                }
            }
        }
        let len = head.content_length.unwrap_or(0) as usize;
        let end = head.len + len;
        if self.input.len() < end {
            self.input.resize(end, 0);
        }
        while self.filled < end {
            if self.read_more(read_ms).await?.is_err() {
                return Ok(Err(self.timed_out()));
            }
        }
        Ok(Ok((end, head.len..end)))
    }

    /// One more read within a request. `Ok(Err(()))` means the read timed out.
    async fn read_more(&mut self, timeout_ms: u64) -> io::Result<Result<(), ()>> {
        match self.fill(timeout_ms).await {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed mid-request",
            )),
            Ok(_) => Ok(Ok(())),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(Err(())),
            Err(e) => Err(e),
        }
    }

    fn timed_out(&self) -> Answer {
        self.ctx.metrics().request_reject("timeout");
        let mut a = Answer::new(408, "timed out reading the request body");
        a.close = true;
        a
    }

    fn finish_body(&mut self, consumed: usize) {
        if consumed > 0 {
            self.consume(consumed);
        }
    }

    /// Reads and drops a body nobody will use. Returns false when the connection cannot
    /// be reused (chunked or too large to drain); the caller then closes it.
    async fn skip_body(&mut self, head: &Head) -> io::Result<bool> {
        if head.chunked {
            self.consume(head.len);
            return Ok(false);
        }
        let mut remaining = head.content_length.unwrap_or(0);
        if remaining > self.ctx.config.drain_bytes_max as u64 {
            self.consume(head.len);
            return Ok(false);
        }
        self.consume(head.len);
        let read_ms = self.ctx.config.read_timeout_ms;
        loop {
            let take = remaining.min(self.filled as u64) as usize;
            self.consume(take);
            remaining -= take as u64;
            if remaining == 0 {
                return Ok(true);
            }
            if self.read_more(read_ms).await?.is_err() {
                return Ok(false);
            }
        }
    }

    async fn respond(&mut self, a: &Answer, close: bool) -> io::Result<()> {
        self.ctx.metrics().status(a.status);
        self.out.clear();
        let mut headers: Vec<(&str, String)> = Vec::new();
        if let Some((s, h, e)) = a.written {
            headers.push(("X-Prometheus-Remote-Write-Samples-Written", s.to_string()));
            headers.push((
                "X-Prometheus-Remote-Write-Histograms-Written",
                h.to_string(),
            ));
            headers.push(("X-Prometheus-Remote-Write-Exemplars-Written", e.to_string()));
        }
        if let Some(r) = a.retry_after_s {
            headers.push(("Retry-After", r.to_string()));
        }
        if let Some(allow) = a.allow {
            headers.push(("Allow", allow.to_string()));
        }
        let refs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let mut body = a.message.clone().into_bytes();
        if !body.is_empty() && !body.ends_with(b"\n") {
            body.push(b'\n');
        }
        let content_type = if a.status == 200 && a.message.starts_with("# HELP") {
            "text/plain; version=0.0.4; charset=utf-8"
        } else {
            "text/plain; charset=utf-8"
        };
        http::write_response(&mut self.out, a.status, &refs, content_type, &body, close);
        self.stream.set_write_timeout(Some(Duration::from_millis(
            self.ctx.config.write_timeout_ms.max(1),
        )))?;
        self.stream.write_all(&self.out).await?;
        self.stream.flush().await
    }
}
