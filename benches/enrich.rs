//! Enrichment cost per series, and what the target/app label split saves on the ship
//! link. A program, not a timed test: `cargo bench --bench enrich`.
//!
//! Bodies come from the load-test generator (Kubernetes-like series, 10 labels, 2000
//! samples per request, one sample per series). The snapshot has one target per
//! (job, instance) of the load, whose target labels are the label pairs every series of
//! that target shares (as Prometheus's relabelling would give them), with Kubernetes
//! discovered labels, so every series is a hit.
//!
//! Reports:
//! - ns per series of [`Enricher::section`] (the receive path's whole enrichment work
//!   between decode and WAL: snapshot load, target lookup, clash count, writing the
//!   record's targets and per-series indexes), for all-hit and all-miss snapshots,
//!   beside the decode cost of the same bodies;
//! - ship bytes per sample (snappy-compressed rkyv frames, as the shipper sends them)
//!   with `ship.split_target_labels` on and off: on a new connection (every series and
//!   target sent once) and in steady state (only references and samples);
//! - ns per sample of the shipper's batch building in steady state, decoding each
//!   record's body or copying the ship section's columns the receive path wrote into
//!   it (`promgate_shards::prepared`).

use promgate_loadtest::{BodyTemplate, GenParams, Protocol as GenProtocol};
use promgate_proto::{decode, ship, Batch, Decoded, Limits, Protocol, RejectCounts};
use promgate_shards::enrich::{EnrichConfig, EnrichMetrics, Enricher};
use promgate_shards::prepared::SeriesHasher;
use promgate_shards::ship::BatchBuilder;
use promgate_shards::sink::{request_payload, Accepted};
use promgate_shards::snapshot::{merge, Labels, SnapshotCell, Target};
use promgate_shards::wal::format::{KIND_REMOTE_WRITE, PAYLOAD_VERSION};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

mod common;
use common::{median_ns_per, RUNS};

const SAMPLES_PER_REQUEST: usize = 2000;
const BODIES: usize = 64;

