//! The store on its own: exactly-once by sequence number, duplicate, conflicting and late
//! samples, chunk sealing, recovery of the head after reopening, checkpoints, retention,
//! and series selection with all four matcher types.

use promgate_proto::ship::{self, ArchivedShipBatch, Label, NewSeries, NewTarget, ShipBatch};
use promgate_proto::xor;
use promgate_server::select::{select, MatchKind, Matcher, TagView};
use promgate_server::store::{Applied, ApplyError, ConnRefs, Ledger, Reader, Store, PARTITION_MS};

/// Queries as remote_read sees them by default: original labels only.
const VIEW: TagView = TagView {
    prefix: "df_",
    tags_in_labels: false,
};

const DAY_MS: i64 = 86_400_000;

fn labels(pairs: &[(&str, &str)]) -> Vec<Label> {
    pairs
        .iter()
        .map(|(n, v)| Label {
            name: n.to_string(),
            value: v.to_string(),
        })
        .collect()
}

/// A batch of (ref, ts, value bits) samples; `series` are introduced in it.
fn batch(
    first: u64,
    last: u64,
    series: &[(u32, &[(&str, &str)])],
    samples: &[(u32, i64, u64)],
) -> ShipBatch {
    ShipBatch {
        agent: "agent-a".into(),
        shard: 0,
        first_seq: first,
        last_seq: last,
        // One target with no labels and no tags: these tests are about samples.
        new_targets: if series.is_empty() {
            vec![]
        } else {
            vec![NewTarget {
                target_ref: 0,
                labels: vec![],
                tags: vec![],
            }]
        },
        new_series: series
            .iter()
            .map(|(r, l)| NewSeries {
                series_ref: *r,
                target_ref: 0,
                absent: vec![],
                labels: labels(l),
            })
            .collect(),
        sample_refs: samples.iter().map(|s| s.0).collect(),
        sample_ts: samples.iter().map(|s| s.1).collect(),
        sample_values: samples.iter().map(|s| s.2).collect(),
        ..Default::default()
    }
}

/// Applies `b` on the connection `refs` (saying hello first on a new one).
fn apply(store: &Store, b: &ShipBatch, refs: &mut ConnRefs) -> Result<Applied, ApplyError> {
    if refs.epoch.is_none() {
        store.hello(&b.agent, b.shard, refs);
    }
    let bytes = ship::archive(b);
    let a = ship::access::<ArchivedShipBatch>(&bytes).unwrap();
    ship::check_batch(a).unwrap();
    store.apply(a, refs)
}

