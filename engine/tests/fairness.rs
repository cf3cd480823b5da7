//! Tenants share the engine fairly: the queue, the KV budget and prefill; the
//! drain cut-off ends every generation with an error.

use retune_engine::tiny::{self, TinySpec};
use retune_engine::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-fair-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn engine(name: &str, cfg: EngineConfig) -> Engine {
    let dir = tmpdir(name);
    let spec = TinySpec {
        context: 1024,
        ..TinySpec::default()
    };
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let l = load(&gguf).unwrap();
    Engine::start(l.model, l.tok, cfg).unwrap()
}

fn submit(e: &Engine, tenant: &str, prompt_len: usize, max_tokens: usize) -> GenerationStream {
    let prompt: Vec<u32> = (0..prompt_len).map(|j| (j * 7 % 200 + 3) as u32).collect();
    let params = SamplingParams {
        stop_on_eos: false,
        ..SamplingParams::greedy(max_tokens)
    };
    let v = e
        .validate(prompt, params, None)
        .unwrap()
        .with_tenant(tenant);
    e.submit(v).unwrap()
}

/// When the engine sampled the first token, then runs the stream to its end.
fn first_token_at(mut s: GenerationStream) -> Instant {
    let mut first = None;
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token(t) => {
                first.get_or_insert(t.at);
            }
            Event::Done(_) => break,
            Event::Error(e) => panic!("{e}"),
        }
    }
    first.expect("no token")
}

#[test]
fn a_tenant_cannot_fill_the_queue_for_everyone() {
    let cfg = EngineConfig {
        max_batch: 1,
        max_queue: 8,
        tenant_weights: HashMap::from([("a".into(), 1), ("b".into(), 1)]),
        ..EngineConfig::default()
    };
    let e = engine("queue", cfg);
    // one long generation holds the only batch slot
    let running = submit(&e, "a", 8, 900);
    let mut accepted_a = Vec::new();
    let mut refused_a = 0;
    for _ in 0..20 {
        let prompt = vec![5, 6, 7];
        let v = e
            .validate(prompt, SamplingParams::greedy(4), None)
            .unwrap()
            .with_tenant("a");
        match e.submit(v) {
            Ok(s) => accepted_a.push(s),
            Err(err) => {
                assert_eq!(err.kind, ErrorKind::Capacity, "{err}");
                refused_a += 1;
            }
        }
    }
    // a's share of 8 places among two equal tenants is 4 (the running one has left the queue)
    assert!(accepted_a.len() <= 5, "a took {} places", accepted_a.len());
    assert!(refused_a >= 15);
    // b still gets in, up to its own share
    let mut accepted_b = Vec::new();
    for _ in 0..4 {
        accepted_b.push(submit(&e, "b", 3, 4));
    }
    drop(running);
    for s in accepted_b.into_iter().chain(accepted_a) {
        first_token_at(s);
    }
}

#[test]
fn a_short_prompt_is_not_starved_behind_another_tenants_long_prompts() {
    let cfg = EngineConfig {
        prefill_chunk: 16,
        ..EngineConfig::default()
    };
    let e = engine("prefill", cfg);
    // two 600-token prompts: 75 steps of prefill at 16 tokens a step
    let long1 = submit(&e, "a", 600, 2);
    let long2 = submit(&e, "a", 600, 2);
    let short = submit(&e, "b", 3, 2);
    let waits: Vec<_> = [long1, long2, short]
        .into_iter()
        .map(|s| std::thread::spawn(move || first_token_at(s)))
        .collect();
    let t: Vec<Instant> = waits.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        t[2] < t[0] && t[2] < t[1],
        "the 3-token prompt waited for the long prefills"
    );
}

#[test]
fn a_tenant_over_its_kv_share_waits_while_another_tenant_waits() {
    // reservations of 300 tokens (prompt + max_tokens), 3 fit in 1000: a's first
    // three run (the first is short: a long prompt, few tokens), a's fourth and
    // b's first wait; when a's first ends only one fits, and b (holding nothing)
    // goes before a (holding 600)
    let cfg = EngineConfig {
        max_kv_tokens: 1000,
        prefill_chunk: 64,
        ..EngineConfig::default()
    };
    let e = engine("kv", cfg);
    let a1 = submit(&e, "a", 250, 50);
    let a2 = submit(&e, "a", 20, 280);
    let a3 = submit(&e, "a", 20, 280);
    let a4 = submit(&e, "a", 20, 280);
    let b1 = submit(&e, "b", 20, 280);
    let waits: Vec<_> = [a1, a2, a3, a4, b1]
        .into_iter()
        .map(|s| std::thread::spawn(move || first_token_at(s)))
        .collect();
    let t: Vec<Instant> = waits.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        t[4] < t[3],
        "b waited behind a's fourth request though a held twice its share"
    );
}

