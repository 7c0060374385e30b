//! Golden ship-protocol frames in `testdata/ship/`: today's encoder reproduces them byte
//! for byte (so any change to the header, the rkyv layout or the snappy framing is
//! caught), each decodes back to the exact fixed values, and every way a frame can be
//! wrong is refused with the precise [`FrameError`].
//!
//! Regenerate with `cargo run -p promgate-proto --example make_ship_golden` only for a
//! deliberate wire-format change (which also needs a `FRAME_VERSION` bump).

#[path = "ship_fixture/mod.rs"]
mod ship_fixture;

use promgate_proto::messages::{histogram, BucketSpan, Histogram};
use promgate_proto::ship::{
    access, check_batch, open_body, split_frame, write_frame, write_message, Ack, ArchivedAck,
    ArchivedHello, ArchivedShipBatch, ArchivedShipError, ArchivedWelcome, FrameError, Hello,
    ShipBatch, ShipError, Welcome, FLAG_SNAPPY, FRAME_BODY_MAX, FRAME_VERSION, HEADER_BYTES,
    KIND_ACK, KIND_BATCH, KIND_ERROR, KIND_HELLO, KIND_WELCOME, MAGIC,
};
use prost::Message;
use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use ship_fixture::{golden_dir, goldens, STALE_NAN};

