//! Golden bodies in `testdata/remote_write/` decode to the reviewed expectations beside
//! them, and the in-place decoder agrees with prost on every one of them.
//!
//! `PROMGATE_BLESS=1 cargo test -p promgate-proto --test golden` rewrites the `.txt`
//! expectations; review the diff before committing it.

mod common;

use promgate_proto::messages::{v1, v2};
use promgate_proto::{decode, Batch, Decoded, Limits, Protocol, RejectCounts};
use prost::Message;

fn golden_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/remote_write")
}

#[test]
fn golden_bodies_decode_to_expected_series() {
    let mut names: Vec<_> = std::fs::read_dir(golden_dir())
        .expect("testdata/remote_write exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    names.sort();
    assert!(names.len() >= 6, "golden bodies missing: {names:?}");
    let bless = std::env::var_os("PROMGATE_BLESS").is_some();
    for path in names {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let protocol = if stem.starts_with("v2_") {
            Protocol::V2
        } else {
            Protocol::V1
        };
        let compressed = std::fs::read(&path).unwrap();
        let raw = snap::raw::Decoder::new()
            .decompress_vec(&compressed)
            .expect("golden body is snappy");
        let mut batch = Batch::default();
        let mut reasons = RejectCounts::default();
        decode(protocol, &raw, &Limits::default(), &mut batch, &mut reasons)
            .expect("golden body decodes");
        let decoded = Decoded {
            batch: &batch,
            body: &raw,
        };
        let series = common::from_batch(&decoded);
        let mut text = common::render(&series);
        for m in &batch.metadata {
            text.push_str(&format!(
                "metadata type={} family={:?} help={:?} unit={:?}\n",
                m.kind,
                decoded.text(m.family),
                decoded.text(m.help),
                decoded.text(m.unit)
            ));
        }
        let rj = &batch.rejected;
        text.push_str(&format!(
            "rejected series={} samples={} histograms={} exemplars={} first={:?}\n",
            rj.series, rj.samples, rj.histograms, rj.exemplars, rj.first
        ));
        let expected_path = path.with_extension("txt");
        if bless {
            std::fs::write(&expected_path, &text).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("missing {}", expected_path.display()));
        assert_eq!(text, expected, "golden body {stem} decoded differently");

        // The same bytes through prost: every series the decoder kept appears there
        // identically, and the kept plus rejected series account for all of prost's.
        let reference = match protocol {
            Protocol::V1 => common::from_prost_v1(&v1::WriteRequest::decode(&raw[..]).unwrap()),
            Protocol::V2 => {
                let req = v2::Request::decode(&raw[..]).unwrap();
                // prost cannot resolve out-of-range refs; keep only resolvable series.
                let n = req.symbols.len() as u32;
                let ok = v2::Request {
                    symbols: req.symbols.clone(),
                    timeseries: req
                        .timeseries
                        .iter()
                        .filter(|t| {
                            t.labels_refs.iter().all(|r| *r < n) && t.labels_refs.len() % 2 == 0
                        })
                        .cloned()
                        .collect(),
                };
                common::from_prost_v2(&ok)
            }
        };
        for s in &series {
            assert!(
                reference.contains(s),
                "{stem}: decoder kept a series prost does not have: {s:?}"
            );
        }
        let total = match protocol {
            Protocol::V1 => v1::WriteRequest::decode(&raw[..]).unwrap().timeseries.len(),
            Protocol::V2 => v2::Request::decode(&raw[..]).unwrap().timeseries.len(),
        };
        assert_eq!(
            series.len() + rj.series as usize,
            total,
            "{stem}: series unaccounted for"
        );
    }
}
