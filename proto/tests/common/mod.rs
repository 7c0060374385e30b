//! Shared by the decoder tests: an owning view of a decoded batch, built two ways
//! (from the in-place decoder, and from prost's decode of the same bytes).
#![allow(dead_code)]

use promgate_proto::batch::{Count, Decoded};
use promgate_proto::messages::{self, v1, v2};

pub type Labels = Vec<(String, String)>;

#[derive(Debug, PartialEq, Clone)]
pub struct OwnedSeries {
    pub labels: Labels,
    /// (timestamp, value bits, start timestamp)
    pub samples: Vec<(i64, u64, i64)>,
    pub histograms: Vec<String>,
    /// (labels, value bits, timestamp)
    pub exemplars: Vec<(Labels, u64, i64)>,
    /// (type, help, unit) for 2.0 series metadata.
    pub metadata: Option<(i32, String, String)>,
}

pub fn from_batch(d: &Decoded<'_>) -> Vec<OwnedSeries> {
    let b = d.batch;
    b.series
        .iter()
        .map(|s| OwnedSeries {
            labels: d.labels(s.labels).map(|(n, v)| (n.to_owned(), v.to_owned())).collect(),
            samples: d
                .samples(s)
                .iter()
                .map(|x| (x.timestamp_ms, x.value.to_bits(), x.start_timestamp_ms))
                .collect(),
            histograms: d
                .histograms(s)
                .iter()
                .map(|h| {
                    let count = match h.count {
                        None => "none".to_string(),
                        Some(Count::Int(c)) => format!("int:{c}"),
                        Some(Count::Float(c)) => format!("float:{:x}", c.to_bits()),
                    };
                    let zero = match h.zero_count {
                        None => "none".to_string(),
                        Some(Count::Int(c)) => format!("int:{c}"),
                        Some(Count::Float(c)) => format!("float:{:x}", c.to_bits()),
                    };
                    let spans = |r: promgate_proto::batch::Run| {
                        b.spans[r.range()].iter().map(|s| (s.offset, s.length)).collect::<Vec<_>>()
                    };
                    let floats = |r: promgate_proto::batch::Run| {
                        b.floats[r.range()].iter().map(|f| f.to_bits()).collect::<Vec<_>>()
                    };
                    format!(
                        "ts={} count={count} sum={:x} schema={} zt={:x} zero={zero} ns={:?} nd={:?} nc={:?} ps={:?} pd={:?} pc={:?} reset={} cv={:?}",
                        h.timestamp_ms,
                        h.sum.to_bits(),
                        h.schema,
                        h.zero_threshold.to_bits(),
                        spans(h.negative_spans),
                        &b.deltas[h.negative_deltas.range()],
                        floats(h.negative_counts),
                        spans(h.positive_spans),
                        &b.deltas[h.positive_deltas.range()],
                        floats(h.positive_counts),
                        h.reset_hint,
                        floats(h.custom_values),
                    )
                })
                .collect(),
            exemplars: d
                .exemplars(s)
                .iter()
                .map(|e| {
                    (
                        d.labels(e.labels).map(|(n, v)| (n.to_owned(), v.to_owned())).collect(),
                        e.value.to_bits(),
                        e.timestamp_ms,
                    )
                })
                .collect(),
            metadata: (s.metadata != promgate_proto::batch::METADATA_NONE).then(|| {
                let m = b.metadata[s.metadata as usize];
                (m.kind, d.text(m.help).to_owned(), d.text(m.unit).to_owned())
            }),
        })
        .collect()
}

