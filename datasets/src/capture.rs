//! The capture writer: a bounded queue in front of the store, drained in batches
//! by its own thread. A full queue or a failing store never delays or fails a
//! completion: the record is dropped and counted.

use crate::record::CapturedCompletion;
use crate::DatasetStore;
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
    /// Records lost: the queue was full or the store failed.
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
            .spawn(move || run(rx, store, st))?;
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

fn run(rx: Receiver<Msg>, store: Arc<dyn DatasetStore>, stats: Arc<CaptureStats>) {
    let mut batch: Vec<CapturedCompletion> = Vec::with_capacity(BATCH);
    let mut barriers = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(c) => batch.push(*c),
                Msg::Barrier(done) => barriers.push(done),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            match store.record(&batch) {
                Ok(()) => stats.captured.fetch_add(n, Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!(error = %e, records = n, "capture store failed: records dropped");
                    stats.dropped.fetch_add(n, Ordering::Relaxed)
                }
            };
            batch.clear();
        }
        for done in barriers.drain(..) {
            let _ = done.try_send(());
        }
    }
}
