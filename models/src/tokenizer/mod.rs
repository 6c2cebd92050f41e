//! Tokenizers for the models we serve, built from GGUF metadata or a Hugging Face folder.
//!
//! [`ModelTokenizer`] bundles a ready `tokenizers::Tokenizer` with what generation needs
//! around it: the BOS id and whether to prepend it, every id that ends generation, and the
//! model's [`ChatTemplate`].
//!
//! GGUF files carry no `tokenizer.json`; [`ModelTokenizer::from_gguf`] rebuilds the pipeline
//! the original `tokenizer.json` had, from the `tokenizer.ggml.*` keys:
//! - model `gpt2` (byte-level BPE): vocab from `tokens`, ranked `merges` ("a b"), no
//!   normalizer, a pre-tokenizer chosen by `tokenizer.ggml.pre` (see [`ByteLevelPre`]), the
//!   ByteLevel decoder, no unknown token (a byte missing from the vocab is dropped, as in HF
//!   and llama.cpp);
//! - model `llama` (SentencePiece): HF's `LlamaConverter` layout, a BPE with byte fallback
//!   whose merges come from the piece scores, the `▁` space normalizer (`add_space_prefix`)
//!   and the Replace/ByteFallback/Fuse/Strip decoder.
//!
//! Control tokens (`token_type` 3) become special added tokens and user-defined ones (4)
//! plain added tokens, so `<|im_start|>` in a prompt encodes to its single id either way.
use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse, strip::Strip};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

/// Token texts that end a turn when they are control tokens (the list llama.cpp uses).
#[rustfmt::skip]
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>",
];

const GGUF_TOKEN_NORMAL: i64 = 1;
const GGUF_TOKEN_CONTROL: i64 = 3;
const GGUF_TOKEN_USER_DEFINED: i64 = 4;

/// The split regexes of the original `tokenizer.json` files (GPT-2's is built into ByteLevel).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Byte-level pre-tokenization families, keyed by `tokenizer.ggml.pre`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ByteLevelPre {
    /// GPT-2: `ByteLevel(use_regex=true)` (the regex lives inside ByteLevel).
    Gpt2,
    /// SmolLM / StarCoder: `Sequence[Digits(individual_digits), ByteLevel(use_regex=true)]`,
    /// as SmolLM2's tokenizer.json (llama.cpp: `\p{N}` then the GPT-2 regex).
    DigitsGpt2,
    /// `Sequence[Split(regex, Isolated), ByteLevel(use_regex=false)]` (Llama 3, Qwen2, ...).
    Regex(&'static str),
}

