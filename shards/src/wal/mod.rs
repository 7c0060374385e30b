//! wal: the per-shard write-ahead log that makes an acknowledgement mean "durable".
//!
//! Each shard owns one [`Wal`] over its own directory; nothing is shared between
//! shards (the disk work runs on the shard's own blocking thread). The
//! record and segment layout, the checksum and what recovery does with a torn tail or
//! a corrupt record are documented in [`format`].
//!
//! ## Write and flush are separate steps
//!
//! [`Wal::append`] encodes a record into the shard's pending buffer (a memory copy, no
//! I/O) and then waits until a *commit* covers it. One task at a time is the committer:
//! it takes everything pending, writes it to the open segment in one write, and
//! fdatasyncs once for all of it (group commit). Every record therefore satisfies
//! `written >= durable`, and `append` returns only once `durable >= seq`: the caller
//! answers 2xx after that and never before. Records that arrive while a commit runs
//! are picked up by the next one, so one fsync covers many requests under load.
//!
//! `wal.fsync` chooses the trade-off:
//! - `batch` (default): group commit. A commit takes every pending record (up to
//!   `group_commit_records_max`) and fsyncs once; records that arrive meanwhile form
//!   the next group. An optional `group_commit_delay_us` (default 0) makes the
//!   committer first wait for more records. With closed-loop senders (each Prometheus
//!   shard waits for its answer before sending more) the groups form on their own
//!   during each fsync; in `cargo bench --bench wal` the delay made no consistent
//!   difference to throughput (within this disk's run-to-run noise), and at low load
//!   it only adds latency. It is there for open-loop, bursty senders.
//! - `always`: one fsync per request, in order: the simplest guarantee, and the slowest.
//! - `never`: write but never fsync: an acknowledged record can be lost if the machine
//!   (not just the process) crashes. For benchmarks, or when the sender keeps its own WAL.
//!
//! ## Budget and failures
//!
//! When the segments on disk reach `max_bytes`, `append` refuses at once with
//! [`WalError::Full`] (503 with `Retry-After`) and accepts again as soon as truncation
//! frees space; nothing acknowledged is ever deleted to make room. A failed write or
//! fsync (EIO, ENOSPC) fails every record of that commit with [`WalError::Failed`]
//! (503, never 2xx), seals the segment at its last durable byte, and the next append
//! after `retry_after_s` starts a new segment.
//!
//! ## Truncation
//!
//! [`Wal::ack`] is the shipper's acknowledgement: every sealed segment whose records are
//! all at or below the acknowledged sequence number is deleted, on the shard's blocking
//! thread (an unlink and directory fsyncs wait for the disk; the shard keeps serving).
//! Up to [`storage::SPARES_MAX`] deleted segment files are kept as spares
//! (`<first_seq>.spare`) and written over by the next new segments, which saves the
//! unlink's trim and the new file's block allocation, both of which stall every
//! fdatasync on the filesystem (see `FileStorage::recycle`). The new records are
//! followed by the old file's records until they reach its end; those have lower
//! sequence numbers, so the scan never takes them for the segment's (it stops at the
//! first record that is not the next one), and recovery cuts them off the newest
//! segment like a torn tail. A crash (or a failed creation) between renaming the spare
//! and syncing its new header leaves a segment whose header names an older first
//! record: it held nothing acknowledged, and recovery removes it.
//! `retention_bytes` / `retention_age_s` (both off by default) delete the oldest sealed
//! segments even if unshipped; what they drop is counted as unshipped.

pub mod format;
pub mod storage;

use crate::metrics::WalMetrics;
use format::{Scan, SegmentHeader};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};
use storage::{SegmentWriter, Storage};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    Always,
    Batch,
    Never,
}

impl std::str::FromStr for Fsync {
    type Err = String;
    fn from_str(s: &str) -> Result<Fsync, String> {
        match s {
            "always" => Ok(Fsync::Always),
            "batch" => Ok(Fsync::Batch),
            "never" => Ok(Fsync::Never),
            _ => Err(format!(
                "wal.fsync must be \"always\", \"batch\" or \"never\", not {s:?}"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct WalConfig {
    pub fsync: Fsync,
    pub group_commit_delay_us: u64,
    pub group_commit_records_max: usize,
    pub segment_bytes: u64,
    /// Disk budget of this shard's WAL; at it, appends are refused with 503.
    pub max_bytes: u64,
    pub retry_after_s: u32,
    /// 0 = off. Deletes the oldest sealed segments above this total (unshipped data).
    pub retention_bytes: u64,
    /// 0 = off. Deletes sealed segments older than this (unshipped data).
    pub retention_age_s: u64,
    /// Bytes of the newest committed records kept in memory for the shipper, which
    /// reads older ones from the segment files.
    pub memory_bytes: usize,
    /// Bytes read from a segment file at a time when replaying from disk (at least one
    /// whole record). Not in the configuration file; tests make it small.
    pub replay_window_bytes: usize,
    /// Segments are written with `O_DIRECT` where the filesystem allows it (see
    /// `storage::FileSegmentWriter`); `false` writes through the page cache. Read by
    /// the caller that opens the `FileStorage`.
    pub direct_io: bool,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            fsync: Fsync::Batch,
            group_commit_delay_us: 0,
            group_commit_records_max: 256,
            segment_bytes: 64 << 20,
            max_bytes: 1 << 30,
            retry_after_s: 5,
            retention_bytes: 0,
            retention_age_s: 0,
            memory_bytes: 4 << 20,
            replay_window_bytes: 4 << 20,
            direct_io: true,
        }
    }
}

/// Why a record was not made durable. Both answer 503 with `Retry-After`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalError {
    Full { retry_after_s: u32 },
    Failed { reason: String, retry_after_s: u32 },
}

impl std::fmt::Display for WalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WalError::Full { retry_after_s } => {
                write!(
                    f,
                    "write-ahead log is at its disk budget; retry after {retry_after_s}s"
                )
            }
            WalError::Failed {
                reason,
                retry_after_s,
            } => {
                write!(
                    f,
                    "write-ahead log write failed ({reason}); retry after {retry_after_s}s"
                )
            }
        }
    }
}

