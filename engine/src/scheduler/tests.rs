//! Scheduler driven by scripted tokens: no model, no tensors.
use super::*;
use crate::SamplingParams;

const EOS: u32 = 0;

fn token(t: u32) -> SampledToken {
    SampledToken {
        token: t,
        logprob: 0.0,
        top_logprobs: Vec::new(),
    }
}

fn request(id: u64, prompt_len: usize, max_tokens: usize) -> Request {
    let params = SamplingParams {
        max_tokens,
        ..Default::default()
    };
    Request::new(
        RequestId(id),
        (1..=prompt_len as u32).collect(),
        params,
        4096,
    )
}

fn scheduler(num_blocks: usize, max_tokens: usize, max_seqs: usize) -> Scheduler {
    let config = SchedulerConfig {
        max_num_batched_tokens: max_tokens,
        max_num_seqs: max_seqs,
    };
    Scheduler::new(config, KvCacheManager::new(num_blocks, 4), vec![EOS])
}

/// Runs steps, sampling `next(id, output_len)` for every sampling request, until idle. Returns
/// each request's output tokens and the steps taken.
fn drive(
    s: &mut Scheduler,
    next: impl Fn(RequestId, usize) -> u32,
) -> (HashMap<RequestId, Vec<u32>>, usize) {
    let mut done: HashMap<RequestId, Vec<u32>> = HashMap::new();
    let mut steps = 0;
    while s.has_work() {
        steps += 1;
        assert!(steps < 10_000, "scheduler made no progress");
        let out = s.schedule();
        assert!(!out.is_empty(), "work but nothing scheduled");
        assert!(out.num_batched_tokens <= s.config().max_num_batched_tokens);
        assert!(out.scheduled.len() <= s.config().max_num_seqs);
        let sampled = out
            .scheduled
            .iter()
            .filter(|r| r.samples)
            .map(|r| {
                (
                    r.id,
                    token(next(r.id, s.request(r.id).unwrap().output_tokens.len())),
                )
            })
            .collect();
        for o in s.update(&out, sampled) {
            done.entry(o.id).or_default().push(o.token.token);
        }
    }
    assert_eq!(
        s.kv().num_free_blocks(),
        s.kv().num_blocks(),
        "leaked blocks"
    );
    (done, steps)
}

#[test]
fn admits_within_budgets_and_chunks_long_prompts() {
    let mut s = scheduler(64, 8, 2);
    s.add(request(1, 20, 3));
    s.add(request(2, 3, 3));
    s.add(request(3, 3, 3));
    let out = s.schedule();
    // The long prompt takes the whole token budget; a chunk, no sample.
    assert_eq!(
        out.scheduled,
        vec![ScheduledRequest {
            id: RequestId(1),
            num_computed_tokens: 0,
            num_new_tokens: 8,
            samples: false
        }]
    );
    s.update(&out, vec![]);
    let out = s.schedule();
    assert_eq!(out.scheduled[0].num_computed_tokens, 8);
    assert_eq!(out.scheduled[0].num_new_tokens, 8);
    s.update(&out, vec![]);
    // Last chunk of 4 leaves room for request 2's prompt (3 tokens); max_num_seqs = 2 holds 3 back.
    let out = s.schedule();
    assert_eq!(out.scheduled.len(), 2);
    assert_eq!(
        out.scheduled[0],
        ScheduledRequest {
            id: RequestId(1),
            num_computed_tokens: 16,
            num_new_tokens: 4,
            samples: true
        }
    );
    assert_eq!(
        out.scheduled[1],
        ScheduledRequest {
            id: RequestId(2),
            num_computed_tokens: 0,
            num_new_tokens: 3,
            samples: true
        }
    );
    assert_eq!(s.num_waiting(), 1);
    let sampled = vec![(RequestId(1), token(7)), (RequestId(2), token(7))];
    s.update(&out, sampled);
    // Decodes cost one token each.
    let out = s.schedule();
    assert_eq!(out.num_batched_tokens, 2);
    let (done, _) = drive(&mut s, |_, _| 5);
    assert_eq!(done[&RequestId(3)], vec![5, 5, 5]);
}

#[test]
fn finishes_on_eos_length_and_stop_ids() {
    let mut s = scheduler(64, 64, 8);
    s.add(request(1, 4, 10));
    s.add(request(2, 4, 3));
    let mut r = request(3, 4, 10);
    r.params.stop_token_ids = vec![9];
    s.add(r);
    let mut r = request(4, 4, 5);
    r.params.ignore_eos = true;
    s.add(r);
    let mut r = request(5, 4, 5);
    r.params.min_tokens = 3;
    s.add(r);
    let (done, _) = drive(&mut s, |id, n| match (id.0, n) {
        (1, 2) => EOS,
        (3, 1) => 9,
        (4 | 5, 0) => EOS,
        _ => 4,
    });
    assert_eq!(done[&RequestId(1)], vec![4, 4, EOS]);
    assert_eq!(done[&RequestId(2)], vec![4, 4, 4]);
    assert_eq!(done[&RequestId(3)], vec![4, 9]);
    assert_eq!(done[&RequestId(4)], vec![EOS, 4, 4, 4, 4]);
    assert_eq!(
        done[&RequestId(5)],
        vec![EOS, 4, 4, 4, 4],
        "EOS before min_tokens must not stop"
    );
}

