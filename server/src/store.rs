//! The `prometheus` database: series index, XOR chunks, native histograms, exemplars,
//! metadata and the exactly-once ledger, in one embedded redb file.
//!
//! redb (a well-kept, pure-Rust, copy-on-write B-tree with ACID transactions) does what it
//! is good at: keys, values, atomic multi-table commits and crash safety (a commit is
//! durable when it returns; a torn commit is rolled back at open). What it stores for
//! samples is Prometheus's XOR chunk encoding ([`promgate_proto::xor`]), so remote_read
//! streams chunks as they are, without re-encoding.
//!
//! ## On-disk layout: `<data_dir>/prometheus.redb`
//!
//! ```text
//! table        key                                  value
//! series_v2    (h128(labels), series id u64)        ()          ids start at 1
//! labels       series id u64                        labels (canonical encoding)
//! postings_v2  lp(name) lp(value) first sid(u64 BE) block: ascending sids, u64 LE each;
//!                                                   label pairs, and tags as lp("\0"+tag)
//! tags         series id u64                        tags (canonical encoding): meta, agent, custom
//! chunks       (partition i64, sid u64, min_t i64)  max_t i64 LE | XOR chunk bytes   (sealed)
//! head         sid u64                              partition i64 LE | min_t i64 LE | XOR chunk
//! histograms   (partition i64, sid u64, t i64)      remote_write 1.0 Histogram message (protobuf)
//! exemplars    (partition i64, sid u64, t i64)      value bits u64 LE | labels (canonical)
//! metadata     metric family name                   type i32 LE | lp(help) | lp(unit)
//! applied      "agent\0shard"                       highest applied WAL seq u64
//! meta         "next_sid"                           u64
//!
//! canonical labels := (lp(name) lp(value))*   sorted by name;  lp(s) := u32 BE length | bytes
//! h128(labels)     := SipHash-1-3-128 of the canonical labels, fixed keys
//! partition        := floor(t / PARTITION_MS), PARTITION_MS = 2 h
//! ```
//!
//! The series index is keyed by the labels' hash: small keys keep the B-tree small, so
//! a batch of new series rewrites fewer pages. A hash hit is confirmed against `labels`,
//! so a collision costs a lookup, never a merge of two series. The first format
//! (`series`, keyed by the labels themselves) is converted at open.
//!
//! A label pair's postings are the union of its blocks. A batch writes one block per
//! pair it touches, keyed by the block's smallest sid, so interning 10k new series costs
//! one B-tree insert per distinct pair instead of one per pair per series. Blocks of a
//! pair may overlap only after a series' tags change (rare); readers merge them. The
//! first format (`postings`, one key per pair per series) is converted at open.
//!
//! ## Write path
//!
//! [`Store::apply`] takes one ship batch and, in one write transaction: rebuilds each new
//! series' labels from its app labels and its target's labels ([`ConnRefs`]), interns new
//! label sets (series, labels, postings), stores the series' tags beside its labels
//! (`tags` and tag postings; a series that comes back with other tags gets the new ones),
//! appends each sample to its series' open chunk (the head, kept in memory), seals a
//! chunk into `chunks` when it holds 120 samples or the next sample falls in another
//! partition, stores histograms, exemplars and metadata, and raises `applied` for the
//! batch's (agent, shard) to its `last_seq`. A batch whose `last_seq` is not above
//! `applied` is skipped whole: a replay never stores a sample twice.
//!
//! ## Checkpoints: the agents' WALs are the store's log
//!
//! A batch's commit is not fsynced (redb `Durability::None`): queries see it at once,
//! but a crash of the server rolls the database back to its last durable commit. Every
//! `checkpoint_interval` (and when the store is closed) [`Store::checkpoint`] writes the
//! open chunk of every series changed since the last one into `head` and commits
//! durably, which makes every earlier commit durable with it; `applied` as of that
//! commit is the durable point each ack and welcome reports (`durable_seq`). Agents
//! delete WAL records only up to it, so after a crash they resend exactly what was rolled
//! back. This is what keeps a batch's cost proportional to its samples: the open chunks
//! of a million series are written once per checkpoint, not once per batch.
//!
//! A batch's commit does start the write-out of what it changed, though
//! (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`: queued, not waited for), so the
//! disk takes the store's pages as they are made. Left to the kernel they would stay
//! dirty until the next checkpoint's fsync, which then writes everything since the last
//! one at once: while 128k new series are indexed that is ~300 MB in one burst, and
//! every other fsync on the disk waits behind it (an agent on the same disk saw its
//! WAL fdatasync stall for up to 0.8 s; with the write-out started per batch, 0.1 s).
//!
//! A checkpoint writes its open chunks in pieces of 8192 series, each committed and
//! written out (and waited for) before the next, and fsyncs at the last: the disk then
//! never holds more than one piece's pages (a few MB) queued ahead of another writer's
//! fsync, instead of every open chunk of 128k series at once. Batches are applied
//! between the pieces, so the durable point it reaches is `applied` as of its start
//! (its target), while what it makes durable may hold later samples too: after a
//! crash, the resent ones among them are recognised as resends
//! ([`Store::checkpoint_with`]).
//!
//! Every durable commit (a checkpoint, retention) writes the changed open chunks, so
//! `head`, `chunks` and `applied` always agree on disk. After a rollback (a failed
//! batch or commit) the store's epoch changes and every ship connection
//! must say hello again, so none keeps series references or a sequence number from
//! before it. The rollback restores a savepoint taken at the last durable commit
//! ([`Store::roll_back`]); it reopens the database only when redb refuses that.
//!
//! ## Late samples
//!
//! A sample whose timestamp is before the newest one of its series is still stored
//! (`samples_out_of_order_total` counts them): it is put into the chunk whose time span
//! it falls in (the open chunk, or the nearest sealed chunk of its partition), which is
//! decoded and written again with the sample in place, and cut in two beyond 240
//! samples. So a series' chunks stay disjoint and each in time order, and readers merge
//! nothing. Late samples are normal for promgate: each agent shard ships its own WAL,
//! so when a sender's connection moves to another shard while the first is behind, a
//! series' newer samples can arrive before its older ones. A sample at a timestamp that
//! is already stored is not stored again: with identical bits it is a resend
//! (`samples_duplicate_total`), with another value it conflicts and the stored value is
//! kept (`samples_conflicting_total`). Histograms and exemplars are keyed by timestamp;
//! an existing key is kept (a resend).
//!
//! ## Recovery and retention
//!
//! At open, the head is rebuilt from `head` (each chunk decoded and re-encoded into a
//! live encoder). Queries read open chunks from memory. Retention (`retention`, default 15 days) deletes whole partitions that
//! ended before `now - retention` from `chunks`, `histograms`, `exemplars` and `head`.
//! The series index is kept (series are not garbage-collected yet).

use hashbrown::HashMap;
use promgate_proto::hint::prefetch;
use promgate_proto::ship::ArchivedShipBatch;
use promgate_proto::xor::{self, XorEncoder, SAMPLES_PER_CHUNK_MAX};
use redb::{Database, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

pub const PARTITION_MS: i64 = 2 * 3600 * 1000;
/// redb's page cache unless configured (`server.cache_bytes`).
pub const CACHE_BYTES_DEFAULT: usize = 256 << 20;

const SERIES: TableDefinition<(u128, u64), ()> = TableDefinition::new("series_v2");
/// The first series index format (labels → sid), converted at open.
const SERIES_V1: TableDefinition<&[u8], u64> = TableDefinition::new("series");
const LABELS: TableDefinition<u64, &[u8]> = TableDefinition::new("labels");
const POSTINGS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("postings_v2");
/// The first postings format (one key per pair and series), converted at open.
const POSTINGS_V1: TableDefinition<&[u8], ()> = TableDefinition::new("postings");
const CHUNKS: TableDefinition<(i64, u64, i64), &[u8]> = TableDefinition::new("chunks");
const HEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("head");
const HISTOGRAMS: TableDefinition<(i64, u64, i64), &[u8]> = TableDefinition::new("histograms");
const EXEMPLARS: TableDefinition<(i64, u64, i64), &[u8]> = TableDefinition::new("exemplars");
const METADATA: TableDefinition<&str, &[u8]> = TableDefinition::new("metadata");
const APPLIED: TableDefinition<&str, u64> = TableDefinition::new("applied");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const TAGS: TableDefinition<u64, &[u8]> = TableDefinition::new("tags");

/// Tag postings live in the postings table under the tag's name behind this byte (no
/// label name contains NUL), so they never mix with label postings.
pub const TAG_MARK: char = '\0';

pub type Labels = Vec<(String, String)>;

fn open_db(path: &Path, cache_bytes: usize) -> anyhow::Result<Database> {
    use anyhow::Context;
    redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(path)
        .with_context(|| format!("opening {}", path.display()))
}

pub fn partition_of(t: i64) -> i64 {
    t.div_euclid(PARTITION_MS)
}

fn put_lp(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn take_lp<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    if b.len() < 4 {
        return None;
    }
    let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let s = b.get(4..4 + n)?;
    *b = &b[4 + n..];
    Some(s)
}

pub fn encode_labels<'a>(labels: impl Iterator<Item = (&'a str, &'a str)>, out: &mut Vec<u8>) {
    out.clear();
    for (n, v) in labels {
        put_lp(out, n.as_bytes());
        put_lp(out, v.as_bytes());
    }
}

pub fn decode_labels(mut b: &[u8]) -> Labels {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (Some(n), Some(v)) = (take_lp(&mut b), take_lp(&mut b)) else {
            break;
        };
        out.push((
            String::from_utf8_lossy(n).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        ));
    }
    out
}

/// `lp(name)`: the postings prefix of every value of `name`.
pub fn postings_name_prefix(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 4);
    put_lp(&mut k, name.as_bytes());
    k
}

/// `lp(name) lp(value)`: the postings prefix of one label pair.
pub fn postings_pair_prefix(name: &str, value: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + value.len() + 8);
    pair_key(&mut k, false, name, value);
    k
}

