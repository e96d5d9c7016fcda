//! Replays the committed fuzz corpus fuzz/corpus/image_preprocess through the fuzz target's own
//! body, on stable, at the fuzzing pixel cap and at the default one: no input may panic or take
//! long, every `seed-*` image is preprocessed, and every `hostile-*` file is refused with a
//! message naming the problem. Other files are minimised fuzzer findings: they must not panic.

#[path = "../../../fuzz/src/clip_harness.rs"]
mod harness;

#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

use atlas_clip::preprocess::DEFAULT_MAX_PIXELS;
use corpus_replay::{check, replay};

const EXPECTED: &[(&str, &[&str])] = &[
    ("hostile-empty", &["empty byte slice"]),
    ("hostile-not-an-image", &["unrecognised image format"]),
    ("hostile-gif", &["cannot decode image", "Gif"]),
    ("hostile-truncated-png", &["cannot decode image"]),
    (
        "hostile-truncated-jpeg",
        &["ends before its end-of-image marker", "truncated"],
    ),
    (
        "hostile-truncated-progressive-jpeg",
        &["ends before its end-of-image marker", "truncated"],
    ),
    ("hostile-truncated-webp", &["cannot decode image"]),
    ("hostile-png-signature-only", &["cannot decode image"]),
    ("hostile-jpeg-soi-only", &["cannot decode image"]),
    ("hostile-corrupt-png-crc", &["cannot decode image", "Png"]),
    (
        "hostile-corrupt-jpeg-huffman-table",
        &["cannot decode image", "Jpeg"],
    ),
    ("hostile-corrupt-webp", &["cannot decode image"]),
    (
        "hostile-png-50000x50000",
        &["image is 50000x50000 pixels, more than the"],
    ),
    ("hostile-png-zero-width", &["cannot decode image"]),
    (
        "hostile-jpeg-65535x65535",
        &["image is 65535x65535 pixels, more than the"],
    ),
    ("hostile-jpeg-zero-height", &["cannot decode image"]),
    (
        "hostile-webp-16000x16000",
        &["image is 16000x16000 pixels, more than the"],
    ),
    ("hostile-webp-16384-reads-as-zero", &["image is 0x0 pixels"]),
    (
        "hostile-png-bomb-6000x6000",
        &["image is 6000x6000 pixels, more than the"],
    ),
];

#[test]
fn image_corpus_at_the_fuzzing_cap() {
    let results = replay("image_preprocess", harness::image);
    check("image_preprocess", &results, EXPECTED);
}

#[test]
fn image_corpus_at_the_default_cap() {
    fn body(data: &[u8]) -> Result<(), String> {
        harness::image_with(data, DEFAULT_MAX_PIXELS)
    }
    let results = replay("image_preprocess", body);
    check("image_preprocess", &results, EXPECTED);
}
