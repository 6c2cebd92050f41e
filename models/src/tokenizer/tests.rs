use super::*;
use std::path::PathBuf;
use std::sync::OnceLock;

/// SmolLM2-135M-Instruct (GGUF, `gpt2` model, pre `smollm`), fetched by scripts/fetch-model.
fn smollm() -> &'static ModelTokenizer {
    static TOKENIZER: OnceLock<ModelTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let home = std::env::var_os("PAGODA_HOME").map(PathBuf::from);
        let home = home.unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/pagoda")
        });
        let path = home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let msg = format!("{} is missing: run scripts/fetch-model", path.display());
        let mut file = std::fs::File::open(&path).expect(&msg);
        let content = Content::read(&mut file).expect("GGUF metadata");
        ModelTokenizer::from_gguf(&content).expect("SmolLM2 tokenizer")
    })
}

#[test]
fn smollm_special_tokens_and_eos() {
    let tk = smollm();
    assert_eq!(tk.encode("<|endoftext|>", false).unwrap(), [0]);
    assert_eq!(tk.encode("<|im_start|>", false).unwrap(), [1]);
    assert_eq!(tk.encode("<|im_end|>", false).unwrap(), [2]);
    // Metadata eos is 2 (<|im_end|>, which ends ChatML turns); the control token
    // <|endoftext|> also ends generation, as in llama.cpp.
    assert_eq!(tk.eos_token_ids, [2, 0]);
    assert_eq!((tk.bos_token_id, tk.add_bos_token), (Some(1), false));
    assert_eq!(tk.vocab_size(), 49152);
    assert_eq!(tk.token_text(905).as_deref(), Some("Ġworld"));
    assert_eq!(tk.token_text(49152), None);
}

/// Ids from the Python `tokenizers` package running SmolLM2's tokenizer.json pipeline
/// (Sequence[Digits(individual), ByteLevel(use_regex)]) on the GGUF's vocab and merges.
#[test]
fn smollm_matches_reference_ids() {
    #[rustfmt::skip]
    let cases: &[(&str, &[u32])] = &[
        ("Hello world", &[19556, 905]),
        ("Hello, world!", &[19556, 28, 905, 17]),
        (" leading space", &[2899, 1898]),
        ("\n\nnew\n", &[198, 198, 2241, 198]),
        ("  two spaces", &[216, 827, 5600]),
        ("In 2024: 365 days.", &[788, 216, 34, 32, 34, 36, 42, 216, 35, 38, 37, 2009, 30]),
        ("café naïve", &[83, 1939, 2756, 15486, 46494]),
        ("中文测试", &[28589, 29184, 43222, 229, 16313, 239]),
        ("emoji 😀👍🏽", &[391, 33777, 40303, 218, 10813, 235, 231, 10813, 233, 138]),
        ("they'll say it's", &[11518, 3060, 1643, 357, 506]),
        ("def f(x):\n    return 2", &[1604, 275, 24, 104, 727, 472, 1003, 216, 34]),
        ("<|im_start|>user\nHi<|im_end|>\n", &[1, 4093, 198, 26843, 2, 198]),
        ("tab\tCR\r\n", &[15999, 197, 9088, 2738]),
        ("ALLCAPS MiXeD", &[12631, 33467, 67, 11633, 72, 85, 52]),
    ];
    for (text, ids) in cases {
        assert_eq!(smollm().encode(text, false).unwrap(), *ids, "{text:?}");
        assert_eq!(smollm().decode(ids, false).unwrap(), *text);
    }
    let ids = smollm().encode("<|im_start|>hi<|im_end|>", false).unwrap();
    assert_eq!(smollm().decode(&ids, true).unwrap(), "hi");
}

#[test]
fn smollm_chat_template_renders_chatml() {
    let messages = [
        ChatMessage::new("system", "Be terse."),
        ChatMessage::new("user", "Hi!"),
    ];
    let prompt = smollm().apply_chat_template(&messages, true).unwrap();
    let expected = "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(prompt, expected);
}

#[test]
fn bos_is_prepended_once_and_missing_template_is_reported() {
    let tk = ModelTokenizer {
        tokenizer: smollm().tokenizer.clone(),
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        add_bos_token: true,
        chat_template: None,
    };
    assert_eq!(tk.encode("Hello world", true).unwrap(), [1, 19556, 905]);
    assert_eq!(
        tk.encode("<|im_start|>Hello world", true).unwrap(),
        [1, 19556, 905]
    );
    assert_eq!(tk.encode("Hello world", false).unwrap(), [19556, 905]);
    let err = tk.apply_chat_template(&[ChatMessage::new("user", "x")], true);
    assert!(matches!(err, Err(Error::ChatTemplate(m)) if m.contains("no usable chat template")));
}

