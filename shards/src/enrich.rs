//! Enrichment: each series gets **meta tags** from its target in the target-label
//! snapshot, the agent's own tags and **custom tags**, and its labels are split into
//! **target labels** (shared by every series of its target, so they cross the ship link
//! once per target) and **app labels**.
//!
//! The rules, as pure functions of (labels, snapshot, config), tested without a runtime:
//! - a series' target is found by its `job` and `instance` labels ([`enrich`]);
//! - a target's tags ([`target_tags`]) are its meta tags through the [`MetaRule`]s
//!   (defaults: [`EnrichConfig::default_rules`]), then `agent` and `agent_host`, then
//!   the custom tags; the first tag of a name wins, empty values are left out. They are
//!   computed once per snapshot, not per series;
//! - a series with no known target gets the agent and custom tags only ([`base_tags`]);
//! - a tag never overwrites an original label: on a name clash the tag is dropped (the
//!   original wins) and counted;
//! - [`split`] divides a series' labels into the target's pairs it carries and its app
//!   labels, and names the target's labels it does not carry (`honor_labels` can make a
//!   series override one); [`rejoin`] gives back the original set exactly.
//!
//! On the receive path, [`Enricher::section`] runs between decode and WAL: one atomic
//! load of the snapshot per request, then per series a label scan for `job` and
//! `instance`, one borrowed hash lookup (skipped when the series has the same target as
//! the one before), and a merge walk for clashes. It writes the distinct targets of the
//! request, with their labels and tags, into the WAL record (`wal::format`), so the
//! shipper later ships exactly the tags the request was acknowledged with, and each
//! series' target index, so the shipper needs no lookups.

use crate::snapshot::{Labels, Snapshot, SnapshotCell, Target};
use crate::wal::format::{put_pairs, put_series_targets, put_target, NO_TARGET};
use hashbrown::HashMap;
use promgate_proto::Decoded;
use std::cell::RefCell;
use std::cmp::Ordering;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Where a meta tag's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A discovered label of the target (`__meta_kubernetes_pod_name`, ...).
    Discovered(String),
    /// A target label (after relabelling).
    TargetLabel(String),
    /// The host part of the target's `instance` (`10.0.0.7:9100` → `10.0.0.7`).
    InstanceHost,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaRule {
    pub tag: String,
    pub source: Source,
}

#[derive(Clone, Debug, Default)]
pub struct EnrichConfig {
    pub rules: Vec<MetaRule>,
    /// `[enrich.custom_tags]`, sorted by name.
    pub custom_tags: Vec<(String, String)>,
    pub agent: String,
    pub agent_host: String,
}

impl EnrichConfig {
    /// Kubernetes service discovery's pod metadata, and `host` for any discovery.
    pub fn default_rules() -> Vec<MetaRule> {
        let d = |tag: &str, meta: &str| MetaRule {
            tag: tag.into(),
            source: Source::Discovered(meta.into()),
        };
        vec![
            d("pod", "__meta_kubernetes_pod_name"),
            d("pod_ns", "__meta_kubernetes_namespace"),
            d("pod_node", "__meta_kubernetes_pod_node_name"),
            d("pod_ip", "__meta_kubernetes_pod_ip"),
            d("container", "__meta_kubernetes_pod_container_name"),
            d("pod_service", "__meta_kubernetes_service_name"),
            // Kubernetes discovery has no cluster label; clusters are named by a target
            // (or external) label, conventionally `cluster`.
            MetaRule {
                tag: "pod_cluster".into(),
                source: Source::TargetLabel("cluster".into()),
            },
            MetaRule {
                tag: "host".into(),
                source: Source::InstanceHost,
            },
        ]
    }
}

/// What enrichment decided for one series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeriesTags {
    pub target: Option<Arc<Target>>,
    /// Indexes into `target.labels` of the pairs this series does not carry (ascending).
    pub absent: Vec<u16>,
    /// Indexes into the series' labels of its app labels (ascending).
    pub app_labels: Vec<u16>,
    /// Meta, agent and custom tags, sorted by name, none named like an original label.
    pub tags: Vec<(String, String)>,
    /// Tags dropped because an original label has their name.
    pub clashes: u32,
}

/// `10.0.0.7:9100` → `10.0.0.7`; `[::1]:9100` → `::1`; no port: unchanged.
pub fn instance_host(instance: &str) -> &str {
    if let Some(rest) = instance.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match instance.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => instance,
    }
}

