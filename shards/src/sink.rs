//! sink: where a decoded, validated batch goes before the request is answered.
//!
//! The receive path answers 2xx only after [`Sink::write`] resolves `Ok`, so the sink
//! decides what an acknowledgement means. Today the only sink is [`CountingSink`]:
//! it counts and drops, so **acknowledgement is not yet durable**. The WAL sink
//! (issue: write-ahead log) replaces it without touching the receive path.

use promgate_proto::Decoded;
use std::cell::Cell;
use std::future::Future;

/// Why a sink could not take a batch; both answer 503 with `Retry-After`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkError {
    /// Out of budget (disk, queue): retry after this many seconds.
    Full { retry_after_s: u32 },
    /// The write failed (I/O error); nothing from this request may be acknowledged.
    Failed(String),
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkError::Full { retry_after_s } => {
                write!(f, "agent is full; retry after {retry_after_s}s")
            }
            SinkError::Failed(e) => write!(f, "write failed: {e}"),
        }
    }
}

/// One per shard; never shared across threads.
pub trait Sink {
    fn write(&self, batch: Decoded<'_>) -> impl Future<Output = Result<(), SinkError>>;
}

/// Counts what it is given and keeps nothing. Stands in for the WAL until it lands.
#[derive(Default)]
pub struct CountingSink {
    pub batches: Cell<u64>,
    pub samples: Cell<u64>,
}

impl Sink for CountingSink {
    async fn write(&self, batch: Decoded<'_>) -> Result<(), SinkError> {
        self.batches.set(self.batches.get() + 1);
        self.samples
            .set(self.samples.get() + batch.batch.samples.len() as u64);
        Ok(())
    }
}
