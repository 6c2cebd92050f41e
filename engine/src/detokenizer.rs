//! Incremental, UTF-8-safe detokenization of a request's output tokens.
//!
//! Decoding one token at a time is wrong twice over: a byte-level token may end inside a
//! multi-byte character, and SentencePiece-style decoders drop the leading space of the
//! first token they see. [`IncrementalDetokenizer`] therefore decodes a small window of
//! tokens: `[0, read_offset)` were already emitted and serve as context, the rest are
//! pending. Each push decodes the window and emits what lies beyond the context's text,
//! unless the text ends with U+FFFD (an unfinished character: wait for the next token) or
//! did not grow (e.g. a skipped special token). After emitting, the pending tokens become the
//! new context and older tokens are dropped, so the window stays a few tokens long.
//!
//! For byte-level BPE tokenizers the concatenation of every `push` output and `flush` equals
//! `tokenizer.decode(all_output_tokens, skip_special_tokens)`. The one exception is a stream
//! whose text ends in U+FFFD for [`MAX_PENDING_TOKENS`] tokens in a row (invalid bytes, or the
//! model writing U+FFFD itself): that text is then emitted lossily so the window stays bounded.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// Pending tokens after which text is emitted even if it still ends in U+FFFD. A UTF-8
/// character has at most 4 bytes, so real characters complete long before this.
pub const MAX_PENDING_TOKENS: usize = 16;

const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// The tokenizer failed to decode token ids.
#[derive(Debug, thiserror::Error)]
pub enum DetokenizeError {
    #[error("tokenizer could not decode output tokens: {0}")]
    Decode(#[source] tokenizers::Error),
}

/// Turns one request's output tokens into text, piece by piece.
pub struct IncrementalDetokenizer {
    tokenizer: Arc<Tokenizer>,
    skip_special_tokens: bool,
    /// Decoding window: `tokens[..read_offset]` is already-emitted context, the rest pending.
    tokens: Vec<u32>,
    read_offset: usize,
    /// Text of `tokens[..read_offset]`, decoded once per window.
    prefix_text: Option<String>,
}

impl std::fmt::Debug for IncrementalDetokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncrementalDetokenizer")
            .field("tokens", &self.tokens)
            .field("read_offset", &self.read_offset)
            .finish_non_exhaustive()
    }
}

impl IncrementalDetokenizer {
    /// `prompt_tail`: the last few prompt tokens (may be empty), used as decoding context so
    /// the first output token's leading space is right for SentencePiece-style tokenizers.
    /// A tail that ends inside a character (or fails to decode) is dropped.
    pub fn new(tokenizer: Arc<Tokenizer>, prompt_tail: &[u32], skip_special_tokens: bool) -> Self {
        let mut this = Self {
            tokenizer,
            skip_special_tokens,
            tokens: prompt_tail.to_vec(),
            read_offset: prompt_tail.len(),
            prefix_text: None,
        };
        match this.decode() {
            Ok(text) if !text.ends_with(REPLACEMENT) => this.prefix_text = Some(text),
            _ => {
                this.tokens.clear();
                this.read_offset = 0;
                this.prefix_text = Some(String::new());
            }
        }
        this
    }

    /// Returns the newly final text (possibly empty when the token ends mid-UTF-8-character
    /// or the decoder needs more context).
    pub fn push(&mut self, token: u32) -> Result<String, DetokenizeError> {
        self.tokens.push(token);
        let prefix = self.take_prefix_text()?;
        let text = self.decode()?;
        let num_pending = self.tokens.len() - self.read_offset;
        let ready = text.len() > prefix.len() && !text.ends_with(REPLACEMENT);
        if !ready && num_pending < MAX_PENDING_TOKENS {
            self.prefix_text = Some(prefix);
            return Ok(String::new());
        }
        self.advance();
        Ok(new_suffix(&text, &prefix).to_owned())
    }

    /// Text still held back at the end of the stream (e.g. an incomplete trailing byte
    /// sequence, emitted lossily as U+FFFD).
    pub fn flush(&mut self) -> Result<String, DetokenizeError> {
        if self.read_offset == self.tokens.len() {
            return Ok(String::new());
        }
        let prefix = self.take_prefix_text()?;
        let text = self.decode()?;
        self.advance();
        Ok(new_suffix(&text, &prefix).to_owned())
    }

