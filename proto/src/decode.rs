//! decode: remote_write 1.0 and 2.0 bodies into one [`Batch`], in place, then validate.
//!
//! The body is the already-decompressed protobuf. The decoder walks it once with the
//! borrowing [`Reader`] and records label names and values as spans of the body
//! (1.0) or as the spans of the symbols they reference (2.0), so both protocols end in
//! the same representation and no label byte is copied. Unknown fields of any wire type
//! are skipped.
//!
//! Two kinds of failure, kept apart because they get different answers:
//! - a structural fault (corrupt protobuf, bad UTF-8 in the symbols table or metadata)
//!   fails the whole request: [`DecodeError`], nothing is kept;
//! - an invalid series (missing `__name__`, empty or unsorted or duplicate label names,
//!   bad UTF-8, limits exceeded, out-of-range symbol refs, inconsistent histograms) is
//!   dropped from the batch and counted in [`Batch::rejected`] with a description of the
//!   first one; the valid series are kept, so the caller can write them and still answer
//!   400 (as remote_write 2.0 requires for partial writes).

use crate::batch::{
    Batch, BucketSpan, Count, Exemplar, Histogram, LabelRef, Metadata, Protocol, Run, Sample,
    Series, Span, METADATA_NONE,
};
use crate::wire::{self, Reader, WireError, I64, LEN, VARINT};

/// Per-series limits. Remote-write lets a receiver bound label count and lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub labels_per_series_max: u32,
    pub label_name_bytes_max: u32,
    pub label_value_bytes_max: u32,
    /// The body was decoded and validated before (a WAL record read back by the
    /// shipper): skip the per-series checks (labels, exemplars, histograms). Structure
    /// and UTF-8 of symbols and metadata are still checked; the caller drops the series
    /// that were refused the first time.
    pub trusted: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            labels_per_series_max: 128,
            label_name_bytes_max: 1024,
            label_value_bytes_max: 16 * 1024,
            trusted: false,
        }
    }
}

/// The whole request is unreadable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Wire(WireError),
    /// A string that must be UTF-8 is not (symbols table or metadata).
    InvalidUtf8 {
        what: &'static str,
    },
    /// 2.0: `symbols[0]` must be the empty string.
    FirstSymbolNotEmpty,
    /// 2.0: a request with no series at all.
    Empty,
}

impl From<WireError> for DecodeError {
    fn from(e: WireError) -> Self {
        DecodeError::Wire(e)
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Wire(e) => write!(f, "corrupt protobuf: {e}"),
            DecodeError::InvalidUtf8 { what } => write!(f, "invalid UTF-8 in {what}"),
            DecodeError::FirstSymbolNotEmpty => f.write_str("symbols[0] must be the empty string"),
            DecodeError::Empty => f.write_str("empty request: no timeseries"),
        }
    }
}

/// Why one series was refused; the label for `..._series_rejected_total{reason=...}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    MissingName,
    EmptyLabelName,
    EmptyLabelValue,
    UnsortedLabels,
    DuplicateLabel,
    InvalidUtf8,
    TooManyLabels,
    LabelTooLong,
    SymbolOutOfRange,
    OddLabelRefs,
    SamplesAndHistograms,
    InvalidHistogram,
}

impl Reject {
    pub const ALL: [Reject; 12] = [
        Reject::MissingName,
        Reject::EmptyLabelName,
        Reject::EmptyLabelValue,
        Reject::UnsortedLabels,
        Reject::DuplicateLabel,
        Reject::InvalidUtf8,
        Reject::TooManyLabels,
        Reject::LabelTooLong,
        Reject::SymbolOutOfRange,
        Reject::OddLabelRefs,
        Reject::SamplesAndHistograms,
        Reject::InvalidHistogram,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::MissingName => "missing_name",
            Reject::EmptyLabelName => "empty_label_name",
            Reject::EmptyLabelValue => "empty_label_value",
            Reject::UnsortedLabels => "unsorted_labels",
            Reject::DuplicateLabel => "duplicate_label",
            Reject::InvalidUtf8 => "invalid_utf8",
            Reject::TooManyLabels => "too_many_labels",
            Reject::LabelTooLong => "label_too_long",
            Reject::SymbolOutOfRange => "symbol_out_of_range",
            Reject::OddLabelRefs => "odd_label_refs",
            Reject::SamplesAndHistograms => "samples_and_histograms",
            Reject::InvalidHistogram => "invalid_histogram",
        }
    }
}

