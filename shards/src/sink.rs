//! sink: where an accepted request goes before it is answered.
//!
//! The receive path answers 2xx only after [`Sink::settled`] resolves `Ok`, so the sink
//! decides what an acknowledgement means. [`WalSink`] (the agent's) resolves once the
//! request is durable in the shard's write-ahead log.

use crate::enrich::{EnrichMetrics, Enricher};
use crate::metrics::ShardMetrics;
use crate::prepared::{put_ship_section, SeriesHasher};
use crate::wal::format::{remote_write_payload, KIND_REMOTE_WRITE, PAYLOAD_VERSION};
use crate::wal::storage::Storage;
use crate::wal::{Wal, WalError};
use promgate_proto::{Decoded, Protocol};
use std::future::Future;

/// Why a sink could not take a request; both answer 503 with `Retry-After`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkError {
    /// Out of budget (disk): retry after this many seconds.
    Full { retry_after_s: u32 },
    /// The write failed (I/O error); nothing from this request may be acknowledged.
    Failed { reason: String, retry_after_s: u32 },
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkError::Full { retry_after_s } => write!(
                f,
                "agent is at its disk budget; retry after {retry_after_s}s"
            ),
            SinkError::Failed {
                reason,
                retry_after_s,
            } => {
                write!(
                    f,
                    "could not make the request durable ({reason}); retry after {retry_after_s}s"
                )
            }
        }
    }
}

impl SinkError {
    pub fn retry_after_s(&self) -> u32 {
        match self {
            SinkError::Full { retry_after_s } | SinkError::Failed { retry_after_s, .. } => {
                *retry_after_s
            }
        }
    }
}

impl From<WalError> for SinkError {
    fn from(e: WalError) -> Self {
        match e {
            WalError::Full { retry_after_s } => SinkError::Full { retry_after_s },
            WalError::Failed {
                reason,
                retry_after_s,
            } => SinkError::Failed {
                reason,
                retry_after_s,
            },
        }
    }
}

/// One accepted request: the body as it came, and what the decoder kept of it.
#[derive(Clone, Copy)]
pub struct Accepted<'a> {
    pub protocol: Protocol,
    /// The snappy-compressed body exactly as received.
    pub compressed: &'a [u8],
    /// The decoded, validated batch (refused series already left out and listed in
    /// `batch.rejected.indexes`).
    pub decoded: Decoded<'a>,
    /// Tags taken from the request's headers (`[enrich.header_tags]`), sorted by name.
    pub header_tags: &'a [(&'a str, &'a str)],
}

/// One per shard; never shared across threads.
///
/// Two steps, so the receive path can decode every request of a shard into one set of
/// buffers: [`Sink::accept`] takes what it needs from the request at once (the
/// caller's buffers are free again when it returns), and [`Sink::settled`] resolves
/// when the request may be acknowledged.
pub trait Sink {
    /// Takes the request; returns the ticket to wait on.
    fn accept(&self, request: Accepted<'_>) -> Result<u64, SinkError>;
    /// Resolves once the request of `ticket` is acknowledged (durable).
    fn settled(&self, ticket: u64) -> impl Future<Output = Result<(), SinkError>>;
}

/// Makes each request durable in the shard's WAL before it is acknowledged, with its
/// enrichment (`crate::enrich`) in the same record.
pub struct WalSink<S: Storage> {
    /// Shared with the shard's shipper, which reads and truncates it.
    pub wal: std::rc::Rc<Wal<S>>,
    /// `None`: records carry an empty enrichment section (series get no tags).
    pub enricher: Option<Enricher>,
    pub metrics: std::sync::Arc<Vec<ShardMetrics>>,
    pub shard: usize,
    /// The shard's fingerprint keys, shared with its shipper: records carry ship-ready
    /// columns (`crate::prepared`). `None`: they do not, and the shipper decodes every
    /// record's body.
    pub hasher: Option<SeriesHasher>,
}

/// The protocol byte of WAL payloads.
pub fn protocol_byte(p: Protocol) -> u8 {
    match p {
        Protocol::V1 => 1,
        Protocol::V2 => 2,
    }
}

/// Writes the WAL payload of one accepted request: its refused series, its enrichment
/// (none without an enricher), its ship-ready columns (none without a hasher) and its
/// body as received.
pub fn request_payload(
    out: &mut Vec<u8>,
    request: &Accepted<'_>,
    enricher: Option<&Enricher>,
    hasher: Option<&SeriesHasher>,
    metrics: &EnrichMetrics,
) {
    remote_write_payload(
        out,
        protocol_byte(request.protocol),
        &request.decoded.batch.rejected.indexes,
        |o| {
            if let Some(e) = enricher {
                e.section(&request.decoded, request.header_tags, metrics, o)
            }
        },
        |o| {
            if let Some(h) = hasher {
                put_ship_section(o, h, &request.decoded)
            }
        },
        request.compressed,
    )
}

impl<S: Storage> Sink for WalSink<S> {
    /// The WAL record (request, enrichment, ship-ready columns) is queued for the next
    /// group commit; the ticket is the record's sequence number.
    fn accept(&self, request: Accepted<'_>) -> Result<u64, SinkError> {
        let metrics = &self.metrics[self.shard].enrich;
        let seq = self
            .wal
            .enqueue(KIND_REMOTE_WRITE, PAYLOAD_VERSION, |out| {
                request_payload(
                    out,
                    &request,
                    self.enricher.as_ref(),
                    self.hasher.as_ref(),
                    metrics,
                )
            })?;
        Ok(seq)
    }

    async fn settled(&self, ticket: u64) -> Result<(), SinkError> {
        self.wal
            .durable(ticket)
            .await
            .map(drop)
            .map_err(SinkError::from)
    }
}
