//! Admission: the per-tenant queues and the order and shares their heads are
//! admitted in (the policy itself is [`crate::fairness`]), against the KV budget.

use super::*;

/// A head-of-queue request that has waited this long stops younger ones of
/// other tenants from taking the KV it needs as it frees.
pub(super) const STARVATION: std::time::Duration = std::time::Duration::from_secs(2);

/// What admission does next with the per-tenant queues.
pub(super) enum Pick {
    /// Nothing can be admitted now.
    Nothing,
    /// The most deserving head has starved: admit nothing until KV frees.
    Wait,
    /// This tenant's head left while it waited: drop it.
    Drop(Arc<str>),
    /// Admit this tenant's head.
    Admit(Arc<str>),
}

impl Budgets for EngineConfig {
    fn weight(&self, tenant: &str) -> f64 {
        EngineConfig::weight(self, tenant)
    }
    fn max_batch(&self) -> usize {
        self.max_batch
    }
    fn max_kv_tokens(&self) -> usize {
        self.max_kv_tokens
    }
}

impl Worker {
    pub(super) fn queued(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    pub(super) fn enqueue(&mut self, job: Job) {
        self.queues
            .entry(job.tenant.clone())
            .or_default()
            .push_back(job);
    }

    /// Take `tenant`'s head of queue out of the books.
    pub(super) fn dequeue(&mut self, tenant: &Arc<str>) -> Option<Job> {
        let q = self.queues.get_mut(tenant)?;
        let job = q.pop_front()?;
        if q.is_empty() {
            self.queues.remove(tenant);
        }
        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        release(&self.book, tenant);
        Some(job)
    }

    /// The fairness policy over what each tenant holds and wants now.
    pub(super) fn fairness(&self) -> Fairness<'_, EngineConfig> {
        let mut held: Vec<Held<'_>> = self
            .active
            .iter()
            .map(|s| Held {
                tenant: &s.tenant,
                kv: s.reserve,
            })
            .collect();
        held.extend(self.loading.iter().map(|j| Held {
            tenant: &j.tenant,
            kv: self.reserve_of(j),
        }));
        Fairness::new(
            &self.cfg,
            held,
            self.queues
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(t, _)| &**t)
                .collect(),
            self.seen.keys().map(|k| &**k).collect(),
        )
    }

    /// Admission from the per-tenant queues: the tenant holding least (weighted)
    /// first; a head that does not fit does not block other tenants' heads, unless
    /// it has waited past [`STARVATION`] and is the most deserving, when admission
    /// pauses until the KV it needs frees.
    pub(super) fn admit_fairly(&mut self) {
        // requests whose caller left while they waited
        let mut gone: Vec<Arc<str>> = Vec::new();
        for (t, q) in self.queues.iter_mut() {
            q.retain(|j| {
                let closed = j.tx.is_closed();
                if closed {
                    gone.push(t.clone());
                }
                !closed
            });
        }
        for t in gone {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            release(&self.book, &t);
        }
        self.queues.retain(|_, q| !q.is_empty());
        loop {
            if self.active.len() >= self.cfg.max_batch.max(1)
                || self.loading.len() >= self.cfg.max_queue.max(1)
                || self.queues.is_empty()
            {
                return;
            }
            let pick = {
                let fair = self.fairness();
                let mut heads: Vec<(&str, std::time::Instant)> = self
                    .queues
                    .iter()
                    .filter_map(|(t, q)| q.front().map(|j| (&**t, j.clock.submitted)))
                    .collect();
                fair.order(&mut heads);
                let mut pick = Pick::Nothing;
                for (rank, &(t, since)) in heads.iter().enumerate() {
                    let Some((key, head)) = self
                        .queues
                        .get_key_value(t)
                        .and_then(|(k, q)| q.front().map(|j| (k, j)))
                    else {
                        continue;
                    };
                    if head.tx.is_closed() {
                        pick = Pick::Drop(key.clone());
                        break;
                    }
                    if !fair.within_batch_share(t) {
                        continue; // its share of rows is full while others are active
                    }
                    if !self.fits(head) || !fair.within_kv_share(t, self.reserve_of(head)) {
                        if rank == 0 && since.elapsed() > STARVATION {
                            pick = Pick::Wait; // let the KV drain for it
                            break;
                        }
                        continue;
                    }
                    pick = Pick::Admit(key.clone());
                    break;
                }
                pick
            };
            match pick {
                Pick::Nothing | Pick::Wait => return,
                Pick::Drop(t) => {
                    self.dequeue(&t);
                }
                Pick::Admit(t) => {
                    let Some(job) = self.dequeue(&t) else { return };
                    match self.resolve_adapter(&job) {
                        Resolved::Ready(a) => self.admit(job, a),
                        Resolved::Pending => self.loading.push(job),
                        Resolved::Failed(e) => drop(job.tx.send(Event::Error(e))),
                    }
                }
            }
        }
    }

    /// KV positions a job may need: every sample's.
    pub(super) fn reserve_of(&self, job: &Job) -> usize {
        self.one_reserve(job) * (1 + job.forks.len())
    }

    pub(super) fn one_reserve(&self, job: &Job) -> usize {
        (job.prompt.len() + job.params.max_tokens).min(self.model.cfg().context)
    }

    /// KV budget: a job fits if nothing runs or its reservation fits.
    pub(super) fn fits(&self, job: &Job) -> bool {
        self.active.is_empty() || self.reserved + self.reserve_of(job) <= self.cfg.max_kv_tokens
    }
}
