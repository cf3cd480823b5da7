//! The seam between a front end (the HTTP server, the CLI, evals) and generation:
//! a [`Backend`] takes a [`ValidRequest`] and answers with a stream of typed
//! [`Event`]s. The scheduler's [`crate::Engine`] implements it; front-end tests use
//! a scripted fake (`testing::ScriptedBackend`, feature `test-utils`).

use crate::chat::ChatTemplate;
use crate::error::EngineError;
use crate::sampler::SamplingParams;
use crate::tokenizer::Tok;
use retune_adapters::AdapterRef;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Who is at fault when generation fails; the server maps each to a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request cannot be served as sent (its message is for the client).
    Client,
    /// The resolved adapter version could not be loaded or run.
    Adapter,
    /// Queue or memory is full: retry later.
    Capacity,
    /// The backend is shutting down or has stopped.
    Unavailable,
    /// The adapter's files cannot be fetched right now (its store is
    /// unreachable): retry later.
    AdapterUnavailable,
    /// A fault of the server (its message may name files: log it, never show it).
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Adapter => "adapter",
            Self::Capacity => "capacity",
            Self::Unavailable => "unavailable",
            Self::AdapterUnavailable => "adapter_unavailable",
            Self::Internal => "internal",
        }
    }
}

/// A failed generation: a kind and a message (safe to show only for `Client`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct GenError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, for a client error about one (`constraint`:
    /// the structured-output constraint, whichever field carried it).
    pub param: Option<String>,
}

impl GenError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
        }
    }

    /// A client error about request field `param`.
    pub fn client_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::client(message)
        }
    }

    pub fn client(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Client, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl From<EngineError> for GenError {
    fn from(e: EngineError) -> Self {
        let kind = match &e {
            // `InvalidRequest` is also raised deep in the engine: a client error
            // only where a request is validated (`ValidRequest::new`)
            EngineError::PromptTooLong { .. }
            | EngineError::EmptyPrompt
            | EngineError::Template(_) => ErrorKind::Client,
            EngineError::Overloaded(_) => ErrorKind::Capacity,
            EngineError::ShutDown => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        };
        Self::new(kind, e.to_string())
    }
}

/// A request that passed every check a backend makes before queueing: sampling
/// parameters, prompt length against the context, and a seed (drawn here when
/// the caller gave none, so the completion can be replayed).
#[derive(Clone, Debug)]
pub struct ValidRequest {
    prompt: Vec<u32>,
    params: SamplingParams,
    adapter: Option<AdapterRef>,
    /// Whose request it is: the scheduler shares the queue, the KV budget and
    /// prefill fairly across tenants (`None`: the anonymous tenant).
    tenant: Option<std::sync::Arc<str>>,
    /// `params.constraint`, compiled (here, off the scheduler thread).
    guide: Option<crate::guide::Guide>,
    /// The request's text as a classical classifier reads it (its user turns):
    /// a classifier adapter with a classical prior weighs its labels by it.
    text: Option<std::sync::Arc<str>>,
}

impl ValidRequest {
    /// Callers outside the engine go through [`Backend::validate`], which knows the context.
    pub(crate) fn new(
        prompt: Vec<u32>,
        mut params: SamplingParams,
        adapter: Option<AdapterRef>,
        context: usize,
        tok: &Tok,
    ) -> Result<Self, GenError> {
        params
            .validate()
            .map_err(|e| GenError::client(e.to_string()))?;
        let guide =
            match &params.constraint {
                None => None,
                Some(c) => Some(tok.grammars().and_then(|g| g.compile(c)).map_err(
                    |e| match e {
                        EngineError::InvalidRequest(_) => {
                            GenError::client_param("constraint", e.to_string())
                        }
                        // the grammar engine's own failure is the server's
                        e => GenError::internal(e.to_string()),
                    },
                )?),
            };
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt.into());
        }
        if prompt.len() >= context {
            return Err(EngineError::PromptTooLong {
                prompt: prompt.len(),
                max_tokens: params.max_tokens,
                context,
            }
            .into());
        }
        params.seed = Some(params.seed.unwrap_or_else(rand::random));
        Ok(Self {
            prompt,
            params,
            adapter,
            tenant: None,
            guide,
            text: None,
        })
    }

    /// The request's text as a classical classifier reads it (for a classifier
    /// adapter with a classical prior; see `retune_adapters::LabelPrior`).
    pub fn with_text(mut self, text: &str) -> Self {
        self.text = Some(text.into());
        self
    }

    /// The tenant the request is queued and budgeted under.
    pub fn with_tenant(mut self, tenant: &str) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// The parameters, with `seed` always set.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn adapter(&self) -> Option<&AdapterRef> {
        self.adapter.as_ref()
    }

    pub fn into_parts(self) -> (Vec<u32>, SamplingParams, Option<AdapterRef>) {
        (self.prompt, self.params, self.adapter)
    }

    pub(crate) fn into_tenant_parts(self) -> ValidParts {
        ValidParts {
            prompt: self.prompt,
            params: self.params,
            adapter: self.adapter,
            tenant: self.tenant,
            guide: self.guide,
            text: self.text,
        }
    }

    /// The same request for the `k`th of several samples: its seed is the
    /// request's plus `k` (sample 0 is the request itself).
    pub fn nth_sample(&self, k: usize) -> Self {
        let mut r = self.clone();
        r.params.seed = self.params.seed.map(|s| s.wrapping_add(k as u64));
        r
    }
}

