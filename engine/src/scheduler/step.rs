//! One step: admitting a request into the batch (its KV, prefix-cache hit and
//! samples), then one forward over every decoding row and the planned prefill
//! chunks, sampling (grammar masks computed beside the forward) and emission.

use super::*;

impl Worker {
    pub(super) fn admit(&mut self, mut job: Job, adapter: Option<Arc<LoraAdapter>>) {
        let mut kv = match self.model.new_cache() {
            Ok(kv) => kv,
            Err(e) => {
                let _ = job.tx.send(Event::Error(GenError::internal(e.to_string())));
                return;
            }
        };
        let reserve = self.reserve_of(&job);
        self.reserved += reserve;
        self.stats
            .prompt_tokens
            .fetch_add(job.prompt.len(), Ordering::Relaxed);
        let mut stops = job.params.stop.clone();
        stops.retain(|s| !s.is_empty());
        job.clock.admitted = Some(std::time::Instant::now());
        let adapter = adapter.zip(job.adapter);
        let mut cached = 0;
        if let Some(prefix) = &mut self.prefix {
            // the running sequences' reservations come first: the cache keeps what is left
            prefix.shrink_to(self.cfg.max_kv_tokens.saturating_sub(self.reserved));
            let scope = prefix.scope_of(&job.tenant);
            if let Some(hit) = prefix.lookup(&scope, &weights_key(&adapter), &job.prompt) {
                cached = hit.tokens;
                kv = Cache::Host(hit.kv);
            }
        }
        let sampler = Sampler::with_prompt(job.params, &job.prompt);
        self.active.push(Seq {
            guide: job.guide,
            forks: job.forks,
            prompt: job.prompt,
            fed: cached,
            last: None,
            output: Vec::new(),
            kv,
            sampler,
            detok: Detok::default(),
            stop: StopText::new(stops),
            tx: job.tx,
            reserve,
            adapter,
            tenant: job.tenant,
            clock: job.clock,
            cached,
            text: job.text,
        });
    }

