//! The world's tokenizer: a word-level `tokenizer.json` over every word the captions and prompts
//! use (lowercased, split on whitespace and punctuation), with CLIP's `<|startoftext|>` and
//! `<|endoftext|>` as the last ids (so end-of-text pooling finds it, and its id is not 2).

use crate::digits::NAMES as DIGIT_NAMES;
use crate::scene::{BARE_TEMPLATES, COLOURS, COUNTS, OPEN_TEMPLATES, POSITIONS, SHAPES, TEXTURES};
use crate::tasks::task_specs;
use crate::{DemoError, Result};
use atlas_clip::tokenizer::{BOS_TOKEN, EOS_TOKEN};
use serde_json::{json, Value};
use std::collections::BTreeSet;

pub const UNK_TOKEN: &str = "<|unk|>";

/// Words used by the scene captions beyond the attribute names.
const EXTRA_WORDS: &str = "a an the on in of background object objects shape shapes digit \
    number circles squares triangles crosses diamonds";

/// Every word, sorted, without the special tokens.
pub fn words() -> Vec<String> {
    let mut texts: Vec<String> = vec![EXTRA_WORDS.to_string()];
    let lists: [&[&str]; 9] = [
        &COLOURS,
        &SHAPES,
        &TEXTURES,
        &COUNTS,
        &POSITIONS,
        &DIGIT_NAMES,
        &OPEN_TEMPLATES,
        &BARE_TEMPLATES,
        atlas_clip::templates::default_templates(),
    ];
    for list in lists {
        texts.extend(list.iter().map(|s| s.to_string()));
    }
    for spec in task_specs() {
        texts.extend(spec.classes.iter().cloned());
        texts.extend(spec.templates.iter().map(|s| s.to_string()));
    }
    let mut set = BTreeSet::new();
    for t in texts {
        for w in split_words(&t.replace("{}", " ")) {
            set.insert(w);
        }
    }
    set.into_iter().collect()
}

/// Mirrors the pre-tokeniser (`\w+|[^\w\s]+`, after lowercasing).
pub fn split_words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut cur_word = false;
    for ch in text.to_lowercase().chars() {
        if ch.is_whitespace() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        let word = ch.is_alphanumeric() || ch == '_';
        if !cur.is_empty() && word != cur_word {
            out.push(std::mem::take(&mut cur));
        }
        cur_word = word;
        cur.push(ch);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The vocabulary size and the ids of `<|startoftext|>` and `<|endoftext|>`.
pub struct Vocab {
    pub size: usize,
    pub bos: u32,
    pub eos: u32,
    pub json: String,
}

/// Builds the `tokenizer.json` text (and checks that the tokenizers crate reads it).
pub fn tokenizer() -> Result<Vocab> {
    let mut vocab: Vec<String> = words();
    vocab.push(UNK_TOKEN.into());
    vocab.push(BOS_TOKEN.into());
    vocab.push(EOS_TOKEN.into());
    let id = |t: &str| vocab.iter().position(|w| w == t).expect("special token") as u32;
    let (unk, bos, eos) = (id(UNK_TOKEN), id(BOS_TOKEN), id(EOS_TOKEN));
    let map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), json!(i)))
        .collect();
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let piece = |s: &str| json!({"SpecialToken": {"id": s, "type_id": 0}});
    let seq = |s: &str| json!({"Sequence": {"id": s, "type_id": 0}});
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(unk, UNK_TOKEN), special(bos, BOS_TOKEN), special(eos, EOS_TOKEN)],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [piece(BOS_TOKEN), seq("A"), piece(EOS_TOKEN)],
            "pair": [piece(BOS_TOKEN), seq("A"), piece(EOS_TOKEN), seq("B"), piece(EOS_TOKEN)],
            "special_tokens": {
                BOS_TOKEN: {"id": BOS_TOKEN, "ids": [bos], "tokens": [BOS_TOKEN]},
                EOS_TOKEN: {"id": EOS_TOKEN, "ids": [eos], "tokens": [EOS_TOKEN]},
            },
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": map, "unk_token": UNK_TOKEN},
    });
    let json = serde_json::to_string_pretty(&doc).map_err(|e| DemoError::Invalid(e.to_string()))?;
    tokenizers::Tokenizer::from_bytes(json.as_bytes())
        .map_err(|e| DemoError::Invalid(format!("generated tokenizer.json does not load: {e}")))?;
    Ok(Vocab {
        size: vocab.len(),
        bos,
        eos,
        json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use atlas_clip::tokenizer::ClipTokenizer;

    /// The demo world knows a few dozen words and reads every other as unknown: classes it
    /// cannot read, or reads alike, are refused by name instead of splitting probability.
    #[test]
    fn heads_of_unknown_or_alike_classes_are_refused() {
        let v = tokenizer().unwrap();
        let tok = ClipTokenizer::from_bytes(v.json.as_bytes()).unwrap();
        let check = |classes: &[&str]| {
            let classes: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
            atlas_clip::heads::check_distinct(&tok, &classes).map_err(|e| e.to_string())
        };
        let known = &words()[0];
        assert!(check(&[known.as_str(), &words()[1]]).is_ok());
        let e = check(&[known.as_str(), "cat", "dog"]).unwrap_err();
        assert!(e.contains("\"cat\" has no word"), "{e}");
        let (a, b) = (format!("{known} cat"), format!("{known} dog"));
        let e = check(&[&a, &b]).unwrap_err();
        assert!(e.contains(&format!("{a:?} and {b:?} are the same")), "{e}");
    }

    #[test]
    fn splits_like_the_whitespace_pretokenizer() {
        assert_eq!(split_words("A photo of {}."), ["a", "photo", "of", "{}."]);
        assert_eq!(
            split_words("i love my car!"),
            ["i", "love", "my", "car", "!"]
        );
    }

    #[test]
    fn tokenizer_loads_and_knows_every_prompt_word() {
        let v = tokenizer().unwrap();
        let tok = ClipTokenizer::from_bytes(v.json.as_bytes()).unwrap();
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (v.bos, v.eos, v.eos)
        );
        assert_ne!(v.eos, 2);
        let ids = tok
            .encode("A photo of a Red Circle on a checkered background.")
            .unwrap();
        assert_eq!(ids.len(), 13);
        assert_eq!((ids[0], ids[12]), (v.bos, v.eos));
        let unk = (v.size - 3) as u32;
        assert!(!ids.contains(&unk));
        assert!(tok.encode("a zebra").unwrap().contains(&unk));
    }
}
