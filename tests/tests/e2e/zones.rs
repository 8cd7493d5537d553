//! Topology-aware routing on namespace pods: a Service that asks for it keeps
//! each client's requests in the client's zone, found from the address its
//! proxy watches from, as kube-proxy would keep an unmeshed client's.

use std::net::SocketAddr;
use std::time::Duration;

use strait_tests::backend::Backend;
use strait_tests::pods::{MeshedPod, NS, PodMesh};
use strait_tests::{client, wait};

const APP_PORT: u16 = 8080;
const WEB: &str = "10.96.0.200";

/// `n` requests from `client`'s app to `web`: how many were answered 200.
async fn send(client: &MeshedPod, web: SocketAddr, n: usize) -> usize {
    client
        .pod
        .run(move || async move {
            let c = client::http1();
            let mut ok = 0;
            for _ in 0..n {
                let got = client::get(&c, &format!("http://{web}/")).await;
                ok += usize::from(got.is_ok_and(|(s, _)| s == 200));
            }
            ok
        })
        .join()
        .await
}

/// The endpoints `client`'s proxy shows in `/config` for `dest` (to a caller
/// in its pod: what it knows is not shown to others), or why none can be read.
async fn endpoints_sent(client: &MeshedPod, dest: SocketAddr) -> Result<Vec<String>, String> {
    let admin = SocketAddr::from(([127, 0, 0, 1], client.admin().port()));
    let got = client
        .pod
        .run(move || async move { wait::admin_get(admin, "/config").await })
        .join()
        .await;
    let body = match got {
        Ok((200, body)) => body,
        other => return Err(format!("/config of {}: {other:?}", client.pod.name)),
    };
    let config: serde_json::Value = serde_json::from_str(&body).expect("/config is JSON");
    let known = config["state"]["destinations"]
        .as_array()
        .into_iter()
        .flatten();
    let Some(d) = known
        .clone()
        .find(|d| d["destination"].as_str() == Some(dest.to_string().as_str()))
    else {
        let names: Vec<_> = known.map(|d| &d["destination"]).collect();
        return Err(format!("no {dest} among {names:?}"));
    };
    Ok(d["answer"]["backends"][0]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["address"].as_str().map(String::from))
        .collect())
}

#[tokio::test]
async fn a_topology_aware_service_keeps_each_clients_requests_in_its_zone() {
    let Some(mut mesh) = PodMesh::start().await else {
        return;
    };
    let (a, b) = (
        mesh.pod("web-a", "web", &[]).await,
        mesh.pod("web-b", "web", &[]).await,
    );
    let (in_a, in_b, late) = (
        mesh.pod("client-a", "client", &[]).await,
        mesh.pod("client-b", "client", &[]).await,
        mesh.pod("client-late", "client", &[]).await,
    );
    let (mut apps, mut running) = (Vec::new(), Vec::new());
    for p in [&a, &b] {
        let (tx, rx) = tokio::sync::oneshot::channel();
        running.push(p.pod.run(move || async move {
            let b = Backend::start_on(SocketAddr::from(([0, 0, 0, 0], APP_PORT))).await;
            let _ = tx.send(b.stats.clone());
            std::future::pending::<()>().await;
            drop(b);
        }));
        apps.push(rx.await.expect("the app started"));
    }
    mesh.place(&a, "node-a", "zone-a");
    mesh.place(&in_a, "node-a", "zone-a");
    mesh.place(&b, "node-b", "zone-b");
    mesh.place(&in_b, "node-b", "zone-b");
    // As Kubernetes' EndpointSlice controller hints a Service with
    // `topology-mode: Auto`.
    mesh.dir.write(
        "svc-web.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {NS}, annotations: {{service.kubernetes.io/topology-mode: Auto}}}}\nspec:\n  clusterIP: {WEB}\n  ports: [{{name: main, port: 80, targetPort: {APP_PORT}}}]\n"
        ),
    );
    let endpoint = |p: &MeshedPod, zone: &str| {
        format!(
            "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n    targetRef: {{kind: Pod, name: {}}}\n    zone: {zone}\n    hints: {{forZones: [{{name: {zone}}}]}}\n",
            p.pod.ip, p.pod.name
        )
    };
    mesh.dir.write(
        "slice-web.yaml",
        &format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web\n  namespace: {NS}\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: main, port: {APP_PORT}}}]\nendpoints:\n{}{}",
            endpoint(&a, "zone-a"),
            endpoint(&b, "zone-b")
        ),
    );
    let web = SocketAddr::from((WEB.parse::<std::net::Ipv4Addr>().unwrap(), 80));
    mesh.wait_reachable(&in_a, web).await;
    mesh.wait_reachable(&in_b, web).await;

    // Each client's requests reach its own zone's pod only.
    let (to_a, to_b) = (&apps[0], &apps[1]);
    for (client, mine, other) in [(&in_a, to_a, to_b), (&in_b, to_b, to_a)] {
        let (before_mine, before_other) = (mine.requests(), other.requests());
        assert_eq!(
            send(client, web, 40).await,
            40,
            "{} answered",
            client.pod.name
        );
        assert_eq!(
            (
                mine.requests() - before_mine,
                other.requests() - before_other
            ),
            (40, 0),
            "{}'s requests (its zone, the other)",
            client.pod.name
        );
    }

    // A client whose pod is scheduled, as far as the controller knows, only
    // after its proxy asked for web: sent every endpoint, then its zone's
    // once its node is read.
    mesh.wait_reachable(&late, web).await;
    let (ep_a, ep_b) = (
        format!("{}:{APP_PORT}", a.pod.ip),
        format!("{}:{APP_PORT}", b.pod.ip),
    );
    let sent = endpoints_sent(&late, web)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(sent.contains(&ep_a) && sent.contains(&ep_b), "{sent:?}");
    mesh.place(&late, "node-a", "zone-a");
    wait::until(
        "client-late sent zone-a's endpoints only",
        Duration::from_secs(10),
        || async {
            endpoints_sent(&late, web)
                .await
                .is_ok_and(|e| e == [ep_a.clone()])
        },
    )
    .await;
    let before_b = to_b.requests();
    assert_eq!(send(&late, web, 20).await, 20);
    assert_eq!(
        to_b.requests(),
        before_b,
        "client-late's requests left zone-a"
    );

    // Its zone's pod ends: the client is not left without one, it crosses.
    mesh.dir.write(
        "slice-web.yaml",
        &format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web\n  namespace: {NS}\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: main, port: {APP_PORT}}}]\nendpoints:\n{}",
            endpoint(&b, "zone-b")
        ),
    );
    wait::until(
        "client-a's requests reaching zone-b",
        Duration::from_secs(10),
        || async {
            let before_b = to_b.requests();
            send(&in_a, web, 10).await == 10 && to_b.requests() - before_b == 10
        },
    )
    .await;
    let (settled, settled_b) = (to_a.requests(), to_b.requests());
    assert_eq!(send(&in_a, web, 20).await, 20);
    assert_eq!(to_a.requests(), settled, "web-a was taken out");
    assert_eq!(
        to_b.requests() - settled_b,
        20,
        "every request went to web-b"
    );
}