#[test]
fn abort_all_ends_running_and_queued_generations_and_refuses_new_ones() {
    let cfg = EngineConfig {
        max_batch: 1,
        ..EngineConfig::default()
    };
    let e = engine("abort", cfg);
    let mut running = submit(&e, "a", 8, 1000);
    let mut queued = submit(&e, "b", 8, 10);
    // wait until the first generates
    match running.blocking_next() {
        Some(Event::Token(_)) => {}
        other => panic!("{other:?}"),
    }
    e.abort_all("drain deadline");
    let end = |s: &mut GenerationStream| loop {
        match s.blocking_next() {
            Some(Event::Token(_)) => continue,
            Some(Event::Error(err)) => return err,
            other => panic!("expected an error, got {other:?}"),
        }
    };
    assert_eq!(end(&mut running).kind, ErrorKind::Unavailable);
    assert_eq!(end(&mut queued).kind, ErrorKind::Unavailable);
    let v = e
        .validate(vec![1, 2], SamplingParams::greedy(2), None)
        .unwrap();
    assert_eq!(e.submit(v).err().unwrap().kind, ErrorKind::Unavailable);
    let t = Instant::now();
    while e.stats().running != 0 {
        assert!(t.elapsed().as_secs() < 5, "running never went to 0");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// How many of tenant `a`'s tokens arrive before tenant `b`'s first, when `b`
/// sends an 800-token prompt while `a` decodes.
fn a_tokens_before_b_first(name: &str, decoding_budget: usize) -> usize {
    let cfg = EngineConfig {
        prefill_chunk: 512,
        prefill_chunk_decoding: decoding_budget,
        tenant_weights: HashMap::from([("a".into(), 1), ("b".into(), 1)]),
        ..EngineConfig::default()
    };
    let e = engine(name, cfg);
    let mut a = submit(&e, "a", 4, 400);
    assert!(matches!(a.blocking_next(), Some(Event::Token(_))));
    let stamps = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = stamps.clone();
    let reader = std::thread::spawn(move || {
        while let Some(ev) = a.blocking_next() {
            match ev {
                // the engine's stamp: a reader that lags on a loaded
                // machine would count tokens sampled before b was sent
                Event::Token(t) => sink.lock().unwrap().push(t.at),
                Event::Done(_) => break,
                Event::Error(e) => panic!("{e}"),
            }
        }
    });
    // a's tokens while b's prompt goes in (from b's submission, not from a's start)
    let b_sent = Instant::now();
    let b_first = first_token_at(submit(&e, "b", 800, 1));
    reader.join().unwrap();
    let n = stamps
        .lock()
        .unwrap()
        .iter()
        .filter(|t| **t >= b_sent && **t < b_first)
        .count();
    n
}

#[test]
fn while_a_tenant_decodes_another_tenants_long_prompt_is_fed_in_small_steps() {
    // a small per-step budget: `a` keeps decoding (one token a step) while
    // `b`'s prompt goes in a few token equivalents at a time
    let small = a_tokens_before_b_first("small-steps", 16);
    // the whole chunk at once: `b`'s prompt takes a handful of big steps
    let big = a_tokens_before_b_first("big-steps", 512);
    assert!(small >= 60, "only {small} of a's tokens before b's first");
    assert!(
        big <= 15,
        "{big} of a's tokens before b's first with a 512 budget"
    );
}

#[test]
fn a_tenant_runs_at_most_its_share_of_rows_while_another_is_active() {
    let cfg = EngineConfig {
        max_batch: 4,
        tenant_weights: HashMap::from([("a".into(), 1), ("b".into(), 1)]),
        ..EngineConfig::default()
    };
    let e = engine("rows", cfg);
    let mut a = submit(&e, "a", 4, 600);
    assert!(matches!(a.blocking_next(), Some(Event::Token(_))));
    let bs: Vec<_> = (0..6).map(|_| submit(&e, "b", 4, 40)).collect();
    let readers: Vec<_> = bs
        .into_iter()
        .map(|s| std::thread::spawn(move || first_token_at(s)))
        .collect();
    let mut most = 0;
    while readers.iter().any(|r| !r.is_finished()) {
        most = most.max(e.stats().running);
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    for r in readers {
        r.join().unwrap();
    }
    // a's one row and b's share of two (of four): never the whole batch
    assert_eq!(most, 3, "at most {most} rows ran at once");
    drop(a);
}
