//! `retune-trainer daemon`, `status` and `eval`: the loop and its checks.

use super::*;

pub(super) fn daemon_cmd(
    at: &SettingsArgs,
    once: bool,
    holder: Option<String>,
) -> anyhow::Result<()> {
    let settings = at.load()?;
    let t = &settings.trainer;
    // before any thread exists, so every thread inherits them
    if t.threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", t.threads.to_string());
    }
    #[cfg(target_os = "linux")]
    unsafe {
        // serving on the same node wins the CPU when both want it
        libc::setpriority(libc::PRIO_PROCESS, 0, t.nice);
        if t.priority == "idle" {
            let p = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) != 0 {
                tracing::warn!(
                    "SCHED_IDLE refused ({}); running at nice {}",
                    std::io::Error::last_os_error(),
                    t.nice
                );
            }
        }
    }
    let holder = holder
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "retune-trainer".into());
    let poll = std::time::Duration::from_secs_f64(t.poll_seconds);
    // SIGTERM (the kubelet; as PID 1 in a container an unhandled one is
    // ignored) and SIGINT: end the run at its next step, release the lease,
    // exit. Installed before the model loads, so an early stop is not lost.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let flag = stop.clone();
        // SAFETY: the action only stores to an atomic (async-signal-safe)
        let installed = unsafe {
            signal_hook_registry::register(sig, move || {
                flag.store(true, std::sync::atomic::Ordering::Relaxed)
            })
        };
        if let Err(e) = installed {
            tracing::error!(
                "cannot install a handler for signal {sig}: {e}; a stop will kill a run"
            );
        }
    }
    let d = retune_trainer::daemon::Daemon::open(settings, holder)?.with_stop_flag(stop);
    eprintln!(
        "retune-trainer daemon: holder {}, looking every {:?}",
        d.holder, poll
    );
    loop {
        if d.stop_requested() {
            eprintln!("retune-trainer daemon: stopped");
            return Ok(());
        }
        match d.pass() {
            Ok(outcomes) => {
                for o in outcomes {
                    println!("{}", serde_json::to_string(&o)?);
                }
            }
            // a failing pass (a store briefly unavailable) is retried next pass
            Err(e) if !once => tracing::error!("pass failed: {e}"),
            Err(e) => return Err(e.into()),
        }
        if once {
            return Ok(());
        }
        let until = std::time::Instant::now() + poll;
        while !d.stop_requested() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(100).min(poll));
        }
    }
}

pub(super) fn status_cmd(at: &SettingsArgs, json: bool) -> anyhow::Result<()> {
    let settings = at.load()?;
    let root = settings
        .adapters
        .root
        .clone()
        .ok_or_else(|| TrainError::Setting("adapters.root is not set".into()))?;
    let st = retune_trainer::daemon::status(&settings, &root)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    let c = &st.counts;
    println!(
        "runs {:?}; gate passes {}, fails {}; automatic rollbacks {}; watching {}",
        c.runs, c.gate_passes, c.gate_fails, c.auto_rollbacks, c.watching
    );
    for a in &st.adapters {
        println!(
            "{}/{}: live {}, canary {}, lease {}, {} new examples since the last data mark",
            a.tenant,
            a.name,
            a.live.as_deref().unwrap_or("-"),
            a.canary
                .as_ref()
                .map(|c| format!("{} at {}%", c.0, c.1))
                .unwrap_or_else(|| "-".into()),
            a.lease.as_deref().unwrap_or("free"),
            a.new_examples
        );
        for r in &a.runs {
            println!(
                "  run {} {}{}: {}",
                r.id,
                r.status,
                r.version
                    .as_ref()
                    .map(|v| format!(" → {v}"))
                    .unwrap_or_default(),
                r.detail
                    .get("reason")
                    .and_then(|x| x.as_str())
                    .unwrap_or("")
            );
        }
        if let Some(w) = &a.watch {
            println!(
                "  watch {} ({}): {} {}",
                w.version,
                w.mode,
                w.status,
                w.verdict
                    .get("state")
                    .and_then(|x| x.as_str())
                    .unwrap_or("")
            );
        }
    }
    Ok(())
}

pub(super) fn eval_cmd(
    model: &std::path::Path,
    data: &std::path::Path,
    adapters: &[PathBuf],
    limit: Option<usize>,
    (batch, max_new): (usize, usize),
    answers: Option<&std::path::Path>,
    labels: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let labels = labels.map(read_labels).transpose()?;
    let l = retune_engine::load(model).with_context(|| format!("loading {}", model.display()))?;
    let text =
        std::fs::read_to_string(data).with_context(|| format!("reading {}", data.display()))?;
    let (rows, errors) = retune_datasets::parse_jsonl(&text);
    if let Some(e) = errors.first() {
        return Err(
            TrainError::Data(format!("{}: line {}: {}", data.display(), e.line, e.reason)).into(),
        );
    }
    let mut bodies: Vec<_> = rows.into_iter().map(|r| r.body).collect();
    if let Some(n) = limit {
        bodies.truncate(n);
    }
    let mut runs: Vec<(String, Option<retune_adapters::LoraAdapter>)> = Vec::new();
    if adapters.is_empty() {
        runs.push(("base".into(), None));
    }
    for a in adapters {
        let la = retune_adapters::load_peft(a, &l.model.base_shapes(), &Default::default())
            .with_context(|| format!("loading adapter {}", a.display()))?;
        runs.push((a.display().to_string(), Some(la)));
    }
    for (name, a) in &runs {
        let acc = retune_trainer::eval::exact_match(
            &l.model,
            &l.tok,
            &l.template,
            a.as_ref(),
            &bodies,
            (max_new, batch),
            labels.as_deref(),
        )?;
        println!(
            "{}",
            serde_json::json!({"adapter": name, "accuracy": acc.accuracy, "correct": acc.correct, "total": acc.total, "seconds": acc.seconds})
        );
        if let Some(path) = answers {
            let lines: String = acc
                .answers
                .iter()
                .map(|a| format!("{}\n", serde_json::json!({ "answer": a.trim() })))
                .collect();
            std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
