//! Tenant fairness at admission, as a pure policy over what each tenant holds
//! and wants: which queued head goes first, and whether a tenant stays within
//! its weighted share of the batch's rows and of the KV budget. The scheduler
//! builds a [`Fairness`] from its books and asks; the policy knows no model,
//! sequence or channel, so it is tested on its own.

/// The budgets and each tenant's weight (a tenant not listed weighs 1).
pub trait Budgets {
    fn weight(&self, tenant: &str) -> f64;
    /// Sequences decoded together.
    fn max_batch(&self) -> usize;
    /// KV positions reserved across running sequences.
    fn max_kv_tokens(&self) -> usize;
}

/// A sequence that holds resources (running, or admitted and waiting for its
/// adapter): its tenant and the KV positions it reserves.
#[derive(Clone, Copy, Debug)]
pub struct Held<'a> {
    pub tenant: &'a str,
    pub kv: usize,
}

/// A snapshot of who holds what and who wants more.
pub struct Fairness<'a, B: Budgets> {
    budgets: &'a B,
    held: Vec<Held<'a>>,
    /// Tenants with requests waiting for admission.
    waiting: Vec<&'a str>,
    /// Tenants that had work in the last few seconds.
    recent: Vec<&'a str>,
}

impl<'a, B: Budgets> Fairness<'a, B> {
    pub fn new(
        budgets: &'a B,
        held: Vec<Held<'a>>,
        waiting: Vec<&'a str>,
        recent: Vec<&'a str>,
    ) -> Self {
        Self {
            budgets,
            held,
            waiting,
            recent,
        }
    }

    fn mine<'s>(&'s self, tenant: &'s str) -> impl Iterator<Item = &'s Held<'a>> + 's {
        self.held.iter().filter(move |h| h.tenant == tenant)
    }

    fn total_weight(&self, tenants: &mut Vec<&str>) -> f64 {
        tenants.sort_unstable();
        tenants.dedup();
        tenants.iter().map(|t| self.budgets.weight(t)).sum()
    }

    /// What `tenant` holds, as a fraction of the KV budget plus a fraction of
    /// the batch, over its weight: the tenant holding least goes first.
    pub fn usage(&self, tenant: &str) -> f64 {
        let (kv, seqs) = self
            .mine(tenant)
            .fold((0usize, 0usize), |(kv, n), h| (kv + h.kv, n + 1));
        (kv as f64 / self.budgets.max_kv_tokens().max(1) as f64
            + seqs as f64 / self.budgets.max_batch().max(1) as f64)
            / self.budgets.weight(tenant)
    }

