//! PNG rendering of [`Chart`]s with plotters' bitmap backend.
//!
//! Text is drawn with ab_glyph (pure Rust) from a TrueType font loaded at run time: the file
//! named by `MOONCAKE_FONT`, else DejaVu Sans or Liberation Sans from the usual system paths
//! (Debian: `fonts-dejavu-core`).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::experiments::{Chart, ChartKind, Series};

/// Errors of chart rendering.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlotError {
    /// No usable font was found.
    #[error("no TrueType font for chart text: {0} (set MOONCAKE_FONT to a .ttf file)")]
    Font(String),
    /// Drawing or encoding the image failed.
    #[error("drawing {path}: {message}")]
    Draw {
        /// The output file.
        path: String,
        /// What failed.
        message: String,
    },
}

const FONT_PATHS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
];

/// Loads and registers the chart font once (as plotters' `sans-serif`).
pub fn ensure_font() -> Result<(), PlotError> {
    static FONT: OnceLock<Result<(), PlotError>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates: Vec<String> = std::env::var("MOONCAKE_FONT")
            .ok()
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| (*s).to_owned()))
            .collect();
        for p in &candidates {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    tracing::debug!(font = %p, "chart font loaded");
                    return Ok(());
                }
            }
        }
        Err(PlotError::Font(format!("tried {}", candidates.join(", "))))
    })
    .clone()
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn draw_err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |message| PlotError::Draw {
        path: path.display().to_string(),
        message,
    }
}

/// Renders `chart` into a PNG at `path` (800×500).
pub fn render(chart: &Chart, path: &Path) -> Result<(), PlotError> {
    ensure_font()?;
    let err = draw_err(path);
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    match &chart.kind {
        ChartKind::Line { log_x } => line(&root, chart, *log_x).map_err(&err)?,
        ChartKind::Bar { categories } => bars(&root, chart, categories).map_err(&err)?,
    }
    root.present().map_err(|e| err(e.to_string()))
}

fn bounds(series: &[Series], f: impl Fn(&(f64, f64)) -> f64) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for s in series {
        for p in &s.points {
            let v = f(p);
            if v.is_finite() {
                lo = lo.min(v);
                hi = hi.max(v);
            }
        }
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    (lo, hi)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn line(root: &Area<'_>, chart: &Chart, log_x: bool) -> Result<(), String> {
    let tx = |x: f64| if log_x { x.max(1e-300).log10() } else { x };
    let (mut x0, mut x1) = bounds(&chart.series, |p| tx(p.0));
    if log_x {
        (x0, x1) = (x0.floor(), x1.ceil());
    }
    let (_, y1) = bounds(&chart.series, |p| p.1);
    let y0 = 0.0;
    let y1 = y1 * 1.1;
    let mut c = ChartBuilder::on(root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    let fmt_x = |x: &f64| {
        if !log_x {
            format!("{x}")
        } else if (x - x.round()).abs() < 1e-6 {
            format!("1e{:.0}", x.round())
        } else {
            String::new()
        }
    };
    let x_labels = if log_x { (x1 - x0) as usize + 1 } else { 10 };
    c.configure_mesh()
        .light_line_style(WHITE)
        .x_labels(x_labels)
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .x_label_formatter(&fmt_x)
        .draw()
        .map_err(|e| e.to_string())?;
    for (k, s) in chart.series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (tx(x), y)).collect();
        let style = if s.reference {
            color.stroke_width(1)
        } else {
            color.stroke_width(2)
        };
        let anno = c
            .draw_series(LineSeries::new(pts.clone(), style))
            .map_err(|e| e.to_string())?;
        anno.label(&s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        if pts.len() <= 60 {
            c.draw_series(pts.iter().map(|&p| {
                if s.reference {
                    Circle::new(p, 4, color.stroke_width(1))
                } else {
                    Circle::new(p, 4, color.filled())
                }
            }))
            .map_err(|e| e.to_string())?;
        }
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| e.to_string())
}

fn bars(root: &Area<'_>, chart: &Chart, cats: &[String]) -> Result<(), String> {
    let n = cats.len().max(1) as f64;
    let m = chart.series.len().max(1) as f64;
    let (_, y1) = bounds(&chart.series, |p| p.1);
    let y1 = y1 * 1.15;
    let mut c = ChartBuilder::on(root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n, 0.0..y1)
        .map_err(|e| e.to_string())?;
    let no_label = |_: &f64| String::new();
    c.configure_mesh()
        .light_line_style(WHITE)
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&no_label)
        .y_desc(&chart.y_label)
        .draw()
        .map_err(|e| e.to_string())?;
    let w = 0.8 / m;
    for (k, s) in chart.series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let rects = s.points.iter().map(|&(i, y)| {
            let x = i + 0.1 + k as f64 * w;
            let style = if s.reference {
                color.stroke_width(2)
            } else {
                color.filled()
            };
            Rectangle::new([(x, 0.0), (x + w * 0.9, y)], style)
        });
        c.draw_series(rects)
            .map_err(|e| e.to_string())?
            .label(&s.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
        c.draw_series(s.points.iter().map(|&(i, y)| {
            let x = i + 0.1 + k as f64 * w;
            Text::new(
                format!("{y:.2}"),
                (x, y + y1 * 0.01),
                ("sans-serif", 12).into_font().color(&BLACK),
            )
        }))
        .map_err(|e| e.to_string())?;
    }
    c.draw_series(cats.iter().enumerate().map(|(i, name)| {
        Text::new(
            name.clone(),
            (i as f64 + 0.1, y1 * 0.97),
            ("sans-serif", 15).into_font().color(&BLACK),
        )
    }))
    .map_err(|e| e.to_string())?;
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_line_and_bar_charts() {
        if ensure_font().is_err() {
            // No font on this machine: rendering must report it, not panic.
            let dir = std::env::temp_dir();
            let c = Chart {
                title: "t".into(),
                x_label: String::new(),
                y_label: String::new(),
                kind: ChartKind::Line { log_x: false },
                series: vec![],
            };
            assert!(matches!(
                render(&c, &dir.join("x.png")),
                Err(PlotError::Font(_))
            ));
            return;
        }
        let dir = std::env::temp_dir().join(format!("mooncake-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = |name: &str, r| Series {
            name: name.into(),
            points: vec![(1e4, 0.1), (1e6, 0.3), (1e9, 0.6)],
            reference: r,
        };
        let line = Chart {
            title: "line".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            kind: ChartKind::Line { log_x: true },
            series: vec![s("a", false), s("b", true)],
        };
        let bar = Chart {
            title: "bar".into(),
            x_label: String::new(),
            y_label: "y".into(),
            kind: ChartKind::Bar {
                categories: vec!["p".into(), "q".into()],
            },
            series: vec![
                Series {
                    name: "ours".into(),
                    points: vec![(0.0, 1.0), (1.0, 2.0)],
                    reference: false,
                },
                Series {
                    name: "paper".into(),
                    points: vec![(0.0, 1.5), (1.0, 2.5)],
                    reference: true,
                },
            ],
        };
        for (c, f) in [(&line, "line.png"), (&bar, "bar.png")] {
            let p = dir.join(f);
            render(c, &p).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(&bytes[1..4], b"PNG");
            assert!(bytes.len() > 2000, "{f}: {} bytes", bytes.len());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