/// The key of a postings block: the pair's prefix, then the block's first sid.
fn block_key(prefix: &[u8], first: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&first.to_be_bytes());
    k
}

fn block_sids(block: &[u8]) -> impl Iterator<Item = u64> + '_ {
    block
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
}

/// Writes a block of ascending `sids` under `prefix`; a block already under that key
/// (the same first sid) is merged in.
fn put_block(
    postings: &mut redb::Table<&[u8], &[u8]>,
    prefix: &[u8],
    sids: &[u64],
    value: &mut Vec<u8>,
) -> Result<(), ApplyError> {
    let Some(&first) = sids.first() else {
        return Ok(());
    };
    value.clear();
    value.extend(sids.iter().flat_map(|s| s.to_le_bytes()));
    let key = block_key(prefix, first);
    let old = postings
        .insert(key.as_slice(), value.as_slice())
        .map_err(storage)?
        .map(|g| g.value().to_vec());
    if let Some(old) = old {
        let mut merged: Vec<u64> = block_sids(&old).chain(sids.iter().copied()).collect();
        merged.sort_unstable();
        merged.dedup();
        value.clear();
        value.extend(merged.iter().flat_map(|s| s.to_le_bytes()));
        postings
            .insert(key.as_slice(), value.as_slice())
            .map_err(storage)?;
    }
    Ok(())
}

/// Writes into `out` the postings prefix of the pair `name=value`, of a tag when `tag`:
/// what [`postings_pair_prefix`] gives for the name, or for `TAG_MARK` and the name.
fn pair_key(out: &mut Vec<u8>, tag: bool, name: &str, value: &str) {
    out.clear();
    let mark = if tag { TAG_MARK.len_utf8() } else { 0 };
    out.extend_from_slice(&((mark + name.len()) as u32).to_be_bytes());
    if tag {
        out.push(TAG_MARK as u8);
    }
    out.extend_from_slice(name.as_bytes());
    put_lp(out, value.as_bytes());
}

/// A batch's new postings, grouped by pair as its series are interned, and written as
/// one block per pair at the end. (They were one `(prefix, sid)` row each, sorted at the
/// end: per 2000 new series some 30k allocated prefixes and a memcmp sort over them,
/// about a fifth of the server's time while 128k series were being created.)
#[derive(Default)]
struct NewPostings {
    by_pair: HashMap<Vec<u8>, Vec<u64>>,
    key: Vec<u8>,
}

impl NewPostings {
    /// Adds `sid` to the postings of the pair `name=value` (of a tag when `tag`).
    fn add(&mut self, tag: bool, name: &str, value: &str, sid: u64) {
        pair_key(&mut self.key, tag, name, value);
        self.by_pair
            .entry_ref(self.key.as_slice())
            .or_default()
            .push(sid);
    }

    /// Takes back an [`NewPostings::add`] of this batch (a series twice in it whose
    /// tags changed in between).
    fn remove(&mut self, tag: bool, name: &str, value: &str, sid: u64) {
        pair_key(&mut self.key, tag, name, value);
        if let Some(sids) = self.by_pair.get_mut(self.key.as_slice()) {
            sids.retain(|&s| s != sid);
        }
    }

    /// Writes one block per pair, in key order: B-tree inserts in key order touch each
    /// leaf once instead of jumping across the table per series.
    fn write(self, postings: &mut redb::Table<&[u8], &[u8]>) -> Result<(), ApplyError> {
        let mut pairs: Vec<(Vec<u8>, Vec<u64>)> = self.by_pair.into_iter().collect();
        pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut value = Vec::new();
        for (prefix, mut sids) in pairs {
            sids.sort_unstable();
            sids.dedup();
            put_block(postings, &prefix, &sids, &mut value)?;
        }
        Ok(())
    }
}

/// Removes `sid` from the postings of the pair `prefix`.
fn remove_posting(
    postings: &mut redb::Table<&[u8], &[u8]>,
    prefix: &[u8],
    sid: u64,
) -> Result<(), ApplyError> {
    // The block holding `sid` starts at or before it; blocks overlap only after tag
    // changes, so the search normally stops at the first block it reads.
    let (from, to) = (block_key(prefix, 0), block_key(prefix, sid));
    let mut found = None;
    for row in postings
        .range(from.as_slice()..=to.as_slice())
        .map_err(storage)?
        .rev()
    {
        let (k, v) = row.map_err(storage)?;
        let v = v.value();
        if block_sids(v).any(|s| s == sid) {
            let rest: Vec<u64> = block_sids(v).filter(|&s| s != sid).collect();
            found = Some((k.value().to_vec(), rest));
            break;
        }
    }
    if let Some((key, rest)) = found {
        postings.remove(key.as_slice()).map_err(storage)?;
        put_block(postings, prefix, &rest, &mut Vec::new())?;
    }
    Ok(())
}

/// Appends the sids of a pair's blocks to `out`, ascending and without repeats
/// (blocks of one pair overlap only after tag changes).
fn extend_from_block(out: &mut Vec<u64>, block: &[u8]) {
    let start = out.len();
    out.extend(block_sids(block));
    if start > 0 && out.get(start).is_some_and(|&s| s <= out[start - 1]) {
        out.sort_unstable();
        out.dedup();
    }
}

/// The smallest key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 9]
}

#[derive(Default)]
pub struct StoreMetrics {
    pub batches_applied: AtomicU64,
    pub batches_replayed: AtomicU64,
    pub series_created: AtomicU64,
    pub samples_appended: AtomicU64,
    pub samples_duplicate: AtomicU64,
    pub samples_out_of_order: AtomicU64,
    pub samples_conflicting: AtomicU64,
    pub chunks_sealed: AtomicU64,
    pub histograms_stored: AtomicU64,
    pub histograms_duplicate: AtomicU64,
    pub exemplars_stored: AtomicU64,
    pub metadata_stored: AtomicU64,
    pub commit_errors: AtomicU64,
    pub commit_micros: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checkpoint_micros: AtomicU64,
    pub retention_partitions_deleted: AtomicU64,
}

struct HeadSeries {
    enc: XorEncoder,
    partition: i64,
    min_t: i64,
    max_t: i64,
    /// Bits of the newest value (to tell a resend from a conflicting sample).
    last_bits: u64,
    /// The commit generation that last sealed a chunk of this series.
    sealed_gen: u64,
    /// Listed in [`Head::dirty`] (the flag spares a set lookup per sample).
    dirty: bool,
}

impl HeadSeries {
    /// An open chunk starting with the sample `(t, v)`.
    fn new(t: i64, v: f64, sealed_gen: u64) -> HeadSeries {
        let mut enc = XorEncoder::default();
        enc.append(t, v);
        HeadSeries {
            enc,
            partition: partition_of(t),
            min_t: t,
            max_t: t,
            last_bits: v.to_bits(),
            sealed_gen,
            dirty: false,
        }
    }
}

/// The open chunks, by series id. Series ids are given out densely from 1, so a series'
/// open chunk is found by indexing instead of hashing: `slot[sid]` is its place in
/// `open` plus one (0: none), and `open` is packed (a removed chunk's place takes the
/// last one). Applying a batch looks up one open chunk per sample, 128k or more of
/// them in turn: with a hash map each lookup waited on two cache misses (the control
/// bytes, then the entry) before anything could be prefetched, a quarter of the
/// server's CPU at 500k samples/s. Here the slots are 4 bytes per series ever created
/// and the entry's address is known from the slot, so [`Store::apply`] prefetches both
/// ahead of use; series made one after another (as agents send them) also sit one
/// after another in `open`.
#[derive(Default)]
struct OpenChunks {
    slot: Vec<u32>,
    open: Vec<HeadSeries>,
    /// The series id of each of `open`.
    sids: Vec<u64>,
}

impl OpenChunks {
    fn index(&self, sid: u64) -> Option<usize> {
        match self.slot.get(usize::try_from(sid).ok()?) {
            Some(&s) if s > 0 => Some(s as usize - 1),
            _ => None,
        }
    }

    fn get(&self, sid: u64) -> Option<&HeadSeries> {
        self.index(sid).map(|i| &self.open[i])
    }

    fn get_mut(&mut self, sid: u64) -> Option<&mut HeadSeries> {
        self.index(sid).map(|i| &mut self.open[i])
    }

    /// Sets the open chunk of `sid` and returns where it is.
    fn insert(&mut self, sid: u64, h: HeadSeries) -> usize {
        if let Some(i) = self.index(sid) {
            self.open[i] = h;
            return i;
        }
        let at = usize::try_from(sid).expect("series ids fit in memory");
        if at >= self.slot.len() {
            self.slot.resize(at + 1, 0);
        }
        self.open.push(h);
        self.sids.push(sid);
        let i = self.open.len() - 1;
        self.slot[at] = u32::try_from(i + 1).expect("fewer than 4G open chunks");
        i
    }

    fn remove(&mut self, sid: u64) -> Option<HeadSeries> {
        let i = self.index(sid)?;
        self.slot[sid as usize] = 0;
        let h = self.open.swap_remove(i);
        self.sids.swap_remove(i);
        if let Some(&moved) = self.sids.get(i) {
            self.slot[moved as usize] = i as u32 + 1;
        }
        Some(h)
    }

    fn clear(&mut self) {
        self.slot.clear();
        self.open.clear();
        self.sids.clear();
    }

    fn len(&self) -> usize {
        self.open.len()
    }

    fn iter(&self) -> impl Iterator<Item = (u64, &HeadSeries)> {
        self.sids.iter().copied().zip(&self.open)
    }

    /// Hints the cache to load the slot of `sid`.
    fn prefetch_slot(&self, sid: u64) {
        if let Some(s) = self.slot.get(sid as usize) {
            prefetch(s);
        }
    }

    /// Hints the cache to load the open chunk's entry of `sid` (its slot should be in
    /// cache by now).
    fn prefetch_entry(&self, sid: u64) {
        if let Some(i) = self.index(sid) {
            let h = &self.open[i];
            prefetch(h);
            // An entry spans two cache lines.
            prefetch((h as *const HeadSeries).cast::<u8>().wrapping_add(64));
        }
    }
}

