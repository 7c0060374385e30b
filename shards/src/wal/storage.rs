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
    /// Cuts a segment to `len` bytes, durably.
    fn truncate(&self, first_seq: u64, len: u64) -> io::Result<()>;
    fn remove(&self, first_seq: u64) -> io::Result<()>;
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

/// Appends to one segment. `write` may buffer; `sync` makes everything written so far
/// durable; `close` syncs and releases.
pub trait SegmentWriter {
    fn write(&mut self, bytes: &[u8]) -> impl Future<Output = io::Result<()>>;
    fn sync(&mut self) -> impl Future<Output = io::Result<()>>;
    fn close(self) -> impl Future<Output = io::Result<()>>;
}

/// Segments as files, written with glommio's direct I/O stream writer.
pub struct DmaStorage {
    dir: PathBuf,
}

/// Size of each direct-I/O buffer of the stream writer.
const WRITE_BUFFER_BYTES: usize = 512 * 1024;
/// Buffers in flight behind the one being filled.
const WRITE_BEHIND_BUFFERS: usize = 4;

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
        use futures_lite::AsyncWriteExt;
        let path = self.path(first_seq);
        if path.exists() {
            // Never truncate a segment by reusing its name.
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", path.display()),
            ));
        }
        let file = glommio::io::DmaFile::create(&path)
            .await
            .map_err(io::Error::from)?;
        // The new name must survive a crash before any record in it is acknowledged.
        self.sync_dir()?;
        let mut writer = glommio::io::DmaStreamWriterBuilder::new(file)
            .with_buffer_size(WRITE_BUFFER_BYTES)
            .with_write_behind(WRITE_BEHIND_BUFFERS)
            .build();
        writer.write_all(header).await?;
        Ok(DmaSegmentWriter { writer })
    }
}

pub struct DmaSegmentWriter {
    writer: glommio::io::DmaStreamWriter,
}

impl SegmentWriter for DmaSegmentWriter {
    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        use futures_lite::AsyncWriteExt;
        self.writer.write_all(bytes).await
    }

    async fn sync(&mut self) -> io::Result<()> {
        // Pads and writes the partial last block, then fdatasync.
        self.writer.sync().await.map(drop).map_err(io::Error::from)
    }

    async fn close(mut self) -> io::Result<()> {
        use futures_lite::AsyncWriteExt;
        // Flushes, syncs and truncates away the padding of the last block.
        self.writer.close().await
    }
}
