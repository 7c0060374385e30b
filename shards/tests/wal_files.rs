//! The WAL on real files (`FileStorage`): the budget refuses appends, the
//! shipper's acknowledgement deletes whole segments and makes room again, and after a
//! reopen every record that was not acknowledged downstream is still there, with
//! sequence numbers that keep growing even once every segment has been deleted.

use promgate_shards::metrics::ShardMetrics;
use promgate_shards::wal::format::{self, KIND_REMOTE_WRITE, PAYLOAD_VERSION};
use promgate_shards::wal::storage::{list_segments, FileStorage, SPARES_MAX, SPARE_SUFFIX};
use promgate_shards::wal::{Fsync, Wal, WalConfig, WalError};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

fn config() -> WalConfig {
    WalConfig {
        fsync: Fsync::Batch,
        group_commit_delay_us: 500,
        group_commit_records_max: 16,
        segment_bytes: 64 * 1024,
        max_bytes: 256 * 1024,
        retry_after_s: 1,
        retention_bytes: 0,
        retention_age_s: 0,
        memory_bytes: 64 * 1024,
        // Smaller than a record: replay from disk reads every record on its own.
        replay_window_bytes: 4096,
        direct_io: true,
    }
}

fn payload(seq: u64) -> Vec<u8> {
    (0..10_000u32)
        .map(|i| (seq as u32).wrapping_mul(7).wrapping_add(i) as u8)
        .collect()
}

fn open(dir: &Path) -> Wal<FileStorage> {
    let metrics = Arc::new(vec![ShardMetrics::default()]);
    let (wal, rec) = Wal::open(FileStorage::open(dir).unwrap(), 0, config(), metrics).unwrap();
    assert!(
        rec.corruption.is_empty() && rec.unreadable.is_empty(),
        "{rec:?}"
    );
    wal
}

/// Every record on disk as (seq, payload).
fn on_disk(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    for first in list_segments(dir).unwrap() {
        let data = std::fs::read(dir.join(format::segment_file_name(first))).unwrap();
        let scan = format::scan(&data).unwrap();
        assert!(scan.corruption.is_empty());
        out.extend(
            scan.records
                .iter()
                .map(|r| (r.seq, data[r.payload.0..r.payload.1].to_vec())),
        );
    }
    out
}

