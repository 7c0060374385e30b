//! Minimal blocking HTTP/1.1 client for one keep-alive connection: `http://` URL parsing,
//! remote_write request heads, and response parsing with httparse (status, Content-Length
//! or chunked bodies read and discarded, `Connection: close`, `Retry-After`).

use anyhow::{bail, Context};
use promgate_loadtest::Protocol;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const MAX_RESPONSE_HEADERS: usize = 64;
const READ_CHUNK_BYTES: usize = 16 * 1024;
const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
const DEFAULT_HTTP_PORT: u16 = 80;

/// Where requests go: socket address, `Host` header and request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: String,
    pub host: String,
    pub path: String,
}

/// Parses `http://host[:port][/path]`.
pub fn parse_url(url: &str) -> anyhow::Result<Target> {
    let rest = url.strip_prefix("http://").with_context(|| {
        format!("malformed URL {url:?}: only http://host:port/path is supported")
    })?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], Some(&authority[i + 1..])),
        _ => (authority, None),
    };
    let bad_host = host.is_empty()
        || host.contains(['@', ' ', '/'])
        || (host.contains(':') && !host.starts_with('['));
    if bad_host || path.contains(char::is_whitespace) {
        bail!("malformed URL {url:?}");
    }
    let port: u16 = match port {
        Some(p) => p
            .parse()
            .with_context(|| format!("malformed URL {url:?}: bad port {p:?}"))?,
        None => DEFAULT_HTTP_PORT,
    };
    Ok(Target {
        addr: format!("{host}:{port}"),
        host: authority.to_string(),
        path: path.to_string(),
    })
}

/// The request head for a remote_write POST of `body_len` snappy bytes.
pub fn request_head(t: &Target, protocol: Protocol, body_len: usize) -> Vec<u8> {
    format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: promgate-loadtest/{}\r\nContent-Type: {}\r\n\
         Content-Encoding: snappy\r\nX-Prometheus-Remote-Write-Version: {}\r\nContent-Length: {body_len}\r\n\r\n",
        t.path,
        t.host,
        env!("CARGO_PKG_VERSION"),
        protocol.content_type(),
        protocol.version_header(),
    )
    .into_bytes()
}

/// What the harness needs to know about a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// `Retry-After` in ms when given as delay-seconds.
    pub retry_after_ms: Option<u64>,
    /// The server will close (or closed) the connection; reconnect before the next request.
    pub close: bool,
}

enum BodyLen {
    Fixed(usize),
    Chunked,
    UntilClose,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One keep-alive connection; bytes past the current response stay buffered.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
}

impl Conn {
    pub fn connect(addr: &str, io_timeout: Duration) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(io_timeout))?;
        stream.set_write_timeout(Some(io_timeout))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(READ_CHUNK_BYTES),
            pos: 0,
        })
    }

    /// Sends one complete request and reads (and discards the body of) its response.
    pub fn round_trip(&mut self, request: &[u8]) -> io::Result<Answer> {
        self.stream.write_all(request)?;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            let head_len = match resp.parse(&self.buf[self.pos..]) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial)
                    if self.buf.len() - self.pos < MAX_RESPONSE_HEAD_BYTES =>
                {
                    self.fill()?;
                    continue;
                }
                Ok(httparse::Status::Partial) => return Err(invalid("response head too large")),
                Err(e) => return Err(invalid(format!("bad response: {e}"))),
            };
            let (answer, body) = interpret(&resp)?;
            self.pos += head_len;
            if (100..200).contains(&answer.status) {
                continue; // interim response; the real one follows
            }
            match body {
                BodyLen::Fixed(n) => self.discard(n)?,
                BodyLen::Chunked => self.discard_chunked()?,
                BodyLen::UntilClose => self.discard_to_eof()?,
            }
            return Ok(answer);
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        self.buf.drain(..self.pos);
        self.pos = 0;
        let old = self.buf.len();
        self.buf.resize(old + READ_CHUNK_BYTES, 0);
        let read = self.stream.read(&mut self.buf[old..]);
        self.buf.truncate(old + *read.as_ref().unwrap_or(&0));
        match read? {
            0 => Err(io::ErrorKind::UnexpectedEof.into()),
            _ => Ok(()),
        }
    }

    fn discard(&mut self, mut n: usize) -> io::Result<()> {
        loop {
            let take = (self.buf.len() - self.pos).min(n);
            self.pos += take;
            n -= take;
            if n == 0 {
                return Ok(());
            }
            self.fill()?;
        }
    }

    fn take_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                let line = self.buf[self.pos..self.pos + i]
                    .strip_suffix(b"\r")
                    .unwrap_or(&self.buf[self.pos..self.pos + i]);
                let line = line.to_vec();
                self.pos += i + 1;
                return Ok(line);
            }
            if self.buf.len() - self.pos > MAX_RESPONSE_HEAD_BYTES {
                return Err(invalid("chunk line too long"));
            }
            self.fill()?;
        }
    }

    fn discard_chunked(&mut self) -> io::Result<()> {
        loop {
            let line = self.take_line()?;
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .ok_or_else(|| invalid("bad chunk size"))?;
            if size == 0 {
                while !self.take_line()?.is_empty() {} // trailers up to the empty line
                return Ok(());
            }
            self.discard(size + 2)?;
        }
    }

    fn discard_to_eof(&mut self) -> io::Result<()> {
        loop {
            self.pos = self.buf.len();
            match self.fill() {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                other => other?,
            }
        }
    }
}