/// Counts of rejected series by reason, filled beside [`Batch::rejected`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RejectCounts(pub [u32; Reject::ALL.len()]);

/// The label name every series must carry.
const METRIC_NAME: &[u8] = b"__name__";
/// How much of an offending series the 400 message shows.
const REJECT_MESSAGE_BYTES_MAX: usize = 256;

/// Decodes `body` (decompressed protobuf of `protocol`) into `batch`, which is cleared
/// first. `reasons` accumulates per-reason reject counts.
pub fn decode(
    protocol: Protocol,
    body: &[u8],
    limits: &Limits,
    batch: &mut Batch,
    reasons: &mut RejectCounts,
) -> Result<(), DecodeError> {
    batch.clear();
    batch.protocol = protocol;
    let result = match protocol {
        Protocol::V1 => decode_v1(body, limits, batch, reasons),
        Protocol::V2 => decode_v2(body, limits, batch, reasons),
    };
    if result.is_err() {
        batch.clear();
    }
    result
}

fn decode_v1(
    body: &[u8],
    limits: &Limits,
    batch: &mut Batch,
    reasons: &mut RejectCounts,
) -> Result<(), DecodeError> {
    let mut r = Reader::new(body);
    let mut index = 0u32;
    while !r.at_end() {
        let (field, wt) = r.key()?;
        match field {
            1 => {
                Reader::expect(field, wt, LEN)?;
                let ts = r.message()?;
                v1_series(ts, body, limits, batch, reasons, index)?;
                index += 1;
            }
            3 => {
                Reader::expect(field, wt, LEN)?;
                let m = v1_metadata(r.message()?)?;
                for (span, what) in [
                    (m.family, "metadata name"),
                    (m.help, "metadata help"),
                    (m.unit, "metadata unit"),
                ] {
                    if std::str::from_utf8(&body[span.range()]).is_err() {
                        return Err(DecodeError::InvalidUtf8 { what });
                    }
                }
                batch.metadata.push(m);
            }
            _ => r.skip(field, wt)?,
        }
    }
    Ok(())
}

fn v1_series(
    mut r: Reader<'_>,
    body: &[u8],
    limits: &Limits,
    batch: &mut Batch,
    reasons: &mut RejectCounts,
    index: u32,
) -> Result<(), DecodeError> {
    let mark = batch.mark();
    let labels_start = batch.labels.len() as u32;
    let samples_start = batch.samples.len() as u32;
    // Exemplars and histograms may be interleaved with labels on the wire, and exemplar
    // labels share the label array, so series labels are collected contiguously first
    // by deferring the other parts to a second pass over the same bytes.
    let start = r.snapshot();
    let mut second_pass = false;
    // The label fields' byte range, while each starts where the one before ended.
    let (mut label_bytes, mut contiguous) = (Span::default(), true);
    while !r.at_end() {
        let at = r.offset();
        let (field, wt) = r.key()?;
        match field {
            1 => {
                Reader::expect(field, wt, LEN)?;
                batch.labels.push(v1_label(r.message()?)?);
                if label_bytes.len == 0 {
                    label_bytes.start = at;
                } else if label_bytes.start + label_bytes.len != at {
                    contiguous = false;
                }
                label_bytes.len = r.offset() - label_bytes.start;
            }
            2 => {
                Reader::expect(field, wt, LEN)?;
                batch.samples.push(sample(r.message()?)?);
            }
            _ => {
                second_pass |= field == 3 || field == 4;
                r.skip(field, wt)?
            }
        }
    }
    let labels = Run {
        start: labels_start,
        end: batch.labels.len() as u32,
    };
    let samples = Run {
        start: samples_start,
        end: batch.samples.len() as u32,
    };
    let histograms_start = batch.histograms.len() as u32;
    let exemplars_start = batch.exemplars.len() as u32;
    // The second pass only when there are exemplars or histograms to collect.
    let mut r = if second_pass { start } else { r };
    let mut bad_exemplar: Option<Reject> = None;
    while !r.at_end() {
        let (field, wt) = r.key()?;
        match field {
            3 => {
                Reader::expect(field, wt, LEN)?;
                let mut e = Exemplar::default();
                let el_start = batch.labels.len() as u32;
                let mut m = r.message()?;
                while !m.at_end() {
                    let (f, w) = m.key()?;
                    match f {
                        1 => {
                            Reader::expect(f, w, LEN)?;
                            batch.labels.push(v1_label(m.message()?)?);
                        }
                        2 => {
                            Reader::expect(f, w, I64)?;
                            e.value = f64::from_bits(m.fixed64()?);
                        }
                        3 => {
                            Reader::expect(f, w, VARINT)?;
                            e.timestamp_ms = m.varint()? as i64;
                        }
                        _ => m.skip(f, w)?,
                    }
                }
                e.labels = Run {
                    start: el_start,
                    end: batch.labels.len() as u32,
                };
                if bad_exemplar.is_none() {
                    bad_exemplar =
                        check_exemplar_labels(body, &batch.labels[e.labels.range()]).err();
                }
                batch.exemplars.push(e);
            }
            4 => {
                Reader::expect(field, wt, LEN)?;
                let h = histogram(r.message()?, batch)?;
                batch.histograms.push(h);
            }
            _ => r.skip(field, wt)?,
        }
    }
    let series = Series {
        index,
        labels,
        label_bytes: if contiguous {
            label_bytes
        } else {
            Span::default()
        },
        samples,
        histograms: Run {
            start: histograms_start,
            end: batch.histograms.len() as u32,
        },
        exemplars: Run {
            start: exemplars_start,
            end: batch.exemplars.len() as u32,
        },
        metadata: METADATA_NONE,
    };
    let verdict = if limits.trusted {
        Ok(())
    } else {
        // When the label fields are contiguous and all ASCII (their keys and lengths
        // below 128 are), every name and value is valid UTF-8: one check over the
        // series' label bytes instead of one per label.
        let ascii = contiguous && body[label_bytes.range()].is_ascii();
        check_labels(body, &batch.labels[labels.range()], limits, ascii)
            .and_then(|_| bad_exemplar.map_or(Ok(()), Err))
            .and_then(|_| check_histograms(batch, series.histograms))
    };
    finish_series(body, batch, reasons, mark, series, verdict, index);
    Ok(())
}

