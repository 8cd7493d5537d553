//! `strait demo --duration`: the README's first command, run as a user would.

use std::time::Duration;

use strait_tests::otlp::{Mode, OtlpCollector};

/// A copy of the shipped demo manifests, for one demo to run on: its canary
/// shift rewrites routes.yaml, and a demo killed mid-run (a test's timeout)
/// must not leave the checkout's copy shifted for the next.
fn demo_manifests() -> strait_tests::manifests::ManifestDir {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let copy = strait_tests::manifests::ManifestDir::new();
    for f in std::fs::read_dir(root.join("deploy/examples/demo")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.path().join(f.file_name())).unwrap();
    }
    copy
}

/// The number that follows `label` on the summary line starting with it.
fn number_after(summary: &str, label: &str) -> f64 {
    let line = summary
        .lines()
        .find(|l| l.contains(label))
        .unwrap_or_else(|| panic!("no {label:?} line in the summary:\n{summary}"));
    let rest = &line[line.find(label).expect("found above") + label.len()..];
    rest.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?}: {line}"))
}

#[tokio::test]
async fn the_demo_runs_a_mesh_shows_traffic_policy_and_restores_its_routes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifests = demo_manifests();
    let routes = manifests.path().join("routes.yaml");
    let routes_before = std::fs::read(&routes).expect("the demo's routes.yaml");
    let collector = OtlpCollector::start(Mode::Accept).await;
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(strait_tests::process::binary("strait"))
            .args(["demo", "--duration", "6s"])
            .arg(format!("--manifests={}", manifests.path().display()))
            .arg(format!("--otlp-endpoint={}", collector.endpoint()))
            .current_dir(&root)
            .env("STRAIT_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("demo finishes by itself")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Stopped in order, proxies before the controller: none reports a cut
    // control stream, at the end of a newcomer's first run.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("stream failed"), "{stderr}");
    // The canary shift rewrote routes.yaml mid-run; the demo put it back.
    assert!(stdout.contains("canary shift: rewrote"), "{stdout}");
    assert_eq!(
        std::fs::read(&routes).expect("routes.yaml after the demo"),
        routes_before,
        "routes.yaml changed"
    );
    let summary = stdout.split("summary over").nth(1).expect("a summary");
    // Each hop's caller as the server-side proxy verified it over mTLS. About 1 in
    // 20 requests goes to /slow and is cut by the route timeout: those fail.
    for (dest, endpoints, caller) in [
        ("web.demo.svc.cluster.local:80", &["web-0"][..], "sa/load"),
        (
            "api.demo.svc.cluster.local:80",
            &["api-0", "api-1", "api-2", "api-v2-0"][..],
            "sa/web",
        ),
    ] {
        let line = summary.lines().find(|l| l.starts_with(dest)).expect(dest);
        let success: f64 = line
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.trim_end_matches('%').parse().ok())
            .unwrap_or_else(|| panic!("no success rate: {line}"));
        assert!((85.0..100.0).contains(&success), "success rate: {line}");
        assert!(
            line.contains(&format!("spiffe://cluster.local/ns/demo/{caller}")),
            "{line}"
        );
        for e in endpoints {
            assert!(
                line.contains(&format!("{e} (")),
                "{e} served nothing: {line}"
            );
        }
    }
    assert!(number_after(summary, "canary api-v2: ") > 0.0, "{summary}");
    assert!(number_after(summary, "retries: ") > 0.0, "{summary}");
    assert!(number_after(summary, "timeouts: ") > 0.0, "{summary}");
    assert!(
        number_after(summary, "ejections so far: ") > 0.0,
        "{summary}"
    );

    // The live table names a recent slow request's trace, and its spans are in
    // the collector: the proxies of load, web and api, joined in one trace.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("slowest request of the last second:"))
        .unwrap_or_else(|| panic!("no slow-request line:\n{stdout}"));
    let trace = line
        .split("trace ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .expect("a trace id");
    let spans = collector.trace(trace, 4).await;
    let services: std::collections::BTreeSet<&str> =
        spans.iter().map(|s| s.service.as_str()).collect();
    // api's hop is the stable version's or the canary's, named for its pod's
    // app label.
    assert!(
        ["load", "web"].iter().all(|s| services.contains(s))
            && (services.contains("api") || services.contains("api-v2")),
        "trace {trace} has spans of {services:?}"
    );
}

/// A closed terminal (SIGHUP) after the canary shift ends the demo through
/// its cleanup, as Ctrl-C does: the summary, routes.yaml as shipped, the
/// directory with the issuer's key removed.
#[tokio::test]
async fn a_demo_hung_up_on_cleans_up_after_itself() {
    let manifests = demo_manifests();
    let routes = manifests.path().join("routes.yaml");
    let routes_before = std::fs::read(&routes).expect("the demo's routes.yaml");
    let tmp = strait_tests::manifests::ManifestDir::new();
    let (mut demo, lines) = a_shifted_demo("16s", tmp.path(), manifests.path()).await;
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "its work directory"
    );
    let pid = rustix::process::Pid::from_raw(demo.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    let (status, rest, stderr) = the_end_of(&mut demo, lines).await;
    assert!(status.success(), "{status}\n{rest}\n{stderr}");
    assert!(rest.contains("summary over"), "{rest}");
    nothing_left_behind(&routes, &routes_before, tmp.path());
}

