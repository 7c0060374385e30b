//! HTTP/1.1 framing for the receive path: request heads parsed with `httparse`,
//! chunked bodies, and responses written into a reused buffer. No I/O here: the
//! connection loop in `receive` feeds bytes in and writes bytes out.

use std::ops::Range;

/// Most headers a request may carry; Prometheus sends about eight.
pub const HEADERS_MAX: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Other,
}

/// A parsed request head. Header values are byte ranges of the connection's input
/// buffer, so the head borrows nothing and the buffer can be read into again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the head, including the final blank line.
    pub len: usize,
    pub method: Method,
    /// The path without its query string.
    pub path: Range<usize>,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// The client asked to close, or spoke HTTP/1.0 without keep-alive.
    pub close: bool,
    pub expect_continue: bool,
    pub content_type: Option<Range<usize>>,
    pub content_encoding: Option<Range<usize>>,
    /// Values of the headers asked for by [`parse_head_with`]: (index in its list, value).
    pub wanted: Vec<(usize, Range<usize>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// httparse refused the bytes.
    Malformed,
    /// A `Content-Length` that is not a number, or two that disagree.
    BadContentLength,
    /// A `Transfer-Encoding` other than chunked.
    UnsupportedTransferEncoding,
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HeadError::Malformed => "malformed HTTP request head",
            HeadError::BadContentLength => "invalid Content-Length",
            HeadError::UnsupportedTransferEncoding => {
                "unsupported Transfer-Encoding (only chunked)"
            }
        })
    }
}

fn range_of(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// Parses a request head from the start of `buf`; `Ok(None)` means more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    parse_head_with(buf, &[])
}

/// [`parse_head`], also collecting the values of the headers named in `wanted`
/// (lowercase).
pub fn parse_head_with(buf: &[u8], wanted: &[String]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(HeadError::Malformed),
    };
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some("POST") => Method::Post,
        _ => Method::Other,
    };
    let full_path = req.path.ok_or(HeadError::Malformed)?.as_bytes();
    let path_len = full_path
        .iter()
        .position(|b| *b == b'?')
        .unwrap_or(full_path.len());
    let path = range_of(buf, &full_path[..path_len]);
    let mut head = Head {
        len,
        method,
        path,
        content_length: None,
        chunked: false,
        close: req.version == Some(0),
        expect_continue: false,
        content_type: None,
        content_encoding: None,
        wanted: Vec::new(),
    };
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        if let Some(i) = wanted
            .iter()
            .position(|w| name.eq_ignore_ascii_case(w.as_bytes()))
        {
            head.wanted.push((i, range_of(buf, value)));
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(HeadError::BadContentLength)?;
            if head.content_length.is_some_and(|m| m != n) {
                return Err(HeadError::BadContentLength);
            }
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                head.chunked = true;
            } else if !value.trim_ascii().eq_ignore_ascii_case(b"identity") {
                return Err(HeadError::UnsupportedTransferEncoding);
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    head.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    head.close = false;
                }
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            head.expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"content-type") {
            head.content_type = Some(range_of(buf, value));
        } else if name.eq_ignore_ascii_case(b"content-encoding") {
            head.content_encoding = Some(range_of(buf, value));
        }
    }
    if head.chunked {
        // RFC 9112: Transfer-Encoding overrides Content-Length.
        head.content_length = None;
    }
    Ok(Some(head))
}

/// Progress of a chunked body decoder over the bytes after the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunked {
    /// The body is complete; `consumed` input bytes belong to it (including trailers).
    Done { consumed: usize },
    /// More input is needed.
    NeedMore,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkedError {
    Malformed,
    TooLarge,
}

/// Longest chunk-size line accepted (size plus extensions).
const CHUNK_LINE_BYTES_MAX: usize = 1024;