#[test]
fn hf_dir_reads_config_generation_config_and_jinja() {
    let dir = std::env::temp_dir().join(format!("pagoda-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write(
        "tokenizer.json",
        &smollm().tokenizer.to_string(false).unwrap(),
    );
    write(
        "tokenizer_config.json",
        r#"{"bos_token": {"content": "<|im_start|>"},
        "eos_token": "<|im_end|>", "chat_template": [{"name": "tool_use", "template": "x"},
        {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}]}"#,
    );
    write("generation_config.json", r#"{"eos_token_id": [2, 0, 2]}"#);
    let tk = ModelTokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!((tk.bos_token_id, tk.add_bos_token), (Some(1), false));
    assert_eq!(tk.eos_token_ids, [2, 0]);
    assert_eq!(tk.encode("Hello world", true).unwrap(), [19556, 905]);
    let msgs = [ChatMessage::new("user", "hey")];
    assert_eq!(
        tk.apply_chat_template(&msgs, false).unwrap(),
        "<|im_start|>hey"
    );

    write("chat_template.jinja", "[{{ messages[0].content }}]\n");
    write(
        "tokenizer_config.json",
        r#"{"eos_token": {"content": "<|endoftext|>"},
        "bos_token": "<|im_start|>", "add_bos_token": true}"#,
    );
    write("generation_config.json", r#"{"eos_token_id": 2}"#);
    let tk = ModelTokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(tk.eos_token_ids, [0, 2]);
    assert_eq!(tk.encode("Hello world", true).unwrap(), [1, 19556, 905]);
    assert_eq!(tk.apply_chat_template(&msgs, false).unwrap(), "[hey]");
    std::fs::remove_dir_all(&dir).unwrap();
    let missing = ModelTokenizer::from_hf_dir(&dir);
    assert!(matches!(missing, Err(Error::Io { path, .. }) if path.ends_with("tokenizer.json")));
}

fn gguf(entries: Vec<(&str, Value)>) -> Content {
    Content {
        magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
        metadata: entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

/// A tiny SentencePiece BPE: <unk>, <s>, </s>, <0x00>..<0xFF>, these pieces (scores -1,
/// -2, ...) and a user-defined <tool>. Expected ids are what the `sentencepiece` Python
/// package returns for a model with the same pieces (identity normalizer, dummy prefix).
const SPM_PIECES: &str = "▁ h e l o w r d ll he ▁he llo ▁hello ▁w or ▁wor ld ▁world é ! ▁▁ ho ▁h";

#[test]
fn sentencepiece_gguf_matches_sentencepiece() {
    let bytes = (0..=255u8).map(|b| format!("<0x{b:02X}>"));
    let pieces = SPM_PIECES.split(' ').map(str::to_owned);
    let specials = ["<unk>", "<s>", "</s>"].map(String::from);
    let tokens: Vec<String> = specials.into_iter().chain(bytes).chain(pieces).collect();
    let (n, tool) = (tokens.len(), Value::String("<tool>".into()));
    let types = (0..=n).map(|i| match i {
        0 => 2,
        1 | 2 => 3,
        3..=258 => 6,
        i if i == n => 4,
        _ => 1,
    });
    let scores = (0..=n).map(|i| {
        if (259..n).contains(&i) {
            258.0 - i as f32
        } else {
            0.0
        }
    });
    let tokens = tokens
        .into_iter()
        .map(Value::String)
        .chain([tool])
        .collect();
    let content = gguf(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.map(Value::F32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ]);
    let tk = ModelTokenizer::from_gguf(&content).unwrap();
    assert_eq!((tk.bos_token_id, tk.add_bos_token), (Some(1), true));
    assert_eq!(tk.eos_token_ids, [2]);
    let cases: &[(&str, &[u32])] = &[
        ("hello world", &[271, 276]),
        ("Hello world!", &[259, 75, 261, 270, 276, 278]),
        ("hello  world", &[271, 259, 276]),
        (" hello", &[259, 271]),
        ("中", &[259, 231, 187, 176]),
        ("héllo", &[281, 277, 270]),
        ("", &[]),
        ("hello\nworld", &[271, 13, 264, 273, 275]),
        ("hoho whe", &[259, 280, 280, 272, 268]),
    ];
    for (text, ids) in cases {
        assert_eq!(tk.encode(text, false).unwrap(), *ids, "{text:?}");
        assert_eq!(tk.encode(text, true).unwrap()[1..], **ids);
        assert_eq!(tk.decode(ids, false).unwrap(), *text);
    }
    // As in llama.cpp and HF (legacy), text after an added token gets its own "▁".
    assert_eq!(tk.encode("<s>hello<tool>", true).unwrap(), [1, 271, 282]);
}

#[test]
fn unsupported_model_and_pre_tokenizer_mapping() {
    let content = gguf(vec![
        ("tokenizer.ggml.model", Value::String("bert".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("[CLS]".into())]),
        ),
    ]);
    let err = ModelTokenizer::from_gguf(&content);
    assert!(matches!(err, Err(Error::Tokenizer(m)) if m.contains("`bert`")));
    assert_eq!(
        ByteLevelPre::from_gguf("smollm"),
        (ByteLevelPre::DigitsGpt2, false)
    );
    assert_eq!(
        ByteLevelPre::from_gguf("llama-bpe"),
        (ByteLevelPre::Regex(LLAMA3_REGEX), true)
    );
    assert_eq!(
        ByteLevelPre::from_gguf("new-thing"),
        (ByteLevelPre::Gpt2, false)
    );
    for pre in ["gpt2", "smollm", "llama-bpe", "qwen2", "tekken", "gpt-4o"] {
        ByteLevelPre::from_gguf(pre).0.build().unwrap();
    }
}
