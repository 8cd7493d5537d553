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
    let cases: [(&[&str], &str); 6] = [
        (&["demo", "--rate", "0"], "--rate"),
        (
            &["controller", "--manifests", ".", "--cert-lifetime", "2s"],
            "a certificate must live at least 3s",
        ),
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
        (
            &[
                "controller",
                "--manifests",
                ".",
                "--proxy-memory-request",
                "2Gi",
                "--proxy-memory-limit",
                "1Gi",
            ],
            "--proxy-memory-request 2Gi is above the proxy's memory limit 1Gi",
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
        // (clap's own refusals add a line pointing at --help.)
        if !args.contains(&"--rate") && !args.contains(&"--cert-lifetime") {
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

/// A runtime that leaves the soft open-file limit at 1,024 would stop the
/// controller accepting proxies (and the webhook its calls, the kubelet its
/// probes) at a few hundred meshed pods: it raises it to the hard one.
#[test]
fn the_controller_raises_its_open_file_limit() {
    let dir = std::env::temp_dir().join(format!("strait-nofile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {} controller --manifests {} --grpc-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0",
            env!("CARGO_BIN_EXE_strait"),
            dir.display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (limits, exe) = (
        format!("/proc/{}/limits", child.id()),
        format!("/proc/{}/exe", child.id()),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let raised = loop {
        // The shell first, with the runner's limits: only the controller's count.
        let started =
            std::fs::read_link(&exe).is_ok_and(|e| e.file_name() == Some("strait".as_ref()));
        let line = std::fs::read_to_string(&limits).ok().and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(String::from)
        });
        let f: Vec<String> = line
            .iter()
            .flat_map(|l| l.split_whitespace().map(String::from))
            .collect();
        if started && f.len() > 4 && f[3] == f[4] {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::yield_now();
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(raised, "the soft limit stayed below the hard one");
}
