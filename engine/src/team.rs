//! A spinning fork-join team for the parallel regions of a forward call.
//!
//! A decode step of a small model is about 150 short parallel regions (the
//! projections of every layer, attention, the output layer), each tens of
//! microseconds long. Rayon's idle workers yield to the OS and then sleep
//! between regions, so each region paid a wake-up and the second core sat in
//! `sched_yield` for a large share of the step. A team keeps its helper
//! threads spinning on one atomic word for a short while after each region
//! (as llama.cpp's thread pool does), so the next region starts on every
//! thread within nanoseconds; after [`SPIN`] without work they sleep on a
//! condition variable and cost nothing.
//!
//! [`for_each`] runs `f(0..n)` on the calling thread and the team of the
//! current rayon pool's size (`rayon::current_num_threads()`, so an engine's
//! `threads` setting holds). One team exists per size, process-wide; a caller
//! that finds its team busy (two engines in one process) runs on rayon
//! instead. Which thread runs which index never changes a result: every
//! index computes the same thing wherever it runs.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it sleeps.
pub const SPIN: Duration = Duration::from_micros(200);

type Job = *const (dyn Fn(usize) + Sync);

struct Team {
    /// Helpers (the caller is the last member).
    helpers: usize,
    /// `epoch << 32 | next index to claim`.
    state: AtomicU64,
    /// Indices in the current region.
    n: AtomicUsize,
    /// Indices finished in the current region.
    done: AtomicUsize,
    /// The current region's body; written only between regions (see `run`).
    job: UnsafeCell<Option<Job>>,
    /// The first panic of the current region's body, raised again on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Held by the caller of a region: one region at a time.
    busy: Mutex<()>,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written by the region's caller before it publishes the
// region (a release store of `state`) and read by a helper only after it has
// claimed an index of that region (an acquire read-modify-write of `state`);
// the caller rewrites it only after every index is done.
unsafe impl Sync for Team {}
unsafe impl Send for Team {}

fn teams() -> &'static Mutex<Vec<Arc<Team>>> {
    static TEAMS: OnceLock<Mutex<Vec<Arc<Team>>>> = OnceLock::new();
    TEAMS.get_or_init(|| Mutex::new(Vec::new()))
}

/// The team with `threads` members in all, started on first use; `None`
/// where its threads cannot be started (then rayon runs the region).
fn team(threads: usize) -> Option<Arc<Team>> {
    let mut all = teams().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = all.iter().find(|t| t.helpers + 1 == threads) {
        return Some(t.clone());
    }
    let t = Arc::new(Team {
        helpers: threads - 1,
        state: AtomicU64::new(0),
        n: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        job: UnsafeCell::new(None),
        panic: Mutex::new(None),
        busy: Mutex::new(()),
        sleepers: AtomicUsize::new(0),
        sleep: Mutex::new(()),
        wake: Condvar::new(),
    });
    for i in 0..t.helpers {
        let tt = t.clone();
        std::thread::Builder::new()
            .name(format!("retune-team{threads}-{i}"))
            .spawn(move || tt.helper())
            .ok()?;
    }
    all.push(t.clone());
    Some(t)
}

