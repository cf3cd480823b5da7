//! Continuous batching. One compute thread owns the model and every sequence's
//! KV cache; each step it admits queued requests (bounded queue, KV budget),
//! drops sequences whose caller went away, runs one forward over all decode
//! tokens plus a budgeted chunk of pending prefill, samples, and streams events.

use crate::device::{Backend, Cache};
use crate::error::{EngineError, Result};
use crate::model::BatchItem;
use crate::sampler::{Sampled, Sampler, SamplingParams};
use crate::stream::{Detok, StopText};
use crate::tokenizer::Tok;
use retune_adapters::{Acquire, AdapterPool, LoraAdapter};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

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

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Adapter version handle (opaque, immutable); `None` = base model.
    pub adapter: Option<String>,
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// eos, a stop token or a stop string.
    Stop,
    /// max_tokens or the context is full.
    Length,
}

#[derive(Clone, Debug)]
pub struct TokenEvent {
    pub id: u32,
    /// New text (may be empty while a UTF-8 character or a possible stop string is incomplete).
    pub text: String,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug)]
pub struct Completion {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Trailing text released at the end (held back for stop-string matching).
    pub tail: String,
}

#[derive(Clone, Debug)]
pub enum Event {
    Token(TokenEvent),
    Done(Completion),
    Error(String),
}

/// Receiving end of a generation. Dropping it cancels the sequence and frees its KV cache.
pub struct GenerationStream {
    rx: UnboundedReceiver<Event>,
}

impl GenerationStream {
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
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
    req: GenerateRequest,
    tx: UnboundedSender<Event>,
}

pub struct Engine {
    tx: SyncSender<Job>,
    tok: Arc<Tok>,
    context: usize,
    stats: Arc<EngineStats>,
    max_queue: usize,
}

impl Engine {
    pub fn start(model: impl Into<Backend>, tok: Tok, cfg: EngineConfig) -> Result<Self> {
        Self::start_with_pool(model, tok, cfg, None)
    }

    /// Start with an adapter pool: requests may then name an adapter.
    pub fn start_with_pool(
        model: impl Into<Backend>,
        tok: Tok,
        mut cfg: EngineConfig,
        pool: Option<Arc<AdapterPool>>,
    ) -> Result<Self> {
        let model: Backend = model.into();
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
        std::thread::Builder::new()
            .name("retune-scheduler".into())
            .spawn(move || compute.install(move || worker.run()))
            .map_err(|e| EngineError::InvalidRequest(format!("cannot spawn scheduler: {e}")))?;
        Ok(Self {
            tx,
            tok,
            context,
            stats,
            max_queue: cfg.max_queue,
        })
    }

    pub fn tokenizer(&self) -> &Tok {
        &self.tok
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn context(&self) -> usize {
        self.context
    }

    /// Queue a request. Fails fast with `Overloaded` when the queue is full.
    pub fn submit(&self, req: GenerateRequest) -> Result<GenerationStream> {
        req.params.validate()?;
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if req.prompt.len() >= self.context {
            return Err(EngineError::PromptTooLong {
                prompt: req.prompt.len(),
                max_tokens: req.params.max_tokens,
                context: self.context,
            });
        }
        let (etx, erx) = unbounded_channel();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Job { req, tx: etx }) {
            Ok(()) => Ok(GenerationStream { rx: erx }),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => EngineError::Overloaded(self.max_queue),
                    TrySendError::Disconnected(_) => EngineError::ShutDown,
                })
            }
        }
    }

    /// Submit and wait for the whole result (CLI, tests, evals). Not for async contexts.
    pub fn generate_blocking(&self, req: GenerateRequest) -> Result<Generated> {
        let mut stream = self.submit(req)?;
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
                        completion: c,
                    });
                }
                Event::Error(e) => return Err(EngineError::InvalidRequest(e)),
            }
        }
        Err(EngineError::ShutDown)
    }
}

struct Seq {
    prompt: Vec<u32>,
    fed: usize,
    last: Option<u32>,
    generated: usize,
    kv: Cache,
    sampler: Sampler,
    detok: Detok,
    stop: StopText,
    tx: UnboundedSender<Event>,
    reserve: usize,
    adapter: Option<Arc<LoraAdapter>>,
}

enum Resolved {
    Ready(Option<Arc<LoraAdapter>>),
    Pending,
    Failed(String),
}

struct Worker {
    model: Backend,
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
                match self.resolve_adapter(&job) {
                    Resolved::Ready(a) if self.fits(&job) => self.admit(job, a),
                    Resolved::Failed(msg) => drop(job.tx.send(Event::Error(msg))),
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
                    Resolved::Failed(msg) => drop(job.tx.send(Event::Error(msg))),
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
        (job.req.prompt.len() + job.req.params.max_tokens).min(self.model.cfg().context)
    }

    /// KV budget: a job fits if nothing runs or its reservation fits.
    fn fits(&self, job: &Job) -> bool {
        self.active.is_empty() || self.reserved + self.reserve_of(job) <= self.cfg.max_kv_tokens
    }

    fn resolve_adapter(&self, job: &Job) -> Resolved {
        let Some(handle) = &job.req.adapter else {
            return Resolved::Ready(None);
        };
        let Some(pool) = &self.pool else {
            return Resolved::Failed(format!(
                "adapter `{handle}` requested but this engine has no adapter pool"
            ));
        };
        match pool.acquire(handle) {
            Acquire::Ready(a) => Resolved::Ready(Some(a)),
            Acquire::Pending => Resolved::Pending,
            Acquire::Failed(e) => Resolved::Failed(format!("adapter `{handle}`: {e}")),
        }
    }

    /// Let the pool evict what finished sequences no longer hold.
    fn release_adapters(&self) {
        if let Some(pool) = &self.pool {
            pool.trim();
        }
    }

    fn admit(&mut self, job: Job, adapter: Option<Arc<LoraAdapter>>) {
        let kv = match self.model.new_cache() {
            Ok(kv) => kv,
            Err(e) => {
                let _ = job.tx.send(Event::Error(e.to_string()));
                return;
            }
        };
        let reserve = self.reserve_of(&job);
        self.reserved += reserve;
        self.stats
            .prompt_tokens
            .fetch_add(job.req.prompt.len(), Ordering::Relaxed);
        let mut stops = job.req.params.stop.clone();
        stops.retain(|s| !s.is_empty());
        self.active.push(Seq {
            prompt: job.req.prompt,
            fed: 0,
            last: None,
            generated: 0,
            kv,
            sampler: Sampler::new(job.req.params),
            detok: Detok::default(),
            stop: StopText::new(stops),
            tx: job.tx,
            reserve,
            adapter,
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
                .map(|s| Some((&mut s.kv, s.adapter.as_deref())))
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
                for (i, _, _) in &inputs {
                    let _ = self.active[*i].tx.send(Event::Error(e.to_string()));
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
                let _ = s.tx.send(Event::Done(Completion {
                    finish: reason.0,
                    prompt_tokens: s.prompt.len(),
                    completion_tokens: s.generated,
                    tail,
                }));
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
    s.generated += 1;
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
    } else if s.generated >= max_tokens || s.kv.len() + 1 >= context {
        Some((FinishReason::Length, false))
    } else {
        None
    }
}