fn golden(name: &str) -> Vec<u8> {
    let path = golden_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The receiver's path up to the archive: split the stream, check CRC, decompress.
fn open(stream: &[u8]) -> Result<Option<(u8, AlignedVec)>, FrameError> {
    let Some((h, range)) = split_frame(stream)? else {
        return Ok(None);
    };
    let mut body = AlignedVec::new();
    open_body(&h, &stream[range], &mut body)?;
    Ok(Some((h.kind, body)))
}

fn open_complete(stream: &[u8]) -> Result<(u8, AlignedVec), FrameError> {
    Ok(open(stream)?.expect("a complete frame"))
}

/// A plain frame of `kind` around `body` with a correct length and CRC, so that only
/// bytecheck (or `check_batch`) stands between the bytes and the reader.
fn frame_with_valid_crc(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(kind, body, false, &mut out);
    out
}

fn batch_body() -> AlignedVec {
    let (kind, body) = open_complete(&golden("batch_plain.bin")).unwrap();
    assert_eq!(kind, KIND_BATCH);
    body
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{needle:02x?} not in the archive"))
}

#[test]
fn encoding_the_fixed_values_reproduces_the_golden_files_byte_for_byte() {
    let goldens = goldens();
    assert_eq!(goldens.len(), 6);
    for g in &goldens {
        assert!(
            golden(g.file) == g.bytes,
            "{} differs from a fresh encoding: the ship wire format changed \
             (fresh {} bytes, committed {} bytes)",
            g.file,
            g.bytes.len(),
            golden(g.file).len()
        );
    }
    let readme = String::from_utf8(golden("README.md")).unwrap();
    assert_eq!(
        readme,
        ship_fixture::readme(&goldens),
        "testdata/ship/README.md is stale; rerun the make_ship_golden example"
    );
}

#[test]
fn golden_headers_follow_the_documented_layout() {
    for g in goldens() {
        let b = golden(g.file);
        assert_eq!(&b[0..4], &MAGIC, "{}", g.file);
        assert_eq!(&b[0..4], b"PGSF");
        assert_eq!(b[4], FRAME_VERSION);
        assert_eq!(b[5], g.kind);
        let flags = u16::from_le_bytes([b[6], b[7]]);
        let snappy = g.file == "batch_snappy.bin";
        assert_eq!(flags, if snappy { FLAG_SNAPPY } else { 0 }, "{}", g.file);
        let len = u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
        assert_eq!(len, b.len() - HEADER_BYTES, "{}", g.file);
        let crc = u32::from_le_bytes(b[12..16].try_into().unwrap());
        assert_eq!(crc, crc32c::crc32c(&b[HEADER_BYTES..]), "{}", g.file);
        let (h, range) = split_frame(&b).unwrap().unwrap();
        assert_eq!((h.kind, h.flags, h.len, h.crc), (g.kind, flags, len, crc));
        assert_eq!(range, HEADER_BYTES..b.len());
    }
}

#[test]
fn golden_control_frames_decode_to_the_fixed_values() {
    let (kind, body) = open_complete(&golden("hello.bin")).unwrap();
    assert_eq!(kind, KIND_HELLO);
    let a = access::<ArchivedHello>(&body).unwrap();
    assert_eq!(
        rkyv::deserialize::<Hello, RkyvError>(a).unwrap(),
        ship_fixture::hello()
    );

    let (kind, body) = open_complete(&golden("welcome.bin")).unwrap();
    assert_eq!(kind, KIND_WELCOME);
    let a = access::<ArchivedWelcome>(&body).unwrap();
    assert_eq!(
        rkyv::deserialize::<Welcome, RkyvError>(a).unwrap(),
        ship_fixture::welcome()
    );

    let (kind, body) = open_complete(&golden("ack.bin")).unwrap();
    assert_eq!(kind, KIND_ACK);
    let a = access::<ArchivedAck>(&body).unwrap();
    assert_eq!(
        rkyv::deserialize::<Ack, RkyvError>(a).unwrap(),
        ship_fixture::ack()
    );

    let (kind, body) = open_complete(&golden("error.bin")).unwrap();
    assert_eq!(kind, KIND_ERROR);
    let a = access::<ArchivedShipError>(&body).unwrap();
    let e = rkyv::deserialize::<ShipError, RkyvError>(a).unwrap();
    assert_eq!(e, ship_fixture::ship_error());
    assert_eq!(e.code, promgate_proto::ship::code::SEQUENCE);
}

#[test]
fn golden_batches_decode_to_the_fixed_values_plain_and_snappy() {
    let expected = ship_fixture::batch();
    let mut archives = Vec::new();
    for file in ["batch_plain.bin", "batch_snappy.bin"] {
        let (kind, body) = open_complete(&golden(file)).unwrap();
        assert_eq!(kind, KIND_BATCH, "{file}");
        let a = access::<ArchivedShipBatch>(&body).unwrap();
        check_batch(a).unwrap();
        let back = rkyv::deserialize::<ShipBatch, RkyvError>(a).unwrap();
        assert_eq!(back, expected, "{file}");

        // The values the golden batch exists to pin, read straight from the archive.
        assert_eq!(a.agent.as_str(), "agent-01");
        assert_eq!(a.new_series[0].labels[1].value.as_str(), "Zürich–東京");
        assert_eq!(a.new_targets[1].tags[2].value.as_str(), "api-7d9f");
        assert_eq!(a.new_series[2].target_ref.to_native(), 1);
        assert_eq!(a.new_series[2].absent[0].to_native(), 2);
        assert_eq!(a.sample_values[1].to_native(), STALE_NAN);
        let stale = f64::from_bits(a.sample_values[1].to_native());
        assert!(stale.is_nan() && stale.to_bits() == 0x7ff0_0000_0000_0002);
        assert_eq!(a.sample_ts[2].to_native(), -1_000);
        assert_eq!(a.sample_values[3].to_native(), (-0f64).to_bits());
        assert_eq!(
            a.histograms[0].proto.as_slice(),
            ship_fixture::HISTOGRAM_PROTO
        );
        archives.push(body);
    }
    // Snappy is only transport: both files carry the very same archive.
    assert_eq!(archives[0].as_slice(), archives[1].as_slice());

    // The histogram bytes are a real remote_write 1.0 Histogram message.
    let h = Histogram::decode(ship_fixture::HISTOGRAM_PROTO).unwrap();
    assert_eq!(
        h,
        Histogram {
            count: Some(histogram::Count::CountInt(3)),
            sum: 1.5,
            positive_spans: vec![BucketSpan {
                offset: 0,
                length: 1
            }],
            positive_deltas: vec![3],
            timestamp: 1_700_000_000_000,
            ..Default::default()
        }
    );
    assert_eq!(h.encode_to_vec(), ship_fixture::HISTOGRAM_PROTO);
}

#[test]
fn refuses_wrong_magic() {
    let mut f = golden("hello.bin");
    f[0..4].copy_from_slice(b"PGSX");
    assert_eq!(open(&f).unwrap_err(), FrameError::BadMagic(*b"PGSX"));
    // Even a header alone is judged: the receiver need not wait for the body.
    assert_eq!(
        split_frame(&f[..HEADER_BYTES]).unwrap_err(),
        FrameError::BadMagic(*b"PGSX")
    );
    // remote_write's snappy body on the ship port, say.
    let mut f = golden("ack.bin");
    f[0..4].copy_from_slice(&[0xff, 0x06, 0x00, 0x00]);
    assert_eq!(
        open(&f).unwrap_err(),
        FrameError::BadMagic([0xff, 0x06, 0x00, 0x00])
    );
}

#[test]
fn refuses_other_versions() {
    let mut f = golden("batch_plain.bin");
    // Version 1 (before target references), 2 (before durable sequence numbers) and a
    // future 4.
    f[4] = 1;
    assert_eq!(open(&f).unwrap_err(), FrameError::UnsupportedVersion(1));
    f[4] = 2;
    assert_eq!(open(&f).unwrap_err(), FrameError::UnsupportedVersion(2));
    f[4] = 4;
    let e = open(&f).unwrap_err();
    assert_eq!(e, FrameError::UnsupportedVersion(4));
    assert_eq!(e.code(), promgate_proto::ship::code::UNSUPPORTED_VERSION);
    f[4] = 0;
    assert_eq!(open(&f).unwrap_err(), FrameError::UnsupportedVersion(0));
}

#[test]
fn refuses_unknown_flag_bits() {
    for flags in [0x0002u16, 0x0003, 0x8000, 0x8001, 0xffff] {
        let mut f = golden("batch_snappy.bin");
        f[6..8].copy_from_slice(&flags.to_le_bytes());
        assert_eq!(open(&f).unwrap_err(), FrameError::UnknownFlags(flags));
    }
}

#[test]
fn refuses_length_over_the_limit_from_the_header_alone() {
    let mut f = golden("welcome.bin");
    let over = FRAME_BODY_MAX + 1;
    f[8..12].copy_from_slice(&(over as u32).to_le_bytes());
    // Refused before any body arrives, so a liar cannot make the receiver buffer 4 GiB.
    assert_eq!(
        split_frame(&f[..HEADER_BYTES]).unwrap_err(),
        FrameError::TooLarge(over)
    );
    f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        split_frame(&f).unwrap_err(),
        FrameError::TooLarge(u32::MAX as usize)
    );
    // Exactly the limit is allowed; the frame is merely incomplete.
    f[8..12].copy_from_slice(&(FRAME_BODY_MAX as u32).to_le_bytes());
    assert_eq!(split_frame(&f).unwrap(), None);
}

