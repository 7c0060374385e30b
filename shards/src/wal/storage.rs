//! Where WAL segments live. [`Storage`] is the WAL's whole view of the disk, so the
//! model-based test can run the real WAL code against a simulated disk that loses
//! unsynced bytes on a crash; [`FileStorage`] is the real one (files written with
//! `O_DIRECT`, or through the page cache where the filesystem refuses it, and
//! fdatasynced, on the shard's blocking thread).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::format::{parse_segment_file_name, segment_file_name};

/// The directory of one shard's segments.
pub trait Storage {
    type Writer: SegmentWriter;
    /// First sequence numbers of the existing segments, ascending.
    fn list(&self) -> io::Result<Vec<u64>>;
    fn read(&self, first_seq: u64) -> io::Result<Vec<u8>>;
    /// Up to `len` bytes of a segment from `offset` into `buf` (fewer at its end).
    fn read_at(
        &self,
        first_seq: u64,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        let data = self.read(first_seq)?;
        let start = (offset as usize).min(data.len());
        buf.clear();
        buf.extend_from_slice(&data[start..(start + len).min(data.len())]);
        Ok(())
    }
    /// [`Storage::read_at`] without blocking the shard: up to `len` bytes of a segment
    /// from `offset`, in `buf` (whose allocation is reused: a fresh 4 MiB window was a
    /// new mapping whose pages all faulted). Here at once; [`FileStorage`] reads on the
    /// shard's blocking thread.
    fn read_window(
        &self,
        first_seq: u64,
        offset: u64,
        len: usize,
        mut buf: Vec<u8>,
    ) -> impl Future<Output = io::Result<Vec<u8>>> {
        let read = self.read_at(first_seq, offset, len, &mut buf);
        std::future::ready(read.map(|()| buf))
    }
    /// Cuts a segment to `len` bytes, durably.
    fn truncate(&self, first_seq: u64, len: u64) -> io::Result<()>;
    fn remove(&self, first_seq: u64) -> io::Result<()>;
    /// Removes an acknowledged segment, durably, possibly keeping its file for a later
    /// [`Storage::create`] to write over. Here the same as [`Storage::remove`].
    fn recycle(&self, first_seq: u64) -> io::Result<()> {
        self.remove(first_seq)
    }
    /// Saves the floor `next_seq` ([`Storage::save_floor`]), then removes the segments
    /// `firsts` in order. Returns how many were removed and the first error. Here at
    /// once; [`FileStorage`] runs it on the shard's blocking thread.
    fn retire(
        &self,
        next_seq: u64,
        firsts: Vec<u64>,
    ) -> impl Future<Output = (usize, io::Result<()>)> {
        std::future::ready(retire_now(self, next_seq, &firsts))
    }
    /// Durably records that sequence numbers below `next_seq` are used, so they are never
    /// handed out again even when every segment has been deleted.
    fn save_floor(&self, next_seq: u64) -> io::Result<()>;
    fn load_floor(&self) -> io::Result<Option<u64>>;
    /// Creates a segment whose directory entry is durable, and starts it with `header`
    /// (written, not yet synced).
    fn create(
        &self,
        first_seq: u64,
        header: &[u8],
    ) -> impl Future<Output = io::Result<Self::Writer>>;
}

/// Appends to one segment. `write` may only buffer; `flush` hands everything written
/// so far to the device and, with `fdatasync`, makes it durable; `close` does both and
/// releases.
pub trait SegmentWriter {
    fn write(&mut self, bytes: &[u8]) -> impl Future<Output = io::Result<()>>;
    fn flush(&mut self, fdatasync: bool) -> impl Future<Output = io::Result<()>>;
    fn close(self) -> impl Future<Output = io::Result<()>>;
}

/// The steps of [`Storage::retire`], on the calling thread.
pub(crate) fn retire_now<S: Storage + ?Sized>(
    storage: &S,
    next_seq: u64,
    firsts: &[u64],
) -> (usize, io::Result<()>) {
    if let Err(e) = storage.save_floor(next_seq) {
        return (0, Err(e));
    }
    for (removed, first) in firsts.iter().enumerate() {
        if let Err(e) = storage.recycle(*first) {
            return (removed, Err(e));
        }
    }
    (firsts.len(), Ok(()))
}

