//! The capture writer: a bounded queue in front of the store, drained in batches
//! by its own thread. A full queue or a failing store never delays or fails a
//! completion. A store that is unavailable (a shared database down:
//! [`DataError::Unavailable`], nothing written) is retried with backoff while
//! the records wait, up to one batch plus the queue's capacity held beside the
//! queue; past that, and on any other store error, records are dropped and
//! counted. The stores insert by id and ignore an id they have, so a retried
//! batch is never written twice.

use crate::record::CapturedCompletion;
use crate::{DataError, DatasetStore};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Records written per transaction at most.
const BATCH: usize = 256;

#[derive(Default, Debug)]
pub struct CaptureStats {
    /// Records written to the store.
    pub captured: AtomicU64,
    /// Records lost: the queue (and what is held for an unavailable store)
    /// was full, or the store failed.
    pub dropped: AtomicU64,
}

enum Msg {
    Record(Box<CapturedCompletion>),
    /// Answered once everything queued before it was handled.
    Barrier(SyncSender<()>),
}

#[derive(Clone)]
pub struct CaptureWriter {
    tx: SyncSender<Msg>,
    stats: Arc<CaptureStats>,
}

impl CaptureWriter {
    /// Start the writer thread; `capacity` records may wait in the queue.
    pub fn start(store: Arc<dyn DatasetStore>, capacity: usize) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(capacity.max(1));
        let stats = Arc::new(CaptureStats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("retune-capture".into())
            .spawn(move || run(rx, store, st, capacity.max(1)))?;
        Ok(Self { tx, stats })
    }

    /// Queue a record; never blocks. False (and counted) when it was dropped.
    pub fn capture(&self, c: CapturedCompletion) -> bool {
        match self.tx.try_send(Msg::Record(Box::new(c))) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Wait until every record queued before this call was written or dropped,
    /// at most `timeout`; false on timeout. Blocks: not for the async runtime.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (done_tx, done_rx) = sync_channel(1);
        let mut msg = Msg::Barrier(done_tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(m)) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        !matches!(
            done_rx.recv_timeout(left),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected)
        )
    }

    pub fn stats(&self) -> &CaptureStats {
        &self.stats
    }
}

/// The first wait before a write is retried, and the longest.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How long records held for an unavailable store are still retried once the
/// writer is gone (every sender dropped: the server is stopping).
const RETRY_AFTER_CLOSE: Duration = Duration::from_secs(5);

fn run(rx: Receiver<Msg>, store: Arc<dyn DatasetStore>, stats: Arc<CaptureStats>, hold: usize) {
    // records taken off the queue and not yet written, oldest first
    let mut pending: VecDeque<CapturedCompletion> = VecDeque::new();
    // barriers wait for every record queued before them: each is answered
    // once `handled` (records that left `pending`, written or dropped)
    // reaches the count it arrived behind
    let mut barriers: Vec<(usize, SyncSender<()>)> = Vec::new();
    let mut handled: usize = 0;
    // while the store is unavailable: when to try again, and the wait after that
    let mut retry: Option<(Instant, Duration)> = None;
    let mut closed: Option<Instant> = None;
    loop {
        // wait for work: forever when nothing is held, else until the next try
        let first = if closed.is_some() {
            None
        } else if pending.is_empty() {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => {
                    closed = Some(Instant::now());
                    None
                }
            }
        } else {
            let wait = retry.map_or(Duration::ZERO, |(at, _)| {
                at.saturating_duration_since(Instant::now())
            });
            match rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = Some(Instant::now());
                    None
                }
            }
        };
        let mut next = first;
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(c) if pending.len() < BATCH + hold => pending.push_back(*c),
                Msg::Record(_) => {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Msg::Barrier(done) => barriers.push((handled + pending.len(), done)),
            }
            if retry.is_some() || pending.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        let due = retry.is_none_or(|(at, _)| Instant::now() >= at);
        if !pending.is_empty() && due {
            let n = pending.len().min(BATCH);
            match store.record(&pending.make_contiguous()[..n]) {
                Ok(()) => {
                    stats.captured.fetch_add(n as u64, Ordering::Relaxed);
                    pending.drain(..n);
                    handled += n;
                    if retry.take().is_some() {
                        tracing::info!(records = n, "capture store back: held records written");
                    }
                }
                Err(DataError::Unavailable(e)) => {
                    let wait = retry.map_or(RETRY_FIRST, |(_, w)| (w * 2).min(RETRY_MAX));
                    if retry.is_none() {
                        tracing::warn!(error = %e, held = pending.len(), "capture store unavailable: holding records and retrying");
                    }
                    retry = Some((Instant::now() + wait, wait));
                }
                Err(e) => {
                    // the store answered: no backoff for the records after these
                    retry = None;
                    tracing::warn!(error = %e, records = n, "capture store failed: records dropped");
                    stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
                    pending.drain(..n);
                    handled += n;
                }
            }
        }
        if let Some(at) = closed {
            let give_up = retry.is_some() && at.elapsed() >= RETRY_AFTER_CLOSE;
            if give_up {
                tracing::warn!(
                    records = pending.len(),
                    "capture store still unavailable at shutdown: records dropped"
                );
                stats
                    .dropped
                    .fetch_add(pending.len() as u64, Ordering::Relaxed);
                handled += pending.len();
                pending.clear();
            }
        }
        barriers.retain(|(upto, done)| {
            let answered = *upto <= handled;
            if answered {
                let _ = done.try_send(());
            }
            !answered
        });
        if closed.is_some() && pending.is_empty() {
            return;
        }
        if closed.is_some() {
            // the queue is gone: sleep until the next try instead of spinning
            if let Some((at, _)) = retry {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
        }
    }
}
