//! Puts libtorch's directory on the runpath of this crate's binary and tests, so they run without
//! LD_LIBRARY_PATH, and links libtorch_cuda into the binary when libtorch has it: nothing references its symbols
//! directly, so without `--no-as-needed` the linker drops it and CUDA is never available at run time.
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
