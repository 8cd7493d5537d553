//! The benchmark harness keeps working: its quick modes run as tests.

use std::time::Duration;

async fn bench(args: &[&str]) -> String {
    let out_dir = std::env::temp_dir().join(format!(
        "strait-bench-out-{}-{}",
        std::process::id(),
        args[0]
    ));
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_bench"))
            .args(args)
            .arg("--quick")
            .arg(format!("--out={}", out_dir.display()))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("bench --quick finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&out_dir);
    stdout
}

#[tokio::test]
async fn controller_scale_quick_reports_every_measure() {
    let md = bench(&["controller-scale"]).await;
    for m in ["first full index", "peak RSS", "every watcher updated"] {
        assert!(md.contains(m), "{m} missing from\n{md}");
    }
}

#[tokio::test]
async fn controller_scale_quick_on_the_api_server_stand_in_reports_every_measure() {
    let md = bench(&["controller-scale", "--kubernetes"]).await;
    for m in [
        "API server stand-in",
        "first full index",
        "peak RSS",
        "every watcher updated",
    ] {
        assert!(md.contains(m), "{m} missing from\n{md}");
    }
}

#[tokio::test]
async fn proxy_quick_measures_every_scenario() {
    let missing: Vec<&str> = ["oha", "h2load", "haproxy", "nginx"]
        .into_iter()
        .filter(|t| {
            !std::process::Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install {missing:?} (.ci/run does)"
        );
        eprintln!(
            "skipping: {missing:?} not installed (apt-get install nghttp2-client haproxy nginx-light; cargo install oha --locked)"
        );
        return;
    }
    let md = bench(&["proxy", "--with-tracing"]).await;
    for s in [
        "| direct |",
        "| strait |",
        "| strait-mtls |",
        "| strait-mtls-traced |",
        "strait-mtls vs strait",
        "traced vs not",
        "| haproxy-mtls |",
        "| haproxy-h2-mtls |",
        "| nginx-mtls |",
        "| haproxy-tcp-mtls |",
        "p99 / best reference",
        "| h1 500/s | p50 added over direct",
        "| h1 500/s | peak RSS MiB, client proxy",
        "| tcp conn | strait-mtls |",
        "| strait-mtls | client proxy | 200 |",
    ] {
        assert!(md.contains(s), "{s} missing from\n{md}");
    }
    // Every scenario measured something: no pair sits at zero requests.
    // Every proxy's peak RSS under the load is its own, not a leftover of the
    // start: a few MiB, never zero.
    let main_table = |l: &&str| l.starts_with("| h1 500/s |") && l.matches('|').count() == 13;
    let mut rows = 0;
    for line in md.lines().filter(main_table) {
        rows += 1;
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let rps: f64 = cells[3].parse().unwrap();
        assert!(rps > 100.0, "{line}");
        if cells[2] != "direct" {
            for peak in cells[10].split(" / ") {
                let mib: f64 = peak.parse().unwrap_or_else(|_| panic!("{line}"));
                assert!(mib > 1.0 && mib < 200.0, "{line}");
            }
        }
    }
    assert!(rows >= 7, "a main-table row per scenario:\n{md}");
    // No pair failed a request under any load: a reference that fails them all
    // would otherwise pass for a fast one.
    let mut counted = 0;
    for line in md
        .lines()
        .filter(|l| l.starts_with("| ") && l.matches('|').count() == 13)
    {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let Ok(errors) = cells[8].parse::<u64>() {
            assert_eq!(errors, 0, "{line}");
            counted += 1;
        }
    }
    // A column moved would leave nothing checked.
    assert!(counted >= rows, "errors read from {counted} rows:\n{md}");
    // Nor was any round left out of the tables for failing requests.
    assert!(!md.contains("Left out:"), "{md}");
    // Opaque TCP through each pair: connections made and bytes echoed, none failed.
    for line in md
        .lines()
        .filter(|l| l.starts_with("| tcp ") && l.matches('|').count() == 13)
    {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (rate, errors): (f64, u64) = (cells[3].parse().unwrap(), cells[8].parse().unwrap());
        assert!(rate > 1.0 && errors == 0, "{line}");
    }
}
