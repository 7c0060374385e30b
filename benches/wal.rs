//! WAL append plus group commit, on this machine's disk, for each fsync mode.
//!
//! A program, not a timed test: `cargo bench --bench wal`. `CONCURRENCY` tasks on one
//! shard each append records of `RECORD_BYTES` (the size of a realistic 2000-sample
//! remote_write body) back to back for `RUN_S` seconds, as concurrent requests do.
//! `batch+2ms` is group commit with a 2 ms gather delay.
//! Reports records/s, MB/s, records per fsync, and the time from append to durable
//! (p50/p99/max). The directory is `PROMGATE_BENCH_DIR` or the system temp dir.

use hdrhistogram::Histogram;
use promgate_shards::metrics::ShardMetrics;
use promgate_shards::wal::format::{KIND_REMOTE_WRITE, PAYLOAD_VERSION};
use promgate_shards::wal::storage::FileStorage;
use promgate_shards::wal::{Fsync, Wal, WalConfig};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONCURRENCY: usize = 32;
const RECORD_BYTES: usize = 64 * 1024;
const RUN_S: u64 = 4;
/// Highest latency the histogram tracks, in microseconds (60 s).
const LATENCY_US_MAX: u64 = 60_000_000;

fn main() {
    let base = std::env::var_os("PROMGATE_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    println!("WAL append + commit: {CONCURRENCY} concurrent appenders, {RECORD_BYTES}-byte records, {RUN_S} s each, in {}", base.display());
    println!(
        "{:<10} {:>10} {:>8} {:>12} {:>9} {:>9} {:>9}",
        "fsync", "records/s", "MB/s", "recs/fsync", "p50 ms", "p99 ms", "max ms"
    );
    let modes = [
        ("batch", Fsync::Batch, 0),
        ("batch+2ms", Fsync::Batch, 2_000),
        ("always", Fsync::Always, 0),
        ("never", Fsync::Never, 0),
    ];
    for (name, fsync, group_commit_delay_us) in modes {
        let dir = base.join(format!("promgate-wal-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = dir.clone();
        let ex = glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor");
        let (records, hist, commits) = ex.run(async move {
            let metrics = Arc::new(vec![ShardMetrics::default()]);
            let config = WalConfig {
                fsync,
                group_commit_delay_us,
                max_bytes: u64::MAX,
                segment_bytes: 256 << 20,
                ..WalConfig::default()
            };
            let (wal, _) =
                Wal::open(FileStorage::open(&d).unwrap(), 0, config, metrics.clone()).unwrap();
            let wal = Rc::new(wal);
            let hist = Rc::new(RefCell::new(
                Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3).unwrap(),
            ));
            let deadline = Instant::now() + Duration::from_secs(RUN_S);
            let payload = Rc::new(vec![0x5au8; RECORD_BYTES]);
            let tasks: Vec<_> = (0..CONCURRENCY)
                .map(|_| {
                    let (wal, hist, payload) = (wal.clone(), hist.clone(), payload.clone());
                    glommio::spawn_local(async move {
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            let t = Instant::now();
                            wal.append(KIND_REMOTE_WRITE, PAYLOAD_VERSION, |o| {
                                o.extend_from_slice(&payload)
                            })
                            .await
                            .unwrap();
                            hist.borrow_mut()
                                .saturating_record(t.elapsed().as_micros() as u64);
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            let mut records = 0;
            for t in tasks {
                records += t.await;
            }
            wal.close().await.unwrap();
            let commits = metrics[0].wal.commit_records.count();
            let h = hist.borrow().clone();
            (records, h, commits)
        });
        let _ = std::fs::remove_dir_all(&dir);
        let secs = RUN_S as f64;
        println!(
            "{name:<10} {:>10.0} {:>8.1} {:>12.1} {:>9.2} {:>9.2} {:>9.2}",
            records as f64 / secs,
            records as f64 * RECORD_BYTES as f64 / secs / 1e6,
            if fsync == Fsync::Never {
                f64::NAN
            } else {
                records as f64 / commits.max(1) as f64
            },
            hist.value_at_quantile(0.5) as f64 / 1000.0,
            hist.value_at_quantile(0.99) as f64 / 1000.0,
            hist.max() as f64 / 1000.0
        );
    }
}
