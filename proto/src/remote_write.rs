//! remote_write request contract: which schema a request's headers select, and the
//! checked snappy decompression of its body. Pure functions; the HTTP shell maps
//! [`RequestError`] to a status once.

use crate::batch::Protocol;
use crate::decode::DecodeError;

/// A request that cannot be accepted, before or while decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// 415: checked before the body is touched.
    UnsupportedContentType(String),
    /// 415: checked before the body is touched.
    UnsupportedEncoding(String),
    /// 413: the snappy header declares more than the cap; nothing was allocated.
    DecodedTooLarge { declared: u64, max: u64 },
    /// 400: not a valid snappy block stream.
    Snappy(String),
    /// 400: not a valid protobuf of the selected schema.
    Decode(DecodeError),
}

impl RequestError {
    pub fn status(&self) -> u16 {
        match self {
            RequestError::UnsupportedContentType(_) | RequestError::UnsupportedEncoding(_) => 415,
            RequestError::DecodedTooLarge { .. } => 413,
            RequestError::Snappy(_) | RequestError::Decode(_) => 400,
        }
    }

    /// The metrics label for this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            RequestError::UnsupportedContentType(_) => "content_type",
            RequestError::UnsupportedEncoding(_) => "content_encoding",
            RequestError::DecodedTooLarge { .. } => "decoded_too_large",
            RequestError::Snappy(_) => "snappy",
            RequestError::Decode(_) => "protobuf",
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::UnsupportedContentType(ct) => write!(
                f,
                "unsupported Content-Type {ct:?}: want application/x-protobuf \
                 (proto=prometheus.WriteRequest or proto=io.prometheus.write.v2.Request)"
            ),
            RequestError::UnsupportedEncoding(ce) => {
                write!(
                    f,
                    "unsupported Content-Encoding {ce:?}: only snappy (block format) is accepted"
                )
            }
            RequestError::DecodedTooLarge { declared, max } => write!(
                f,
                "snappy body declares {declared} decoded bytes, over the limit of {max}"
            ),
            RequestError::Snappy(e) => write!(f, "corrupt snappy body: {e}"),
            RequestError::Decode(e) => write!(f, "{e}"),
        }
    }
}

const MEDIA_TYPE: &str = "application/x-protobuf";
const PROTO_V1: &str = "prometheus.WriteRequest";
const PROTO_V2: &str = "io.prometheus.write.v2.Request";

/// The schema a `Content-Type` selects. A missing header means 1.0, as in Prometheus.
pub fn protocol_for(content_type: Option<&[u8]>) -> Result<Protocol, RequestError> {
    let Some(raw) = content_type else {
        return Ok(Protocol::V1);
    };
    let unsupported =
        || RequestError::UnsupportedContentType(String::from_utf8_lossy(raw).into_owned());
    let text = std::str::from_utf8(raw).map_err(|_| unsupported())?;
    let mut parts = text.split(';');
    let media = parts.next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case(MEDIA_TYPE) {
        return Err(unsupported());
    }
    let mut protocol = Protocol::V1;
    for param in parts {
        let param = param.trim();
        if param.is_empty() {
            continue;
        }
        let (key, value) = param.split_once('=').ok_or_else(unsupported)?;
        if !key.trim().eq_ignore_ascii_case("proto") {
            continue;
        }
        let value = value.trim().trim_matches('"');
        protocol = if value == PROTO_V1 {
            Protocol::V1
        } else if value == PROTO_V2 {
            Protocol::V2
        } else {
            return Err(unsupported());
        };
    }
    Ok(protocol)
}

/// Accepts a missing `Content-Encoding` (Prometheus treats it as snappy) or `snappy`.
pub fn check_encoding(content_encoding: Option<&[u8]>) -> Result<(), RequestError> {
    match content_encoding {
        None => Ok(()),
        Some(raw) if raw.trim_ascii().eq_ignore_ascii_case(b"snappy") => Ok(()),
        Some(raw) => Err(RequestError::UnsupportedEncoding(
            String::from_utf8_lossy(raw).into_owned(),
        )),
    }
}