fn interpret(resp: &httparse::Response) -> io::Result<(Answer, BodyLen)> {
    let status = resp.code.ok_or_else(|| invalid("no status code"))?;
    let (mut length, mut chunked, mut close, mut keep_alive, mut retry_after_ms) =
        (None, false, false, false, None);
    for h in resp.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match h.name.to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| invalid("bad Content-Length"))?,
                )
            }
            "transfer-encoding" => chunked |= value.contains("chunked"),
            "connection" => {
                close |= value.contains("close");
                keep_alive |= value.contains("keep-alive");
            }
            "retry-after" => {
                retry_after_ms = value.parse::<u64>().ok().map(|s| s.saturating_mul(1000))
            }
            _ => {}
        }
    }
    close |= resp.version == Some(0) && !keep_alive;
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        BodyLen::Fixed(0)
    } else if chunked {
        BodyLen::Chunked
    } else if let Some(n) = length {
        BodyLen::Fixed(n)
    } else {
        close = true;
        BodyLen::UntilClose
    };
    Ok((
        Answer {
            status,
            retry_after_ms,
            close,
        },
        body,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_urls() {
        let t = parse_url("http://127.0.0.1:38086/api/v1/prometheus").expect("valid");
        assert_eq!(
            (t.addr.as_str(), t.host.as_str(), t.path.as_str()),
            ("127.0.0.1:38086", "127.0.0.1:38086", "/api/v1/prometheus")
        );
        let t = parse_url("http://localhost").expect("valid");
        assert_eq!((t.addr.as_str(), t.path.as_str()), ("localhost:80", "/"));
        assert_eq!(
            parse_url("http://[::1]:9090/w").expect("v6").addr,
            "[::1]:9090"
        );
        assert_eq!(parse_url("http://[::1]/w").expect("v6").addr, "[::1]:80");
        for bad in [
            "https://x/",
            "127.0.0.1:80/",
            "http://",
            "http://h:port/",
            "http://h:99999/",
            "http://a b/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_fixed_chunked_and_close_delimited_responses() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let replies: [&[u8]; 3] = [
                b"HTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 429 Too Many\r\nRetry-After: 2\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n0\r\nT: 1\r\n\r\n",
                b"HTTP/1.0 501 Nope\r\nContent-Type: text/plain\r\n\r\nunsupported",
            ];
            for reply in replies {
                let mut req = [0u8; 1024];
                let mut got = 0;
                while !req[..got].ends_with(b"body") {
                    got += s.read(&mut req[got..]).expect("read");
                }
                s.write_all(reply).expect("write");
            }
        });
        let mut c = Conn::connect(&addr, Duration::from_secs(5)).expect("connect");
        let a = c
            .round_trip(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody")
            .expect("1");
        assert_eq!(
            a,
            Answer {
                status: 204,
                retry_after_ms: None,
                close: false
            }
        );
        let a = c
            .round_trip(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody")
            .expect("2");
        assert_eq!(
            a,
            Answer {
                status: 429,
                retry_after_ms: Some(2000),
                close: false
            }
        );
        let a = c
            .round_trip(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody")
            .expect("3");
        assert_eq!(
            a,
            Answer {
                status: 501,
                retry_after_ms: None,
                close: true
            }
        );
        server.join().expect("server");
    }
}
