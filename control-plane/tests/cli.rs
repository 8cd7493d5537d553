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
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--manifests"), "{err}");
    assert!(err.contains("/nonexistent/strait-manifests"), "{err}");
}

#[test]
fn values_that_can_only_misbehave_exit_2_with_one_line() {
    let dir = std::env::temp_dir().join(format!("strait-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let junk = junk.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["demo", "--rate", "0"], "--rate"),
        (
            &[
                "controller",
                "--manifests",
                ".",
                "--grpc-addr",
                "127.0.0.1:19999",
                "--admin-addr",
                "127.0.0.1:19999",
            ],
            "--grpc-addr and --admin-addr both claim 127.0.0.1:19999",
        ),
        (
            &[
                "controller",
                "--manifests",
                ".",
                "--issuer-cert",
                junk,
                "--issuer-key",
                junk,
            ],
            "expected a PEM private key",
        ),
        (
            &["controller", "--manifests", "/nonexistent/x"],
            "not a directory",
        ),
    ];
    for (args, says) in cases {
        let out = strait()
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(says) && !err.contains("backtrace"),
            "{args:?}: {err}"
        );
        if !args.contains(&"--rate") {
            assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
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

/// Values a script's unset variable gives: refused naming the flag, rather
/// than installed as a proxy image every meshed pod is refused for, or a
/// Lease holder every such replica shares.
#[test]
fn empty_images_and_pod_names_are_refused_naming_the_flag() {
    for (args, flag) in [
        (
            &["install", "--ignore-cluster", "--proxy-image", ""][..],
            "--proxy-image",
        ),
        (
            &[
                "install",
                "--ignore-cluster",
                "--controller-image",
                "two words",
            ][..],
            "--controller-image",
        ),
        (
            &["controller", "--manifests", ".", "--pod-name", ""][..],
            "--pod-name",
        ),
        (
            &["controller", "--manifests", ".", "--proxy-image", ""][..],
            "--proxy-image",
        ),
    ] {
        let out = strait().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}

#[test]
fn log_flags_are_checked_and_name_themselves() {
    for (flag, value) in [
        ("--log-level", "info,[bad"),
        ("--log-level", ""),
        ("--log-format", "yaml"),
    ] {
        let out = strait()
            .args([flag, value, "controller", "--manifests", "."])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{err}");
    }
}
