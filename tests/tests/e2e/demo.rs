//! `strait demo --duration`: the README's first command, run as a user would.

use std::time::Duration;

#[tokio::test]
async fn the_demo_runs_a_mesh_and_exits_zero_with_a_summary() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(strait_tests::process::binary("strait"))
            .args(["demo", "--duration", "3s"])
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
    let summary = stdout.split("summary over").nth(1).expect("a summary");
    // Each hop's caller as the server-side proxy verified it over mTLS.
    for (dest, endpoints, caller) in [
        ("web.demo.svc.cluster.local:80", &["web-0"][..], "sa/load"),
        (
            "api.demo.svc.cluster.local:80",
            &["api-0", "api-1"][..],
            "sa/web",
        ),
    ] {
        let line = summary.lines().find(|l| l.starts_with(dest)).expect(dest);
        assert!(line.contains("100.00%"), "{line}");
        assert!(
            line.contains(&format!("spiffe://cluster.local/ns/demo/{caller}")),
            "{line}"
        );
        for e in endpoints {
            assert!(line.contains(e), "{e} served nothing: {line}");
        }
    }
}