impl ByteLevelPre {
    /// The family for `pre`, and whether its tokenizer.json sets `ignore_merges`.
    fn from_gguf(pre: &str) -> (Self, bool) {
        match pre {
            "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" | "phi-2" => (Self::Gpt2, false),
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => {
                (Self::DigitsGpt2, false)
            }
            "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
                (Self::Regex(LLAMA3_REGEX), true)
            }
            "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => {
                (Self::Regex(QWEN2_REGEX), false)
            }
            "tekken" => (Self::Regex(TEKKEN_REGEX), true),
            "gpt-4o" | "llama4" => (Self::Regex(GPT4O_REGEX), false),
            other => {
                tracing::warn!(
                    pre = other,
                    "unknown GGUF pre-tokenizer; using the GPT-2 split regex, tokenization may differ from the original"
                );
                (Self::Gpt2, false)
            }
        }
    }

    fn build(self) -> Result<PreTokenizerWrapper> {
        use tokenizers::pre_tokenizers::sequence::Sequence;
        let byte_level = |use_regex| ByteLevel::new(false, true, use_regex).into();
        Ok(match self {
            Self::Gpt2 => byte_level(true),
            Self::DigitsGpt2 => {
                Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into()
            }
            Self::Regex(regex) => {
                let split = Split::new(
                    SplitPattern::Regex(regex.to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
                Sequence::new(vec![split.into(), byte_level(false)]).into()
            }
        })
    }
}

/// A tokenizer plus the generation-relevant facts about its special tokens.
pub struct ModelTokenizer {
    /// Ready to encode/decode; special-token texts in the input map to their ids.
    /// Shared: every request's detokenizer holds a reference.
    pub tokenizer: std::sync::Arc<Tokenizer>,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation: EOS, end-of-turn/message tokens, and for Hugging Face
    /// folders the `generation_config.json` list. EOS (if any) comes first.
    pub eos_token_ids: Vec<u32>,
    /// Whether [`ModelTokenizer::encode`] prepends BOS when asked for special tokens.
    pub add_bos_token: bool,
    pub chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("add_bos_token", &self.add_bos_token)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl ModelTokenizer {
    /// Rebuilds the tokenizer from a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let meta = Meta(&content.metadata);
        let model = meta.str("tokenizer.ggml.model")?.unwrap_or("llama");
        let tokens = meta
            .array("tokenizer.ggml.tokens", as_str)?
            .unwrap_or_default();
        let types = meta.array("tokenizer.ggml.token_type", as_int)?;
        let types = types.unwrap_or_else(|| vec![GGUF_TOKEN_NORMAL; tokens.len()]);
        if tokens.is_empty() || types.len() != tokens.len() {
            let (n, t) = (tokens.len(), types.len());
            return Err(Error::Tokenizer(format!(
                "GGUF has {n} tokens and {t} token types"
            )));
        }
        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
        for (id, tok) in tokens.iter().enumerate() {
            vocab.entry(tok.to_string()).or_insert(id as u32);
        }
        // Special-token ids outside the vocab are ignored.
        let id = |key: &str| meta.u32(key).filter(|&id| (id as usize) < tokens.len());

        let (mut tokenizer, default_add_bos) = match model {
            "gpt2" => {
                let pre = meta.str("tokenizer.ggml.pre")?.unwrap_or("default");
                let (pre, ignore_merges) = ByteLevelPre::from_gguf(pre);
                let merges = meta
                    .array("tokenizer.ggml.merges", as_str)?
                    .unwrap_or_default();
                let merges = checked_merges(&merges, &vocab)?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(ignore_merges)
                    .build()
                    .map_err(|e| Error::Tokenizer(format!("building BPE: {e}")))?;
                let mut tk = Tokenizer::new(bpe);
                tk.with_pre_tokenizer(Some(pre.build()?));
                tk.with_decoder(Some(ByteLevel::default()));
                if pre == ByteLevelPre::Regex(QWEN2_REGEX) {
                    tk.with_normalizer(Some(NFC)); // Qwen2's tokenizer.json normalizes to NFC
                }
                let add_bos =
                    matches!(pre, ByteLevelPre::Regex(r) if r == LLAMA3_REGEX || r == TEKKEN_REGEX);
                (tk, add_bos)
            }
            "llama" => {
                let scores = meta.array("tokenizer.ggml.scores", as_float)?;
                let scores = scores.unwrap_or_else(|| vec![0.0; tokens.len()]);
                let add_space_prefix = meta.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let unk = id("tokenizer.ggml.unknown_token_id").unwrap_or(0);
                (
                    sentencepiece_bpe(&tokens, &types, &scores, vocab, unk, add_space_prefix)?,
                    true,
                )
            }
            other => {
                return Err(Error::Tokenizer(format!(
                    "unsupported GGUF tokenizer model `{other}` (supported: gpt2, llama)"
                )))
            }
        };

        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| matches!(**t, GGUF_TOKEN_CONTROL | GGUF_TOKEN_USER_DEFINED))
            .map(|(tok, t)| AddedToken::from(*tok, *t == GGUF_TOKEN_CONTROL).normalized(false))
            .collect();
        tokenizer.add_special_tokens(&added);

        let bos_token_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let named_eog = ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"];
        let eog_by_text = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter_map(|(i, (tok, t))| {
                (*t == GGUF_TOKEN_CONTROL && END_OF_GENERATION_TEXTS.contains(tok))
                    .then_some(i as u32)
            });
        let named_eog = eos_id
            .into_iter()
            .chain(named_eog.into_iter().filter_map(&id));
        let eos_token_ids = unique(named_eog.chain(eog_by_text));
        let add_bos_token = bos_token_id.is_some()
            && meta
                .bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(default_add_bos);
        let text = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string());
        let chat_template = match meta.str("tokenizer.chat_template")? {
            Some(src) => compile_template(src, text(bos_token_id), text(eos_id)),
            None => None,
        };
        Ok(Self {
            tokenizer: std::sync::Arc::new(tokenizer),
            bos_token_id,
            eos_token_ids,
            add_bos_token,
            chat_template,
        })
    }

    /// Loads a Hugging Face model folder: `tokenizer.json`, `tokenizer_config.json` (chat
    /// template, `bos_token`/`eos_token` as strings or `{"content": ...}`, `add_bos_token`),
    /// and when present `generation_config.json` (`eos_token_id`, int or list) and
    /// `chat_template.jinja` (which takes precedence, as in `transformers`).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tk_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tk_path).map_err(|e| Error::io(&tk_path, e))?;
        let tokenizer = Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tk_path.display())))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or_default();

        let token_field = |key: &str| -> Option<String> {
            match config.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let bos_text = token_field("bos_token");
        let eos_text = token_field("eos_token");
        let bos_token_id = bos_text
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
            .or_else(|| json_ids(generation.get("bos_token_id")).first().copied());
        let eos_from_config = eos_text.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let eos_from_generation = json_ids(generation.get("eos_token_id"));
        let eos_token_ids = unique(eos_from_config.into_iter().chain(eos_from_generation));
        // Without an explicit flag, BOS is added iff tokenizer.json's post-processor adds it.
        let add_bos_token = bos_token_id.is_some()
            && match config.get("add_bos_token").and_then(|v| v.as_bool()) {
                Some(flag) => flag,
                None => {
                    let with = tokenizer.encode_fast("a", true);
                    let first = with.ok().and_then(|e| e.get_ids().first().copied());
                    first.is_some() && first == bos_token_id
                }
            };

        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?)
        } else {
            let legacy = read_json(&dir.join("chat_template.json"))?;
            template_source(config.get("chat_template"))
                .or_else(|| template_source(legacy.as_ref().and_then(|l| l.get("chat_template"))))
        };
        let chat_template = source.and_then(|src| compile_template(&src, bos_text, eos_text));
        Ok(Self {
            tokenizer: std::sync::Arc::new(tokenizer),
            bos_token_id,
            eos_token_ids,
            add_bos_token,
            chat_template,
        })
    }

    /// Encodes `text`; special-token texts in it (e.g. `<|im_start|>`) map to their ids.
    /// With `add_special_tokens`, BOS is prepended when the model wants it, unless the
    /// encoding already starts with BOS (the text began with the BOS text).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, true, Some(bos)) = (add_special_tokens, self.add_bos_token, self.bos_token_id)
        {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Decodes `ids` to text (special tokens included unless `skip_special_tokens`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    /// Renders a conversation with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        match &self.chat_template {
            Some(template) => template.render(messages, add_generation_prompt),
            None => Err(Error::ChatTemplate(
                "this model has no usable chat template (none in its files, or it failed to \
                 compile: see the load log); use the completions API with a raw prompt"
                    .into(),
            )),
        }
    }

    /// Number of ids the tokenizer knows: one past the largest vocab or added-token id.
    pub fn vocab_size(&self) -> usize {
        let added = self.tokenizer.get_added_tokens_decoder();
        let max_added = added.keys().map(|&id| id as usize + 1).max().unwrap_or(0);
        self.tokenizer.get_vocab_size(false).max(max_added)
    }

    /// The vocabulary piece for `id` as stored (byte-level pieces like `Ġworld`, SentencePiece
    /// pieces like `▁world`, special tokens verbatim); `None` if the id is unknown.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }
}

