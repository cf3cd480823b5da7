//! The CPU gate: the release build targets x86-64-v3 (`.cargo/config.toml`),
//! and a CPU without those features would die of SIGILL at the first AVX2
//! instruction — possibly before `main` checks anything, since the compiler
//! uses them anywhere. The check is therefore C compiled for baseline x86-64
//! (`src/cpu_check.c`), run as a constructor before any Rust code: it exits 1
//! with a message naming what is missing. `std::is_x86_feature_detected!`
//! cannot do this: it answers `true` at compile time for enabled features.

#[cfg(target_arch = "x86_64")]
extern "C" {
    fn retune_cpu_gate_linked() -> std::os::raw::c_int;
}

/// Link the gate into this binary (call from `main`); true when the build
/// assumes x86-64-v3 and the gate checked this CPU before `main` ran.
pub fn require_build_features() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a C function without arguments or side effects.
        unsafe { retune_cpu_gate_linked() != 0 }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// This machine's CPU for benchmark reports: its model name, the vector units
/// it reports, and the kernel path that runs (the build's: x86-64-v3, AVX2).
pub fn describe() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let has: Vec<&str> = [
        "avx2",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
    ]
    .into_iter()
    .filter(|f| flags.split_whitespace().any(|x| x == *f))
    .collect();
    format!(
        "{} ({} cores; reports {}); kernels: AVX2 (the x86-64-v3 build)",
        field("model name"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        has.join(" ")
    )
}