/// Acknowledged segment files kept for reuse, at most; beyond that they are deleted.
pub const SPARES_MAX: usize = 2;

/// Name suffix of a segment file kept for reuse (`<first_seq as 16 hex digits>.spare`).
/// Segment listings ignore it.
pub const SPARE_SUFFIX: &str = ".spare";

/// Segments as files in a directory.
#[derive(Clone)]
pub struct FileStorage {
    dir: PathBuf,
    /// New segments are written with `O_DIRECT` where the filesystem allows it
    /// ([`FileSegmentWriter`]).
    direct_io: bool,
}

impl FileStorage {
    pub fn open(dir: &Path) -> io::Result<FileStorage> {
        std::fs::create_dir_all(dir)?;
        Ok(FileStorage {
            dir: dir.to_path_buf(),
            direct_io: true,
        })
    }

    /// Whether segments are written with `O_DIRECT` (`wal.direct_io`; on by default).
    pub fn direct_io(mut self, on: bool) -> FileStorage {
        self.direct_io = on;
        self
    }

    fn path(&self, first_seq: u64) -> PathBuf {
        self.dir.join(segment_file_name(first_seq))
    }

    fn sync_dir(&self) -> io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// The spare segment files of the directory.
    fn spares(&self) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(SPARE_SUFFIX))
            {
                out.push(entry.path());
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Renames a spare file to the segment `path` and syncs the directory; `false` if
    /// there is no spare.
    fn reuse_spare(&self, path: &Path) -> io::Result<bool> {
        let Some(spare) = self.spares()?.into_iter().next() else {
            return Ok(false);
        };
        std::fs::rename(spare, path)?;
        self.sync_dir()?;
        Ok(true)
    }
}

/// The sequence floor: `next_seq` u64 LE, then its CRC-32C u32 LE.
pub const FLOOR_FILE: &str = "next_seq";
const FLOOR_FILE_TMP: &str = "next_seq.tmp";

pub fn encode_floor(next_seq: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&next_seq.to_le_bytes());
    let crc = crc32c::crc32c(&b[..8]);
    b[8..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Reads the floor file of a directory; a missing file is `None`, a damaged one an error.
pub fn load_floor(dir: &Path) -> io::Result<Option<u64>> {
    let b = match std::fs::read(dir.join(FLOOR_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is damaged", dir.join(FLOOR_FILE).display()),
        )
    };
    if b.len() != 12 {
        return Err(bad());
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[..8]);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&b[8..]);
    if crc32c::crc32c(&b[..8]) != u32::from_le_bytes(crc) {
        return Err(bad());
    }
    Ok(Some(u64::from_le_bytes(seq)))
}

/// Lists the segments of a directory (also used by `promgate wal inspect`).
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            out.push(seq);
        }
    }
    out.sort_unstable();
    Ok(out)
}

impl Storage for FileStorage {
    type Writer = FileSegmentWriter;

    fn list(&self) -> io::Result<Vec<u64>> {
        list_segments(&self.dir)
    }

    fn read(&self, first_seq: u64) -> io::Result<Vec<u8>> {
        // Start-up and inspection only: a plain blocking read is simplest.
        std::fs::read(self.path(first_seq))
    }

