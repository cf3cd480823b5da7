//! The engine against llama.cpp on the real SmolLM2-135M Q4_1 GGUF (same file,
//! same prompt tokens), using outputs recorded from llama-server, and against the
//! exact reference (transformers on the same weights in f32) on the same tokens;
//! the numeric checks run on every kernel path this machine can run.

use retune_e2e::{
    check_tokenize, exact_reference, llamacpp_fixture, model_path, on_every_path, teacher_forced,
    Bounds,
};
use retune_engine::*;
use std::sync::OnceLock;

fn loaded() -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| load(&model_path()).expect("load real model"))
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
    check_tokenize(&loaded().tok, &llamacpp_fixture().tokenize);
}

#[test]
fn teacher_forced_top1_and_first_step_logprobs_match_llamacpp() {
    let fx = llamacpp_fixture();
    let exact = exact_reference("llamacpp_smollm2_q4_1.json");
    on_every_path(|p| {
        let l = load(&model_path()).expect("load real model");
        let r = teacher_forced(&l.model, None, &fx, &exact, &Bounds::of(p));
        r.check(&Bounds::of(p)).map(|_| format!("{r:?}"))
    });
}

#[test]
fn greedy_tokens_identical_alone_and_in_a_batch_of_eight() {
    on_every_path(|_| {
        alone_and_batched_agree();
        Ok("identical".into())
    });
}

fn alone_and_batched_agree() {
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
        .map(|p| engine.generate(req(p)).unwrap())
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
