//! Minimal hand-written SVG: a horizontal bar chart with one or more series per row,
//! each bar labelled with its value (so a linear scale never hides a small figure).

use std::fmt::Write as _;

/// One row: a label and one value per series (`None`: not measured).
pub struct Row {
    pub label: String,
    pub values: Vec<Option<f64>>,
}

const LABEL_W: f64 = 270.0;
const BAR_W: f64 = 400.0;
const BAR_H: f64 = 12.0;
const COLORS: [&str; 4] = ["#4477aa", "#ee6677", "#228833", "#ccbb44"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A chart titled `title`; `series` names the values of every row; `unit` follows each
/// value label; `digits` decimals.
pub fn bar_chart(title: &str, series: &[&str], rows: &[Row], unit: &str, digits: usize) -> String {
    let max = rows
        .iter()
        .flat_map(|r| r.values.iter().flatten())
        .fold(0.0_f64, |a, &v| if v.is_finite() { a.max(v) } else { a });
    let max = if max > 0.0 { max } else { 1.0 };
    let row_h = BAR_H * series.len() as f64 + 8.0;
    let top = 44.0;
    let height = top + row_h * rows.len() as f64 + 10.0;
    let width = LABEL_W + BAR_W + 130.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="8" y="16" font-size="13" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let mut x = LABEL_W;
    for (i, name) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="26" width="10" height="10" fill="{c}"/><text x="{}" y="35">{}</text>"#,
            x + 14.0,
            esc(name)
        );
        x += 20.0 + 7.0 * name.len() as f64;
    }
    for (r, row) in rows.iter().enumerate() {
        let y0 = top + r as f64 * row_h;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            LABEL_W - 6.0,
            y0 + row_h / 2.0 + 3.0,
            esc(&row.label)
        );
        for (i, v) in row.values.iter().enumerate() {
            let y = y0 + 4.0 + i as f64 * BAR_H;
            let c = COLORS[i % COLORS.len()];
            let (w, text) = match v {
                Some(v) if v.is_finite() => (BAR_W * v / max, format!("{v:.digits$} {unit}")),
                _ => (0.0, "n/a".to_string()),
            };
            let _ = writeln!(
                s,
                r#"<rect x="{LABEL_W}" y="{y}" width="{w:.1}" height="{}" fill="{c}"/><text x="{:.1}" y="{}">{}</text>"#,
                BAR_H - 2.0,
                LABEL_W + w + 4.0,
                y + BAR_H - 3.0,
                esc(&text)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_bar_per_value_and_escapes_labels() {
        let rows = vec![
            Row {
                label: "a <b>".into(),
                values: vec![Some(2.0), None],
            },
            Row {
                label: "c".into(),
                values: vec![Some(1.0), Some(0.5)],
            },
        ];
        let svg = bar_chart("t", &["x", "y"], &rows, "Mpps", 2);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt;b&gt;"));
        assert!(svg.contains("2.00 Mpps"));
        assert!(svg.contains("n/a"));
        // The largest value spans the whole bar area.
        assert!(svg.contains(r#"width="400.0""#));
    }
}