/// The label sets `select` returns for these matchers, each as `n=v,n=v`.
fn selected(r: &Reader, ms: &[(MatchKind, &str, &str)], view: TagView) -> Vec<String> {
    let ms: Vec<Matcher> = ms
        .iter()
        .map(|(k, n, v)| Matcher::new(*k, n, v).unwrap())
        .collect();
    select(r, &ms, view)
        .unwrap()
        .into_iter()
        .map(|(_, l)| {
            l.iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

/// Every stored (t, bits) of the series with these labels, in order.
fn read(store: &Store, name: &str) -> Vec<(i64, u64)> {
    read_with(&store.reader().unwrap(), name)
}

/// [`read`] through a given reader.
fn read_with(r: &Reader, name: &str) -> Vec<(i64, u64)> {
    let m = [Matcher::new(MatchKind::Equal, "__name__", name).unwrap()];
    let found = select(r, &m, VIEW).unwrap();
    assert!(found.len() <= 1);
    let Some((sid, _)) = found.first() else {
        return Vec::new();
    };
    let d = r.series_data(*sid, i64::MIN / 2, i64::MAX / 2).unwrap();
    let mut out = Vec::new();
    let mut last = i64::MIN;
    for (min_t, max_t, c) in d.chunks {
        let s = xor::decode(&c).unwrap();
        assert_eq!(s.first().unwrap().0, min_t, "chunk min_t");
        assert_eq!(s.last().unwrap().0, max_t, "chunk max_t");
        for (t, v) in s {
            assert!(t > last, "samples out of order or repeated at {t}");
            last = t;
            out.push((t, v.to_bits()));
        }
    }
    out
}

const UP: &[(&str, &str)] = &[("__name__", "up"), ("job", "node")];
const STALE: u64 = 0x7ff0_0000_0000_0002;

#[test]
fn a_replayed_batch_is_skipped_and_overlaps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    let mut refs = ConnRefs::default();
    let b1 = batch(
        1,
        3,
        &[(0, UP)],
        &[(0, 1000, 1f64.to_bits()), (0, 2000, STALE)],
    );
    assert_eq!(
        apply(&store, &b1, &mut refs).unwrap(),
        Applied::Stored { samples: 2 }
    );
    assert_eq!(store.applied_seq("agent-a", 0), 3);
    // The same batch again (the ack was lost): nothing is stored twice.
    let mut refs2 = ConnRefs::default();
    assert_eq!(apply(&store, &b1, &mut refs2).unwrap(), Applied::Replay);
    assert_eq!(
        read(&store, "up"),
        vec![(1000, 1f64.to_bits()), (2000, STALE)]
    );
    // A replay still interns its series for the batches that follow on its connection.
    let b2 = batch(4, 4, &[], &[(0, 3000, 2f64.to_bits())]);
    apply(&store, &b2, &mut refs2).unwrap();
    assert_eq!(read(&store, "up").len(), 3);
    // A batch that straddles the applied sequence is a protocol error, not a partial apply.
    let b3 = batch(4, 6, &[], &[(0, 4000, 0)]);
    assert!(matches!(
        apply(&store, &b3, &mut refs2),
        Err(ApplyError::Sequence(_))
    ));
    assert_eq!(read(&store, "up").len(), 3);
    // Another shard of the same agent has its own ledger.
    let mut b4 = batch(1, 1, &[(7, UP)], &[(7, 5000, 5f64.to_bits())]);
    b4.shard = 1;
    apply(&store, &b4, &mut ConnRefs::default()).unwrap();
    assert_eq!(store.applied_seq("agent-a", 1), 1);
    assert_eq!(read(&store, "up").last(), Some(&(5000, 5f64.to_bits())));
}

#[test]
fn late_samples_are_stored_in_order_and_resends_and_conflicts_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    let mut refs = ConnRefs::default();
    let b = batch(
        1,
        1,
        &[(0, UP)],
        &[
            (0, 1000, 1f64.to_bits()),
            (0, 2000, 2f64.to_bits()),
            (0, 2000, 2f64.to_bits()), // resend: same timestamp, same bits
            (0, 2000, 9f64.to_bits()), // conflicting value at a stored timestamp
            (0, 1500, 3f64.to_bits()), // older than the newest: stored in order
            (0, 1000, 1f64.to_bits()), // a resend of an older sample
            (0, 1500, 4f64.to_bits()), // conflicting with a late sample
            (0, 3000, 3f64.to_bits()),
        ],
    );
    assert_eq!(
        apply(&store, &b, &mut refs).unwrap(),
        Applied::Stored { samples: 4 }
    );
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(store.metrics.samples_duplicate.load(Relaxed), 2);
    assert_eq!(store.metrics.samples_conflicting.load(Relaxed), 2);
    assert_eq!(store.metrics.samples_out_of_order.load(Relaxed), 1);
    assert_eq!(store.metrics.samples_appended.load(Relaxed), 4);
    assert_eq!(
        read(&store, "up"),
        vec![
            (1000, 1f64.to_bits()),
            (1500, 3f64.to_bits()),
            (2000, 2f64.to_bits()),
            (3000, 3f64.to_bits())
        ]
    );
    // An unknown reference fails the whole batch and stores nothing of it.
    let bad = batch(2, 2, &[], &[(0, 4000, 0), (42, 4000, 0)]);
    assert!(matches!(
        apply(&store, &bad, &mut refs),
        Err(ApplyError::Batch(_))
    ));
    assert_eq!(read(&store, "up").len(), 4);
    assert_eq!(store.applied_seq("agent-a", 0), 1);
}

/// The chunks of the series `up` as (min_t, max_t, samples), checking each lies in one
/// partition and that they are disjoint and in time order.
fn chunk_shapes(store: &Store) -> Vec<(i64, i64, usize)> {
    let r = store.reader().unwrap();
    let m = [Matcher::new(MatchKind::Equal, "__name__", "up").unwrap()];
    let sid = select(&r, &m, VIEW).unwrap()[0].0;
    let d = r.series_data(sid, i64::MIN / 2, i64::MAX / 2).unwrap();
    let shapes: Vec<(i64, i64, usize)> = d
        .chunks
        .iter()
        .map(|(min_t, max_t, c)| (*min_t, *max_t, xor::decode(c).unwrap().len()))
        .collect();
    for (min_t, max_t, _) in &shapes {
        assert_eq!(
            promgate_server::store::partition_of(*min_t),
            promgate_server::store::partition_of(*max_t),
            "a chunk spans partitions: {shapes:?}"
        );
    }
    for w in shapes.windows(2) {
        assert!(w[0].1 < w[1].0, "chunks overlap: {w:?}");
    }
    shapes
}

/// What one agent shard's WAL holds when a sender's connection moved to the other
/// shard while this one was behind: the other shard's newer samples of the same series
/// reached the server first. Every one of these older samples was acknowledged, so
/// every one must be stored.
#[test]
fn late_samples_from_another_shard_land_in_their_chunks_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let base = 100 * PARTITION_MS;
    let start = base - 50 * 15_000;
    let grid = |i: i64| start + i * 15_000;
    // Shard 1 first: 300 samples 15 s apart, from 50 before a partition edge. Chunks:
    // 50 | edge | 120, 120, and 10 open.
    let on_time: Vec<(u32, i64, u64)> = (0..300)
        .map(|i| (0, grid(i), (i as f64).to_bits()))
        .collect();
    let mut late: Vec<(u32, i64, u64)> = Vec::new();
    // Between samples, in every chunk including the open one (the last at 298 + 1 s
    // is before the newest, so it is late too).
    for i in [0, 10, 49, 50, 51, 169, 170, 200, 290, 298] {
        late.push((0, grid(i) + 1000, 1000f64.to_bits()));
    }
    // Before the first sample in its partition (moves that chunk's start), and a day
    // earlier, in a partition holding nothing yet.
    late.push((0, start - 7000, 7f64.to_bits()));
    late.push((0, start - DAY_MS, 8f64.to_bits()));
    late.push((0, start - DAY_MS + 5, 9f64.to_bits()));
    // Enough into the second chunk after the edge (grid 170..290) that it is cut
    // (more than 240 samples), and cut again.
    for i in 171..290 {
        late.push((0, grid(i) + 5000, 5000f64.to_bits()));
        late.push((0, grid(i) + 10_000, 10_000f64.to_bits()));
    }
    let mut want: Vec<(i64, u64)> = on_time.iter().chain(&late).map(|s| (s.1, s.2)).collect();
    want.sort();
    // Resends and a conflict: stored neither.
    let resent = [
        (0, grid(10), 10f64.to_bits()),
        (0, grid(10) + 1000, 1000f64.to_bits()),
        (0, start - DAY_MS, 8f64.to_bits()),
    ];
    let conflict = (0, grid(200), 1f64.to_bits());
    {
        let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
        let mut refs1 = ConnRefs::default();
        for (n, part) in on_time.chunks(70).enumerate() {
            let seq = n as u64 + 1;
            let intro: &[(u32, &[(&str, &str)])] = if n == 0 { &[(0, UP)] } else { &[] };
            let mut b = batch(seq, seq, intro, part);
            b.shard = 1;
            apply(&store, &b, &mut refs1).unwrap();
        }
        assert_eq!(chunk_shapes(&store).len(), 4);
        // Then shard 0, behind, with the older samples (in two batches).
        let mut refs0 = ConnRefs::default();
        let (a, b) = late.split_at(late.len() / 2);
        apply(&store, &batch(1, 1, &[(0, UP)], a), &mut refs0).unwrap();
        let mut rest = b.to_vec();
        rest.extend(resent);
        rest.push(conflict);
        assert_eq!(
            apply(&store, &batch(2, 2, &[], &rest), &mut refs0).unwrap(),
            Applied::Stored {
                samples: b.len() as u64
            }
        );
        use std::sync::atomic::Ordering::Relaxed;
        let m = &store.metrics;
        assert_eq!(m.samples_out_of_order.load(Relaxed), late.len() as u64);
        assert_eq!(m.samples_duplicate.load(Relaxed), 3);
        assert_eq!(m.samples_conflicting.load(Relaxed), 1);
        assert_eq!(store.applied_seq("agent-a", 0), 2);
        assert_eq!(store.applied_seq("agent-a", 1), 5);
        assert_eq!(read(&store, "up"), want);
        let shapes = chunk_shapes(&store);
        // The day-early pair made a chunk of its own, and the chunk that took 239 late
        // samples was cut once: day-early, 50 + 4, 120 + 3, two halves, 10 + 2 open.
        assert_eq!(shapes[0], (start - DAY_MS, start - DAY_MS + 5, 2));
        assert!(shapes.iter().all(|c| c.2 <= 240), "{shapes:?}");
        assert_eq!(shapes.len(), 6, "{shapes:?}");
    }
    // Closing checkpoints; reopened, the head and the rewritten chunks are all there,
    // and appending goes on after the newest sample.
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    assert_eq!(read(&store, "up"), want);
    let t = grid(300);
    let mut b = batch(6, 6, &[(0, UP)], &[(0, t, 1f64.to_bits())]);
    b.shard = 1;
    apply(&store, &b, &mut ConnRefs::default()).unwrap();
    want.push((t, 1f64.to_bits()));
    assert_eq!(read(&store, "up"), want);
}

