//! Minimal SVG charts: lines over a categorical x axis, and grouped bars.

use std::fmt::Write;

/// Width of the plot area; the legend to its right is as wide as its longest name.
const PLOT_W: f64 = 460.0;
const H: f64 = 440.0;
const LEFT: f64 = 80.0;
const TOP: f64 = 40.0;
/// Room for x labels of up to three lines (split at ", ") and the axis name.
const BOTTOM: f64 = 80.0;
/// Rough width of one character at font-size 12.
const CHAR_W: f64 = 7.0;
const COLORS: [&str; 6] = [
    "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
];

/// One named series of y values, one per x category (None: no value).
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

/// The top of the y axis: a round number above every value.
fn y_max(series: &[Series]) -> f64 {
    nice_max(
        series
            .iter()
            .flat_map(|s| s.values.iter().flatten())
            .copied()
            .fold(0.0, f64::max),
    )
}

/// Space right of the plot: legend swatch, gap and the longest series name.
fn right_margin(series: &[Series]) -> f64 {
    let longest = series
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(0);
    40.0 + CHAR_W * longest as f64
}

fn frame(
    out: &mut String,
    title: &str,
    x_label: &str,
    y_label: &str,
    xs: &[String],
    ymax: f64,
    right: f64,
) -> (f64, f64) {
    let pw = PLOT_W;
    let ph = H - TOP - BOTTOM;
    let w = LEFT + pw + right;
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(out, r#"<rect width="{w}" height="{H}" fill="white"/>"#);
    let _ = write!(
        out,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        escape(title)
    );
    for i in 0..=5 {
        let v = ymax * f64::from(i) / 5.0;
        let y = TOP + ph - ph * f64::from(i) / 5.0;
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            LEFT + pw
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            short(v)
        );
    }
    let n = xs.len().max(1) as f64;
    for (i, x) in xs.iter().enumerate() {
        let cx = LEFT + pw * (i as f64 + 0.5) / n;
        let _ = write!(
            out,
            r#"<text x="{cx}" y="{}" text-anchor="middle">"#,
            TOP + ph + 18.0
        );
        for (k, part) in x.split(", ").enumerate() {
            let dy = if k == 0 { 0.0 } else { 14.0 };
            let _ = write!(out, r#"<tspan x="{cx}" dy="{dy}">{}</tspan>"#, escape(part));
        }
        out.push_str("</text>");
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 15.0,
        escape(x_label)
    );
    let _ = write!(
        out,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + ph / 2.0,
        escape(y_label)
    );
    let _ = write!(
        out,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    (pw, ph)
}

fn legend(out: &mut String, series: &[Series]) {
    for (i, s) in series.iter().enumerate() {
        let y = TOP + 10.0 + 20.0 * i as f64;
        let x = LEFT + PLOT_W + 12.0;
        let c = COLORS[i % COLORS.len()];
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{}" width="14" height="10" fill="{c}"/>"#,
            y - 9.0
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{y}">{}</text>"#,
            x + 20.0,
            escape(&s.name)
        );
    }
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Lines, one per series, over categories `xs`.
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    xs: &[String],
    series: &[Series],
) -> String {
    let ymax = y_max(series);
    let mut out = String::new();
    let (pw, ph) = frame(
        &mut out,
        title,
        x_label,
        y_label,
        xs,
        ymax,
        right_margin(series),
    );
    let n = xs.len().max(1) as f64;
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = s
            .values
            .iter()
            .enumerate()
            .filter_map(|(j, v)| {
                v.map(|v| (LEFT + pw * (j as f64 + 0.5) / n, TOP + ph - ph * v / ymax))
            })
            .collect();
        let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = write!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for (x, y) in pts {
            let _ = write!(out, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{c}"/>"#);
        }
    }
    legend(&mut out, series);
    out.push_str("</svg>\n");
    out
}

/// Grouped bars: for each category, one bar per series.
pub fn bars(title: &str, x_label: &str, y_label: &str, xs: &[String], series: &[Series]) -> String {
    let ymax = y_max(series);
    let mut out = String::new();
    let (pw, ph) = frame(
        &mut out,
        title,
        x_label,
        y_label,
        xs,
        ymax,
        right_margin(series),
    );
    let n = xs.len().max(1) as f64;
    let group = pw / n;
    let bw = group * 0.8 / series.len().max(1) as f64;
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        for (j, v) in s.values.iter().enumerate() {
            let Some(v) = v else { continue };
            let h = ph * v / ymax;
            let x = LEFT + group * j as f64 + group * 0.1 + bw * i as f64;
            let _ = write!(
                out,
                r#"<rect x="{x:.1}" y="{:.1}" width="{bw:.1}" height="{h:.1}" fill="{c}"/>"#,
                TOP + ph - h
            );
        }
    }
    legend(&mut out, series);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg_with_every_series_named() {
        let xs = vec!["1".to_owned(), "32".to_owned()];
        let s = vec![
            Series {
                name: "a<b".into(),
                values: vec![Some(1.0), Some(2000.0)],
            },
            Series {
                name: "c".into(),
                values: vec![None, Some(5.0)],
            },
        ];
        for svg in [lines("t", "x", "y", &xs, &s), bars("t", "x", "y", &xs, &s)] {
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            assert!(svg.contains("a&lt;b") && svg.contains(">c<"));
        }
        assert_eq!(nice_max(1234.0), 2000.0);
    }
}