/// Field keys of the common shapes: `Label{name = 1, value = 2}` (LEN, LEN) and
/// `Sample{value = 1, timestamp = 2}` (I64, VARINT).
const KEY_1_LEN: u8 = 1 << 3 | LEN;
const KEY_2_LEN: u8 = 2 << 3 | LEN;
const KEY_1_I64: u8 = 1 << 3 | I64;
const KEY_2_VARINT: u8 = 2 << 3 | VARINT;

#[inline]
fn v1_label(mut r: Reader<'_>) -> Result<LabelRef, DecodeError> {
    if let Some((name, value)) = r.two_spans(KEY_1_LEN, KEY_2_LEN) {
        return Ok(LabelRef { name, value });
    }
    let mut l = LabelRef::default();
    while !r.at_end() {
        let (field, wt) = r.key()?;
        match field {
            1 => {
                Reader::expect(field, wt, LEN)?;
                l.name = r.span()?;
            }
            2 => {
                Reader::expect(field, wt, LEN)?;
                l.value = r.span()?;
            }
            _ => r.skip(field, wt)?,
        }
    }
    Ok(l)
}

#[inline]
fn sample(mut r: Reader<'_>) -> Result<Sample, DecodeError> {
    if let Some((value, ts)) = r.fixed64_varint(KEY_1_I64, KEY_2_VARINT) {
        return Ok(Sample {
            value: f64::from_bits(value),
            timestamp_ms: ts as i64,
            ..Sample::default()
        });
    }
    let mut s = Sample::default();
    while !r.at_end() {
        let (field, wt) = r.key()?;
        match field {
            1 => {
                Reader::expect(field, wt, I64)?;
                s.value = f64::from_bits(r.fixed64()?);
            }
            2 => {
                Reader::expect(field, wt, VARINT)?;
                s.timestamp_ms = r.varint()? as i64;
            }
            3 => {
                Reader::expect(field, wt, VARINT)?;
                s.start_timestamp_ms = r.varint()? as i64;
            }
            _ => r.skip(field, wt)?,
        }
    }
    Ok(s)
}

fn v1_metadata(mut r: Reader<'_>) -> Result<Metadata, DecodeError> {
    let mut m = Metadata::default();
    while !r.at_end() {
        let (field, wt) = r.key()?;
        match field {
            1 => {
                Reader::expect(field, wt, VARINT)?;
                m.kind = r.varint()? as i32;
            }
            2 => {
                Reader::expect(field, wt, LEN)?;
                m.family = r.span()?;
            }
            4 => {
                Reader::expect(field, wt, LEN)?;
                m.help = r.span()?;
            }
            5 => {
                Reader::expect(field, wt, LEN)?;
                m.unit = r.span()?;
            }
            _ => r.skip(field, wt)?,
        }
    }
    Ok(m)
}