/// Late samples can overfill the open chunk, which is then cut and its older half
/// sealed. A reader opened before that must still find every sample it could see.
#[test]
fn a_reader_from_before_the_open_chunk_is_cut_misses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    let mut refs = ConnRefs::default();
    let t0 = 100 * PARTITION_MS;
    let on_time: Vec<(u32, i64, u64)> = (0..120)
        .map(|i| (0, t0 + i * 10_000, (i as f64).to_bits()))
        .collect();
    apply(&store, &batch(1, 1, &[(0, UP)], &on_time), &mut refs).unwrap();
    let before = store.reader().unwrap();
    let old = read_with(&before, "up");
    assert_eq!(old.len(), 120);
    let late: Vec<(u32, i64, u64)> = (0..119)
        .flat_map(|i| [3000, 6000].map(|d| (0, t0 + i * 10_000 + d, 0.5f64.to_bits())))
        .collect();
    apply(&store, &batch(2, 2, &[], &late), &mut refs).unwrap();
    let seen = read_with(&before, "up");
    assert!(
        old.iter().all(|s| seen.contains(s)),
        "the earlier reader lost samples: {} of {} left",
        old.iter().filter(|s| seen.contains(s)).count(),
        old.len()
    );
    assert_eq!(read(&store, "up").len(), 120 + late.len());
    let shapes = chunk_shapes(&store);
    assert!(shapes.len() >= 2, "the open chunk was not cut: {shapes:?}");
}

#[test]
fn chunks_seal_at_120_samples_and_partition_edges_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let mut want: Vec<(i64, u64)>;
    {
        let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
        let mut refs = ConnRefs::default();
        let base = 100 * PARTITION_MS;
        // 300 samples 15 s apart, starting 50 samples before a partition edge: the edge
        // cuts one chunk, and the 120-sample limit cuts two more after it.
        let start = base - 50 * 15_000;
        let samples: Vec<(u32, i64, u64)> = (0..300)
            .map(|i| (0, start + i * 15_000, (i as f64 * 0.5).to_bits()))
            .collect();
        want = samples.iter().map(|s| (s.1, s.2)).collect();
        for (n, part) in samples.chunks(70).enumerate() {
            let seq = n as u64 + 1;
            let intro: &[(u32, &[(&str, &str)])] = if n == 0 { &[(0, UP)] } else { &[] };
            apply(&store, &batch(seq, seq, intro, part), &mut refs).unwrap();
        }
        assert_eq!(read(&store, "up"), want);
        let r = store.reader().unwrap();
        let sid = select(
            &r,
            &[Matcher::new(MatchKind::Equal, "job", "node").unwrap()],
            VIEW,
        )
        .unwrap()[0]
            .0;
        let d = r.series_data(sid, i64::MIN / 2, i64::MAX / 2).unwrap();
        // 50 before the edge, then 120 + 120 + 10 after it.
        let sizes: Vec<usize> = d
            .chunks
            .iter()
            .map(|c| xor::decode(&c.2).unwrap().len())
            .collect();
        assert_eq!(sizes, vec![50, 120, 120, 10]);
    }
    // Reopen (as after a crash: the head comes back from disk) and keep appending.
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    assert_eq!(store.applied_seq("agent-a", 0), 5);
    assert_eq!(read(&store, "up"), want);
    let t = want.last().unwrap().0 + 15_000;
    let mut refs = ConnRefs::default();
    apply(
        &store,
        &batch(6, 6, &[(3, UP)], &[(3, t, STALE)]),
        &mut refs,
    )
    .unwrap();
    want.push((t, STALE));
    assert_eq!(read(&store, "up"), want);
}

