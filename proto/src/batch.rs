//! The decoded batch: one flat, reusable representation for remote_write 1.0 and 2.0.
//!
//! Nothing here owns a string. Every label name and value is a [`Span`] (offset and
//! length) into the decompressed request body, so decoding copies no label bytes and a
//! [`Batch`] can be cleared and refilled for the next request without freeing its
//! arrays: in steady state a connection decodes with no heap allocation at all.
//! Series, samples, histograms, exemplars and metadata live in flat arrays; a
//! [`Series`] refers to its parts by index ranges ([`Run`]). Later stages (enrich, WAL,
//! ship) read a batch through [`Decoded`], which pairs it with the body it points into.

/// A byte range of the decompressed body. Bodies are capped far below 4 GiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    pub start: u32,
    pub len: u32,
}

impl Span {
    pub fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// An index range into one of the batch's flat arrays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Run {
    pub start: u32,
    pub end: u32,
}

impl Run {
    pub fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
    pub fn len(self) -> usize {
        (self.end - self.start) as usize
    }
    pub fn is_empty(self) -> bool {
        self.start == self.end
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LabelRef {
    pub name: Span,
    pub value: Span,
}

/// Marks a series with no metadata.
pub const METADATA_NONE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Series {
    /// Position of this series in the request (counting refused ones too).
    pub index: u32,
    /// Into [`Batch::labels`]; sorted by name, validated.
    pub labels: Run,
    /// 1.0 only: the body bytes of the series' label fields when they follow each other
    /// with nothing between, which alone determine its labels (so a hash of them
    /// identifies the label set without copying it out). Empty otherwise (2.0, or other
    /// fields between the labels).
    pub label_bytes: Span,
    pub samples: Run,
    pub histograms: Run,
    pub exemplars: Run,
    /// Index into [`Batch::metadata`], or [`METADATA_NONE`].
    pub metadata: u32,
}

/// A float sample. `value` is carried bit for bit: staleness markers and every other
/// NaN payload pass through untouched (no arithmetic is ever done on it).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub timestamp_ms: i64,
    pub value: f64,
    /// 0 when the sender did not set one (2.0 only).
    pub start_timestamp_ms: i64,
}

impl PartialEq for Sample {
    fn eq(&self, other: &Self) -> bool {
        self.timestamp_ms == other.timestamp_ms
            && self.value.to_bits() == other.value.to_bits()
            && self.start_timestamp_ms == other.start_timestamp_ms
    }
}

/// Integer or float count of a native histogram (protobuf oneof).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Count {
    Int(u64),
    Float(f64),
}

impl Default for Count {
    fn default() -> Self {
        Count::Int(0)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketSpan {
    pub offset: i32,
    pub length: u32,
}

/// A native histogram sample. Bucket data lives in the batch's flat arrays.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Histogram {
    pub timestamp_ms: i64,
    pub start_timestamp_ms: i64,
    /// `None` when the sender left the oneof unset.
    pub count: Option<Count>,
    pub sum: f64,
    pub schema: i32,
    pub zero_threshold: f64,
    pub zero_count: Option<Count>,
    pub reset_hint: i32,
    /// Into [`Batch::spans`].
    pub negative_spans: Run,
    /// Into [`Batch::deltas`].
    pub negative_deltas: Run,
    /// Into [`Batch::floats`].
    pub negative_counts: Run,
    pub positive_spans: Run,
    pub positive_deltas: Run,
    pub positive_counts: Run,
    /// Into [`Batch::floats`].
    pub custom_values: Run,
}

impl Histogram {
    pub fn is_float(&self) -> bool {
        matches!(self.count, Some(Count::Float(_)))
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Exemplar {
    /// Into [`Batch::labels`].
    pub labels: Run,
    pub value: f64,
    pub timestamp_ms: i64,
}

/// Metric metadata: request-level in 1.0, per series in 2.0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    /// The 1.0/2.0 metric type number (0 unknown, 1 counter, 2 gauge, 3 histogram,
    /// 4 gauge histogram, 5 summary, 6 info, 7 stateset).
    pub kind: i32,
    /// The metric family name (1.0) or the series' `__name__` (2.0).
    pub family: Span,
    pub help: Span,
    pub unit: Span,
}

/// What the decoder refused, kept beside the valid part of the batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rejected {
    pub series: u32,
    pub samples: u32,
    pub histograms: u32,
    pub exemplars: u32,
    /// A short description of the first offending series, formatted when it was found.
    pub first: Option<String>,
    /// Positions of the refused series in the request, ascending.
    pub indexes: Vec<u32>,
}

/// Which schema a body was decoded with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `prometheus.WriteRequest`.
    V1,
    /// `io.prometheus.write.v2.Request`.
    V2,
}

