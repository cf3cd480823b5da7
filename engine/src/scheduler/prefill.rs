//! The prefill plan: the prompt work each step takes, by its cost in token
//! equivalents, shared prompt prefixes, and the tenants that used least first.

use super::*;

/// How much slower per FLOP attention runs than the projections (see
/// [`Worker::attention_break_even`]).
pub(super) const ATTENTION_SLOWDOWN: f64 = 3.0;

/// Half-life of a tenant's recorded compute, seconds.
pub(super) const SPENT_HALF_LIFE: f64 = 5.0;

/// A tenant with work this recently keeps its share of the batch's rows.
pub(super) const RECENT: std::time::Duration = std::time::Duration::from_secs(10);

impl Worker {
    /// Positions of context at which one token's attention costs as much as its
    /// projections (the cost model of [`Self::cost`]).
    pub(super) fn attention_break_even(&self) -> f64 {
        let c = self.model.cfg();
        let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        let linear = (2 * h * q + 2 * h * kv + 3 * h * f) as f64;
        // attention runs at about a third of the projections' FLOP rate
        // (measured on SmolLM2-135M, 2 cores: prefill 3.2 ms/token at 500
        // tokens, 9.9 at 6,000 — break-even near 1,070 positions)
        (linear / (2 * q).max(1) as f64 / ATTENTION_SLOWDOWN).max(1.0)
    }

    /// Work of `n` tokens fed after `at` positions of context, in token equivalents.
    pub(super) fn cost(n: usize, at: usize, even: f64) -> f64 {
        n as f64 * (1.0 + (at as f64 + n as f64 / 2.0) / even)
    }

    /// Record this step's work per tenant (and decay the past).
    pub(super) fn account(&mut self, inputs: &[(usize, Vec<u32>, bool)]) {
        let now = std::time::Instant::now();
        let dt = now.duration_since(self.spent_at).as_secs_f64();
        self.spent_at = now;
        let decay = 0.5f64.powf(dt / SPENT_HALF_LIFE);
        self.spent.retain(|_, v| {
            *v *= decay;
            *v > 1e-3
        });
        let even = self.attention_break_even();
        for (i, toks, _) in inputs {
            let s = &self.active[*i];
            let at = if s.last.is_some() { s.kv.len() } else { s.fed };
            let w = self.cfg.weight(&s.tenant);
            *self.spent.entry(s.tenant.clone()).or_insert(0.0) +=
                Self::cost(toks.len(), at, even) / w;
            self.seen.insert(s.tenant.clone(), now);
        }
        self.seen.retain(|_, at| now.duration_since(*at) < RECENT);
    }

    /// Prompts that share a prefix compute it once. A prefilling sequence
    /// takes from the prefix cache what another has computed of its prompt
    /// meanwhile, and waits (returned `true`) while another sequence of the
    /// same scope and weights, further on, is still computing the next block
    /// of its prompt. The sequence furthest on never waits: every step
    /// progresses.
    pub(super) fn share_prefixes(&mut self) -> Vec<bool> {
        let n = self.active.len();
        let mut waiting = vec![false; n];
        let Some(prefix) = &mut self.prefix else {
            return waiting;
        };
        let block = prefix.block();
        let keys: Vec<Option<(Arc<str>, String)>> = self
            .active
            .iter()
            .map(|s| {
                (s.last.is_none() && s.fed < s.prompt.len() && matches!(s.kv, Cache::Host(_)))
                    .then(|| (prefix.scope_of(&s.tenant), weights_key(&s.adapter)))
            })
            .collect();
        for (s, key) in self.active.iter_mut().zip(&keys) {
            let Some((scope, weights)) = key else {
                continue;
            };
            if let Some(hit) = prefix.extend(scope, weights, &s.prompt, s.fed) {
                s.cached += hit.tokens - s.fed;
                s.fed = hit.tokens;
                s.kv = Cache::Host(hit.kv);
            }
        }
        for i in 0..n {
            let Some(key) = &keys[i] else { continue };
            let me = &self.active[i];
            let next_block_end = (me.fed / block + 1) * block;
            waiting[i] = (0..n).any(|j| {
                let other = &self.active[j];
                j != i
                    && keys[j].as_ref() == Some(key)
                    && (other.fed > me.fed || (other.fed == me.fed && j < i))
                    && {
                        let common = me
                            .prompt
                            .iter()
                            .zip(&other.prompt)
                            .take_while(|(a, b)| a == b)
                            .count();
                        common >= next_block_end && other.fed < common
                    }
            });
        }
        waiting
    }

    /// Prompt tokens each prefilling sequence gets this step. The budget is
    /// `prefill_chunk` tokens, or `prefill_chunk_decoding` token equivalents
    /// while any sequence decodes; tenants that spent least recently (by weight)
    /// go first, each prompt of a tenant gets an equal part of its turn, and
    /// every step makes progress for someone.
    pub(super) fn prefill_plan(&self, waiting: &[bool]) -> Vec<usize> {
        let n = self.active.len();
        let open = |i: usize| {
            let s = &self.active[i];
            s.last.is_none() && s.prompt.len() > s.fed && !waiting.get(i).copied().unwrap_or(false)
        };
        let mut plan = vec![0usize; n];
        let decoding = self.active.iter().any(|s| s.last.is_some());
        let even = self.attention_break_even();
        let mut left = if decoding {
            self.cfg.prefill_chunk_decoding.max(1)
        } else {
            self.cfg.prefill_chunk.max(1)
        } as f64;
        let mut tenants: Vec<(f64, Arc<str>)> = Vec::new();
        for (i, s) in self.active.iter().enumerate() {
            if open(i) && !tenants.iter().any(|(_, t)| *t == s.tenant) {
                tenants.push((
                    self.spent.get(&s.tenant).copied().unwrap_or(0.0),
                    s.tenant.clone(),
                ));
            }
        }
        tenants.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (rank, (_, t)) in tenants.iter().enumerate() {
            if left <= 0.0 && rank > 0 {
                break;
            }
            let mine: Vec<usize> = (0..n)
                .filter(|&i| open(i) && self.active[i].tenant == *t)
                .collect();
            // the tenant's turn, split evenly in token equivalents among its prompts
            let mut open = mine.clone();
            while left > 0.0 && !open.is_empty() {
                let share = left / open.len() as f64;
                let mut spent = 0.0;
                for &i in &open {
                    let s = &self.active[i];
                    let need = s.prompt.len() - s.fed - plan[i];
                    let at = s.fed + plan[i];
                    let per = 1.0 + at as f64 / even;
                    let k = ((share / per).floor() as usize).min(need);
                    plan[i] += k;
                    spent += Self::cost(k, at, even);
                }
                left -= spent;
                open.retain(|&i| self.active[i].fed + plan[i] < self.active[i].prompt.len());
                if spent == 0.0 {
                    break;
                }
            }
            // progress: the first tenant always gets at least a token
            if rank == 0 && mine.iter().all(|&i| plan[i] == 0) {
                plan[mine[0]] = 1;
                left -= Self::cost(1, self.active[mine[0]].fed, even);
            }
        }
        plan
    }
}