#[test]
fn batches_become_durable_at_checkpoints_and_queries_see_them_before() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    let mut refs = ConnRefs::default();
    let samples: Vec<(u32, i64, u64)> = (0..170)
        .map(|i| (0, 1_000_000 + i * 15_000, (i as f64).to_bits()))
        .collect();
    let want: Vec<(i64, u64)> = samples[..150].iter().map(|s| (s.1, s.2)).collect();
    apply(&store, &batch(1, 1, &[(0, UP)], &samples[..100]), &mut refs).unwrap();
    let ledger = |l: &Store| l.ledger("agent-a", 0);
    assert_eq!(
        ledger(&store),
        Ledger {
            applied: 1,
            durable: 0
        }
    );
    // A reader from before the next batch, which seals the first 120 samples into a
    // chunk: it still sees every sample, the sealed chunk included.
    let before = store.reader().unwrap();
    apply(&store, &batch(2, 2, &[], &samples[100..150]), &mut refs).unwrap();
    assert_eq!(read_with(&before, "up"), want);
    drop(before);
    assert_eq!(read(&store, "up"), want);
    assert!(store.checkpoint().unwrap());
    assert_eq!(
        ledger(&store),
        Ledger {
            applied: 2,
            durable: 2
        }
    );
    assert!(!store.checkpoint().unwrap(), "nothing changed since");
    drop(store);
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    assert_eq!(read(&store, "up"), want);
    // The same open chunk changes again after a checkpoint: the next one writes it too.
    let mut refs = ConnRefs::default();
    apply(
        &store,
        &batch(3, 3, &[(0, UP)], &samples[150..160]),
        &mut refs,
    )
    .unwrap();
    assert!(store.checkpoint().unwrap());
    apply(&store, &batch(4, 4, &[], &samples[160..]), &mut refs).unwrap();
    assert!(store.checkpoint().unwrap());
    drop(store);
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    let want: Vec<(i64, u64)> = samples.iter().map(|s| (s.1, s.2)).collect();
    assert_eq!(read(&store, "up"), want);
}

#[test]
fn a_checkpoint_written_in_pieces_makes_every_open_chunk_durable() {
    // More series than two checkpoint pieces (8192 series each) and a part of a third,
    // each with one sample in its open chunk: only the checkpoint's `head` rows keep
    // them across a restart.
    let n = 2 * 8192 + 5;
    let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let label_sets: Vec<Vec<(&str, &str)>> = names
        .iter()
        .map(|name| vec![("__name__", name.as_str()), ("job", "pieces")])
        .collect();
    let series: Vec<(u32, &[(&str, &str)])> = label_sets
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l.as_slice()))
        .collect();
    let samples: Vec<(u32, i64, u64)> = (0..n)
        .map(|i| (i as u32, 1_000_000 + i as i64, (i as f64).to_bits()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    let mut refs = ConnRefs::default();
    apply(&store, &batch(1, 1, &series, &samples), &mut refs).unwrap();
    assert!(store.checkpoint().unwrap());
    drop(store);
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    assert_eq!(store.ledger("agent-a", 0).durable, 1);
    let reader = store.reader().unwrap();
    for (i, name) in names.iter().enumerate() {
        let want = vec![(1_000_000 + i as i64, (i as f64).to_bits())];
        assert_eq!(read_with(&reader, name), want, "series {name}");
    }
}

#[test]
fn retention_deletes_whole_old_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), DAY_MS).unwrap();
    let mut refs = ConnRefs::default();
    let now = 1_000 * PARTITION_MS;
    let old = now - 3 * DAY_MS;
    let recent = now - 3_600_000;
    apply(
        &store,
        &batch(
            1,
            1,
            &[(0, UP), (1, &[("__name__", "old_only")])],
            &[
                (0, old, 1f64.to_bits()),
                (0, recent, 2f64.to_bits()),
                (1, old, 3f64.to_bits()),
            ],
        ),
        &mut refs,
    )
    .unwrap();
    assert!(store.apply_retention(now).unwrap() >= 1);
    assert_eq!(read(&store, "up"), vec![(recent, 2f64.to_bits())]);
    assert_eq!(read(&store, "old_only"), vec![]);
}