fn value_of<'a>(labels: &'a [(String, String)], name: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The tags of a target's series (before clashes with a series' own labels are taken
/// out): its meta tags, then the agent's, then the custom tags; the first of a name
/// wins; sorted by name. `None`: the tags of series with no known target.
pub fn target_tags(target: Option<&Target>, cfg: &EnrichConfig) -> Labels {
    let mut tags: Labels = Vec::new();
    if let Some(t) = target {
        for r in &cfg.rules {
            let v = match &r.source {
                Source::Discovered(name) => value_of(&t.discovered, name),
                Source::TargetLabel(name) => value_of(&t.labels, name),
                Source::InstanceHost => Some(instance_host(&t.instance)),
            };
            if let Some(v) = v {
                tags.push((r.tag.clone(), v.to_string()));
            }
        }
    }
    tags.push(("agent".into(), cfg.agent.clone()));
    tags.push(("agent_host".into(), cfg.agent_host.clone()));
    tags.extend(cfg.custom_tags.iter().cloned());
    merge_tags(tags, &[])
}

/// `first` then `more`, the first tag of each name kept, empty values dropped, sorted.
pub fn merge_tags(first: Labels, more: &[(&str, &str)]) -> Labels {
    let mut seen = std::collections::HashSet::new();
    let mut out: Labels = first
        .into_iter()
        .chain(more.iter().map(|(n, v)| (n.to_string(), v.to_string())))
        .filter(|(n, v)| !v.is_empty() && seen.insert(n.clone()))
        .collect();
    out.sort();
    out
}

/// The tags of series with no known target.
pub fn base_tags(cfg: &EnrichConfig) -> Labels {
    target_tags(None, cfg)
}

/// How many of `tags` (sorted by name) are named like one of `labels` (sorted by name).
pub fn count_clashes<'a>(
    labels: impl Iterator<Item = &'a [u8]>,
    tags: impl Iterator<Item = &'a [u8]>,
) -> u32 {
    let mut labels = labels.peekable();
    let mut n = 0;
    for t in tags {
        while labels
            .next_if(|l| name_cmp(l, t) == Ordering::Less)
            .is_some()
        {}
        if labels
            .peek()
            .is_some_and(|l| name_cmp(l, t) == Ordering::Equal)
        {
            n += 1;
        }
    }
    n
}

/// Byte order of two label names, decided on the first byte when it differs (it
/// usually does) before a `memcmp` call: this runs for every label of every series,
/// where the calls were ~3% of the agent's cycles.
#[inline]
fn name_cmp(a: &[u8], b: &[u8]) -> Ordering {
    match (a.first(), b.first()) {
        (Some(x), Some(y)) if x != y => x.cmp(y),
        _ => a.cmp(b),
    }
}

/// Splits a series' labels (sorted by name) against its target's labels (sorted by
/// name): pushes onto `absent` the indexes of target labels the series does not carry
/// with the same value, and onto `app` the indexes of the series' labels that are not
/// target pairs.
pub fn split<'a, N: AsRef<str> + 'a>(
    labels: &[(&'a str, &'a str)],
    target: impl Iterator<Item = (N, N)>,
    absent: &mut Vec<u16>,
    app: &mut Vec<u16>,
) {
    let mut i = 0;
    for (j, (tn, tv)) in target.enumerate() {
        let (tn, tv) = (tn.as_ref(), tv.as_ref());
        while i < labels.len() && labels[i].0 < tn {
            app.push(i as u16);
            i += 1;
        }
        if i < labels.len() && labels[i].0 == tn {
            if labels[i].1 == tv {
                i += 1;
                continue;
            }
            app.push(i as u16);
            i += 1;
        }
        absent.push(j as u16);
    }
    app.extend((i..labels.len()).map(|i| i as u16));
}

/// Enriches one series (labels sorted by name, as remote_write requires).
pub fn enrich(labels: &[(&str, &str)], snapshot: &Snapshot, cfg: &EnrichConfig) -> SeriesTags {
    let mut out = SeriesTags::default();
    let get = |name: &str| labels.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let target = match (get("job"), get("instance")) {
        (Some(job), Some(instance)) => snapshot.target(job, instance).cloned(),
        _ => None,
    };
    match &target {
        Some(t) => split(
            labels,
            t.labels.iter().map(|(n, v)| (n, v)),
            &mut out.absent,
            &mut out.app_labels,
        ),
        None => out.app_labels = (0..labels.len() as u16).collect(),
    }
    for (n, v) in target_tags(target.as_deref(), cfg) {
        if get(&n).is_some() {
            out.clashes += 1;
        } else {
            out.tags.push((n, v));
        }
    }
    out.target = target;
    out
}

/// The original label set from a split: the target's labels except `absent`, and the
/// app labels, merged in name order.
pub fn rejoin(target: Option<&Target>, absent: &[u16], app: &[(String, String)]) -> Labels {
    let mut out: Labels = app.to_vec();
    if let Some(t) = target {
        out.extend(
            t.labels
                .iter()
                .enumerate()
                .filter(|(i, _)| absent.binary_search(&(*i as u16)).is_err())
                .map(|(_, l)| l.clone()),
        );
    }
    out.sort();
    out
}

