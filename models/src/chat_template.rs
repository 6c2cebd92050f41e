//! Chat templates: the Jinja templates that Hugging Face models ship (in `tokenizer_config.json`,
//! `chat_template.jinja` or the GGUF key `tokenizer.chat_template`) rendered with MiniJinja.
//!
//! [`ChatTemplate`] mirrors what `transformers.apply_chat_template` sets up, so that a prompt
//! renders to the same text as in Python:
//! - `trim_blocks` and `lstrip_blocks` on, trailing newline of the source dropped;
//! - context `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools = none`;
//! - Python string/dict/list methods (`.strip()`, `.startswith()`, `.items()`, ...) through
//!   `minijinja_contrib::pycompat`;
//! - globals `raise_exception(msg)` (the render fails with [`Error::ChatTemplate`] carrying
//!   exactly `msg`, e.g. "System role not supported") and `strftime_now(fmt)` (local time);
//! - `tojson` with Python's `json.dumps(ensure_ascii=False)` output: `", "`/`": "`
//!   separators, `indent=` honoured, and no HTML escaping of `<`, `>`, `&`, `'` (MiniJinja's
//!   builtin escapes those, Python does not).
//!
//! Not supported: `{% break %}`/`{% continue %}` need MiniJinja's `loop_controls` feature,
//! which the workspace does not enable; such a template fails in [`ChatTemplate::new`].
//!
//! A [`ChatTemplate`] is `Send + Sync`; share it behind an `Arc`.
use crate::{Error, Result};
use minijinja::value::{Enumerator, Kwargs, Object, Value};
use minijinja::{Environment, ErrorKind};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

const TEMPLATE_NAME: &str = "chat";

/// One turn of a conversation, as the OpenAI-style API and the templates see it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Messages are maps with the keys in Python's order (`role`, then `content`), so
/// `message | tojson` and `message.items()` match `transformers`.
impl Object for ChatMessage {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.role.as_str())),
            "content" => Some(Value::from(self.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// A compiled chat template plus the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The message a template passed to `raise_exception`, carried as the source of the
/// MiniJinja error so that [`ChatTemplate::render`] can hand it to the user verbatim.
#[derive(Debug)]
struct TemplateException(String);

impl std::fmt::Display for TemplateException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateException {}

impl ChatTemplate {
    /// Compiles `source`. Syntax errors become [`Error::ChatTemplate`] with MiniJinja's message
    /// (which names the line).
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| Error::ChatTemplate(format!("invalid template: {}", describe(&e))))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders the conversation. `add_generation_prompt` appends the header that opens the
    /// assistant's turn (when the template supports it).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::ChatTemplate(describe(&e)))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_object(m.clone()))
            .collect();
        let ctx: BTreeMap<&str, Value> = BTreeMap::from([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            (
                "bos_token",
                Value::from(self.bos_token.as_deref().unwrap_or("")),
            ),
            (
                "eos_token",
                Value::from(self.eos_token.as_deref().unwrap_or("")),
            ),
            ("tools", Value::from(())),
        ]);
        template.render(ctx).map_err(|e| match raised_message(&e) {
            Some(msg) => Error::ChatTemplate(msg),
            None => Error::ChatTemplate(format!("rendering failed: {}", describe(&e))),
        })
    }
}

/// `raise_exception(msg)`: aborts the render; the message reaches the user unchanged.
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, "raise_exception")
            .with_source(TemplateException(msg)),
    )
}

/// `strftime_now(fmt)`: the local time formatted with a C `strftime` pattern.
fn strftime_now(fmt: String) -> std::result::Result<String, minijinja::Error> {
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&fmt)).map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format string {fmt:?}"),
        )
    })?;
    Ok(out)
}

/// `tojson` as Python's `json.dumps(x, ensure_ascii=False, indent=indent)`: MiniJinja's
/// builtin already uses Python's separators and indentation; undo its HTML escapes.
fn tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let json = minijinja::filters::tojson(value, indent, kwargs)?;
    Ok(Value::from_safe_string(unescape_html(&json.to_string())))
}

/// Turns the `\u003c`, `\u003e`, `\u0026` and `\u0027` escapes of a JSON text back into
/// characters. Every backslash in JSON starts an escape, so escapes are walked pairwise and an
/// escaped backslash is never mistaken for the start of `\u...`.
fn unescape_html(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let esc = &rest[pos..];
        let html = match esc.get(..6) {
            Some("\\u003c") => Some('<'),
            Some("\\u003e") => Some('>'),
            Some("\\u0026") => Some('&'),
            Some("\\u0027") => Some('\''),
            _ => None,
        };
        if let Some(c) = html {
            out.push(c);
            rest = &esc[6..];
        } else {
            // Copy the backslash and the character it escapes.
            let len = esc[1..].chars().next().map_or(1, |c| 1 + c.len_utf8());
            out.push_str(&esc[..len]);
            rest = &esc[len..];
        }
    }
    out.push_str(rest);
    out
}

/// The `raise_exception` message behind `err`, if that is what failed the render.
fn raised_message(err: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<TemplateException>() {
            return Some(raised.0.clone());
        }
        source = e.source();
    }
    None
}

