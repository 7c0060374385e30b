//! Where WAL segments live. [`Storage`] is the WAL's whole view of the disk, so the
//! model-based test can run the real WAL code against a simulated disk that loses
//! unsynced bytes on a crash; [`DmaStorage`] is the real one (glommio direct I/O).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};

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
    /// from `offset`. Here at once; [`DmaStorage`] reads on the shard's blocking thread.
    fn read_window(
        &self,
        first_seq: u64,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = io::Result<Vec<u8>>> {
        let mut buf = Vec::new();
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
    /// once; [`DmaStorage`] runs it on the shard's blocking thread.
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

/// Segments as files, written with glommio's direct I/O stream writer.
#[derive(Clone)]
pub struct DmaStorage {
    dir: PathBuf,
}

impl DmaStorage {
    pub fn open(dir: &Path) -> io::Result<DmaStorage> {
        std::fs::create_dir_all(dir)?;
        Ok(DmaStorage {
            dir: dir.to_path_buf(),
        })
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

impl Storage for DmaStorage {
    type Writer = DmaSegmentWriter;

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
        // thread, through `read_window`): a plain read is simpler than a DMA read's
        // alignment rules, and bounded (`replay_window_bytes`).
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

    async fn read_window(&self, first_seq: u64, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        // The shipper catching up from disk: the read waits for the device, so it runs
        // on the blocking thread while the shard serves its connections.
        let storage = self.clone();
        glommio::executor()
            .spawn_blocking(move || {
                let mut buf = Vec::new();
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

    async fn create(&self, first_seq: u64, header: &[u8]) -> io::Result<DmaSegmentWriter> {
        let path = self.path(first_seq);
        if path.exists() {
            // Never truncate a segment by reusing its name.
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", path.display()),
            ));
        }
        // A spare file (an acknowledged segment's) is written over from its start: its
        // old records after the new ones have lower sequence numbers, which recovery
        // never takes for the new segment's (see `Wal::open`). The new name must
        // survive a crash before any record in it is acknowledged. The rename and the
        // directory fsync wait for the filesystem's journal: on the blocking thread,
        // so the shard's other connections are served meanwhile.
        let storage = self.clone();
        let at = path.clone();
        let reused = glommio::executor()
            .spawn_blocking(move || storage.reuse_spare(&at))
            .await?;
        let file = if reused {
            let opened = glommio::io::OpenOptions::new()
                .write(true)
                .dma_open(&path)
                .await;
            if opened.is_err() {
                // Not a segment: its header is the spare's (recovery would remove it).
                let _ = std::fs::remove_file(&path);
            }
            opened
        } else {
            glommio::io::DmaFile::create(&path).await
        }
        .map_err(io::Error::from)?;
        if !reused {
            let storage = self.clone();
            glommio::executor()
                .spawn_blocking(move || storage.sync_dir())
                .await?;
        }
        let mut writer = DmaSegmentWriter {
            file,
            staged: Vec::new(),
            staged_at: 0,
        };
        writer.staged.extend_from_slice(header);
        Ok(writer)
    }
}

/// Bytes per write of a flush, at most. A flush is written in pieces this size, each
/// in a buffer glommio carves from the shard's io_uring memory (`io_memory_bytes`, 1
/// MiB by default), whose pages stay mapped. One buffer per flush was 1-3.5 MB flat out:
/// larger than that memory, so a fresh glibc mapping (blocks of 1 MiB and more, see
/// `main.rs`) whose pages all fault and are zeroed on first touch; that was ~48% of
/// the agent's page faults.
const WRITE_PIECE_BYTES: usize = 512 * 1024;

/// Pieces of a flush being written at once, at most: together they fit the default
/// io_uring memory. More at once came from the heap and raised the agent's peak RSS by
/// ~10 MiB flat out.
const WRITES_IN_FLIGHT: usize = 2;

/// Appends to a segment with direct I/O, aligned writes of at most [`WRITE_PIECE_BYTES`].
///
/// Written here rather than with glommio's `DmaStreamWriter` because the WAL needs
/// exact control of what reaches the file after an error: that writer, when dropped
/// after a failed write, cancels in-flight buffers and trims the file in the
/// background to its own notion of the flushed position, which can cut bytes an
/// earlier sync made durable (found by the full-disk test). This one never truncates
/// durable bytes; a failed write leaves at most a torn tail after them.
///
/// On disk: the logical bytes, then zero padding to the device alignment after the
/// last flush (trimmed away on close). `staged` holds the partial last block that is
/// already on disk, followed by bytes not yet written; each flush rewrites that block.
pub struct DmaSegmentWriter {
    file: glommio::io::DmaFile,
    staged: Vec<u8>,
    /// File offset of `staged[0]`; always aligned.
    staged_at: u64,
}

impl DmaSegmentWriter {
    /// The piece of the staged bytes starting at `at` (aligned), zero-padded to the
    /// alignment: its length and a DMA buffer holding it.
    fn piece(&self, at: usize, aligned: usize) -> (usize, glommio::io::DmaBuffer) {
        let piece = (aligned - at).min(WRITE_PIECE_BYTES);
        let mut buf = self.file.alloc_dma_buffer(piece);
        let bytes = buf.as_bytes_mut();
        let end = self.staged.len().min(at + piece);
        let data = self.staged.get(at..end).unwrap_or(&[]);
        bytes[..data.len()].copy_from_slice(data);
        bytes[data.len()..].fill(0);
        (piece, buf)
    }

    /// A write of `n` of `piece` bytes that stopped short off the alignment cannot be
    /// continued with direct I/O: an error naming how far the flush got (`upto`).
    fn check_short(&self, upto: usize, n: usize, piece: usize, aligned: usize) -> io::Result<()> {
        if n < piece && !n.is_multiple_of(self.file.alignment() as usize) {
            let e = format!("short write: {upto} of {aligned} bytes");
            return Err(io::Error::new(io::ErrorKind::WriteZero, e));
        }
        Ok(())
    }
}

impl SegmentWriter for DmaSegmentWriter {
    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.staged.extend_from_slice(bytes);
        Ok(())
    }

    async fn flush(&mut self, fdatasync: bool) -> io::Result<()> {
        let len = self.staged.len();
        if len == 0 {
            return Ok(());
        }
        let aligned = self.file.align_up(len as u64) as usize;
        // Pieces are written two at a time, each next one as soon as one is done: the
        // two fit the default io_uring memory, and written one after another the agent
        // alone acknowledged ~15% less flat out. The first short one decides where the
        // rest is written again, below.
        let written = {
            type Write<'a> =
                std::pin::Pin<Box<dyn Future<Output = glommio::Result<usize, ()>> + 'a>>;
            let mut flying: Vec<(usize, usize, Write<'_>)> = Vec::new();
            let mut results = Vec::new();
            let mut next = 0;
            std::future::poll_fn(|cx| loop {
                while flying.len() < WRITES_IN_FLIGHT && next < aligned {
                    let (piece, buf) = self.piece(next, aligned);
                    let (file, pos) = (&self.file, self.staged_at + next as u64);
                    flying.push((next, piece, Box::pin(file.write_at(buf, pos))));
                    next += piece;
                }
                let before = flying.len();
                let mut i = 0;
                while i < flying.len() {
                    match flying[i].2.as_mut().poll(cx) {
                        std::task::Poll::Ready(r) => {
                            let (at, piece, _) = flying.swap_remove(i);
                            if !matches!(r, Ok(n) if n == piece) {
                                next = aligned; // no more: the rest is retried below
                            }
                            results.push((at, piece, r));
                        }
                        std::task::Poll::Pending => i += 1,
                    }
                }
                if flying.is_empty() && next >= aligned {
                    return std::task::Poll::Ready(());
                }
                if flying.len() == before {
                    return std::task::Poll::Pending;
                }
            })
            .await;
            results.sort_unstable_by_key(|r| r.0);
            let mut done = 0;
            for (at, piece, r) in results {
                if at != done {
                    break; // after a short or failed piece
                }
                let n = r.map_err(io::Error::from)?;
                self.check_short(at + n, n, piece, aligned)?;
                done = at + n;
                if n < piece {
                    break;
                }
            }
            done
        };
        // A short write (a nearly full disk) is continued, so that the real error
        // (ENOSPC) is what gets reported when the space runs out.
        let mut done = written;
        while done < aligned {
            let (piece, buf) = self.piece(done, aligned);
            let n = self
                .file
                .write_at(buf, self.staged_at + done as u64)
                .await
                .map_err(io::Error::from)?;
            self.check_short(done + n, n, piece, aligned)?;
            if n == 0 {
                let e = format!("short write: {done} of {aligned} bytes");
                return Err(io::Error::new(io::ErrorKind::WriteZero, e));
            }
            done += n;
        }
        if fdatasync {
            self.file.fdatasync().await.map_err(io::Error::from)?;
        }
        // Keep only the partial last block: the next flush rewrites it with more data.
        let full = self.file.align_down(len as u64) as usize;
        self.staged.drain(..full);
        self.staged_at += full as u64;
        Ok(())
    }

    async fn close(mut self) -> io::Result<()> {
        self.flush(true).await?;
        let logical = self.staged_at + self.staged.len() as u64;
        self.file.truncate(logical).await.map_err(io::Error::from)?;
        self.file.fdatasync().await.map_err(io::Error::from)?;
        self.file.close().await.map_err(io::Error::from)
    }
}