#[test]
fn selection_supports_all_matcher_types_and_sorts_series() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    let mut refs = ConnRefs::default();
    let series: Vec<(u32, &[(&str, &str)])> = vec![
        (0, &[("__name__", "m"), ("job", "b")]),
        (1, &[("__name__", "m"), ("job", "a")]),
        (2, &[("__name__", "m"), ("job", "ab")]),
        (3, &[("__name__", "m")]),
        (4, &[("__name__", "n"), ("job", "a")]),
    ];
    let samples: Vec<(u32, i64, u64)> = (0..5).map(|r| (r, 1000, 0)).collect();
    apply(&store, &batch(1, 1, &series, &samples), &mut refs).unwrap();
    let r = store.reader().unwrap();
    let jobs = |ms: &[(MatchKind, &str, &str)]| selected(&r, ms, VIEW);
    use MatchKind::*;
    assert_eq!(
        jobs(&[(Equal, "__name__", "m")]),
        vec![
            "__name__=m",
            "__name__=m,job=a",
            "__name__=m,job=ab",
            "__name__=m,job=b"
        ]
    );
    assert_eq!(
        jobs(&[(Equal, "__name__", "m"), (Regex, "job", "a")]),
        vec!["__name__=m,job=a"],
        "regex must be anchored"
    );
    assert_eq!(
        jobs(&[(Equal, "__name__", "m"), (NotRegex, "job", "a.*")]),
        vec!["__name__=m", "__name__=m,job=b"]
    );
    assert_eq!(
        jobs(&[(NotEqual, "job", "a"), (Regex, "__name__", "m|n")]),
        vec!["__name__=m", "__name__=m,job=ab", "__name__=m,job=b"]
    );
    assert_eq!(
        jobs(&[(Equal, "job", ""), (Regex, "__name__", ".+")]),
        vec!["__name__=m"]
    );
    assert_eq!(
        jobs(&[(Equal, "job", "a")]),
        vec!["__name__=m,job=a", "__name__=n,job=a"]
    );
}

/// Series arrive as app labels plus a target: the store rebuilds the exact label set,
/// keeps the target's tags beside it (originals win a clash), and `df_` matchers select
/// by tag while the returned labels stay the original ones unless asked for.
#[test]
fn targets_rejoin_labels_and_tags_sit_beside_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    let mut refs = ConnRefs::default();
    fn t<'a>(n: &'a str, v: &'a str) -> (&'a str, &'a str) {
        (n, v)
    }
    let b = ShipBatch {
        agent: "agent-a".into(),
        first_seq: 1,
        last_seq: 1,
        new_targets: vec![
            NewTarget {
                target_ref: 0,
                labels: labels(&[
                    t("instance", "10.0.0.9:80"),
                    t("job", "api"),
                    t("zone", "b"),
                ]),
                tags: labels(&[t("agent", "a1"), t("pod", "api-1"), t("region", "eu")]),
            },
            NewTarget {
                target_ref: 1,
                labels: vec![],
                tags: labels(&[t("agent", "a1")]),
            },
        ],
        new_series: vec![
            NewSeries {
                series_ref: 0,
                target_ref: 0,
                absent: vec![],
                labels: labels(&[t("__name__", "reqs"), t("code", "200")]),
            },
            // honor_labels: its own zone, and a `pod` label of its own (which wins).
            NewSeries {
                series_ref: 1,
                target_ref: 0,
                absent: vec![2],
                labels: labels(&[t("__name__", "reqs"), t("pod", "mine"), t("zone", "a")]),
            },
            NewSeries {
                series_ref: 2,
                target_ref: 1,
                absent: vec![],
                labels: labels(&[t("__name__", "orphan")]),
            },
        ],
        sample_refs: vec![0, 1, 2],
        sample_ts: vec![1000, 1000, 1000],
        sample_values: vec![0, 0, 0],
        ..Default::default()
    };
    apply(&store, &b, &mut refs).unwrap();
    let r = store.reader().unwrap();
    let q = |ms: &[(MatchKind, &str, &str)], view: TagView| selected(&r, ms, view);
    use MatchKind::*;
    assert_eq!(
        q(&[(Equal, "__name__", "reqs")], VIEW),
        vec![
            "__name__=reqs,code=200,instance=10.0.0.9:80,job=api,zone=b",
            "__name__=reqs,instance=10.0.0.9:80,job=api,pod=mine,zone=a",
        ]
    );
    // Tags select, and the original `pod` label shadows the tag on series 1.
    assert_eq!(
        q(&[(Equal, "df_pod", "api-1")], VIEW),
        vec!["__name__=reqs,code=200,instance=10.0.0.9:80,job=api,zone=b"]
    );
    assert_eq!(q(&[(Regex, "df_region", "e.")], VIEW).len(), 2);
    assert_eq!(q(&[(Equal, "df_agent", "a1")], VIEW).len(), 3);
    assert_eq!(
        q(
            &[(Equal, "__name__", "orphan"), (Equal, "df_region", "")],
            VIEW
        )
        .len(),
        1,
        "a series of no known target has no region tag"
    );
    let with_tags = TagView {
        prefix: "df_",
        tags_in_labels: true,
    };
    assert_eq!(
        q(&[(Equal, "__name__", "orphan")], with_tags),
        vec!["__name__=orphan,df_agent=a1"]
    );
    assert_eq!(r.tags(1).unwrap().len(), 3);
    drop(r);

    // A series that comes back (new connection) with other tags gets the new ones.
    let mut refs = ConnRefs::default();
    let mut b2 = b.clone();
    b2.first_seq = 2;
    b2.last_seq = 2;
    b2.new_targets[1].tags = labels(&[t("agent", "a2")]);
    b2.sample_ts = vec![2000, 2000, 2000];
    apply(&store, &b2, &mut refs).unwrap();
    let r = store.reader().unwrap();
    let n = |name: &str, value: &str| {
        select(&r, &[Matcher::new(Equal, name, value).unwrap()], VIEW)
            .unwrap()
            .len()
    };
    assert_eq!((n("df_agent", "a1"), n("df_agent", "a2")), (2, 1));
    assert_eq!(n("__name__", "orphan"), 1, "still one series");
    drop(r);

    // Inconsistent references are refused, and nothing of the batch is stored.
    let mut bad = b.clone();
    bad.first_seq = 3;
    bad.last_seq = 3;
    bad.new_series[0].target_ref = 9;
    let e = apply(&store, &bad, &mut ConnRefs::default()).unwrap_err();
    assert!(e.to_string().contains("unknown target ref 9"), "{e}");
    let mut bad = b.clone();
    bad.first_seq = 3;
    bad.last_seq = 3;
    bad.new_series[0].labels = labels(&[t("__name__", "reqs"), t("zone", "c")]);
    let e = apply(&store, &bad, &mut ConnRefs::default()).unwrap_err();
    assert!(e.to_string().contains("both its app and target"), "{e}");
    let mut bad = b.clone();
    bad.first_seq = 3;
    bad.last_seq = 3;
    bad.new_series[0].absent = vec![3];
    let e = apply(&store, &bad, &mut ConnRefs::default()).unwrap_err();
    assert!(e.to_string().contains("absent index 3"), "{e}");
    assert_eq!(store.applied_seq("agent-a", 0), 2);
}

