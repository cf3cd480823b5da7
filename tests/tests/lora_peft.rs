//! A real PEFT-made adapter (tests/fixtures/lora/adapter, made by
//! scripts/make-lora-fixture.py with HF peft) on the real Q4_1 GGUF, checked
//! against transformers+peft and against llama.cpp serving the same adapter
//! converted by its convert_lora_to_gguf.py.

use retune_adapters::{load_peft, LoadLimits, LoraAdapter};
use retune_e2e::{fixture_path, model_path, read_fixture, teacher_forced, LlamaCppFixture};
use retune_engine::sampler::log_sum_exp;
use retune_engine::*;
use serde::Deserialize;
use std::sync::OnceLock;

fn setup() -> &'static (Model, LoraAdapter) {
    static S: OnceLock<(Model, LoraAdapter)> = OnceLock::new();
    S.get_or_init(|| {
        let m = load(&model_path()).expect("model").model;
        let a = load_peft(
            &fixture_path("lora/adapter"),
            &m.base_shapes(),
            &LoadLimits::default(),
        )
        .expect("adapter");
        (m, a)
    })
}

#[derive(Deserialize)]
struct HfChat {
    prompt_tokens: Vec<u32>,
    top: Vec<(u32, f64)>,
}

#[derive(Deserialize)]
struct HfRef {
    chats: Vec<HfChat>,
}

#[test]
fn peft_adapter_matches_transformers_peft_on_the_same_weights() {
    // transformers computes in f32 on the dequantized weights: compare on this
    // machine's f32-activation path (the int8 path's agreement is checked
    // against llama.cpp, which quantizes activations the same way)
    let f32_path = retune_engine::kernels_f32::best_f32_path();
    retune_engine::kernels_f32::set_path(f32_path).unwrap();
    let (m, a) = setup();
    let hf: HfRef = read_fixture("lora/hf_peft_first_step.json");
    let mut worst = 0f64;
    let mut moved = 0f64;
    for chat in &hf.chats {
        let logp = |adapter: Option<&LoraAdapter>| {
            let mut kv = m.new_cache();
            let l = m
                .forward(&mut [BatchItem {
                    tokens: &chat.prompt_tokens,
                    adapter,
                    kv: &mut kv,
                    want_logits: true,
                }])
                .unwrap()
                .remove(0);
            let lse = log_sum_exp(&l);
            l.iter().map(|v| (v - lse) as f64).collect::<Vec<_>>()
        };
        let (with, without) = (logp(Some(a)), logp(None));
        for &(id, lp) in &chat.top {
            worst = worst.max((with[id as usize] - lp).abs());
            moved = moved.max((without[id as usize] - lp).abs());
        }
    }
    println!(
        "max |ours − transformers+peft| = {worst:.5}; base without adapter is {moved:.3} away"
    );
    // same dequantized weights, f32 activations on both sides: only summation order differs
    assert!(worst < 0.02, "{worst}");
    assert!(
        moved > 0.1,
        "the adapter should move the distribution ({moved})"
    );
}

/// The engine issue's check against llama.cpp serving the converted adapter. One
/// amendment, printed when used: a first-step logprob more than 0.35 from
/// llama.cpp still passes if transformers+peft (the exact reference on the same
/// weights) puts llama.cpp more than 0.35 away and us within 0.02 of it — then the
/// gap is llama.cpp's own error, not ours.
#[test]
fn peft_adapter_on_q4_1_gguf_agrees_with_llamacpp_serving_it() {
    let (m, a) = setup();
    let fx: LlamaCppFixture = read_fixture("lora/llamacpp_lora.json");
    let hf: HfRef = read_fixture("lora/hf_peft_first_step.json");
    let r = teacher_forced(m, Some(a), &fx);
    println!("{r:?}");
    assert!(r.decisive >= 100, "too few decisive steps ({})", r.decisive);
    assert!(
        r.violations.is_empty(),
        "top-1 disagreements at decisive steps: {:?}",
        r.violations
    );
    for (ci, (chat, h)) in fx.chats.iter().zip(&hf.chats).enumerate() {
        assert_eq!(chat.prompt_tokens, h.prompt_tokens);
        let mut kv = m.new_cache();
        let l = m
            .forward(&mut [BatchItem {
                tokens: &chat.prompt_tokens,
                adapter: Some(a),
                kv: &mut kv,
                want_logits: true,
            }])
            .unwrap()
            .remove(0);
        let lse = log_sum_exp(&l);
        for &(id, lp) in &chat.steps[0].top {
            let ours = (l[id as usize] - lse) as f64;
            let lp = lp as f64;
            if (ours - lp).abs() <= 0.35 {
                continue;
            }
            let exact = h.top.iter().find(|t| t.0 == id).map(|t| t.1);
            match exact {
                Some(e) if (lp - e).abs() > 0.35 && (ours - e).abs() < 0.02 => {
                    println!("chat {ci} token {id}: ours {ours:.3}, llama.cpp {lp:.3}, transformers+peft {e:.3} -> llama.cpp's error")
                }
                _ => panic!("chat {ci} first step token {id}: ours {ours}, llama.cpp {lp}, transformers+peft {exact:?}"),
            }
        }
    }
}

/// The same check, literally (no amendment), against llama.cpp run with an f32 KV
/// cache and flash attention off (`-ctk f32 -ctv f32 -fa off`), its most exact path.
#[test]
fn peft_adapter_passes_the_literal_check_against_llamacpp_f32_kv() {
    let (m, a) = setup();
    let fx: LlamaCppFixture = read_fixture("lora/llamacpp_lora_f32kv.json");
    let r = teacher_forced(m, Some(a), &fx);
    println!("{r:?}");
    assert!(r.decisive >= 100, "too few decisive steps ({})", r.decisive);
    assert!(
        r.violations.is_empty(),
        "top-1 disagreements at decisive steps: {:?}",
        r.violations
    );
    assert!(
        r.max_first_step_diff <= 0.35,
        "first-step top-5 logprobs differ by {}",
        r.max_first_step_diff
    );
}
