//! One `Scheduler::schedule()` with 256 running requests in decode (every prompt computed), and
//! a whole bookkeeping step (`schedule` + `update` with one scripted token per request). No
//! model: the scheduler is token bookkeeping only.
//!
//!   cargo bench -p pagoda-benches --bench scheduler
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use pagoda_engine::kv::KvCacheManager;
use pagoda_engine::request::Request;
use pagoda_engine::sampler::SampledToken;
use pagoda_engine::scheduler::Scheduler;
use pagoda_engine::{RequestId, SamplingParams, SchedulerConfig};

const NUM_SEQS: usize = 256;
const PROMPT_LEN: usize = 128;
const BLOCK_SIZE: usize = 16;
/// Decode steps a scheduler takes before `schedule_and_update` starts a fresh one.
const MAX_STEPS: usize = 1024;

fn token(t: u32) -> SampledToken {
    SampledToken {
        token: t,
        logprob: f32::NAN,
        top_logprobs: Vec::new(),
    }
}

/// 256 requests of 128 prompt tokens, all prefilled: the next `schedule()` is 256 decodes.
fn decoding_scheduler() -> Scheduler {
    let config = SchedulerConfig {
        max_num_batched_tokens: NUM_SEQS * PROMPT_LEN,
        max_num_seqs: NUM_SEQS,
    };
    let max_len = PROMPT_LEN + MAX_STEPS + 2;
    let num_blocks = NUM_SEQS * max_len.div_ceil(BLOCK_SIZE);
    let mut s = Scheduler::new(config, KvCacheManager::new(num_blocks, BLOCK_SIZE), vec![0]);
    for i in 0..NUM_SEQS {
        let params = SamplingParams {
            max_tokens: MAX_STEPS + 2,
            ignore_eos: true,
            ..Default::default()
        };
        let prompt = (0..PROMPT_LEN as u32)
            .map(|t| 1 + (t * 7 + i as u32) % 1000)
            .collect();
        s.add(Request::new(RequestId(i as u64), prompt, params, max_len));
    }
    let out = s.schedule();
    assert_eq!(out.scheduled.len(), NUM_SEQS, "every prompt in one step");
    let sampled = out.scheduled.iter().map(|r| (r.id, token(5))).collect();
    s.update(&out, sampled);
    s
}

fn schedule(c: &mut Criterion) {
    let mut s = decoding_scheduler();
    c.bench_function("schedule_256_running", |b| {
        // Without `update` nothing advances: every call schedules the same 256 decodes.
        b.iter(|| black_box(s.schedule()))
    });
    c.bench_function("schedule_update_256_running", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut s = decoding_scheduler();
            let mut steps = 0;
            for _ in 0..iters {
                if steps == MAX_STEPS {
                    s = decoding_scheduler();
                    steps = 0;
                }
                let start = Instant::now();
                let out = s.schedule();
                let sampled = out.scheduled.iter().map(|r| (r.id, token(5))).collect();
                black_box(s.update(&out, sampled));
                total += start.elapsed();
                steps += 1;
            }
            total
        })
    });
}

criterion_group!(benches, schedule);
criterion_main!(benches);