fn histogram(mut r: Reader<'_>, batch: &mut Batch) -> Result<Histogram, DecodeError> {
    let mut h = Histogram::default();
    // Repeated fields may be split into several occurrences on the wire; each kind is
    // appended to its own array, so collect them per kind in order. A histogram whose
    // repeated fields interleave across kinds (legal but never produced by a real
    // sender) is handled by a pass per kind.
    let start = r.snapshot();
    let mut seen = 0u32;
    while !r.at_end() {
        let (field, wt) = r.key()?;
        match field {
            1 => {
                Reader::expect(field, wt, VARINT)?;
                h.count = Some(Count::Int(r.varint()?));
            }
            2 => {
                Reader::expect(field, wt, I64)?;
                h.count = Some(Count::Float(f64::from_bits(r.fixed64()?)));
            }
            3 => {
                Reader::expect(field, wt, I64)?;
                h.sum = f64::from_bits(r.fixed64()?);
            }
            4 => {
                Reader::expect(field, wt, VARINT)?;
                h.schema = wire::zigzag32(r.varint()?);
            }
            5 => {
                Reader::expect(field, wt, I64)?;
                h.zero_threshold = f64::from_bits(r.fixed64()?);
            }
            6 => {
                Reader::expect(field, wt, VARINT)?;
                h.zero_count = Some(Count::Int(r.varint()?));
            }
            7 => {
                Reader::expect(field, wt, I64)?;
                h.zero_count = Some(Count::Float(f64::from_bits(r.fixed64()?)));
            }
            8..=13 | 16 => {
                seen |= 1 << field;
                r.skip(field, wt)?;
            }
            14 => {
                Reader::expect(field, wt, VARINT)?;
                h.reset_hint = r.varint()? as i32;
            }
            15 => {
                Reader::expect(field, wt, VARINT)?;
                h.timestamp_ms = r.varint()? as i64;
            }
            17 => {
                Reader::expect(field, wt, VARINT)?;
                h.start_timestamp_ms = r.varint()? as i64;
            }
            _ => r.skip(field, wt)?,
        }
    }
    for field in [8u32, 9, 10, 11, 12, 13, 16] {
        if seen & (1 << field) == 0 {
            continue;
        }
        let run = repeated_pass(start.snapshot(), field, batch)?;
        match field {
            8 => h.negative_spans = run,
            9 => h.negative_deltas = run,
            10 => h.negative_counts = run,
            11 => h.positive_spans = run,
            12 => h.positive_deltas = run,
            13 => h.positive_counts = run,
            _ => h.custom_values = run,
        }
    }
    Ok(h)
}

/// Collects every occurrence of one repeated histogram field into its flat array.
fn repeated_pass(mut r: Reader<'_>, want: u32, batch: &mut Batch) -> Result<Run, DecodeError> {
    let start = match want {
        8 | 11 => batch.spans.len(),
        9 | 12 => batch.deltas.len(),
        _ => batch.floats.len(),
    } as u32;
    while !r.at_end() {
        let (field, wt) = r.key()?;
        if field != want {
            r.skip(field, wt)?;
            continue;
        }
        match field {
            8 | 11 => {
                Reader::expect(field, wt, LEN)?;
                let mut m = r.message()?;
                let mut span = BucketSpan::default();
                while !m.at_end() {
                    let (f, w) = m.key()?;
                    match f {
                        1 => {
                            Reader::expect(f, w, VARINT)?;
                            span.offset = wire::zigzag32(m.varint()?);
                        }
                        2 => {
                            Reader::expect(f, w, VARINT)?;
                            span.length = m.varint()? as u32;
                        }
                        _ => m.skip(f, w)?,
                    }
                }
                batch.spans.push(span);
            }
            9 | 12 => r.repeated_varint(field, wt, |v| batch.deltas.push(wire::zigzag64(v)))?,
            _ => r.repeated_double(field, wt, |v| batch.floats.push(v))?,
        }
    }
    let end = match want {
        8 | 11 => batch.spans.len(),
        9 | 12 => batch.deltas.len(),
        _ => batch.floats.len(),
    } as u32;
    Ok(Run { start, end })
}