/// The ids in first-seen order, without repeats.
fn unique(ids: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut out = Vec::new();
    for id in ids {
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

/// Merges as pairs, keeping rank order; merges naming a piece outside the vocab are dropped.
fn checked_merges(
    merges: &[&str],
    vocab: &tokenizers::models::bpe::Vocab,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::with_capacity(merges.len());
    let mut dropped = 0usize;
    for merge in merges {
        let (a, b) = merge
            .split_once(' ')
            .ok_or_else(|| Error::Tokenizer(format!("malformed GGUF merge {merge:?}")))?;
        if vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}"))
        {
            out.push((a.to_owned(), b.to_owned()));
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "dropped GGUF merges naming pieces outside the vocab"
        );
    }
    Ok(out)
}

/// SentencePiece vocab as HF's `LlamaConverter` does it: a BPE with byte fallback whose merge
/// ranks follow the score of the merged piece (SentencePiece merges the best-scored pair).
fn sentencepiece_bpe(
    tokens: &[&str],
    types: &[i64],
    scores: &[f32],
    vocab: tokenizers::models::bpe::Vocab,
    unk: u32,
    add_space_prefix: bool,
) -> Result<Tokenizer> {
    if scores.len() != tokens.len() {
        return Err(Error::Tokenizer(
            "GGUF scores and tokens differ in length".into(),
        ));
    }
    // (score of the merged piece, its id, left id, right id, left, right)
    let mut ranked: Vec<(f32, u32, u32, u32, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !matches!(types[id], 0 | GGUF_TOKEN_NORMAL) || vocab.get(*piece) != Some(&(id as u32)) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&lid), Some(&rid)) = (vocab.get(l), vocab.get(r)) {
                ranked.push((scores[id], id as u32, lid, rid, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
    });
    let merges = ranked
        .iter()
        .map(|m| (m.4.to_owned(), m.5.to_owned()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(tokens[unk as usize].to_owned())
        .byte_fallback(true)
        .fuse_unk(true)
        .build()
        .map_err(|e| Error::Tokenizer(format!("building SentencePiece BPE: {e}")))?;
    let mut tk = Tokenizer::new(bpe);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| Error::Tokenizer(format!("space replacement: {e}")))
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    tk.with_normalizer(Some(tokenizers::normalizers::Sequence::new(normalizers)));
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tk.with_decoder(Some(tokenizers::decoders::sequence::Sequence::new(
        decoders,
    )));
    Ok(tk)
}

/// Compiles a chat template; a template MiniJinja cannot compile is logged and dropped so the
/// model still serves raw completions.
fn compile_template(src: &str, bos: Option<String>, eos: Option<String>) -> Option<ChatTemplate> {
    match ChatTemplate::new(src, bos, eos) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "the model's chat template does not compile; chat is disabled");
            None
        }
    }
}

