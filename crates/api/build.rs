//! The web UI is embedded from `ui/dist` (built by scripts/setup.sh with npm). A
//! checkout where it was never built still compiles: the folder is made empty, and the
//! server says how to build the UI.

fn main() {
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ui/dist");
    if !dist.exists() {
        std::fs::create_dir_all(&dist).expect("create ui/dist");
    }
    println!("cargo:rerun-if-changed=../../ui/dist");
}
