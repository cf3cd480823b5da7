//! Prefix cache: the KV of prompt prefixes already computed, reused by later
//! prompts that start with the same tokens.
//!
//! Prompts are cut into blocks of `block` positions. A block is found by its
//! parent (the block before it, or the chain's root) and its own token ids
//! (found by a hash of them, then compared), so a hit is an exact match of
//! every token before it: no hash stands in for the tokens. A chain's root is (scope, base fingerprint, adapter weights): the
//! scope is the tenant, or the public scope for tenants that opted in, so one
//! tenant's time to first token never tells whether another sent a prompt;
//! the adapter part is the version's content id, so a version promoted under
//! the same name never meets the old version's entries (a LoRA on k/v changes
//! the cache).
//!
//! Memory: the cache holds at most `max_tokens` positions, and never more than
//! the KV budget running sequences leave free; each scope at most its share.
//! Least recently used blocks go first. A lookup or an insert stamps every block
//! of its chain alike and ties go deepest first, so a block is never evicted
//! before the blocks that hang from it.
//!
//! Reuse is bit-exact: the engine's cache holds K/V as f16 and attention reads
//! them from there, so positions copied from here equal positions prefilled
//! again (the chunked-prefill tests hold the engine to that).

use crate::kv::KvCache;
use half::f16;
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Scope of the tenants that opted in to share their prefixes (tenant names
/// are lowercase letters, digits, `-` and `_`: no tenant is called this).
pub const PUBLIC_SCOPE: &str = "*public";

#[derive(Clone, Debug)]
pub struct PrefixConfig {
    /// Positions the cache may hold (0: no prefix cache).
    pub max_tokens: usize,
    /// Positions per block: the granularity of a match.
    pub block: usize,
    /// Part of `max_tokens` one scope may hold, in (0, 1].
    pub scope_share: f64,
    /// Tenants whose prompts go to (and are looked up in) the public scope.
    pub public_tenants: HashSet<String>,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        Self {
            max_tokens: 16_384,
            block: 16,
            scope_share: 0.5,
            public_tenants: HashSet::new(),
        }
    }
}

/// Counters for metrics.
#[derive(Default, Debug)]
pub struct PrefixStats {
    /// Prompts that reused at least one block (counted when their prefill ends).
    pub hits: AtomicU64,
    /// Prompts that reused nothing.
    pub misses: AtomicU64,
    /// Prompt positions taken from the cache instead of prefilled.
    pub tokens_reused: AtomicU64,
    /// Blocks dropped to make room.
    pub evictions: AtomicU64,
    /// Prompts longer than a scope's share: served, not cached.
    pub too_long: AtomicU64,
    /// Positions held now.
    pub tokens: AtomicUsize,
    pub bytes: AtomicUsize,
}

/// What a chain hangs from: who may see it and which weights computed it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Root {
    scope: Arc<str>,
    /// The base's fingerprint and the adapter's weights (`base` for none).
    weights: String,
}

type Stamp = (u64, Reverse<u32>, u64);

struct Block {
    parent: u64,
    tokens: Box<[u32]>,
    scope: Arc<str>,
    depth: u32,
    stamp: u64,
    /// Every layer's K then V for the block's positions.
    kv: Vec<f16>,
}

impl Block {
    fn order(&self, id: u64) -> Stamp {
        (self.stamp, Reverse(self.depth), id)
    }
}

pub struct PrefixCache {
    cfg: PrefixConfig,
    base: String,
    n_layer: usize,
    kv_dim: usize,
    roots: HashMap<Root, u64>,
    /// (parent, hash of the block's tokens) → block; the tokens are compared on use.
    children: HashMap<(u64, u64), u64>,
    blocks: HashMap<u64, Block>,
    lru: BTreeSet<Stamp>,
    by_scope: HashMap<Arc<str>, BTreeSet<Stamp>>,
    next_id: u64,
    clock: u64,
    stats: Arc<PrefixStats>,
    /// Buffers of evicted blocks for the next inserts: a full cache evicts one
    /// block per block it inserts, and a fresh buffer costs page faults every
    /// time (glibc returns large freed chunks to the kernel).
    spare: Vec<Vec<f16>>,
}