fn decode_v2(
    body: &[u8],
    limits: &Limits,
    batch: &mut Batch,
    reasons: &mut RejectCounts,
) -> Result<(), DecodeError> {
    // Pass 1: the symbols table, wherever it sits in the body.
    let mut r = Reader::new(body);
    let mut timeseries = 0u32;
    while !r.at_end() {
        let (field, wt) = r.key()?;
        match field {
            4 => {
                Reader::expect(field, wt, LEN)?;
                let span = r.span()?;
                if std::str::from_utf8(&body[span.range()]).is_err() {
                    return Err(DecodeError::InvalidUtf8 { what: "symbols" });
                }
                batch.symbols.push(span);
            }
            5 => {
                Reader::expect(field, wt, LEN)?;
                r.span()?;
                timeseries += 1;
            }
            _ => r.skip(field, wt)?,
        }
    }
    if timeseries == 0 {
        return Err(DecodeError::Empty);
    }
    if batch.symbols.first().is_some_and(|s| s.len != 0) {
        return Err(DecodeError::FirstSymbolNotEmpty);
    }
    // Pass 2: the series.
    let mut r = Reader::new(body);
    let mut index = 0u32;
    while !r.at_end() {
        let (field, wt) = r.key()?;
        if field == 5 {
            v2_series(r.message()?, body, limits, batch, reasons, index)?;
            index += 1;
        } else {
            r.skip(field, wt)?;
        }
    }
    Ok(())
}

fn v2_series(
    mut r: Reader<'_>,
    body: &[u8],
    limits: &Limits,
    batch: &mut Batch,
    reasons: &mut RejectCounts,
    index: u32,
) -> Result<(), DecodeError> {
    let mark = batch.mark();
    let symbols_len = batch.symbols.len() as u64;
    let mut bad: Option<Reject> = None;
    // Label refs first so they are contiguous; refs are resolved to symbol spans.
    let labels_start = batch.labels.len() as u32;
    let mut pairs = RefPairs::default();
    let start = r.snapshot();
    let mut created_timestamp_ms = 0i64;
    while !r.at_end() {
        let (field, wt) = r.key()?;
        match field {
            1 => {
                let (symbols, labels) = (&batch.symbols, &mut batch.labels);
                r.repeated_varint(field, wt, |v| pairs.push(v, symbols, labels, &mut bad))?;
            }
            6 => {
                Reader::expect(field, wt, VARINT)?;
                created_timestamp_ms = r.varint()? as i64;
            }
            _ => r.skip(field, wt)?,
        }
    }
    pairs.finish(&mut bad);
    let labels = Run {
        start: labels_start,
        end: batch.labels.len() as u32,
    };
    let samples_start = batch.samples.len() as u32;
    let histograms_start = batch.histograms.len() as u32;
    let exemplars_start = batch.exemplars.len() as u32;
    let mut metadata: Option<(i32, u64, u64)> = None;
    let mut r = start;
    while !r.at_end() {
        let (field, wt) = r.key()?;
        match field {
            2 => {
                Reader::expect(field, wt, LEN)?;
                let mut s = sample(r.message()?)?;
                if s.start_timestamp_ms == 0 {
                    s.start_timestamp_ms = created_timestamp_ms;
                }
                batch.samples.push(s);
            }
            3 => {
                Reader::expect(field, wt, LEN)?;
                let mut h = histogram(r.message()?, batch)?;
                if h.start_timestamp_ms == 0 {
                    h.start_timestamp_ms = created_timestamp_ms;
                }
                batch.histograms.push(h);
            }
            4 => {
                Reader::expect(field, wt, LEN)?;
                let mut m = r.message()?;
                let mut e = Exemplar::default();
                let el_start = batch.labels.len() as u32;
                let mut el_pairs = RefPairs::default();
                while !m.at_end() {
                    let (f, w) = m.key()?;
                    match f {
                        1 => {
                            let (symbols, labels) = (&batch.symbols, &mut batch.labels);
                            m.repeated_varint(f, w, |v| {
                                el_pairs.push(v, symbols, labels, &mut bad)
                            })?;
                        }
                        2 => {
                            Reader::expect(f, w, I64)?;
                            e.value = f64::from_bits(m.fixed64()?);
                        }
                        3 => {
                            Reader::expect(f, w, VARINT)?;
                            e.timestamp_ms = m.varint()? as i64;
                        }
                        _ => m.skip(f, w)?,
                    }
                }
                el_pairs.finish(&mut bad);
                e.labels = Run {
                    start: el_start,
                    end: batch.labels.len() as u32,
                };
                if bad.is_none() {
                    bad = check_exemplar_labels(body, &batch.labels[e.labels.range()]).err();
                }
                batch.exemplars.push(e);
            }
            5 => {
                Reader::expect(field, wt, LEN)?;
                let mut m = r.message()?;
                // A repeated singular message field merges, as protobuf requires.
                let (mut kind, mut help, mut unit) = metadata.unwrap_or((0, 0, 0));
                while !m.at_end() {
                    let (f, w) = m.key()?;
                    match f {
                        1 => {
                            Reader::expect(f, w, VARINT)?;
                            kind = m.varint()? as i32;
                        }
                        3 => {
                            Reader::expect(f, w, VARINT)?;
                            help = m.varint()?;
                        }
                        4 => {
                            Reader::expect(f, w, VARINT)?;
                            unit = m.varint()?;
                        }
                        _ => m.skip(f, w)?,
                    }
                }
                metadata = Some((kind, help, unit));
            }
            _ => r.skip(field, wt)?,
        }
    }
    let mut series = Series {
        index,
        labels,
        label_bytes: Span::default(),
        samples: Run {
            start: samples_start,
            end: batch.samples.len() as u32,
        },
        histograms: Run {
            start: histograms_start,
            end: batch.histograms.len() as u32,
        },
        exemplars: Run {
            start: exemplars_start,
            end: batch.exemplars.len() as u32,
        },
        metadata: METADATA_NONE,
    };
    if let Some((kind, help, unit)) = metadata {
        if help >= symbols_len || unit >= symbols_len {
            bad.get_or_insert(Reject::SymbolOutOfRange);
        } else {
            series.metadata = batch.metadata.len() as u32;
            let family = name_of(body, &batch.labels[labels.range()]).unwrap_or_default();
            batch.metadata.push(Metadata {
                kind,
                family,
                help: batch.symbols[help as usize],
                unit: batch.symbols[unit as usize],
            });
        }
    }
    if !series.samples.is_empty() && !series.histograms.is_empty() {
        bad.get_or_insert(Reject::SamplesAndHistograms);
    }
    let verdict = match bad {
        _ if limits.trusted => Ok(()),
        Some(reason) => Err(reason),
        None => check_labels(body, &batch.labels[labels.range()], limits, true)
            .and_then(|_| check_histograms(batch, series.histograms)),
    };
    finish_series(body, batch, reasons, mark, series, verdict, index);
    Ok(())
}

