//! Continuous batching. One compute thread owns the model and every sequence's
//! KV cache; each step it admits queued requests (bounded queue, KV budget),
//! drops sequences whose caller went away, runs one forward over all decode
//! tokens plus a budgeted chunk of pending prefill, samples, and streams events.

use crate::backend::{
    Backend, BackendStats, Clock, Completion, ErrorKind, Event, EventSender, FinishReason,
    GenError, GenerationStream, Health, TokenEvent, ValidParts, ValidRequest,
};
use crate::chat::{ChatTemplate, CHATML};
use crate::device::{Cache, Compute};
use crate::error::{EngineError, Result};
use crate::guide::{Guide, Mask};
use crate::model::BatchItem;
use crate::prefix::{PrefixCache, PrefixConfig, PrefixStats};
use crate::sampler::{Sampled, Sampler, SamplingParams};
use crate::stream::{Detok, StopText};
use crate::tokenizer::Tok;
use retune_adapters::{Acquire, AdapterPool, AdapterRef, LoraAdapter};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Requests waiting for admission before `Overloaded`.
    pub max_queue: usize,
    /// Prompt tokens prefilled per step (chunked prefill) while nothing decodes.
    pub prefill_chunk: usize,
    /// While sequences are decoding, the prompt work per step in token
    /// equivalents (a token deep in a long context counts for more: attention),
    /// so a long prompt cannot stretch everyone's inter-token latency.
    pub prefill_chunk_decoding: usize,
    /// KV positions reserved across running sequences (prompt + max_tokens each).
    pub max_kv_tokens: usize,
    /// Compute threads (0 = all cores).
    pub threads: usize,
    /// Each configured tenant's weight in the fair shares of the queue, the KV
    /// budget and the prefill budget; a tenant not listed weighs 1.
    pub tenant_weights: HashMap<String, u32>,
    /// Reuse of computed prompt prefixes (host engine only).
    pub prefix_cache: PrefixConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 64,
            max_queue: 256,
            prefill_chunk: 512,
            prefill_chunk_decoding: 64,
            max_kv_tokens: 65_536,
            threads: 0,
            tenant_weights: HashMap::new(),
            prefix_cache: PrefixConfig::default(),
        }
    }
}

impl EngineConfig {
    fn weight(&self, tenant: &str) -> f64 {
        f64::from(self.tenant_weights.get(tenant).copied().unwrap_or(1).max(1))
    }

    /// Requests `tenant` may have waiting: its weighted share of `max_queue`
    /// among the configured tenants (all of it when it is the only one).
    fn queue_share(&self, tenant: &str) -> usize {
        let w = self.weight(tenant);
        let mut total: f64 = self
            .tenant_weights
            .values()
            .map(|&v| f64::from(v.max(1)))
            .sum();
        if !self.tenant_weights.contains_key(tenant) {
            total += w;
        }
        ((self.max_queue as f64 * w / total).ceil() as usize).clamp(1, self.max_queue.max(1))
    }
}

/// Queued requests per tenant whose adapters are loaded ahead of admission.
const PREFETCH_PER_TENANT: usize = 4;

/// Waiting requests, in all and per tenant: the submit side checks the shares,
/// the scheduler releases them as requests leave its queues.
#[derive(Default)]
struct QueueBook {
    total: usize,
    by_tenant: HashMap<Arc<str>, usize>,
}

fn release(book: &Mutex<QueueBook>, tenant: &Arc<str>) {
    let mut b = book.lock().unwrap_or_else(|p| p.into_inner());
    b.total = b.total.saturating_sub(1);
    if let Some(n) = b.by_tenant.get_mut(tenant) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            b.by_tenant.remove(tenant);
        }
    }
}

/// A head-of-queue request that has waited this long stops younger ones of
/// other tenants from taking the KV it needs as it frees.
const STARVATION: std::time::Duration = std::time::Duration::from_secs(2);

/// A request before validation (the CLI, tests, evals); `Engine::generate` checks
/// it into a [`ValidRequest`].
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// A resolved adapter version; `None` = base model.
    pub adapter: Option<AdapterRef>,
}

impl GenerateRequest {
    pub fn new(prompt: Vec<u32>, params: SamplingParams) -> Self {
        Self {
            prompt,
            params,
            adapter: None,
        }
    }
}