/// Runs `body` on a glommio executor with a fresh directory, removed afterwards.
fn with_dir<F: std::future::Future<Output = ()>>(
    name: &str,
    body: impl FnOnce(std::path::PathBuf) -> F,
) {
    let dir = std::env::temp_dir().join(format!("promgate-wal-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ex = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor");
    ex.run(body(dir.clone()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn budget_then_acknowledgement_then_room_again() {
    with_dir("dma", |d| async move {
        let wal = open(&d);
        let mut acked = Vec::new();
        let full = loop {
            let seq = acked.len() as u64 + 1;
            let p = payload(seq);
            match wal
                .append(KIND_REMOTE_WRITE, PAYLOAD_VERSION, |o| {
                    o.extend_from_slice(&p)
                })
                .await
            {
                Ok(s) => {
                    assert_eq!(s, seq);
                    acked.push(s);
                }
                Err(e) => break e,
            }
            assert!(acked.len() < 1000, "the budget never refused anything");
        };
        assert_eq!(full, WalError::Full { retry_after_s: 1 });
        assert!(wal.total_bytes() >= config().max_bytes);
        // Everything is on disk, intact.
        let disk = on_disk(&d);
        assert_eq!(disk.iter().map(|r| r.0).collect::<Vec<_>>(), acked);
        assert!(disk.iter().all(|(s, p)| *p == payload(*s)));

        // The shipper acknowledges the first half: whole segments below it go.
        let half = acked[acked.len() / 2];
        let deleted = wal.ack(half).await.unwrap();
        assert!(deleted >= 1, "nothing deleted");
        let remaining = on_disk(&d);
        assert!(
            remaining.len() < acked.len(),
            "the acknowledgement freed nothing on disk"
        );
        for s in acked.iter().filter(|s| **s > half) {
            assert!(
                remaining.iter().any(|(x, _)| x == s),
                "unacknowledged record {s} was deleted"
            );
        }
        let seq = acked.len() as u64 + 1;
        let p = payload(seq);
        let s = wal
            .append(KIND_REMOTE_WRITE, PAYLOAD_VERSION, |o| {
                o.extend_from_slice(&p)
            })
            .await
            .expect("room again");
        assert_eq!(s, seq);
        acked.push(s);
        wal.close().await.unwrap();
        drop(wal);

        // Reopen: every record above the acknowledgement is there, and replay hands
        // them to the (future) shipper in order.
        let wal = open(&d);
        let disk = on_disk(&d);
        for s in acked.iter().filter(|s| **s > half) {
            assert!(
                disk.iter().any(|(x, p)| x == s && *p == payload(*s)),
                "record {s} lost"
            );
        }
        let mut replayed = Vec::new();
        wal.replay(half + 1, |seq, _, _, p| {
            assert_eq!(p, payload(seq).as_slice(), "record {seq} replayed changed");
            replayed.push(seq);
            true
        })
        .unwrap();
        let want: Vec<u64> = acked.iter().copied().filter(|s| *s > half).collect();
        assert_eq!(
            replayed, want,
            "replay yields exactly the unacknowledged records, in order"
        );
        // As the shipper reads: a few records per call, each call going on where the
        // previous one stopped.
        let mut sliced = Vec::new();
        let mut from = half + 1;
        while sliced.len() < want.len() {
            let mut n = 0;
            wal.replay(from, |seq, _, _, p| {
                assert_eq!(p, payload(seq).as_slice(), "record {seq} replayed changed");
                sliced.push(seq);
                from = seq + 1;
                n += 1;
                n < 3
            })
            .unwrap();
            assert!(n > 0, "replay from {from} found nothing");
        }
        assert_eq!(sliced, want, "sliced replays yield the same records");
        // As the shipper reads now: the window is read on the blocking thread, and the
        // replay stops where the window ends instead of reading on the shard thread.
        let mut ready = Vec::new();
        let mut from = half + 1;
        let mut stops = 0;
        while ready.len() < want.len() {
            wal.prefetch(from).await.unwrap();
            let mut n = 0;
            let not_read = wal
                .replay_ready(from, |seq, _, _, p| {
                    assert_eq!(p, payload(seq).as_slice(), "record {seq} replayed changed");
                    ready.push(seq);
                    from = seq + 1;
                    n += 1;
                    true
                })
                .unwrap();
            assert!(n > 0, "a prefetched replay from {from} found nothing");
            stops += usize::from(not_read);
        }
        assert_eq!(ready, want, "prefetched replays yield the same records");
        assert!(
            stops > 0,
            "records larger than the window never stopped a replay_ready"
        );
        // Without a prefetch, nothing outside the window is read.
        let mut none = 0;
        let not_read = wal.replay_ready(half + 1, |_, _, _, _| {
            none += 1;
            true
        });
        assert!(not_read.unwrap(), "replay_ready read a segment file itself");
        assert_eq!(none, 0);
        assert_eq!(
            wal.whole_segment_reads(),
            0,
            "healthy segments are read in windows"
        );
        // Acknowledge everything, reopen, append: numbering continues, never restarts.
        let last = *acked.last().unwrap();
        let p = payload(last + 1);
        let s = wal
            .append(KIND_REMOTE_WRITE, PAYLOAD_VERSION, |o| {
                o.extend_from_slice(&p)
            })
            .await
            .unwrap();
        assert_eq!(s, last + 1);
        wal.close().await.unwrap();
        drop(wal);
        let wal = open(&d);
        wal.ack(u64::MAX).await.unwrap();
        drop(wal);
        let wal = open(&d);
        let p = payload(0);
        let s = wal
            .append(KIND_REMOTE_WRITE, PAYLOAD_VERSION, |o| {
                o.extend_from_slice(&p)
            })
            .await
            .unwrap();
        assert!(
            s > last + 1,
            "sequence numbers restarted at {s} after everything was acknowledged"
        );
        wal.close().await.unwrap();
    });
}

#[test]
fn retention_drops_the_oldest_sealed_segments_and_counts_them() {
    with_dir("retention", |d| async move {
        let metrics = Arc::new(vec![ShardMetrics::default()]);
        let limited = WalConfig {
            retention_bytes: 128 * 1024,
            max_bytes: 1 << 30,
            ..config()
        };
        let (wal, _) =
            Wal::open(FileStorage::open(&d).unwrap(), 0, limited, metrics.clone()).unwrap();
        for seq in 1..=60u64 {
            append(&wal, seq).await;
        }
        wal.close().await.unwrap();
        let dropped = metrics[0].wal.retention_dropped_records.load(Relaxed);
        let disk = on_disk(&d);
        assert!(
            dropped > 0,
            "nothing dropped although 600 KB were written under a 128 KiB limit"
        );
        assert_eq!(
            disk.len() as u64 + dropped,
            60,
            "every record is either on disk or counted as dropped"
        );
        assert_eq!(
            disk.first().map(|r| r.0),
            Some(dropped + 1),
            "the oldest records go first"
        );
        let kept: u64 = list_segments(&d)
            .unwrap()
            .iter()
            .map(|f| {
                std::fs::metadata(d.join(format::segment_file_name(*f)))
                    .unwrap()
                    .len()
            })
            .sum();
        assert!(
            kept <= 128 * 1024 + config().segment_bytes + 16 * 1024,
            "{kept} bytes kept"
        );
    });
}

/// The memory tail holds as many records as `memory_bytes` allows, however large the
/// commits its recycled buffers once held: after bursts of 16 records, one-record
/// commits still fill it with their own bytes, not with the bursts' capacity.
#[test]
fn memory_tail_counts_records_not_the_capacity_of_recycled_buffers() {
    with_dir("tail", |d| async move {
        let metrics = Arc::new(vec![ShardMetrics::default()]);
        let config = WalConfig {
            segment_bytes: 8 << 20,
            max_bytes: 64 << 20,
            ..config()
        };
        let (wal, _) = Wal::open(FileStorage::open(&d).unwrap(), 0, config, metrics).unwrap();
        let small = vec![7u8; 1000];
        for _ in 0..6 {
            let mut last = 0;
            for _ in 0..16 {
                last = wal
                    .enqueue(KIND_REMOTE_WRITE, PAYLOAD_VERSION, |o| {
                        o.extend_from_slice(&small)
                    })
                    .unwrap();
            }
            wal.durable(last).await.unwrap();
        }
        let mut last = 0;
        for _ in 0..100 {
            last = wal
                .append(KIND_REMOTE_WRITE, PAYLOAD_VERSION, |o| {
                    o.extend_from_slice(&small)
                })
                .await
                .unwrap();
        }
        // 64 KiB of ~1 KiB records: about 60 of the last 100 are in memory.
        assert!(
            wal.in_memory(last - 40),
            "the 64 KiB tail holds fewer than 41 one-KiB records"
        );
        assert!(!wal.in_memory(last - 90), "the tail outgrew memory_bytes");
        wal.close().await.unwrap();
    });
}

/// The segment writer on its own, direct and through the page cache: writes of every
/// size, several per flush and none between two flushes, each direct flush rewriting
/// the partial last block with more data. After every flush the file holds exactly
/// what was written, then (direct) zeros up to the next 4 KiB boundary; after close,
/// exactly what was written.
#[test]
fn segment_writer_keeps_every_byte_across_flushes() {
    use promgate_shards::wal::storage::{SegmentWriter, Storage, DIRECT_ALIGN_BYTES};
    with_dir("writer", |dir| async move {
        let mut x = 1u32;
        let mut bytes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect()
        };
        // A new file, then one written over a spare longer than what goes into it: the
        // writer's bytes are exactly the file's after every flush but for the spare's
        // old tail, which close cuts off.
        let old = bytes(3 << 20);
        let mut first = 7u64;
        for direct in [true, false] {
            let storage = FileStorage::open(&dir).unwrap().direct_io(direct);
            let align = if direct { DIRECT_ALIGN_BYTES } else { 1 };
            for spare in [false, true] {
                first += 1;
                if spare {
                    let name = format!("{:016x}{SPARE_SUFFIX}", first - 1);
                    std::fs::write(dir.join(name), &old).unwrap();
                }
                let mut want: Vec<u8> = b"header".to_vec();
                let mut w = storage.create(first, &want).await.unwrap();
                let path = dir.join(format::segment_file_name(first));
                assert!(spares(&dir).is_empty(), "a spare is taken");
                let sizes = [1, 4095, 4096, 4097, 3, 0, 70_000, 511, 513, 1 << 20, 9];
                for (i, &n) in sizes.iter().enumerate() {
                    let b = bytes(n);
                    w.write(&b).await.unwrap();
                    want.extend_from_slice(&b);
                    if i % 3 == 2 {
                        continue; // a second write before this flush
                    }
                    w.flush(i % 2 == 0).await.unwrap();
                    if i % 4 == 0 {
                        w.flush(true).await.unwrap(); // nothing new
                    }
                    let data = std::fs::read(&path).unwrap();
                    let padded = want.len().div_ceil(align) * align;
                    let len = if spare { old.len() } else { padded };
                    let at = format!("direct {direct}, spare {spare}, after write {i}");
                    assert!(data.len() == len, "{} bytes, {at}", data.len());
                    assert!(data[..want.len()] == want[..], "{at}");
                    assert!(
                        data[want.len()..padded].iter().all(|b| *b == 0),
                        "zeros to the alignment, {at}"
                    );
                    assert!(data[padded..] == old[padded..len], "old tail, {at}");
                }
                w.close().await.unwrap();
                assert!(
                    std::fs::read(&path).unwrap() == want,
                    "after close, direct {direct}, spare {spare}"
                );
            }
        }
    });
}

/// Appends record `seq` (its payload is `payload(seq)`).
async fn append(wal: &Wal<FileStorage>, seq: u64) {
    let p = payload(seq);
    let s = wal
        .append(KIND_REMOTE_WRITE, PAYLOAD_VERSION, |o| {
            o.extend_from_slice(&p)
        })
        .await
        .unwrap();
    assert_eq!(s, seq);
}

/// The spare segment files of a directory.
fn spares(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(SPARE_SUFFIX))
        .collect();
    out.sort();
    out
}

/// Acknowledged segments are kept as spare files (at most `SPARES_MAX`, the rest are
/// deleted) and the next segments are written over them. After a crash in the middle of
/// such a segment, its new records are recovered and the old ones behind them, which
/// are still in the file with valid checksums, never come back: not as records, not as
/// corruption. A spare renamed to a new segment whose new header never reached the
/// disk is removed at recovery, and nothing else changes.
#[test]
fn acknowledged_segments_are_written_over_and_their_old_records_never_come_back() {
    with_dir("spare", |d| async move {
        let wal = open(&d);
        // 10 KB records, 64 KiB segments: 7 records per segment.
        for seq in 1..=24 {
            append(&wal, seq).await;
        }
        let sealed_before = list_segments(&d).unwrap().len() - 1;
        assert!(
            sealed_before > SPARES_MAX,
            "{sealed_before} sealed segments"
        );
        wal.ack(24).await.unwrap();
        let kept = spares(&d);
        assert_eq!(kept.len(), SPARES_MAX, "{kept:?}");
        let spare_bytes: Vec<u64> = kept
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .collect();
        // Fill the open segment until a new one is made: it is a spare, written over.
        let open_first = *list_segments(&d).unwrap().last().unwrap();
        let mut seq = 25;
        while *list_segments(&d).unwrap().last().unwrap() == open_first {
            append(&wal, seq).await;
            seq += 1;
            assert!(seq < 100, "no new segment");
        }
        let newest = *list_segments(&d).unwrap().last().unwrap();
        assert_eq!(
            spares(&d).len(),
            SPARES_MAX - 1,
            "the new segment took a spare"
        );
        let newest_path = d.join(format::segment_file_name(newest));
        assert!(
            std::fs::metadata(&newest_path).unwrap().len() >= spare_bytes[0].min(spare_bytes[1]),
            "the new segment is not a spare written over"
        );
        append(&wal, seq).await;
        let last = seq;
        // The crash: no close, so nothing trims the file to its records.
        drop(wal);
        let data = std::fs::read(&newest_path).unwrap();
        let scan = format::scan(&data).unwrap();
        assert!(scan.corruption.is_empty(), "{:?}", scan.corruption);
        assert!(
            scan.tail_bytes > 0,
            "no old records were left behind the new ones"
        );

        let metrics = Arc::new(vec![ShardMetrics::default()]);
        let (wal, rec) = Wal::open(FileStorage::open(&d).unwrap(), 0, config(), metrics).unwrap();
        assert!(
            rec.corruption.is_empty() && rec.unreadable.is_empty(),
            "{rec:?}"
        );
        assert_eq!(rec.last_seq, Some(last));
        let disk = on_disk(&d);
        let want: Vec<u64> = disk.iter().map(|r| r.0).filter(|s| *s > 24).collect();
        assert_eq!(want, (25..=last).collect::<Vec<_>>());
        assert!(disk.iter().all(|(s, p)| *p == payload(*s)));
        assert_eq!(
            std::fs::metadata(&newest_path).unwrap().len() as usize,
            scan.valid_end,
            "recovery cut the old records off"
        );
        wal.close().await.unwrap();
        drop(wal);

        // A spare renamed to the next segment, but its new header never written (a
        // crash); and one renamed to a name below the newest segment (a creation that
        // failed after the rename, then a later segment).
        let spare = spares(&d).pop().expect("a spare is left");
        let failed = d.join(format::segment_file_name(newest - 1));
        std::fs::copy(&spare, &failed).unwrap();
        let torn = d.join(format::segment_file_name(last + 1));
        std::fs::rename(&spare, &torn).unwrap();
        let metrics = Arc::new(vec![ShardMetrics::default()]);
        let (wal, rec) = Wal::open(FileStorage::open(&d).unwrap(), 0, config(), metrics).unwrap();
        assert!(
            rec.corruption.is_empty() && rec.unreadable.is_empty(),
            "{rec:?}"
        );
        assert!(!torn.exists(), "the torn creation was kept");
        assert!(!failed.exists(), "the failed creation was kept");
        assert_eq!(rec.last_seq, Some(last));
        assert_eq!(on_disk(&d), disk);
        append(&wal, last + 1).await;
        wal.close().await.unwrap();
    });
}

/// A sealed segment whose close did not cut it (zeros after its records, as direct
/// writes leave them) is cut at the next start like a torn tail: the next segment
/// starts right after its last record, so nothing is lost and nothing is reported as
/// corruption. A segment whose last records are really gone still is, with the
/// sequence numbers it lost.
#[test]
fn bytes_after_a_sealed_segment_with_nothing_missing_are_cut_not_reported() {
    with_dir("uncut", |d| async move {
        let wal = open(&d);
        for seq in 1..=20 {
            append(&wal, seq).await;
        }
        wal.close().await.unwrap();
        drop(wal);
        let ids = list_segments(&d).unwrap();
        assert!(ids.len() >= 3, "{ids:?}");
        let path = |first: u64| d.join(format::segment_file_name(first));
        let before = on_disk(&d);

        // The oldest segment: zeros after its records, none lost.
        let oldest = path(ids[0]);
        let len = std::fs::metadata(&oldest).unwrap().len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&oldest)
            .unwrap();
        f.set_len(len + 3000).unwrap();
        drop(f);
        let metrics = Arc::new(vec![ShardMetrics::default()]);
        let (wal, rec) =
            Wal::open(FileStorage::open(&d).unwrap(), 0, config(), metrics.clone()).unwrap();
        assert!(rec.corruption.is_empty(), "{:?}", rec.corruption);
        assert_eq!(rec.torn_tail_bytes, 3000);
        assert_eq!(std::fs::metadata(&oldest).unwrap().len(), len, "cut");
        assert_eq!(metrics[0].wal.corrupt_records.load(Relaxed), 0);
        drop(wal);
        assert!(on_disk(&d) == before, "every record is still there");

        // The second segment loses its last record: that is corruption, named.
        let second = path(ids[1]);
        let data = std::fs::read(&second).unwrap();
        let scan = format::scan(&data).unwrap();
        let last = scan.records.last().unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&second)
            .unwrap();
        f.set_len(last.payload.0 as u64 - 8).unwrap();
        drop(f);
        let metrics = Arc::new(vec![ShardMetrics::default()]);
        let (_wal, rec) =
            Wal::open(FileStorage::open(&d).unwrap(), 0, config(), metrics.clone()).unwrap();
        assert_eq!(rec.corruption.len(), 1, "{:?}", rec.corruption);
        assert_eq!(rec.corruption[0].1.lost_seqs, (last.seq, last.seq));
        assert_eq!(metrics[0].wal.corrupt_records.load(Relaxed), 1);
    });
}