pub fn histogram_string(h: &messages::Histogram) -> String {
    use messages::histogram::{Count as C, ZeroCount as Z};
    let count = match h.count {
        None => "none".to_string(),
        Some(C::CountInt(c)) => format!("int:{c}"),
        Some(C::CountFloat(c)) => format!("float:{:x}", c.to_bits()),
    };
    let zero = match h.zero_count {
        None => "none".to_string(),
        Some(Z::ZeroCountInt(c)) => format!("int:{c}"),
        Some(Z::ZeroCountFloat(c)) => format!("float:{:x}", c.to_bits()),
    };
    let spans =
        |s: &[messages::BucketSpan]| s.iter().map(|s| (s.offset, s.length)).collect::<Vec<_>>();
    let floats = |f: &[f64]| f.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    format!(
        "ts={} count={count} sum={:x} schema={} zt={:x} zero={zero} ns={:?} nd={:?} nc={:?} ps={:?} pd={:?} pc={:?} reset={} cv={:?}",
        h.timestamp,
        h.sum.to_bits(),
        h.schema,
        h.zero_threshold.to_bits(),
        spans(&h.negative_spans),
        h.negative_deltas,
        floats(&h.negative_counts),
        spans(&h.positive_spans),
        h.positive_deltas,
        floats(&h.positive_counts),
        h.reset_hint,
        floats(&h.custom_values),
    )
}

pub fn from_prost_v1(req: &v1::WriteRequest) -> Vec<OwnedSeries> {
    req.timeseries
        .iter()
        .map(|ts| OwnedSeries {
            labels: ts
                .labels
                .iter()
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect(),
            samples: ts
                .samples
                .iter()
                .map(|s| (s.timestamp, s.value.to_bits(), 0))
                .collect(),
            histograms: ts.histograms.iter().map(histogram_string).collect(),
            exemplars: ts
                .exemplars
                .iter()
                .map(|e| {
                    (
                        e.labels
                            .iter()
                            .map(|l| (l.name.clone(), l.value.clone()))
                            .collect(),
                        e.value.to_bits(),
                        e.timestamp,
                    )
                })
                .collect(),
            metadata: None,
        })
        .collect()
}

pub fn from_prost_v2(req: &v2::Request) -> Vec<OwnedSeries> {
    let sym = |r: u32| req.symbols[r as usize].clone();
    let pairs = |refs: &[u32]| {
        refs.chunks(2)
            .map(|p| (sym(p[0]), sym(p[1])))
            .collect::<Vec<_>>()
    };
    req.timeseries
        .iter()
        .map(|ts| OwnedSeries {
            labels: pairs(&ts.labels_refs),
            samples: ts
                .samples
                .iter()
                .map(|s| {
                    let start = if s.start_timestamp != 0 {
                        s.start_timestamp
                    } else {
                        ts.created_timestamp
                    };
                    (s.timestamp, s.value.to_bits(), start)
                })
                .collect(),
            histograms: ts.histograms.iter().map(histogram_string).collect(),
            exemplars: ts
                .exemplars
                .iter()
                .map(|e| (pairs(&e.labels_refs), e.value.to_bits(), e.timestamp))
                .collect(),
            metadata: ts
                .metadata
                .as_ref()
                .map(|m| (m.r#type, sym(m.help_ref), sym(m.unit_ref))),
        })
        .collect()
}

/// A readable rendering of decoded series for golden files.
pub fn render(series: &[OwnedSeries]) -> String {
    let mut out = String::new();
    for s in series {
        let labels: Vec<String> = s.labels.iter().map(|(n, v)| format!("{n}={v:?}")).collect();
        out.push_str(&format!("series {{{}}}\n", labels.join(", ")));
        for (ts, bits, start) in &s.samples {
            out.push_str(&format!(
                "  sample ts={ts} value={} bits={bits:016x} start={start}\n",
                f64::from_bits(*bits)
            ));
        }
        for h in &s.histograms {
            out.push_str(&format!("  histogram {h}\n"));
        }
        for (labels, bits, ts) in &s.exemplars {
            let l: Vec<String> = labels.iter().map(|(n, v)| format!("{n}={v:?}")).collect();
            out.push_str(&format!(
                "  exemplar {{{}}} value={} ts={ts}\n",
                l.join(", "),
                f64::from_bits(*bits)
            ));
        }
        if let Some((kind, help, unit)) = &s.metadata {
            out.push_str(&format!(
                "  metadata type={kind} help={help:?} unit={unit:?}\n"
            ));
        }
    }
    out
}
