//! Compiles the c10d shim against the headers of the torch that tch links (PyPI's wheel, `LIBTORCH_USE_PYTORCH=1`)
//! and Debian's `libgloo-dev` headers, and links it to libtorch. See docs/design.md, "Build facts for the c10d shim".

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/c10d.cpp");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!(
            "torch-sys did not say where libtorch is (DEP_TCH_LIBTORCH_LIB): build with LIBTORCH_USE_PYTORCH=1"
        );
    };
    let root = PathBuf::from(&lib)
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let include = root.join("include");
    cc::Build::new()
        .cpp(true)
        .file("src/c10d.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .warnings(false)
        .compile("camelid_c10d");
    println!("cargo:rustc-link-search=native={lib}");
    for l in ["torch_cpu", "c10", "torch"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}
