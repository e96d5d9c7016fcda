//! CLIP text tokenizer over a Hugging Face `tokenizer.json` (byte-level BPE with `</w>`).
//!
//! `encode` gives `<|startoftext|> … <|endoftext|>`, cutting the text so the whole sequence
//! fits `max_len` (77 by default) with `<|endoftext|>` kept last, like OpenAI's
//! `clip.tokenize` and transformers' `CLIPTokenizer(truncation=True, max_length=77)`.
//!
//! The tokenizer.json pipeline normalises with NFC + whitespace collapsing + lowercasing.
//! OpenAI's Python tokenizer also runs `ftfy.fix_text` and `html.unescape`, so ids differ on
//! text those would change (HTML entities, curly quotes, ligatures, fullwidth letters,
//! mojibake); see tests/fixtures/clip_tokenizer/expected.json.

use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

use crate::{ClipError, Result};

/// OpenAI CLIP's context length.
pub const DEFAULT_MAX_LEN: usize = 77;
pub const BOS_TOKEN: &str = "<|startoftext|>";
pub const EOS_TOKEN: &str = "<|endoftext|>";

#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    /// The id unknown words become, for vocabularies that have one (word-level ones do; CLIP's
    /// byte-level BPE knows every byte and has none).
    unk: Option<u32>,
    max_len: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Load a `tokenizer.json`; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ClipError::file(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| ClipError::file(path, e))
    }

    /// Parse the contents of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut inner = Tokenizer::from_bytes(bytes)
            .map_err(|e| ClipError::Tokenizer(format!("invalid tokenizer.json: {e}")))?;
        // Truncation and padding are done here, so any settings in the file must not apply.
        inner
            .with_truncation(None)
            .map_err(|e| ClipError::Tokenizer(format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| ClipError::Tokenizer(format!("tokenizer.json has no {token} token")))
        };
        let (bos, eos) = (id(BOS_TOKEN)?, id(EOS_TOKEN)?);
        let unk = serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| v["model"]["unk_token"].as_str().map(str::to_string))
            .and_then(|t| inner.token_to_id(&t));
        Ok(Self {
            inner,
            bos,
            eos,
            unk,
            max_len: DEFAULT_MAX_LEN,
        })
    }

    /// Use a different sequence length (values below 2 are raised to 2: BOS + EOS).
    pub fn with_max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len.max(2);
        self
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Padding id: `<|endoftext|>`, as in transformers' CLIP tokenizer. (OpenAI's own code
    /// pads with 0; CLIP's causal mask and end-of-text pooling make the choice irrelevant.)
    pub fn pad_id(&self) -> u32 {
        self.eos
    }

    /// `[bos, tokens…, eos]`, at most `max_len` ids, always ending with `eos`. Only the start
    /// of a long text is tokenized ([`Self::kept_text`]): what lies past the context cannot
    /// reach the ids, and tokenizing it would cost time in proportion to its length.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let text = self.kept_text(text);
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ClipError::Tokenizer(format!("cannot encode {:?}: {e}", preview(text))))?;
        let body = encoding.get_ids();
        let keep = body.len().min(self.max_len - 2);
        let mut ids = Vec::with_capacity(keep + 2);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos);
        Ok(ids)
    }

    /// The start of `text` that can contribute ids: at most 8 bytes per id of the context,
    /// cut at whitespace when there is some in its second half (words are tokenized one by one,
    /// so the ids of whole words are those of the full text), else at a character boundary.
    pub fn kept_text<'a>(&self, text: &'a str) -> &'a str {
        let limit = 8 * self.max_len;
        if text.len() <= limit {
            return text;
        }
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        match text[..end].rfind(char::is_whitespace) {
            Some(space) if space >= limit / 2 => &text[..space],
            _ => &text[..end],
        }
    }

    /// The ids of `text` that carry meaning: without `<|startoftext|>`, `<|endoftext|>` and
    /// the unknown-word id. Two texts with the same known ids are the same to the model.
    pub fn known_ids(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        ids.retain(|&i| i != self.bos && i != self.eos && Some(i) != self.unk);
        Ok(ids)
    }

    /// `encode` for each text.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// Encode `texts` and pad them with `pad_id` to the longest: a `[n, L]` u32 tensor.
    pub fn encode_padded<S: AsRef<str>>(&self, texts: &[S], device: &Device) -> Result<Tensor> {
        let ids = self.encode_batch(texts)?;
        let (data, len) = pad_to_longest(&ids, self.pad_id());
        Ok(Tensor::from_vec(data, (ids.len(), len), device)?)
    }
}

/// Row-major `[n, L]` ids padded with `pad` to the longest row `L`; returns the data and `L`.
pub fn pad_to_longest(ids: &[Vec<u32>], pad: u32) -> (Vec<u32>, usize) {
    let len = ids.iter().map(Vec::len).max().unwrap_or(0);
    let mut data = Vec::with_capacity(ids.len() * len);
    for row in ids {
        data.extend_from_slice(row);
        data.resize(data.len() + len - row.len(), pad);
    }
    (data, len)
}

/// The start of a text, for error messages.
fn preview(text: &str) -> String {
    text.chars().take(40).collect()
}