#[test]
fn abort_mid_flight_frees_everything() {
    let mut s = scheduler(16, 8, 4);
    s.add(request(1, 20, 50));
    s.add(request(2, 2, 50));
    s.add(request(3, 2, 50));
    let out = s.schedule();
    s.update(&out, vec![]);
    assert!(s.kv().num_free_blocks() < 16);
    assert!(s.abort(RequestId(1)));
    assert!(!s.abort(RequestId(1)));
    // Abort a waiting one and a running one.
    let out = s.schedule();
    let sampled = out
        .scheduled
        .iter()
        .filter(|r| r.samples)
        .map(|r| (r.id, token(3)))
        .collect();
    s.update(&out, sampled);
    assert!(s.abort(RequestId(2)));
    assert!(s.abort(RequestId(3)));
    assert!(!s.has_work());
    assert_eq!(s.kv().num_free_blocks(), 16);
    assert_eq!(s.num_running() + s.num_waiting(), 0);
}

#[test]
fn preempts_when_blocks_run_out_and_resumes_with_same_tokens() {
    // Deterministic "model": the next token depends only on the request and its output so far.
    let next = |id: RequestId, n: usize| 10 + ((id.0 as usize * 7 + n * 3) % 50) as u32;
    let make = |s: &mut Scheduler| {
        for id in 1..=6 {
            s.add(request(id, 6 + id as usize, 12));
        }
    };
    let mut big = scheduler(256, 64, 16);
    make(&mut big);
    let (expected, _) = drive(&mut big, next);
    assert_eq!(big.num_preemptions(), 0);

    // 12 blocks of 4 = 48 token slots for 6 requests that grow to 19..24 tokens each.
    let mut small = scheduler(12, 64, 16);
    make(&mut small);
    let (got, _) = drive(&mut small, next);
    assert!(
        small.num_preemptions() > 0,
        "the small pool should force preemption"
    );
    assert_eq!(got, expected);
}

#[test]
fn a_preempted_request_recomputes_its_output_tokens() {
    let mut s = scheduler(5, 64, 4);
    s.add(request(1, 8, 10));
    s.add(request(2, 8, 10));
    // Both prompts fit (2 blocks each); decoding grows them until someone is preempted.
    let mut preempted = None;
    for _ in 0..20 {
        let out = s.schedule();
        if let Some(&p) = out.preempted.first() {
            preempted = Some((p, out.clone()));
            let sampled = out
                .scheduled
                .iter()
                .filter(|r| r.samples)
                .map(|r| (r.id, token(3)))
                .collect();
            s.update(&out, sampled);
            break;
        }
        let sampled = out
            .scheduled
            .iter()
            .filter(|r| r.samples)
            .map(|r| (r.id, token(3)))
            .collect();
        s.update(&out, sampled);
    }
    let (victim, _) = preempted.expect("pool of 5 blocks must preempt");
    assert_eq!(victim, RequestId(2), "the newest request is preempted");
    let req = s.request(victim).unwrap();
    assert_eq!(req.num_computed_tokens, 0);
    assert!(!req.output_tokens.is_empty());
    let (_, _) = drive(&mut s, |_, _| 3);
}

/// Three adapter generations from the tiny fixture (shapes of the tiny Llama).
fn adapters() -> Vec<std::sync::Arc<pagoda_adapters::LoraAdapter>> {
    use pagoda_models::LoraShapes;
    let shapes = LoraShapes {
        num_layers: 2,
        features: [
            (64, 64),
            (64, 32),
            (64, 32),
            (64, 64),
            (64, 128),
            (64, 128),
            (128, 64),
        ],
    };
    let reg = pagoda_adapters::AdapterRegistry::new(shapes, Default::default(), vec![]);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tiny-llama-lora/qv-r4");
    ["a", "b", "c"]
        .iter()
        .map(|n| {
            reg.load(n, &dir).unwrap();
            reg.resolve(n).unwrap()
        })
        .collect()
}

#[test]
fn distinct_adapters_in_flight_stay_within_max_loras() {
    let mut s = scheduler(64, 64, 8);
    s.set_max_loras(2);
    let ad = adapters();
    // a, b, c, a, none: c must wait for a slot; the second a and the base request need none.
    for (id, a) in [Some(0), Some(1), Some(2), Some(0), None]
        .into_iter()
        .enumerate()
    {
        let mut r = request(id as u64 + 1, 4, 2 + id);
        r.adapter = a.map(|i| ad[i].clone());
        s.add(r);
    }
    let out = s.schedule();
    let ids: Vec<u64> = out.scheduled.iter().map(|r| r.id.0).collect();
    assert_eq!(ids, vec![1, 2, 4, 5], "c waits; the rest run");
    assert_eq!(s.waiting.peek(), Some(RequestId(3)), "c keeps its place");
    let mut steps_with_c = 0;
    let mut max_distinct = 0;
    while s.has_work() {
        let out = s.schedule();
        let distinct: HashSet<_> = s
            .running
            .iter()
            .filter_map(|id| s.requests[id].adapter_id())
            .collect();
        max_distinct = max_distinct.max(distinct.len());
        steps_with_c += usize::from(out.scheduled.iter().any(|r| r.id.0 == 3));
        let sampled = out
            .scheduled
            .iter()
            .filter(|r| r.samples)
            .map(|r| (r.id, token(7)))
            .collect();
        s.update(&out, sampled);
    }
    assert_eq!(max_distinct, 2);
    assert!(steps_with_c > 0, "c ran once a slot freed");
    assert_eq!(s.kv().num_free_blocks(), s.kv().num_blocks());
}
