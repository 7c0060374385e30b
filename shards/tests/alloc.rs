//! Zero allocation per sample in steady state, counted by a global allocator.
//!
//! The receive path's pure work for one request (snappy decompression into a reused
//! buffer, in-place decode into a reused batch, enrichment against a snapshot, the WAL
//! payload into a reused buffer, the ship-ready copy from a pooled entry) allocates
//! nothing once warm. The shipper's work for a record whose series are all known
//! allocates a constant number of times per record (parsing the record's enrichment
//! section), however many samples it holds, whether it decodes the record or takes the
//! copy.
//!
//! Not covered: the glommio I/O around them (socket and DMA buffers come from glommio's
//! own pools), and the server.

use promgate_loadtest::{BodyTemplate, GenParams, Protocol as GenProtocol};
use promgate_proto::{decode, Batch, Decoded, Limits, Protocol, RejectCounts};
use promgate_shards::enrich::{EnrichConfig, EnrichMetrics, Enricher};
use promgate_shards::prepared::SeriesHasher;
use promgate_shards::ship::BatchBuilder;
use promgate_shards::sink::{request_payload, Accepted};
use promgate_shards::snapshot::{merge, Labels, SnapshotCell, Target};
use promgate_shards::wal::format::{KIND_REMOTE_WRITE, PAYLOAD_VERSION};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts them.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn bodies(series_per_body: usize, n: usize) -> Vec<Vec<u8>> {
    let p = GenParams {
        seed: 1,
        labels_per_series: 10,
        samples_per_series: 1,
    };
    (0..n)
        .map(|i| {
            BodyTemplate::build(
                &p,
                GenProtocol::V1,
                (i * series_per_body) as u64,
                series_per_body,
                1_700_000_000_000,
            )
            .compressed
        })
        .collect()
}

fn cfg() -> EnrichConfig {
    EnrichConfig {
        rules: EnrichConfig::default_rules(),
        custom_tags: vec![("region".into(), "eu-1".into())],
        agent: "agent-1".into(),
        agent_host: "node-a".into(),
    }
}

#[test]
fn receive_path_allocates_nothing_per_request_once_warm() {
    let bodies = bodies(2000, 8);
    let limits = Limits::default();
    let mut raw = vec![0u8; 8 << 20];
    let mut snappy = snap::raw::Decoder::new();
    let mut batch = Batch::default();
    let mut reasons = RejectCounts::default();
    // Every (job, instance) of the load is a known target, so enrichment does its full
    // work: lookups, the request's target list, tags into the payload.
    let mut targets = Vec::new();
    for b in &bodies {
        let n = snappy.decompress(b, &mut raw).unwrap();
        decode(Protocol::V1, &raw[..n], &limits, &mut batch, &mut reasons).unwrap();
        let d = Decoded {
            batch: &batch,
            body: &raw[..n],
        };
        for s in &batch.series {
            let get = |name: &str| d.labels(s.labels).find(|(k, _)| *k == name).unwrap().1;
            let (job, instance) = (get("job").to_string(), get("instance").to_string());
            targets.push(Target {
                labels: vec![
                    ("instance".into(), instance.clone()),
                    ("job".into(), job.clone()),
                ],
                discovered: vec![("__meta_kubernetes_pod_name".into(), "p".into())],
                scrape_pool: job.clone(),
                scrape_interval_ms: 15_000,
                honor_labels: false,
                tags: Labels::new(),
                job,
                instance,
            });
        }
    }
    let cell = Arc::new(SnapshotCell::default());
    cell.publish(merge(1, &[targets], &cfg()));
    let enricher = Enricher::new(cell, &cfg());
    let metrics = EnrichMetrics::default();
    let mut payload = Vec::new();
    let hasher = SeriesHasher::random();
    let mut request = |body: &Vec<u8>| {
        let n = snappy.decompress(body, &mut raw).unwrap();
        decode(Protocol::V1, &raw[..n], &limits, &mut batch, &mut reasons).unwrap();
        assert_eq!(batch.samples.len(), 2000);
        let d = Decoded {
            batch: &batch,
            body: &raw[..n],
        };
        let request = Accepted {
            protocol: Protocol::V1,
            compressed: body,
            decoded: d,
            header_tags: &[],
        };
        payload.clear();
        request_payload(
            &mut payload,
            &request,
            Some(&enricher),
            Some(&hasher),
            &metrics,
        );
    };
    for _ in 0..3 {
        bodies.iter().for_each(&mut request);
    }
    let n = allocations(|| {
        for _ in 0..20 {
            bodies.iter().for_each(&mut request);
        }
    });
    assert_eq!(n, 0, "{n} allocations in 160 warm requests of 2000 samples");
    assert!(metrics.hits.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

/// Allocations per record of `series_per_body` samples, shipping the same records again
/// and again on one connection (every series known after the first pass).
fn ship_allocations_per_record(series_per_body: usize, with_columns: bool) -> u64 {
    let bodies = bodies(series_per_body, 4);
    let limits = Limits::default();
    let enricher = Enricher::new(Arc::new(SnapshotCell::default()), &cfg());
    let metrics = EnrichMetrics::default();
    let hasher = SeriesHasher::random();
    let payloads: Vec<Vec<u8>> = bodies
        .iter()
        .map(|body| {
            let raw = snap::raw::Decoder::new().decompress_vec(body).unwrap();
            let mut batch = Batch::default();
            decode(
                Protocol::V1,
                &raw,
                &limits,
                &mut batch,
                &mut RejectCounts::default(),
            )
            .unwrap();
            let d = Decoded {
                batch: &batch,
                body: &raw,
            };
            let request = Accepted {
                protocol: Protocol::V1,
                compressed: body,
                decoded: d,
                header_tags: &[],
            };
            let mut p = Vec::new();
            let columns = with_columns.then_some(&hasher);
            request_payload(&mut p, &request, Some(&enricher), columns, &metrics);
            p
        })
        .collect();
    let mut b = BatchBuilder::new("agent-1#e", 0, true, hasher);
    // The same records again and again.
    let pass = |b: &mut BatchBuilder| {
        b.reset();
        for (i, p) in payloads.iter().enumerate() {
            b.add_record(i as u64 + 1, KIND_REMOTE_WRITE, PAYLOAD_VERSION, p)
                .unwrap();
        }
    };
    // The first pass decodes (every series new), whatever it is offered.
    for _ in 0..3 {
        pass(&mut b);
    }
    let n = allocations(|| {
        for _ in 0..10 {
            pass(&mut b);
        }
    });
    assert!(b.batch.new_series.is_empty());
    assert_eq!(b.batch.sample_refs.len(), 4 * series_per_body);
    assert_eq!(b.copied_records, if with_columns { 4 } else { 0 });
    n / 40
}

#[test]
fn shipping_allocates_per_record_not_per_sample() {
    for with_columns in [false, true] {
        let small = ship_allocations_per_record(200, with_columns);
        let large = ship_allocations_per_record(2000, with_columns);
        assert_eq!(
            small, large,
            "allocations per record grow with its samples: {small} at 200, {large} at 2000 (columns: {with_columns})"
        );
        assert!(
            large <= 8,
            "{large} allocations per record (columns: {with_columns})"
        );
    }
}