/// Expected postings from the index's own `labels` and `tags`: name → value → sids.
type Inverted = std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<u64>>>;

fn inverted_from_labels_and_tags(r: &Reader) -> Inverted {
    use promgate_server::store::TAG_MARK;
    let mut want = Inverted::new();
    for sid in r.all_series().unwrap() {
        let labels = r.labels(sid).unwrap().unwrap();
        let tags = r.tags(sid).unwrap().into_iter();
        let tags = tags.map(|(n, v)| (format!("{TAG_MARK}{n}"), v));
        for (n, v) in labels.into_iter().chain(tags) {
            want.entry(n).or_default().entry(v).or_default().push(sid);
        }
    }
    want
}

/// Postings are written as one block per label pair per batch. Whatever the batches,
/// including series whose tags flip back and forth and a series twice in one batch, the
/// union of a pair's blocks is exactly the series that have the pair.
#[test]
fn postings_blocks_are_exactly_the_series_of_each_pair() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    let series_labels = |i: u32| {
        labels(&[
            ("__name__", &format!("m{}", i % 3)),
            ("inst", &format!("i{i}")),
            ("job", &format!("j{}", i % 5)),
        ])
    };
    for round in 0..6u32 {
        let seq = u64::from(round) + 1;
        let team = ["a", "b"][round as usize % 2];
        let mut new_series = Vec::new();
        // 40 new series, then every 7th older one again (its team tag flips).
        let old = (0..round * 40).step_by(7);
        for (r, i) in (round * 40..round * 40 + 40).chain(old).enumerate() {
            new_series.push(NewSeries {
                series_ref: r as u32,
                target_ref: 0,
                absent: vec![],
                labels: series_labels(i),
            });
        }
        // The first series of the round once more, under the other target: its tags
        // are the last ones given.
        new_series.push(NewSeries {
            series_ref: new_series.len() as u32,
            target_ref: 1,
            absent: vec![],
            labels: series_labels(round * 40),
        });
        let n = new_series.len();
        let b = ShipBatch {
            agent: "agent-a".into(),
            first_seq: seq,
            last_seq: seq,
            new_targets: vec![
                NewTarget {
                    target_ref: 0,
                    labels: vec![],
                    tags: labels(&[("agent", "x"), ("team", team)]),
                },
                NewTarget {
                    target_ref: 1,
                    labels: vec![],
                    tags: labels(&[("agent", "x"), ("team", "c")]),
                },
            ],
            sample_refs: (0..n as u32).collect(),
            sample_ts: vec![1000 * seq as i64; n],
            sample_values: vec![0; n],
            new_series,
            ..Default::default()
        };
        apply(&store, &b, &mut ConnRefs::default()).unwrap();
        let r = store.reader().unwrap();
        let want = inverted_from_labels_and_tags(&r);
        assert_eq!(r.all_series().unwrap().len(), 40 * (round as usize + 1));
        let twice = want["inst"][&format!("i{}", round * 40)][0];
        let team_of_twice = r
            .tags(twice)
            .unwrap()
            .into_iter()
            .find(|(n, _)| n == "team");
        assert_eq!(team_of_twice, Some(("team".into(), "c".into())));
        let mut names = r.label_names().unwrap();
        names.sort();
        assert_eq!(names, want.keys().cloned().collect::<Vec<_>>());
        for (name, values) in &want {
            // In key order: by value length, then bytes.
            let mut got = r.values_of(name).unwrap();
            got.sort();
            let want_values: Vec<(String, Vec<u64>)> =
                values.iter().map(|(v, s)| (v.clone(), s.clone())).collect();
            assert_eq!(got, want_values, "values of {name:?}, round {round}");
            for (value, sids) in values {
                assert_eq!(&r.postings(name, value).unwrap(), sids, "{name}={value}");
            }
        }
    }
}