/// A reader that goes away (`strait demo | head -20`) ends the demo through
/// its cleanup, as a signal does, not with a panic that leaves its
/// processes and routes.yaml behind.
#[tokio::test]
async fn a_demo_whose_reader_went_away_cleans_up_after_itself() {
    use tokio::io::AsyncReadExt as _;
    let manifests = demo_manifests();
    let routes = manifests.path().join("routes.yaml");
    let routes_before = std::fs::read(&routes).expect("the demo's routes.yaml");
    let tmp = strait_tests::manifests::ManifestDir::new();
    // Shifted half way, at 12 s: ended by its reader, long before 24 s.
    let (mut demo, lines) = a_shifted_demo("24s", tmp.path(), manifests.path()).await;
    drop(lines);
    let mut stderr = String::new();
    let mut err = demo.stderr.take().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        err.read_to_string(&mut stderr).await.unwrap();
        demo.wait().await.unwrap()
    })
    .await
    .expect("the demo ends once nobody reads it");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.success(), "{status}\n{stderr}");
    nothing_left_behind(&routes, &routes_before, tmp.path());
}

/// routes.yaml as it was before the demo, and its work directory gone.
fn nothing_left_behind(routes: &std::path::Path, before: &[u8], tmp: &std::path::Path) {
    assert_eq!(
        std::fs::read(routes).unwrap(),
        before,
        "routes.yaml left shifted"
    );
    let left: Vec<_> = std::fs::read_dir(tmp).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Starts `strait demo` with its output piped and its work directory under
/// `tmp`, in a process group of its own as a shell starts a foreground job,
/// and waits for the canary shift: the lines seen so far, and the rest.
async fn a_shifted_demo(
    duration: &str,
    tmp: &std::path::Path,
    manifests: &std::path::Path,
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    use tokio::io::AsyncBufReadExt as _;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut demo = tokio::process::Command::new(strait_tests::process::binary("strait"))
        .args(["demo", "--duration", duration])
        .arg(format!("--manifests={}", manifests.display()))
        .current_dir(&root)
        .env("STRAIT_LOG", "warn")
        .env("TMPDIR", tmp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let shifted = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            seen.push_str(&l);
            seen.push('\n');
            if l.contains("canary shift: rewrote") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(matches!(shifted, Ok(true)), "no canary shift:\n{seen}");
    (demo, lines)
}

/// The demo's output to its end, and how it ended.
async fn the_end_of(
    demo: &mut tokio::process::Child,
    mut lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> (std::process::ExitStatus, String, String) {
    use tokio::io::AsyncReadExt as _;
    let mut stderr = demo.stderr.take().unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        // Both read at once: a full pipe would hold the demo up.
        let out = async {
            let mut rest = String::new();
            while let Some(l) = lines.next_line().await.unwrap() {
                rest.push_str(&l);
                rest.push('\n');
            }
            rest
        };
        let err = async {
            let mut err = String::new();
            stderr.read_to_string(&mut err).await.unwrap();
            err
        };
        let (rest, err) = tokio::join!(out, err);
        (demo.wait().await.unwrap(), rest, err)
    })
    .await
    .expect("the demo ends on a signal")
}

/// Ctrl-C at a terminal signals the whole foreground process group, not the
/// demo alone: the demo still stops its processes in order, so the summary
/// has web-0's proxy counters and no proxy reports its control stream cut.
#[tokio::test]
async fn ctrl_c_at_the_terminal_ends_the_demo_in_order() {
    let manifests = demo_manifests();
    let tmp = strait_tests::manifests::ManifestDir::new();
    let (mut demo, lines) = a_shifted_demo("16s", tmp.path(), manifests.path()).await;
    let group = rustix::process::Pid::from_raw(demo.id().unwrap() as i32).unwrap();
    rustix::process::kill_process_group(group, rustix::process::Signal::INT).unwrap();
    let (status, rest, stderr) = the_end_of(&mut demo, lines).await;
    assert!(status.success(), "{status}\n{rest}\n{stderr}");
    let summary = rest.split("summary over").nth(1).expect("a summary");
    assert!(number_after(summary, "retries: ") > 0.0, "{summary}");
    assert!(!stderr.contains("stream failed"), "{stderr}");
}

/// A second signal ends the demo without waiting for its cleanup, and still
/// leaves nothing behind: no process, routes.yaml as shipped, no directory
/// with the issuer's key.
#[tokio::test]
async fn a_demo_signalled_twice_leaves_nothing_behind() {
    let manifests = demo_manifests();
    let routes = manifests.path().join("routes.yaml");
    let routes_before = std::fs::read(&routes).expect("the demo's routes.yaml");
    let tmp = strait_tests::manifests::ManifestDir::new();
    let (mut demo, lines) = a_shifted_demo("16s", tmp.path(), manifests.path()).await;
    let pid = rustix::process::Pid::from_raw(demo.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let (status, rest, stderr) = the_end_of(&mut demo, lines).await;
    // Mostly the second signal ends it (128 + the signal the demo saw
    // second); the cleanup the first started may finish before.
    assert!(
        matches!(status.code(), Some(129 | 130))
            || status.success() && rest.contains("summary over"),
        "{status}\n{rest}\n{stderr}"
    );
    nothing_left_behind(&routes, &routes_before, tmp.path());
    // Its processes were gone before it was: their addresses are free.
    for addr in ["127.0.0.1:19990", "127.0.1.1:4191", "127.0.1.1:18080"] {
        std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    }
}

/// A collector the exporter cannot reach is refused before anything starts,
/// with the reason, rather than as a child process's failure.
#[test]
fn an_unusable_collector_is_refused_up_front() {
    for (url, why) in [
        (
            "https://localhost:4317",
            "TLS to the collector is not supported",
        ),
        ("http://localhost", "expected http://HOST:PORT"),
    ] {
        let out = std::process::Command::new(strait_tests::process::binary("strait"))
            .args(["demo", "--duration", "1s"])
            .arg(format!("--otlp-endpoint={url}"))
            .output()
            .expect("run strait demo");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains(why), "{url}: {stderr}");
    }
}