    pub(super) fn step(&mut self) {
        self.steps += 1;
        let waiting = self.share_prefixes();
        let plan = self.prefill_plan(&waiting);
        let mut inputs: Vec<(usize, Vec<u32>, bool)> = Vec::new();
        // a device runs a bounded number of distinct adapters per step: rows of
        // others wait a step (the starting row rotates, so every row gets its turn)
        let cap = self.model.max_step_adapters();
        let mut step_adapters: Vec<*const LoraAdapter> = Vec::new();
        let n = self.active.len();
        let start = if cap.is_some() && n > 0 {
            (self.steps as usize) % n
        } else {
            0
        };
        for k in 0..n {
            let i = (start + k) % n;
            let s = &self.active[i];
            if s.last.is_none() && plan[i] == 0 {
                continue;
            }
            if let (Some(cap), Some((a, _))) = (cap, &s.adapter) {
                let p = Arc::as_ptr(a);
                if !step_adapters.contains(&p) {
                    if step_adapters.len() >= cap {
                        continue;
                    }
                    step_adapters.push(p);
                }
            }
            if let Some(t) = s.last {
                inputs.push((i, vec![t], true));
            } else {
                let n = plan[i];
                inputs.push((
                    i,
                    s.prompt[s.fed..s.fed + n].to_vec(),
                    s.fed + n == s.prompt.len(),
                ));
            }
        }
        inputs.sort_by_key(|x| x.0);
        self.account(&inputs);
        self.stats
            .last_step_tokens
            .store(inputs.iter().map(|i| i.1.len()).sum(), Ordering::Relaxed);
        // grammar masks of the constrained rows sampling this step, computed on
        // another thread while the forward pass runs
        let mut guides: Vec<(usize, Guide)> = inputs
            .iter()
            .filter(|x| x.2)
            .filter_map(|x| self.active[x.0].guide.take().map(|g| (x.0, g)))
            .collect();
        let model = &self.model;
        let active = &mut self.active;
        // a large vocabulary: the masks first, so a row its grammar narrows to
        // a few tokens computes only their logits (the output projection is
        // then most of the step)
        let vocab = model.cfg().vocab;
        let early = self.cfg.sparse_head && vocab >= super::SPARSE_HEAD_VOCAB && !guides.is_empty();
        let early_masks: HashMap<usize, Result<Mask>> = if early {
            guides.iter_mut().map(|(i, g)| (*i, g.mask())).collect()
        } else {
            HashMap::new()
        };
        let allowed: HashMap<usize, Vec<u32>> = early_masks
            .iter()
            .filter_map(|(i, m)| {
                let ids = m
                    .as_ref()
                    .ok()?
                    .allowed(vocab / crate::model::SPARSE_HEAD_FRACTION)?;
                Some((*i, ids))
            })
            .collect();
        let (logits, masks) = std::thread::scope(|sc| {
            let masker = (!early && !guides.is_empty()).then(|| {
                sc.spawn(|| {
                    guides
                        .iter_mut()
                        .map(|(i, g)| (*i, g.mask()))
                        .collect::<HashMap<usize, Result<Mask>>>()
                })
            });
            let mut caches: Vec<Option<(&mut Cache, Option<&LoraAdapter>)>> = active
                .iter_mut()
                .map(|s| Some((&mut s.kv, s.adapter.as_ref().map(|a| &*a.0))))
                .collect();
            let mut items: Vec<BatchItem<'_, Cache>> = inputs
                .iter()
                .filter_map(|(i, toks, want)| {
                    caches[*i].take().map(|(kv, adapter)| BatchItem {
                        tokens: toks,
                        adapter,
                        kv,
                        want_logits: *want,
                        only: allowed.get(i).map(Vec::as_slice),
                    })
                })
                .collect();
            let logits = model.forward(&mut items);
            let masks = masker.map(|h| h.join().unwrap_or_default());
            (logits, masks.unwrap_or(early_masks))
        });
        for (i, g) in guides {
            self.active[i].guide = Some(g);
        }
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                let err = GenError::internal(format!("forward step: {e}"));
                for (i, _, _) in &inputs {
                    let _ = self.active[*i].tx.send(Event::Error(err.clone()));
                }
                let failed: Vec<usize> = inputs.iter().map(|x| x.0).collect();
                let mut idx = 0;
                self.active.retain(|_| {
                    idx += 1;
                    !failed.contains(&(idx - 1))
                });
                return;
            }
        };
        let mut logits = logits.into_iter();
        let mut finished = Vec::new();
        let mut forked: Vec<(Seq, Vec<f32>, usize)> = Vec::new();
        let context = self.model.cfg().context;
        // each sampling row's logits (by row), then the draws in parallel
        let mut rows: Vec<Option<Vec<f32>>> = (0..self.active.len()).map(|_| None).collect();
        let mut classified: Vec<(usize, Vec<f32>)> = Vec::new();
        let room = self.cfg.max_kv_tokens.saturating_sub(self.reserved);
        for (i, toks, want) in &inputs {
            let s = &mut self.active[*i];
            if s.last.is_none() {
                s.fed += toks.len();
                // what is in goes to the prefix cache, block by block, so
                // sequences waiting on the same prefix can take it
                if let (Some(prefix), Cache::Host(kv)) = (&mut self.prefix, &s.kv) {
                    if !toks.is_empty() {
                        let scope = prefix.scope_of(&s.tenant);
                        prefix.insert(&scope, &weights_key(&s.adapter), &s.prompt, kv, room);
                        if s.fed == s.prompt.len() {
                            prefix.count(s.cached > 0);
                        }
                    }
                }
            }
            if !*want {
                continue;
            }
            let Some(l) = logits.next() else { break };
            if head_of(s).is_some() {
                // a classifier answers its label (its forks too: they would
                // answer the same)
                classified.push((*i, l));
                continue;
            }
            if s.guide.is_some() && !matches!(masks.get(i), Some(Ok(_))) {
                let why = match masks.get(i) {
                    Some(Err(e)) => e.to_string(),
                    _ => "the grammar mask was not computed".into(),
                };
                let _ = s.tx.send(Event::Error(GenError::internal(why)));
                finished.push(*i);
                continue;
            }
            // n > 1: the other samples start from this prompt's cache and logits
            if !s.forks.is_empty() {
                let forks = std::mem::take(&mut s.forks);
                let one = s.reserve / (1 + forks.len());
                s.reserve = one;
                for (k, tx) in forks.into_iter().enumerate() {
                    let mut params = s.sampler.params().clone();
                    params.seed = params.seed.map(|x| x.wrapping_add(k as u64 + 1));
                    let (kv, fed, now) = match self.model.fork_cache(&s.kv) {
                        Some(kv) => (kv, s.fed, true),
                        None => match self.model.new_cache() {
                            Ok(kv) => (kv, 0, false),
                            Err(e) => {
                                let _ = tx.send(Event::Error(GenError::internal(e.to_string())));
                                continue;
                            }
                        },
                    };
                    let f = s.sibling(tx, kv, fed, params, one, if now { s.cached } else { 0 });
                    // a copied cache samples now, from the same logits; a
                    // fresh one prefills first
                    let l = if now { l.clone() } else { Vec::new() };
                    forked.push((f, l, *i));
                }
            }
            rows[*i] = Some(l);
        }
        // the draws are independent per row: over the thread pool
        let draws: Vec<Option<std::result::Result<Sampled, GenError>>> = {
            use rayon::prelude::*;
            let masks = &masks;
            let draw = |(i, (s, l)): (usize, (&mut Seq, &Option<Vec<f32>>))| {
                l.as_ref()
                    .map(|l| choose(s, l, masks.get(&i).and_then(|m| m.as_ref().ok())))
            };
            if rows.iter().filter(|r| r.is_some()).count() > 1 {
                self.active
                    .par_iter_mut()
                    .zip(rows.par_iter())
                    .enumerate()
                    .map(draw)
                    .collect()
            } else {
                self.active
                    .iter_mut()
                    .zip(rows.iter())
                    .enumerate()
                    .map(draw)
                    .collect()
            }
        };
        for (i, d) in draws.into_iter().enumerate() {
            let going = match d {
                None => continue,
                Some(Ok(sampled)) => advance(
                    &mut self.active[i],
                    &self.tok,
                    sampled,
                    context,
                    &self.stats,
                ),
                Some(Err(e)) => {
                    let _ = self.active[i].tx.send(Event::Error(e));
                    false
                }
            };
            if !going {
                finished.push(i);
            }
        }
        for (i, l) in classified {
            let s = &mut self.active[i];
            for tx in std::mem::take(&mut s.forks) {
                // every sample of a classifier is its one answer
                let kv = match self.model.new_cache() {
                    Ok(kv) => kv,
                    Err(e) => {
                        let _ = tx.send(Event::Error(GenError::internal(e.to_string())));
                        continue;
                    }
                };
                let params = s.sampler.params().clone();
                let mut copy = s.sibling(tx, kv, s.fed, params, 0, s.cached);
                answer_label(&mut copy, &l, &self.tok, context, &self.stats);
            }
            answer_label(s, &l, &self.tok, context, &self.stats);
            finished.push(i);
        }
        let mut kept = Vec::new();
        for (mut f, l, i) in forked {
            if !l.is_empty() {
                let m = masks.get(&i).and_then(|m| m.as_ref().ok());
                let going = match choose(&mut f, &l, m) {
                    Ok(sampled) => advance(&mut f, &self.tok, sampled, context, &self.stats),
                    Err(e) => {
                        let _ = f.tx.send(Event::Error(e));
                        false
                    }
                };
                if !going {
                    continue;
                }
            }
            kept.push(f);
        }
        if !finished.is_empty() {
            let mut idx = 0;
            self.active.retain(|_| {
                idx += 1;
                !finished.contains(&(idx - 1))
            });
        }
        let any_forked = !kept.is_empty();
        self.active.extend(kept);
        if !finished.is_empty() || any_forked {
            self.release_adapters();
        }
    }
}