    fn read_at(
        &self,
        first_seq: u64,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        // The shipper behind the memory tail, a window at a time (on the blocking
        // thread, through `read_window`), bounded (`replay_window_bytes`); from the disk
        // when the commits are direct, else mostly from the page cache.
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(self.path(first_seq))?;
        buf.clear();
        buf.resize(len, 0);
        let mut got = 0;
        while got < len {
            match f.read_at(&mut buf[got..], offset + got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        Ok(())
    }

    fn truncate(&self, first_seq: u64, len: u64) -> io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(first_seq))?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn remove(&self, first_seq: u64) -> io::Result<()> {
        std::fs::remove_file(self.path(first_seq))?;
        self.sync_dir()
    }

    /// Renames the segment to a spare while fewer than [`SPARES_MAX`] are kept, and
    /// deletes it otherwise. A rename is cheap where a delete is not: on a filesystem
    /// mounted with `discard` (as on this machine) the freed blocks are trimmed inside
    /// the journal commit, and every WAL fdatasync of the disk waits behind it (50-250
    /// ms at each checkpoint's acknowledgement, the agent's worst latency at a steady
    /// rate). And a segment written over an old one's blocks, which are allocated and
    /// written, needs no allocation and no journal commit to sync its records.
    fn recycle(&self, first_seq: u64) -> io::Result<()> {
        let path = self.path(first_seq);
        if self.spares()?.len() >= SPARES_MAX {
            std::fs::remove_file(path)?;
        } else {
            let spare = self.dir.join(format!("{first_seq:016x}{SPARE_SUFFIX}"));
            std::fs::rename(path, spare)?;
        }
        self.sync_dir()
    }

    async fn read_window(
        &self,
        first_seq: u64,
        offset: u64,
        len: usize,
        mut buf: Vec<u8>,
    ) -> io::Result<Vec<u8>> {
        // The shipper catching up from disk: the read may wait for the device, so it
        // runs on the blocking thread while the shard serves its connections.
        let storage = self.clone();
        glommio::executor()
            .spawn_blocking(move || {
                storage
                    .read_at(first_seq, offset, len, &mut buf)
                    .map(|()| buf)
            })
            .await
    }

    /// On glommio's blocking thread of the shard: an unlink and the directory fsyncs
    /// wait for the disk (30-100 ms for a 64 MiB segment on this machine's disk, mounted
    /// with `discard`), and the shard's thread would otherwise stop serving every
    /// connection meanwhile.
    async fn retire(&self, next_seq: u64, firsts: Vec<u64>) -> (usize, io::Result<()>) {
        let storage = self.clone();
        glommio::executor()
            .spawn_blocking(move || retire_now(&storage, next_seq, &firsts))
            .await
    }

    fn save_floor(&self, next_seq: u64) -> io::Result<()> {
        use std::io::Write;
        let tmp = self.dir.join(FLOOR_FILE_TMP);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode_floor(next_seq))?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(FLOOR_FILE))?;
        self.sync_dir()
    }

    fn load_floor(&self) -> io::Result<Option<u64>> {
        load_floor(&self.dir)
    }

    async fn create(&self, first_seq: u64, header: &[u8]) -> io::Result<FileSegmentWriter> {
        let path = self.path(first_seq);
        if path.exists() {
            // Never truncate a segment by reusing its name.
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", path.display()),
            ));
        }
        // The rename or creation and the directory fsync wait for the filesystem's
        // journal: on the blocking thread, so the shard's other connections are served
        // meanwhile.
        let storage = self.clone();
        let (file, reused, direct) = glommio::executor()
            .spawn_blocking(move || storage.open_new(&path))
            .await?;
        let mut staged = Staged::new(if direct { DIRECT_ALIGN_BYTES } else { 1 });
        staged.push(header);
        Ok(FileSegmentWriter {
            file: Arc::new(file),
            staged,
            written: 0,
            unsynced: false,
            cut_at_close: reused || direct,
        })
    }
}

impl FileStorage {
    /// Opens the new segment file `path` for writing, with a durable name: a spare
    /// renamed to it, or else a new file. Says which, and whether it is open for direct
    /// writes.
    ///
    /// A spare (an acknowledged segment's file) is written over from its start: its old
    /// records after the new ones have lower sequence numbers, which recovery never
    /// takes for the new segment's (see `Wal::open`). The new name must survive a
    /// crash before any record in it is acknowledged.
    fn open_new(&self, path: &Path) -> io::Result<(std::fs::File, bool, bool)> {
        let reused = self.reuse_spare(path)?;
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .create_new(!reused)
            .open(path);
        match opened {
            Ok(file) => {
                if !reused {
                    self.sync_dir()?;
                }
                // Set after the open, not as an open flag: a filesystem without it
                // (tmpfs before Linux 6.6, some FUSE ones) fails an open with O_DIRECT
                // only after O_CREAT made the file.
                let direct = self.direct_io
                    && set_direct(&file, true)
                        .inspect_err(|e| direct_refused(e, "at open"))
                        .is_ok();
                Ok((file, reused, direct))
            }
            Err(e) => {
                if reused {
                    // Not a segment: its header is the spare's (recovery would remove it).
                    let _ = std::fs::remove_file(path);
                }
                Err(e)
            }
        }
    }
}