/// What start-up found on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub segments: u64,
    pub records: u64,
    pub bytes: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub torn_tail_bytes: u64,
    /// (segment first_seq, corruption) for every unreadable stretch.
    pub corruption: Vec<(u64, format::Corruption)>,
    /// Segments whose header could not be read: (first_seq from the name, why).
    pub unreadable: Vec<(u64, String)>,
}

#[derive(Clone, Copy, Debug)]
struct Sealed {
    first_seq: u64,
    /// `first_seq - 1` when empty.
    last_seq: u64,
    bytes: u64,
    created_ms: u64,
}

/// Wakes every waiter when a commit finishes (single-threaded).
#[derive(Default)]
struct Notify {
    generation: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
}

impl Notify {
    fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    fn wait(&self) -> impl Future<Output = ()> + '_ {
        let seen = self.generation.get();
        std::future::poll_fn(move |cx| {
            if self.generation.get() != seen {
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

struct State<W> {
    next_seq: u64,
    durable_seq: u64,
    /// Records up to here were in a failed commit: their appends fail.
    failed_upto: u64,
    pending: Vec<u8>,
    /// Encoded length of each pending record, oldest first.
    pending_lens: VecDeque<usize>,
    pending_first_seq: u64,
    spare: Vec<u8>,
    committing: bool,
    writer: Option<W>,
    open_first_seq: u64,
    open_bytes: u64,
    open_created_ms: u64,
    /// Durable bytes of the open segment (where to cut it after a failed write).
    open_durable_bytes: u64,
    sealed: VecDeque<Sealed>,
    /// Bytes of all segments, including what is pending.
    total_bytes: u64,
    failure: Option<(String, Instant)>,
}

pub struct Wal<S: Storage> {
    storage: S,
    shard: u32,
    config: WalConfig,
    metrics: Arc<Vec<crate::metrics::ShardMetrics>>,
    state: RefCell<State<S::Writer>>,
    committed: Notify,
    /// The newest committed buffers, `(first_seq, records)`, so the shipper reads what
    /// was just written from memory instead of from the segment file.
    recent: RefCell<VecDeque<(u64, std::rc::Rc<Vec<u8>>)>>,
    recent_bytes: Cell<usize>,
    /// Where the last replay from a segment file stopped: (segment, next seq, offset),
    /// so the next one starts there instead of at the segment's start.
    replay_pos: Cell<Option<(u64, u64, usize)>>,
    /// The part of a segment file the last replay from disk read (or
    /// [`Wal::prefetch`] read for the next one); dropped once replays are served from
    /// memory again.
    window: RefCell<Option<Window>>,
    /// Replays that had to read a whole segment and scan it (records not in sequence).
    whole_segment_reads: Cell<u64>,
    /// [`Wal::ack`] is deleting segments.
    retiring: Cell<bool>,
}

/// Bytes of one segment file read for replay, from offset `at`.
struct Window {
    segment: u64,
    at: usize,
    data: Vec<u8>,
}

impl Window {
    /// Whether the record starting at segment offset `at` is wholly in the window.
    fn covers(&self, at: usize) -> bool {
        at >= self.at
            && format::covered_len_at(&self.data, at - self.at).is_some_and(|n| {
                (at - self.at).saturating_add(n + format::RECORD_PREFIX_BYTES) <= self.data.len()
            })
    }
}

/// For a read of a segment from a record's offset on: when the record's length field
/// says it runs past what was read (and is no longer than a record can be), how many
/// bytes to read to hold it whole.
fn reread_len(data: &[u8]) -> Option<usize> {
    let covered = format::covered_len_at(data, 0)?;
    let need = covered + format::RECORD_PREFIX_BYTES;
    (need > data.len() && covered <= format::RECORD_BYTES_MAX).then_some(need)
}

/// Why a replay returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Every durable record from the start was visited.
    Done,
    /// The visitor asked to stop.
    Visitor,
    /// The next record is in a part of a segment not read yet.
    NotRead,
}

/// Polling step while the committer gathers records in `batch` mode.
const GATHER_STEP_US: u64 = 200;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<S: Storage> Wal<S> {
    /// Recovers the shard's segments (truncating a torn tail of the newest one) and
    /// returns the log ready for appends, plus what was found.
    pub fn open(
        storage: S,
        shard: u32,
        config: WalConfig,
        metrics: Arc<Vec<crate::metrics::ShardMetrics>>,
    ) -> std::io::Result<(Wal<S>, Recovered)> {
        let mut rec = Recovered::default();
        let mut sealed = VecDeque::new();
        let ids = storage.list()?;
        let mut next_seq = 1u64;
        for (i, first) in ids.iter().copied().enumerate() {
            let data = storage.read(first)?;
            let newest = i + 1 == ids.len();
            if data.len() < format::HEADER_BYTES {
                // Created, but not even its header became durable: it never held an
                // acknowledged record (a record is acknowledged only after a sync that
                // covers the header). Removing it needs no free space.
                storage.remove(first)?;
                rec.torn_tail_bytes += data.len() as u64;
                continue;
            }
            let scan = match format::scan(&data) {
                Ok(s) if s.header.first_seq == first => s,
                Ok(s) if s.header.first_seq < first => {
                    // A spare file renamed to a new segment whose new header never
                    // became durable (a crash, or a failed creation before any write):
                    // it holds only an acknowledged segment's old records, and never
                    // held an acknowledged record of its own (the first sync covers
                    // the header).
                    storage.remove(first)?;
                    rec.torn_tail_bytes += data.len() as u64;
                    continue;
                }
                Ok(s) => {
                    let why = format!("header says first_seq {}", s.header.first_seq);
                    rec.unreadable.push((first, why));
                    continue;
                }
                Err(_) if newest => {
                    // A torn creation of the newest segment, for the same reason.
                    storage.remove(first)?;
                    rec.torn_tail_bytes += data.len() as u64;
                    continue;
                }
                Err(e) => {
                    rec.unreadable.push((first, e));
                    continue;
                }
            };
            let Scan {
                header,
                records,
                valid_end,
                tail_bytes,
                corruption,
            } = scan;
            let mut bytes = data.len() as u64;
            // The next segment starts right after this one's last record: nothing is
            // missing, so bytes after it are not lost records but what a close that did
            // not finish left (a spare's old records, the zeros of direct writes).
            let whole = newest || records.last().map_or(first, |r| r.seq + 1) == ids[i + 1];
            if tail_bytes > 0 {
                if whole {
                    storage.truncate(first, valid_end as u64)?;
                    rec.torn_tail_bytes += tail_bytes as u64;
                    bytes = valid_end as u64;
                } else {
                    rec.corruption.push((
                        first,
                        format::Corruption {
                            offset: valid_end,
                            bytes: tail_bytes,
                            lost_seqs: (
                                records.last().map_or(first, |r| r.seq + 1),
                                ids[i + 1] - 1,
                            ),
                        },
                    ));
                }
            }
            rec.corruption
                .extend(corruption.into_iter().map(|c| (first, c)));
            if records.is_empty() {
                // Holds nothing, but its name is taken: never hand out `first` again.
                next_seq = next_seq.max(first + 1);
            }
            let last_seq = records.last().map_or(first - 1, |r| r.seq);
            rec.segments += 1;
            rec.records += records.len() as u64;
            rec.bytes += bytes;
            if !records.is_empty() {
                rec.first_seq.get_or_insert(records[0].seq);
                rec.last_seq = Some(last_seq);
            }
            next_seq = next_seq.max(last_seq + 1);
            sealed.push_back(Sealed {
                first_seq: first,
                last_seq,
                bytes,
                created_ms: header.created_ms,
            });
        }
        // Sequence numbers never go back, even if every segment was acknowledged and deleted.
        if let Some(floor) = storage.load_floor()? {
            next_seq = next_seq.max(floor);
        }
        let m = &metrics[shard as usize].wal;
        m.recovered_records.fetch_add(rec.records, Relaxed);
        m.recovered_segments.fetch_add(rec.segments, Relaxed);
        m.torn_tail_bytes.fetch_add(rec.torn_tail_bytes, Relaxed);
        let lost: u64 = rec
            .corruption
            .iter()
            // A range is empty only where segments overlap (bytes after a sealed
            // segment's last record with nothing missing are cut above): it counts 0.
            .map(|(_, c)| (c.lost_seqs.1 + 1).saturating_sub(c.lost_seqs.0))
            .sum();
        m.corrupt_records.fetch_add(lost, Relaxed);
        m.bytes.store(rec.bytes, Relaxed);
        m.segments.store(sealed.len() as u64, Relaxed);
        let wal = Wal {
            storage,
            shard,
            config,
            metrics,
            state: RefCell::new(State {
                next_seq,
                durable_seq: next_seq - 1,
                failed_upto: 0,
                pending: Vec::new(),
                pending_lens: VecDeque::new(),
                pending_first_seq: next_seq,
                spare: Vec::new(),
                committing: false,
                writer: None,
                open_first_seq: 0,
                open_bytes: 0,
                open_created_ms: 0,
                open_durable_bytes: 0,
                sealed,
                total_bytes: rec.bytes,
                failure: None,
            }),
            committed: Notify::default(),
            recent: RefCell::new(VecDeque::new()),
            recent_bytes: Cell::new(0),
            replay_pos: Cell::new(None),
            window: RefCell::new(None),
            whole_segment_reads: Cell::new(0),
            retiring: Cell::new(false),
        };
        Ok((wal, rec))
    }

    fn metrics(&self) -> &WalMetrics {
        &self.metrics[self.shard as usize].wal
    }

    pub fn config(&self) -> &WalConfig {
        &self.config
    }

    /// Highest sequence number known durable.
    pub fn durable_seq(&self) -> u64 {
        self.state.borrow().durable_seq
    }

    pub fn total_bytes(&self) -> u64 {
        self.state.borrow().total_bytes
    }

    /// Appends one record built in place by `payload`, and resolves once it is durable
    /// (or written, with `fsync = never`). Returns its sequence number.
    pub async fn append(
        &self,
        kind: u8,
        payload_format: u8,
        payload: impl FnOnce(&mut Vec<u8>),
    ) -> Result<u64, WalError> {
        let seq = self.enqueue(kind, payload_format, payload)?;
        self.durable(seq).await
    }

    /// The first half of [`Wal::append`]: gives the record its sequence number and
    /// queues it for the next commit, without waiting.
    pub fn enqueue(
        &self,
        kind: u8,
        payload_format: u8,
        payload: impl FnOnce(&mut Vec<u8>),
    ) -> Result<u64, WalError> {
        let retry_after_s = self.config.retry_after_s;
        {
            let mut st = self.state.borrow_mut();
            if let Some((reason, at)) = &st.failure {
                if at.elapsed() < Duration::from_secs(u64::from(retry_after_s)) {
                    return Err(WalError::Failed {
                        reason: reason.clone(),
                        retry_after_s,
                    });
                }
                // Time to try again: the next commit opens a fresh segment.
                st.failure = None;
            }
            if st.total_bytes >= self.config.max_bytes {
                self.metrics().backpressure.fetch_add(1, Relaxed);
                return Err(WalError::Full { retry_after_s });
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            if st.pending_lens.is_empty() {
                st.pending_first_seq = seq;
            }
            let before = st.pending.len();
            format::append_record(&mut st.pending, seq, kind, payload_format, payload);
            st.total_bytes += (st.pending.len() - before) as u64;
            let len = st.pending.len() - before;
            st.pending_lens.push_back(len);
            Ok(seq)
        }
    }

    /// The second half of [`Wal::append`]: resolves once record `seq` is durable (or
    /// its write failed), committing when no commit is under way.
    pub async fn durable(&self, seq: u64) -> Result<u64, WalError> {
        let retry_after_s = self.config.retry_after_s;
        loop {
            let (durable, failed_upto, committing) = {
                let st = self.state.borrow();
                (st.durable_seq, st.failed_upto, st.committing)
            };
            if durable >= seq {
                return Ok(seq);
            }
            if failed_upto >= seq {
                let reason = self
                    .state
                    .borrow()
                    .failure
                    .as_ref()
                    .map_or_else(|| "write failed".into(), |f| f.0.clone());
                return Err(WalError::Failed {
                    reason,
                    retry_after_s,
                });
            }
            if committing {
                self.committed.wait().await;
            } else {
                self.commit().await;
            }
        }
    }

    /// Gathers (in `batch` mode), writes and syncs everything pending. One at a time.
    async fn commit(&self) {
        self.state.borrow_mut().committing = true;
        if self.config.fsync == Fsync::Batch {
            let started = Instant::now();
            let limit = Duration::from_micros(self.config.group_commit_delay_us);
            loop {
                let before = self.state.borrow().pending_lens.len();
                if before >= self.config.group_commit_records_max || started.elapsed() >= limit {
                    break;
                }
                let step = Duration::from_micros(GATHER_STEP_US)
                    .min(limit.saturating_sub(started.elapsed()));
                glommio::timer::sleep(step).await;
                if self.state.borrow().pending_lens.len() == before {
                    break; // the shard went quiet: nobody else to wait for
                }
            }
        }
        let (mut buf, records, first_seq, last_seq, writer) = {
            let mut st = self.state.borrow_mut();
            // `always` takes one record per fsync; otherwise up to the cap.
            let cap = if self.config.fsync == Fsync::Always {
                1
            } else {
                self.config.group_commit_records_max
            };
            let records = st.pending_lens.len().min(cap);
            let bytes: usize = st.pending_lens.drain(..records).sum();
            let mut spare = std::mem::take(&mut st.spare);
            let buf = if bytes == st.pending.len() {
                std::mem::replace(&mut st.pending, spare)
            } else {
                spare.extend_from_slice(&st.pending[..bytes]);
                st.pending.drain(..bytes);
                spare
            };
            let first = st.pending_first_seq;
            let last = first + records as u64 - 1;
            st.pending_first_seq = last + 1;
            (buf, records, first, last, st.writer.take())
        };
        if records > 0 {
            let mut writer = writer;
            match self.write_and_sync(&mut writer, &buf, first_seq).await {
                Ok(()) => {
                    let bytes = buf.len() as u64;
                    buf = self.remember(first_seq, buf);
                    let w = writer.expect("a successful write leaves a writer");
                    self.committed_ok(w, bytes, records, last_seq).await;
                }
                Err(e) => {
                    // Its write completed (failed): nothing of it is still in flight.
                    drop(writer);
                    self.committed_err(e, buf.len() as u64, last_seq);
                }
            }
        } else {
            self.state.borrow_mut().writer = writer;
        }
        buf.clear();
        let mut st = self.state.borrow_mut();
        st.spare = buf;
        st.committing = false;
        drop(st);
        self.committed.notify_all();
    }

    async fn write_and_sync(
        &self,
        slot: &mut Option<S::Writer>,
        buf: &[u8],
        first_seq: u64,
    ) -> std::io::Result<()> {
        if slot.is_none() {
            let created_ms = now_ms();
            let header = SegmentHeader {
                shard: self.shard,
                first_seq,
                created_ms,
            }
            .encode();
            let w = self.storage.create(first_seq, &header).await?;
            let mut st = self.state.borrow_mut();
            st.open_first_seq = first_seq;
            st.open_bytes = header.len() as u64;
            st.open_durable_bytes = 0;
            st.open_created_ms = created_ms;
            st.total_bytes += header.len() as u64;
            self.publish(&st);
            *slot = Some(w);
        }
        let writer = slot.as_mut().expect("set above");
        writer.write(buf).await?;
        let fdatasync = self.config.fsync != Fsync::Never;
        let t = Instant::now();
        writer.flush(fdatasync).await?;
        if fdatasync {
            self.metrics()
                .fsync_seconds
                .observe(t.elapsed().as_secs_f64());
        }
        Ok(())
    }

    async fn committed_ok(&self, writer: S::Writer, bytes: u64, records: usize, last_seq: u64) {
        let m = self.metrics();
        m.appended_records.fetch_add(records as u64, Relaxed);
        m.appended_bytes.fetch_add(bytes, Relaxed);
        m.commit_records.observe(records as f64);
        let rotate = {
            let mut st = self.state.borrow_mut();
            st.durable_seq = last_seq;
            st.open_bytes += bytes;
            st.open_durable_bytes = st.open_bytes;
            self.publish(&st);
            st.open_bytes >= self.config.segment_bytes
        };
        if !rotate {
            self.state.borrow_mut().writer = Some(writer);
            return;
        }
        // Seal: close syncs and cuts the file to its records (a spare's old records, or
        // the zeros after direct writes). The records are already durable, so a failed
        // close only costs the next segment; the cut is tried once more, since bytes
        // after the records of a segment that is not the newest read as corruption at
        // the next start.
        if let Err(e) = writer.close().await {
            tracing::warn!(shard = self.shard, error = %e, "closing a full WAL segment failed");
            let (first, bytes) = {
                let st = self.state.borrow();
                (st.open_first_seq, st.open_bytes)
            };
            if let Err(e) = self.storage.truncate(first, bytes) {
                tracing::warn!(shard = self.shard, segment = first, error = %e, "could not cut the full WAL segment to its records");
            }
        }
        {
            let mut st = self.state.borrow_mut();
            let sealed = Sealed {
                first_seq: st.open_first_seq,
                last_seq,
                bytes: st.open_bytes,
                created_ms: st.open_created_ms,
            };
            st.sealed.push_back(sealed);
            st.open_first_seq = 0;
            st.open_bytes = 0;
            self.publish(&st);
        }
        self.apply_retention();
    }

    fn committed_err(&self, e: std::io::Error, bytes: u64, last_seq: u64) {
        self.metrics().write_errors.fetch_add(1, Relaxed);
        tracing::error!(shard = self.shard, error = %e, "WAL write failed; answering 503 until it works again");
        let mut st = self.state.borrow_mut();
        st.failed_upto = last_seq;
        st.failure = Some((e.to_string(), Instant::now()));
        st.total_bytes = st.total_bytes.saturating_sub(bytes);
        // Seal the broken segment at its last durable byte, so recovery never sees the
        // half-written commit as corruption in the middle of the log.
        if st.open_first_seq != 0 {
            let (first, keep) = (st.open_first_seq, st.open_durable_bytes);
            // Cutting needs no free space, unlike deleting (which records the sequence
            // floor first). A segment cut to nothing is removed at the next start.
            if let Err(e) = self.storage.truncate(first, keep) {
                tracing::warn!(shard = self.shard, segment = first, error = %e, "could not trim the failed WAL segment");
            }
            if keep == 0 {
                st.total_bytes = st.total_bytes.saturating_sub(st.open_bytes);
            } else {
                let (last_seq, created_ms) = (st.durable_seq, st.open_created_ms);
                st.sealed.push_back(Sealed {
                    first_seq: first,
                    last_seq,
                    bytes: keep,
                    created_ms,
                });
            }
            st.open_first_seq = 0;
            st.open_bytes = 0;
        }
        self.publish(&st);
    }

    /// Updates the size gauges from the state.
    fn publish(&self, st: &State<S::Writer>) {
        let m = self.metrics();
        m.bytes.store(st.total_bytes, Relaxed);
        m.segments.store(
            st.sealed.len() as u64 + u64::from(st.open_first_seq != 0),
            Relaxed,
        );
    }

    /// The shipper's acknowledgement: records up to `seq` are safe elsewhere. Deletes
    /// every sealed segment that holds nothing newer ([`Storage::retire`]). Returns the
    /// segments deleted. One deletion runs at a time: an ack that comes while one runs
    /// deletes nothing, and the next ack after it picks up what is left.
    pub async fn ack(&self, seq: u64) -> std::io::Result<usize> {
        if self.retiring.replace(true) {
            return Ok(0);
        }
        // Cleared however this ends, even if the future is dropped while it waits.
        struct Retiring<'a>(&'a Cell<bool>);
        impl Drop for Retiring<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        let _retiring = Retiring(&self.retiring);
        let (firsts, next_seq) = {
            let st = self.state.borrow();
            let done = st.sealed.iter().take_while(|s| s.last_seq <= seq);
            (done.map(|s| s.first_seq).collect::<Vec<_>>(), st.next_seq)
        };
        if firsts.is_empty() {
            return Ok(0);
        }
        let (deleted, result) = self.storage.retire(next_seq, firsts).await;
        {
            let mut st = self.state.borrow_mut();
            for _ in 0..deleted {
                // Nothing else removes sealed segments while `retiring` is set.
                if let Some(s) = st.sealed.pop_front() {
                    st.total_bytes = st.total_bytes.saturating_sub(s.bytes);
                }
            }
        }
        self.metrics()
            .truncated_segments
            .fetch_add(deleted as u64, Relaxed);
        self.publish(&self.state.borrow());
        result.map(|()| deleted)
    }

    /// Interim, until the shipper acknowledges: drop the oldest sealed segments above
    /// the size or age limits, counting what was never shipped.
    fn apply_retention(&self) {
        let (bytes_max, age_max_ms) = (
            self.config.retention_bytes,
            self.config.retention_age_s * 1000,
        );
        // Not while [`Wal::ack`] deletes the oldest segments itself.
        if bytes_max == 0 && age_max_ms == 0 || self.retiring.get() {
            return;
        }
        loop {
            let drop_front = {
                let st = self.state.borrow();
                match st.sealed.front() {
                    Some(s) => {
                        (bytes_max > 0 && st.total_bytes > bytes_max)
                            || (age_max_ms > 0
                                && now_ms().saturating_sub(s.created_ms) > age_max_ms)
                    }
                    None => false,
                }
            };
            if !drop_front {
                break;
            }
            let s = self
                .state
                .borrow_mut()
                .sealed
                .pop_front()
                .expect("checked above");
            let next_seq = self.state.borrow().next_seq;
            if let (_, Err(e)) = storage::retire_now(&self.storage, next_seq, &[s.first_seq]) {
                tracing::warn!(shard = self.shard, error = %e, "WAL retention could not delete a segment");
                self.state.borrow_mut().sealed.push_front(s);
                break;
            }
            let records = s.last_seq + 1 - s.first_seq;
            tracing::warn!(
                shard = self.shard,
                records,
                "WAL retention deleted records that were never shipped"
            );
            self.metrics()
                .retention_dropped_records
                .fetch_add(records, Relaxed);
            let mut st = self.state.borrow_mut();
            st.total_bytes = st.total_bytes.saturating_sub(s.bytes);
        }
        self.publish(&self.state.borrow());
    }

    /// Keeps a committed buffer for [`Wal::replay`] (the buffer itself, not a copy),
    /// dropping the oldest ones beyond `memory_bytes` (counted by capacity). Returns an
    /// empty buffer for the next commit: the capacity of one that was dropped, when
    /// nothing else holds it, so the commit buffers are recycled, not reallocated.
    fn remember(&self, first_seq: u64, mut buf: Vec<u8>) -> Vec<u8> {
        // A recycled buffer keeps the capacity of the largest commit it ever held (a
        // burst of 16 records is 3.5 MB where one is 220 KB): trimmed, so the tail holds
        // as many records as `memory_bytes` allows rather than a few half-empty buffers.
        // Buffers of 1 MiB and more are their own mappings, so this is a remap, not a copy.
        if buf.capacity() > buf.len() + buf.len() / 4 {
            buf.shrink_to_fit();
        }
        let mut recent = self.recent.borrow_mut();
        let mut bytes = self.recent_bytes.get() + buf.capacity();
        recent.push_back((first_seq, std::rc::Rc::new(buf)));
        let mut spare = None;
        while bytes > self.config.memory_bytes && recent.len() > 1 {
            let (_, b) = recent.pop_front().expect("more than one");
            bytes -= b.capacity();
            if spare.is_none() {
                spare = std::rc::Rc::try_unwrap(b).ok();
            }
        }
        self.recent_bytes.set(bytes);
        let mut spare = spare.unwrap_or_default();
        spare.clear();
        spare
    }

    /// Resolves after the next commit (successful or not) finishes.
    pub async fn wait_commit(&self) {
        self.committed.wait().await
    }

    /// Whether [`Self::replay`] from `seq` is served from memory (cheap to call again
    /// and again), rather than by reading segment files.
    pub fn in_memory(&self, seq: u64) -> bool {
        matches!(self.recent.borrow().front(), Some((first, _)) if *first <= seq)
    }

    /// Calls `visit(seq, kind, format, payload)` for every durable record with a
    /// sequence number `>= from_seq`, oldest first, reading one segment at a time: what
    /// recovery found and what was appended since. It stops early when `visit` returns
    /// `false`. Segment files are read here, blocking; the shipper uses
    /// [`Wal::prefetch`] and [`Wal::replay_ready`] instead.
    pub fn replay(
        &self,
        from_seq: u64,
        mut visit: impl FnMut(u64, u8, u8, &[u8]) -> bool,
    ) -> std::io::Result<()> {
        self.replay_inner(from_seq, true, &mut visit).map(drop)
    }

    /// [`Wal::replay`] without blocking reads: records in memory, then records in the
    /// segment window [`Wal::prefetch`] read. Returns `true` when it stopped at a record
    /// that is in neither (prefetch from the next sequence number and call again).
    pub fn replay_ready(
        &self,
        from_seq: u64,
        mut visit: impl FnMut(u64, u8, u8, &[u8]) -> bool,
    ) -> std::io::Result<bool> {
        self.replay_inner(from_seq, false, &mut visit)
            .map(|stop| stop == Stop::NotRead)
    }

    /// Reads, on the blocking thread, the part of a segment file that a replay from
    /// `from_seq` needs next (`replay_window_bytes` from the record on), unless that
    /// record is in memory or already read. The shard serves its connections meanwhile.
    pub async fn prefetch(&self, from_seq: u64) -> std::io::Result<()> {
        if self.in_memory(from_seq) {
            return Ok(());
        }
        let Some((segment, at)) = self.replay_start(from_seq) else {
            return Ok(());
        };
        let mut len = self.config.replay_window_bytes;
        for _ in 0..2 {
            if let Some(w) = self.window.borrow().as_ref() {
                if w.segment == segment && w.covers(at) {
                    return Ok(());
                }
            }
            let buf = self.window.borrow_mut().take().map(|w| w.data);
            let data = self
                .storage
                .read_window(segment, at as u64, len, buf.unwrap_or_default())
                .await?;
            let longer = reread_len(&data);
            *self.window.borrow_mut() = Some(Window { segment, at, data });
            match longer {
                Some(n) => len = n,
                None => break,
            }
        }
        Ok(())
    }

    fn replay_inner(
        &self,
        from_seq: u64,
        read: bool,
        visit: &mut impl FnMut(u64, u8, u8, &[u8]) -> bool,
    ) -> std::io::Result<Stop> {
        // The shipper usually wants what was just committed: serve it from memory.
        // These are this process's own bytes, so records are walked by their length
        // fields; the CRC guards what comes back from the disk.
        let recent: Vec<(u64, std::rc::Rc<Vec<u8>>)> = {
            let r = self.recent.borrow();
            match r.partition_point(|(first, _)| *first <= from_seq) {
                0 => Vec::new(),
                i => r.range(i - 1..).cloned().collect(),
            }
        };
        if !recent.is_empty() {
            // Back in memory: the segment window is no longer needed.
            self.window.borrow_mut().take();
            for (first, buf) in recent {
                let (mut at, mut seq) = (0, first);
                while let Some(r) = format::record_unchecked_at(&buf, at, seq) {
                    if r.seq >= from_seq
                        && !visit(r.seq, r.kind, r.format, &buf[r.payload.0..r.payload.1])
                    {
                        return Ok(Stop::Visitor);
                    }
                    at = r.end;
                    seq += 1;
                }
            }
            return Ok(Stop::Done);
        }
        let (mut segments, open, durable) = {
            let st = self.state.borrow();
            let sealed: Vec<(u64, u64)> = st
                .sealed
                .iter()
                .map(|s| (s.first_seq, s.last_seq))
                .collect();
            (sealed, st.open_first_seq, st.durable_seq)
        };
        if open != 0 {
            segments.push((open, durable));
        }
        for (first, last) in segments {
            if last < from_seq || last < first {
                continue;
            }
            match self.replay_segment(first, from_seq, last.min(durable), read, visit)? {
                Stop::Done => {}
                stop => return Ok(stop),
            }
        }
        Ok(Stop::Done)
    }

    /// The segment holding `from_seq` and the offset a replay of it starts reading at:
    /// where the previous replay stopped, or the segment's first record.
    fn replay_start(&self, from_seq: u64) -> Option<(u64, usize)> {
        let st = self.state.borrow();
        let segment = st
            .sealed
            .iter()
            .map(|s| (s.first_seq, s.last_seq))
            .chain((st.open_first_seq != 0).then_some((st.open_first_seq, st.durable_seq)))
            .find(|(first, last)| *last >= from_seq && last >= first)?
            .0;
        Some((segment, self.resume_at(segment, from_seq).0))
    }

    /// Where a replay of `segment` from `from_seq` starts reading: (offset, sequence
    /// number of the record there), where the previous replay stopped if that is not
    /// past `from_seq`, else the segment's first record.
    fn resume_at(&self, segment: u64, from_seq: u64) -> (usize, u64) {
        match self.replay_pos.get() {
            Some((seg, seq, off)) if seg == segment && seq <= from_seq => (off, seq),
            _ => (format::HEADER_BYTES, segment),
        }
    }

    /// Visits the records `from_seq..=last` of one segment file, a window at a time
    /// (memory stays bounded however large segments are), starting where the previous
    /// replay of this segment stopped when that is not past `from_seq`. The window is
    /// kept for the next call. A record outside it is read here when `read`, else the
    /// replay stops with [`Stop::NotRead`]. A segment whose records do not follow each
    /// other (corruption found at recovery) is read whole and scanned instead.
    fn replay_segment(
        &self,
        first: u64,
        from_seq: u64,
        last: u64,
        read: bool,
        visit: &mut impl FnMut(u64, u8, u8, &[u8]) -> bool,
    ) -> std::io::Result<Stop> {
        let (mut at, mut next) = self.resume_at(first, from_seq);
        let mut held = self.window.borrow_mut();
        while next <= last {
            let mut r = held
                .as_ref()
                .filter(|w| w.segment == first && at >= w.at)
                .and_then(|w| format::record_at(&w.data, at - w.at, 0, Some(next)));
            if r.is_none() {
                if !read {
                    self.replay_pos.set(Some((first, next, at)));
                    return Ok(Stop::NotRead);
                }
                // Not (wholly) in the window: read from the record on, then once more
                // if its length prefix says it is longer than what was read.
                let mut len = self.config.replay_window_bytes;
                let mut data = held.take().map(|w| w.data).unwrap_or_default();
                for _ in 0..2 {
                    self.storage.read_at(first, at as u64, len, &mut data)?;
                    r = format::record_at(&data, 0, 0, Some(next));
                    match reread_len(&data) {
                        Some(n) if r.is_none() => len = n,
                        _ => break,
                    }
                }
                *held = Some(Window {
                    segment: first,
                    at,
                    data,
                });
            }
            let Some(r) = r else {
                drop(held);
                let stop = self.replay_scanned(first, from_seq.max(next), last, visit)?;
                return Ok(stop);
            };
            let w = held.as_ref().expect("the record came from the window");
            // Not `r.end`: that stops at the window's end when the record's padding
            // runs past it.
            let start =
                w.at + r.payload.0 - format::RECORD_PREFIX_BYTES - format::RECORD_META_BYTES;
            at = start + format::record_disk_bytes(r.payload.1 - r.payload.0);
            next = r.seq + 1;
            if r.seq >= from_seq
                && !visit(r.seq, r.kind, r.format, &w.data[r.payload.0..r.payload.1])
            {
                self.replay_pos.set(Some((first, next, at)));
                return Ok(Stop::Visitor);
            }
        }
        self.replay_pos.set(Some((first, next, at)));
        Ok(Stop::Done)
    }

    /// [`Wal::replay_segment`] for a segment with gaps: read whole, scanned.
    fn replay_scanned(
        &self,
        first: u64,
        from_seq: u64,
        last: u64,
        visit: &mut impl FnMut(u64, u8, u8, &[u8]) -> bool,
    ) -> std::io::Result<Stop> {
        self.whole_segment_reads
            .set(self.whole_segment_reads.get() + 1);
        let data = self.storage.read(first)?;
        let scan = format::scan(&data)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        for r in scan
            .records
            .iter()
            .filter(|r| r.seq >= from_seq && r.seq <= last)
        {
            if !visit(r.seq, r.kind, r.format, &data[r.payload.0..r.payload.1]) {
                return Ok(Stop::Visitor);
            }
        }
        Ok(Stop::Done)
    }

    /// Replays so far that read a whole segment file because its records did not follow
    /// each other (corruption); healthy segments are read a window at a time.
    pub fn whole_segment_reads(&self) -> u64 {
        self.whole_segment_reads.get()
    }

    /// Writes out anything pending and closes the open segment (clean shutdown, tests).
    pub async fn close(&self) -> std::io::Result<()> {
        while !self.state.borrow().pending_lens.is_empty() || self.state.borrow().committing {
            if self.state.borrow().committing {
                self.committed.wait().await;
            } else {
                self.commit().await;
            }
        }
        let writer = self.state.borrow_mut().writer.take();
        match writer {
            Some(w) => w.close().await,
            None => Ok(()),
        }
    }
}