/// Turns a 2.0 `labels_refs` stream (name, value, name, value, ...) into label spans.
#[derive(Default)]
struct RefPairs {
    name: Option<Span>,
    odd: bool,
}

impl RefPairs {
    #[inline]
    fn push(
        &mut self,
        r: u64,
        symbols: &[Span],
        labels: &mut Vec<LabelRef>,
        bad: &mut Option<Reject>,
    ) {
        let span = match usize::try_from(r).ok().and_then(|i| symbols.get(i)) {
            Some(s) => *s,
            None => {
                bad.get_or_insert(Reject::SymbolOutOfRange);
                Span::default()
            }
        };
        match self.name.take() {
            None => self.name = Some(span),
            Some(name) => labels.push(LabelRef { name, value: span }),
        }
        self.odd = !self.odd;
    }

    /// A name without its value is refused.
    fn finish(self, bad: &mut Option<Reject>) {
        if self.odd {
            bad.get_or_insert(Reject::OddLabelRefs);
        }
    }
}

fn name_of(body: &[u8], labels: &[LabelRef]) -> Option<Span> {
    labels
        .iter()
        .find(|l| &body[l.name.range()] == METRIC_NAME)
        .map(|l| l.value)
}

/// Keeps a valid series, or rolls the batch back and records why it was refused.
fn finish_series(
    body: &[u8],
    batch: &mut Batch,
    reasons: &mut RejectCounts,
    mark: crate::batch::Mark,
    series: Series,
    verdict: Result<(), Reject>,
    index: u32,
) {
    match verdict {
        Ok(()) => batch.series.push(Series { index, ..series }),
        Err(reason) => {
            let rj = &mut batch.rejected;
            rj.series += 1;
            rj.samples += series.samples.len() as u32;
            rj.histograms += series.histograms.len() as u32;
            rj.exemplars += series.exemplars.len() as u32;
            rj.indexes.push(index);
            reasons.0[reason as usize] += 1;
            if rj.first.is_none() {
                rj.first = Some(describe(
                    body,
                    &batch.labels[series.labels.range()],
                    reason,
                    index,
                ));
            }
            batch.rollback(mark);
        }
    }
}