#[test]
fn refuses_crc_mismatch_after_a_body_byte_flips() {
    for file in ["hello.bin", "batch_plain.bin", "batch_snappy.bin"] {
        let orig = golden(file);
        let expected = u32::from_le_bytes(orig[12..16].try_into().unwrap());
        for at in [
            HEADER_BYTES,
            orig.len() / 2 + HEADER_BYTES / 2,
            orig.len() - 1,
        ] {
            let mut f = orig.clone();
            f[at] ^= 0x01;
            let actual = crc32c::crc32c(&f[HEADER_BYTES..]);
            assert_ne!(actual, expected);
            assert_eq!(
                open(&f).unwrap_err(),
                FrameError::Crc { expected, actual },
                "{file} byte {at}"
            );
        }
        // A flipped CRC byte is the same mismatch seen from the other side.
        let mut f = orig.clone();
        f[15] ^= 0x80;
        let e = open(&f).unwrap_err();
        assert!(matches!(e, FrameError::Crc { actual, .. } if actual == expected));
    }
}

#[test]
fn truncated_frames_wait_for_more_bytes() {
    for g in goldens() {
        let f = golden(g.file);
        for cut in [0, 1, HEADER_BYTES - 1, HEADER_BYTES, f.len() - 1] {
            assert_eq!(
                split_frame(&f[..cut]).unwrap(),
                None,
                "{} cut at {cut}",
                g.file
            );
        }
        // Two frames back to back: the first is split off exactly.
        let mut two = f.clone();
        two.extend_from_slice(&golden("ack.bin"));
        let (_, range) = split_frame(&two).unwrap().unwrap();
        assert_eq!(range.end, f.len());
        let (_, range2) = split_frame(&two[range.end..]).unwrap().unwrap();
        assert_eq!(range2.end, golden("ack.bin").len());
    }
}

