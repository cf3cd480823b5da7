//! A scripted [`Backend`] for front-end tests: each submission plays the next
//! script (tokens, a mid-stream error, a hang-up, or a refusal at submit), so
//! HTTP behaviour is tested without a model.

use crate::backend::{
    Backend, BackendStats, Completion, Event, FinishReason, GenError, GenerationStream, Health,
    Timings, TokenEvent, ValidRequest,
};
use crate::chat::ChatTemplate;
use crate::tokenizer::Tok;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One event of a scripted generation.
#[derive(Clone, Debug)]
pub enum Step {
    /// A token with this text (ids count up from 1000).
    Token(String),
    /// The generation fails here.
    Fail(GenError),
    /// The generation ends normally.
    Finish(FinishReason),
    /// The backend goes away without a last event (as when it shuts down).
    HangUp,
    /// The generation runs until its caller drops the stream (counted in
    /// [`ScriptedBackend::cancelled`]) or [`Backend::abort_all`] ends it.
    Hold,
}

#[derive(Clone, Debug)]
pub enum Script {
    /// `submit` itself fails (overload, shutdown, ...).
    Refuse(GenError),
    Stream(Vec<Step>),
}

pub struct ScriptedBackend {
    tok: Tok,
    template: ChatTemplate,
    context: usize,
    scripts: Mutex<VecDeque<Script>>,
    health: Mutex<Health>,
    submitted: Mutex<Vec<ValidRequest>>,
    held: Arc<Mutex<Vec<crate::backend::EventSender>>>,
    cancelled: Arc<AtomicUsize>,
    aborted: Mutex<Option<String>>,
}

impl ScriptedBackend {
    pub fn new(tok: Tok, template: ChatTemplate, context: usize) -> Self {
        Self {
            tok,
            template,
            context,
            scripts: Mutex::new(VecDeque::new()),
            health: Mutex::new(Health::Ready),
            submitted: Mutex::new(Vec::new()),
            held: Arc::new(Mutex::new(Vec::new())),
            cancelled: Arc::new(AtomicUsize::new(0)),
            aborted: Mutex::new(None),
        }
    }

    /// Held generations whose caller dropped the stream.
    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Held generations still running.
    pub fn holding(&self) -> usize {
        lock(&self.held).len()
    }

    /// With the tokenizer and template of a tiny model written under `dir`.
    pub fn tiny(dir: &Path) -> crate::Result<Self> {
        let (gguf, _) = crate::tiny::write(dir, &crate::tiny::TinySpec::default())?;
        let loaded = crate::load(&gguf)?;
        Ok(Self::new(
            loaded.tok,
            loaded.template,
            loaded.model.cfg.context,
        ))
    }

    /// Queue the script the next submission plays; with none queued a submission
    /// answers `"ok"` and stops.
    pub fn push(&self, script: Script) {
        lock(&self.scripts).push_back(script);
    }

    pub fn set_health(&self, h: Health) {
        *lock(&self.health) = h;
    }

    /// The requests submitted so far (refused ones too), as validated.
    pub fn submitted(&self) -> Vec<ValidRequest> {
        lock(&self.submitted).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Backend for ScriptedBackend {
    fn submit(&self, req: ValidRequest) -> Result<GenerationStream, GenError> {
        if let Some(why) = lock(&self.aborted).clone() {
            return Err(GenError::new(crate::backend::ErrorKind::Unavailable, why));
        }
        let script = lock(&self.scripts).pop_front().unwrap_or_else(|| {
            Script::Stream(vec![
                Step::Token("ok".into()),
                Step::Finish(FinishReason::Stop),
            ])
        });
        lock(&self.submitted).push(req.clone());
        let steps = match script {
            Script::Refuse(e) => return Err(e),
            Script::Stream(steps) => steps,
        };
        let (tx, rx) = GenerationStream::channel();
        let mut output = Vec::new();
        for step in steps {
            match step {
                Step::Token(text) => {
                    let id = 1000 + output.len() as u32;
                    output.push(id);
                    tx.send(Event::Token(TokenEvent {
                        id,
                        text,
                        logprob: None,
                        top: Vec::new(),
                        at: std::time::Instant::now(),
                    }));
                }
                Step::Fail(e) => {
                    tx.send(Event::Error(e));
                    break;
                }
                Step::Finish(finish) => {
                    tx.send(Event::Done(Box::new(Completion {
                        finish,
                        prompt: req.prompt().to_vec(),
                        output: std::mem::take(&mut output),
                        adapter: req.adapter().cloned(),
                        params: req.params().clone(),
                        timings: Timings::default(),
                        tail: String::new(),
                        cached_tokens: 0,
                    })));
                    break;
                }
                Step::HangUp => break,
                Step::Hold => {
                    lock(&self.held).push(tx);
                    let (held, cancelled) = (self.held.clone(), self.cancelled.clone());
                    // watch for the caller leaving, as the engine's scheduler does
                    std::thread::spawn(move || loop {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        let mut h = lock(&held);
                        let before = h.len();
                        h.retain(|t| !t.is_closed());
                        cancelled.fetch_add(before - h.len(), Ordering::SeqCst);
                        if h.is_empty() {
                            return;
                        }
                    });
                    return Ok(rx);
                }
            }
        }
        Ok(rx)
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
        lock(&self.health).clone()
    }

    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }

    fn abort_all(&self, reason: &str) {
        *lock(&self.aborted) = Some(reason.to_string());
        for tx in lock(&self.held).drain(..) {
            tx.send(Event::Error(GenError::new(
                crate::backend::ErrorKind::Unavailable,
                reason,
            )));
        }
    }
}