/// Evicted blocks' buffers kept for reuse.
const SPARE_BLOCKS: usize = 64;

fn tokens_hash(tokens: &[u32]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tokens.hash(&mut h);
    h.finish()
}

/// A lookup's result: the positions found, as a cache to start the sequence from.
pub struct Hit {
    pub tokens: usize,
    pub kv: KvCache,
}

impl PrefixCache {
    /// A cache for the base with fingerprint `base`.
    pub fn new(cfg: PrefixConfig, base: &str, n_layer: usize, kv_dim: usize) -> Self {
        Self {
            cfg,
            base: base.to_string(),
            n_layer,
            kv_dim,
            roots: HashMap::new(),
            children: HashMap::new(),
            blocks: HashMap::new(),
            lru: BTreeSet::new(),
            by_scope: HashMap::new(),
            next_id: 1,
            clock: 0,
            stats: Arc::new(PrefixStats::default()),
            spare: Vec::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cfg.max_tokens >= self.cfg.block.max(1)
    }

    pub fn stats(&self) -> Arc<PrefixStats> {
        self.stats.clone()
    }

    /// The scope `tenant`'s prompts are cached under.
    pub fn scope_of(&self, tenant: &Arc<str>) -> Arc<str> {
        if self.cfg.public_tenants.contains(&**tenant) {
            Arc::from(PUBLIC_SCOPE)
        } else {
            tenant.clone()
        }
    }

    fn block_len(&self) -> usize {
        self.cfg.block.max(1)
    }

    fn scope_limit(&self) -> usize {
        let blocks = self.cfg.max_tokens / self.block_len();
        ((blocks as f64 * self.cfg.scope_share).floor() as usize).max(1)
    }

    fn root(&mut self, root: Root, create: bool) -> Option<u64> {
        if let Some(&id) = self.roots.get(&root) {
            return Some(id);
        }
        if !create {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.roots.insert(root, id);
        Some(id)
    }

    fn touch(&mut self, id: u64, stamp: u64) {
        let Some(b) = self.blocks.get_mut(&id) else {
            return;
        };
        let old = b.order(id);
        b.stamp = stamp;
        let new = b.order(id);
        self.lru.remove(&old);
        self.lru.insert(new);
        if let Some(set) = self.by_scope.get_mut(&b.scope) {
            set.remove(&old);
            set.insert(new);
        }
    }

    /// The chain of blocks matching the start of `tokens`, at most `limit` blocks.
    fn walk(&self, root: u64, tokens: &[u32], limit: usize) -> Vec<u64> {
        let n = self.block_len();
        let mut chain = Vec::new();
        let mut parent = root;
        for chunk in tokens.chunks_exact(n).take(limit) {
            let found = self
                .children
                .get(&(parent, tokens_hash(chunk)))
                .filter(|id| self.blocks.get(id).is_some_and(|b| &*b.tokens == chunk));
            match found {
                Some(&id) => {
                    chain.push(id);
                    parent = id;
                }
                None => break,
            }
        }
        chain
    }

    /// The longest cached prefix of `prompt` for this scope and adapter,
    /// leaving at least one token to prefill (its logits start the output).
    pub fn lookup(&mut self, scope: &Arc<str>, adapter: &str, prompt: &[u32]) -> Option<Hit> {
        self.extend(scope, adapter, prompt, 0)
    }

    /// Count a prompt whose prefill finished: whether it reused any position.
    pub fn count(&self, reused: bool) {
        let counter = if reused {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Positions per block.
    pub fn block(&self) -> usize {
        self.block_len()
    }

    /// For a sequence part-way through its prompt (`have` positions in): the
    /// cached prefix, when it is longer than that (another sequence sharing
    /// the prefix computed it meanwhile).
    pub fn extend(
        &mut self,
        scope: &Arc<str>,
        adapter: &str,
        prompt: &[u32],
        have: usize,
    ) -> Option<Hit> {
        if !self.enabled() {
            return None;
        }
        let root = self.root(
            Root {
                scope: scope.clone(),
                weights: format!("{}/{adapter}", self.base),
            },
            false,
        );
        let limit = prompt.len().saturating_sub(1) / self.block_len();
        let chain = root
            .map(|r| self.walk(r, prompt, limit))
            .unwrap_or_default();
        if chain.len() * self.block_len() <= have {
            return None;
        }
        self.clock += 1;
        let stamp = self.clock;
        for &id in &chain {
            self.touch(id, stamp);
        }
        let parts: Vec<&[f16]> = chain
            .iter()
            .filter_map(|id| self.blocks.get(id).map(|b| &b.kv[..]))
            .collect();
        let kv = KvCache::from_blocks(self.n_layer, self.kv_dim, self.block_len(), &parts);
        let tokens = kv.len();
        self.stats
            .tokens_reused
            .fetch_add((tokens - have) as u64, Ordering::Relaxed);
        Some(Hit { tokens, kv })
    }

    /// Keep the full blocks of `prompt` whose positions `kv` holds (a prompt
    /// part-way in keeps what it has so far, so sequences sharing its prefix
    /// catch up). `room` is what the KV budget leaves free now.
    pub fn insert(
        &mut self,
        scope: &Arc<str>,
        adapter: &str,
        prompt: &[u32],
        kv: &KvCache,
        room: usize,
    ) {
        if !self.enabled() {
            return;
        }
        let n = self.block_len();
        if prompt.len() / n > self.scope_limit() {
            // longer than this scope may hold: served, not cached (counted
            // once, when the whole prompt is in)
            if kv.len() >= prompt.len() {
                self.stats.too_long.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let full = prompt.len().min(kv.len()) / n;
        if full == 0 {
            return;
        }
        let Some(root) = self.root(
            Root {
                scope: scope.clone(),
                weights: format!("{}/{adapter}", self.base),
            },
            true,
        ) else {
            return;
        };
        self.clock += 1;
        let stamp = self.clock;
        let chain = self.walk(root, prompt, full);
        for &id in &chain {
            self.touch(id, stamp);
        }
        let limit = self.cfg.max_tokens.min(room) / n;
        let mut parent = chain.last().copied().unwrap_or(root);
        for depth in chain.len()..full {
            let tokens: Box<[u32]> = Box::from(&prompt[depth * n..(depth + 1) * n]);
            let key = (parent, tokens_hash(&tokens));
            if self.children.contains_key(&key) {
                // another block under this hash (other tokens): not cached
                return;
            }
            // room in the scope's share, then in the whole cache; never by
            // evicting this chain itself
            if !self.make_room(Some(scope), self.scope_limit(), stamp)
                || !self.make_room(None, limit, stamp)
            {
                return;
            }
            let mut data = self
                .spare
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(self.n_layer * 2 * n * self.kv_dim));
            kv.copy_out(depth * n, n, &mut data);
            let id = self.next_id;
            self.next_id += 1;
            let b = Block {
                parent,
                tokens,
                scope: scope.clone(),
                depth: depth as u32,
                stamp,
                kv: data,
            };
            let order = b.order(id);
            self.stats
                .bytes
                .fetch_add(b.kv.len() * 2, Ordering::Relaxed);
            self.stats.tokens.fetch_add(n, Ordering::Relaxed);
            self.blocks.insert(id, b);
            self.lru.insert(order);
            self.by_scope
                .entry(scope.clone())
                .or_default()
                .insert(order);
            self.children.insert(key, id);
            parent = id;
        }
    }

    /// Evict least recently used blocks (of `scope`, or of all) until one more
    /// fits under `limit` blocks; false when only blocks stamped `keep` are left.
    fn make_room(&mut self, scope: Option<&Arc<str>>, limit: usize, keep: u64) -> bool {
        loop {
            let held = match scope {
                Some(s) => self.by_scope.get(s).map_or(0, BTreeSet::len),
                None => self.blocks.len(),
            };
            if held < limit {
                return true;
            }
            let victim = match scope {
                Some(s) => self.by_scope.get(s).and_then(|set| set.first().copied()),
                None => self.lru.first().copied(),
            };
            match victim {
                Some(v) if v.0 != keep => self.evict(v.2),
                _ => return false,
            }
        }
    }

    fn evict(&mut self, id: u64) {
        let Some(b) = self.blocks.remove(&id) else {
            return;
        };
        let order = b.order(id);
        self.lru.remove(&order);
        if let Some(set) = self.by_scope.get_mut(&b.scope) {
            set.remove(&order);
            if set.is_empty() {
                self.by_scope.remove(&b.scope);
            }
        }
        let key = (b.parent, tokens_hash(&b.tokens));
        if self.children.get(&key) == Some(&id) {
            self.children.remove(&key);
        }
        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        self.stats
            .tokens
            .fetch_sub(self.block_len(), Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_sub(b.kv.len() * 2, Ordering::Relaxed);
        if self.spare.len() < SPARE_BLOCKS {
            let mut buf = b.kv;
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Shrink to at most `room` positions (running sequences took the rest of
    /// the KV budget).
    pub fn shrink_to(&mut self, room: usize) {
        let limit = room / self.block_len();
        while self.blocks.len() > limit {
            match self.lru.first().copied() {
                Some(v) => self.evict(v.2),
                None => return,
            }
        }
    }

    /// Positions held now.
    pub fn tokens(&self) -> usize {
        self.blocks.len() * self.block_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv_for(prompt: &[u32], n_layer: usize, kd: usize) -> KvCache {
        // positions whose values encode (layer, position, column)
        let mut kv = KvCache::new(n_layer, kd);
        kv.reserve(prompt.len());
        for layer in 0..n_layer {
            let k: Vec<f32> = (0..prompt.len() * kd)
                .map(|i| (layer * 1000 + prompt[i / kd] as usize + i % kd) as f32)
                .collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            kv.append(layer, &k, &v);
        }
        kv.commit(prompt.len());
        kv
    }

    fn cache(max_tokens: usize, share: f64) -> PrefixCache {
        PrefixCache::new(
            PrefixConfig {
                max_tokens,
                block: 4,
                scope_share: share,
                public_tenants: HashSet::new(),
            },
            "fp",
            2,
            3,
        )
    }

    #[test]
    fn a_hit_returns_exactly_the_inserted_positions_and_leaves_one_token() {
        let mut c = cache(64, 1.0);
        let t: Arc<str> = Arc::from("a");
        let prompt: Vec<u32> = (0..13).collect();
        let kv = kv_for(&prompt, 2, 3);
        c.insert(&t, "base", &prompt, &kv, usize::MAX);
        assert_eq!(c.tokens(), 12);
        // the same prompt: 12 cached, but one must be left to prefill -> 12 of 13
        let hit = c.lookup(&t, "base", &prompt).unwrap();
        assert_eq!(hit.tokens, 12);
        for layer in 0..2 {
            let (k, v) = hit.kv.layer(layer);
            let (k0, v0) = kv.layer(layer);
            assert_eq!(&k[..12 * 3], &k0[..12 * 3]);
            assert_eq!(&v[..12 * 3], &v0[..12 * 3]);
        }
        // a 12-token prompt leaves its last token: 8 reused
        assert_eq!(c.lookup(&t, "base", &prompt[..12]).unwrap().tokens, 8);
        // a different token in block 2 stops the match there
        let mut other = prompt.clone();
        other[9] = 99;
        assert_eq!(c.lookup(&t, "base", &other).unwrap().tokens, 8);
        other[0] = 99;
        assert!(c.lookup(&t, "base", &other).is_none());
    }

    #[test]
    fn scopes_and_adapter_weights_never_share_entries() {
        let mut c = cache(64, 1.0);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let prompt: Vec<u32> = (0..9).collect();
        let kv = kv_for(&prompt, 2, 3);
        c.insert(&a, "content:v1", &prompt, &kv, usize::MAX);
        assert!(
            c.lookup(&b, "content:v1", &prompt).is_none(),
            "other tenant"
        );
        assert!(
            c.lookup(&a, "content:v2", &prompt).is_none(),
            "other version"
        );
        assert!(c.lookup(&a, "base", &prompt).is_none(), "base model");
        assert!(c.lookup(&a, "content:v1", &prompt).is_some());
        let mut p = PrefixConfig::default();
        p.public_tenants.insert("b".into());
        p.public_tenants.insert("c".into());
        let c = PrefixCache::new(p, "fp", 1, 1);
        assert_eq!(&*c.scope_of(&b), PUBLIC_SCOPE);
        assert_eq!(c.scope_of(&Arc::from("c")), c.scope_of(&b));
        assert_eq!(&*c.scope_of(&a), "a");
    }

    #[test]
    fn lru_within_the_budget_and_a_scope_share_protects_the_others() {
        // 6 blocks in all, a scope at most 3
        let mut c = cache(24, 0.5);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let pa: Vec<u32> = (0..8).collect();
        c.insert(&a, "base", &pa, &kv_for(&pa, 2, 3), usize::MAX);
        // b fills its share with three one-block prompts, then keeps going
        for i in 0..10u32 {
            let p: Vec<u32> = vec![100 + i; 4];
            c.insert(&b, "base", &p, &kv_for(&p, 2, 3), usize::MAX);
            assert!(c.by_scope.get(&b).map_or(0, BTreeSet::len) <= 3);
        }
        // a's entries survived b's churn (b evicted its own)
        assert_eq!(
            c.lookup(&a, "base", &[0, 1, 2, 3, 4, 5, 6, 7, 8])
                .unwrap()
                .tokens,
            8
        );
        let ev = c.stats.evictions.load(Ordering::Relaxed);
        assert_eq!(ev, 7);
        // the most recent of b's are the ones kept
        assert!(c.lookup(&b, "base", &[109; 5]).is_some());
        assert!(c.lookup(&b, "base", &[100; 5]).is_none());
        // a prompt longer than a scope's share is not cached
        let long: Vec<u32> = (200..220).collect();
        c.insert(&a, "base", &long, &kv_for(&long, 2, 3), usize::MAX);
        assert_eq!(c.stats.too_long.load(Ordering::Relaxed), 1);
        assert!(c.lookup(&a, "base", &long).is_none());
        // the KV budget's room shrinks the cache
        c.shrink_to(8);
        assert_eq!(c.tokens(), 8);
        assert_eq!(c.stats.tokens.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn a_parent_is_never_evicted_before_its_children() {
        let mut c = cache(12, 1.0);
        let t: Arc<str> = Arc::from("t");
        let p: Vec<u32> = (0..12).collect();
        c.insert(&t, "base", &p, &kv_for(&p, 2, 3), usize::MAX);
        // a new prompt needing one block evicts the deepest of the old chain
        let q: Vec<u32> = vec![50; 4];
        c.insert(&t, "base", &q, &kv_for(&q, 2, 3), usize::MAX);
        assert_eq!(
            c.lookup(&t, "base", &[p.clone(), vec![0]].concat())
                .unwrap()
                .tokens,
            8
        );
        assert!(c.children.values().all(|id| c.blocks.contains_key(id)));
        assert!(c
            .blocks
            .values()
            .all(|b| b.depth == 0 || c.blocks.contains_key(&b.parent)));
    }
}