/// MiniJinja's message plus the chain of causes, on one line.
fn describe(err: &minijinja::Error) -> String {
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        let _ = write!(msg, ": {e}");
        source = e.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(turns: &[(&str, &str)]) -> Vec<ChatMessage> {
        turns
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect()
    }

    #[test]
    fn chat_template_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    /// Expected strings come from Python's jinja2 with HF's settings (trim_blocks, lstrip_blocks):
    /// lstrip/trim apply to block tags only, so indented `{{ }}` lines keep their whitespace.
    #[test]
    fn whitespace_control_matches_jinja2() {
        let src = "{% for message in messages %}\n    {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}\n{% endfor %}\n{% if add_generation_prompt %}\n    {{ '<|im_start|>assistant\\n' }}\n{% endif %}\n";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let out = t.render(&msgs(&[("system", "Be brief."), ("user", " Hi ")]), true);
        assert_eq!(
            out.unwrap(),
            "    <|im_start|>system\nBe brief.<|im_end|>\n\n    <|im_start|>user\nHi<|im_end|>\n\n    <|im_start|>assistant\n\n"
        );
        let src = "{% for message in messages %}\n    {% if message.role == 'user' %}\n        <u>{{ message.content }}</u>\n    {% else %}\n        <o>{{ message.content }}</o>\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let out = t.render(&msgs(&[("system", "S"), ("user", "U")]), false);
        assert_eq!(out.unwrap(), "        <o>S</o>\n        <u>U</u>\n");
    }

    #[test]
    fn raise_exception_surfaces_the_template_message() {
        let src = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&msgs(&[("user", "x")]), false).unwrap(), "ok");
        match t.render(&msgs(&[("system", "s"), ("user", "x")]), false) {
            Err(Error::ChatTemplate(m)) => assert_eq!(m, "System role not supported"),
            other => panic!("expected ChatTemplate error, got {other:?}"),
        }
    }

    #[test]
    fn strftime_now_formats_the_local_date() {
        let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", None, None).unwrap();
        let out = t.render(&[], false).unwrap();
        assert_eq!(out, chrono::Local::now().format("%Y-%m-%d").to_string());
        let bad = ChatTemplate::new("{{ strftime_now('%Q') }}", None, None).unwrap();
        assert!(matches!(
            bad.render(&[], false),
            Err(Error::ChatTemplate(_))
        ));
    }

    /// Expected output from jinja2 with HF's `tojson` (json.dumps, ensure_ascii=False).
    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ {'a': [1, 2], 'b': '<x> & \\'y\\' \\\\u003c é'} | tojson(indent=2) }}",
            None,
            None,
        )
        .unwrap();
        let out = t.render(&msgs(&[("user", "say \"hi\"\n")]), false).unwrap();
        // Messages keep Python's key order; literal maps are sorted (no `preserve_order`).
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"say \\\"hi\\\"\\n\"}|{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": \"<x> & 'y' \\\\u003c é\"\n}"
        );
    }

    #[test]
    fn pycompat_methods_and_special_tokens() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.content.strip().startswith('A') %}{{ m.content.strip().upper() }}{% endif %}{% endfor %}{{ eos_token }}{{ tools is none }}";
        let t = ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into())).unwrap();
        let out = t.render(&msgs(&[("user", "  abc "), ("user", " Abc")]), false);
        assert_eq!(out.unwrap(), "<s>ABC</s>True"); // Python prints True too
    }

    #[test]
    fn syntax_error_is_a_chat_template_error() {
        match ChatTemplate::new("{% for m in messages %}{{ m.content }", None, None) {
            Err(Error::ChatTemplate(m)) => assert!(m.contains("syntax error"), "{m}"),
            other => panic!("expected ChatTemplate error, got {other:?}"),
        }
        // Loop controls, as Hugging Face's renderer allows.
        let src = "{% for m in messages %}{{ m.content }}{% break %}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "a"), ("user", "b")]), false)
                .unwrap(),
            "a"
        );
    }

    /// Shortened Llama-3.x Instruct template (same structure as Meta's).
    const LLAMA3: &str = "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";

    #[test]
    fn llama3_style_template() {
        let t = ChatTemplate::new(LLAMA3, Some("<|begin_of_text|>".into()), None).unwrap();
        let out = t
            .render(&msgs(&[("system", "Be kind. "), ("user", "Hello")]), true)
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    /// Shortened Mistral-7B-Instruct-v0.1 template.
    const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    #[test]
    fn mistral_style_template() {
        let t = ChatTemplate::new(MISTRAL, Some("<s>".into()), Some("</s>".into())).unwrap();
        let out = t
            .render(
                &msgs(&[("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")]),
                true,
            )
            .unwrap();
        assert_eq!(out, "<s>[INST] Hi [/INST]Hello!</s>[INST] Bye [/INST]");
        match t.render(&msgs(&[("system", "s"), ("user", "x")]), true) {
            Err(Error::ChatTemplate(m)) => {
                assert_eq!(
                    m,
                    "Conversation roles must alternate user/assistant/user/assistant/..."
                )
            }
            other => panic!("expected ChatTemplate error, got {other:?}"),
        }
    }

    #[test]
    fn unescape_html_keeps_escaped_backslashes() {
        assert_eq!(
            unescape_html(r#""\u003ca\u003e \\u003c \"\u0026\u0027""#),
            r#""<a> \\u003c \"&'""#
        );
    }
}