/// Enrichment telemetry of one shard: counts of series (one per series per request).
#[derive(Default)]
pub struct EnrichMetrics {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub clashes: AtomicU64,
}

fn text(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap_or("\u{FFFD}")
}

/// One shard's enricher (not shared across threads).
pub struct Enricher {
    cell: Arc<SnapshotCell>,
    base: Labels,
    /// Targets of the current request: pointer → index in `list`.
    seen: RefCell<HashMap<*const Target, u16>>,
    list: RefCell<Vec<Arc<Target>>>,
    /// Per series of the current request: index in `list`, or [`NO_TARGET`].
    per_series: RefCell<Vec<u16>>,
}

impl Enricher {
    pub fn new(cell: Arc<SnapshotCell>, cfg: &EnrichConfig) -> Self {
        Enricher {
            cell,
            base: base_tags(cfg),
            seen: RefCell::default(),
            list: RefCell::default(),
            per_series: RefCell::default(),
        }
    }

    /// Enriches every series of a request against the current snapshot and writes the
    /// enrichment section of its WAL record (`wal::format`) into `out`. `header_tags`
    /// are the tags taken from the request's headers, sorted by name.
    pub fn section(
        &self,
        d: &Decoded<'_>,
        header_tags: &[(&str, &str)],
        metrics: &EnrichMetrics,
        out: &mut Vec<u8>,
    ) {
        let snapshot = self.cell.load();
        let mut seen = self.seen.borrow_mut();
        let mut list = self.list.borrow_mut();
        let mut per_series = self.per_series.borrow_mut();
        seen.clear();
        list.clear();
        per_series.clear();
        let (mut hits, mut misses, mut clashes) = (0u64, 0u64, 0u64);
        // Consecutive series mostly share a target: the last lookup is reused.
        let mut last: Option<(&[u8], &[u8], u16)> = None;
        for s in &d.batch.series {
            // Bytes, not text: the decoder checked UTF-8 already, and comparing names
            // needs no second check.
            let labels = &d.batch.labels[s.labels.range()];
            let (mut job, mut instance) = (None, None);
            for l in labels {
                let n = d.bytes(l.name);
                match name_cmp(n, b"job") {
                    Ordering::Less if n == b"instance" => instance = Some(d.bytes(l.value)),
                    Ordering::Less => {}
                    Ordering::Equal => {
                        job = Some(d.bytes(l.value));
                        break; // names are sorted: `instance` came before
                    }
                    Ordering::Greater => break,
                }
            }
            let ix = match (job, instance) {
                (Some(j), Some(i)) if !snapshot.is_empty() => match last {
                    Some((lj, li, ix)) if lj == j && li == i => ix,
                    _ => {
                        let ix = match snapshot.target(text(j), text(i)) {
                            // (`text` cannot fail: the decoder checked UTF-8.)
                            Some(t) => match seen.get(&Arc::as_ptr(t)) {
                                Some(&ix) => ix,
                                // A request with more distinct targets than a u16 index
                                // holds (absurd) gives the excess series the agent's
                                // tags only.
                                None if list.len() >= usize::from(NO_TARGET) => NO_TARGET,
                                None => {
                                    list.push(t.clone());
                                    let ix = (list.len() - 1) as u16;
                                    seen.insert(Arc::as_ptr(t), ix);
                                    ix
                                }
                            },
                            None => NO_TARGET,
                        };
                        last = Some((j, i, ix));
                        ix
                    }
                },
                _ => NO_TARGET,
            };
            per_series.push(ix);
            let tags = if ix == NO_TARGET {
                misses += 1;
                &self.base
            } else {
                hits += 1;
                &list[usize::from(ix)].tags
            };
            let names = || labels.iter().map(|l| d.bytes(l.name));
            clashes += u64::from(count_clashes(
                names(),
                tags.iter().map(|(n, _)| n.as_bytes()),
            ));
            if !header_tags.is_empty() {
                clashes += u64::from(count_clashes(
                    names(),
                    header_tags.iter().map(|(n, _)| n.as_bytes()),
                ));
            }
        }
        put_pairs(out, self.base.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        put_pairs(out, header_tags.iter().copied());
        out.extend_from_slice(&(list.len() as u32).to_le_bytes());
        for t in list.iter() {
            put_target(out, &t.job, &t.instance, &t.labels, &t.tags);
        }
        put_series_targets(out, &per_series);
        metrics.hits.fetch_add(hits, Relaxed);
        metrics.misses.fetch_add(misses, Relaxed);
        metrics.clashes.fetch_add(clashes, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::merge;
    use proptest::prelude::*;

    fn cfg() -> EnrichConfig {
        EnrichConfig {
            rules: EnrichConfig::default_rules(),
            custom_tags: vec![("region".into(), "eu-1".into())],
            agent: "agent-1".into(),
            agent_host: "node-a".into(),
        }
    }

    fn target(job: &str, instance: &str, extra: &[(&str, &str)]) -> Target {
        let mut labels: Vec<(String, String)> = vec![
            ("instance".into(), instance.into()),
            ("job".into(), job.into()),
        ];
        labels.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        labels.sort();
        Target {
            job: job.into(),
            instance: instance.into(),
            labels,
            discovered: vec![
                ("__meta_kubernetes_namespace".into(), "shop".into()),
                ("__meta_kubernetes_pod_name".into(), "cart-1".into()),
            ],
            scrape_pool: job.into(),
            scrape_interval_ms: 15_000,
            honor_labels: false,
            tags: Labels::new(),
        }
    }

    #[test]
    fn a_known_target_gives_meta_tags_and_originals_win_clashes() {
        let s = merge(
            1,
            &[vec![target("api", "10.1.2.3:8080", &[("cluster", "c1")])]],
            &cfg(),
        );
        let labels = [
            ("__name__", "up"),
            ("instance", "10.1.2.3:8080"),
            ("job", "api"),
            ("pod", "original"),
        ];
        let t = enrich(&labels, &s, &cfg());
        assert!(t.target.is_some());
        let names: Vec<&str> = t.tags.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "agent",
                "agent_host",
                "host",
                "pod_cluster",
                "pod_ns",
                "region"
            ]
        );
        assert_eq!(t.clashes, 1, "`pod` is an original label: it wins");
        assert!(t.tags.contains(&("host".into(), "10.1.2.3".into())));
        assert_eq!(t.absent, vec![0], "the series does not carry cluster");
        assert_eq!(
            t.app_labels,
            vec![0, 3],
            "instance and job are target pairs"
        );
        // No target: agent and custom tags only.
        let t = enrich(&[("__name__", "x"), ("job", "nope")], &s, &cfg());
        assert!(t.target.is_none());
        assert_eq!(t.tags.len(), 3);
    }

    #[test]
    fn hosts_come_out_of_instances() {
        assert_eq!(instance_host("10.0.0.7:9100"), "10.0.0.7");
        assert_eq!(instance_host("[::1]:9100"), "::1");
        assert_eq!(instance_host("node-a"), "node-a");
        assert_eq!(instance_host("fe80::1"), "fe80::1");
    }

    fn label_set() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::btree_map("[a-e]{1,3}", "[x-z]{1,2}", 0..6).prop_map(|m| {
            let mut v: Vec<(String, String)> = m.into_iter().collect();
            v.push(("__name__".into(), "m".into()));
            v.sort();
            v.dedup_by(|a, b| a.0 == b.0);
            v
        })
    }

