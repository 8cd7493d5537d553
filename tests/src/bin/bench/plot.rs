//! PNG plots of a proxy benchmark, one per figure: CPU and latency added at
//! fixed rates, throughput, opaque TCP, memory under load and per connection.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::proxy::{Results, summary};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const COLORS: [RGBColor; 8] = [
    RGBColor(90, 90, 90),
    RGBColor(0, 114, 178),
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(213, 94, 0),
    RGBColor(204, 121, 167),
    RGBColor(240, 228, 66),
];

/// A scenario's colour, the same in every plot: by position, a scenario
/// would take another's colour where that one is not drawn (HAProxy's TCP
/// pair in its HTTP pair's in the TCP plots).
fn color_of(scenario: &str) -> RGBColor {
    let known = [
        "strait",
        "strait-mtls",
        "strait-mtls-traced",
        "haproxy-mtls",
        "nginx-mtls",
        "haproxy-tcp-mtls",
        "strait-mtls-before",
        "haproxy-h2-mtls",
    ];
    let i = known
        .iter()
        .position(|k| *k == scenario)
        .unwrap_or_else(|| {
            // Another's: a colour from its name, the same at every run.
            scenario.bytes().map(usize::from).sum::<usize>()
        });
    COLORS[i % COLORS.len()]
}

