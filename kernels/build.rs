//! With the `cuda` feature, compiles `src/cuda/*.cu` to PTX with the toolkit's nvcc
//! (`CUDA_ROOT`/`CUDA_HOME`, or nvcc on PATH) for `CUDA_COMPUTE_CAP` (default 90).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cuda");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("CUDA_ROOT")
        .or_else(|| std::env::var_os("CUDA_HOME"))
        .map(|r| PathBuf::from(r).join("bin/nvcc"))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    const SOURCES: &[&str] = &["paged", "lora"];
    for name in SOURCES {
        let src = format!("src/cuda/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch=sm_{cap}"), &src, "-o"])
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (run scripts/cuda-toolchain and set CUDA_ROOT)",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {src}");
    }
}
