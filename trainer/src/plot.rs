//! The loss / eval-loss curve as a standalone SVG a person can open.

use crate::train::TrainingRecord;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG line chart: training loss per step (thin) and its moving average,
/// eval loss at its steps (points and line).
pub fn loss_svg(r: &TrainingRecord, title: &str) -> String {
    let (w, h) = (760.0f64, 420.0f64);
    let (l, rt, t, b) = (64.0, 20.0, 40.0, 48.0);
    let pw = w - l - rt;
    let ph = h - t - b;
    let steps = r.loss_curve.len().max(1) as f64;
    let vals = r
        .loss_curve
        .iter()
        .copied()
        .chain(r.eval_curve.iter().map(|(_, v)| *v))
        .filter(|v| v.is_finite());
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        lo = 0.0;
        hi = 1.0;
    }
    let lo = (lo.min(0.0)) as f64;
    let hi = (hi as f64).max(lo + 1e-6) * 1.05;
    let x = |s: f64| l + pw * s / steps;
    let y = |v: f64| t + ph * (1.0 - (v - lo) / (hi - lo));
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{l}" y="24" font-size="15">{}</text>
<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="black"/>
"#,
        esc(title),
        t + ph,
        l + pw,
        t + ph,
        t + ph
    );
    for k in 0..=5 {
        let v = lo + (hi - lo) * k as f64 / 5.0;
        let yy = y(v);
        svg += &format!(
            "<line x1=\"{}\" y1=\"{yy:.1}\" x2=\"{l}\" y2=\"{yy:.1}\" stroke=\"black\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>\n",
            l - 4.0,
            l - 6.0,
            yy + 4.0
        );
        let s = steps * k as f64 / 5.0;
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{:.0}</text>\n",
            x(s),
            t + ph + 16.0,
            s
        );
    }
    svg += &format!(
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">optimizer step</text>\n<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">loss (mean NLL per trained token)</text>\n",
        l + pw / 2.0,
        h - 10.0,
        t + ph / 2.0,
        t + ph / 2.0
    );
    let line = |pts: &[(f64, f64)], stroke: &str, width: f64| -> String {
        let p: Vec<String> = pts
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(s, v)| format!("{:.1},{:.1}", x(*s), y(*v)))
            .collect();
        format!("<polyline fill=\"none\" stroke=\"{stroke}\" stroke-width=\"{width}\" points=\"{}\"/>\n", p.join(" "))
    };
    let raw: Vec<(f64, f64)> = r
        .loss_curve
        .iter()
        .enumerate()
        .map(|(i, v)| ((i + 1) as f64, *v as f64))
        .collect();
    svg += &line(&raw, "#9ecae1", 1.0);
    let k = (raw.len() / 50).max(1);
    let smooth: Vec<(f64, f64)> = (0..raw.len())
        .map(|i| {
            let a = i.saturating_sub(k);
            let win = &raw[a..=i];
            (
                raw[i].0,
                win.iter().map(|p| p.1).sum::<f64>() / win.len() as f64,
            )
        })
        .collect();
    svg += &line(&smooth, "#08519c", 2.0);
    let ev: Vec<(f64, f64)> = r
        .eval_curve
        .iter()
        .map(|(s, v)| (*s as f64, *v as f64))
        .collect();
    svg += &line(&ev, "#d94801", 2.0);
    for (s, v) in &ev {
        svg += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#d94801\"/>\n",
            x(*s),
            y(*v)
        );
    }
    let lx = l + pw - 220.0;
    svg += &format!(
        "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"#08519c\"/><text x=\"{}\" y=\"{}\">train loss (moving mean of {k})</text>\n<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"#d94801\"/><text x=\"{}\" y=\"{}\">eval loss</text>\n</svg>\n",
        t + 8.0,
        lx + 18.0,
        t + 12.0,
        t + 26.0,
        lx + 18.0,
        t + 30.0
    );
    svg
}