pub(crate) struct ValidParts {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub adapter: Option<AdapterRef>,
    pub tenant: Option<std::sync::Arc<str>>,
    pub guide: Option<crate::guide::Guide>,
    pub text: Option<std::sync::Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// eos, a stop token or a stop string.
    Stop,
    /// max_tokens or the context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TokenEvent {
    pub id: u32,
    /// New text (may be empty while a UTF-8 character or a possible stop string is incomplete).
    pub text: String,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
    /// When the engine sampled it (not when a reader got it).
    pub at: Instant,
}

/// Times of one generation, from its submission.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timings {
    /// Waiting for admission (queue, KV budget, adapter load).
    pub queued: Duration,
    /// To the first sampled token.
    pub first_token: Duration,
    pub total: Duration,
}

/// The record of a finished generation: enough to capture it and to replay it
/// (same prompt, parameters with the seed, adapter version → same output).
#[derive(Clone, Debug)]
pub struct Completion {
    pub finish: FinishReason,
    pub prompt: Vec<u32>,
    /// Every sampled token id, the stop token included.
    pub output: Vec<u32>,
    pub adapter: Option<AdapterRef>,
    /// The parameters used, `seed` set to the seed actually used.
    pub params: SamplingParams,
    pub timings: Timings,
    /// Trailing text released at the end (held back for stop-string matching).
    pub tail: String,
    /// Prompt positions reused from the prefix cache, not prefilled.
    pub cached_tokens: usize,
}

impl Completion {
    pub fn prompt_tokens(&self) -> usize {
        self.prompt.len()
    }

    pub fn completion_tokens(&self) -> usize {
        self.output.len()
    }

    pub fn seed(&self) -> Option<u64> {
        self.params.seed
    }
}

#[derive(Clone, Debug)]
pub enum Event {
    Token(TokenEvent),
    Done(Box<Completion>),
    /// Generation failed; nothing follows.
    Error(GenError),
}

/// The sending end of a generation's events.
pub struct EventSender {
    tx: UnboundedSender<Event>,
}

impl EventSender {
    /// Send an event; false when the receiver is gone.
    pub fn send(&self, ev: Event) -> bool {
        self.tx.send(ev).is_ok()
    }

    /// The caller dropped its stream: stop working for it.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Receiving end of a generation. Dropping it cancels the sequence and frees its KV cache.
pub struct GenerationStream {
    rx: UnboundedReceiver<Event>,
}

impl GenerationStream {
    /// A connected pair, for backends (and fakes) to produce events into.
    pub fn channel() -> (EventSender, GenerationStream) {
        let (tx, rx) = unbounded_channel();
        (EventSender { tx }, GenerationStream { rx })
    }

    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Ready,
    /// Not serving (the reason is for logs and operators).
    Unavailable(String),
}

/// A snapshot of a backend's counters, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub queued: usize,
    pub running: usize,
    pub kv_bytes: usize,
    pub generated_tokens: usize,
    pub prompt_tokens: usize,
    /// Tokens in the most recent forward step (decode rows + prefill chunk).
    pub last_step_tokens: usize,
    /// The prefix cache's counters (`None`: no prefix cache).
    pub prefix: Option<PrefixCounters>,
    /// KV positions the running sequences reserve, and the budget
    /// (`engine.max_kv_tokens`); 0 when the backend does not say.
    pub kv_reserved_tokens: usize,
    pub kv_capacity_tokens: usize,
    /// Adapter names (as clients send them in `model`) of running sequences,
    /// and of requests waiting (queued or loading their adapter); sorted, no repeats.
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
}

/// Counters of a prefix cache, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixCounters {
    pub hits: u64,
    pub misses: u64,
    pub tokens_reused: u64,
    pub evictions: u64,
    /// Prompts longer than a tenant's share of the cache: served, not cached.
    pub uncached_too_long: u64,
    pub tokens: usize,
    pub bytes: usize,
}

/// What the HTTP server needs from generation.
pub trait Backend: Send + Sync + 'static {
    /// Queue a validated request. Never blocks: a full queue is `Capacity`.
    fn submit(&self, req: ValidRequest) -> Result<GenerationStream, GenError>;

    /// `n` samples of one request, sample `k` seeded with the request's seed
    /// plus `k`: one stream each. The engine prefills the prompt once; this
    /// default queues `n` requests.
    fn submit_n(&self, req: ValidRequest, n: usize) -> Result<Vec<GenerationStream>, GenError> {
        (0..n.max(1))
            .map(|k| self.submit(req.nth_sample(k)))
            .collect()
    }
    fn tokenizer(&self) -> &Tok;
    fn template(&self) -> &ChatTemplate;
    /// Positions a sequence may use (prompt + generated).
    fn context(&self) -> usize;
    fn health(&self) -> Health;
    fn stats(&self) -> BackendStats;

    /// End every queued and running generation now with an `Unavailable` error
    /// (`reason` is its message) and refuse new ones: the drain deadline is
    /// reached, and clients are owed an ending rather than a cut connection.
    fn abort_all(&self, reason: &str);

    /// Check a request against this backend's limits.
    fn validate(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        adapter: Option<AdapterRef>,
    ) -> Result<ValidRequest, GenError> {
        ValidRequest::new(prompt, params, adapter, self.context(), self.tokenizer())
    }
}

/// When a request was submitted, for [`Timings`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    pub submitted: Instant,
    pub admitted: Option<Instant>,
    pub first_token: Option<Instant>,
}

impl Clock {
    pub fn start() -> Self {
        Self {
            submitted: Instant::now(),
            admitted: None,
            first_token: None,
        }
    }

    pub fn timings(&self) -> Timings {
        let since = |t: Option<Instant>| t.map(|t| t - self.submitted).unwrap_or_default();
        Timings {
            queued: since(self.admitted),
            first_token: since(self.first_token),
            total: self.submitted.elapsed(),
        }
    }
}