/// Registers a font for labels (the fonts-dejavu-core package).
fn font() -> anyhow::Result<()> {
    let bytes = std::fs::read(FONT)
        .map_err(|e| anyhow::anyhow!("{FONT}: {e} (apt-get install fonts-dejavu-core)"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("cannot load {FONT}"))?;
    Ok(())
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Grouped bars: for each group (x label), one bar per series (NaN: none). The
/// legend has a column of its own to the right, clear of every bar.
fn bars(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
) -> DrawResult {
    let root = BitMapBackend::new(path, (1100, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, legend) = root.split_horizontally(880);
    let values = || {
        series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|v| v.is_finite())
    };
    // Zero is always on the axis; a negative value (less latency than direct)
    // gets a bar below it.
    let max = values().fold(0.0f64, f64::max) * 1.1;
    let min = values().fold(0.0f64, f64::min) * 1.1;
    let n = series.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups.len() as f64, min..max.max(1e-9))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < groups.len() {
                groups[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (si, (_, values)) in series.iter().enumerate() {
        let color = color_of(&series[si].0);
        chart.draw_series(
            values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(gi, v)| {
                    let x0 = gi as f64 + 0.1 + 0.8 * si as f64 / n;
                    let x1 = x0 + 0.8 / n * 0.9;
                    Rectangle::new([(x0, 0.0), (x1, *v)], color.filled())
                }),
        )?;
    }
    for (si, (name, _)) in series.iter().enumerate() {
        let color = color_of(name);
        let y = 60 + 26 * si as i32;
        legend.draw(&Rectangle::new([(10, y), (26, y + 14)], color.filled()))?;
        legend.draw(&Text::new(
            name.clone(),
            (34, y),
            ("sans-serif", 15).into_font(),
        ))?;
    }
    root.present()?;
    Ok(())
}

/// A plot to draw: file name, title, unit, groups and one series per scenario.
type Figure = (
    &'static str,
    String,
    &'static str,
    Vec<String>,
    Vec<(String, Vec<f64>)>,
);

/// One plot per figure of the run: CPU and latency added at the fixed rates,
/// throughput, opaque TCP, memory at load and per idle connection.
pub fn write(r: &Results, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    font()?;
    let rows = summary(r);
    let mut scenarios: Vec<String> = Vec::new();
    for (_, s, _) in &rows {
        if s != "direct" && !scenarios.contains(s) {
            scenarios.push(s.clone());
        }
    }
    let loads = |pred: &dyn Fn(&str) -> bool| {
        let mut v: Vec<String> = Vec::new();
        for (l, _, _) in &rows {
            if pred(l) && !v.contains(l) {
                v.push(l.clone());
            }
        }
        v
    };
    let find = |l: &str, s: &str| rows.iter().find(|r| r.0 == l && r.1 == s).map(|r| &r.2);
    let figure =
        |loads: &[String], f: &dyn Fn(&str, &str) -> Option<f64>| -> Vec<(String, Vec<f64>)> {
            scenarios
                .iter()
                .filter(|s| loads.iter().any(|l| f(l, s).is_some()))
                .map(|s| {
                    (
                        s.clone(),
                        loads.iter().map(|l| f(l, s).unwrap_or(f64::NAN)).collect(),
                    )
                })
                .collect()
        };
    let rate = loads(&|l| l.ends_with("/s"));
    let max = loads(&|l| l.ends_with("max") || l.ends_with("new conn"));
    let tcp_conn = loads(&|l| l == "tcp conn");
    let tcp_bulk = loads(&|l| l.starts_with("tcp ") && l != "tcp conn");
    let mean_cpu = |s: &crate::proxy::Sample| {
        (!s.vcpu_per_krps.is_empty())
            .then(|| s.vcpu_per_krps.iter().sum::<f64>() / s.vcpu_per_krps.len() as f64)
    };
    let added = |l: &str, s: &str, f: fn(&crate::proxy::Sample) -> f64| {
        Some(f(find(l, s)?) - f(find(l, "direct")?))
    };
    let mut plots: Vec<Figure> = vec![
        (
            "bench-cpu.png",
            "vCPU per 1,000 requests/s per proxy (mean of the pair)".into(),
            "vCPU",
            rate.clone(),
            figure(&rate, &|l, s| find(l, s).and_then(mean_cpu)),
        ),
        (
            "bench-latency-p50.png",
            "p50 latency added over direct (ms), 16 keep-alive connections".into(),
            "ms",
            rate.clone(),
            figure(&rate, &|l, s| added(l, s, |x| x.p50_ms)),
        ),
        (
            "bench-latency-p99.png",
            "p99 latency added over direct (ms), 16 keep-alive connections".into(),
            "ms",
            rate.clone(),
            figure(&rate, &|l, s| added(l, s, |x| x.p99_ms)),
        ),
        (
            "bench-throughput.png",
            "Requests per second as fast as 16 connections go".into(),
            "req/s",
            max.clone(),
            figure(&max, &|l, s| find(l, s).map(|x| x.achieved_rps)),
        ),
        (
            "bench-tcp-connections.png",
            "Opaque TCP: new connections per second (64-byte echo each)".into(),
            "conn/s",
            tcp_conn.clone(),
            figure(&tcp_conn, &|l, s| find(l, s).map(|x| x.achieved_rps)),
        ),
        (
            "bench-tcp-throughput.png",
            "Opaque TCP: one connection's throughput, echoed (MB/s each way)".into(),
            "MB/s",
            tcp_bulk.clone(),
            figure(&tcp_bulk, &|l, s| find(l, s).map(|x| x.achieved_rps)),
        ),
    ];
    let mem_of = |s: &str, peak: bool| {
        let ms: Vec<_> = r.memory.iter().filter(|m| m.scenario == s).collect();
        (!ms.is_empty()).then(|| {
            ms.iter()
                .map(|m| if peak { m.peak_rss_mib } else { m.idle_rss_mib })
                .sum::<f64>()
                / ms.len() as f64
        })
    };
    let mem_groups = vec!["idle".to_string(), "peak under the loads".to_string()];
    plots.push((
        "bench-memory.png",
        "RSS per proxy process (MiB, mean of the pair)".into(),
        "MiB",
        mem_groups.clone(),
        figure(&mem_groups, &|g, s| mem_of(s, g != "idle")),
    ));
    let idle_groups = vec!["client proxy".to_string(), "server proxy".to_string()];
    let per_conn = |process: &str, s: &str| {
        r.idle_conns
            .iter()
            .find(|i| i.scenario == s && i.process == process)
            .map(|i| i.kib_per_connection)
    };
    let held = r.idle_conns.first().map_or(0, |i| i.connections);
    plots.push((
        "bench-idle-connections.png",
        format!("Memory per idle keep-alive connection, {held} held open (KiB)"),
        "KiB",
        idle_groups.clone(),
        figure(&idle_groups, &per_conn),
    ));
    let mut written = Vec::new();
    for (file, title, unit, groups, series) in plots {
        if groups.is_empty() || series.is_empty() {
            continue;
        }
        let path = dir.join(file);
        bars(&path, &title, unit, &groups, &series).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Sample;

    /// A run's plots are drawn (CI's quick run draws none, so this is what
    /// keeps the drawing working), each a PNG.
    #[test]
    fn a_runs_plots_are_drawn() {
        let sample = |scenario: &str, p99: f64| Sample {
            round: 0,
            scenario: scenario.into(),
            load: "h1 1000/s".into(),
            achieved_rps: 1000.0,
            p50_ms: 0.2,
            p90_ms: 0.3,
            p99_ms: p99,
            p999_ms: 1.0,
            requests: 10_000,
            errors: 0,
            vcpu_per_krps: if scenario == "direct" {
                Vec::new()
            } else {
                vec![0.1, 0.1]
            },
            peak_rss_mib: if scenario == "direct" {
                Vec::new()
            } else {
                vec![11.0, 11.0]
            },
        };
        let r = Results {
            machine: "test".into(),
            samples: vec![
                sample("direct", 0.5),
                sample("strait-mtls", 0.9),
                sample("haproxy-mtls", 0.8),
            ],
            memory: Vec::new(),
            idle_conns: Vec::new(),
        };
        let dir = std::env::temp_dir().join(format!("strait-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let drawn = write(&r, &dir).unwrap();
        assert!(!drawn.is_empty());
        for p in &drawn {
            let bytes = std::fs::read(p).unwrap();
            assert!(bytes.starts_with(b"\x89PNG"), "{}", p.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