struct Head {
    series: OpenChunks,
    next_sid: u64,
    /// Applied sequence numbers, committed (durably or not).
    applied: HashMap<String, u64>,
    /// `applied` as of the last durable commit.
    durable: HashMap<String, u64>,
    /// Series whose open chunk changed since the last durable commit, each listed once
    /// while its `dirty` flag is set (again only if retention dropped it meanwhile).
    dirty: Vec<u64>,
    /// Commits so far (readers compare it with `sealed_gen`).
    generation: u64,
    /// Changes with every reload from disk; connections from an older epoch must say
    /// hello again.
    epoch: u64,
    last_checkpoint: Instant,
    /// Memory no longer matches disk after a failed commit: rebuild before the next use.
    stale: bool,
}

/// An (agent, shard)'s sequence numbers: applied (what queries see) and durable (what
/// survives a crash of the server).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    pub applied: u64,
    pub durable: u64,
}

pub struct Store {
    /// The database as of its last durable commit, taken right after it (under the
    /// head lock, so no other commit comes between): what [`Store::roll_back`] restores.
    /// `None` if it could not be taken. Declared before `db`, so it is dropped first.
    durable_state: Mutex<Option<redb::Savepoint>>,
    /// `None` only while being reopened after an I/O error.
    db: std::sync::RwLock<Option<Database>>,
    path: std::path::PathBuf,
    cache_bytes: usize,
    head: Mutex<Head>,
    pub metrics: StoreMetrics,
    pub retention_ms: i64,
    /// The database file, opened again only to start the write-out of its dirty pages
    /// after each batch (see "Checkpoints" above). `None` if it could not be opened:
    /// the kernel then writes them on its own schedule.
    db_file: Option<std::fs::File>,
    /// Held by a checkpoint from start to end, and by retention: their durable commits
    /// must not interleave (a checkpoint releases `head` between its pieces).
    durable_commits: Mutex<()>,
    /// Open chunks written per checkpoint piece ([`CHECKPOINT_PIECE_SERIES`]; smaller in
    /// tests).
    piece_series: std::sync::atomic::AtomicUsize,
}

/// Open chunks written per transaction of a checkpoint (see [`Store::checkpoint`]).
const CHECKPOINT_PIECE_SERIES: usize = 8192;

/// How long [`Store::writeback`] waits.
#[derive(Clone, Copy)]
enum WritebackWait {
    /// Until the write-out is queued.
    Queued,
    /// Until the pages are written.
    Done,
}

#[derive(Debug)]
pub enum ApplyError {
    /// A malformed batch (unknown series reference): the connection's fault.
    Batch(String),
    /// The sequence range overlaps what is applied in a way no replay produces.
    Sequence(String),
    /// The store could not commit; nothing of the batch is stored.
    Storage(String),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Batch(m) | ApplyError::Sequence(m) | ApplyError::Storage(m) => {
                f.write_str(m)
            }
        }
    }
}

impl std::error::Error for ApplyError {}

fn storage<E: std::fmt::Display>(e: E) -> ApplyError {
    ApplyError::Storage(e.to_string())
}

/// What [`Store::apply`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Stored {
        samples: u64,
    },
    /// Already applied before (a replay): nothing stored.
    Replay,
}

/// A connection's series refs to series ids. Agents number a connection's series 0, 1,
/// 2, ... so refs index a vector (`0`: unknown; series ids start at 1): every sample of
/// a batch looks up its ref, and a hash map's lookup missed the cache for most of
/// them with 128k series. A ref far beyond the vector (more than [`REF_GAP_MAX`] past
/// its end, which the protocol allows but no agent sends) goes to a map instead, so a
/// peer cannot make the vector large with a few refs.
#[derive(Default)]
pub struct SeriesRefs {
    dense: Vec<u64>,
    sparse: HashMap<u32, u64>,
}

/// How far past the known refs a new ref may be and still go into the vector.
const REF_GAP_MAX: usize = 64;

impl SeriesRefs {
    pub fn get(&self, r: u32) -> Option<u64> {
        match self.dense.get(r as usize) {
            Some(&sid) if sid != 0 => Some(sid),
            _ if self.sparse.is_empty() => None,
            _ => self.sparse.get(&r).copied(),
        }
    }

    pub fn insert(&mut self, r: u32, sid: u64) {
        let i = r as usize;
        if i <= self.dense.len() + REF_GAP_MAX {
            if i >= self.dense.len() {
                self.dense.resize(i + 1, 0);
            }
            self.dense[i] = sid;
            if !self.sparse.is_empty() {
                self.sparse.remove(&r);
            }
        } else {
            self.sparse.insert(r, sid);
        }
    }

    pub fn clear(&mut self) {
        self.dense.clear();
        self.sparse.clear();
    }
}

/// One ship connection's references: series refs to series ids, target refs to the
/// target's labels and tags (`promgate_proto::ship::NewTarget`).
#[derive(Default)]
pub struct ConnRefs {
    pub series: SeriesRefs,
    pub targets: HashMap<u32, (Labels, Labels)>,
    /// The store epoch of the connection's hello ([`Store::hello`]); `None` before it.
    pub epoch: Option<u64>,
}

impl ConnRefs {
    pub fn clear(&mut self) {
        self.series.clear();
        self.targets.clear();
    }
}

fn pairs(l: &[promgate_proto::ship::ArchivedLabel]) -> Labels {
    l.iter()
        .map(|l| (l.name.to_string(), l.value.to_string()))
        .collect()
}

/// A series' full label set from its app labels and target, checked: sorted, no name
/// twice, a `__name__`.
fn rejoin_series(
    s: &promgate_proto::ship::ArchivedNewSeries,
    target: &Labels,
) -> Result<Vec<(String, String)>, ApplyError> {
    let r = s.series_ref.to_native();
    let mut out: Labels = pairs(&s.labels);
    let mut absent = s.absent.iter().map(|a| a.to_native() as usize).peekable();
    for (i, l) in target.iter().enumerate() {
        if absent.next_if_eq(&i).is_some() {
            continue;
        }
        out.push(l.clone());
    }
    if let Some(a) = absent.next() {
        return Err(ApplyError::Batch(format!(
            "series ref {r}: absent index {a} beyond its target's {} labels",
            target.len()
        )));
    }
    out.sort_unstable();
    if out.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(ApplyError::Batch(format!(
            "series ref {r}: a label name appears in both its app and target labels"
        )));
    }
    if !out.iter().any(|(n, _)| n == "__name__") {
        return Err(ApplyError::Batch(format!(
            "series ref {r}: no __name__ label"
        )));
    }
    Ok(out)
}

/// Records the next series id in the transaction that interned series.
/// The series index key of canonical `labels` (stable across processes and versions).
fn series_hash(labels: &[u8]) -> u128 {
    use siphasher::sip128::{Hasher128, SipHasher13};
    use std::hash::Hasher;
    const KEYS: (u64, u64) = (0x7072_6f6d_6761_7465, 0x7365_7269_6573_0001);
    let mut h = SipHasher13::new_with_keys(KEYS.0, KEYS.1);
    h.write(labels);
    h.finish128().as_u128()
}

/// The series id of canonical `labels`, if interned.
fn find_series(
    series: &redb::Table<(u128, u64), ()>,
    labels_t: &redb::Table<u64, &[u8]>,
    key: &[u8],
    hash: u128,
) -> Result<Option<u64>, ApplyError> {
    for row in series
        .range((hash, 0)..=(hash, u64::MAX))
        .map_err(storage)?
    {
        let sid = row.map_err(storage)?.0.value().1;
        let stored = labels_t.get(sid).map_err(storage)?;
        if stored.is_some_and(|v| v.value() == key) {
            return Ok(Some(sid));
        }
    }
    Ok(None)
}

/// Rewrites the first series index format (labels → sid) as `(h128(labels), sid)`.
fn convert_series_v1(tx: &redb::WriteTransaction) -> anyhow::Result<()> {
    use redb::TableHandle;
    if !tx.list_tables()?.any(|t| t.name() == SERIES_V1.name()) {
        return Ok(());
    }
    let mut series = tx.open_table(SERIES)?;
    let mut rows = 0u64;
    for row in tx.open_table(SERIES_V1)?.iter()? {
        let (k, sid) = row?;
        series.insert((series_hash(k.value()), sid.value()), ())?;
        rows += 1;
    }
    drop(series);
    tx.delete_table(SERIES_V1)?;
    tracing::info!(
        rows,
        "converted the series index to hashed keys (series_v2)"
    );
    Ok(())
}

/// Rewrites the first postings format (one key per pair and series) as blocks, one per
/// pair, and drops it. Its keys come in pair order, so one pair is held at a time.
fn convert_postings_v1(tx: &redb::WriteTransaction) -> anyhow::Result<()> {
    use redb::TableHandle;
    let v1 = tx.list_tables()?.any(|t| t.name() == POSTINGS_V1.name());
    if !v1 {
        return Ok(());
    }
    let mut postings = tx.open_table(POSTINGS)?;
    let (mut prefix, mut sids, mut value) = (Vec::new(), Vec::new(), Vec::new());
    let mut rows = 0u64;
    {
        let old = tx.open_table(POSTINGS_V1)?;
        for row in old.iter()? {
            let (k, _) = row?;
            let k = k.value();
            let Some((p, sid)) = k.split_last_chunk::<8>() else {
                continue;
            };
            if p != prefix.as_slice() {
                put_block(&mut postings, &prefix, &sids, &mut value)?;
                prefix = p.to_vec();
                sids.clear();
            }
            sids.push(u64::from_be_bytes(*sid));
            rows += 1;
        }
        put_block(&mut postings, &prefix, &sids, &mut value)?;
    }
    drop(postings);
    tx.delete_table(POSTINGS_V1)?;
    tracing::info!(rows, "converted the postings index to blocks (postings_v2)");
    Ok(())
}

fn put_next_sid(tx: &redb::WriteTransaction, next_sid: u64) -> Result<(), ApplyError> {
    tx.open_table(META)
        .map_err(storage)?
        .insert("next_sid", next_sid)
        .map_err(storage)?;
    Ok(())
}

