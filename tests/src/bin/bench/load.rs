//! Load generators: oha (open loop, corrected for coordinated omission) at a
//! fixed rate, h2load as fast as it can, and in-process loops for a new
//! connection per request, opaque TCP and idle connections.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::proxy::{CONNS, Load, Proto};
use crate::stats::percentile;

/// What one load against one target gave.
pub struct Measured {
    /// Requests (or connections, or MB) per second.
    pub rps: f64,
    /// p50, p90, p99 and p99.9 in ms.
    pub pct: [f64; 4],
    pub requests: u64,
    pub errors: u64,
}

impl Measured {
    /// What `loops` gave: successes' latencies, failures, seconds taken.
    fn of_loops(sorted_ms: &[f64], errors: u64, wall: f64) -> Measured {
        Measured::from_sorted(
            sorted_ms.len() as f64 / wall,
            sorted_ms,
            sorted_ms.len() as u64,
            errors,
        )
    }

    fn from_sorted(rps: f64, sorted_ms: &[f64], requests: u64, errors: u64) -> Measured {
        Measured {
            rps,
            pct: [0.5, 0.9, 0.99, 0.999].map(|p| percentile(sorted_ms, p)),
            requests,
            errors,
        }
    }
}

/// `CONNS` keep-alive connections at a fixed total rate, open loop: each request's
/// latency counts from when it was due, not from when a busy connection got to
/// send it (`--latency-correction`), so a stall shows in the percentiles.
pub async fn oha(addr: SocketAddr, load: &Load, rate: u32) -> anyhow::Result<Measured> {
    let mut args = vec![
        "--no-tui".to_string(),
        "--output-format".into(),
        "json".into(),
        "--latency-correction".into(),
        "-z".into(),
        format!("{}s", load.seconds),
        "-c".into(),
        CONNS.to_string(),
        "-q".into(),
        rate.to_string(),
    ];
    if load.proto == Proto::H2 {
        args.push("--http2".into());
    }
    args.push(format!("http://{addr}/1k"));
    let out = Command::new("oha")
        .args(&args)
        .output()
        .await
        .map_err(|e| {
            anyhow::anyhow!("oha: {e} (cargo install oha --locked, or see docs/benchmarks.md)")
        })?;
    anyhow::ensure!(
        out.status.success(),
        "oha failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_oha(&out.stdout)
}

fn parse_oha(json: &[u8]) -> anyhow::Result<Measured> {
    let v: serde_json::Value = serde_json::from_slice(json)?;
    let num = |p: &str| v.pointer(p).and_then(|x| x.as_f64());
    let ms = |k: &str| num(&format!("/latencyPercentiles/{k}")).unwrap_or(f64::NAN) * 1000.0;
    let statuses = v
        .get("statusCodeDistribution")
        .and_then(|m| m.as_object())
        .cloned()
        .unwrap_or_default();
    let (mut ok, mut bad) = (0u64, 0u64);
    for (code, n) in statuses {
        let n = n.as_u64().unwrap_or(0);
        if code.starts_with('2') {
            ok += n;
        } else {
            bad += n;
        }
    }
    let errors: u64 = v
        .get("errorDistribution")
        .and_then(|m| m.as_object())
        // Requests still in flight when the run's time is up are not failures.
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.contains("deadline"))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
        .unwrap_or(0);
    // Successes per second: oha's own rate counts every answer (a pair
    // answering 502 at once would look fast and cheap) and the requests the
    // end of the run cut short.
    let secs = num("/summary/total").unwrap_or(0.0);
    Ok(Measured {
        rps: if secs > 0.0 { ok as f64 / secs } else { 0.0 },
        pct: [ms("p50"), ms("p90"), ms("p99"), ms("p99.9")],
        requests: ok,
        errors: bad + errors,
    })
}

