//! Builds ztai-ebpf with aya-build (as aya-template does) after making sure
//! the toolchain it needs is installed, so a plain `cargo build` works on a
//! fresh machine.
use anyhow::{Context as _, anyhow};

#[path = "../xtask/src/toolchain.rs"]
#[allow(dead_code)]
mod toolchain;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../ztai-common/src");
    println!("cargo:rerun-if-changed=../xtask/src/toolchain.rs");
    println!("cargo:rerun-if-env-changed=ZTAI_TOOLS_DIR");

    let mut log = |m: &str| println!("cargo:warning=ztai toolchain: {m}");
    let linker_dir = toolchain::ensure_ebpf_toolchain(&mut log)
        .map_err(|e| anyhow!("eBPF toolchain missing: {e}\n(run `cargo xtask setup` to see each step)"))?;
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("PATH", toolchain::path_with(&linker_dir)) };

    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "ztai-ebpf")
        .ok_or_else(|| anyhow!("ztai-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("ztai-ebpf manifest has no parent folder"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
