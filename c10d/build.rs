//! Compiles the c10d shim against the headers of the torch that tch links (PyPI's wheel, `LIBTORCH_USE_PYTORCH=1`)
//! and Debian's `libgloo-dev` headers, and links it to libtorch. With the `nccl` feature it also compiles c10d's
//! ProcessGroupNCCL (CUDA and NCCL headers from PyPI) and links libtorch's CUDA libraries. See docs/design.md, "Build facts for the c10d shim".

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
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("src/c10d.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .warnings(false);
    let nccl = std::env::var_os("CARGO_FEATURE_NCCL").is_some();
    if nccl {
        // CUDA and NCCL headers from the PyPI packages beside torch (nvidia-cuda-runtime, -crt, -cccl and
        // nvidia-nccl-cu13), or where CAMELID_CUDA_INCLUDE / CAMELID_NCCL_INCLUDE say.
        println!("cargo:rerun-if-env-changed=CAMELID_CUDA_INCLUDE");
        println!("cargo:rerun-if-env-changed=CAMELID_NCCL_INCLUDE");
        let site = root.parent().map(PathBuf::from).unwrap_or_default();
        let cuda = std::env::var_os("CAMELID_CUDA_INCLUDE")
            .map_or_else(|| site.join("nvidia/cu13/include"), PathBuf::from);
        let nccl_include = std::env::var_os("CAMELID_NCCL_INCLUDE")
            .map_or_else(|| site.join("nvidia/nccl/include"), PathBuf::from);
        for (what, header, hint) in [
            (&cuda, "cuda_runtime_api.h", "nvidia-cuda-runtime"),
            (&cuda, "crt/host_config.h", "nvidia-cuda-crt==13.0.*"),
            (&cuda, "cccl/nv/target", "nvidia-cuda-cccl==13.0.*"),
            (&nccl_include, "nccl.h", "nvidia-nccl-cu13"),
        ] {
            if !what.join(header).exists() {
                panic!(
                    "the `nccl` feature needs {} (pip install {hint} into the .venv, or set \
                     CAMELID_CUDA_INCLUDE / CAMELID_NCCL_INCLUDE)",
                    what.join(header).display()
                );
            }
        }
        build
            .include(&cuda)
            .include(cuda.join("cccl"))
            .include(&nccl_include)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None);
    }
    build.compile("camelid_c10d");
    println!("cargo:rustc-link-search=native={lib}");
    let mut libs = vec!["torch_cpu", "c10", "torch"];
    if nccl {
        libs.extend(["torch_cuda", "c10_cuda"]);
    }
    for l in libs {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}