pub fn applied_key(agent: &str, shard: u32) -> String {
    format!("{agent}\0{shard}")
}

/// One series' data for a query window.
#[derive(Default, Debug)]
pub struct SeriesData {
    /// (min_t, max_t, XOR chunk) in time order, sealed chunks then the head.
    pub chunks: Vec<(i64, i64, Vec<u8>)>,
    /// (t, Histogram protobuf) in time order.
    pub histograms: Vec<(i64, Vec<u8>)>,
}

impl Store {
    /// Opens (or creates) the store with redb's default page cache.
    pub fn open(dir: &Path, retention_ms: i64) -> anyhow::Result<Store> {
        Store::open_with_cache(dir, retention_ms, CACHE_BYTES_DEFAULT)
    }

    /// Opens (or creates) the store; `cache_bytes` bounds redb's page cache.
    pub fn open_with_cache(
        dir: &Path,
        retention_ms: i64,
        cache_bytes: usize,
    ) -> anyhow::Result<Store> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("prometheus.redb");
        let db = open_db(&path, cache_bytes)?;
        let tx = db.begin_write()?;
        tx.open_table(SERIES)?;
        tx.open_table(LABELS)?;
        tx.open_table(POSTINGS)?;
        tx.open_table(CHUNKS)?;
        tx.open_table(HEAD)?;
        tx.open_table(HISTOGRAMS)?;
        tx.open_table(EXEMPLARS)?;
        tx.open_table(METADATA)?;
        tx.open_table(APPLIED)?;
        tx.open_table(META)?;
        tx.open_table(TAGS)?;
        convert_series_v1(&tx)?;
        convert_postings_v1(&tx)?;
        tx.commit()?;
        let db_file = std::fs::File::open(&path).ok();
        let store = Store {
            durable_state: Mutex::new(None),
            db: std::sync::RwLock::new(Some(db)),
            path,
            cache_bytes,
            head: Mutex::new(Head {
                series: OpenChunks::default(),
                next_sid: 1,
                applied: HashMap::new(),
                durable: HashMap::new(),
                dirty: Vec::new(),
                generation: 0,
                epoch: 0,
                last_checkpoint: Instant::now(),
                stale: true,
            }),
            metrics: StoreMetrics::default(),
            retention_ms,
            db_file,
            durable_commits: Mutex::new(()),
            piece_series: std::sync::atomic::AtomicUsize::new(CHECKPOINT_PIECE_SERIES),
        };
        {
            let mut head = store.head.lock().expect("not poisoned");
            store.load_head(&mut head)?;
            store.note_durable_state();
        }
        Ok(store)
    }

    /// Runs `f` on the open database (briefly holding the reopen lock).
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, redb::TransactionError>,
    ) -> Result<T, ApplyError> {
        let db = self.db.read().expect("not poisoned");
        let db = db
            .as_ref()
            .ok_or_else(|| ApplyError::Storage("the store is being reopened".into()))?;
        f(db).map_err(storage)
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, ApplyError> {
        self.with_db(Database::begin_read)
    }

    /// Starts the write-out of every dirty page of the database file; with
    /// [`WritebackWait::Done`] also waits until it is written. Not a durability point
    /// (no device flush, no metadata): only durable commits fsync.
    fn writeback(&self, wait: WritebackWait) {
        let Some(f) = &self.db_file else {
            return;
        };
        use std::os::fd::AsRawFd;
        let flags = match wait {
            // May still wait for room in the device queue, which paces the store.
            WritebackWait::Queued => libc::SYNC_FILE_RANGE_WRITE,
            WritebackWait::Done => {
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER
            }
        };
        // SAFETY: a plain system call on a file descriptor this store owns and keeps
        // open; offset 0 and length 0 mean the whole file. No memory is passed.
        let fd = f.as_raw_fd();
        let rc = unsafe { libc::sync_file_range(fd, 0, 0, flags) };
        if rc != 0 {
            // Only a hint: a failed write shows at the checkpoint's fsync.
            tracing::debug!(error = %std::io::Error::last_os_error(), "sync_file_range");
        }
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, ApplyError> {
        self.with_db(Database::begin_write)
    }

    /// Keeps the database's current state as the one [`Store::roll_back`] restores.
    /// Called with the head lock held, right after a durable commit (or at open), so
    /// the state is exactly that commit's. A savepoint costs a write transaction that
    /// is aborted, and keeps the pages of that state from being reused until the next
    /// durable commit replaces it (redb does not reuse pages freed by non-durable
    /// commits before then anyway).
    fn note_durable_state(&self) {
        let mut slot = self.durable_state.lock().expect("not poisoned");
        // The old savepoint goes first: it would pin the pages of an older state.
        *slot = None;
        let taken = self.begin_write().and_then(|tx| {
            let sp = tx.ephemeral_savepoint().map_err(storage)?;
            tx.abort().map_err(storage)?;
            Ok(sp)
        });
        match taken {
            Ok(sp) => *slot = Some(sp),
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep the durable state; a rollback will reopen the store instead");
            }
        }
    }

    /// Rolls the database back to its last durable commit after a failed batch or
    /// commit, whose changes memory may hold in part (the head is rebuilt from disk at
    /// the next use). Called with the head lock held (no writer runs).
    ///
    /// It restores the savepoint taken at that commit and commits that state durably.
    /// Reopening alone is not a rollback when redb itself saw no I/O failure: dropping
    /// a `Database` (redb 2.6) makes a quick-repair commit, which is durable and would
    /// make every non-durable commit since the checkpoint durable with it: `applied` as
    /// of the last batch, with the open chunks as of the checkpoint, so samples the
    /// agents then delete from their WALs would be lost. Only when the restore fails
    /// is the database reopened: after an I/O error redb refuses every write, that
    /// drop's commit too, and its recovery goes back to the last durable commit. (A
    /// restore failing for another reason, such as a damaged page met while restoring,
    /// would leave the old hazard; none is known to happen.)
    fn roll_back(&self) {
        let restored = {
            let slot = self.durable_state.lock().expect("not poisoned");
            match slot.as_ref() {
                Some(sp) => self.begin_write().and_then(|mut tx| {
                    tx.restore_savepoint(sp).map_err(storage)?;
                    tx.commit().map_err(storage)
                }),
                None => Err(ApplyError::Storage("no durable state kept".into())),
            }
        };
        match restored {
            Ok(()) => {
                tracing::warn!(path = %self.path.display(), "store rolled back to its last durable commit after a failed batch or commit");
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot restore the last durable commit in place; reopening the store");
                self.reopen();
            }
        }
    }

    /// Closes the database and opens it again, which recovers the last durable commit
    /// after a failed one: redb refuses every transaction after an I/O error until then.
    /// Called with the head lock held (no writer runs).
    fn reopen(&self) {
        // Savepoints must not outlive their database.
        *self.durable_state.lock().expect("not poisoned") = None;
        let mut slot = self.db.write().expect("not poisoned");
        drop(slot.take());
        match open_db(&self.path, self.cache_bytes) {
            Ok(db) => {
                tracing::warn!(path = %self.path.display(), "store reopened after a failed commit");
                *slot = Some(db);
                drop(slot);
                self.note_durable_state();
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot reopen the store yet; the next batch tries again");
            }
        }
    }

    /// Rebuilds the in-memory head and ledger from disk.
    fn load_head(&self, head: &mut Head) -> anyhow::Result<()> {
        let rtx = self.begin_read().map_err(|e| anyhow::anyhow!("{e}"))?;
        head.series.clear();
        head.applied.clear();
        for row in rtx.open_table(HEAD)?.iter()? {
            let (k, v) = row?;
            let v = v.value();
            anyhow::ensure!(v.len() >= 16, "head entry of series {} is short", k.value());
            let partition = i64::from_le_bytes(v[0..8].try_into().expect("8"));
            let min_t = i64::from_le_bytes(v[8..16].try_into().expect("8"));
            let samples = xor::decode(&v[16..])
                .map_err(|e| anyhow::anyhow!("head chunk of series {}: {e:?}", k.value()))?;
            let mut enc = XorEncoder::default();
            let (mut max_t, mut last_bits) = (min_t, 0);
            for (t, v) in samples {
                enc.append(t, v);
                max_t = t;
                last_bits = v.to_bits();
            }
            head.series.insert(
                k.value(),
                HeadSeries {
                    enc,
                    partition,
                    min_t,
                    max_t,
                    last_bits,
                    sealed_gen: 0,
                    dirty: false,
                },
            );
        }
        for row in rtx.open_table(APPLIED)?.iter()? {
            let (k, v) = row?;
            head.applied.insert(k.value().to_string(), v.value());
        }
        head.durable = head.applied.clone();
        head.dirty.clear();
        head.next_sid = rtx
            .open_table(META)?
            .get("next_sid")?
            .map_or(1, |v| v.value());
        head.epoch += 1;
        head.generation += 1;
        head.stale = false;
        Ok(())
    }

    /// The sequence numbers of (agent, shard); 0 for none.
    pub fn ledger(&self, agent: &str, shard: u32) -> Ledger {
        let head = self.head.lock().expect("not poisoned");
        Store::ledger_of(&head, &applied_key(agent, shard))
    }

    fn ledger_of(head: &Head, key: &str) -> Ledger {
        Ledger {
            applied: head.applied.get(key).copied().unwrap_or(0),
            durable: head.durable.get(key).copied().unwrap_or(0),
        }
    }

    /// Highest applied sequence number of (agent, shard); 0 if none.
    pub fn applied_seq(&self, agent: &str, shard: u32) -> u64 {
        self.ledger(agent, shard).applied
    }

    /// A connection's hello: its references start empty in the current epoch, and the
    /// (agent, shard)'s sequence numbers say where its batches resume.
    pub fn hello(&self, agent: &str, shard: u32, refs: &mut ConnRefs) -> Ledger {
        let mut head = self.head.lock().expect("not poisoned");
        if head.stale {
            // On failure the epoch stays stale: the first batch tries again and
            // reports the error.
            let _ = self.reload(&mut head);
        }
        refs.clear();
        refs.epoch = Some(head.epoch);
        Store::ledger_of(&head, &applied_key(agent, shard))
    }

    /// Reopens the database if it was closed, and rebuilds the head from it.
    fn reload(&self, head: &mut Head) -> Result<(), ApplyError> {
        if self.db.read().expect("not poisoned").is_none() {
            self.reopen();
        }
        self.load_head(head).map_err(storage)
    }

    /// Makes everything applied so far durable (see "Checkpoints" in the module doc) if
    /// anything changed since the last checkpoint. Returns whether it committed.
    pub fn checkpoint(&self) -> Result<bool, ApplyError> {
        self.checkpoint_with(|| {})
    }

    /// [`Store::checkpoint`], calling `between` each time the head lock is released
    /// between two pieces (tests apply batches there).
    ///
    /// The checkpoint's target is `applied` when it starts: it takes the list of
    /// series changed since the last one and clears their flags, then writes their open
    /// chunks [`CHECKPOINT_PIECE_SERIES`] at a time, each piece under the head lock in a
    /// commit of its own, and lets batches be applied in between (it used to hold the
    /// lock throughout, 0.4-0.7 s at 128k series, while no batch could be applied and
    /// the agents' shippers fell behind). A piece writes a chunk as it is then, which
    /// may hold samples applied after the target. The last commit, under the lock,
    /// also writes again the open chunk of every series that sealed a chunk since the
    /// start (its earlier row would overlap the sealed chunk), writes `applied` as the
    /// target, and is durable, which makes the commits between the pieces durable too.
    /// After a crash each series then holds a prefix of its samples including all up
    /// to the target; agents resend from the target, and a resent sample already
    /// stored is recognised as a resend by the late-sample path.
    pub fn checkpoint_with(&self, mut between: impl FnMut()) -> Result<bool, ApplyError> {
        let _serial = self.durable_commits.lock().expect("not poisoned");
        let started = Instant::now();
        let (target, todo, epoch, start_gen) = {
            let mut head = self.head.lock().expect("not poisoned");
            if head.stale {
                self.reload(&mut head)?;
            }
            if head.dirty.is_empty() && head.applied == head.durable {
                head.last_checkpoint = Instant::now();
                return Ok(false);
            }
            let todo = std::mem::take(&mut head.dirty);
            for &sid in &todo {
                if let Some(h) = head.series.get_mut(sid) {
                    h.dirty = false;
                }
            }
            (head.applied.clone(), todo, head.epoch, head.generation)
        };
        let per_piece = self.piece_series.load(Relaxed).max(1);
        let mut pieces = todo.chunks(per_piece).peekable();
        loop {
            // At least one commit: `applied` may have moved with no open chunk changed.
            let piece = pieces.next().unwrap_or_default();
            let last = pieces.peek().is_none();
            let mut head = self.head.lock().expect("not poisoned");
            if head.stale || head.epoch != epoch {
                // Rolled back to the last durable commit meanwhile (a failed commit):
                // memory was rebuilt from disk, nothing of this checkpoint is left.
                return Err(ApplyError::Storage(
                    "checkpoint abandoned: the store was rolled back while it ran".into(),
                ));
            }
            let result = self.write_piece(&head, piece, last.then_some((&target, start_gen)));
            if let Err(e) = result {
                return Err(self.commit_failed(&mut head, e));
            }
            if last {
                self.durable_reached(&mut head, target);
                break;
            }
            drop(head);
            // The piece's pages go to the disk while batches are applied again.
            self.writeback(WritebackWait::Done);
            between();
        }
        self.metrics.checkpoints.fetch_add(1, Relaxed);
        self.metrics
            .checkpoint_micros
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        Ok(true)
    }

    /// Time since the last checkpoint.
    pub fn since_checkpoint(&self) -> std::time::Duration {
        self.head
            .lock()
            .expect("not poisoned")
            .last_checkpoint
            .elapsed()
    }

    /// Open chunks per checkpoint piece (tests make pieces small).
    #[doc(hidden)]
    pub fn set_checkpoint_piece_series(&self, n: usize) {
        self.piece_series.store(n, Relaxed);
    }

    /// One checkpoint piece: the open chunks of `sids`, committed without fsync; or,
    /// for the last (`last` = the target and the generation the checkpoint started
    /// at), also the open chunks sealed since the start and `applied` as the target,
    /// committed durably.
    fn write_piece(
        &self,
        head: &Head,
        sids: &[u64],
        last: Option<(&HashMap<String, u64>, u64)>,
    ) -> Result<(), ApplyError> {
        let mut tx = self.begin_write()?;
        let Some((target, start_gen)) = last else {
            tx.set_durability(redb::Durability::None);
            Store::write_dirty_head(&tx, head, sids)?;
            return tx.commit().map_err(storage);
        };
        Store::write_dirty_head(&tx, head, sids)?;
        let sealed: Vec<u64> = head
            .series
            .iter()
            .filter(|(_, h)| h.sealed_gen > start_gen)
            .map(|(sid, _)| sid)
            .collect();
        Store::write_dirty_head(&tx, head, &sealed)?;
        {
            let mut t = tx.open_table(APPLIED).map_err(storage)?;
            for key in head.applied.keys() {
                match target.get(key) {
                    Some(&seq) => t.insert(key.as_str(), seq).map_err(storage)?,
                    // First applied after the start: nothing of it is durable.
                    None => t.remove(key.as_str()).map_err(storage)?,
                };
            }
        }
        tx.commit().map_err(storage)
    }

    /// Writes the open chunks of the series `sids` (changed since the last durable
    /// commit) into `head`, as part of a durable commit.
    fn write_dirty_head(
        tx: &redb::WriteTransaction,
        head: &Head,
        sids: &[u64],
    ) -> Result<(), ApplyError> {
        let mut head_t = tx.open_table(HEAD).map_err(storage)?;
        let mut value = Vec::new();
        for sid in sids {
            // A series retention removed since has its row removed already.
            let Some(h) = head.series.get(*sid) else {
                continue;
            };
            value.clear();
            value.extend_from_slice(&h.partition.to_le_bytes());
            value.extend_from_slice(&h.min_t.to_le_bytes());
            value.extend_from_slice(h.enc.bytes());
            head_t.insert(*sid, value.as_slice()).map_err(storage)?;
        }
        Ok(())
    }

    /// After a durable commit: on success the durable point moves up; on failure the
    /// database is rolled back and the head rebuilt at the next use.
    fn finish_durable_commit(
        &self,
        head: &mut Head,
        result: Result<(), ApplyError>,
    ) -> Result<(), ApplyError> {
        match result {
            Ok(()) => {
                for sid in head.dirty.drain(..) {
                    if let Some(h) = head.series.get_mut(sid) {
                        h.dirty = false;
                    }
                }
                let applied = head.applied.clone();
                self.durable_reached(head, applied);
                Ok(())
            }
            Err(e) => Err(self.commit_failed(head, e)),
        }
    }

    /// A durable commit made `durable` the durable point: queries' generation moves,
    /// and the database's state is kept for [`Store::roll_back`].
    fn durable_reached(&self, head: &mut Head, durable: HashMap<String, u64>) {
        head.durable = durable;
        head.generation += 1;
        head.last_checkpoint = Instant::now();
        self.note_durable_state();
    }

    /// A durable commit (or a checkpoint piece) failed: the store is rolled back and
    /// the head rebuilt at the next use. Returns `e`.
    fn commit_failed(&self, head: &mut Head, e: ApplyError) -> ApplyError {
        self.metrics.commit_errors.fetch_add(1, Relaxed);
        head.stale = true;
        self.roll_back();
        e
    }

    /// Stores one batch (see the module doc; durable at the next checkpoint). `refs`
    /// maps this connection's series references to series ids and grows with the
    /// batch's new series; it must come from [`Store::hello`] in the current epoch.
    pub fn apply(&self, b: &ArchivedShipBatch, refs: &mut ConnRefs) -> Result<Applied, ApplyError> {
        let mut head = self.head.lock().expect("not poisoned");
        if head.stale {
            self.reload(&mut head)?;
        }
        if refs.epoch != Some(head.epoch) {
            return Err(ApplyError::Storage(
                "the store was rolled back to its last checkpoint since this connection's hello; say hello again".into(),
            ));
        }
        let key = applied_key(&b.agent, b.shard.to_native());
        let applied = head.applied.get(&key).copied().unwrap_or(0);
        let (first, last) = (b.first_seq.to_native(), b.last_seq.to_native());
        // Series must be interned even for a replayed batch: later batches on this
        // connection refer to them.
        if last <= applied {
            self.intern_only(&mut head, b, refs)?;
            self.metrics.batches_replayed.fetch_add(1, Relaxed);
            return Ok(Applied::Replay);
        }
        if first <= applied {
            return Err(ApplyError::Sequence(format!(
                "batch {first}..={last} of {key:?} overlaps the applied sequence {applied}"
            )));
        }
        let started = std::time::Instant::now();
        head.stale = true; // until the commit succeeds
        let result = self.apply_locked(&mut head, b, refs, &key, last);
        match result {
            Ok(n) => {
                head.stale = false;
                head.generation += 1;
                head.applied.insert(key, last);
                self.metrics.batches_applied.fetch_add(1, Relaxed);
                self.metrics
                    .commit_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
                Ok(Applied::Stored { samples: n })
            }
            Err(e) => {
                self.metrics.commit_errors.fetch_add(1, Relaxed);
                // Connection refs may point at series ids that were never committed.
                refs.clear();
                if matches!(e, ApplyError::Storage(_)) {
                    // Memory may hold part of the batch: rolled back to the last
                    // durable commit and rebuilt from it at the next use (every
                    // connection resends from there).
                    self.roll_back();
                } else {
                    // Refused before anything in memory changed.
                    head.stale = false;
                }
                Err(e)
            }
        }
    }

    fn intern_only(
        &self,
        head: &mut Head,
        b: &ArchivedShipBatch,
        refs: &mut ConnRefs,
    ) -> Result<(), ApplyError> {
        if b.new_series.is_empty() && b.new_targets.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write()?;
        tx.set_durability(redb::Durability::None);
        let mut next_sid = head.next_sid;
        self.intern(&tx, b, refs, &mut next_sid)?;
        put_next_sid(&tx, next_sid)?;
        tx.commit().map_err(storage)?;
        self.writeback(WritebackWait::Queued);
        head.next_sid = next_sid;
        head.generation += 1;
        Ok(())
    }

    fn intern(
        &self,
        tx: &redb::WriteTransaction,
        b: &ArchivedShipBatch,
        refs: &mut ConnRefs,
        next_sid: &mut u64,
    ) -> Result<(), ApplyError> {
        let mut series = tx.open_table(SERIES).map_err(storage)?;
        let mut labels_t = tx.open_table(LABELS).map_err(storage)?;
        let mut postings = tx.open_table(POSTINGS).map_err(storage)?;
        let mut tags_t = tx.open_table(TAGS).map_err(storage)?;
        for t in b.new_targets.iter() {
            refs.targets
                .insert(t.target_ref.to_native(), (pairs(&t.labels), pairs(&t.tags)));
        }
        let mut key = Vec::new();
        let mut tag_key = Vec::new();
        let mut prefix = Vec::new();
        let mut new_postings = NewPostings::default();
        for s in b.new_series.iter() {
            let tr = s.target_ref.to_native();
            let (target, tags) = refs.targets.get(&tr).ok_or_else(|| {
                ApplyError::Batch(format!(
                    "series ref {} refers to unknown target ref {tr}",
                    s.series_ref
                ))
            })?;
            let labels = rejoin_series(s, target)?;
            encode_labels(
                labels.iter().map(|(n, v)| (n.as_str(), v.as_str())),
                &mut key,
            );
            // Originals win: a tag named like one of the series' labels is left out.
            let kept = tags.iter().filter(|(n, _)| {
                labels
                    .binary_search_by(|(ln, _)| ln.as_str().cmp(n))
                    .is_err()
            });
            encode_labels(kept.map(|(n, v)| (n.as_str(), v.as_str())), &mut tag_key);
            let hash = series_hash(&key);
            let existing = find_series(&series, &labels_t, &key, hash)?;
            let (sid, created) = match existing {
                Some(sid) => (sid, false),
                None => {
                    let sid = *next_sid;
                    *next_sid += 1;
                    series.insert((hash, sid), ()).map_err(storage)?;
                    labels_t.insert(sid, key.as_slice()).map_err(storage)?;
                    for (n, v) in &labels {
                        new_postings.add(false, n, v, sid);
                    }
                    self.metrics.series_created.fetch_add(1, Relaxed);
                    (sid, true)
                }
            };
            let old = match created {
                true => None,
                false => tags_t
                    .get(sid)
                    .map_err(storage)?
                    .map(|v| v.value().to_vec()),
            };
            if old.as_deref() != Some(tag_key.as_slice()) {
                for (n, v) in decode_labels(old.as_deref().unwrap_or_default()) {
                    // Also a posting of this batch not written yet (a series twice in it).
                    new_postings.remove(true, &n, &v, sid);
                    pair_key(&mut prefix, true, &n, &v);
                    remove_posting(&mut postings, &prefix, sid)?;
                }
                for (n, v) in decode_labels(&tag_key) {
                    new_postings.add(true, &n, &v, sid);
                }
                tags_t.insert(sid, tag_key.as_slice()).map_err(storage)?;
            }
            refs.series.insert(s.series_ref.to_native(), sid);
        }
        new_postings.write(&mut postings)
    }

    fn apply_locked(
        &self,
        head: &mut Head,
        b: &ArchivedShipBatch,
        refs: &mut ConnRefs,
        applied_key: &str,
        last: u64,
    ) -> Result<u64, ApplyError> {
        let mut tx = self.begin_write()?;
        tx.set_durability(redb::Durability::None);
        let mut next_sid = head.next_sid;
        self.intern(&tx, b, refs, &mut next_sid)?;
        let sealed_gen = head.generation + 1;
        let sid_of = |r: u32| {
            refs.series.get(r).ok_or_else(|| {
                ApplyError::Batch(format!("sample refers to unknown series ref {r}"))
            })
        };
        // Every reference is checked before memory changes: a malformed batch leaves
        // the head as it was (no rebuild, no rollback for the other connections).
        let sample_sids = b.sample_refs.iter().map(|r| sid_of(r.to_native()));
        let sample_sids = sample_sids.collect::<Result<Vec<u64>, ApplyError>>()?;
        let refs_used = b.histograms.iter().map(|h| h.series_ref.to_native());
        let refs_used = refs_used.chain(b.exemplars.iter().map(|e| e.series_ref.to_native()));
        for r in refs_used {
            sid_of(r)?;
        }
        let mut stored = 0u64;
        {
            let mut chunks = tx.open_table(CHUNKS).map_err(storage)?;
            let mut value = Vec::new();
            for (i, &sid) in sample_sids.iter().enumerate() {
                // Each sample is usually another series: its open chunk is loaded in
                // steps ahead of use (the slot, then the entry, then the chunk's
                // bytes), so the append finds all three in cache.
                if let Some(&ahead) = sample_sids.get(i + 16) {
                    head.series.prefetch_slot(ahead);
                }
                if let Some(&ahead) = sample_sids.get(i + 8) {
                    head.series.prefetch_entry(ahead);
                }
                if let Some(h) = sample_sids.get(i + 4).and_then(|&a| head.series.get(a)) {
                    h.enc.prefetch();
                }
                let t = b.sample_ts[i].to_native();
                let v = f64::from_bits(b.sample_values[i].to_native());
                let p = partition_of(t);
                let at = match head.series.index(sid) {
                    None => head.series.insert(sid, HeadSeries::new(t, v, 0)),
                    Some(at) => {
                        let h = &mut head.series.open[at];
                        if t <= h.max_t {
                            let late = if t < h.max_t {
                                store_late(&mut chunks, h, sid, t, v, sealed_gen, &mut value)?
                            } else if h.last_bits == v.to_bits() {
                                Late::Duplicate
                            } else {
                                Late::Conflicting
                            };
                            let m = &self.metrics;
                            match late {
                                Late::Stored => m.samples_out_of_order.fetch_add(1, Relaxed),
                                Late::Duplicate => m.samples_duplicate.fetch_add(1, Relaxed),
                                Late::Conflicting => m.samples_conflicting.fetch_add(1, Relaxed),
                            };
                            if late != Late::Stored {
                                continue;
                            }
                        } else if h.partition != p || h.enc.len() >= SAMPLES_PER_CHUNK_MAX {
                            let span = (h.min_t, h.max_t);
                            put_chunk_row(
                                &mut chunks,
                                h.partition,
                                sid,
                                span,
                                h.enc.bytes(),
                                &mut value,
                            )?;
                            self.metrics.chunks_sealed.fetch_add(1, Relaxed);
                            let dirty = h.dirty;
                            *h = HeadSeries::new(t, v, sealed_gen);
                            h.dirty = dirty;
                        } else {
                            h.enc.append(t, v);
                            h.max_t = t;
                            h.last_bits = v.to_bits();
                        }
                        at
                    }
                };
                let h = &mut head.series.open[at];
                if !h.dirty {
                    h.dirty = true;
                    head.dirty.push(sid);
                }
                stored += 1;
            }
        }
        let (mut hist_new, mut hist_dup) = (0, 0);
        if !b.histograms.is_empty() {
            let mut t_ = tx.open_table(HISTOGRAMS).map_err(storage)?;
            for h in b.histograms.iter() {
                let sid = sid_of(h.series_ref.to_native())?;
                let ts = h.ts.to_native();
                let k = (partition_of(ts), sid, ts);
                if t_.get(k).map_err(storage)?.is_some() {
                    hist_dup += 1;
                    continue;
                }
                t_.insert(k, h.proto.as_slice()).map_err(storage)?;
                hist_new += 1;
            }
        }
        let mut ex_new = 0;
        if !b.exemplars.is_empty() {
            let mut t_ = tx.open_table(EXEMPLARS).map_err(storage)?;
            let mut value = Vec::new();
            let mut lbl = Vec::new();
            for e in b.exemplars.iter() {
                let sid = sid_of(e.series_ref.to_native())?;
                let ts = e.ts.to_native();
                encode_labels(
                    e.labels.iter().map(|l| (l.name.as_str(), l.value.as_str())),
                    &mut lbl,
                );
                value.clear();
                value.extend_from_slice(&e.value_bits.to_native().to_le_bytes());
                value.extend_from_slice(&lbl);
                t_.insert((partition_of(ts), sid, ts), value.as_slice())
                    .map_err(storage)?;
                ex_new += 1;
            }
        }
        if !b.metadata.is_empty() {
            let mut t_ = tx.open_table(METADATA).map_err(storage)?;
            let mut value = Vec::new();
            for m in b.metadata.iter() {
                value.clear();
                value.extend_from_slice(&m.kind.to_native().to_le_bytes());
                put_lp(&mut value, m.help.as_bytes());
                put_lp(&mut value, m.unit.as_bytes());
                t_.insert(m.family.as_str(), value.as_slice())
                    .map_err(storage)?;
            }
        }
        tx.open_table(APPLIED)
            .map_err(storage)?
            .insert(applied_key, last)
            .map_err(storage)?;
        put_next_sid(&tx, next_sid)?;
        tx.commit().map_err(storage)?;
        self.writeback(WritebackWait::Queued);
        head.next_sid = next_sid;
        let m = &self.metrics;
        m.samples_appended.fetch_add(stored, Relaxed);
        m.histograms_stored.fetch_add(hist_new, Relaxed);
        m.histograms_duplicate.fetch_add(hist_dup, Relaxed);
        m.exemplars_stored.fetch_add(ex_new, Relaxed);
        m.metadata_stored
            .fetch_add(b.metadata.len() as u64, Relaxed);
        Ok(stored + hist_new)
    }

    pub fn reader(&self) -> anyhow::Result<Reader<'_>> {
        // Under the head lock, so the snapshot is exactly the commits of `generation`.
        let (tx, generation) = {
            let head = self.head.lock().expect("not poisoned");
            let tx = self.begin_read().map_err(|e| anyhow::anyhow!("{e}"))?;
            (tx, head.generation)
        };
        let span = partition_span(&tx)?;
        Ok(Reader {
            tx,
            span,
            store: self,
            generation,
        })
    }

    /// Deletes every partition that ended before `now_ms - retention`. Returns the
    /// number of partitions deleted.
    pub fn apply_retention(&self, now_ms: i64) -> anyhow::Result<u64> {
        let cutoff = partition_of(now_ms - self.retention_ms);
        let _serial = self.durable_commits.lock().expect("not poisoned");
        let mut head = self.head.lock().expect("not poisoned");
        if head.stale {
            self.load_head(&mut head)?;
        }
        let tx = self.begin_write().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut partitions = hashbrown::HashSet::new();
        // Any failure from here on goes through `finish_durable_commit`: memory may
        // have lost some expired series already, so the store is rolled back.
        let deleted = (|| -> Result<(), ApplyError> {
            let lo = (i64::MIN, 0u64, i64::MIN);
            let hi = (cutoff, 0u64, i64::MIN);
            for def in [CHUNKS, HISTOGRAMS, EXEMPLARS] {
                let mut t = tx.open_table(def).map_err(storage)?;
                t.retain_in(lo..hi, |k, _| {
                    partitions.insert(k.0);
                    false
                })
                .map_err(storage)?;
            }
            let mut h = tx.open_table(HEAD).map_err(storage)?;
            let expired: Vec<u64> = head
                .series
                .iter()
                .filter(|(_, s)| s.partition < cutoff)
                .map(|(sid, _)| sid)
                .collect();
            for &sid in &expired {
                h.remove(sid).map_err(storage)?;
                if let Some(s) = head.series.remove(sid) {
                    partitions.insert(s.partition);
                }
            }
            Ok(())
        })();
        // A durable commit: it carries the open chunks changed since the last one.
        let result = deleted
            .and_then(|()| Store::write_dirty_head(&tx, &head, &head.dirty))
            .and_then(|()| tx.commit().map_err(storage));
        self.finish_durable_commit(&mut head, result)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let n = partitions.len() as u64;
        self.metrics
            .retention_partitions_deleted
            .fetch_add(n, Relaxed);
        Ok(n)
    }

    pub fn head_series(&self) -> usize {
        self.head.lock().expect("not poisoned").series.len()
    }
}

