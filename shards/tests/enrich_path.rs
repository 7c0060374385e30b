//! The enrichment path without a runtime: a remote_write request is decoded, enriched
//! against a snapshot into its WAL payload (as the shard does between decode and WAL),
//! then read back by the shipper's batch builder. Over generated requests and snapshots:
//! every series' label set, rebuilt from its app labels and its target's labels (as the
//! server does), is exactly what was sent; its tags are exactly what the reference
//! per-series function [`enrich`] gives; and the hit/miss/clash counters agree with it.

use promgate_proto::messages::v1;
use promgate_proto::{decode, Batch, Decoded, Limits, Protocol, RejectCounts};
use promgate_shards::enrich::{enrich, EnrichConfig, EnrichMetrics, Enricher};
use promgate_shards::prepared::SeriesHasher;
use promgate_shards::ship::BatchBuilder;
use promgate_shards::sink::{request_payload, Accepted};
use promgate_shards::snapshot::{merge, Labels, SnapshotCell, Target};
use promgate_shards::wal::format::{KIND_REMOTE_WRITE, PAYLOAD_VERSION};
use proptest::prelude::*;
use prost::Message;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

fn cfg() -> EnrichConfig {
    EnrichConfig {
        rules: EnrichConfig::default_rules(),
        custom_tags: vec![
            ("region".into(), "eu-1".into()),
            ("zone".into(), "z9".into()),
        ],
        agent: "agent-7".into(),
        agent_host: "node-a".into(),
    }
}

/// Targets `j{0..3}` × `h{0..2}:80`, each with a `team` label, some with a `zone`
/// label, and Kubernetes discovered labels.
fn targets(with_zone: &[bool]) -> Vec<Target> {
    let mut out = Vec::new();
    for j in 0..3 {
        for h in 0..2 {
            let (job, instance) = (format!("j{j}"), format!("h{h}:80"));
            let mut labels: Labels = vec![
                ("instance".into(), instance.clone()),
                ("job".into(), job.clone()),
                ("team".into(), format!("t{j}")),
            ];
            if with_zone[j * 2 + h] {
                labels.push(("zone".into(), "za".into()));
            }
            labels.sort();
            out.push(Target {
                job,
                instance,
                labels,
                discovered: vec![
                    ("__meta_kubernetes_namespace".into(), format!("ns{j}")),
                    ("__meta_kubernetes_pod_name".into(), format!("pod-{j}-{h}")),
                ],
                scrape_pool: format!("j{j}"),
                scrape_interval_ms: 15_000,
                honor_labels: false,
                tags: Labels::new(),
            });
        }
    }
    out
}

/// One series: a job/instance (maybe unknown, maybe missing), maybe the target's team
/// (or another value: honor_labels), maybe a `pod` or `zone` label (clashing with tags).
fn series() -> impl Strategy<Value = BTreeMap<String, String>> {
    (
        0..4usize,
        0..3usize,
        0..3u8,
        any::<bool>(),
        any::<bool>(),
        "[a-c]{1,2}",
    )
        .prop_map(|(j, h, team, pod, zone, extra)| {
            let mut m = BTreeMap::new();
            m.insert("__name__".to_string(), format!("m_{extra}"));
            if j < 4 {
                m.insert("job".into(), format!("j{j}"));
            }
            if h < 2 {
                m.insert("instance".into(), format!("h{h}:80"));
            }
            match team {
                0 => {
                    m.insert("team".into(), format!("t{j}"));
                }
                1 => {
                    m.insert("team".into(), "other".into());
                }
                _ => {}
            }
            if pod {
                m.insert("pod".into(), "own".into());
            }
            if zone {
                m.insert("zone".into(), "za".into());
            }
            m.insert("x".into(), extra);
            m
        })
}

