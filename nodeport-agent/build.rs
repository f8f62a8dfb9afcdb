//! Builds the eBPF object (nodeport-ebpf, nightly + bpf-linker) and leaves it in OUT_DIR,
//! where `datapath.rs` embeds it. `cargo xtask setup` installs what this needs.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nodeport-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    let out = std::env::var("OUT_DIR")?;
    // aya-build watches the eBPF package only; the shared types shape the object too.
    println!("cargo:rerun-if-changed=../nodeport-common/src");
    // AYA_BUILD_SKIP=1 (host-only checks) leaves an empty object: loading it fails clearly.
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v == "true");
    if skip {
        let obj = Path::new(&out).join("nodeport-ebpf");
        if !obj.exists() {
            std::fs::write(obj, [])?;
        }
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "nodeport-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
