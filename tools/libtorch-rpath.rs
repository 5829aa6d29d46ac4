//! The build script of every crate that links libtorch (one copy: each names it with `build = ...` in its
//! Cargo.toml). It puts libtorch's directory on the runpath of the crate's binaries and tests, so they run without
//! LD_LIBRARY_PATH, and links libtorch_cuda into binaries when libtorch has it: nothing references its symbols
//! directly, so without `--no-as-needed` the linker drops it and CUDA is never available at run time.
//! `DEP_TCH_LIBTORCH_LIB` reaches only crates that depend on `torch-sys` directly, hence that dependency in each.
fn main() {
    // Without these, any file of the package (a test included) reruns the script and rebuilds the crate and every
    // crate above it. What the script reads: libtorch's place (cargo reruns it when torch-sys's output changes) and
    // whether src/main.rs exists.
    println!("cargo:rerun-if-changed=Cargo.toml");
    println!("cargo:rerun-if-changed=src");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        // Cargo refuses `-bins` instructions from a package without binaries (model); ours live in src/main.rs.
        let has_bin = std::env::var("CARGO_MANIFEST_DIR")
            .is_ok_and(|d| std::path::Path::new(&d).join("src/main.rs").exists());
        if has_bin && std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
