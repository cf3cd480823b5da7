//! The prefix cache through the scheduler, on tiny random models: outputs with
//! the cache are bit-identical to outputs without it (tokens and logprobs),
//! tenants never share entries unless they opted in to the public scope,
//! adapters never share with the base or with each other, and a prompt longer
//! than the cache is served uncached.

use retune_adapters::{AdapterPool, AdapterRef, DirSource, PoolConfig, Via};
use retune_engine::tiny::{self, TinySpec};
use retune_engine::*;
use std::path::PathBuf;
use std::sync::Arc;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-prefix-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const ALL: [usize; 7] = [0, 1, 2, 3, 4, 5, 6];

struct Setup {
    gguf: PathBuf,
    adapters: PathBuf,
}

fn setup(name: &str) -> Setup {
    let dir = tmpdir(name);
    let spec = TinySpec {
        context: 512,
        ..TinySpec::default()
    };
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let adapters = dir.join("adapters");
    for (i, n) in ["a1", "a2"].iter().enumerate() {
        tiny::write_adapter(&adapters.join(n), &spec, 4, &ALL, 10 + i as u64, 8.0, 0.3).unwrap();
    }
    Setup { gguf, adapters }
}

fn engine(s: &Setup, prefix: PrefixConfig) -> Engine {
    let l = load(&s.gguf).unwrap();
    let pool = AdapterPool::new(
        Arc::new(DirSource {
            root: s.adapters.clone(),
        }),
        l.model.base_shapes(),
        PoolConfig::default(),
    );
    let cfg = EngineConfig {
        prefill_chunk: 24,
        prefill_chunk_decoding: 8,
        prefix_cache: prefix,
        ..EngineConfig::default()
    };
    Engine::start_with_pool(l.model, l.tok, cfg, Some(pool)).unwrap()
}

fn off() -> PrefixConfig {
    PrefixConfig {
        max_tokens: 0,
        ..PrefixConfig::default()
    }
}

fn on() -> PrefixConfig {
    PrefixConfig {
        max_tokens: 4096,
        block: 8,
        scope_share: 0.5,
        ..PrefixConfig::default()
    }
}

#[derive(Clone)]
struct Req {
    tenant: &'static str,
    adapter: Option<&'static str>,
    prompt: Vec<u32>,
    seed: u64,
}

/// (token id, logprob bits, top alternatives' bits) of every sampled token,
/// and the prompt positions the cache supplied.
type Out = (Vec<(u32, u32, Vec<(u32, u32)>)>, usize);

fn stream_of(e: &Engine, r: &Req) -> GenerationStream {
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(r.seed),
        stop_on_eos: false,
        logprobs: Some(3),
        ..SamplingParams::greedy(10)
    };
    let adapter = r
        .adapter
        .map(|n| AdapterRef::new("t", n, "v1", Via::Pinned).unwrap());
    let valid = e
        .validate(r.prompt.clone(), params, adapter)
        .unwrap()
        .with_tenant(r.tenant);
    e.submit(valid).unwrap()
}

fn collect(mut s: GenerationStream) -> Out {
    let mut toks = Vec::new();
    loop {
        match s.blocking_next() {
            Some(Event::Token(t)) => toks.push((
                t.id,
                t.logprob.map(f32::to_bits).unwrap_or(0),
                t.top.iter().map(|(i, p)| (*i, p.to_bits())).collect(),
            )),
            Some(Event::Done(c)) => return (toks, c.cached_tokens),
            Some(Event::Error(e)) => panic!("{e}"),
            None => panic!("stream ended"),
        }
    }
}

fn run_one(e: &Engine, r: &Req) -> Out {
    collect(stream_of(e, r))
}

fn run_all(e: &Engine, rs: &[Req]) -> Vec<Out> {
    let streams: Vec<_> = rs.iter().map(|r| stream_of(e, r)).collect();
    streams.into_iter().map(collect).collect()
}

/// A 100-token "system prompt" and short distinct endings.
fn prompts() -> (Vec<u32>, Vec<Vec<u32>>) {
    let system: Vec<u32> = (0..100).map(|i| 3 + (i * 7 % 50) as u32).collect();
    let endings = (0..6)
        .map(|k| {
            let mut p = system.clone();
            p.extend((0..5 + k).map(|j| 60 + ((j * 3 + k) % 30) as u32));
            p
        })
        .collect();
    (system, endings)
}

