//! Link settings for the sidecar binary.
//!
//! Relative relocations are packed (`DT_RELR`). The proxy is a position-
//! independent executable with about 20,000 of them (vtables, string tables),
//! 480 KiB as plain `RELA` entries that the loader reads in full at start, so
//! they stay resident in every proxy of every pod. Packed, they take a few KiB.
//! glibc 2.36 runs such binaries (the image's Debian 12 has it); GNU ld 2.38
//! and lld 15 write them (older linkers ignore the flag). Enabled only when a
//! probe program linked the same way runs here, so an older glibc builds the
//! binary as before.

use std::path::Path;
use std::process::Command;

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let native = var("TARGET") == var("HOST");
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" || !native {
        return;
    }
    let out = std::path::PathBuf::from(var("OUT_DIR"));
    match probe(&out) {
        Ok(()) => println!("cargo:rustc-link-arg-bins={FLAG}"),
        Err(why) => println!(
            "cargo:warning=relative relocations not packed ({why}): the binary works, with about 0.5 MiB more resident"
        ),
    }
}

/// Links and runs a program with one relative relocation, packed: the linker
/// takes the flag and this glibc loads what it writes.
fn probe(out: &Path) -> Result<(), String> {
    let src = out.join("relr_probe.c");
    let exe = out.join("relr_probe");
    std::fs::write(
        &src,
        "static int x = 7; int *p = &x; int main(void) { return *p == 7 ? 0 : 1; }\n",
    )
    .map_err(|e| e.to_string())?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let linked = Command::new(&cc)
        .args(["-fPIE", "-pie", FLAG, "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .map_err(|e| format!("{cc}: {e}"))?;
    if !linked.status.success() {
        let err = String::from_utf8_lossy(&linked.stderr);
        return Err(format!("{cc}: {}", err.lines().next().unwrap_or("failed")));
    }
    let ran = Command::new(&exe).status().map_err(|e| e.to_string())?;
    if !ran.success() {
        return Err("the probe linked but did not run".into());
    }
    Ok(())
}