/// The first and last partition that hold anything in `tx`, so a query over a huge
/// window only visits those.
fn partition_span(tx: &redb::ReadTransaction) -> anyhow::Result<Option<(i64, i64)>> {
    let mut span: Option<(i64, i64)> = None;
    for def in [CHUNKS, HISTOGRAMS] {
        let t = tx.open_table(def)?;
        let a = t.first()?.map(|(k, _)| k.value().0);
        let b = t.last()?.map(|(k, _)| k.value().0);
        if let (Some(a), Some(b)) = (a, b) {
            span = Some(span.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
        }
    }
    Ok(span)
}

/// Closing the store makes everything applied durable (a crash instead loses only
/// what the agents still hold in their WALs).
impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.checkpoint() {
            tracing::error!(error = %e, "final checkpoint failed; agents resend what it would have made durable");
        }
    }
}

/// A consistent snapshot of the database for queries, plus the open chunks read from
/// memory when they are asked for.
pub struct Reader<'s> {
    tx: redb::ReadTransaction,
    /// First and last partition with sealed chunks or histograms.
    span: Option<(i64, i64)>,
    store: &'s Store,
    /// The store's commit generation `tx` shows.
    generation: u64,
}

impl Reader<'_> {
    pub fn labels(&self, sid: u64) -> anyhow::Result<Option<Labels>> {
        Ok(self
            .tx
            .open_table(LABELS)?
            .get(sid)?
            .map(|v| decode_labels(v.value())))
    }

    /// The series' tags (meta, agent, custom; names without prefix), sorted by name.
    pub fn tags(&self, sid: u64) -> anyhow::Result<Labels> {
        Ok(self
            .tx
            .open_table(TAGS)?
            .get(sid)?
            .map(|v| decode_labels(v.value()))
            .unwrap_or_default())
    }

    /// Every series id.
    pub fn all_series(&self) -> anyhow::Result<Vec<u64>> {
        let t = self.tx.open_table(LABELS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(row?.0.value());
        }
        Ok(out)
    }

    /// Series ids with label `name` = `value`, ascending.
    pub fn postings(&self, name: &str, value: &str) -> anyhow::Result<Vec<u64>> {
        let prefix = postings_pair_prefix(name, value);
        let end = prefix_end(&prefix);
        let t = self.tx.open_table(POSTINGS)?;
        let mut out = Vec::new();
        for row in t.range(prefix.as_slice()..end.as_slice())? {
            let (k, v) = row?;
            if k.value().len() == prefix.len() + 8 {
                extend_from_block(&mut out, v.value());
            }
        }
        Ok(out)
    }

    /// Every value of label `name`, with the series that have it.
    pub fn values_of(&self, name: &str) -> anyhow::Result<Vec<(String, Vec<u64>)>> {
        let prefix = postings_name_prefix(name);
        let end = prefix_end(&prefix);
        let t = self.tx.open_table(POSTINGS)?;
        let mut out: Vec<(String, Vec<u64>)> = Vec::new();
        for row in t.range(prefix.as_slice()..end.as_slice())? {
            let (k, block) = row?;
            let k = k.value();
            let mut rest = &k[prefix.len()..];
            let Some(v) = take_lp(&mut rest) else {
                continue;
            };
            if rest.len() != 8 {
                continue;
            }
            let v = String::from_utf8_lossy(v);
            match out.last_mut() {
                Some((last, ids)) if *last == v => extend_from_block(ids, block.value()),
                _ => out.push((v.into_owned(), block_sids(block.value()).collect())),
            }
        }
        Ok(out)
    }

    /// Every label name in the index.
    pub fn label_names(&self) -> anyhow::Result<Vec<String>> {
        let t = self.tx.open_table(POSTINGS)?;
        let mut out = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        loop {
            let next = t.range(from.as_slice()..)?.next();
            let Some(row) = next else { break };
            let (k, _) = row?;
            let mut rest = k.value();
            let Some(name) = take_lp(&mut rest) else {
                break;
            };
            out.push(String::from_utf8_lossy(name).into_owned());
            // Skip every other key of this name: their value length is below u32::MAX.
            from = postings_name_prefix(&String::from_utf8_lossy(name));
            from.extend_from_slice(&[0xff; 5]);
        }
        Ok(out)
    }

    /// Chunks and histograms of `sid` overlapping `[start, end]`.
    ///
    /// The open chunk comes from memory. If one of the series' chunks was sealed after
    /// this reader's snapshot, the sealed chunks are read from a snapshot taken together
    /// with the open chunk, so none falls between the two.
    pub fn series_data(&self, sid: u64, start: i64, end: i64) -> anyhow::Result<SeriesData> {
        let mut head = self.store.head.lock().expect("not poisoned");
        if head.stale {
            // After a failed commit: memory and disk are back at the last checkpoint
            // once the head is rebuilt.
            self.store
                .reload(&mut head)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let open = head.series.get(sid);
        let mut d = match open {
            Some(h) if h.sealed_gen > self.generation => {
                let tx = self
                    .store
                    .begin_read()
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                sealed_data(&tx, partition_span(&tx)?, sid, start, end)?
            }
            _ => sealed_data(&self.tx, self.span, sid, start, end)?,
        };
        if let Some(h) = open.filter(|h| h.min_t <= end && h.max_t >= start) {
            d.chunks.push((h.min_t, h.max_t, h.enc.bytes().to_vec()));
        }
        Ok(d)
    }

    /// Whether `sid` has any sample or histogram in `[start, end]`.
    pub fn has_data(&self, sid: u64, start: i64, end: i64) -> anyhow::Result<bool> {
        let d = self.series_data(sid, start, end)?;
        if !d.histograms.is_empty() {
            return Ok(true);
        }
        for (_, _, c) in &d.chunks {
            if xor::decode(c)
                .map_err(|e| anyhow::anyhow!("chunk of series {sid}: {e:?}"))?
                .iter()
                .any(|(t, _)| (start..=end).contains(t))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Sizes of the tables, for `/metrics` and the closing numbers.
    pub fn counts(&self) -> anyhow::Result<(u64, u64)> {
        use redb::ReadableTableMetadata;
        Ok((
            self.tx.open_table(LABELS)?.len()?,
            self.tx.open_table(CHUNKS)?.len()?,
        ))
    }
}

/// Sealed chunks and histograms of `sid` overlapping `[start, end]` in `tx`, whose
/// partitions with data are `span`.
fn sealed_data(
    tx: &redb::ReadTransaction,
    span: Option<(i64, i64)>,
    sid: u64,
    start: i64,
    end: i64,
) -> anyhow::Result<SeriesData> {
    let mut d = SeriesData::default();
    let chunks = tx.open_table(CHUNKS)?;
    let hist = tx.open_table(HISTOGRAMS)?;
    // A chunk lies within one partition, so only the window's partitions are read,
    // and of those only the ones that hold anything.
    let (lo, hi) = span.unwrap_or((0, -1));
    for p in partition_of(start).max(lo)..=partition_of(end).min(hi) {
        for row in chunks.range((p, sid, i64::MIN)..=(p, sid, i64::MAX))? {
            let (k, v) = row?;
            let v = v.value();
            let max_t = i64::from_le_bytes(v[0..8].try_into().expect("8"));
            let min_t = k.value().2;
            if min_t <= end && max_t >= start {
                d.chunks.push((min_t, max_t, v[8..].to_vec()));
            }
        }
        for row in hist.range((p, sid, start)..=(p, sid, end))? {
            let (k, v) = row?;
            d.histograms.push((k.value().2, v.value().to_vec()));
        }
    }
    Ok(d)
}

/// What became of a sample not after the newest one of its series.
#[derive(Debug, PartialEq, Eq)]
enum Late {
    /// Put in time order into the chunk whose time it falls in.
    Stored,
    /// Its timestamp and value bits were already stored (a resend).
    Duplicate,
    /// Its timestamp was already stored with another value, which is kept.
    Conflicting,
}

/// A chunk rewritten by late samples is cut in two beyond this many samples, so one
/// late sample never costs more than re-encoding a few hundred.
const LATE_CHUNK_MAX: usize = 2 * SAMPLES_PER_CHUNK_MAX;

/// Puts `(t, v)` into `samples` (in time order, one per timestamp) unless `t` is there.
fn merge_sample(samples: &mut Vec<(i64, f64)>, t: i64, v: f64) -> Late {
    match samples.binary_search_by_key(&t, |s| s.0) {
        Ok(i) if samples[i].1.to_bits() == v.to_bits() => Late::Duplicate,
        Ok(_) => Late::Conflicting,
        Err(i) => {
            samples.insert(i, (t, v));
            Late::Stored
        }
    }
}

fn encode_samples(samples: &[(i64, f64)]) -> XorEncoder {
    let mut enc = XorEncoder::default();
    for &(t, v) in samples {
        enc.append(t, v);
    }
    enc
}

/// Writes the sealed chunk `chunk` of `sid` spanning `(min_t, max_t)` as its `chunks`
/// row: key `(partition, sid, min_t)`, value `max_t` LE then the chunk (`value` is
/// scratch).
fn put_chunk_row(
    chunks: &mut redb::Table<(i64, u64, i64), &[u8]>,
    partition: i64,
    sid: u64,
    (min_t, max_t): (i64, i64),
    chunk: &[u8],
    value: &mut Vec<u8>,
) -> Result<(), ApplyError> {
    value.clear();
    value.extend_from_slice(&max_t.to_le_bytes());
    value.extend_from_slice(chunk);
    chunks
        .insert((partition, sid, min_t), value.as_slice())
        .map_err(storage)?;
    Ok(())
}

/// Writes `samples` (in time order, within `partition`) as one sealed chunk.
fn put_chunk(
    chunks: &mut redb::Table<(i64, u64, i64), &[u8]>,
    partition: i64,
    sid: u64,
    samples: &[(i64, f64)],
    value: &mut Vec<u8>,
) -> Result<(), ApplyError> {
    let span = (samples[0].0, samples[samples.len() - 1].0);
    let chunk = encode_samples(samples);
    put_chunk_row(chunks, partition, sid, span, chunk.bytes(), value)
}

fn decode_chunk(sid: u64, chunk: &[u8]) -> Result<Vec<(i64, f64)>, ApplyError> {
    xor::decode(chunk)
        .map_err(|e| ApplyError::Storage(format!("chunk of series {sid} is corrupt: {e:?}")))
}

/// Stores a sample older than the newest one of its series `h` (see "Late samples").
///
/// The sample goes into the chunk whose time span it falls in, or the nearest one
/// before it in its partition (the first one if none is before it), which is decoded
/// and written again with the sample in place. A series' chunks therefore stay
/// disjoint and in time order, and readers need no merge. Cold: one rewrite of a chunk
/// per late sample, where an in-order sample costs an append.
#[cold]
#[inline(never)]
fn store_late(
    chunks: &mut redb::Table<(i64, u64, i64), &[u8]>,
    h: &mut HeadSeries,
    sid: u64,
    t: i64,
    v: f64,
    sealed_gen: u64,
    value: &mut Vec<u8>,
) -> Result<Late, ApplyError> {
    let p = partition_of(t);
    if p == h.partition && t >= h.min_t {
        let mut samples = decode_chunk(sid, h.enc.bytes())?;
        let late = merge_sample(&mut samples, t, v);
        if late == Late::Stored {
            let mut open = &samples[..];
            if open.len() > LATE_CHUNK_MAX {
                let (sealed, rest) = open.split_at(open.len() / 2);
                put_chunk(chunks, p, sid, sealed, value)?;
                h.sealed_gen = sealed_gen;
                open = rest;
            }
            h.enc = encode_samples(open);
            h.min_t = open[0].0;
        }
        return Ok(late);
    }
    let near = {
        let mut before = chunks
            .range((p, sid, i64::MIN)..=(p, sid, t))
            .map_err(storage)?;
        match before.next_back() {
            Some(row) => Some(row.map_err(storage)?),
            None => {
                let mut after = chunks
                    .range((p, sid, t)..=(p, sid, i64::MAX))
                    .map_err(storage)?;
                after.next().transpose().map_err(storage)?
            }
        }
        .map(|(k, c)| (k.value().2, c.value()[8..].to_vec()))
    };
    let (mut samples, old_min_t) = match near {
        Some((min_t, c)) => (decode_chunk(sid, &c)?, Some(min_t)),
        None => (Vec::new(), None),
    };
    let late = merge_sample(&mut samples, t, v);
    if late != Late::Stored {
        return Ok(late);
    }
    // A sealed chunk changed: a checkpoint running meanwhile must write this series'
    // open chunk again at its end, or a crash could leave the sealed chunk durable
    // without the open chunk that keeps resends of its samples from being stored twice.
    h.sealed_gen = sealed_gen;
    if let Some(min_t) = old_min_t.filter(|&m| m != samples[0].0) {
        chunks.remove((p, sid, min_t)).map_err(storage)?;
    }
    if samples.len() > LATE_CHUNK_MAX {
        let (a, b) = samples.split_at(samples.len() / 2);
        put_chunk(chunks, p, sid, a, value)?;
        put_chunk(chunks, p, sid, b, value)?;
    } else {
        put_chunk(chunks, p, sid, &samples, value)?;
    }
    Ok(late)
}

#[cfg(test)]
mod tests {
    use super::{
        pair_key, postings_name_prefix, postings_pair_prefix, put_lp, HeadSeries, OpenChunks,
        SeriesRefs, REF_GAP_MAX, TAG_MARK,
    };

    #[test]
    fn series_refs_dense_sparse_and_overwritten() {
        let mut r = SeriesRefs::default();
        r.insert(0, 10);
        r.insert(3, 13); // a gap: refs 1 and 2 unknown
        let far = (REF_GAP_MAX + 10) as u32;
        r.insert(far, 99); // far beyond: kept aside, the vector stays small
        assert!(r.dense.len() <= 4 + REF_GAP_MAX);
        assert_eq!(
            (r.get(0), r.get(1), r.get(3), r.get(far)),
            (Some(10), None, Some(13), Some(99))
        );
        // The vector grows past the far ref: it is still found, and overwriting it
        // moves it into the vector.
        for i in 4..far {
            r.insert(i, 100 + u64::from(i));
        }
        assert_eq!(r.get(far), Some(99));
        r.insert(far, 7);
        assert_eq!((r.get(far), r.sparse.len()), (Some(7), 0));
        assert_eq!((r.get(far + 1), r.get(u32::MAX)), (None, None));
        r.clear();
        assert_eq!(r.get(0), None);
    }

    #[test]
    fn pair_keys_are_the_postings_prefixes_queries_look_up() {
        // `lp(name) lp(value)`, built from the name prefix queries use for every value.
        let lp_pair = |n: &str, v: &str| {
            let mut k = postings_name_prefix(n);
            put_lp(&mut k, v.as_bytes());
            k
        };
        let mut k = Vec::new();
        for (n, v) in [("job", "node"), ("__name__", "up"), ("é", "ü x")] {
            pair_key(&mut k, false, n, v);
            assert_eq!(k, lp_pair(n, v));
            assert_eq!(postings_pair_prefix(n, v), lp_pair(n, v));
            pair_key(&mut k, true, n, v);
            assert_eq!(k, lp_pair(&format!("{TAG_MARK}{n}"), v));
        }
    }

    /// The open chunk of `sid` in `c`, told by its first timestamp.
    fn first_t(c: &OpenChunks, sid: u64) -> Option<i64> {
        c.get(sid).map(|h| h.min_t)
    }

    #[test]
    fn open_chunks_stay_found_by_series_id_across_removals_and_replacements() {
        let mut c = OpenChunks::default();
        for sid in [3, 1, 7, 4, 9] {
            c.insert(sid, HeadSeries::new(sid as i64 * 10, 0.0, 0));
        }
        assert_eq!(c.len(), 5);
        // Removing one that is not last moves the last (9) into its place.
        assert_eq!(c.remove(1).map(|h| h.min_t), Some(10));
        assert_eq!(c.remove(1).map(|h| h.min_t), None);
        for (sid, t) in [
            (3, Some(30)),
            (1, None),
            (7, Some(70)),
            (4, Some(40)),
            (9, Some(90)),
        ] {
            assert_eq!(first_t(&c, sid), t, "series {sid}");
        }
        // Replacing keeps one entry; ids never given and far beyond are absent.
        c.insert(9, HeadSeries::new(91, 0.0, 0));
        assert_eq!((c.len(), first_t(&c, 9)), (4, Some(91)));
        assert_eq!(
            (first_t(&c, 0), first_t(&c, 2), first_t(&c, u64::MAX)),
            (None, None, None)
        );
        let mut all: Vec<(u64, i64)> = c.iter().map(|(sid, h)| (sid, h.min_t)).collect();
        all.sort_unstable();
        assert_eq!(all, vec![(3, 30), (4, 40), (7, 70), (9, 91)]);
        // Emptied one by one, the last removed being the one moved earlier.
        for sid in [9, 3, 4, 7] {
            assert!(c.remove(sid).is_some(), "series {sid}");
        }
        assert_eq!((c.len(), c.iter().count()), (0, 0));
        c.insert(1, HeadSeries::new(5, 0.0, 0));
        assert_eq!(first_t(&c, 1), Some(5));
        c.clear();
        assert_eq!(first_t(&c, 1), None);
    }
}