fn describe(body: &[u8], labels: &[LabelRef], reason: Reject, index: u32) -> String {
    let mut s = format!("series {index} ");
    s.push('{');
    for (i, l) in labels.iter().enumerate() {
        if s.len() > REJECT_MESSAGE_BYTES_MAX {
            s.push_str(", ...");
            break;
        }
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&String::from_utf8_lossy(&body[l.name.range()]));
        s.push_str("=\"");
        s.push_str(
            &String::from_utf8_lossy(&body[l.value.range()])
                .escape_debug()
                .to_string(),
        );
        s.push('"');
    }
    s.push_str("}: ");
    s.push_str(match reason {
        Reject::MissingName => "no __name__ label",
        Reject::EmptyLabelName => "empty label name",
        Reject::EmptyLabelValue => "empty label value",
        Reject::UnsortedLabels => "label names not sorted",
        Reject::DuplicateLabel => "duplicate label name",
        Reject::InvalidUtf8 => "label is not valid UTF-8",
        Reject::TooManyLabels => "too many labels",
        Reject::LabelTooLong => "label name or value too long",
        Reject::SymbolOutOfRange => "symbol reference out of range",
        Reject::OddLabelRefs => "odd number of label references",
        Reject::SamplesAndHistograms => "both samples and histograms",
        Reject::InvalidHistogram => "histogram count or buckets inconsistent",
    });
    s
}

/// Series labels: `__name__` present, names and values non-empty, names strictly
/// increasing (sorted and unique), UTF-8, within limits.
/// `utf8_checked`: the spans are already known to be UTF-8 (2.0 symbols are checked
/// once each when the table is read, instead of once per use; a 1.0 series' label
/// fields once together when they are all ASCII).
fn check_labels(
    body: &[u8],
    labels: &[LabelRef],
    limits: &Limits,
    utf8_checked: bool,
) -> Result<(), Reject> {
    if labels.len() > limits.labels_per_series_max as usize {
        return Err(Reject::TooManyLabels);
    }
    let mut has_name = false;
    let mut prev: &[u8] = &[];
    for (i, l) in labels.iter().enumerate() {
        let name = &body[l.name.range()];
        let value = &body[l.value.range()];
        if name.is_empty() {
            return Err(Reject::EmptyLabelName);
        }
        if value.is_empty() {
            return Err(Reject::EmptyLabelValue);
        }
        if l.name.len > limits.label_name_bytes_max || l.value.len > limits.label_value_bytes_max {
            return Err(Reject::LabelTooLong);
        }
        if i > 0 {
            // Most neighbours differ in their first byte: decide on it without a
            // memcmp call (names are non-empty here).
            let order = match prev[0].cmp(&name[0]) {
                std::cmp::Ordering::Equal => prev.cmp(name),
                o => o,
            };
            match order {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => return Err(Reject::DuplicateLabel),
                std::cmp::Ordering::Greater => return Err(Reject::UnsortedLabels),
            }
        }
        if name == METRIC_NAME {
            has_name = true;
        }
        if !(utf8_checked || ascii_pair(body, l) || is_utf8(name) && is_utf8(value)) {
            return Err(Reject::InvalidUtf8);
        }
        prev = name;
    }
    if !has_name {
        return Err(Reject::MissingName);
    }
    Ok(())
}

/// A 1.0 label is written name first, then value, a key byte and a length between
/// them: when all of `name..=value` is ASCII (lengths below 128 are), both are valid
/// UTF-8, found with one check instead of two.
#[inline]
fn ascii_pair(body: &[u8], l: &LabelRef) -> bool {
    let (start, end) = (l.name.start as usize, l.value.range().end);
    l.value.start > l.name.start && end - start <= 256 && body[start..end].is_ascii()
}

/// Label text is nearly always ASCII; checking that first is cheaper than a full UTF-8
/// validation call per short string.
#[inline]
fn is_utf8(b: &[u8]) -> bool {
    b.is_ascii() || std::str::from_utf8(b).is_ok()
}

/// Exemplar labels may be empty as a set, but each must be a proper UTF-8 pair.
fn check_exemplar_labels(body: &[u8], labels: &[LabelRef]) -> Result<(), Reject> {
    for l in labels {
        let name = &body[l.name.range()];
        if name.is_empty() {
            return Err(Reject::EmptyLabelName);
        }
        if std::str::from_utf8(name).is_err()
            || std::str::from_utf8(&body[l.value.range()]).is_err()
        {
            return Err(Reject::InvalidUtf8);
        }
    }
    Ok(())
}

