//! The held-out loss chart: one line per language over rounds, as inline SVG (no script, no
//! fonts to load, the same in the live pages and the self-contained report).

use std::collections::BTreeMap;
use std::fmt::Write;

use weft_core::quality::LossTable;

use crate::format::esc;

/// Colour-blind-safe palette (Okabe–Ito), cycled.
const COLOURS: [&str; 8] = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442"];

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 110.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 40.0;

/// The chart of `series` (round, loss per language). Languages with no finite point are left
/// out; an empty series draws an empty frame that says so.
pub fn loss_chart(series: &[(u64, &LossTable)]) -> String {
    let mut lines: BTreeMap<&str, Vec<(u64, f64)>> = BTreeMap::new();
    for (round, losses) in series {
        for (language, loss) in losses.iter() {
            if loss.is_finite() {
                lines.entry(language.as_str()).or_default().push((*round, *loss));
            }
        }
    }
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg id="loss-chart" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="loss-chart-title" data-languages="{}" data-rounds="{}"><title id="loss-chart-title">Held-out loss of the shared base per language over rounds (nats/byte; lower is better)</title>"#,
        esc(&lines.keys().copied().collect::<Vec<_>>().join(",")),
        series.len()
    );
    let points: Vec<(u64, f64)> = lines.values().flatten().copied().collect();
    if points.is_empty() {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" class="empty">no held-out loss recorded yet</text></svg>"#,
            WIDTH / 2.0,
            HEIGHT / 2.0
        );
        return svg;
    }
    let (r0, r1) = points.iter().fold((u64::MAX, 0), |(lo, hi), (r, _)| (lo.min(*r), hi.max(*r)));
    let (mut y0, mut y1) =
        points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (_, l)| (lo.min(*l), hi.max(*l)));
    if y1 - y0 < 1e-9 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = 0.05 * (y1 - y0);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |r: u64| LEFT + if r1 == r0 { plot_w / 2.0 } else { (r - r0) as f64 / (r1 - r0) as f64 * plot_w };
    let y = |l: f64| TOP + (y1 - l) / (y1 - y0) * plot_h;

    // Axes, grid and ticks.
    let _ = write!(
        svg,
        r#"<g class="axes"><line x1="{LEFT}" y1="{}" x2="{}" y2="{}"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}"/>"#,
        TOP + plot_h,
        LEFT + plot_w,
        TOP + plot_h,
        TOP + plot_h
    );
    for i in 0..=4 {
        let v = y0 + (y1 - y0) * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.3}</text>"#,
            LEFT + plot_w,
            LEFT - 6.0,
            y(v) + 4.0,
            yy = y(v)
        );
    }
    for r in round_ticks(r0, r1) {
        let _ = write!(svg, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{r}</text>"#, x(r), TOP + plot_h + 16.0);
    }
    let _ = write!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="label">round</text></g>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 6.0
    );

    // One line per language, points with their values as tooltips, a legend at the right.
    for (i, (language, line)) in lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = line.iter().map(|(r, l)| format!("{:.1},{:.1}", x(*r), y(*l))).collect();
        let _ = write!(
            svg,
            r#"<g class="series" data-language="{lang}" data-points="{}"><polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            line.len(),
            path.join(" "),
            lang = esc(language)
        );
        for (r, l) in line {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"><title>{lang}, round {r}: {l:.4}</title></circle>"#,
                x(*r),
                y(*l),
                lang = esc(language)
            );
        }
        let ly = TOP + 14.0 + 18.0 * i as f64;
        let lx = LEFT + plot_w + 14.0;
        let _ = write!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{}</text></g>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            esc(language)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// At most about ten round numbers, evenly spaced, always the first and the last.
fn round_ticks(r0: u64, r1: u64) -> Vec<u64> {
    let step = (r1 - r0).div_ceil(10).max(1);
    let mut ticks: Vec<u64> = (r0..=r1).step_by(step as usize).collect();
    if ticks.last() != Some(&r1) {
        ticks.push(r1);
    }
    ticks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, f64)]) -> LossTable {
        pairs.iter().map(|(l, v)| (l.to_string(), *v)).collect()
    }

    #[test]
    fn one_line_per_language_with_every_finite_point() {
        let r0 = table(&[("de", 5.5), ("ja", 5.6)]);
        let r1 = table(&[("de", 4.0), ("ja", f64::NAN)]);
        let r2 = table(&[("de", 3.0), ("ja", 4.1)]);
        let svg = loss_chart(&[(0, &r0), (1, &r1), (2, &r2)]);
        assert!(svg.contains(r#"data-languages="de,ja""#));
        assert!(svg.contains(r#"data-language="de" data-points="3""#));
        assert!(svg.contains(r#"data-language="ja" data-points="2""#));
        assert_eq!(svg.matches("<circle").count(), 5);
    }

    #[test]
    fn an_empty_series_says_so() {
        assert!(loss_chart(&[]).contains("no held-out loss recorded yet"));
    }

    #[test]
    fn language_names_are_escaped() {
        let t = table(&[("<script>", 1.0)]);
        let svg = loss_chart(&[(0, &t)]);
        assert!(!svg.contains("<script>"));
    }

    #[test]
    fn ticks_span_the_rounds() {
        assert_eq!(round_ticks(0, 3), vec![0, 1, 2, 3]);
        assert_eq!(round_ticks(0, 25), vec![0, 3, 6, 9, 12, 15, 18, 21, 24, 25]);
        assert_eq!(round_ticks(4, 4), vec![4]);
    }
}