/// Decodes a complete chunked body from `input` into `out` (cleared first), or asks for
/// more bytes. Re-run from the start when more input arrives: bodies here are small
/// compared with the cost of the decode after them, and this keeps no state.
pub fn dechunk(
    input: &[u8],
    out: &mut Vec<u8>,
    body_bytes_max: usize,
) -> Result<Chunked, ChunkedError> {
    out.clear();
    let mut pos = 0;
    loop {
        let Some(line_end) = find_crlf(&input[pos..]) else {
            return if input.len() - pos > CHUNK_LINE_BYTES_MAX {
                Err(ChunkedError::Malformed)
            } else {
                Ok(Chunked::NeedMore)
            };
        };
        let line = &input[pos..pos + line_end];
        let size_part = line
            .split(|b| *b == b';')
            .next()
            .unwrap_or(&[])
            .trim_ascii();
        let size_text = std::str::from_utf8(size_part).map_err(|_| ChunkedError::Malformed)?;
        let size = usize::from_str_radix(size_text, 16).map_err(|_| ChunkedError::Malformed)?;
        pos += line_end + 2;
        if size == 0 {
            // Trailers: header lines until an empty line.
            loop {
                let Some(end) = find_crlf(&input[pos..]) else {
                    return Ok(Chunked::NeedMore);
                };
                pos += end + 2;
                if end == 0 {
                    return Ok(Chunked::Done { consumed: pos });
                }
            }
        }
        if out.len() + size > body_bytes_max {
            return Err(ChunkedError::TooLarge);
        }
        if input.len() < pos + size + 2 {
            return Ok(Chunked::NeedMore);
        }
        out.extend_from_slice(&input[pos..pos + size]);
        if &input[pos + size..pos + size + 2] != b"\r\n" {
            return Err(ChunkedError::Malformed);
        }
        pos += size + 2;
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Appends a complete response to `out`. A 204 carries no body and no length.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
    close: bool,
) {
    use std::io::Write;
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    if status != 204 {
        let _ = write!(
            out,
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if status != 204 {
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_prometheus_head() {
        let raw = b"POST /api/v1/write?x=1 HTTP/1.1\r\nHost: a\r\nContent-Encoding: snappy\r\n\
Content-Type: application/x-protobuf\r\nContent-Length: 12\r\nUser-Agent: Prometheus/2.42.0\r\n\r\nBODY";
        let head = parse_head(raw).unwrap().unwrap();
        assert_eq!(head.method, Method::Post);
        assert_eq!(&raw[head.path.clone()], b"/api/v1/write");
        assert_eq!(head.content_length, Some(12));
        assert_eq!(&raw[head.content_type.unwrap()], b"application/x-protobuf");
        assert_eq!(&raw[head.content_encoding.unwrap()], b"snappy");
        assert!(!head.close);
        assert_eq!(&raw[head.len..], b"BODY");
    }

    #[test]
    fn partial_and_malformed_heads() {
        assert_eq!(parse_head(b"POST / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(
            parse_head(b"\x00\x01garbage\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(HeadError::BadContentLength)
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HeadError::BadContentLength)
        );
        let h = parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(h.close, "HTTP/1.0 closes by default");
    }

    #[test]
    fn dechunks_with_extensions_and_trailers() {
        let input = b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let mut out = Vec::new();
        let done = dechunk(input, &mut out, 1024).unwrap();
        assert_eq!(out, b"abcdefg");
        assert_eq!(
            done,
            Chunked::Done {
                consumed: input.len() - 4
            }
        );
        for cut in 0..input.len() - 4 {
            assert_eq!(
                dechunk(&input[..cut], &mut out, 1024),
                Ok(Chunked::NeedMore),
                "cut at {cut}"
            );
        }
        assert_eq!(
            dechunk(b"zz\r\n", &mut out, 1024),
            Err(ChunkedError::Malformed)
        );
        assert_eq!(
            dechunk(b"4\r\nabcdXX", &mut out, 1024),
            Err(ChunkedError::Malformed)
        );
        assert_eq!(
            dechunk(b"400\r\n", &mut out, 1000),
            Err(ChunkedError::TooLarge)
        );
    }
}