    /// The context's text, decoding it if this window has not done so yet.
    fn take_prefix_text(&mut self) -> Result<String, DetokenizeError> {
        match self.prefix_text.take() {
            Some(text) => Ok(text),
            None => self.decode_range(0, self.read_offset),
        }
    }

    /// The pending tokens become the context; older tokens are dropped.
    fn advance(&mut self) {
        self.tokens.drain(..self.read_offset);
        self.read_offset = self.tokens.len();
        self.prefix_text = None;
    }

    fn decode(&self) -> Result<String, DetokenizeError> {
        self.decode_range(0, self.tokens.len())
    }

    fn decode_range(&self, start: usize, end: usize) -> Result<String, DetokenizeError> {
        self.tokenizer
            .decode(&self.tokens[start..end], self.skip_special_tokens)
            .map_err(DetokenizeError::Decode)
    }
}

/// What `text` adds after `prefix`. Decoders are expected to be prefix-stable; if one is not,
/// cut at the first char boundary at or after the prefix's length.
fn new_suffix<'a>(text: &'a str, prefix: &str) -> &'a str {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest;
    }
    let mut start = prefix.len().min(text.len());
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use tokenizers::decoders::metaspace::Metaspace;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::metaspace::PrependScheme;
    use tokenizers::AddedToken;

    use super::*;

    /// GPT-2's byte → printable char table.
    fn byte_chars() -> Vec<char> {
        let printable =
            |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        let mut num_remapped = 0;
        (0..256u32)
            .map(|b| {
                if printable(b) {
                    char::from_u32(b).unwrap()
                } else {
                    num_remapped += 1;
                    char::from_u32(255 + num_remapped).unwrap()
                }
            })
            .collect()
    }

    /// Byte-level BPE: ids 0..256 are the bytes themselves, plus merges that end or start
    /// inside multi-byte characters, plus one special token.
    fn byte_level_tokenizer() -> Arc<Tokenizer> {
        let chars = byte_chars();
        let to_chars = |bytes: &[u8]| bytes.iter().map(|&b| chars[b as usize]).collect::<String>();
        let mut vocab: Vocab = (0..256).map(|b| (chars[b].to_string(), b as u32)).collect();
        let merge_bytes: [(&[u8], &[u8]); 8] = [
            (b" ", b"t"),
            (b"h", b"e"),
            (b" t", b"he"),
            (b"a", b"\xC3"),
            (b"\xC3", b"\xA9"),
            (b"\xE4", b"\xB8"),
            (b"\xF0", b"\x9F"),
            (b"\x8E", b"\x89"),
        ];
        let mut merges = vec![];
        for (left, right) in merge_bytes {
            let merged = to_chars(&[left, right].concat());
            let id = vocab.len() as u32;
            vocab.entry(merged).or_insert(id);
            merges.push((to_chars(left), to_chars(right)));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tokenizer.with_decoder(Some(ByteLevel::new(false, true, true)));
        tokenizer.add_special_tokens(&[AddedToken::from("<|end|>", true)]);
        Arc::new(tokenizer)
    }

    /// Pushes every token, checks no piece has U+FFFD (unless `lossy`) and that the pieces
    /// add up to the full decode. Returns the pieces.
    fn check(
        tok: &Arc<Tokenizer>,
        tail: &[u32],
        ids: &[u32],
        skip: bool,
        lossy: bool,
    ) -> Vec<String> {
        let mut detok = IncrementalDetokenizer::new(tok.clone(), tail, skip);
        let mut pieces = vec![];
        for &id in ids {
            pieces.push(detok.push(id).unwrap());
            assert!(detok.tokens.len() <= 2 * MAX_PENDING_TOKENS + tail.len());
        }
        pieces.push(detok.flush().unwrap());
        if !lossy {
            assert!(
                pieces.iter().all(|p| !p.contains(REPLACEMENT)),
                "{pieces:?}"
            );
        }
        assert_eq!(pieces.concat(), tok.decode(ids, skip).unwrap(), "{ids:?}");
        pieces
    }

    const TEXTS: [&str; 5] = [
        "the café, thé é",
        "中文 字符 the 中",
        "emoji 🎉🎊 party 🎉",
        "aé中🎉x",
        "é中🎉",
    ];

    #[test]
    fn bpe_tokens_split_inside_characters_roundtrip() {
        let tok = byte_level_tokenizer();
        for text in TEXTS {
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            check(&tok, &[], &ids, true, false);
            let tail = tok.encode("prompt: ", false).unwrap().get_ids().to_vec();
            check(&tok, &tail, &ids, true, false);
        }
    }

    #[test]
    fn single_byte_tokens_hold_back_partial_characters() {
        let tok = byte_level_tokenizer();
        for text in TEXTS {
            let ids: Vec<u32> = text.bytes().map(u32::from).collect();
            let pieces = check(&tok, &[], &ids, true, false);
            assert!(pieces[..ids.len()].iter().any(String::is_empty));
            assert_eq!(pieces.last().unwrap(), "");
        }
        let ids: Vec<u32> = "🎉".bytes().map(u32::from).collect();
        let mut detok = IncrementalDetokenizer::new(tok, &[], true);
        let pieces: Vec<String> = ids.iter().map(|&id| detok.push(id).unwrap()).collect();
        assert_eq!(pieces, ["", "", "", "🎉"]);
    }

    #[test]
    fn invalid_and_truncated_bytes_come_out_lossily() {
        let tok = byte_level_tokenizer();
        // A stray continuation byte, then a character cut short at the end of the stream.
        let ids = [0x80, u32::from(b'a'), 0xE4, 0xB8];
        let pieces = check(&tok, &[], &ids, true, true);
        assert_eq!(pieces.concat(), "\u{FFFD}a\u{FFFD}");
        assert_eq!(pieces.last().unwrap(), "\u{FFFD}");
        // A long run of garbage is emitted once MAX_PENDING_TOKENS is reached.
        let garbage = vec![0x80; 3 * MAX_PENDING_TOKENS];
        let pieces = check(&tok, &[], &garbage, true, true);
        assert!(!pieces[MAX_PENDING_TOKENS - 1].is_empty());
    }

    #[test]
    fn prompt_tail_ending_mid_character_is_dropped() {
        let tok = byte_level_tokenizer();
        let ids: Vec<u32> = "\u{4E2D}x".bytes().skip(1).map(u32::from).collect();
        check(&tok, &[0xE4], &ids, true, true);
        check(
            &tok,
            &[0xE4],
            &[u32::from(b'o'), u32::from(b'k')],
            true,
            false,
        );
    }

    #[test]
    fn special_tokens_skipped_or_kept() {
        let tok = byte_level_tokenizer();
        let end = tok.token_to_id("<|end|>").unwrap();
        let mut ids = tok.encode("the é", false).unwrap().get_ids().to_vec();
        ids.push(end);
        ids.extend([0xE4, 0xB8, 0xAD]);
        ids.extend(vec![end; 2 * MAX_PENDING_TOKENS]);
        ids.push(u32::from(b'!'));
        let skipped = check(&tok, &[], &ids, true, false).concat();
        assert_eq!(skipped, "the é中!");
        let kept = check(&tok, &[], &ids, false, false).concat();
        assert!(kept.starts_with("the é<|end|>中<|end|>"));
    }

    #[test]
    fn long_streams_keep_the_window_small() {
        let tok = byte_level_tokenizer();
        let text = "the 中文 🎉 é ".repeat(200);
        let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        let mut detok = IncrementalDetokenizer::new(tok.clone(), &[], true);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&detok.push(id).unwrap());
            assert!(detok.tokens.len() <= 8, "{}", detok.tokens.len());
        }
        out.push_str(&detok.flush().unwrap());
        assert_eq!(out, text);
    }

    #[test]
    fn prompt_tail_gives_sentencepiece_its_leading_space() {
        let vocab: Vocab = [("▁Hello", 0), ("▁world", 1), ("!", 2)]
            .map(|(t, id)| (t.to_string(), id))
            .into();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_decoder(Some(Metaspace::new('▁', PrependScheme::First, true)));
        let tok = Arc::new(tokenizer);
        let mut detok = IncrementalDetokenizer::new(tok.clone(), &[0], true);
        assert_eq!(detok.push(1).unwrap(), " world");
        assert_eq!(detok.push(2).unwrap(), "!");
        assert_eq!(detok.push(1).unwrap(), " world");
        let mut detok = IncrementalDetokenizer::new(tok, &[], true);
        assert_eq!(detok.push(1).unwrap(), "world");
        assert_eq!(detok.push(1).unwrap(), " world");
    }
}