/// As many requests as `CONNS` connections carry (HTTP/2: 8 streams each).
pub async fn h2load(addr: SocketAddr, load: &Load, work: &Path) -> anyhow::Result<Measured> {
    let log = work.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let mut args = vec![
        "-c".to_string(),
        CONNS.to_string(),
        "-t".into(),
        "1".into(),
        "-D".into(),
        load.seconds.to_string(),
        "--log-file".into(),
        log.display().to_string(),
    ];
    if load.proto == Proto::H1 {
        args.push("--h1".into());
    } else {
        args.extend(["-m".into(), "8".into()]);
    }
    args.push(format!("http://{addr}/1k"));
    let out = Command::new("h2load").args(&args).output().await?;
    anyhow::ensure!(
        out.status.success(),
        "h2load failed (apt-get install nghttp2-client): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = H2loadSummary::of(&stdout);
    let mut sorted_ms: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (_, status, us) = (f.next()?, f.next()?, f.next()?);
            (status.starts_with('2')).then(|| us.trim().parse::<f64>().ok().map(|u| u / 1000.0))?
        })
        .collect();
    sorted_ms.sort_by(f64::total_cmp);
    Ok(Measured::from_sorted(
        summary.rps_2xx(),
        &sorted_ms,
        summary.count("done", "requests:"),
        // h2load's "failed" already counts the errored and timed-out requests.
        summary.count("failed", "requests:"),
    ))
}

/// What h2load prints at the end of a run.
struct H2loadSummary<'a> {
    lines: Vec<&'a str>,
}

impl<'a> H2loadSummary<'a> {
    fn of(stdout: &'a str) -> Self {
        H2loadSummary {
            lines: stdout.lines().collect(),
        }
    }

    /// `N what` in the line starting with `line`: `requests: 20 total, 0
    /// succeeded`, `status codes: 0 2xx, 20 4xx`.
    fn count(&self, what: &str, line: &str) -> u64 {
        self.lines
            .iter()
            .find(|l| l.starts_with(line))
            .and_then(|l| {
                l[line.len()..]
                    .split(',')
                    .find(|p| p.trim().ends_with(what))
            })
            .and_then(|p| p.split_whitespace().find_map(|w| w.parse::<u64>().ok()))
            .unwrap_or(0)
    }

    /// Seconds the run took: `finished in 8.00s, …` (or `22.00ms`).
    fn seconds(&self) -> f64 {
        let Some(took) = self
            .lines
            .iter()
            .find_map(|l| l.strip_prefix("finished in "))
            .and_then(|l| l.split(',').next())
        else {
            return 0.0;
        };
        let took = took.trim();
        let (n, scale) = if let Some(ms) = took.strip_suffix("ms") {
            (ms, 1e-3)
        } else if let Some(us) = took.strip_suffix("us") {
            (us, 1e-6)
        } else {
            (took.trim_end_matches('s'), 1.0)
        };
        n.parse::<f64>().map_or(0.0, |n| n * scale)
    }

    /// 2xx answers per second: h2load's own rate counts every answer (a pair
    /// answering 502 at once would look fast and cheap).
    fn rps_2xx(&self) -> f64 {
        let secs = self.seconds();
        if secs > 0.0 {
            self.count("2xx", "status codes:") as f64 / secs
        } else {
            0.0
        }
    }
}

/// Runs `one` in `CONNS` loops for `seconds`; latencies of the successes.
async fn loops<F, Fut>(seconds: u64, one: F) -> anyhow::Result<(Vec<f64>, u64, f64)>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<bool>> + Send,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONNS)
        .map(|_| {
            let one = one.clone();
            tokio::spawn(async move {
                let (mut ms, mut errors) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match one().await {
                        Ok(true) => ms.push(t.elapsed().as_secs_f64() * 1000.0),
                        _ => errors += 1,
                    }
                }
                (ms, errors)
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (ms, e) = t.await?;
        all.extend(ms);
        errors += e;
    }
    all.sort_by(f64::total_cmp);
    Ok((all, errors, start.elapsed().as_secs_f64()))
}

/// HTTP/1.1 with a new connection for every request, `CONNS` at a time.
pub async fn new_connections(addr: SocketAddr, seconds: u64) -> anyhow::Result<Measured> {
    let (ms, errors, wall) = loops(seconds, move || async move {
        let (mut send, rsp) = http1(addr).await?;
        drop(rsp);
        let req = http::Request::get("/1k")
            .header("host", "bench")
            .header("connection", "close")
            .body(http_body_util::Empty::new())?;
        let rsp = send.send_request(req).await?;
        let ok = rsp.status().is_success();
        http_body_util::BodyExt::collect(rsp.into_body()).await?;
        Ok(ok)
    })
    .await?;
    Ok(Measured::of_loops(&ms, errors, wall))
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// An HTTP/1.1 connection to `addr`, its driver running in a task.
async fn http1(addr: SocketAddr) -> anyhow::Result<(Sender, tokio::task::JoinHandle<()>)> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    let (send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, driver))
}