#[test]
fn with_the_cache_outputs_are_bit_identical_to_without_it() {
    let s = setup("identical");
    let (_, ps) = prompts();
    let mut reqs = Vec::new();
    for (k, p) in ps.iter().enumerate() {
        let adapter = [None, Some("a1"), Some("a2")][k % 3];
        for tenant in ["x", "y"] {
            reqs.push(Req {
                tenant,
                adapter,
                prompt: p.clone(),
                seed: k as u64,
            });
        }
    }
    let reference = engine(&s, off());
    let want: Vec<Out> = reqs.iter().map(|r| run_one(&reference, r)).collect();
    assert!(want.iter().all(|o| o.1 == 0), "no cache, nothing reused");
    let cached = engine(&s, on());
    // one at a time: the first of each (tenant, adapter) fills, the rest hit
    let one: Vec<Out> = reqs.iter().map(|r| run_one(&cached, r)).collect();
    // all at once, the cache warm: every prompt reuses the system prompt
    let all = run_all(&cached, &reqs);
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(one[i].0, want[i].0, "request {i} one at a time");
        assert_eq!(all[i].0, want[i].0, "request {i} in a batch");
        assert!(all[i].1 >= 96, "request {i} reused only {}", all[i].1);
        assert_eq!(all[i].1 % 8, 0);
        assert!(all[i].1 < r.prompt.len());
    }
    // the first request of each (tenant, adapter) found nothing to reuse
    assert_eq!(one[0].1, 0);
    assert_eq!(one[1].1, 0, "tenant y does not see tenant x's entries");
    assert!(one[6].1 >= 96, "same tenant, same adapter (base) again");
    let st = cached.stats().prefix.unwrap();
    assert!(st.hits >= 18 && st.tokens_reused >= 18 * 96, "{st:?}");
    assert_eq!(st.evictions, 0);
}

#[test]
fn tenants_share_entries_only_in_the_public_scope() {
    let s = setup("scopes");
    let (_, ps) = prompts();
    let r = |tenant| Req {
        tenant,
        adapter: None,
        prompt: ps[0].clone(),
        seed: 1,
    };
    let mut cfg = on();
    cfg.public_tenants.insert("pub1".into());
    cfg.public_tenants.insert("pub2".into());
    let e = engine(&s, cfg);
    let first = run_one(&e, &r("x"));
    assert_eq!(first.1, 0);
    assert_eq!(run_one(&e, &r("y")).1, 0, "another tenant never hits");
    assert_eq!(run_one(&e, &r("pub1")).1, 0, "the public scope is apart");
    let shared = run_one(&e, &r("pub2"));
    assert_eq!(shared.1, 104, "opted in: the public scope is shared");
    assert_eq!(run_one(&e, &r("x")).1, 104, "its own entries");
    assert_eq!(shared.0, first.0);
}

#[test]
fn a_prompt_longer_than_the_cache_is_served_uncached() {
    let s = setup("too-long");
    let (_, ps) = prompts();
    let small = PrefixConfig {
        max_tokens: 64,
        block: 8,
        scope_share: 1.0,
        ..PrefixConfig::default()
    };
    let e = engine(&s, small);
    let reference = engine(&s, off());
    let r = Req {
        tenant: "x",
        adapter: Some("a1"),
        prompt: ps[2].clone(),
        seed: 3,
    };
    let want = run_one(&reference, &r);
    assert_eq!(run_one(&e, &r), want);
    assert_eq!(
        run_one(&e, &r),
        want,
        "again: still not cached, same output"
    );
    let st = e.stats().prefix.unwrap();
    assert_eq!((st.uncached_too_long, st.hits, st.tokens), (2, 0, 0));
    // a short prompt still is
    let short = Req {
        prompt: ps[2][..40].to_vec(),
        ..r
    };
    assert_eq!(run_one(&e, &short).1, 0);
    assert_eq!(run_one(&e, &short).1, 32);
}

#[test]
fn prompts_arriving_together_compute_their_shared_prefix_once() {
    let s = setup("together");
    let (_, ps) = prompts();
    let reqs: Vec<Req> = ps
        .iter()
        .enumerate()
        .map(|(k, p)| Req {
            tenant: "x",
            adapter: Some("a1"),
            prompt: p.clone(),
            seed: k as u64,
        })
        .collect();
    let reference = engine(&s, off());
    let want = run_all(&reference, &reqs);
    // a cold cache, every request submitted at once
    let e = engine(&s, on());
    let got = run_all(&e, &reqs);
    let reused: Vec<usize> = got.iter().map(|o| o.1).collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.0, w.0, "request {i}");
    }
    // one of them computed the 96 shared positions; the others took them
    assert_eq!(reused.iter().filter(|&&r| r == 0).count(), 1, "{reused:?}");
    assert!(reused.iter().all(|&r| r == 0 || r == 96), "{reused:?}");
    let st = e.stats().prefix.unwrap();
    assert_eq!((st.hits, st.misses), (5, 1));
    // and with another tenant among them, that tenant computes its own
    let mut mixed = reqs.clone();
    mixed[3].tenant = "y";
    let e = engine(&s, on());
    let got = run_all(&e, &mixed);
    assert_eq!(got[3].1, 0, "tenant y never takes tenant x's prefix");
    assert_eq!(got.iter().filter(|o| o.1 == 0).count(), 2);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.0, w.0);
    }
}
