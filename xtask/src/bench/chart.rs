//! The results as an SVG chart (plotters): ratios to direct, and ping-pong round trips.
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::results::{Results, PATHS};

/// Bar colours per path, in [`PATHS`] order.
const COLORS: [RGBColor; 4] = [
    RGBColor(120, 120, 120),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
];

/// One group of bars: a label, the rows it shows, and an optional target line.
struct Group {
    label: &'static str,
    key: &'static str,
    target: Option<f64>,
}

/// Draws `results` to `file` (SVG, 1100×440).
pub(crate) fn draw(results: &Results, file: &Path) -> Result<()> {
    let root = SVGBackend::new(file, (1100, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(plot)?;
    let (left, right) = root.split_horizontally(600);
    let ratios = [
        Group {
            label: "iperf3 1 stream",
            key: "iperf1",
            target: Some(0.60),
        },
        Group {
            label: "iperf3 4 streams",
            key: "iperf4",
            target: Some(0.60),
        },
        Group {
            label: "new conn/s",
            key: "conn_rate",
            target: Some(0.42),
        },
    ];
    panel(
        results,
        &left,
        "throughput and connection rate, ratio to direct (higher is better)",
        &ratios,
        true,
    )?;
    let rtts = [
        Group {
            label: "p50",
            key: "rtt_p50",
            target: None,
        },
        Group {
            label: "p99",
            key: "rtt_p99",
            target: None,
        },
        Group {
            label: "p99.9",
            key: "rtt_p999",
            target: None,
        },
    ];
    panel(
        results,
        &right,
        "ping-pong 64 B round trip, µs, log scale (lower is better)",
        &rtts,
        false,
    )?;
    root.present().map_err(plot)?;
    Ok(())
}

/// One panel of grouped bars with min–max whiskers. `ratio`: values are divided by direct's
/// median and direct itself is the line at 1.0; otherwise direct is a bar of its own and the
/// axis is logarithmic (bars are drawn on log10 of the value, from 1).
fn panel(
    r: &Results,
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    groups: &[Group],
    ratio: bool,
) -> Result<()> {
    let paths: Vec<usize> = (0..PATHS.len()).filter(|&i| !ratio || i > 0).collect();
    // (group, path) -> (median, min, max): divided by direct's median, or log10 of µs.
    let value = |g: &Group, p: usize| -> Option<(f64, f64, f64)> {
        let row = r.load_row(g.key)?;
        let s = row.stat(PATHS[p].0)?;
        if ratio {
            let base = row.stat("direct")?.median;
            (base > 0.0).then(|| (s.median / base, s.min / base, s.max / base))
        } else {
            let log = |v: f64| v.max(1.0).log10();
            Some((log(s.median), log(s.min), log(s.max)))
        }
    };
    let mut ymax: f64 = if ratio { 1.5 } else { 1.0 };
    for g in groups {
        for &p in &paths {
            if let Some((_, _, max)) = value(g, p) {
                // Headroom for the legend: a tenth more, or most of a decade on the log axis.
                ymax = ymax.max(if ratio { max * 1.1 } else { max + 0.8 });
            }
        }
    }
    let n = groups.len();
    let names: Vec<&str> = groups.iter().map(|g| g.label).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(0.5f64..n as f64 + 0.5, 0f64..ymax)
        .map_err(plot)?;
    let label = move |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 1.0 && (i as usize) <= names.len() {
            names[i as usize - 1].to_string()
        } else {
            String::new()
        }
    };
    let y_label = move |y: &f64| {
        if ratio {
            format!("{y:.1}")
        } else {
            format!("{:.0}", 10f64.powf(*y))
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n + 2)
        .x_label_formatter(&label)
        .y_labels(8)
        .y_label_formatter(&y_label)
        .draw()
        .map_err(plot)?;
    let width = 0.8 / paths.len() as f64;
    for (slot, &p) in paths.iter().enumerate() {
        let color = COLORS[p];
        let bars: Vec<(f64, (f64, f64, f64))> = groups
            .iter()
            .enumerate()
            .filter_map(|(gi, g)| {
                let x0 = gi as f64 + 1.0 - 0.4 + slot as f64 * width;
                Some((x0, value(g, p)?))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|&(x0, (m, _, _))| {
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, m)], color.filled())
            }))
            .map_err(plot)?
            .label(PATHS[p].1)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart
            .draw_series(bars.iter().map(|&(x0, (_, lo, hi))| {
                let xm = x0 + width * 0.45;
                PathElement::new(vec![(xm, lo), (xm, hi)], BLACK.stroke_width(1))
            }))
            .map_err(plot)?;
    }
    if ratio {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.5, 1.0), (n as f64 + 0.5, 1.0)],
                COLORS[0].stroke_width(2),
            )))
            .map_err(plot)?
            .label("direct = 1.0")
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 12, y)], COLORS[0].stroke_width(2))
            });
        chart
            .draw_series(groups.iter().enumerate().filter_map(|(gi, g)| {
                let t = g.target?;
                let x = gi as f64 + 1.0;
                Some(PathElement::new(
                    vec![(x - 0.45, t), (x + 0.45, t)],
                    RED.stroke_width(2),
                ))
            }))
            .map_err(plot)?
            .label("target")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(plot)?;
    Ok(())
}

fn plot<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart: {e:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::results::{Better, Compare, RowSpec};

    #[test]
    fn draws_an_svg_with_bars_and_legend() {
        let mut r = Results::default();
        for key in [
            "iperf1",
            "iperf4",
            "conn_rate",
            "rtt_p50",
            "rtt_p99",
            "rtt_p999",
        ] {
            let spec = RowSpec {
                key,
                title: key,
                unit: "u",
                better: Better::Higher,
                compare: Compare::Ratio,
            };
            for (col, v) in [
                ("direct", 10.0),
                ("ambit", 4.0),
                ("same_node", 5.0),
                ("capture", 9.5),
            ] {
                r.push_load(&spec, col, v);
            }
        }
        let file =
            std::env::temp_dir().join(format!("ambit-bench-chart-{}.svg", std::process::id()));
        draw(&r, &file).unwrap();
        let svg = std::fs::read_to_string(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("ambit cross-node (HBONE)") && svg.contains("iperf3 4 streams"));
    }
}