/// `chat_template` as a string, or the `default` entry of the list form.
fn template_source(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
            };
            let entry = named("default").or_else(|| list.first())?;
            entry.get("template")?.as_str().map(str::to_owned)
        }
        _ => None,
    }
}

/// An int or a list of ints (`eos_token_id` in generation_config.json).
fn json_ids(value: Option<&serde_json::Value>) -> Vec<u32> {
    let as_id = |v: &serde_json::Value| v.as_u64().and_then(|i| u32::try_from(i).ok());
    match value {
        Some(serde_json::Value::Array(list)) => list.iter().filter_map(as_id).collect(),
        Some(v) => as_id(v).into_iter().collect(),
        None => Vec::new(),
    }
}

/// Reads a JSON object file; `None` if the file does not exist.
fn read_json(path: &Path) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Typed access to GGUF metadata; a key of the wrong type is an [`Error::Tokenizer`].
struct Meta<'a>(&'a HashMap<String, Value>);

impl<'a> Meta<'a> {
    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        self.0
            .get(key)
            .map(|v| as_str(v).ok_or_else(|| bad_key(key, "a string")))
            .transpose()
    }

    /// The elements of an array, each converted by `f`; `None` if the key is absent.
    fn array<T>(&self, key: &str, f: fn(&'a Value) -> Option<T>) -> Result<Option<Vec<T>>> {
        let Some(Value::Array(items)) = self.0.get(key) else {
            return match self.0.get(key) {
                None => Ok(None),
                Some(_) => Err(bad_key(key, "an array")),
            };
        };
        let items: Option<Vec<T>> = items.iter().map(f).collect();
        items
            .map(Some)
            .ok_or_else(|| bad_key(key, "an array of the expected type"))
    }

    fn u32(&self, key: &str) -> Option<u32> {
        self.0
            .get(key)
            .and_then(as_int)
            .and_then(|i| u32::try_from(i).ok())
    }

    fn bool(&self, key: &str) -> Option<bool> {
        self.0.get(key).and_then(|v| v.to_bool().ok())
    }
}

fn bad_key(key: &str, expected: &str) -> Error {
    Error::Tokenizer(format!("GGUF key {key} is not {expected}"))
}

fn as_str(v: &Value) -> Option<&str> {
    v.to_string().ok().map(String::as_str)
}

fn as_float(v: &Value) -> Option<f32> {
    match v {
        Value::F32(f) => Some(*f),
        Value::F64(f) => Some(*f as f32),
        _ => None,
    }
}

/// GGUF writers use u32 for ids and i32 for token types; accept any of those widths.
fn as_int(v: &Value) -> Option<i64> {
    let unsigned = v.to_u64().ok().and_then(|x| i64::try_from(x).ok());
    unsigned.or_else(|| v.to_i32().ok().map(i64::from))
}

#[cfg(test)]
mod tests;
