//! The engine against llama.cpp on the real SmolLM2-135M Q4_1 GGUF (same file,
//! same prompt tokens), using outputs recorded from llama-server.

use retune_e2e::{llamacpp_fixture, model_path};
use retune_engine::sampler::{argmax, log_sum_exp};
use retune_engine::*;
use std::sync::OnceLock;

fn loaded() -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| load(&model_path()).expect("load real model"))
}

/// Feed `tokens` and return the logits of the last one.
fn feed(m: &Model, tokens: &[u32], kv: &mut retune_engine::kv::KvCache) -> Vec<f32> {
    m.forward(&mut [BatchItem {
        adapter: None,
        tokens,
        kv,
        want_logits: true,
    }])
    .unwrap()
    .remove(0)
}

#[test]
fn chat_template_and_prompt_tokens_match_llamacpp() {
    let l = loaded();
    for chat in llamacpp_fixture().chats {
        let msgs: Vec<ChatMessage> = chat
            .messages
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content))
            .collect();
        let rendered = l.template.render(&msgs, true).unwrap();
        assert_eq!(rendered, chat.rendered);
        assert_eq!(
            l.tok.encode(&rendered, true).unwrap(),
            chat.prompt_tokens,
            "{rendered:?}"
        );
    }
}

#[test]
fn tokenizer_matches_llamacpp_tokenize_and_detokenize() {
    let l = loaded();
    for case in llamacpp_fixture().tokenize {
        assert_eq!(
            l.tok.encode(&case.text, false).unwrap(),
            case.ids,
            "encode {:?}",
            case.text
        );
        assert_eq!(
            l.tok.decode(&case.ids, false).unwrap(),
            case.detokenized,
            "decode {:?}",
            case.text
        );
    }
}

#[test]
fn teacher_forced_top1_and_first_step_logprobs_match_llamacpp() {
    let m = &loaded().model;
    let (mut decisive, mut violations, mut max_first) = (0, Vec::new(), 0f32);
    let mut agree_free = Vec::new();
    for (ci, chat) in llamacpp_fixture().chats.iter().enumerate() {
        let mut kv = m.new_cache();
        let mut logits = feed(m, &chat.prompt_tokens, &mut kv);
        for (si, step) in chat.steps.iter().enumerate() {
            let lse = log_sum_exp(&logits);
            if si == 0 {
                for &(id, lp) in &step.top {
                    let ours = logits[id as usize] - lse;
                    max_first = max_first.max((ours - lp).abs());
                    assert!(
                        (ours - lp).abs() <= 0.35,
                        "chat {ci} first step token {id}: ours {ours} llama.cpp {lp}"
                    );
                }
            }
            if step.top.len() >= 2 && step.top[0].1 - step.top[1].1 > 0.3 {
                decisive += 1;
                let ours = argmax(&logits);
                if ours != step.top[0].0 {
                    violations.push((ci, si, ours, step.top[0].0));
                }
            }
            if si + 1 < chat.steps.len() {
                logits = feed(m, &[step.id], &mut kv);
            }
        }
        // free-running greedy: how long do we follow llama.cpp's text?
        let mut kv = m.new_cache();
        let mut l = feed(m, &chat.prompt_tokens, &mut kv);
        let mut n = 0;
        for &want in &chat.continuation {
            let t = argmax(&l);
            if t != want {
                break;
            }
            n += 1;
            l = feed(m, &[t], &mut kv);
        }
        agree_free.push((n, chat.continuation.len()));
    }
    println!("decisive steps {decisive}, violations {violations:?}, max first-step |Δlogprob| {max_first:.4}");
    println!("free-running greedy agreement (tokens matched / llama.cpp length): {agree_free:?}");
    assert!(
        decisive >= 100,
        "too few decisive steps ({decisive}) for a meaningful check"
    );
    assert!(
        violations.is_empty(),
        "top-1 disagreements at decisive steps: {violations:?}"
    );
}

#[test]
fn greedy_tokens_identical_alone_and_in_a_batch_of_eight() {
    let l = load(&model_path()).unwrap();
    let prompts: Vec<Vec<u32>> = llamacpp_fixture()
        .chats
        .into_iter()
        .map(|c| c.prompt_tokens)
        .take(8)
        .collect();
    assert_eq!(prompts.len(), 8);
    let lens: std::collections::HashSet<usize> = prompts.iter().map(Vec::len).collect();
    assert!(lens.len() >= 6, "prompts should differ in length");
    let engine = Engine::start(
        l.model,
        l.tok,
        EngineConfig {
            prefill_chunk: 64,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let req = |p: &Vec<u32>| {
        GenerateRequest::new(
            p.clone(),
            SamplingParams {
                stop_on_eos: false,
                ..SamplingParams::greedy(24)
            },
        )
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| engine.generate_blocking(req(p)).unwrap().ids())
        .collect();
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(req(p)).unwrap())
        .collect();
    for (i, (mut s, want)) in streams.into_iter().zip(&alone).enumerate() {
        let mut got = Vec::new();
        while let Some(ev) = s.blocking_next() {
            match ev {
                Event::Token(t) => got.push(t.id),
                Event::Done(_) => break,
                Event::Error(e) => panic!("{e}"),
            }
        }
        assert_eq!(&got, want, "prompt {i}");
    }
}
