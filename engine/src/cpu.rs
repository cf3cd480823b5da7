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

/// Whether the OS lets this process use AMX tile data: `None` when the CPU
/// does not report AMX. Linux grants it per process on request
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); without the grant
/// the first tile instruction dies with SIGILL even on a CPU that reports AMX.
pub fn amx_granted() -> Option<bool> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // CPUID.(EAX=7,ECX=0):EDX bit 24 = AMX-TILE (std's detection of it is unstable)
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf7.edx & (1 << 24) == 0 {
            return None;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with an integer argument; no memory is passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        Some(rc == 0)
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        None
    }
}

/// This machine's CPU for benchmark reports: its model name, the vector units
/// it reports, and the kernel path that runs (chosen at run time).
pub fn describe() -> String {
    describe_for(crate::kernels_f32::Kernels::process_default())
}

/// As [`describe`], naming the kernel path `k`.
pub fn describe_for(k: crate::kernels_f32::Kernels) -> String {
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
    let avail: Vec<&str> = crate::kernels_f32::available_paths()
        .iter()
        .map(|p| p.name())
        .collect();
    let amx = match amx_granted() {
        None => String::new(),
        Some(g) => format!(
            "; AMX reported, tile data {} by the OS, no AMX kernel",
            if g { "granted" } else { "NOT granted" }
        ),
    };
    format!(
        "{} ({} cores; reports {}); kernels: {} (available: {}){amx}",
        field("model name"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        has.join(" "),
        k.path().name(),
        avail.join(", ")
    )
}
