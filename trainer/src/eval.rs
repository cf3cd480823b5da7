//! Exact-match accuracy of greedy answers on held-out chat examples, computed
//! with the serving engine's own CPU forward (the model and adapter exactly as
//! served), batched.

use crate::error::{Result, TrainError};
use retune_adapters::LoraAdapter;
use retune_datasets::ExampleBody;
use retune_engine::{BatchItem, ChatMessage, ChatTemplate, Model, Tok};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    pub seconds: f64,
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// (prompt tokens, expected answer) of a chat example whose last message is the
/// assistant's answer.
fn case(body: &ExampleBody, tok: &Tok, template: &ChatTemplate) -> Result<(Vec<u32>, String)> {
    let ExampleBody::Chat { messages } = body else {
        return Err(TrainError::Data("accuracy needs chat examples".into()));
    };
    let Some((last, before)) = messages.split_last().filter(|(l, _)| l.role == "assistant") else {
        return Err(TrainError::Data(
            "an example does not end with an assistant answer".into(),
        ));
    };
    let msgs: Vec<ChatMessage> = before
        .iter()
        .map(|m| ChatMessage::new(&m.role, &m.content))
        .collect();
    let prompt = template.render(&msgs, true)?;
    Ok((tok.encode(&prompt, true)?, last.content.trim().to_string()))
}

/// Greedy answers (at most `max_new` tokens) compared with the expected ones.
pub fn exact_match(
    model: &Model,
    tok: &Tok,
    template: &ChatTemplate,
    adapter: Option<&LoraAdapter>,
    examples: &[ExampleBody],
    max_new: usize,
    batch: usize,
) -> Result<Accuracy> {
    let started = std::time::Instant::now();
    let cases = examples
        .iter()
        .map(|b| case(b, tok, template))
        .collect::<Result<Vec<_>>>()?;
    let mut correct = 0;
    for chunk in cases.chunks(batch.max(1)) {
        let mut caches: Vec<_> = chunk.iter().map(|_| model.new_cache()).collect();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); chunk.len()];
        let mut done = vec![false; chunk.len()];
        let mut next: Vec<u32> = {
            let mut items: Vec<BatchItem<'_>> = chunk
                .iter()
                .zip(caches.iter_mut())
                .map(|((p, _), kv)| BatchItem {
                    tokens: p,
                    adapter,
                    kv,
                    want_logits: true,
                })
                .collect();
            model
                .forward(&mut items)?
                .iter()
                .map(|l| argmax(l))
                .collect()
        };
        for _ in 0..max_new {
            for (i, &t) in next.iter().enumerate() {
                if !done[i] {
                    if tok.eos.contains(&t) {
                        done[i] = true;
                    } else {
                        out[i].push(t);
                    }
                }
            }
            if done.iter().all(|d| *d) {
                break;
            }
            let live: Vec<usize> = (0..chunk.len()).filter(|&i| !done[i]).collect();
            let toks: Vec<[u32; 1]> = live.iter().map(|&i| [next[i]]).collect();
            let mut items: Vec<BatchItem<'_>> = caches
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| !done[*i])
                .zip(&toks)
                .map(|((_, kv), t)| BatchItem {
                    tokens: t,
                    adapter,
                    kv,
                    want_logits: true,
                })
                .collect();
            let logits = model.forward(&mut items)?;
            for (k, &i) in live.iter().enumerate() {
                next[i] = argmax(&logits[k]);
            }
        }
        for (i, (_, want)) in chunk.iter().enumerate() {
            if tok.decode(&out[i], true)?.trim() == want {
                correct += 1;
            }
        }
    }
    let total = cases.len();
    Ok(Accuracy {
        correct,
        total,
        accuracy: correct as f64 / total.max(1) as f64,
        seconds: started.elapsed().as_secs_f64(),
    })
}