/// One decoded request. Cleared and refilled per request; its arrays keep their capacity.
#[derive(Debug)]
pub struct Batch {
    pub protocol: Protocol,
    pub series: Vec<Series>,
    pub labels: Vec<LabelRef>,
    pub samples: Vec<Sample>,
    pub histograms: Vec<Histogram>,
    pub spans: Vec<BucketSpan>,
    pub deltas: Vec<i64>,
    pub floats: Vec<f64>,
    pub exemplars: Vec<Exemplar>,
    pub metadata: Vec<Metadata>,
    /// 2.0 only: the symbols table, as spans of the body.
    pub symbols: Vec<Span>,
    pub rejected: Rejected,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            protocol: Protocol::V1,
            series: Vec::new(),
            labels: Vec::new(),
            samples: Vec::new(),
            histograms: Vec::new(),
            spans: Vec::new(),
            deltas: Vec::new(),
            floats: Vec::new(),
            exemplars: Vec::new(),
            metadata: Vec::new(),
            symbols: Vec::new(),
            rejected: Rejected::default(),
        }
    }
}

/// The lengths of every array, to roll back a rejected series.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mark {
    labels: usize,
    samples: usize,
    histograms: usize,
    spans: usize,
    deltas: usize,
    floats: usize,
    exemplars: usize,
    metadata: usize,
}

impl Batch {
    pub fn clear(&mut self) {
        self.series.clear();
        self.labels.clear();
        self.samples.clear();
        self.histograms.clear();
        self.spans.clear();
        self.deltas.clear();
        self.floats.clear();
        self.exemplars.clear();
        self.metadata.clear();
        self.symbols.clear();
        self.rejected = Rejected::default();
    }

    pub(crate) fn mark(&self) -> Mark {
        Mark {
            labels: self.labels.len(),
            samples: self.samples.len(),
            histograms: self.histograms.len(),
            spans: self.spans.len(),
            deltas: self.deltas.len(),
            floats: self.floats.len(),
            exemplars: self.exemplars.len(),
            metadata: self.metadata.len(),
        }
    }

    pub(crate) fn rollback(&mut self, m: Mark) {
        self.labels.truncate(m.labels);
        self.samples.truncate(m.samples);
        self.histograms.truncate(m.histograms);
        self.spans.truncate(m.spans);
        self.deltas.truncate(m.deltas);
        self.floats.truncate(m.floats);
        self.exemplars.truncate(m.exemplars);
        self.metadata.truncate(m.metadata);
    }

    /// Accepted samples, histograms and exemplars (what the Written headers report).
    pub fn counts(&self) -> Counts {
        Counts {
            series: self.series.len() as u64,
            samples: self.samples.len() as u64,
            histograms: self.histograms.len() as u64,
            exemplars: self.exemplars.len() as u64,
            metadata: self.metadata.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty() && self.metadata.is_empty()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub series: u64,
    pub samples: u64,
    pub histograms: u64,
    pub exemplars: u64,
    pub metadata: u64,
}

/// A batch together with the body its spans point into.
#[derive(Clone, Copy)]
pub struct Decoded<'a> {
    pub batch: &'a Batch,
    pub body: &'a [u8],
}

impl<'a> Decoded<'a> {
    pub fn bytes(&self, span: Span) -> &'a [u8] {
        &self.body[span.range()]
    }

    /// The text of a span. Every span the decoder keeps was checked to be UTF-8; the
    /// replacement character only shows if that invariant were broken.
    pub fn text(&self, span: Span) -> &'a str {
        std::str::from_utf8(self.bytes(span)).unwrap_or("\u{FFFD}")
    }

    pub fn labels(&self, run: Run) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let body = self.body;
        let d = Decoded {
            batch: self.batch,
            body,
        };
        let labels: &'a [LabelRef] = &self.batch.labels[run.range()];
        labels
            .iter()
            .map(move |l| (d.text(l.name), d.text(l.value)))
    }

    pub fn samples(&self, s: &Series) -> &'a [Sample] {
        &self.batch.samples[s.samples.range()]
    }

    pub fn histograms(&self, s: &Series) -> &'a [Histogram] {
        &self.batch.histograms[s.histograms.range()]
    }

    pub fn exemplars(&self, s: &Series) -> &'a [Exemplar] {
        &self.batch.exemplars[s.exemplars.range()]
    }
}
