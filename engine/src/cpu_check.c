/* The release build targets x86-64-v3 (.cargo/config.toml): on a CPU without
 * those features the first AVX2 instruction would kill the process with
 * SIGILL. This constructor runs before any Rust code (compiled for baseline
 * x86-64, so it cannot fault itself) and exits 1 with a message instead.
 * RETUNE_NEEDS_V3 is defined by build.rs only when the build enables them. */
#include <string.h>
#include <unistd.h>

static void say(const char *s) {
    ssize_t r = write(2, s, strlen(s));
    (void)r;
}

#ifdef RETUNE_NEEDS_V3
static void retune_cpu_gate(int argc, char **argv, char **envp) {
    (void)envp;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v3"))
        return;
    say(argc > 0 && argv && argv[0] ? argv[0] : "retune");
    say(": this build needs an x86-64-v3 CPU (AVX2, FMA, F16C, BMI2); this CPU lacks");
    if (!__builtin_cpu_supports("avx")) say(" avx");
    if (!__builtin_cpu_supports("avx2")) say(" avx2");
    if (!__builtin_cpu_supports("fma")) say(" fma");
    if (!__builtin_cpu_supports("f16c")) say(" f16c");
    if (!__builtin_cpu_supports("bmi")) say(" bmi1");
    if (!__builtin_cpu_supports("bmi2")) say(" bmi2");
    if (!__builtin_cpu_supports("lzcnt")) say(" lzcnt");
    if (!__builtin_cpu_supports("movbe")) say(" movbe");
    say(". Rebuild for it with RUSTFLAGS=\"-C target-cpu=native\" cargo build --release, "
        "or run on a newer CPU.\n");
    _exit(1);
}

__attribute__((used, section(".init_array"))) static void (*retune_cpu_gate_ptr)(int, char **, char **) =
    retune_cpu_gate;
#endif

/* Referenced from Rust so the linker keeps this object (and its constructor). */
int retune_cpu_gate_linked(void) {
#ifdef RETUNE_NEEDS_V3
    return 1;
#else
    return 0;
#endif
}