    proptest! {
        /// Against a set intersection, with names sharing first bytes and prefixes.
        #[test]
        fn clashes_are_the_names_both_sides_have(
            labels in prop::collection::btree_set("[a-d_]{0,3}", 0..12),
            tags in prop::collection::btree_set("[a-d_]{0,3}", 0..6),
        ) {
            let want = tags.intersection(&labels).count() as u32;
            let got = count_clashes(
                labels.iter().map(|n| n.as_bytes()),
                tags.iter().map(|n| n.as_bytes()),
            );
            prop_assert_eq!(got, want);
        }

        #[test]
        fn split_then_rejoin_gives_back_the_original_labels(
            mut series in label_set(),
            target_extra in label_set(),
            known in any::<bool>(),
        ) {
            series.retain(|(n, _)| n != "job" && n != "instance");
            series.push(("instance".into(), "h:1".into()));
            series.push(("job".into(), "j".into()));
            series.sort();
            let extra: Vec<(&str, &str)> = target_extra
                .iter()
                .filter(|(n, _)| n != "job" && n != "instance" && n != "__name__")
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let t = target(if known { "j" } else { "other" }, "h:1", &extra);
            let s = merge(1, &[vec![t]], &cfg());
            let borrowed: Vec<(&str, &str)> =
                series.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let tags = enrich(&borrowed, &s, &cfg());
            prop_assert_eq!(tags.target.is_some(), known);
            let app: Vec<(String, String)> =
                tags.app_labels.iter().map(|&i| series[i as usize].clone()).collect();
            prop_assert_eq!(rejoin(tags.target.as_deref(), &tags.absent, &app), series.clone());
            for (n, _) in &tags.tags {
                prop_assert!(!series.iter().any(|(sn, _)| sn == n), "tag {} shadows a label", n);
            }
            if known {
                // Every rule with a source value and no clash yields its tag.
                prop_assert!(tags.tags.iter().any(|(n, v)| n == "pod" && v == "cart-1") || series.iter().any(|(n, _)| n == "pod"));
                prop_assert!(tags.tags.iter().any(|(n, v)| n == "host" && v == "h") || series.iter().any(|(n, _)| n == "host"));
            }
        }
    }
}
