//! PNG plots of a proxy benchmark: latency percentiles per scenario at a fixed
//! rate, and CPU and memory per scenario.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::proxy::{Results, summary};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const COLORS: [RGBColor; 5] = [
    RGBColor(90, 90, 90),
    RGBColor(0, 114, 178),
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
];

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

/// Grouped bars: for each group (x label), one bar per series.
fn bars(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
) -> DrawResult {
    let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        // Headroom for the legend above the tallest bars.
        * 1.45;
    let n = series.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups.len() as f64, 0.0..max.max(1e-9))?;
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
    for (si, (name, values)) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(gi, v)| {
                let x0 = gi as f64 + 0.1 + 0.8 * si as f64 / n;
                let x1 = x0 + 0.8 / n * 0.9;
                Rectangle::new([(x0, 0.0), (x1, *v)], color.filled())
            }))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        // Top left, over the smallest group (p50, or the direct run): never
        // over the bars that matter.
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

pub fn write(r: &Results, dir: &Path, load: &str) -> anyhow::Result<Vec<std::path::PathBuf>> {
    font()?;
    let rows: Vec<_> = summary(r)
        .into_iter()
        .filter(|(l, _, _)| l == load)
        .collect();
    if rows.is_empty() {
        // A run of other loads only: nothing to plot.
        return Ok(Vec::new());
    }
    let scenarios: Vec<String> = rows.iter().map(|(_, s, _)| s.clone()).collect();
    let pct = ["p50", "p90", "p99", "p99.9"];
    let lat: Vec<(String, Vec<f64>)> = rows
        .iter()
        .map(|(_, s, x)| (s.clone(), vec![x.p50_ms, x.p90_ms, x.p99_ms, x.p999_ms]))
        .collect();
    let latency = dir.join("bench-latency.png");
    bars(
        &latency,
        &format!("Latency at {load}, 16 keep-alive connections (ms)"),
        "ms",
        &pct.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        &lat,
    )
    .map_err(|e| anyhow::anyhow!("plot: {e}"))?;

    let proxies: Vec<String> = scenarios
        .iter()
        .filter(|s| *s != "direct")
        .cloned()
        .collect();
    let cpu: Vec<(String, Vec<f64>)> = ["client proxy", "server proxy"]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                p.to_string(),
                rows.iter()
                    .filter(|(_, s, _)| s != "direct")
                    .map(|(_, _, x)| x.vcpu_per_krps.get(i).copied().unwrap_or(0.0))
                    .collect(),
            )
        })
        .collect();
    let cpu_png = dir.join("bench-cpu.png");
    bars(
        &cpu_png,
        &format!("vCPU per 1,000 requests/s at {load}"),
        "vCPU",
        &proxies,
        &cpu,
    )
    .map_err(|e| anyhow::anyhow!("plot: {e}"))?;

    let mem: Vec<(String, Vec<f64>)> = ["idle", "peak"]
        .iter()
        .map(|k| {
            (
                format!("{k} RSS"),
                proxies
                    .iter()
                    .map(|s| {
                        let ms: Vec<_> = r.memory.iter().filter(|m| &m.scenario == s).collect();
                        let v: f64 = ms
                            .iter()
                            .map(|m| {
                                if *k == "idle" {
                                    m.idle_rss_mib
                                } else {
                                    m.peak_rss_mib
                                }
                            })
                            .sum();
                        v / ms.len().max(1) as f64
                    })
                    .collect(),
            )
        })
        .collect();
    let mem_png = dir.join("bench-memory.png");
    bars(
        &mem_png,
        "Memory per proxy process (MiB, mean of the pair)",
        "MiB",
        &proxies,
        &mem,
    )
    .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok(vec![latency, cpu_png, mem_png])
}