/// Everything a finished generation produced, for non-streaming callers.
#[derive(Clone, Debug)]
pub struct Generated {
    pub tokens: Vec<TokenEvent>,
    pub text: String,
    pub completion: Completion,
}

impl Generated {
    pub fn ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.id).collect()
    }
}

#[derive(Default)]
pub struct EngineStats {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_bytes: AtomicUsize,
    pub generated_tokens: AtomicUsize,
    pub prompt_tokens: AtomicUsize,
    /// Tokens in the most recent forward step (decode rows + prefill chunk).
    pub last_step_tokens: AtomicUsize,
    pub kv_reserved: AtomicUsize,
    pub kv_capacity: AtomicUsize,
    /// Adapter names of (running, waiting) sequences, published when they change.
    pub adapters: Mutex<(Vec<String>, Vec<String>)>,
}

struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    adapter: Option<AdapterRef>,
    tenant: Arc<str>,
    clock: Clock,
    tx: EventSender,
    guide: Option<Guide>,
    /// Further samples of the same prompt (`n > 1`): forked from this
    /// sequence's cache once its prompt is in.
    forks: Vec<EventSender>,
}

pub struct Engine {
    tx: SyncSender<Job>,
    tok: Arc<Tok>,
    template: ChatTemplate,
    context: usize,
    stats: Arc<EngineStats>,
    cfg: EngineConfig,
    book: Arc<Mutex<QueueBook>>,
    /// False once the scheduler thread has exited (or panicked).
    alive: Arc<AtomicBool>,
    /// Set by `abort_all`: everything waiting or running ends, nothing new is taken.
    abort: Arc<Mutex<Option<String>>>,
    prefix: Option<Arc<PrefixStats>>,
}

/// Marks the engine dead when the scheduler thread ends, however it ends.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl Engine {
    pub fn start(model: impl Into<Compute>, tok: Tok, cfg: EngineConfig) -> Result<Self> {
        Self::start_with_pool(model, tok, cfg, None)
    }

    /// Start with an adapter pool: requests may then name an adapter.
    pub fn start_with_pool(
        model: impl Into<Compute>,
        tok: Tok,
        mut cfg: EngineConfig,
        pool: Option<Arc<AdapterPool>>,
    ) -> Result<Self> {
        let model: Compute = model.into();
        if let Some(n) = model.max_sequences() {
            cfg.max_batch = cfg.max_batch.min(n);
        }
        let (tx, rx) = sync_channel(cfg.max_queue.max(1));
        let tok = Arc::new(tok);
        let stats = Arc::new(EngineStats::default());
        let context = model.cfg().context;
        let compute = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .thread_name(|i| format!("retune-compute-{i}"))
            .build()
            .map_err(|e| EngineError::InvalidRequest(format!("thread pool: {e}")))?;
        let book = Arc::new(Mutex::new(QueueBook::default()));
        let abort = Arc::new(Mutex::new(None));
        // the prefix cache holds host KV: the device backend's slots are not copied
        let prefix = match &model {
            Compute::Host(m) => Some(PrefixCache::new(
                cfg.prefix_cache.clone(),
                &m.fingerprint(),
                m.cfg.n_layer,
                m.cfg.kv_dim(),
            ))
            .filter(PrefixCache::enabled),
            Compute::Device(_) => None,
        };
        let prefix_stats = prefix.as_ref().map(PrefixCache::stats);
        let worker = Worker {
            model,
            tok: tok.clone(),
            cfg: cfg.clone(),
            rx,
            stats: stats.clone(),
            active: Vec::new(),
            reserved: 0,
            pool,
            loading: Vec::new(),
            queues: HashMap::new(),
            book: book.clone(),
            steps: 0,
            abort: abort.clone(),
            spent: HashMap::new(),
            spent_at: std::time::Instant::now(),
            seen: HashMap::new(),
            prefix,
        };
        let piece = |id: Option<u32>| id.and_then(|i| tok.token_str(i)).unwrap_or_default();
        let template =
            ChatTemplate::new(CHATML, &piece(tok.bos), &piece(tok.eos.first().copied()))?;
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        std::thread::Builder::new()
            .name("retune-scheduler".into())
            .spawn(move || {
                let _guard = guard;
                compute.install(move || worker.run())
            })
            .map_err(|e| EngineError::InvalidRequest(format!("cannot spawn scheduler: {e}")))?;
        Ok(Self {
            tx,
            tok,
            template,
            context,
            stats,
            cfg,
            book,
            alive,
            abort,
            prefix: prefix_stats,
        })
    }

    /// Use the model's own chat template (the default is ChatML).
    pub fn with_template(mut self, template: ChatTemplate) -> Self {
        self.template = template;
        self
    }

    /// Validate and queue a request (the CLI, tests, evals).
    pub fn generate(
        &self,
        req: GenerateRequest,
    ) -> std::result::Result<GenerationStream, GenError> {
        let valid = self.validate(req.prompt, req.params, req.adapter)?;
        self.submit(valid)
    }

    /// Submit and wait for the whole result (CLI, tests, evals). Not for async contexts.
    pub fn generate_blocking(
        &self,
        req: GenerateRequest,
    ) -> std::result::Result<Generated, GenError> {
        let mut stream = self.generate(req)?;
        let mut tokens = Vec::new();
        let mut text = String::new();
        while let Some(ev) = stream.blocking_next() {
            match ev {
                Event::Token(t) => {
                    text.push_str(&t.text);
                    tokens.push(t);
                }
                Event::Done(c) => {
                    text.push_str(&c.tail);
                    return Ok(Generated {
                        tokens,
                        text,
                        completion: *c,
                    });
                }
                Event::Error(e) => return Err(e),
            }
        }
        Err(EngineError::ShutDown.into())
    }
}

