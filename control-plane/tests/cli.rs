//! The built `strait` binary's command line: bad input exits non-zero and
//! names what was wrong. (Running it against real proxies is the job of the
//! end-to-end suite in `tests/`, which also relies on this target existing so
//! that `cargo nextest run --workspace` builds the binary.)

use std::process::Command;

fn strait() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strait"));
    cmd.env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    cmd
}

#[test]
fn a_missing_manifests_dir_exits_non_zero_naming_the_flag() {
    let out = strait()
        .args(["controller", "--manifests", "/nonexistent/strait-manifests"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--manifests"), "{err}");
    assert!(err.contains("/nonexistent/strait-manifests"), "{err}");
}

#[test]
fn a_bad_address_exits_non_zero_naming_the_flag() {
    let out = strait()
        .args(["controller", "--manifests", ".", "--admin-addr", "bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--admin-addr"), "{err}");

    let out = strait()
        .args(["controller", "--manifests", "."])
        .env("STRAIT_GRPC_ADDR", "nowhere")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--grpc-addr"), "{err}");
}

#[test]
fn help_lists_the_subcommands() {
    let out = strait().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["controller", "demo"] {
        assert!(help.contains(sub), "{sub} missing from:\n{help}");
    }
    assert!(
        !help.contains("demo-app"),
        "internal subcommand shown:\n{help}"
    );
}

#[test]
fn every_manifests_dir_must_exist() {
    let out = strait()
        .args(["controller", "--manifests", "."])
        .args(["--manifests", "/nonexistent/second-dir"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/second-dir"), "{err}");
}

#[test]
fn issuer_flags_come_together_and_unreadable_files_are_named() {
    let out = strait()
        .args(["controller", "--manifests", ".", "--issuer-cert", "ca.crt"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--issuer-key"), "{err}");

    let out = strait()
        .args(["controller", "--manifests", "."])
        .args(["--issuer-cert", "/nonexistent/issuer.crt"])
        .args(["--issuer-key", "/nonexistent/issuer.key"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--issuer-cert") && err.contains("/nonexistent/issuer.crt"),
        "{err}"
    );
}

#[test]
fn log_flags_are_checked_and_name_themselves() {
    for (flag, value) in [("--log-level", "info,[bad"), ("--log-format", "yaml")] {
        let out = strait()
            .args([flag, value, "controller", "--manifests", "."])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{err}");
    }
}