/// Decompresses a snappy block body into `out`, reusing its memory, and returns the
/// decoded length. The declared length is checked against `decoded_bytes_max` before
/// anything is allocated, so a tiny "snappy bomb" costs nothing.
pub fn decompress(
    body: &[u8],
    decoded_bytes_max: usize,
    decoder: &mut snap::raw::Decoder,
    out: &mut Vec<u8>,
) -> Result<usize, RequestError> {
    let declared =
        snap::raw::decompress_len(body).map_err(|e| RequestError::Snappy(e.to_string()))?;
    if declared > decoded_bytes_max {
        return Err(RequestError::DecodedTooLarge {
            declared: declared as u64,
            max: decoded_bytes_max as u64,
        });
    }
    if out.len() < declared {
        // Grow once; later requests reuse the memory without clearing it, because the
        // decompressor overwrites exactly `declared` bytes or fails.
        out.resize(declared, 0);
    }
    decoder
        .decompress(body, &mut out[..declared])
        .map_err(|e| RequestError::Snappy(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let cases: &[(Option<&str>, Option<Protocol>)] = &[
            (None, Some(Protocol::V1)),
            (Some("application/x-protobuf"), Some(Protocol::V1)),
            (Some("Application/X-Protobuf"), Some(Protocol::V1)),
            (
                Some("application/x-protobuf;proto=prometheus.WriteRequest"),
                Some(Protocol::V1),
            ),
            (
                Some("application/x-protobuf; proto=io.prometheus.write.v2.Request"),
                Some(Protocol::V2),
            ),
            (
                Some("application/x-protobuf;proto=\"io.prometheus.write.v2.Request\""),
                Some(Protocol::V2),
            ),
            (
                Some("application/x-protobuf;proto=io.prometheus.write.v3.Request"),
                None,
            ),
            (Some("application/json"), None),
            (Some("image/png"), None),
            (Some(""), None),
            (Some("application/x-protobuf;garbage"), None),
        ];
        for (ct, want) in cases {
            let got = protocol_for(ct.map(str::as_bytes)).ok();
            assert_eq!(got, *want, "Content-Type {ct:?}");
        }
    }

    #[test]
    fn encodings() {
        assert!(check_encoding(None).is_ok());
        assert!(check_encoding(Some(b"snappy")).is_ok());
        assert!(check_encoding(Some(b"SNAPPY")).is_ok());
        for bad in ["gzip", "deflate", "zstd", "snappy-framed", ""] {
            let e = check_encoding(Some(bad.as_bytes())).unwrap_err();
            assert_eq!(e.status(), 415, "{bad}");
        }
    }

    #[test]
    fn snappy_bomb_is_refused_before_allocation() {
        // A 6-byte body whose preamble declares 1 GiB.
        let mut body = Vec::new();
        let mut n: u64 = 1 << 30;
        while n >= 0x80 {
            body.push((n as u8) | 0x80);
            n >>= 7;
        }
        body.push(n as u8);
        let mut out = Vec::new();
        let err = decompress(&body, 1 << 20, &mut snap::raw::Decoder::new(), &mut out).unwrap_err();
        assert_eq!(err.status(), 413);
        assert_eq!(
            out.capacity(),
            0,
            "nothing may be allocated for a refused body"
        );
    }

    #[test]
    fn corrupt_snappy_is_400() {
        let mut out = Vec::new();
        let body = snap::raw::Encoder::new()
            .compress_vec(b"hello hello hello hello")
            .unwrap();
        let truncated = &body[..body.len() - 3];
        let err =
            decompress(truncated, 1 << 20, &mut snap::raw::Decoder::new(), &mut out).unwrap_err();
        assert_eq!(err.status(), 400);
        let n = decompress(&body, 1 << 20, &mut snap::raw::Decoder::new(), &mut out).unwrap();
        assert_eq!(&out[..n], b"hello hello hello hello");
    }
}