impl Backend for Engine {
    /// Fails fast with `Capacity` when the queue, or the tenant's share of it, is full.
    fn submit(&self, req: ValidRequest) -> std::result::Result<GenerationStream, GenError> {
        let mut streams = self.submit_n(req, 1)?;
        streams.pop().ok_or_else(|| GenError::internal("no stream"))
    }

    /// One queued job: the prompt is prefilled once and its cache copied for
    /// the other samples (a device cache is not copied: those prefill again).
    fn submit_n(
        &self,
        req: ValidRequest,
        n: usize,
    ) -> std::result::Result<Vec<GenerationStream>, GenError> {
        let ValidParts {
            prompt,
            params,
            adapter,
            tenant,
            guide,
        } = req.into_tenant_parts();
        let tenant: Arc<str> = tenant.unwrap_or_else(|| Arc::from(""));
        if let Some(why) = self.abort.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(GenError::new(ErrorKind::Unavailable, why));
        }
        {
            let mut b = self.book.lock().unwrap_or_else(|p| p.into_inner());
            let share = self.cfg.queue_share(&tenant);
            let mine = b.by_tenant.get(&tenant).copied().unwrap_or(0);
            if b.total >= self.cfg.max_queue.max(1) {
                return Err(EngineError::Overloaded(self.cfg.max_queue).into());
            }
            if mine >= share {
                return Err(GenError::new(
                    ErrorKind::Capacity,
                    format!(
                        "this tenant already has {mine} requests waiting (its share of the queue)"
                    ),
                ));
            }
            b.total += 1;
            *b.by_tenant.entry(tenant.clone()).or_insert(0) += 1;
        }
        let (etx, erx) = GenerationStream::channel();
        let mut streams = vec![erx];
        let mut forks = Vec::new();
        for _ in 1..n.max(1) {
            let (tx, rx) = GenerationStream::channel();
            forks.push(tx);
            streams.push(rx);
        }
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            prompt,
            params,
            adapter,
            tenant,
            clock: Clock::start(),
            tx: etx,
            guide,
            forks,
        };
        match self.tx.try_send(job) {
            Ok(()) => Ok(streams),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                let job = match &e {
                    TrySendError::Full(j) | TrySendError::Disconnected(j) => j,
                };
                release(&self.book, &job.tenant);
                Err(match e {
                    TrySendError::Full(_) => EngineError::Overloaded(self.cfg.max_queue),
                    TrySendError::Disconnected(_) => EngineError::ShutDown,
                }
                .into())
            }
        }
    }

    fn tokenizer(&self) -> &Tok {
        &self.tok
    }

    fn template(&self) -> &ChatTemplate {
        &self.template
    }

    fn context(&self) -> usize {
        self.context
    }

    fn health(&self) -> Health {
        if self.alive.load(Ordering::Relaxed) {
            Health::Ready
        } else {
            Health::Unavailable("the scheduler thread has stopped".into())
        }
    }

    fn abort_all(&self, reason: &str) {
        // an idle scheduler has nothing to end; a busy one sees this at its next step
        *self.abort.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
    }

    fn stats(&self) -> BackendStats {
        let s = &self.stats;
        let get = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        // one lock (a second in the same expression would wait for the first)
        let (running_adapters, waiting_adapters) =
            s.adapters.lock().unwrap_or_else(|p| p.into_inner()).clone();
        BackendStats {
            queued: get(&s.queued),
            running: get(&s.running),
            kv_bytes: get(&s.kv_bytes),
            generated_tokens: get(&s.generated_tokens),
            prompt_tokens: get(&s.prompt_tokens),
            last_step_tokens: get(&s.last_step_tokens),
            kv_reserved_tokens: get(&s.kv_reserved),
            kv_capacity_tokens: get(&s.kv_capacity),
            running_adapters,
            waiting_adapters,
            prefix: self
                .prefix
                .as_ref()
                .map(|p| crate::backend::PrefixCounters {
                    hits: p.hits.load(Ordering::Relaxed),
                    misses: p.misses.load(Ordering::Relaxed),
                    tokens_reused: p.tokens_reused.load(Ordering::Relaxed),
                    evictions: p.evictions.load(Ordering::Relaxed),
                    uncached_too_long: p.too_long.load(Ordering::Relaxed),
                    tokens: p.tokens.load(Ordering::Relaxed),
                    bytes: p.bytes.load(Ordering::Relaxed),
                }),
        }
    }
}