/// Appends to a segment: a flush is one positioned write of everything staged, then
/// the fdatasync, both on the shard's glommio blocking thread, which hands the staged
/// buffer back for the next commit. The write is direct (`O_DIRECT`) where the
/// filesystem allows it, and through the page cache where it does not.
///
/// **Direct.** The kernel takes the commit's pages straight from the staged buffer
/// instead of copying them into the page cache: that copy
/// (`copy_folio_from_iter_atomic`) was 12.5% of the agent's cycles flat out with the
/// server beside it (`perf record` of the agent, 2026-12-05), and its dirty pages
/// were then written back by the fdatasync anyway. Direct writes must start and end
/// on [`DIRECT_ALIGN_BYTES`] in the file and in memory, so the staged bytes begin at
/// an aligned address and file offset, a flush writes up to the next boundary with
/// zeros after the records, and the partial last block stays staged and is written
/// again, with more records after it, by the next flush. Rewriting it is safe: its
/// bytes already on the disk are written with the same values, so however the device
/// tears that write they read the same. The zeros are not a record: recovery cuts
/// them off the newest segment like a torn tail, and `close` cuts the file to its
/// records. The shipper's reads behind the memory tail then come from the disk, not
/// the page cache. On a filesystem that refuses `O_DIRECT` at open, or a direct write
/// with `EINVAL`, the writer goes on through the page cache (an alignment of 1: no
/// zeros, nothing written twice), and the process says so once in the log.
///
/// Why not direct I/O through io_uring, as the WAL first was: a commit then went out
/// as aligned pieces from the shard's io_uring memory, two in flight, each next one
/// submitted when the executor reaped one, then the fdatasync, and the executor
/// reaps completions only between its task-queue runs, which are busy decoding flat
/// out. A 1.5 MB commit took ~21 ms where `fio` writes and syncs 2 MB in 7-11 ms on
/// the same disk, and a shard's commits were bound at ~60 MB/s. Here the kernel gets
/// the whole commit in one call and starts the flush as soon as it has it.
/// The buffered form of this writer took the agent alone flat out to 1.71-1.87M
/// samples/s against 1.03-1.14M (3 alternated pairs, 2026-11-25) at the same CPU per
/// sample; the same buffered writes submitted through io_uring (256 KiB pieces, all
/// in flight, then its fdatasync) reached 1.56-1.64M in the same runs, with a copy
/// more and a heap-allocated piece per 256 KiB, since glommio's buffered `write_at`
/// takes its buffer by value and frees it.
///
/// The blocking thread is the shard's one (glommio's default pool): segment creation,
/// retirement and the shipper's window reads run there too, in order, so a commit can
/// wait behind one of them; they never run at the same time as each other.
///
/// After a failed write or fdatasync the WAL drops the writer and seals the segment
/// at its last durable byte, so a page the kernel marked clean after a failed
/// write-back is never taken for durable.
pub struct FileSegmentWriter {
    file: Arc<std::fs::File>,
    staged: Staged,
    /// Bytes at the start of `staged` that are already in the file (the partial last
    /// block, written again by the next flush).
    written: usize,
    /// Bytes were written by a flush without fdatasync.
    unsynced: bool,
    /// On close the file is cut to this segment's bytes: it was a spare (old records
    /// after them), or it was written direct (zeros after them), even if the writer
    /// went on through the page cache since.
    cut_at_close: bool,
}

/// Offsets, lengths and buffer addresses of direct writes are multiples of this: it
/// covers devices with 512- and 4096-byte logical blocks.
pub const DIRECT_ALIGN_BYTES: usize = 4096;

/// The bytes of a segment not yet written whole, starting at an `align`ed file offset
/// `at` and memory address.
struct Staged {
    /// `mem[start..]` starts at an `align`ed address; `mem.len()` is its capacity.
    mem: Vec<u8>,
    start: usize,
    len: usize,
    /// File offset of `mem[start]`.
    at: u64,
    /// [`DIRECT_ALIGN_BYTES`] for direct writes, 1 through the page cache (0: the
    /// placeholder while a flush has the bytes).
    align: usize,
}

