//! The adapter lifecycle: resolving a request's adapter through the pool,
//! prefetching queued requests' adapters, publishing what runs and waits.

use super::*;

impl Worker {
    pub(super) fn resolve_adapter(&self, job: &Job) -> Resolved {
        let Some(adapter) = &job.adapter else {
            return Resolved::Ready(None);
        };
        let Some(pool) = &self.pool else {
            return Resolved::Failed(GenError::new(
                ErrorKind::Adapter,
                format!("adapter {adapter} requested but this engine has no adapter pool"),
            ));
        };
        match pool.acquire(adapter) {
            Acquire::Ready(a) => match self.model.check_adapter(&a) {
                Ok(()) => Resolved::Ready(Some(a)),
                // only this request fails: the batch never sees the adapter
                Err(why) => Resolved::Failed(GenError::new(
                    ErrorKind::Adapter,
                    format!("adapter {adapter}: {why}"),
                )),
            },
            Acquire::Pending => Resolved::Pending,
            Acquire::Failed(e) => Resolved::Failed(GenError::new(
                match *e {
                    // the store is unreachable: retry later (503), not a broken adapter
                    retune_adapters::AdapterError::Unavailable(_) => ErrorKind::AdapterUnavailable,
                    _ => ErrorKind::Adapter,
                },
                format!("adapter {adapter}: {e}"),
            )),
        }
    }

    /// Publish the adapter names of running and waiting sequences (for the
    /// inference gateway's LoRA metric) when they changed.
    pub(super) fn publish_adapters(&self) {
        fn names<'a>(it: &mut dyn Iterator<Item = &'a AdapterRef>) -> Vec<&'a str> {
            let mut v: Vec<&str> = it.map(|a| a.name()).collect();
            v.sort_unstable();
            v.dedup();
            v
        }
        let running = names(
            &mut self
                .active
                .iter()
                .filter_map(|s| s.adapter.as_ref().map(|(_, r)| r)),
        );
        let waiting = names(
            &mut self
                .queues
                .values()
                .flatten()
                .chain(&self.loading)
                .filter_map(|j| j.adapter.as_ref()),
        );
        let mut cur = self
            .stats
            .adapters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let same =
            |a: &[String], b: &[&str]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y);
        if !same(&cur.0, &running) || !same(&cur.1, &waiting) {
            *cur = (
                running.into_iter().map(String::from).collect(),
                waiting.into_iter().map(String::from).collect(),
            );
        }
    }

    /// Start loading the adapters of the requests next in each tenant's queue,
    /// so their loads overlap the running sequences' steps instead of
    /// starting when the request reaches the head.
    pub(super) fn prefetch_adapters(&self) {
        let Some(pool) = &self.pool else { return };
        for q in self.queues.values() {
            for job in q.iter().take(PREFETCH_PER_TENANT) {
                if let Some(a) = &job.adapter {
                    pool.prefetch(a);
                }
            }
        }
    }

    /// Let the pool evict what finished sequences no longer hold.
    pub(super) fn release_adapters(&self) {
        if let Some(pool) = &self.pool {
            pool.trim();
        }
    }
}
