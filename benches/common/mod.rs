//! Timing shared by the benches (`mod common;` in each).

use std::time::{Duration, Instant};

/// Timed runs per figure; the median is reported.
pub const RUNS: usize = 7;
/// Each run repeats the work for at least this long.
pub const RUN_MS_MIN: u64 = 200;

/// Median over [`RUNS`] runs of the ns per item of `f`, one call of which handles
/// `items` items.
pub fn median_ns_per(items: usize, mut f: impl FnMut()) -> f64 {
    let mut per_run = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        let mut iterations = 0u64;
        while start.elapsed() < Duration::from_millis(RUN_MS_MIN) {
            f();
            iterations += 1;
        }
        per_run.push(start.elapsed().as_nanos() as f64 / (iterations as f64 * items as f64));
    }
    per_run.sort_by(|a, b| a.total_cmp(b));
    per_run[RUNS / 2]
}
