//! `promgate wal inspect`: what each shard's WAL holds, read without modifying anything.
//! `--dump` prints every sample (and native histogram) exactly as it would be shipped.
//! Each record's ship section, when it has one, is checked against its body.

use anyhow::Context;
use promgate_proto::batch::{Count, METADATA_NONE};
use promgate_proto::Decoded;
use promgate_shards::prepared::check_ship_section;
use promgate_shards::ship::replay_payload;
use promgate_shards::wal::format::{self, KIND_REMOTE_WRITE, PAYLOAD_VERSION};
use promgate_shards::wal::storage::{list_segments, load_floor};
use std::io::Write;
use std::path::Path;

#[derive(Default)]
struct Totals {
    records: u64,
    series: u64,
    samples: u64,
    histograms: u64,
    exemplars: u64,
    bytes: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    problems: u64,
}

pub fn run(data_dir: &Path, dump: bool) -> anyhow::Result<bool> {
    let wal_dir = data_dir.join("wal");
    let mut shards: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir(&wal_dir)
        .with_context(|| format!("reading {}", wal_dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("shard-")
                .and_then(|n| n.parse().ok())
                .map(|n| (n, e.path()))
        })
        .collect();
    shards.sort();
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let mut clean = true;
    for (shard, dir) in shards {
        let mut t = Totals::default();
        let mut lines = Vec::new();
        for first in list_segments(&dir)? {
            let path = dir.join(format::segment_file_name(first));
            let data =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            t.bytes += data.len() as u64;
            if data.len() < format::HEADER_BYTES {
                lines.push(format!(
                    "  segment {}: {} bytes, no complete header: never held a record (removed at the next start)",
                    format::segment_file_name(first),
                    data.len()
                ));
                continue;
            }
            let scan = match format::scan(&data) {
                Ok(s) if s.header.first_seq < first => {
                    lines.push(format!(
                        "  segment {}: a spare file whose new header never became durable (it holds only acknowledged records from {}; removed at the next start)",
                        format::segment_file_name(first),
                        s.header.first_seq
                    ));
                    continue;
                }
                Ok(s) if s.header.first_seq != first => {
                    t.problems += 1;
                    lines.push(format!(
                        "  segment {}: unreadable: header says first_seq {}",
                        path.display(),
                        s.header.first_seq
                    ));
                    continue;
                }
                Ok(s) => s,
                Err(e) => {
                    t.problems += 1;
                    lines.push(format!("  segment {}: unreadable: {e}", path.display()));
                    continue;
                }
            };
            let mut seg = Totals::default();
            for r in &scan.records {
                seg.records += 1;
                seg.first_seq.get_or_insert(r.seq);
                seg.last_seq = Some(r.seq);
                if r.kind != KIND_REMOTE_WRITE || r.format == 0 || r.format > PAYLOAD_VERSION {
                    seg.problems += 1;
                    lines.push(format!(
                        "  seq {}: unknown record kind {} format {}",
                        r.seq, r.kind, r.format
                    ));
                    continue;
                }
                let payload = &data[r.payload.0..r.payload.1];
                // The ship section, if any: the shipper sends its columns instead of the
                // body's samples, so it must agree with the body.
                let section = format::RemoteWritePayload::parse(r.format, payload)
                    .and_then(|p| format::ShipSection::parse(p.ship));
                let mut disagrees = None;
                let result = replay_payload(r.format, payload, |d, _| {
                    seg.series += d.batch.series.len() as u64;
                    seg.samples += d.batch.samples.len() as u64;
                    seg.histograms += d.batch.histograms.len() as u64;
                    seg.exemplars += d.batch.exemplars.len() as u64;
                    disagrees = match &section {
                        Ok(Some(s)) => check_ship_section(s, &d).err(),
                        Ok(None) => None,
                        Err(e) => Some(e.clone()),
                    };
                    if dump {
                        dump_batch(&mut out, shard, r.seq, d);
                    }
                });
                if let Err(e) = result {
                    seg.problems += 1;
                    lines.push(format!("  seq {}: payload unreadable: {e}", r.seq));
                } else if let Some(e) = disagrees {
                    seg.problems += 1;
                    lines.push(format!(
                        "  seq {}: ship section does not match the body: {e}",
                        r.seq
                    ));
                }
            }
            lines.push(format!(
                "  segment {}: {} bytes, {} records{}, {} series, {} samples, {} histograms, {} exemplars",
                format::segment_file_name(first),
                data.len(),
                seg.records,
                seg.first_seq.map_or(String::new(), |f| format!(" (seq {f}..{})", seg.last_seq.unwrap_or(f))),
                seg.series,
                seg.samples,
                seg.histograms,
                seg.exemplars
            ));
            for c in &scan.corruption {
                seg.problems += 1;
                lines.push(format!(
                    "  CORRUPT: {} bytes at offset {} (sequence numbers {}..={} lost)",
                    c.bytes, c.offset, c.lost_seqs.0, c.lost_seqs.1
                ));
            }
            if scan.tail_bytes > 0 {
                lines.push(format!(
                    "  tail: {} bytes after offset {} that are no record of this segment (a torn write, a reused file's old records, or the zeros after direct writes; dropped at the next start if this is the newest segment or nothing is missing after it)",
                    scan.tail_bytes, scan.valid_end
                ));
            }
            t.records += seg.records;
            t.series += seg.series;
            t.samples += seg.samples;
            t.histograms += seg.histograms;
            t.exemplars += seg.exemplars;
            t.problems += seg.problems;
            if t.first_seq.is_none() {
                t.first_seq = seg.first_seq;
            }
            t.last_seq = seg.last_seq.or(t.last_seq);
        }
        let floor = load_floor(&dir).map_err(|e| anyhow::anyhow!(e))?;
        clean &= t.problems == 0;
        if !dump {
            writeln!(
                out,
                "shard {shard} ({}): {} records{}, {} series, {} samples, {} histograms, {} exemplars, {} bytes{}{}",
                dir.display(),
                t.records,
                t.first_seq.map_or(String::new(), |f| format!(" (seq {f}..{})", t.last_seq.unwrap_or(f))),
                t.series,
                t.samples,
                t.histograms,
                t.exemplars,
                t.bytes,
                floor.map_or(String::new(), |f| format!(", next seq at least {f}")),
                if t.problems > 0 { format!(", {} PROBLEMS", t.problems) } else { String::new() }
            )?;
            for l in lines {
                writeln!(out, "{l}")?;
            }
        } else {
            for l in lines.iter().filter(|l| {
                l.contains("CORRUPT") || l.contains("unreadable") || l.contains("unknown")
            }) {
                eprintln!("shard {shard}:{l}");
            }
        }
    }
    match out.flush() {
        // `--dump | head` closes the pipe early: not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r?,
    }
    Ok(clean)
}

