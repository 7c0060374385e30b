//! Enrichment of one series from the target-label snapshot: a pure function of the
//! series' labels, the [`Snapshot`] and the [`EnrichConfig`], so it is tested
//! exhaustively without a runtime.
//!
//! For each series:
//! - its target is found by its `job` and `instance` labels;
//! - **meta tags** come from the target through [`MetaRule`]s (defaults:
//!   [`EnrichConfig::default_rules`]), plus the agent's own `agent` and `agent_host`;
//! - **custom tags** come from the configuration;
//! - its labels are split into **target labels** (pairs the target itself has, shared by
//!   every series of the target, so they can cross the wire once per target) and **app
//!   labels** (the rest); [`rejoin`] gives back the original set exactly.
//!
//! A tag never overwrites an original label: on a name clash the tag is dropped and
//! counted. Series with no known target keep the agent and custom tags only.
//!
//! Status: the function and its tests are here; calling it between decode and WAL and
//! carrying its result on the ship link are the next step of issue 5.

use crate::snapshot::{Snapshot, Target};
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

#[derive(Clone, Debug)]
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
    /// Indexes into `target.labels` of the pairs this series carries (ascending).
    pub target_labels: Vec<u16>,
    /// Indexes into the series' labels of the others (ascending).
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

/// Enriches one series (labels sorted by name, as remote_write requires).
pub fn enrich(labels: &[(&str, &str)], snapshot: &Snapshot, cfg: &EnrichConfig) -> SeriesTags {
    let mut out = SeriesTags::default();
    let get = |name: &str| labels.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let target = match (get("job"), get("instance")) {
        (Some(job), Some(instance)) => snapshot.target(job, instance).cloned(),
        _ => None,
    };
    let mut tags: Vec<(String, String)> = Vec::new();
    if let Some(t) = &target {
        for (i, (n, v)) in labels.iter().enumerate() {
            match t.labels.iter().position(|(tn, tv)| tn == n && tv == v) {
                Some(j) => out.target_labels.push(j as u16),
                None => out.app_labels.push(i as u16),
            }
        }
        out.target_labels.sort_unstable();
        for r in &cfg.rules {
            let v = match &r.source {
                Source::Discovered(name) => value_of(&t.discovered, name),
                Source::TargetLabel(name) => value_of(&t.labels, name),
                Source::InstanceHost => Some(instance_host(&t.instance)),
            };
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                tags.push((r.tag.clone(), v.to_string()));
            }
        }
    } else {
        out.app_labels = (0..labels.len() as u16).collect();
    }
    tags.push(("agent".into(), cfg.agent.clone()));
    tags.push(("agent_host".into(), cfg.agent_host.clone()));
    tags.extend(cfg.custom_tags.iter().cloned());
    // Originals win; among tags, the first rule for a name wins.
    let mut seen = std::collections::HashSet::new();
    for (n, v) in tags {
        if v.is_empty() || !seen.insert(n.clone()) {
            continue;
        }
        if get(&n).is_some() {
            out.clashes += 1;
            continue;
        }
        out.tags.push((n, v));
    }
    out.tags.sort();
    out.target = target;
    out
}

/// The original label set from a split: the target's pairs and the app labels, merged
/// in name order.
pub fn rejoin(
    target: Option<&Target>,
    target_labels: &[u16],
    app: &[(String, String)],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = app.to_vec();
    if let Some(t) = target {
        out.extend(target_labels.iter().map(|&i| t.labels[i as usize].clone()));
    }
    out.sort();
    out
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
        }
    }

    #[test]
    fn a_known_target_gives_meta_tags_and_originals_win_clashes() {
        let s = merge(
            1,
            &[vec![target("api", "10.1.2.3:8080", &[("cluster", "c1")])]],
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
        assert_eq!(
            t.target_labels,
            vec![1, 2],
            "instance and job are target pairs"
        );
        assert_eq!(t.app_labels, vec![0, 3]);
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
            let s = merge(1, &[vec![t]]);
            let borrowed: Vec<(&str, &str)> =
                series.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let tags = enrich(&borrowed, &s, &cfg());
            prop_assert_eq!(tags.target.is_some(), known);
            let app: Vec<(String, String)> =
                tags.app_labels.iter().map(|&i| series[i as usize].clone()).collect();
            prop_assert_eq!(rejoin(tags.target.as_deref(), &tags.target_labels, &app), series.clone());
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
