//! Continuous batching. One compute thread owns the model and every sequence's
//! KV cache; each step it admits queued requests (bounded queue, KV budget),
//! drops sequences whose caller went away, runs one forward over all decode
//! tokens plus a budgeted chunk of pending prefill, samples, and streams events.

use crate::backend::{
    Backend, BackendStats, Clock, Completion, ErrorKind, Event, EventSender, FinishReason,
    GenError, GenerationStream, Health, TokenEvent, ValidRequest,
};
use crate::chat::{ChatTemplate, CHATML};
use crate::device::{Cache, Compute};
use crate::error::{EngineError, Result};
use crate::model::BatchItem;
use crate::sampler::{Sampled, Sampler, SamplingParams};
use crate::stream::{Detok, StopText};
use crate::tokenizer::Tok;
use retune_adapters::{Acquire, AdapterPool, AdapterRef, LoraAdapter};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Requests waiting for admission before `Overloaded`.
    pub max_queue: usize,
    /// Prompt tokens prefilled per step (chunked prefill).
    pub prefill_chunk: usize,
    /// KV positions reserved across running sequences (prompt + max_tokens each).
    pub max_kv_tokens: usize,
    /// Compute threads (0 = all cores).
    pub threads: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 64,
            max_queue: 256,
            prefill_chunk: 512,
            max_kv_tokens: 65_536,
            threads: 0,
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
}

struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    adapter: Option<AdapterRef>,
    clock: Clock,
    tx: EventSender,
}

pub struct Engine {
    tx: SyncSender<Job>,
    tok: Arc<Tok>,
    template: ChatTemplate,
    context: usize,
    stats: Arc<EngineStats>,
    max_queue: usize,
    /// False once the scheduler thread has exited (or panicked).
    alive: Arc<AtomicBool>,
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
            max_queue: cfg.max_queue,
            alive,
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
    /// Fails fast with `Capacity` when the queue is full.
    fn submit(&self, req: ValidRequest) -> std::result::Result<GenerationStream, GenError> {
        let (prompt, params, adapter) = req.into_parts();
        let (etx, erx) = GenerationStream::channel();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            prompt,
            params,
            adapter,
            clock: Clock::start(),
            tx: etx,
        };
        match self.tx.try_send(job) {
            Ok(()) => Ok(erx),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => EngineError::Overloaded(self.max_queue),
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

    fn stats(&self) -> BackendStats {
        let s = &self.stats;
        let get = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        BackendStats {
            queued: get(&s.queued),
            running: get(&s.running),
            kv_bytes: get(&s.kv_bytes),
            generated_tokens: get(&s.generated_tokens),
            prompt_tokens: get(&s.prompt_tokens),
            last_step_tokens: get(&s.last_step_tokens),
        }
    }
}

struct Seq {
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
    clock: Clock,
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
}

impl Worker {
    fn run(mut self) {
        let mut pending: Option<Job> = None;
        loop {
            if self.active.is_empty() && pending.is_none() && self.loading.is_empty() {
                match self.rx.recv() {
                    Ok(job) => pending = Some(job),
                    Err(_) => return, // engine dropped and nothing left to do
                }
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
            // admission from the queue
            while self.active.len() < self.cfg.max_batch.max(1)
                && self.loading.len() < self.cfg.max_queue.max(1)
            {
                let job = match pending.take() {
                    Some(j) => j,
                    None => match self.rx.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    },
                };
                if !self.fits(&job) {
                    pending = Some(job);
                    break;
                }
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                if job.tx.is_closed() {
                    continue;
                }
                match self.resolve_adapter(&job) {
                    Resolved::Ready(a) => self.admit(job, a),
                    Resolved::Pending => self.loading.push(job),
                    Resolved::Failed(e) => drop(job.tx.send(Event::Error(e))),
                }
            }
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
            if !self.active.is_empty() {
                self.step();
                // what finished in this step is not running any more
                self.stats
                    .running
                    .store(self.active.len(), Ordering::Relaxed);
                if self.active.is_empty() {
                    self.stats.last_step_tokens.store(0, Ordering::Relaxed);
                }
            } else if !self.loading.is_empty() {
                // only waiting for adapter loads: do not spin
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
            self.stats.kv_bytes.store(
                self.active.iter().map(|s| s.kv.bytes()).sum(),
                Ordering::Relaxed,
            );
        }
    }

    fn reserve_of(&self, job: &Job) -> usize {
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
            Acquire::Ready(a) => Resolved::Ready(Some(a)),
            Acquire::Pending => Resolved::Pending,
            Acquire::Failed(e) => Resolved::Failed(GenError::new(
                ErrorKind::Adapter,
                format!("adapter {adapter}: {e}"),
            )),
        }
    }

    /// Let the pool evict what finished sequences no longer hold.
    fn release_adapters(&self) {
        if let Some(pool) = &self.pool {
            pool.trim();
        }
    }

    fn admit(&mut self, mut job: Job, adapter: Option<Arc<LoraAdapter>>) {
        let kv = match self.model.new_cache() {
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
        self.active.push(Seq {
            prompt: job.prompt,
            fed: 0,
            last: None,
            output: Vec::new(),
            kv,
            sampler: Sampler::new(job.params),
            detok: Detok::default(),
            stop: StopText::new(stops),
            tx: job.tx,
            reserve,
            adapter,
            clock: job.clock,
        });
    }

    fn step(&mut self) {
        let mut budget = self.cfg.prefill_chunk.max(1);
        let mut inputs: Vec<(usize, Vec<u32>, bool)> = Vec::new();
        for (i, s) in self.active.iter().enumerate() {
            if let Some(t) = s.last {
                inputs.push((i, vec![t], true));
            } else if budget > 0 {
                let n = (s.prompt.len() - s.fed).min(budget);
                budget -= n;
                inputs.push((
                    i,
                    s.prompt[s.fed..s.fed + n].to_vec(),
                    s.fed + n == s.prompt.len(),
                ));
            }
        }
        self.stats
            .last_step_tokens
            .store(inputs.iter().map(|i| i.1.len()).sum(), Ordering::Relaxed);
        let logits = {
            let mut caches: Vec<Option<(&mut Cache, Option<&LoraAdapter>)>> = self
                .active
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
            self.model.forward(&mut items)
        };
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
        for (i, toks, want) in &inputs {
            let s = &mut self.active[*i];
            if s.last.is_none() {
                s.fed += toks.len();
            }
            if !*want {
                continue;
            }
            let Some(l) = logits.next() else { break };
            let sampled = s.sampler.sample(&l);
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            if let Some(reason) = emit(s, &self.tok, sampled, self.model.cfg().context) {
                let tail = s.stop.flush();
                let tail = if reason.1 { String::new() } else { tail };
                let record = Completion {
                    finish: reason.0,
                    prompt: std::mem::take(&mut s.prompt),
                    output: std::mem::take(&mut s.output),
                    adapter: s.adapter.as_ref().map(|a| a.1.clone()),
                    params: s.sampler.params().clone(),
                    timings: s.clock.timings(),
                    tail,
                };
                let _ = s.tx.send(Event::Done(Box::new(record)));
                finished.push(*i);
            }
        }
        if !finished.is_empty() {
            let mut idx = 0;
            self.active.retain(|_| {
                idx += 1;
                !finished.contains(&(idx - 1))
            });
            self.release_adapters();
        }
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