fn rejoin(app: &[(String, String)], target: &[(String, String)], absent: &[u16]) -> Labels {
    let mut out: Labels = app.to_vec();
    for (i, l) in target.iter().enumerate() {
        if !absent.contains(&(i as u16)) {
            out.push(l.clone());
        }
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn receive_enrichment_then_ship_gives_back_labels_and_the_reference_tags(
        sets in proptest::collection::vec(series(), 1..40),
        with_zone in proptest::collection::vec(any::<bool>(), 6),
        split in any::<bool>(),
    ) {
        let cfg = cfg();
        let snapshot = merge(1, &[targets(&with_zone)], &cfg);
        let cell = Arc::new(SnapshotCell::default());
        cell.publish(snapshot.clone());
        let mut sets = sets;
        sets.sort();
        sets.dedup();
        let req = v1::WriteRequest {
            timeseries: sets
                .iter()
                .enumerate()
                .map(|(i, m)| v1::TimeSeries {
                    labels: m
                        .iter()
                        .map(|(n, v)| v1::Label { name: n.clone(), value: v.clone() })
                        .collect(),
                    samples: (0..1 + i as i64 % 2)
                        .map(|t| v1::Sample { value: i as f64, timestamp: 1000 + t })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            metadata: vec![],
        };
        // Receive: enrichment section into the WAL payload.
        let metrics = EnrichMetrics::default();
        let enricher = Enricher::new(cell, &cfg);
        let hasher = SeriesHasher::random();
        let payload = wal_payload(&req, &enricher, &hasher, &metrics);

        // Ship: the builder reads the record back. It has a ship section, but every
        // series is new on the connection, so the record is decoded.
        let mut b = BatchBuilder::new("agent-7#e", 0, split, hasher);
        b.add_record(1, KIND_REMOTE_WRITE, PAYLOAD_VERSION, &payload).unwrap();
        prop_assert_eq!(b.copied_records, 0);
        let out = b.batch.clone();
        // Again, from the section now (all series known): the same samples, nothing new.
        b.reset();
        b.add_record(2, KIND_REMOTE_WRITE, PAYLOAD_VERSION, &payload).unwrap();
        prop_assert!(b.batch.new_series.is_empty() && b.batch.new_targets.is_empty());
        prop_assert_eq!(b.copied_records, 1);
        prop_assert_eq!(&b.batch.sample_refs, &out.sample_refs);
        prop_assert_eq!(&b.batch.sample_ts, &out.sample_ts);
        prop_assert_eq!(&b.batch.sample_values, &out.sample_values);
        let out = &out;
        prop_assert_eq!(out.new_series.len(), sets.len());
        let (mut hits, mut misses, mut clashes) = (0u64, 0u64, 0u64);
        for (s, want) in out.new_series.iter().zip(&sets) {
            let want: Labels = want.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
            let t = &out.new_targets[s.target_ref as usize];
            let pairs = |l: &[promgate_proto::ship::Label]| -> Labels {
                l.iter().map(|l| (l.name.clone(), l.value.clone())).collect()
            };
            let got = rejoin(&pairs(&s.labels), &pairs(&t.labels), &s.absent);
            prop_assert_eq!(&got, &want);
            if !split {
                prop_assert!(t.labels.is_empty());
            }
            // Tags as the server keeps them: the target's, minus clashes.
            let kept: Labels = pairs(&t.tags)
                .into_iter()
                .filter(|(n, _)| !want.iter().any(|(ln, _)| ln == n))
                .collect();
            let borrowed: Vec<(&str, &str)> =
                want.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let reference = enrich(&borrowed, &snapshot, &cfg);
            prop_assert_eq!(&kept, &reference.tags);
            if reference.target.is_some() { hits += 1 } else { misses += 1 }
            clashes += u64::from(reference.clashes);
        }
        prop_assert_eq!(metrics.hits.load(Relaxed), hits);
        prop_assert_eq!(metrics.misses.load(Relaxed), misses);
        prop_assert_eq!(metrics.clashes.load(Relaxed), clashes);
        // Each target crosses once: no two target refs carry the same labels and tags.
        for (i, a) in out.new_targets.iter().enumerate() {
            for c in &out.new_targets[i + 1..] {
                prop_assert!(a.labels != c.labels || a.tags != c.tags);
            }
        }
    }
}

/// A 1.0 series `up{instance, job}` with `samples` samples from timestamp 1000.
fn up_series(job: &str, instance: &str, samples: usize) -> v1::TimeSeries {
    v1::TimeSeries {
        labels: [("__name__", "up"), ("instance", instance), ("job", job)]
            .iter()
            .map(|(n, v)| v1::Label {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
        samples: (0..samples)
            .map(|i| v1::Sample {
                value: 1.0,
                timestamp: 1000 + i as i64,
            })
            .collect(),
        ..Default::default()
    }
}

/// The WAL payload the receive path writes for `req` (enrichment and ship sections).
fn wal_payload(
    req: &v1::WriteRequest,
    enricher: &Enricher,
    hasher: &SeriesHasher,
    metrics: &EnrichMetrics,
) -> Vec<u8> {
    let raw = req.encode_to_vec();
    let body = snap::raw::Encoder::new().compress_vec(&raw).unwrap();
    let mut batch = Batch::default();
    decode(
        Protocol::V1,
        &raw,
        &Limits::default(),
        &mut batch,
        &mut RejectCounts::default(),
    )
    .unwrap();
    let request = Accepted {
        protocol: Protocol::V1,
        compressed: &body,
        decoded: Decoded {
            batch: &batch,
            body: &raw,
        },
        header_tags: &[],
    };
    let mut p = Vec::new();
    request_payload(&mut p, &request, Some(enricher), Some(hasher), metrics);
    p
}

/// Prometheus usually starts sending before the agent's first sync: a series first
/// shipped with the agent's tags only is sent again (new reference, same labels) once
/// its target is known, so the server can give it its meta tags.
#[test]
fn a_series_is_resent_when_its_target_becomes_known() {
    let cfg = cfg();
    let cell = Arc::new(SnapshotCell::default());
    let enricher = Enricher::new(cell.clone(), &cfg);
    let metrics = EnrichMetrics::default();
    let req = v1::WriteRequest {
        timeseries: vec![up_series("j0", "h0:80", 1)],
        metadata: vec![],
    };
    let hasher = SeriesHasher::random();
    let record = |enricher: &Enricher| wal_payload(&req, enricher, &hasher, &metrics);
    // Each record also has its ship section, as the receive path writes them.
    let mut b = BatchBuilder::new("a#e", 0, true, hasher);
    let add = |b: &mut BatchBuilder, seq: u64| {
        let payload = record(&enricher);
        b.add_record(seq, KIND_REMOTE_WRITE, PAYLOAD_VERSION, &payload)
            .unwrap();
    };
    add(&mut b, 1);
    assert_eq!(b.batch.new_series.len(), 1);
    assert_eq!(b.copied_records, 0, "a new series: decoded");
    // The same series again, same snapshot: nothing new.
    b.reset();
    add(&mut b, 2);
    assert!(b.batch.new_series.is_empty() && b.batch.new_targets.is_empty());
    assert_eq!(b.batch.sample_refs, vec![0]);
    assert_eq!(b.copied_records, 1);
    // The target becomes known.
    cell.publish(merge(1, &[targets(&[false; 6])], &cfg));
    b.reset();
    add(&mut b, 3);
    assert_eq!(b.batch.new_series.len(), 1, "sent again");
    let s = &b.batch.new_series[0];
    assert_eq!(s.series_ref, 1);
    let t = &b.batch.new_targets[0];
    assert_eq!(s.target_ref, t.target_ref);
    assert!(t
        .tags
        .iter()
        .any(|l| l.name == "pod" && l.value == "pod-0-0"));
    assert_eq!(b.batch.sample_refs, vec![1]);
    assert_eq!(
        (metrics.hits.load(Relaxed), metrics.misses.load(Relaxed)),
        (1, 2)
    );
    // Ship sections written under other keys (before the agent restarted) are not
    // trusted: every record is decoded, and ships the same samples.
    let mut other = BatchBuilder::new("a#e", 0, true, SeriesHasher::random());
    for seq in [10, 11] {
        other.reset();
        add(&mut other, seq);
        assert_eq!(other.copied_records, 0);
        assert_eq!(other.batch.sample_refs, vec![0]);
        assert_eq!(other.batch.sample_ts, b.batch.sample_ts);
    }
}

/// A series without samples ships nothing, so its target is not sent either, also when
/// the record is copied from its ship section (whose copy looks series ahead to
/// prefetch their dictionary slots).
#[test]
fn a_series_without_samples_sends_no_target() {
    let cfg = cfg();
    let cell = Arc::new(SnapshotCell::default());
    cell.publish(merge(1, &[targets(&[false; 6])], &cfg));
    let enricher = Enricher::new(cell.clone(), &cfg);
    let metrics = EnrichMetrics::default();
    let req = v1::WriteRequest {
        timeseries: vec![up_series("j0", "h0:80", 1), up_series("j1", "h1:80", 0)],
        metadata: vec![],
    };
    let hasher = SeriesHasher::random();
    let payload = wal_payload(&req, &enricher, &hasher, &metrics);
    let mut b = BatchBuilder::new("a#e", 0, true, hasher);
    b.add_record(1, KIND_REMOTE_WRITE, PAYLOAD_VERSION, &payload)
        .unwrap();
    assert_eq!(b.copied_records, 0, "a new series: decoded");
    let pods = |b: &BatchBuilder| -> Vec<String> {
        let tags = b.batch.new_targets.iter().flat_map(|t| t.tags.iter());
        tags.filter(|l| l.name == "pod")
            .map(|l| l.value.clone())
            .collect()
    };
    assert_eq!(pods(&b), ["pod-0-0"]);
    b.reset();
    b.add_record(2, KIND_REMOTE_WRITE, PAYLOAD_VERSION, &payload)
        .unwrap();
    assert_eq!(b.copied_records, 1, "every series known: copied");
    assert_eq!(pods(&b), Vec::<String>::new());
    assert_eq!(b.batch.sample_refs, vec![0]);
}