/// Custom-bucket schema (explicit bucket bounds in `custom_values`).
const SCHEMA_CUSTOM: i32 = -53;
const SCHEMA_EXPONENTIAL_MIN: i32 = -4;
const SCHEMA_EXPONENTIAL_MAX: i32 = 8;

fn check_histograms(batch: &Batch, run: Run) -> Result<(), Reject> {
    for h in &batch.histograms[run.range()] {
        check_histogram(batch, h).map_err(|_| Reject::InvalidHistogram)?;
    }
    Ok(())
}

/// The consistency rules Prometheus applies to a native histogram before storing it.
fn check_histogram(batch: &Batch, h: &Histogram) -> Result<(), ()> {
    let custom = h.schema == SCHEMA_CUSTOM;
    if !custom && !(SCHEMA_EXPONENTIAL_MIN..=SCHEMA_EXPONENTIAL_MAX).contains(&h.schema) {
        return Err(());
    }
    let neg_spans = &batch.spans[h.negative_spans.range()];
    let pos_spans = &batch.spans[h.positive_spans.range()];
    let custom_values = &batch.floats[h.custom_values.range()];
    if custom {
        let zero = match h.zero_count {
            None | Some(Count::Int(0)) => true,
            Some(Count::Float(z)) => z == 0.0,
            Some(Count::Int(_)) => false,
        };
        if !neg_spans.is_empty()
            || !h.negative_deltas.is_empty()
            || !h.negative_counts.is_empty()
            || !zero
            || custom_values
                .windows(2)
                .any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
        {
            return Err(());
        }
        // Spans index into the bounds, plus one implicit +Inf bucket at index len.
        let mut next: i64 = 0;
        for s in pos_spans {
            if s.offset < 0 {
                return Err(());
            }
            next += i64::from(s.offset) + i64::from(s.length);
        }
        if next > custom_values.len() as i64 + 1 {
            return Err(());
        }
    } else if !custom_values.is_empty() {
        return Err(());
    }
    for spans in [neg_spans, pos_spans] {
        if spans.iter().skip(1).any(|s| s.offset < 0) {
            return Err(());
        }
    }
    let buckets = |spans: &[BucketSpan]| spans.iter().map(|s| u64::from(s.length)).sum::<u64>();
    if h.is_float() {
        if !h.negative_deltas.is_empty() || !h.positive_deltas.is_empty() {
            return Err(());
        }
        let neg = &batch.floats[h.negative_counts.range()];
        let pos = &batch.floats[h.positive_counts.range()];
        if buckets(neg_spans) != neg.len() as u64 || buckets(pos_spans) != pos.len() as u64 {
            return Err(());
        }
        if neg.iter().chain(pos).any(|c| *c < 0.0) {
            return Err(());
        }
        let zero = match h.zero_count {
            Some(Count::Float(z)) => z,
            Some(Count::Int(z)) => z as f64,
            None => 0.0,
        };
        let total: f64 = zero + neg.iter().sum::<f64>() + pos.iter().sum::<f64>();
        let count = match h.count {
            Some(Count::Float(c)) => c,
            _ => 0.0,
        };
        if !h.sum.is_nan() && !count.is_nan() && total > count {
            return Err(());
        }
    } else {
        if !h.negative_counts.is_empty() || !h.positive_counts.is_empty() {
            return Err(());
        }
        let neg = &batch.deltas[h.negative_deltas.range()];
        let pos = &batch.deltas[h.positive_deltas.range()];
        if buckets(neg_spans) != neg.len() as u64 || buckets(pos_spans) != pos.len() as u64 {
            return Err(());
        }
        let absolute = |deltas: &[i64]| -> Result<u64, ()> {
            let mut current: i64 = 0;
            let mut total: u64 = 0;
            for d in deltas {
                current = current.checked_add(*d).ok_or(())?;
                if current < 0 {
                    return Err(());
                }
                total = total.checked_add(current as u64).ok_or(())?;
            }
            Ok(total)
        };
        let zero = match h.zero_count {
            Some(Count::Int(z)) => z,
            None => 0,
            Some(Count::Float(_)) => return Err(()),
        };
        let total = absolute(neg)?
            .checked_add(absolute(pos)?)
            .and_then(|t| t.checked_add(zero))
            .ok_or(())?;
        let count = match h.count {
            Some(Count::Int(c)) => c,
            _ => 0,
        };
        if h.sum.is_nan() {
            if total > count {
                return Err(());
            }
        } else if total != count {
            return Err(());
        }
    }
    Ok(())
}