/// Opaque TCP, a new connection each time, `CONNS` at a time: connect, write 64
/// bytes, read them echoed, close. Connections per second.
pub async fn tcp_connections(addr: SocketAddr, seconds: u64) -> anyhow::Result<Measured> {
    let (ms, errors, wall) = loops(seconds, move || async move {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let msg = [7u8; 64];
        s.write_all(&msg).await?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back).await?;
        Ok(back == msg)
    })
    .await?;
    Ok(Measured::of_loops(&ms, errors, wall))
}

/// Opaque TCP, one connection: `bytes` written to an echo server while its echo
/// is read back. MB (10^6 bytes) per second each way.
pub async fn tcp_bulk(addr: SocketAddr, bytes: u64) -> anyhow::Result<Measured> {
    tokio::time::timeout(Duration::from_secs(120), bulk(addr, bytes))
        .await
        .map_err(|_| anyhow::anyhow!("{addr}: {bytes} bytes not echoed within 120 s"))?
}

async fn bulk(addr: SocketAddr, bytes: u64) -> anyhow::Result<Measured> {
    let start = Instant::now();
    let s = tokio::net::TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        // Binary, as bulk data is: a run of one letter would open like an
        // HTTP method, and be detected as HTTP on a port not declared opaque.
        let chunk: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            wr.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
        wr.shutdown().await?;
        anyhow::Ok(())
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        match rd.read(&mut buf).await? {
            0 => break,
            n => got += n as u64,
        }
    }
    writer.await??;
    let secs = start.elapsed().as_secs_f64();
    let ok = got == bytes;
    Ok(Measured {
        rps: got as f64 / 1e6 / secs,
        pct: [secs * 1000.0; 4],
        requests: u64::from(ok),
        errors: u64::from(!ok),
    })
}

/// `n` HTTP/1.1 keep-alive connections, each having carried one request, held
/// open until the returned value is dropped.
pub async fn idle_connections(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<IdleConn>> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let one = async {
            let (mut send, driver) = http1(addr).await?;
            let req = http::Request::get("/1k")
                .header("host", "bench")
                .body(http_body_util::Empty::new())?;
            let rsp = send.send_request(req).await?;
            anyhow::ensure!(rsp.status().is_success(), "status {}", rsp.status());
            http_body_util::BodyExt::collect(rsp.into_body()).await?;
            anyhow::Ok(IdleConn {
                _send: send,
                driver,
            })
        };
        let conn = tokio::time::timeout(Duration::from_secs(10), one)
            .await
            .map_err(|_| anyhow::anyhow!("no answer in 10 s"))
            .and_then(|r| r)
            .map_err(|e| anyhow::anyhow!("{addr}: connection {} of {n}: {e}", held.len() + 1))?;
        held.push(conn);
    }
    Ok(held)
}

pub struct IdleConn {
    _send: Sender,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for IdleConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn oha_json_is_read() {
        let json = br#"{"summary":{"successRate":1.0,"requestsPerSec":999.5,"total":10.0},
            "latencyPercentiles":{"p50":0.0004,"p90":0.0006,"p99":0.001,"p99.9":0.002},
            "statusCodeDistribution":{"200":9990,"502":3},
            "errorDistribution":{"connection closed":2,"aborted due to deadline":16}}"#;
        let m = super::parse_oha(json).unwrap();
        assert_eq!(m.rps, 999.0, "successes per second");
        assert_eq!(m.requests, 9990);
        assert_eq!(m.errors, 5);
        assert!((m.pct[0] - 0.4).abs() < 1e-9 && (m.pct[3] - 2.0).abs() < 1e-9);
    }

    /// A pair answering errors fast must not look fast: only 2xx answers
    /// count towards the rate (h2load's own says 909 req/s here).
    #[test]
    fn h2load_rate_counts_successes_only() {
        let out = "finished in 22.00ms, 909.21 req/s, 41.07KB/s
requests: 20 total, 20 started, 20 done, 5 succeeded, 15 failed, 0 errored, 0 timeout
status codes: 5 2xx, 0 3xx, 10 4xx, 5 5xx
";
        let s = super::H2loadSummary::of(out);
        assert!((s.seconds() - 0.022).abs() < 1e-9);
        assert!((s.rps_2xx() - 5.0 / 0.022).abs() < 1e-6);
        assert_eq!(s.count("done", "requests:"), 20);
        assert_eq!(s.count("failed", "requests:"), 15);
        let s =
            super::H2loadSummary::of("finished in 8.00s, 1.00 req/s\nstatus codes: 16000 2xx\n");
        assert_eq!(s.rps_2xx(), 2000.0);
    }
}