#[test]
fn refuses_the_snappy_flag_on_a_plain_body() {
    for file in ["hello.bin", "error.bin", "batch_plain.bin"] {
        let mut f = golden(file);
        f[6..8].copy_from_slice(&FLAG_SNAPPY.to_le_bytes());
        // The CRC covers the body as on the wire, not the flags, so it still matches and
        // the snappy decoder is what refuses the archive bytes.
        let e = open(&f).unwrap_err();
        assert!(matches!(e, FrameError::Snappy(_)), "{file}: {e:?}");
        // With the body bit flipped as well the CRC speaks first.
        f[HEADER_BYTES] ^= 0x40;
        let e = open(&f).unwrap_err();
        assert!(matches!(e, FrameError::Crc { .. }), "{file}: {e:?}");
    }
}

#[test]
fn refuses_garbage_behind_a_valid_crc_with_an_archive_error() {
    let root = std::mem::size_of::<ArchivedShipBatch>();
    let body = batch_body();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty body", Vec::new()),
        ("shorter than the root", vec![0u8; root - 8]),
        ("all 0xff", vec![0xff; 608]),
        (
            "the root alone, pointers leave the buffer",
            body[body.len() - root..].to_vec(),
        ),
        ("ascii text", b"PGSF".repeat(152)),
    ];
    // Invalid UTF-8 in the non-ASCII label value: "ü" is c3 bc; c3 -> ff.
    let mut bad_utf8 = body.to_vec();
    let at = find(&bad_utf8, "Zürich".as_bytes()) + 1;
    bad_utf8[at] = 0xff;
    cases.push(("invalid UTF-8 in a label value", bad_utf8));
    // Root fields, found from the archived struct's layout (the root sits at the end).
    let root_at = body.len() - root;
    let field = |off: usize| root_at + off;
    let ts_vec = field(std::mem::offset_of!(ArchivedShipBatch, sample_ts));
    let vals_vec = field(std::mem::offset_of!(ArchivedShipBatch, sample_values));
    let hist_vec = field(std::mem::offset_of!(ArchivedShipBatch, histograms));
    // An ArchivedVec is a 4-byte relative pointer, then a 4-byte length.
    let mut long = body.to_vec();
    long[ts_vec + 4..ts_vec + 8].copy_from_slice(&0x0100_0000u32.to_le_bytes());
    cases.push(("sample_ts claims 16M elements", long));
    let mut long = body.to_vec();
    long[hist_vec + 4..hist_vec + 8].copy_from_slice(&2u32.to_le_bytes());
    cases.push(("histograms claims one element too many", long));
    // Values pointing at the timestamps: both are 8-byte columns of length 4.
    let mut alias = body.to_vec();
    let ts_ptr = i32::from_le_bytes(alias[ts_vec..ts_vec + 4].try_into().unwrap());
    let target = ts_vec as i64 + ts_ptr as i64;
    let new_ptr = (target - vals_vec as i64) as i32;
    alias[vals_vec..vals_vec + 4].copy_from_slice(&new_ptr.to_le_bytes());
    cases.push(("values aliasing timestamps", alias));
    let mut selfp = body.to_vec();
    selfp[ts_vec..ts_vec + 4].copy_from_slice(&0i32.to_le_bytes());
    cases.push(("timestamps pointing into the root", selfp));

    for (what, garbage) in cases {
        let f = frame_with_valid_crc(KIND_BATCH, &garbage);
        let (kind, archive) = open_complete(&f).expect("the CRC matches");
        assert_eq!(kind, KIND_BATCH);
        match access::<ArchivedShipBatch>(&archive) {
            // The message is bytecheck's in debug builds ("invalid UTF-8", "subtree
            // pointer overran range ..."); release builds of rancor carry no detail.
            Err(FrameError::Archive(m)) => assert!(!m.is_empty(), "{what}"),
            Err(other) => panic!("{what}: {other:?}"),
            Ok(a) => panic!("{what}: accepted, agent {:?}", a.agent.as_str()),
        }
    }
}

