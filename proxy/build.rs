//! Link settings for the sidecar binary.
//!
//! Relative relocations are packed (`DT_RELR`). The proxy is a position-
//! independent executable with about 20,000 of them (vtables, string tables),
//! 480 KiB as plain `RELA` entries that the loader reads in full at start, so
//! they stay resident in every proxy of every pod. Packed, they take a few KiB.
//! glibc 2.36 runs such binaries (the image's Debian 12 has it); lld and GNU ld
//! 2.38 write them. Enabled only when a probe program, built by this rustc
//! with this build's flags and linker and the flag added, runs here: a glibc
//! without support refuses to load it, and the binary is then built as before.
//! `cfg(relr_packed)` tells the tests which it was.

use std::path::Path;
use std::process::Command;

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=RUSTC_LINKER");
    println!("cargo::rustc-check-cfg=cfg(relr_packed)");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let native = var("TARGET") == var("HOST");
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" || !native {
        return;
    }
    let out = std::path::PathBuf::from(var("OUT_DIR"));
    match probe(&out) {
        Ok(()) => {
            println!("cargo::rustc-link-arg-bins={FLAG}");
            println!("cargo::rustc-cfg=relr_packed");
        }
        Err(why) => println!(
            "cargo::warning=relative relocations not packed ({why}): the binary works, with about 0.5 MiB more resident"
        ),
    }
}

/// Builds a program as the binary will be built (rustc, flags, linker), with
/// the flag, and runs it: the linker takes the flag and this glibc loads what
/// it writes.
fn probe(out: &Path) -> Result<(), String> {
    let src = out.join("relr_probe.rs");
    let exe = out.join("relr_probe");
    // A `dyn` call, so the program has relative relocations to pack.
    let program = "fn main() { let f: &dyn Fn() -> i32 = &|| 7; std::process::exit(f() - 7) }\n";
    std::fs::write(&src, program).map_err(|e| e.to_string())?;
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut cmd = Command::new(&rustc);
    cmd.args(["--edition=2021", "--crate-type=bin", "-o"])
        .arg(&exe)
        .arg(&src)
        .arg(format!("-Clink-arg={FLAG}"));
    if let Ok(flags) = std::env::var("CARGO_ENCODED_RUSTFLAGS") {
        cmd.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    }
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        cmd.arg(format!("-Clinker={linker}"));
    }
    let built = cmd.output().map_err(|e| format!("{rustc}: {e}"))?;
    if !built.status.success() {
        let err = String::from_utf8_lossy(&built.stderr);
        return Err(format!(
            "{rustc}: {}",
            err.lines().next().unwrap_or("failed")
        ));
    }
    let ran = Command::new(&exe).status().map_err(|e| e.to_string())?;
    if !ran.success() {
        return Err("the probe was built but did not run".into());
    }
    Ok(())
}
