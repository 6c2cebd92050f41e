//! The incremental detokenizer: a request's output pushed token by token, with the default
//! model's tokenizer (rebuilt from its GGUF, as the server does). Skipped, with a message, when
//! the default model is not in the cache (`scripts/fetch-model`).
//!
//!   cargo bench -p pagoda-benches --bench detokenizer
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pagoda_engine::detokenizer::IncrementalDetokenizer;
use pagoda_models::tokenizer::ModelTokenizer;

const ENGLISH: &str = "The old lighthouse stood at the edge of the cliff, its white paint peeling \
    after decades of salt wind. Every evening the keeper climbed the spiral stairs, trimmed the \
    wick and wound the clockwork that turned the great lens. ";
/// Multi-byte characters: tokens that end inside a character make the detokenizer wait.
const MIXED: &str = "Grüße aus Zürich! Café, naïve, façade. 東京タワーは夜になると光ります。\
    Привет, мир. 🎉🚀 Emoji und Ümlaute. ";

fn tokenizer() -> Option<ModelTokenizer> {
    let path = pagoda_models::resolve_model_path(None).ok()?;
    let mut file = std::fs::File::open(&path).ok()?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).ok()?;
    ModelTokenizer::from_gguf(&content).ok()
}

fn detokenizer(c: &mut Criterion) {
    let Some(tok) = tokenizer() else {
        eprintln!(
            "detokenizer: skipped: the default model is not in the cache (scripts/fetch-model)"
        );
        return;
    };
    let mut g = c.benchmark_group("detokenizer");
    for (name, text) in [("english", ENGLISH), ("multibyte", MIXED)] {
        let ids: Vec<u32> = tok
            .encode(&text.repeat(8), false)
            .expect("the text tokenizes")
            .into_iter()
            .take(256)
            .collect();
        let tokenizer = Arc::clone(&tok.tokenizer);
        g.throughput(Throughput::Elements(ids.len() as u64));
        g.bench_function(format!("push_{}_tokens_{name}", ids.len()), |b| {
            b.iter(|| {
                let mut d = IncrementalDetokenizer::new(Arc::clone(&tokenizer), &ids[..4], true);
                let mut num_bytes = 0;
                for &id in &ids[4..] {
                    num_bytes += d.push(id).expect("decodes").len();
                }
                num_bytes + d.flush().expect("decodes").len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, detokenizer);
criterion_main!(benches);