struct Seq {
    guide: Option<Guide>,
    /// Samples still to fork from this one when its prompt is in.
    forks: Vec<EventSender>,
    prompt: Vec<u32>,
    fed: usize,
    last: Option<u32>,
    output: Vec<u32>,
    kv: Cache,
    sampler: Sampler,
    detok: Detok,
    stop: StopText,
    tx: EventSender,
    reserve: usize,
    /// The loaded adapter and the reference it was resolved from.
    adapter: Option<(Arc<LoraAdapter>, AdapterRef)>,
    tenant: Arc<str>,
    clock: Clock,
    /// Prompt positions taken from the prefix cache.
    cached: usize,
}

impl Seq {
    /// Another sample of this request (`n > 1`): its prompt, grammar, stops,
    /// adapter and clock, its own cache (`fed` prompt positions in) and sender.
    fn sibling(
        &self,
        tx: EventSender,
        kv: Cache,
        fed: usize,
        params: SamplingParams,
        reserve: usize,
        cached: usize,
    ) -> Seq {
        Seq {
            guide: self.guide.clone(),
            forks: Vec::new(),
            prompt: self.prompt.clone(),
            fed,
            last: None,
            output: Vec::new(),
            kv,
            sampler: Sampler::with_prompt(params, &self.prompt),
            detok: Detok::default(),
            stop: StopText::new(self.stop.stops().to_vec()),
            tx,
            reserve,
            adapter: self.adapter.clone(),
            tenant: self.tenant.clone(),
            clock: self.clock,
            cached,
        }
    }
}

enum Resolved {
    Ready(Option<Arc<LoraAdapter>>),
    Pending,
    Failed(GenError),
}

struct Worker {
    model: Compute,
    tok: Arc<Tok>,
    cfg: EngineConfig,
    rx: Receiver<Job>,
    stats: Arc<EngineStats>,
    active: Vec<Seq>,
    reserved: usize,
    pool: Option<Arc<AdapterPool>>,
    /// Admitted from the queue, waiting for their adapter to load.
    loading: Vec<Job>,
    /// Waiting for admission, per tenant, in arrival order.
    queues: HashMap<Arc<str>, VecDeque<Job>>,
    book: Arc<Mutex<QueueBook>>,
    steps: u64,
    abort: Arc<Mutex<Option<String>>>,
    /// Each tenant's recent compute (token equivalents / weight, decaying):
    /// prompt work goes first to the tenants that used least.
    spent: HashMap<Arc<str>, f64>,
    spent_at: std::time::Instant,
    /// When each tenant last had work in a step (batch shares count tenants
    /// active within [`RECENT`]).
    seen: HashMap<Arc<str>, std::time::Instant>,
    prefix: Option<PrefixCache>,
}