impl Team {
    /// Claim and run indices of the region of `epoch` until none is left.
    fn work(&self, epoch: u64) {
        loop {
            let s = self.state.load(Acquire);
            if s >> 32 != epoch {
                return;
            }
            let i = (s & 0xffff_ffff) as usize;
            if i >= self.n.load(Acquire) {
                return;
            }
            if self
                .state
                .compare_exchange_weak(s, s + 1, AcqRel, Relaxed)
                .is_err()
            {
                continue;
            }
            // SAFETY: index `i` of this epoch is claimed and not done, so the
            // caller is still waiting and `job` is this region's.
            let job = unsafe { (*self.job.get()).unwrap_or_else(|| unreachable_job()) };
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(i) })) {
                let mut g = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                g.get_or_insert(p);
            }
            self.done.fetch_add(1, Release);
        }
    }

    fn helper(&self) {
        let mut seen = 0u64;
        loop {
            let t0 = Instant::now();
            let mut spins = 0u32;
            let epoch = loop {
                let e = self.state.load(Acquire) >> 32;
                if e != seen {
                    break e;
                }
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(1024) && t0.elapsed() > SPIN {
                    let mut g = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
                    self.sleepers.fetch_add(1, SeqCst);
                    while self.state.load(SeqCst) >> 32 == seen {
                        g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    self.sleepers.fetch_sub(1, SeqCst);
                }
            };
            seen = epoch;
            self.work(epoch);
        }
    }

    /// Run `f(0..n)` on the team and the calling thread (`n < u32::MAX`).
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        // Close the previous region first: a helper that read its state just
        // before it ran out could otherwise claim an index with the next
        // region's `n` and `job`. After this read-modify-write every stale
        // claim fails, and every claim that succeeded came before it.
        let prev = self.state.fetch_or(0xffff_ffff, AcqRel) >> 32;
        // SAFETY: lifetime erasure only; `run` returns after every index is
        // done, and no helper reads `job` after that (see `work`).
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        // SAFETY: no index of any region is outstanding (the previous `run`
        // waited for all, and the previous region is closed), so no helper
        // reads `job` now.
        unsafe { *self.job.get() = Some(job) };
        self.n.store(n, Relaxed);
        self.done.store(0, Relaxed);
        let epoch = (prev + 1) & 0xffff_ffff;
        self.state.store(epoch << 32, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _g = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        self.work(epoch);
        // a helper preempted mid-index: stop burning the core it needs
        let mut spins = 0u32;
        while self.done.load(Acquire) < n {
            spins = spins.saturating_add(1);
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let panic = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = panic {
            resume_unwind(p);
        }
    }
}

#[cold]
fn unreachable_job() -> Job {
    panic!("team: a claimed region without a body")
}

/// Run `f(i)` for every `i` in `0..n`, in parallel; returns when all are done.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads();
    if n <= 1 || threads <= 1 || n >= u32::MAX as usize {
        (0..n).for_each(f);
        return;
    }
    if let Some(t) = team(threads) {
        let busy = match t.busy.try_lock() {
            Ok(g) => Some(g),
            // a region's body panicked before: the team itself is sound
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if let Some(_busy) = busy {
            t.run(n, &f);
            return;
        }
    }
    use rayon::prelude::*;
    (0..n).into_par_iter().for_each(&f);
}

/// `f(i)` for every `i` in `0..n`, in parallel, collected in index order.
pub fn map<T: Send + Sync>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<OnceLock<T>> = (0..n).map(|_| OnceLock::new()).collect();
    for_each(n, |i| {
        let _ = slots[i].set(f(i));
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|| panic!("team: index without a result"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_in_every_region() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            for n in [0usize, 1, 2, 7, 64, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_each(n, |i| {
                    hits[i].fetch_add(1, Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "n = {n}");
            }
            // many short regions of changing sizes back to back: a helper
            // late from one region must never claim an index of the next
            for round in 0..20_000usize {
                let n = 2 + (round * 7919) % 29;
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_each(n, |i| {
                    hits[i].fetch_add(1, Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Relaxed) == 1),
                    "round {round}, n = {n}"
                );
            }
            // back to back, with and without pauses that let the helpers sleep
            for round in 0..200usize {
                if round % 50 == 0 {
                    std::thread::sleep(SPIN * 3);
                }
                let v = map(round % 37 + 2, |i| i * round);
                assert_eq!(
                    v,
                    (0..round % 37 + 2).map(|i| i * round).collect::<Vec<_>>()
                );
            }
        });
    }

    #[test]
    fn a_busy_team_falls_back_and_a_panic_reaches_the_caller() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            // a region started inside a region finds the team busy
            let total = AtomicUsize::new(0);
            for_each(4, |_| {
                for_each(5, |_| {
                    total.fetch_add(1, Relaxed);
                })
            });
            assert_eq!(total.load(Relaxed), 20);
            let r = catch_unwind(|| {
                for_each(64, |i| {
                    if i == 63 {
                        panic!("boom");
                    }
                })
            });
            let payload = r.expect_err("the panic reaches the caller");
            assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
            // the team still works after a panic
            assert_eq!(map(10, |i| i + 1).iter().sum::<usize>(), 55);
        });
    }
}
