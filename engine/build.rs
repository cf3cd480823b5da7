//! Compiles the CPU gate (src/cpu_check.c) for baseline x86-64: it refuses,
//! with a message, a CPU without the features the Rust code is built for.
fn main() {
    println!("cargo:rerun-if-changed=src/cpu_check.c");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if arch != "x86_64" {
        return;
    }
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let needs_v3 = features.split(',').any(|f| f == "avx2");
    let mut b = cc::Build::new();
    b.file("src/cpu_check.c")
        .flag("-march=x86-64")
        .flag("-mtune=generic");
    if needs_v3 {
        b.define("RETUNE_NEEDS_V3", None);
    }
    b.compile("retune_cpu_check");
}