/// What a sequence's prefix-cache entries are keyed by: the adapter's weights.
fn weights_key(adapter: &Option<(Arc<LoraAdapter>, AdapterRef)>) -> String {
    adapter
        .as_ref()
        .map_or_else(|| "base".to_string(), |a| a.0.cache_key())
}

impl Worker {
    fn run(mut self) {
        loop {
            if self.active.is_empty() && self.loading.is_empty() && self.queued() == 0 {
                match self.rx.recv() {
                    Ok(job) => self.enqueue(job),
                    Err(_) => return, // engine dropped and nothing left to do
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.enqueue(job);
            }
            let abort = self.abort.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(why) = abort {
                self.end_all(&why);
                continue;
            }
            // sequences whose adapter was loading: admit the ready ones
            let loading = std::mem::take(&mut self.loading);
            for job in loading {
                if job.tx.is_closed() {
                    continue;
                }
                // a loaded job is admitted like a queued one: batch size and KV budget
                let room = self.active.len() < self.cfg.max_batch.max(1);
                match self.resolve_adapter(&job) {
                    Resolved::Ready(a) if room && self.fits(&job) => self.admit(job, a),
                    Resolved::Failed(e) => drop(job.tx.send(Event::Error(e))),
                    _ => self.loading.push(job),
                }
            }
            self.admit_fairly();
            self.prefetch_adapters();
            // cancellation: the caller dropped its stream
            let before = self.active.len();
            self.active.retain(|s| !s.tx.is_closed());
            if self.active.len() != before {
                self.release_adapters();
            }
            self.reserved = self.active.iter().map(|s| s.reserve).sum();
            self.stats
                .running
                .store(self.active.len(), Ordering::Relaxed);
            self.stats
                .kv_reserved
                .store(self.reserved, Ordering::Relaxed);
            self.stats
                .kv_capacity
                .store(self.cfg.max_kv_tokens, Ordering::Relaxed);
            self.publish_adapters();
            if !self.active.is_empty() {
                self.step();
                // what finished in this step is not running any more
                self.stats
                    .running
                    .store(self.active.len(), Ordering::Relaxed);
                if self.active.is_empty() {
                    self.stats.last_step_tokens.store(0, Ordering::Relaxed);
                }
            } else if !self.loading.is_empty() || self.queued() > 0 {
                // waiting for adapter loads (or a queued request whose caller left): do not spin
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
            self.stats.kv_bytes.store(
                self.active.iter().map(|s| s.kv.bytes()).sum(),
                Ordering::Relaxed,
            );
        }
    }

    /// The drain deadline: every generation ends with `Unavailable`.
    fn end_all(&mut self, why: &str) {
        let err = GenError::new(ErrorKind::Unavailable, why);
        for s in self.active.drain(..) {
            s.tx.send(Event::Error(err.clone()));
        }
        for j in self.loading.drain(..) {
            j.tx.send(Event::Error(err.clone()));
        }
        let tenants: Vec<Arc<str>> = self.queues.keys().cloned().collect();
        for t in tenants {
            while let Some(j) = self.dequeue(&t) {
                j.tx.send(Event::Error(err.clone()));
            }
        }
        self.reserved = 0;
        self.stats.running.store(0, Ordering::Relaxed);
        self.stats.last_step_tokens.store(0, Ordering::Relaxed);
        self.release_adapters();
    }

    fn queued(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    fn enqueue(&mut self, job: Job) {
        self.queues
            .entry(job.tenant.clone())
            .or_default()
            .push_back(job);
    }

    /// Take `tenant`'s head of queue out of the books.
    fn dequeue(&mut self, tenant: &Arc<str>) -> Option<Job> {
        let q = self.queues.get_mut(tenant)?;
        let job = q.pop_front()?;
        if q.is_empty() {
            self.queues.remove(tenant);
        }
        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        release(&self.book, tenant);
        Some(job)
    }

    /// What `tenant` holds now, as a fraction of the KV budget plus a fraction of
    /// the batch, over its weight: the tenant holding least goes first.
    fn usage(&self, tenant: &str) -> f64 {
        let (mut kv, mut seqs) = (0usize, 0usize);
        for s in self.active.iter().filter(|s| &*s.tenant == tenant) {
            kv += s.reserve;
            seqs += 1;
        }
        for j in self.loading.iter().filter(|j| &*j.tenant == tenant) {
            kv += self.reserve_of(j);
            seqs += 1;
        }
        (kv as f64 / self.cfg.max_kv_tokens.max(1) as f64
            + seqs as f64 / self.cfg.max_batch.max(1) as f64)
            / self.cfg.weight(tenant)
    }

    /// Whether admitting `job` keeps its tenant within its weighted share of the
    /// batch's rows among the tenants active now or in the last seconds (a
    /// tenant alone may use them all). Every row slows each step a little: a
    /// tenant filling the batch would slow everyone else's tokens.
    fn within_batch_share(&self, job: &Job) -> bool {
        let t = &*job.tenant;
        let mut tenants: Vec<&str> = self.seen.keys().map(|k| &**k).collect();
        tenants.extend(self.queues.keys().map(|k| &**k));
        tenants.extend(self.active.iter().map(|s| &*s.tenant));
        tenants.extend(self.loading.iter().map(|j| &*j.tenant));
        tenants.push(t);
        tenants.sort_unstable();
        tenants.dedup();
        if tenants.len() == 1 {
            return true;
        }
        let total: f64 = tenants.iter().map(|w| self.cfg.weight(w)).sum();
        let share = (self.cfg.max_batch as f64 * self.cfg.weight(t) / total).ceil() as usize;
        let mine = self.active.iter().filter(|s| &*s.tenant == t).count()
            + self.loading.iter().filter(|j| &*j.tenant == t).count();
        mine < share.max(1)
    }

    /// Whether admitting `job` keeps its tenant within its weighted share of the
    /// KV budget among the tenants that want some; a tenant may always run one
    /// sequence, and may use more than its share when nobody else is waiting.
    fn within_share(&self, job: &Job) -> bool {
        let t = &*job.tenant;
        let others_waiting = self.queues.iter().any(|(k, q)| &**k != t && !q.is_empty());
        if !others_waiting {
            return true;
        }
        let mut mine = 0usize;
        let mut running_mine = false;
        let mut wanting: Vec<&str> = self.queues.keys().map(|k| &**k).collect();
        for s in &self.active {
            wanting.push(&s.tenant);
            if &*s.tenant == t {
                mine += s.reserve;
                running_mine = true;
            }
        }
        for j in &self.loading {
            wanting.push(&j.tenant);
            if &*j.tenant == t {
                mine += self.reserve_of(j);
                running_mine = true;
            }
        }
        if !running_mine {
            return true;
        }
        wanting.sort_unstable();
        wanting.dedup();
        let total: f64 = wanting.iter().map(|w| self.cfg.weight(w)).sum();
        let share = self.cfg.max_kv_tokens as f64 * self.cfg.weight(t) / total.max(1.0);
        (mine + self.reserve_of(job)) as f64 <= share
    }

    /// Admission from the per-tenant queues: the tenant holding least (weighted)
    /// first; a head that does not fit does not block other tenants' heads, unless
    /// it has waited past [`STARVATION`] and is the most deserving, when admission
    /// pauses until the KV it needs frees.
    fn admit_fairly(&mut self) {
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
            let mut order: Vec<(f64, std::time::Instant, Arc<str>)> = self
                .queues
                .iter()
                .filter_map(|(t, q)| {
                    q.front()
                        .map(|j| (self.usage(t), j.clock.submitted, t.clone()))
                })
                .collect();
            order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut progressed = false;
            for (rank, (_, since, t)) in order.iter().enumerate() {
                let Some(head) = self.queues.get(t).and_then(VecDeque::front) else {
                    continue;
                };
                if head.tx.is_closed() {
                    self.dequeue(t);
                    progressed = true;
                    break;
                }
                if !self.within_batch_share(head) {
                    continue; // its share of rows is full while others are active
                }
                if !self.fits(head) || !self.within_share(head) {
                    if rank == 0 && since.elapsed() > STARVATION {
                        return; // let the KV drain for it
                    }
                    continue;
                }
                let Some(job) = self.dequeue(t) else { continue };
                match self.resolve_adapter(&job) {
                    Resolved::Ready(a) => self.admit(job, a),
                    Resolved::Pending => self.loading.push(job),
                    Resolved::Failed(e) => drop(job.tx.send(Event::Error(e))),
                }
                progressed = true;
                break;
            }
            if !progressed {
                return;
            }
        }
    }

    /// KV positions a job may need: every sample's.
    fn reserve_of(&self, job: &Job) -> usize {
        self.one_reserve(job) * (1 + job.forks.len())
    }

    fn one_reserve(&self, job: &Job) -> usize {
        (job.prompt.len() + job.params.max_tokens).min(self.model.cfg().context)
    }

    /// KV budget: a job fits if nothing runs or its reservation fits.
    fn fits(&self, job: &Job) -> bool {
        self.active.is_empty() || self.reserved + self.reserve_of(job) <= self.cfg.max_kv_tokens
    }

    fn resolve_adapter(&self, job: &Job) -> Resolved {
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
    fn publish_adapters(&self) {
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
    fn prefetch_adapters(&self) {
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
    fn release_adapters(&self) {
        if let Some(pool) = &self.pool {
            pool.trim();
        }
    }

    fn admit(&mut self, mut job: Job, adapter: Option<Arc<LoraAdapter>>) {
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
        });
    }

    fn step(&mut self) {
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
        let (logits, masks) = std::thread::scope(|sc| {
            let masker = (!guides.is_empty()).then(|| {
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
                    })
                })
                .collect();
            let logits = model.forward(&mut items);
            let masks = masker.map(|h| h.join().unwrap_or_default());
            (logits, masks.unwrap_or_default())
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

/// Draw row `s`'s next token from its logits `l`, among what `mask` allows
/// (narrowed near the budget's end to close JSON).
fn choose(s: &mut Seq, l: &[f32], mask: Option<&Mask>) -> std::result::Result<Sampled, GenError> {
    if mask.is_some_and(Mask::is_empty) {
        return Err(GenError::internal("the grammar allows no token here"));
    }
    let left = s.sampler.params().max_tokens.saturating_sub(s.output.len());
    let narrowed = match (&mut s.guide, mask) {
        (Some(g), Some(m)) => g.wrap_up(m, left),
        _ => None,
    };
    Ok(s.sampler.sample_masked(l, narrowed.as_ref().or(mask)))
}

/// The classifier head of row `s`'s adapter, if it has one.
fn head_of(s: &Seq) -> Option<&retune_adapters::ClassHead> {
    s.adapter.as_ref().and_then(|a| a.0.head.as_ref())
}

/// A classifier's answer: its most probable label, emitted as that label's
/// tokens (cut by `max_tokens` or a stop string like any answer), the first
/// carrying the label's log-probability under the head and the rest 0, so the
/// answer's token log-probabilities sum to the label's. The row then ends.
fn answer_label(s: &mut Seq, scores: &[f32], tok: &Tok, context: usize, stats: &EngineStats) {
    let Some(head) = head_of(s) else { return };
    let best = scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    let max = scores.get(best).copied().unwrap_or(0.0);
    let log_z = max + scores.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
    let logprob = scores.get(best).map_or(0.0, |x| x - log_z);
    let ids = match head.labels.get(best).map(|l| tok.encode(l, false)) {
        Some(Ok(ids)) if !ids.is_empty() => ids,
        Some(Err(e)) => {
            let _ = s.tx.send(Event::Error(GenError::internal(format!(
                "the classifier's label does not tokenize: {e}"
            ))));
            return;
        }
        _ => {
            let _ = s.tx.send(Event::Error(GenError::internal(
                "the classifier's scores do not match its labels",
            )));
            return;
        }
    };
    // the label is the whole answer (no grammar), then the end of turn
    s.guide = None;
    let end = tok
        .eos
        .first()
        .copied()
        .filter(|_| s.sampler.params().stop_on_eos);
    for (k, id) in ids.into_iter().chain(end).enumerate() {
        let sampled = Sampled {
            token: id,
            logprob: Some(if k == 0 { logprob } else { 0.0 }),
            top: Vec::new(),
        };
        if !advance(s, tok, sampled, context, stats) {
            return;
        }
    }
    let tail = s.stop.flush();
    done(s, FinishReason::Stop, tail);
}

/// Advance row `s` past its drawn token: its grammar, the token event, or
/// the ending. Returns whether it goes on.
fn advance(s: &mut Seq, tok: &Tok, sampled: Sampled, context: usize, stats: &EngineStats) -> bool {
    stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let id = sampled.token;
    let p = s.sampler.params();
    let is_stop_token = p.stop_token_ids.contains(&id) || (p.stop_on_eos && tok.eos.contains(&id));
    if let (Some(g), false) = (&mut s.guide, is_stop_token) {
        if let Err(e) = g.commit(id) {
            let _ = s.tx.send(Event::Error(GenError::internal(e.to_string())));
            return false;
        }
    }
    let mut reason = emit(s, tok, sampled, context);
    if let Some(g) = &s.guide {
        if reason.is_none() && g.is_done() {
            // the grammar is complete and allows nothing more
            reason = Some((FinishReason::Stop, false));
        }
        if g.wrapped() {
            // closed early to fit max_tokens: it ended for length
            if let Some(r) = &mut reason {
                r.0 = FinishReason::Length;
            }
        }
    }
    let Some(reason) = reason else {
        return true;
    };
    let tail = s.stop.flush();
    let tail = if reason.1 { String::new() } else { tail };
    done(s, reason.0, tail);
    false
}

/// End row `s`: its completion record goes to the reader.
fn done(s: &mut Seq, finish: FinishReason, tail: String) {
    let record = Completion {
        finish,
        prompt: std::mem::take(&mut s.prompt),
        output: std::mem::take(&mut s.output),
        adapter: s.adapter.as_ref().map(|a| a.1.clone()),
        params: s.sampler.params().clone(),
        timings: s.clock.timings(),
        tail,
        cached_tokens: s.cached,
    };
    let _ = s.tx.send(Event::Done(Box::new(record)));
}

/// How much slower per FLOP attention runs than the projections (see
/// [`Worker::attention_break_even`]).
const ATTENTION_SLOWDOWN: f64 = 3.0;
/// Half-life of a tenant's recorded compute, seconds.
const SPENT_HALF_LIFE: f64 = 5.0;
/// A tenant with work this recently keeps its share of the batch's rows.
const RECENT: std::time::Duration = std::time::Duration::from_secs(10);

impl Worker {
    /// Positions of context at which one token's attention costs as much as its
    /// projections (the cost model of [`Self::cost`]).
    fn attention_break_even(&self) -> f64 {
        let c = self.model.cfg();
        let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        let linear = (2 * h * q + 2 * h * kv + 3 * h * f) as f64;
        // attention runs at about a third of the projections' FLOP rate
        // (measured on SmolLM2-135M, 2 cores: prefill 3.2 ms/token at 500
        // tokens, 9.9 at 6,000 — break-even near 1,070 positions)
        (linear / (2 * q).max(1) as f64 / ATTENTION_SLOWDOWN).max(1.0)
    }

    /// Work of `n` tokens fed after `at` positions of context, in token equivalents.
    fn cost(n: usize, at: usize, even: f64) -> f64 {
        n as f64 * (1.0 + (at as f64 + n as f64 / 2.0) / even)
    }

    /// Record this step's work per tenant (and decay the past).
    fn account(&mut self, inputs: &[(usize, Vec<u32>, bool)]) {
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
    fn share_prefixes(&mut self) -> Vec<bool> {
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
    fn prefill_plan(&self, waiting: &[bool]) -> Vec<usize> {
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

/// Record one sampled token; returns the finish reason (and whether a stop string
/// ended it) when the sequence is done.
fn emit(s: &mut Seq, tok: &Tok, sampled: Sampled, context: usize) -> Option<(FinishReason, bool)> {
    let id = sampled.token;
    s.output.push(id);
    s.clock
        .first_token
        .get_or_insert_with(std::time::Instant::now);
    s.last = Some(id);
    let p = s.sampler.params();
    let is_stop_token = p.stop_token_ids.contains(&id) || (p.stop_on_eos && tok.eos.contains(&id));
    let (text, hit) = if is_stop_token {
        (String::new(), false)
    } else {
        s.stop.push(&s.detok.push(tok, id))
    };
    let max_tokens = p.max_tokens;
    let _ = s.tx.send(Event::Token(TokenEvent {
        id,
        text,
        logprob: sampled.logprob,
        top: sampled.top,
        at: std::time::Instant::now(),
    }));
    if is_stop_token {
        Some((FinishReason::Stop, false))
    } else if hit {
        Some((FinishReason::Stop, true))
    } else if s.output.len() >= max_tokens || s.kv.len() + 1 >= context {
        Some((FinishReason::Length, false))
    } else {
        None
    }
}
