//! Exact-match accuracy of greedy answers on held-out chat examples, computed
//! with the serving engine's own CPU forward (the model and adapter exactly as
//! served), batched.

use crate::error::{Result, TrainError};
use retune_adapters::LoraAdapter;
use retune_datasets::ExampleBody;
use retune_engine::guide::{Constraint, Guide};
use retune_engine::{BatchItem, ChatMessage, ChatTemplate, Model, Tok};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    pub seconds: f64,
    /// Each example's answer, in order.
    #[serde(skip)]
    pub answers: Vec<String>,
}

pub fn argmax(v: &[f32]) -> u32 {
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
pub(crate) fn case(
    body: &ExampleBody,
    tok: &Tok,
    template: &ChatTemplate,
) -> Result<(Vec<u32>, String)> {
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
    let prompt = template.render_marked(&msgs, true)?;
    Ok((
        tok.encode_chat(&prompt, true)?,
        last.content.trim().to_string(),
    ))
}

/// Greedy answers (at most `max_new` tokens; only `labels` when given, as a
/// declared label task is served) compared with the expected ones.
pub fn exact_match(
    model: &Model,
    tok: &Tok,
    template: &ChatTemplate,
    adapter: Option<&LoraAdapter>,
    examples: &[ExampleBody],
    (max_new, batch): (usize, usize),
    labels: Option<&[String]>,
) -> Result<Accuracy> {
    let started = std::time::Instant::now();
    let cases = examples
        .iter()
        .map(|b| case(b, tok, template))
        .collect::<Result<Vec<_>>>()?;
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.0.clone()).collect();
    let texts: Vec<String> = examples
        .iter()
        .map(retune_datasets::snapshot::classifier_text)
        .collect();
    let answers = generate(
        model,
        tok,
        adapter,
        &prompts,
        (max_new, batch),
        labels,
        Some(&texts),
    )?;
    let correct = answers
        .iter()
        .zip(&cases)
        .filter(|(got, (_, want))| got.trim() == want)
        .count();
    let total = cases.len();
    Ok(Accuracy {
        correct,
        total,
        accuracy: correct as f64 / total.max(1) as f64,
        seconds: started.elapsed().as_secs_f64(),
        answers,
    })
}

/// Length of the token prefix every prompt shares.
fn common_prefix(prompts: &[Vec<u32>]) -> usize {
    let Some(first) = prompts.first() else {
        return 0;
    };
    let mut n = first.len();
    for p in &prompts[1..] {
        n = n.min(first.iter().zip(p).take_while(|(a, b)| a == b).count());
    }
    n
}

/// Greedy decoding of each prompt (at most `max_new` tokens, stopping at an
/// end-of-sequence token), `batch` prompts per forward, through the serving
/// engine's CPU forward. A prefix every prompt shares (a long system prompt,
/// few-shot turns) is computed once and its KV cache copied. A classifier
/// adapter answers its best label, weighed by its classical prior on each
/// prompt's `texts` entry when both are there (as the server does).
pub fn generate(
    model: &Model,
    tok: &Tok,
    adapter: Option<&LoraAdapter>,
    prompts: &[Vec<u32>],
    (max_new, batch): (usize, usize),
    labels: Option<&[String]>,
    texts: Option<&[String]>,
) -> Result<Vec<String>> {
    Ok(generate_ids(
        model,
        tok,
        adapter,
        prompts,
        (max_new, batch),
        labels,
        texts,
    )?
    .iter()
    .map(|ids| tok.decode(ids, true))
    .collect::<std::result::Result<Vec<_>, _>>()?)
}

/// [`generate`]'s token ids (without the end-of-sequence token).
pub fn generate_ids(
    model: &Model,
    tok: &Tok,
    adapter: Option<&LoraAdapter>,
    prompts: &[Vec<u32>],
    (max_new, batch): (usize, usize),
    labels: Option<&[String]>,
    texts: Option<&[String]>,
) -> Result<Vec<Vec<u32>>> {
    if texts.is_some_and(|t| t.len() != prompts.len()) {
        return Err(TrainError::Data(
            "classifier texts and prompts differ in number".into(),
        ));
    }
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(TrainError::Data("an empty prompt".into()));
    }
    // a declared label task is decoded as it is served: only its labels
    let guide = labels
        .map(|l| {
            tok.grammars()?.compile(&Constraint::Choice {
                choices: l.to_vec(),
            })
        })
        .transpose()?;
    let pick = |g: &mut Option<Guide>, logits: &mut [f32]| -> Result<u32> {
        if let Some(g) = g {
            g.mask()?.apply(logits);
        }
        Ok(argmax(logits))
    };
    // leave every prompt at least one token of its own to forward
    let shared = common_prefix(prompts).min(prompts.iter().map(|p| p.len() - 1).min().unwrap_or(0));
    let prefix_cache = if shared >= 8 {
        let mut kv = model.new_cache();
        let mut items = [BatchItem {
            tokens: &prompts[0][..shared],
            adapter,
            kv: &mut kv,
            want_logits: false,
            only: None,
        }];
        model.forward(&mut items)?;
        Some(kv)
    } else {
        None
    };
    let skip = if prefix_cache.is_some() { shared } else { 0 };
    let mut answers = Vec::with_capacity(prompts.len());
    for (c, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let mut caches: Vec<_> = chunk
            .iter()
            .map(|_| prefix_cache.clone().unwrap_or_else(|| model.new_cache()))
            .collect();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); chunk.len()];
        let mut done = vec![false; chunk.len()];
        let mut first = {
            let mut items: Vec<BatchItem<'_>> = chunk
                .iter()
                .zip(caches.iter_mut())
                .map(|(p, kv)| BatchItem {
                    tokens: &p[skip..],
                    adapter,
                    kv,
                    want_logits: true,
                    only: None,
                })
                .collect();
            model.forward(&mut items)?
        };
        if let Some(head) = adapter.and_then(|a| a.head.as_ref()) {
            // a classifier's answer is its best label, whole (a label longer
            // than `max_new` tokens is still the answer it gives)
            for (i, l) in first.iter().enumerate() {
                let text = texts
                    .and_then(|t| t.get(c * batch.max(1) + i))
                    .map(String::as_str);
                let lp = head.log_probs(l, text);
                let label = head.labels.get(argmax(&lp) as usize).ok_or_else(|| {
                    TrainError::Setting("the classifier's scores do not match its labels".into())
                })?;
                answers.push(tok.encode(label, false)?);
            }
            continue;
        }
        let mut guides: Vec<Option<Guide>> = chunk.iter().map(|_| guide.clone()).collect();
        let mut next = first
            .iter_mut()
            .zip(guides.iter_mut())
            .map(|(l, g)| pick(g, l))
            .collect::<Result<Vec<u32>>>()?;
        for step in 0..max_new {
            for (i, &t) in next.iter().enumerate() {
                if !done[i] {
                    if tok.eos.contains(&t) {
                        done[i] = true;
                    } else {
                        out[i].push(t);
                        if let Some(g) = &mut guides[i] {
                            g.commit(t)?;
                            done[i] = g.is_done();
                        }
                    }
                }
            }
            if done.iter().all(|d| *d) || step + 1 == max_new {
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
                    only: None,
                })
                .collect();
            let mut logits = model.forward(&mut items)?;
            for (k, &i) in live.iter().enumerate() {
                next[i] = pick(&mut guides[i], &mut logits[k])?;
            }
        }
        answers.extend(out);
    }
    Ok(answers)
}
