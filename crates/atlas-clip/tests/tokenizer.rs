//! `ClipTokenizer` against ids from OpenAI's reference CLIP tokenizer.
//! Fixtures come from tests/fixtures/make_preprocess_reference.py.

use std::io::Read;
use std::path::PathBuf;

use atlas_clip::tokenizer::{pad_to_longest, ClipTokenizer};
use atlas_clip::ClipError;
use candle_core::{DType, Device};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip_tokenizer")
}

fn tokenizer() -> ClipTokenizer {
    let gz = std::fs::read(fixture_dir().join("tokenizer.json.gz")).unwrap();
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut json)
        .unwrap();
    ClipTokenizer::from_bytes(&json).unwrap()
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn matches_openai_reference_ids() {
    let tok = tokenizer();
    let expected = expected();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 24, "only {} cases", cases.len());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&case["ids"]),
            "text {text:?}"
        );
    }
}

/// Inputs where OpenAI's ftfy/html cleanup changes the text: the Rust tokenizer follows
/// tokenizer.json, and the fixture records both id lists.
#[test]
fn documented_disagreements_follow_tokenizer_json() {
    let tok = tokenizer();
    for case in expected()["disagreements"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, ids(&case["tokenizer_json_ids"]), "text {text:?}");
        assert_ne!(
            got,
            ids(&case["openai_ids"]),
            "text {text:?} no longer disagrees"
        );
    }
}

#[test]
fn special_ids() {
    let tok = tokenizer();
    let expected = expected();
    assert_eq!(tok.bos_id() as u64, expected["bos_id"].as_u64().unwrap());
    assert_eq!(tok.eos_id() as u64, expected["eos_id"].as_u64().unwrap());
    assert_eq!(tok.pad_id(), tok.eos_id());
    assert_eq!(tok.max_len(), 77);
    assert_eq!(tok.encode("").unwrap(), vec![tok.bos_id(), tok.eos_id()]);
}

#[test]
fn truncation_keeps_end_of_text() {
    let tok = tokenizer();
    let long = "a photo of a dog ".repeat(40);
    let out = tok.encode(&long).unwrap();
    assert_eq!(out.len(), 77);
    assert_eq!(out[0], tok.bos_id());
    assert_eq!(out[76], tok.eos_id());

    let short = tok.clone().with_max_len(8).encode(&long).unwrap();
    assert_eq!(short.len(), 8);
    assert_eq!(short[..7], out[..7]);
    assert_eq!(short[7], tok.eos_id());
    assert_eq!(
        tok.clone().with_max_len(0).encode(&long).unwrap(),
        vec![tok.bos_id(), tok.eos_id()]
    );
}

#[test]
fn padded_batch_tensor() {
    let tok = tokenizer();
    let texts = ["a photo of a cat.", "a cat", ""];
    let rows = tok.encode_batch(&texts).unwrap();
    let t = tok.encode_padded(&texts, &Device::Cpu).unwrap();
    let longest = rows.iter().map(Vec::len).max().unwrap();
    assert_eq!(t.dims(), &[3, longest]);
    assert_eq!(t.dtype(), DType::U32);
    let got = t.to_vec2::<u32>().unwrap();
    for (row, want) in got.iter().zip(&rows) {
        assert_eq!(&row[..want.len()], &want[..]);
        assert!(row[want.len()..].iter().all(|&id| id == tok.pad_id()));
    }
    assert_eq!(pad_to_longest(&[], 0), (vec![], 0));
    let empty: [&str; 0] = [];
    assert_eq!(
        tok.encode_padded(&empty, &Device::Cpu).unwrap().dims(),
        &[0, 0]
    );
}

#[test]
fn missing_file_names_the_path() {
    let path = fixture_dir().join("no_such_tokenizer.json");
    let err = ClipTokenizer::from_file(&path).unwrap_err();
    assert!(matches!(err, ClipError::File { .. }), "{err:?}");
    assert!(err.to_string().contains("no_such_tokenizer.json"), "{err}");
}

#[test]
fn invalid_json_is_a_tokenizer_error() {
    let err = ClipTokenizer::from_bytes(b"{not json").unwrap_err();
    assert!(matches!(err, ClipError::Tokenizer(_)), "{err:?}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.json");
    std::fs::write(&path, b"{}").unwrap();
    let err = ClipTokenizer::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("broken.json"), "{err}");
}

/// Only the start of a long text is tokenized, and the ids are those of the whole text: a
/// 100,000-character prompt once cost its full length in tokenizing time.
#[test]
fn long_texts_give_the_ids_of_their_start() {
    let tok = tokenizer();
    let words = "a photo of the number seven on a wall, ".repeat(3000);
    let kept = tok.kept_text(&words);
    assert!(kept.len() <= 8 * tok.max_len(), "{}", kept.len());
    let full = tok.encode(&words).unwrap();
    assert_eq!(full.len(), tok.max_len());
    // The same ids as tokenizing a prefix that is plainly long enough, cut between words.
    assert_eq!(full, tok.encode(&words[..390]).unwrap());
    // One word of 100,000 characters: no whitespace to cut at, still bounded.
    let word = "x".repeat(100_000);
    assert!(tok.kept_text(&word).len() <= 8 * tok.max_len());
    assert_eq!(tok.encode(&word).unwrap().len(), tok.max_len());
}
