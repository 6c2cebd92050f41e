//! Prometheus metrics. Counters and histograms are updated by the handlers; gauges of the
//! engine's state are read from the engine at scrape time.
use std::sync::LazyLock;

use pagoda_adapters::RegistryStats;
use pagoda_engine::EngineStats;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub finished: IntCounterVec,
    pub errors: IntCounterVec,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    running: IntGauge,
    waiting: IntGauge,
    blocks_used: IntGauge,
    blocks_total: IntGauge,
    preemptions: IntGauge,
    lora_adapters: IntGauge,
    lora_generations: IntGauge,
    lora_slot_loads: IntGauge,
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid histogram")
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid counter");
    let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid gauge");
    let latency = vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ];
    let m = Metrics {
        prompt_tokens: counter(
            "pagoda_prompt_tokens_total",
            "Prompt tokens of finished requests",
        ),
        generation_tokens: counter("pagoda_generation_tokens_total", "Generated tokens"),
        finished: IntCounterVec::new(
            Opts::new(
                "pagoda_requests_finished_total",
                "Finished requests by finish reason",
            ),
            &["finish_reason"],
        )
        .expect("valid counter"),
        errors: IntCounterVec::new(
            Opts::new(
                "pagoda_request_errors_total",
                "Failed requests by error kind",
            ),
            &["kind"],
        )
        .expect("valid counter"),
        ttft: histogram(
            "pagoda_time_to_first_token_seconds",
            "Time to first token",
            latency.clone(),
        ),
        tpot: histogram(
            "pagoda_time_per_output_token_seconds",
            "Time per output token after the first",
            vec![
                0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
            ],
        ),
        e2e: histogram(
            "pagoda_e2e_request_latency_seconds",
            "End-to-end request latency",
            latency,
        ),
        running: gauge("pagoda_requests_running", "Requests being computed"),
        waiting: gauge("pagoda_requests_waiting", "Requests waiting for a slot"),
        blocks_used: gauge("pagoda_kv_blocks_used", "KV cache blocks in use"),
        blocks_total: gauge("pagoda_kv_blocks_total", "KV cache blocks in the pool"),
        preemptions: gauge("pagoda_preemptions_total", "Requests preempted since start"),
        lora_adapters: gauge("pagoda_lora_adapters", "LoRA adapters registered"),
        lora_generations: gauge(
            "pagoda_lora_generations_live",
            "LoRA adapter generations in memory (registered, or replaced but still in use)",
        ),
        lora_slot_loads: gauge(
            "pagoda_lora_slot_loads_total",
            "LoRA adapters copied into a device slot since start",
        ),
        registry,
    };
    let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
        Box::new(m.prompt_tokens.clone()),
        Box::new(m.generation_tokens.clone()),
        Box::new(m.finished.clone()),
        Box::new(m.errors.clone()),
        Box::new(m.ttft.clone()),
        Box::new(m.tpot.clone()),
        Box::new(m.e2e.clone()),
        Box::new(m.running.clone()),
        Box::new(m.waiting.clone()),
        Box::new(m.blocks_used.clone()),
        Box::new(m.blocks_total.clone()),
        Box::new(m.preemptions.clone()),
        Box::new(m.lora_adapters.clone()),
        Box::new(m.lora_generations.clone()),
        Box::new(m.lora_slot_loads.clone()),
    ];
    for c in collectors {
        m.registry.register(c).expect("metric registered once");
    }
    m
});

impl Metrics {
    /// The text exposition, with the engine gauges as of now.
    pub fn render(&self, stats: Option<EngineStats>, lora: Option<RegistryStats>) -> String {
        if let Some(l) = lora {
            self.lora_adapters.set(l.num_adapters as i64);
            self.lora_generations.set(l.num_live_generations as i64);
        }
        if let Some(s) = stats {
            self.running.set(s.num_running as i64);
            self.waiting.set(s.num_waiting as i64);
            self.blocks_used
                .set((s.num_blocks - s.num_free_blocks) as i64);
            self.blocks_total.set(s.num_blocks as i64);
            self.preemptions.set(s.num_preemptions as i64);
            self.lora_slot_loads.set(s.num_lora_slot_loads as i64);
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