    /// Queue heads `(tenant, arrival)` in admission order: least usage first,
    /// then the earliest.
    pub fn order<K: Ord>(&self, heads: &mut Vec<(&str, K)>) {
        let mut keyed: Vec<(f64, (&str, K))> =
            heads.drain(..).map(|h| (self.usage(h.0), h)).collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1 .1.cmp(&b.1 .1)));
        heads.extend(keyed.into_iter().map(|(_, h)| h));
    }

    /// Whether one more sequence keeps `tenant` within its weighted share of the
    /// batch's rows among the tenants active now or lately (a tenant alone may
    /// use them all). Every row slows each step a little: a tenant filling the
    /// batch would slow everyone else's tokens.
    pub fn within_batch_share(&self, tenant: &str) -> bool {
        let mut tenants: Vec<&str> = self.recent.clone();
        tenants.extend(&self.waiting);
        tenants.extend(self.held.iter().map(|h| h.tenant));
        tenants.push(tenant);
        let total = self.total_weight(&mut tenants);
        if tenants.len() == 1 {
            return true;
        }
        let share =
            (self.budgets.max_batch() as f64 * self.budgets.weight(tenant) / total).ceil() as usize;
        self.mine(tenant).count() < share.max(1)
    }

    /// Whether reserving `need` more KV positions keeps `tenant` within its
    /// weighted share of the KV budget among the tenants that want some; a
    /// tenant may always run one sequence, and may use more than its share when
    /// nobody else is waiting.
    pub fn within_kv_share(&self, tenant: &str, need: usize) -> bool {
        if !self.waiting.iter().any(|w| *w != tenant) {
            return true;
        }
        let mine: usize = self.mine(tenant).map(|h| h.kv).sum();
        if self.mine(tenant).next().is_none() {
            return true;
        }
        let mut wanting: Vec<&str> = self.waiting.clone();
        wanting.extend(self.held.iter().map(|h| h.tenant));
        let total = self.total_weight(&mut wanting);
        let share =
            self.budgets.max_kv_tokens() as f64 * self.budgets.weight(tenant) / total.max(1.0);
        (mine + need) as f64 <= share
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct B {
        weights: HashMap<&'static str, f64>,
        batch: usize,
        kv: usize,
    }

    impl Budgets for B {
        fn weight(&self, t: &str) -> f64 {
            self.weights.get(t).copied().unwrap_or(1.0)
        }
        fn max_batch(&self) -> usize {
            self.batch
        }
        fn max_kv_tokens(&self) -> usize {
            self.kv
        }
    }

    fn budgets(weights: &[(&'static str, f64)]) -> B {
        B {
            weights: weights.iter().copied().collect(),
            batch: 8,
            kv: 1000,
        }
    }

    fn held<'a>(t: &'a str, n: usize, kv: usize) -> Vec<Held<'a>> {
        vec![Held { tenant: t, kv }; n]
    }

    #[test]
    fn the_tenant_holding_least_goes_first_then_the_oldest() {
        let b = budgets(&[]);
        let mut h = held("a", 3, 100);
        h.extend(held("b", 1, 100));
        let f = Fairness::new(&b, h, vec!["a", "b", "c"], vec![]);
        let mut heads = vec![("a", 1), ("b", 2), ("c", 3)];
        f.order(&mut heads);
        assert_eq!(
            heads.iter().map(|h| h.0).collect::<Vec<_>>(),
            ["c", "b", "a"]
        );
        // equal holdings: arrival decides
        let f = Fairness::new(&b, vec![], vec!["a", "b"], vec![]);
        let mut heads = vec![("a", 5), ("b", 2)];
        f.order(&mut heads);
        assert_eq!(heads.iter().map(|h| h.0).collect::<Vec<_>>(), ["b", "a"]);
        // a weight of 3 makes the same holding count a third
        let w = budgets(&[("a", 3.0)]);
        let mut h = held("a", 3, 100);
        h.extend(held("b", 1, 100));
        let f = Fairness::new(&w, h, vec!["a", "b"], vec![]);
        assert!((f.usage("a") - f.usage("b")).abs() < 1e-12);
    }

    #[test]
    fn batch_rows_are_shared_by_weight_among_active_tenants_and_a_lone_tenant_takes_all() {
        let b = budgets(&[]);
        // alone: every row
        let f = Fairness::new(&b, held("a", 7, 10), vec![], vec![]);
        assert!(f.within_batch_share("a"));
        // two tenants, 8 rows: 4 each
        let f = Fairness::new(&b, held("a", 3, 10), vec!["b"], vec![]);
        assert!(f.within_batch_share("a"));
        let f = Fairness::new(&b, held("a", 4, 10), vec!["b"], vec![]);
        assert!(!f.within_batch_share("a"));
        // a tenant seen lately still counts, so its rows stay free for a moment
        let f = Fairness::new(&b, held("a", 4, 10), vec![], vec!["b"]);
        assert!(!f.within_batch_share("a"));
        // weights 3:1 over 8 rows: 6 and 2
        let w = budgets(&[("a", 3.0)]);
        let f = Fairness::new(&w, held("a", 5, 10), vec!["b"], vec![]);
        assert!(f.within_batch_share("a"));
        let f = Fairness::new(&w, held("a", 6, 10), vec!["b"], vec![]);
        assert!(!f.within_batch_share("a"));
        let f = Fairness::new(&w, held("b", 2, 10), vec!["a"], vec![]);
        assert!(!f.within_batch_share("b"));
        // a share is at least one row
        let many: Vec<&str> = vec!["b", "c", "d", "e", "f", "g", "h", "i", "j"];
        let f = Fairness::new(&b, vec![], many, vec![]);
        assert!(f.within_batch_share("a"));
    }

    #[test]
    fn kv_is_shared_by_weight_only_while_others_wait_and_one_sequence_always_runs() {
        let b = budgets(&[]);
        // nobody else waiting: the whole budget
        let f = Fairness::new(&b, held("a", 1, 900), vec!["a"], vec![]);
        assert!(f.within_kv_share("a", 100));
        // b waits: a's share is 500
        let f = Fairness::new(&b, held("a", 1, 400), vec!["b"], vec![]);
        assert!(f.within_kv_share("a", 100));
        assert!(!f.within_kv_share("a", 101));
        // a tenant holding nothing may always start one sequence
        let f = Fairness::new(&b, held("b", 1, 900), vec!["a", "b"], vec![]);
        assert!(f.within_kv_share("a", 1000));
        // weights 1:4: a's share is 200
        let w = budgets(&[("b", 4.0)]);
        let f = Fairness::new(&w, held("a", 1, 150), vec!["b"], vec![]);
        assert!(f.within_kv_share("a", 50));
        assert!(!f.within_kv_share("a", 51));
    }
}