impl Staged {
    fn new(align: usize) -> Staged {
        Staged {
            mem: Vec::new(),
            start: 0,
            len: 0,
            at: 0,
            align,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }

    /// `len` rounded up to the alignment: what a write-out covers.
    fn padded(&self, len: usize) -> usize {
        len.div_ceil(self.align) * self.align
    }

    fn push(&mut self, bytes: &[u8]) {
        assert!(
            self.align > 0,
            "a segment writer whose flush was dropped midway"
        );
        let need = self.padded(self.len + bytes.len());
        if self.start + need > self.mem.len() {
            // Grown by hand, not by `Vec`, whose reallocation would move the bytes off
            // the alignment. Zeroed memory comes as untouched pages.
            let mut mem = vec![0u8; (2 * self.mem.len()).max(need) + self.align];
            let start = mem.as_ptr().align_offset(self.align);
            mem[start..start + self.len].copy_from_slice(self.bytes());
            self.mem = mem;
            self.start = start;
        }
        let end = self.start + self.len;
        self.mem[end..end + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Writes the staged bytes, zeros up to the alignment after them, at `at`.
    fn write_out(&mut self, file: &std::fs::File) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let (end, padded) = (self.start + self.len, self.start + self.padded(self.len));
        self.mem[end..padded].fill(0);
        // Continues a short write (a nearly full disk), so that the real error
        // (ENOSPC) is what gets reported when the space runs out.
        file.write_all_at(&self.mem[self.start..padded], self.at)
    }

    /// After a write-out: keeps only the partial last block, which the next write-out
    /// writes again.
    fn keep_partial_block(&mut self) {
        let whole = self.len - self.len % self.align;
        self.mem
            .copy_within(self.start + whole..self.start + self.len, self.start);
        self.len -= whole;
        self.at += whole as u64;
    }

    /// Continues through the page cache: nothing needs writing twice any more.
    fn unalign(&mut self) {
        self.align = 1;
    }
}

/// Sets or clears `O_DIRECT` on an open file.
fn set_direct(file: &std::fs::File, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a file descriptor this `File` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Says once per process that the WAL writes through the page cache after all.
fn direct_refused(e: &io::Error, when: &str) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(error = %e, "the filesystem refused the WAL's direct writes {when}; writing through the page cache");
    }
}

impl SegmentWriter for FileSegmentWriter {
    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.staged.push(bytes);
        Ok(())
    }

    async fn flush(&mut self, fdatasync: bool) -> io::Result<()> {
        assert!(
            self.staged.align > 0,
            "a segment writer whose flush was dropped midway"
        );
        let fresh = self.staged.len > self.written;
        if !(fresh || fdatasync && self.unsynced) {
            return Ok(());
        }
        let file = self.file.clone();
        // A writer whose flush was dropped midway keeps this placeholder, which no
        // later write or flush accepts (its bytes went with the dropped flush).
        let mut staged = std::mem::replace(&mut self.staged, Staged::new(0));
        let (staged, done) = glommio::executor()
            .spawn_blocking(move || {
                let mut wrote = if fresh {
                    staged.write_out(&file)
                } else {
                    Ok(())
                };
                let einval = |e: &io::Error| e.raw_os_error() == Some(libc::EINVAL);
                if staged.align > 1 && wrote.as_ref().is_err_and(einval) {
                    // The filesystem took O_DIRECT but not the write: the page cache
                    // from here on (the file is as it was).
                    direct_refused(wrote.as_ref().unwrap_err(), "at a write");
                    wrote = set_direct(&file, false).and_then(|()| {
                        staged.unalign();
                        staged.write_out(&file)
                    });
                }
                let done = wrote.and_then(|()| if fdatasync { file.sync_data() } else { Ok(()) });
                (staged, done)
            })
            .await;
        self.staged = staged;
        done?;
        self.staged.keep_partial_block();
        self.written = self.staged.len;
        self.unsynced = !fdatasync;
        Ok(())
    }

    async fn close(mut self) -> io::Result<()> {
        self.flush(true).await?;
        if self.cut_at_close {
            let (file, len) = (self.file.clone(), self.staged.at + self.staged.len as u64);
            glommio::executor()
                .spawn_blocking(move || file.set_len(len).and_then(|()| file.sync_data()))
                .await?;
        }
        Ok(())
    }
}
