// Rebuild the eBPF object whenever bpf-linker changes (aya-template does the same).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