/// A store written with the first index formats (postings: one key per pair and series;
/// series: keyed by the labels) is converted when opened, and the old tables dropped: the
/// postings read back, and a series sent again keeps its id.
#[test]
fn the_first_index_formats_are_converted_at_open() {
    const V1: redb::TableDefinition<&[u8], ()> = redb::TableDefinition::new("postings");
    const SERIES_V1: redb::TableDefinition<&[u8], u64> = redb::TableDefinition::new("series");
    const LABELS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("labels");
    const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    let up = |job: &str| {
        let mut k = Vec::new();
        promgate_server::store::encode_labels(
            [("__name__", "up"), ("job", job)].into_iter(),
            &mut k,
        );
        k
    };
    let dir = tempfile::tempdir().unwrap();
    let key = |n: &str, v: &str, sid: u64| {
        let mut k = promgate_server::store::postings_pair_prefix(n, v);
        k.extend_from_slice(&sid.to_be_bytes());
        k
    };
    {
        let db = redb::Database::create(dir.path().join("prometheus.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(V1).unwrap();
            for sid in [1, 2, 3, 300] {
                t.insert(key("__name__", "up", sid).as_slice(), ()).unwrap();
            }
            t.insert(key("job", "a", 2).as_slice(), ()).unwrap();
            t.insert(key("job", "b", 1).as_slice(), ()).unwrap();
            t.insert(key("\0agent", "x", 3).as_slice(), ()).unwrap();
            let mut series = tx.open_table(SERIES_V1).unwrap();
            let mut labels = tx.open_table(LABELS).unwrap();
            for (sid, job) in [(1, "b"), (2, "a"), (3, "c"), (300, "d")] {
                series.insert(up(job).as_slice(), sid).unwrap();
                labels.insert(sid, up(job).as_slice()).unwrap();
            }
            tx.open_table(META)
                .unwrap()
                .insert("next_sid", 301)
                .unwrap();
        }
        tx.commit().unwrap();
    }
    for seq in 1..=2 {
        let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
        let b = batch(
            seq,
            seq,
            &[
                (0, &[("__name__", "up"), ("job", "a")]),
                (1, &[("__name__", "up"), ("job", "new")]),
            ],
            &[(0, 1000 * seq as i64, 0), (1, 1000 * seq as i64, 0)],
        );
        apply(&store, &b, &mut ConnRefs::default()).unwrap();
        let r = store.reader().unwrap();
        assert_eq!(
            r.postings("__name__", "up").unwrap(),
            vec![1, 2, 3, 300, 301]
        );
        assert_eq!(
            r.postings("job", "a").unwrap(),
            vec![2],
            "job=a kept its id"
        );
        assert_eq!(r.postings("job", "new").unwrap(), vec![301]);
        assert_eq!(r.all_series().unwrap(), vec![1, 2, 3, 300, 301]);
        assert_eq!(r.postings("\0agent", "x").unwrap(), vec![3]);
    }
    let db = redb::Database::open(dir.path().join("prometheus.redb")).unwrap();
    let tx = db.begin_read().unwrap();
    use redb::TableHandle;
    let names: Vec<String> = tx
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_string())
        .collect();
    for old in ["postings", "series"] {
        assert!(!names.contains(&old.to_string()), "{names:?}");
    }
}

/// A checkpoint lets batches be applied between its pieces. Here one seals a chunk of
/// every series after their open chunks were written, another comes from a connection
/// that first applied after the checkpoint began, and then the server crashes right
/// after the checkpoint (a copy of its files is opened, as after a kill). What is
/// durable must be consistent (no series holds a sample twice), `applied` must be the
/// checkpoint's target, and resending from there must store everything exactly once.
#[test]
fn a_crash_after_a_checkpoint_that_batches_interleaved_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
    let labels: Vec<Vec<(&str, &str)>> = names
        .iter()
        .map(|n| vec![("__name__", n.as_str()), ("job", "node")])
        .collect();
    let intro: Vec<(u32, &[(&str, &str)])> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l.as_slice()))
        .collect();
    let base = 100 * PARTITION_MS;
    let bits = |k: i64| (k as f64).to_bits();
    // 120 samples per series: full open chunks, sealed by the next sample.
    let full: Vec<(u32, i64, u64)> = (0..12u32)
        .flat_map(|r| (0..120).map(move |k| (r, base + k * 1000, bits(k))))
        .collect();
    let next: Vec<(u32, i64, u64)> = (0..12u32).map(|r| (r, base + 120_000, bits(120))).collect();
    let n0: &[(&str, &str)] = &[("__name__", "n0"), ("job", "node")];
    let other: Vec<(u32, i64, u64)> = (0..3).map(|k| (0, base + k * 1000, bits(k))).collect();
    // A series made after the checkpoint began (shard 0), and shard 1's older samples
    // of it, which go into a sealed chunk of their own.
    let s: &[(&str, &str)] = &[("__name__", "s"), ("job", "node")];
    let t = base + 500_000;
    let new_series = batch(3, 3, &[(20, s)], &[(20, t, bits(3))]);
    let mut late_too = other.clone();
    late_too.extend([(1, t - 10, bits(2)), (1, t - 20, bits(1))]);
    let mut other_batch = batch(1, 1, &[(0, n0), (1, s)], &late_too);
    other_batch.shard = 1;
    {
        let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
        store.set_checkpoint_piece_series(4); // 12 series: 3 pieces, 2 pauses
        let mut refs = ConnRefs::default();
        apply(&store, &batch(1, 1, &intro, &full), &mut refs).unwrap();
        let mut pauses = 0;
        let committed = store
            .checkpoint_with(|| {
                pauses += 1;
                if pauses == 1 {
                    apply(&store, &batch(2, 2, &[], &next), &mut refs).unwrap();
                } else {
                    apply(&store, &new_series, &mut refs).unwrap();
                    apply(&store, &other_batch, &mut ConnRefs::default()).unwrap();
                }
            })
            .unwrap();
        assert!(committed);
        assert_eq!(pauses, 2);
        let l = store.ledger("agent-a", 0);
        assert_eq!((l.applied, l.durable), (3, 1));
        // The crash: the files as they are now, before anything else is committed.
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), crashed.path().join(e.file_name())).unwrap();
        }
    }
    let store = Store::open(crashed.path(), 15 * DAY_MS).unwrap();
    assert_eq!(store.applied_seq("agent-a", 0), 1);
    assert_eq!(store.applied_seq("agent-a", 1), 0);
    // Consistent: `read` fails on a timestamp seen twice. Each series holds its 120
    // samples, and may hold the 121st (applied after the target) as well.
    for n in &names {
        let got = read(&store, n).len();
        assert!(got == 120 || got == 121, "{n}: {got} samples");
    }
    // The agents resend from the target, shard 1 first: its older samples of `s`
    // must be found stored, not stored again.
    apply(&store, &other_batch, &mut ConnRefs::default()).unwrap();
    let mut refs = ConnRefs::default();
    apply(&store, &batch(2, 2, &intro, &next), &mut refs).unwrap();
    apply(&store, &new_series, &mut refs).unwrap();
    assert_eq!(
        read(&store, "s"),
        vec![(t - 20, bits(1)), (t - 10, bits(2)), (t, bits(3))]
    );
    for n in &names {
        let want: Vec<(i64, u64)> = (0..121).map(|k| (base + k * 1000, bits(k))).collect();
        assert_eq!(read(&store, n), want, "{n}");
    }
    let want: Vec<(i64, u64)> = other.iter().map(|s| (s.1, s.2)).collect();
    assert_eq!(read(&store, "n0"), want);
}