/// One line per sample: `shard=S seq=N {labels} ts=MS value=V bits=HEX`, and one per
/// native histogram. Labels are printed with Rust string escaping.
fn dump_batch(out: &mut impl Write, shard: u32, seq: u64, d: Decoded<'_>) {
    for s in &d.batch.series {
        let labels = render_labels(d.labels(s.labels));
        for x in d.samples(s) {
            let _ = writeln!(
                out,
                "shard={shard} seq={seq} {labels} ts={} value={} bits={:016x}",
                x.timestamp_ms,
                x.value,
                x.value.to_bits()
            );
        }
        for h in d.histograms(s) {
            let count = match h.count {
                Some(Count::Int(c)) => c.to_string(),
                Some(Count::Float(c)) => c.to_string(),
                None => "-".into(),
            };
            let _ = writeln!(
                out,
                "shard={shard} seq={seq} {labels} ts={} histogram count={count} sum={}",
                h.timestamp_ms, h.sum
            );
        }
        if s.metadata != METADATA_NONE {
            let m = d.batch.metadata[s.metadata as usize];
            let _ = writeln!(
                out,
                "shard={shard} seq={seq} {labels} metadata type={} help={:?}",
                m.kind,
                d.text(m.help)
            );
        }
    }
}

/// `{name="value", ...}` with values escaped as Rust string literals (`{:?}`).
pub fn render_labels<'a>(labels: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let parts: Vec<String> = labels.map(|(n, v)| format!("{n}={v:?}")).collect();
    format!("{{{}}}", parts.join(", "))
}
