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
use crate::fairness::{Budgets, Fairness, Held};
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

mod adapters;
mod admission;
mod emit;
mod prefill;
mod step;

use emit::*;

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
    /// With a vocabulary of at least [`SPARSE_HEAD_VOCAB`] tokens, a row its
    /// grammar narrows to a few tokens computes only their logits: the grammar
    /// masks are then computed before the forward rather than beside it.
    pub sparse_head: bool,
}

/// The vocabulary size from which [`EngineConfig::sparse_head`] applies (the
/// output projection is then most of a decode step: Gemma's 262,144 rows;
/// SmolLM2's 49,152 keep the masks computed beside the forward).
pub const SPARSE_HEAD_VOCAB: usize = 65_536;

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
            sparse_head: true,
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
    /// The classical classifier's reading of the request (see [`ValidRequest::with_text`]).
    text: Option<Arc<str>>,
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
    pub fn start(model: impl Into<Box<dyn Compute>>, tok: Tok, cfg: EngineConfig) -> Result<Self> {
        Self::start_with_pool(model, tok, cfg, None)
    }

    /// Start with an adapter pool: requests may then name an adapter.
    pub fn start_with_pool(
        model: impl Into<Box<dyn Compute>>,
        tok: Tok,
        mut cfg: EngineConfig,
        pool: Option<Arc<AdapterPool>>,
    ) -> Result<Self> {
        let model: Box<dyn Compute> = model.into();
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
        let prefix = model.prefix_cache(&cfg.prefix_cache);
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
        Generated::wait(self.generate(req)?)
    }
}

impl Generated {
    /// Everything `stream` produces, waited for (CLI, tests, evals). Not for async contexts.
    pub fn wait(mut stream: GenerationStream) -> std::result::Result<Generated, GenError> {
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
            text,
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
            text,
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
    /// The classical classifier's reading of the request (see [`ValidRequest::with_text`]).
    text: Option<Arc<str>>,
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
            text: self.text.clone(),
        }
    }
}

enum Resolved {
    Ready(Option<Arc<LoraAdapter>>),
    Pending,
    Failed(GenError),
}

struct Worker {
    model: Box<dyn Compute>,
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
}