#[test]
fn refuses_a_batch_whose_sample_columns_differ_in_length() {
    for (column, edit) in [
        (
            "ts",
            (|b: &mut ShipBatch| b.sample_ts.truncate(3)) as fn(&mut ShipBatch),
        ),
        ("values", |b: &mut ShipBatch| b.sample_values.push(0)),
        ("refs", |b: &mut ShipBatch| b.sample_refs.clear()),
    ] {
        let mut b = ship_fixture::batch();
        edit(&mut b);
        for compress in [false, true] {
            let mut f = Vec::new();
            write_message(KIND_BATCH, &b, compress, &mut f);
            let (_, body) = open_complete(&f).unwrap();
            // bytecheck is satisfied: every column is a valid vector on its own.
            let a = access::<ArchivedShipBatch>(&body).unwrap();
            let e = check_batch(a).unwrap_err();
            assert!(
                matches!(&e, FrameError::Batch(m) if m.contains("sample columns differ")),
                "{column}: {e:?}"
            );
            assert_eq!(e.code(), promgate_proto::ship::code::BAD_ARCHIVE);
        }
    }
}

#[test]
fn the_kind_byte_is_the_only_type_tag() {
    // An archive carries no type information: Ack and Welcome are both two u64s, so an
    // ack body validates as a welcome. The receiver must dispatch on the header's kind.
    let (kind, body) = open_complete(&golden("ack.bin")).unwrap();
    assert_eq!(kind, KIND_ACK);
    let w = access::<ArchivedWelcome>(&body).unwrap();
    assert_eq!(w.applied_seq.to_native(), ship_fixture::ack().seq);
    // Types of different shapes do not pass for each other.
    let (_, hello) = open_complete(&golden("hello.bin")).unwrap();
    assert!(matches!(
        access::<ArchivedShipBatch>(&hello),
        Err(FrameError::Archive(_))
    ));
}

#[test]
fn only_the_crc_protects_bytes_outside_the_archive_tree() {
    // bytecheck validates what the root reaches; padding and bytes in front of the
    // archive are never read. A flip there passes bytecheck and check_batch and
    // deserializes to the same value, so only the frame CRC can refuse it.
    let orig = golden("batch_plain.bin");
    let body = batch_body();
    let expected = ship_fixture::batch();
    let invisible: Vec<usize> = (0..body.len())
        .filter(|&i| {
            let mut b = body.clone();
            b[i] ^= 0x01;
            access::<ArchivedShipBatch>(&b).is_ok_and(|a| {
                check_batch(a).is_ok()
                    && rkyv::deserialize::<ShipBatch, RkyvError>(a).unwrap() == expected
            })
        })
        .collect();
    assert!(!invisible.is_empty(), "the golden batch has padding bytes");
    for i in invisible {
        let mut f = orig.clone();
        f[HEADER_BYTES + i] ^= 0x01;
        assert!(matches!(open(&f), Err(FrameError::Crc { .. })), "byte {i}");
    }
    // Junk in front of a valid archive is accepted: the root is found from the end.
    let mut prefixed: AlignedVec = AlignedVec::new();
    prefixed.extend_from_slice(&[0xab; 16]);
    prefixed.extend_from_slice(&body);
    let a = access::<ArchivedShipBatch>(&prefixed).unwrap();
    assert_eq!(
        rkyv::deserialize::<ShipBatch, RkyvError>(a).unwrap(),
        expected
    );
}