fn main() {
    let params = GenParams {
        seed: 1,
        labels_per_series: 10,
        samples_per_series: 1,
    };
    let bodies: Vec<Vec<u8>> = (0..BODIES)
        .map(|i| {
            let first = (i * SAMPLES_PER_REQUEST) as u64;
            BodyTemplate::build(
                &params,
                GenProtocol::V1,
                first,
                SAMPLES_PER_REQUEST,
                1_700_000_000_000,
            )
            .compressed
        })
        .collect();
    let raws: Vec<Vec<u8>> = bodies
        .iter()
        .map(|b| snap::raw::Decoder::new().decompress_vec(b).unwrap())
        .collect();
    let limits = Limits::default();
    let batches: Vec<Batch> = raws
        .iter()
        .map(|raw| {
            let mut b = Batch::default();
            decode(
                Protocol::V1,
                raw,
                &limits,
                &mut b,
                &mut RejectCounts::default(),
            )
            .unwrap();
            b
        })
        .collect();
    let series: usize = batches.iter().map(|b| b.series.len()).sum();

    // Targets: per (job, instance), the pairs all its series share.
    let mut shared: HashMap<(String, String), Labels> = HashMap::new();
    for (b, raw) in batches.iter().zip(&raws) {
        let d = Decoded {
            batch: b,
            body: raw,
        };
        for s in &b.series {
            let labels: Labels = d
                .labels(s.labels)
                .filter(|(n, _)| *n != "__name__")
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            let get = |n: &str| labels.iter().find(|l| l.0 == n).map(|l| l.1.clone());
            let key = (get("job").unwrap(), get("instance").unwrap());
            shared
                .entry(key)
                .and_modify(|t| t.retain(|l| labels.contains(l)))
                .or_insert(labels);
        }
    }
    let targets: Vec<Target> = shared
        .into_iter()
        .map(|((job, instance), labels)| Target {
            discovered: vec![
                ("__meta_kubernetes_namespace".into(), "monitoring".into()),
                (
                    "__meta_kubernetes_pod_name".into(),
                    format!("scraper-{instance}"),
                ),
                ("__meta_kubernetes_pod_node_name".into(), "node-17".into()),
            ],
            scrape_pool: job.clone(),
            scrape_interval_ms: 15_000,
            honor_labels: false,
            tags: Labels::new(),
            job,
            instance,
            labels,
        })
        .collect();
    let target_labels: usize = targets.iter().map(|t| t.labels.len()).sum();
    let cfg = EnrichConfig {
        rules: EnrichConfig::default_rules(),
        custom_tags: vec![("region".into(), "eu-1".into())],
        agent: "agent-1".into(),
        agent_host: "node-a".into(),
    };
    let hit = Arc::new(SnapshotCell::default());
    hit.publish(merge(1, std::slice::from_ref(&targets), &cfg));
    let miss = Arc::new(SnapshotCell::default());
    println!(
        "load: {BODIES} requests x {SAMPLES_PER_REQUEST} series (10 labels); {} targets, {:.1} target labels each",
        targets.len(),
        target_labels as f64 / targets.len() as f64
    );

    let mut out = Vec::with_capacity(1 << 20);
    let mut section_bytes = 0usize;
    let mut run = |cell: &Arc<SnapshotCell>, bytes: &mut usize| {
        let e = Enricher::new(cell.clone(), &cfg);
        let m = EnrichMetrics::default();
        median_ns_per(series, || {
            for (b, raw) in batches.iter().zip(&raws) {
                out.clear();
                e.section(
                    &Decoded {
                        batch: b,
                        body: raw,
                    },
                    &[],
                    &m,
                    &mut out,
                );
                *bytes = out.len();
                black_box(&out);
            }
        })
    };
    let t_hit = run(&hit, &mut section_bytes);
    let hit_bytes = section_bytes;
    let t_miss = run(&miss, &mut section_bytes);
    let mut batch = Batch::default();
    let t_decode = median_ns_per(series, || {
        for raw in &raws {
            decode(
                Protocol::V1,
                raw,
                &limits,
                &mut batch,
                &mut RejectCounts::default(),
            )
            .unwrap();
        }
    });
    println!("enrichment, ns/series (median of {RUNS} runs):");
    println!("  all hits   {t_hit:>6.1}   (WAL section of the last request: {hit_bytes} bytes)");
    println!("  all misses {t_miss:>6.1}");
    println!("  decode     {t_decode:>6.1}   (same bodies, for scale)");

    // Ship bytes: WAL payloads with enrichment, through the shipper's batch builder.
    let enricher = Enricher::new(hit.clone(), &cfg);
    let m = EnrichMetrics::default();
    let hasher = SeriesHasher::random();
    let payloads_with = |columns: Option<&SeriesHasher>| -> Vec<Vec<u8>> {
        batches
            .iter()
            .zip(&raws)
            .zip(&bodies)
            .map(|((b, raw), body)| {
                let mut p = Vec::new();
                let request = Accepted {
                    protocol: Protocol::V1,
                    compressed: body,
                    decoded: Decoded {
                        batch: b,
                        body: raw,
                    },
                    header_tags: &[],
                };
                request_payload(&mut p, &request, Some(&enricher), columns, &m);
                p
            })
            .collect()
    };
    let payloads = payloads_with(None);
    let samples = (BODIES * SAMPLES_PER_REQUEST) as f64;
    println!("ship bytes/sample (snappy frames), one batch per 16 requests:");
    println!(
        "  {:<22} {:>14} {:>13}",
        "", "new connection", "steady state"
    );
    let mut figures = Vec::new();
    for split in [true, false] {
        let mut builder = BatchBuilder::new("agent-1#e", 0, split, SeriesHasher::random());
        let mut bytes = [0usize; 2];
        let mut seq = 0;
        for pass in bytes.iter_mut() {
            for group in payloads.chunks(16) {
                builder.reset();
                for p in group {
                    seq += 1;
                    builder
                        .add_record(seq, KIND_REMOTE_WRITE, PAYLOAD_VERSION, p)
                        .unwrap();
                }
                let mut frame = Vec::new();
                ship::write_message(ship::KIND_BATCH, &builder.batch, true, &mut frame);
                *pass += frame.len();
            }
        }
        let name = if split {
            "split_target_labels"
        } else {
            "labels in every series"
        };
        println!(
            "  {name:<22} {:>14.2} {:>13.2}",
            bytes[0] as f64 / samples,
            bytes[1] as f64 / samples
        );
        figures.push(bytes[0]);
    }
    println!(
        "  the split saves {:.1}% of a new connection's bytes",
        100.0 * (1.0 - figures[0] as f64 / figures[1] as f64)
    );

    // Shipper work per sample in steady state (every series known on the connection):
    // decoding each record's body, or copying its ship section's columns.
    let with_columns = payloads_with(Some(&hasher));
    let mut builder = BatchBuilder::new("agent-1#e", 0, true, hasher);
    let pass = |builder: &mut BatchBuilder, payloads: &[Vec<u8>]| {
        builder.reset();
        for (i, p) in payloads.iter().enumerate() {
            builder
                .add_record(i as u64 + 1, KIND_REMOTE_WRITE, PAYLOAD_VERSION, p)
                .unwrap();
        }
        assert_eq!(builder.batch.sample_refs.len(), samples as usize);
    };
    pass(&mut builder, &payloads);
    let t_decoded = median_ns_per(samples as usize, || pass(&mut builder, &payloads));
    let t_copied = median_ns_per(samples as usize, || pass(&mut builder, &with_columns));
    assert!(builder.batch.new_series.is_empty());
    assert_eq!(builder.copied_records as usize, with_columns.len());
    let extra = with_columns.iter().map(Vec::len).sum::<usize>()
        - payloads.iter().map(Vec::len).sum::<usize>();
    println!("shipper batch building, ns/sample (median of {RUNS} runs, all series known):");
    println!("  from the record's body (snappy + decode + hash) {t_decoded:>6.1}");
    println!("  from the record's ship section                 {t_copied:>6.1}");
    println!(
        "  the ship sections add {:.1} bytes/sample to the WAL",
        extra as f64 / samples
    );
}