/// A batch that fails in the middle for a reason other than I/O (here a late sample
/// falls into a stored chunk that does not decode) rolls the store back to its last
/// durable commit: `applied` goes back to it, so the agent resends what came after, and
/// nothing applied since is lost. Reopening the database alone would not do it: redb's
/// drop commits durably, which kept `applied` as of the last batch while the open chunks
/// went back to the checkpoint.
#[test]
fn a_batch_that_fails_without_an_io_error_rolls_back_to_the_last_checkpoint() {
    use redb::{ReadableTable, ReadableTableMetadata};
    const CHUNKS: redb::TableDefinition<(i64, u64, i64), &[u8]> =
        redb::TableDefinition::new("chunks");
    let dir = tempfile::tempdir().unwrap();
    let base = 100 * PARTITION_MS;
    let bits = |k: i64| (k as f64).to_bits();
    let old: &[(&str, &str)] = &[("__name__", "old"), ("job", "node")];
    let up_at = |ks: std::ops::Range<i64>| -> Vec<(u32, i64, u64)> {
        ks.map(|k| (0, base + k * 1000, bits(k))).collect()
    };
    {
        // `up` has 10 samples in its open chunk, `old` a sealed chunk of 120.
        let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
        let mut samples = up_at(0..10);
        samples.extend((0..=120).map(|k| (1, base + k * 1000, bits(k))));
        let b = batch(1, 1, &[(0, UP), (1, old)], &samples);
        apply(&store, &b, &mut ConnRefs::default()).unwrap();
        assert!(store.checkpoint().unwrap());
    }
    {
        // `old`'s sealed chunk is damaged: it claims 5 samples and holds none.
        let db = redb::Database::open(dir.path().join("prometheus.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(CHUNKS).unwrap();
            let (key, mut value) = {
                let (k, v) = t.first().unwrap().expect("old's sealed chunk");
                (k.value(), v.value().to_vec())
            };
            value.truncate(8); // max_t, then the chunk
            value.extend_from_slice(&[0, 5]);
            t.insert(key, value.as_slice()).unwrap();
            assert_eq!(t.len().unwrap(), 1);
        }
        tx.commit().unwrap();
    }
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    let mut refs = ConnRefs::default();
    let second = batch(2, 2, &[(0, UP)], &up_at(10..20));
    apply(&store, &second, &mut refs).unwrap();
    assert_eq!(read(&store, "up").len(), 20);
    assert_eq!(
        store.ledger("agent-a", 0),
        Ledger {
            applied: 2,
            durable: 1
        }
    );
    // Shard 1's late sample of `old` lands in the damaged chunk.
    let mut late = batch(1, 1, &[(0, old)], &[(0, base + 50_500, bits(-1))]);
    late.shard = 1;
    let e = apply(&store, &late, &mut ConnRefs::default()).unwrap_err();
    assert!(
        matches!(&e, ApplyError::Storage(m) if m.contains("corrupt")),
        "{e:?}"
    );
    // Back to the checkpoint: the agent resends batch 2, which is stored again.
    let mut refs = ConnRefs::default();
    let l = store.hello("agent-a", 0, &mut refs);
    assert_eq!(
        l,
        Ledger {
            applied: 1,
            durable: 1
        },
        "applied after the rollback"
    );
    assert_eq!(read(&store, "up").len(), 10);
    assert_eq!(store.applied_seq("agent-a", 1), 0);
    assert_eq!(
        apply(&store, &second, &mut refs).unwrap(),
        Applied::Stored { samples: 10 }
    );
    assert!(store.checkpoint().unwrap());
    drop(store);
    let store = Store::open(dir.path(), 15 * DAY_MS).unwrap();
    let want: Vec<(i64, u64)> = (0..20).map(|k| (base + k * 1000, bits(k))).collect();
    assert_eq!(read(&store, "up"), want);
    assert_eq!(store.applied_seq("agent-a", 0), 2);
}
