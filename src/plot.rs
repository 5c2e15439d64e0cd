//! `resnet-cifar plot`: PNG charts of one or more runs from their own logs (`metrics.jsonl`):
//! the training loss, the validation/test loss and accuracy per epoch, and the learning rate,
//! the pictures the seed shows from TensorBoard. Several runs share each chart, one colour each.

use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// The curves of one run, read from its `metrics.jsonl`.
#[derive(Clone, Debug, Default)]
pub struct RunCurves {
    pub name: String,
    /// (epoch, loss) of the logged training steps; epochs are fractional.
    pub train_loss: Vec<(f64, f64)>,
    /// (epoch, lr) at the logged training steps.
    pub lr: Vec<(f64, f64)>,
    /// (epoch, mean loss per image) after each epoch's evaluation.
    pub eval_loss: Vec<(f64, f64)>,
    /// (epoch, accuracy in %) after each epoch's evaluation.
    pub accuracy: Vec<(f64, f64)>,
    /// The split evaluated on ("val" or "test").
    pub split: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: line {line}: {reason}")]
    Parse { path: PathBuf, line: usize, reason: String },
    #[error("{path}: no metrics logged yet")]
    Empty { path: PathBuf },
    #[error("{0}")]
    Draw(String),
}

impl RunCurves {
    /// Reads `RUN_DIR/metrics.jsonl`. Training steps are placed at fractional epochs using the
    /// steps per epoch that the first evaluation record implies.
    pub fn read(run_dir: &Path) -> Result<Self, PlotError> {
        let path = run_dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).map_err(|source| PlotError::Io {
            path: path.clone(),
            source,
        })?;
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| PlotError::Parse {
                path: path.clone(),
                line: i + 1,
                reason: e.to_string(),
            })?;
            records.push(v);
        }
        let num = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64());
        let kind = |v: &serde_json::Value| v.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
        // Steps per epoch from the first record that ends an epoch.
        let steps_per_epoch = records
            .iter()
            .filter(|r| kind(r) == "eval" || kind(r) == "epoch")
            .find_map(|r| Some(num(r, "step")? / (num(r, "epoch")? + 1.0)))
            .filter(|s| *s > 0.0);
        let mut c = RunCurves {
            name: run_dir
                .file_name()
                .map_or_else(|| run_dir.display().to_string(), |n| n.to_string_lossy().into_owned()),
            ..Default::default()
        };
        for r in &records {
            match kind(r).as_str() {
                "train" => {
                    let (Some(step), Some(loss)) = (num(r, "step"), num(r, "loss")) else {
                        continue;
                    };
                    let x = match steps_per_epoch {
                        Some(s) => step / s,
                        None => num(r, "epoch").unwrap_or(0.0),
                    };
                    c.train_loss.push((x, loss));
                    if let Some(lr) = num(r, "lr") {
                        c.lr.push((x, lr));
                    }
                }
                "eval" => {
                    let Some(epoch) = num(r, "epoch") else { continue };
                    if let Some(l) = num(r, "loss") {
                        c.eval_loss.push((epoch + 1.0, l));
                    }
                    if let Some(a) = num(r, "accuracy") {
                        c.accuracy.push((epoch + 1.0, 100.0 * a));
                    }
                    c.split = r.get("split").and_then(|s| s.as_str()).map(String::from);
                }
                _ => {}
            }
        }
        if c.train_loss.is_empty() && c.eval_loss.is_empty() {
            return Err(PlotError::Empty { path });
        }
        Ok(c)
    }
}

/// One chart: a title, axis labels and the series to draw from each run.
struct Chart {
    file: &'static str,
    title: String,
    y_label: &'static str,
    series: fn(&RunCurves) -> &[(f64, f64)],
    log_y: bool,
}

/// Matplotlib's ten "tab10" colours: ten runs on one chart before a colour repeats.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

fn register_font() -> Result<(), PlotError> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(PlotError::Draw("the bundled font could not be loaded".into()))
    }
}

/// Writes `train_loss.png`, `eval_loss.png`, `accuracy.png` and `lr.png` into `out` (created
/// if needed); returns the files written. Charts whose series are empty in every run are left out.
pub fn plot(runs: &[RunCurves], out: &Path) -> Result<Vec<PathBuf>, PlotError> {
    register_font()?;
    std::fs::create_dir_all(out).map_err(|source| PlotError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let split = runs
        .iter()
        .find_map(|r| r.split.clone())
        .unwrap_or_else(|| "eval".into());
    let charts = [
        Chart {
            file: "train_loss.png",
            title: "training loss".into(),
            y_label: "loss (batch mean)",
            series: |r| &r.train_loss,
            log_y: false,
        },
        Chart {
            file: "eval_loss.png",
            title: format!("{split} loss"),
            y_label: "loss per image",
            series: |r| &r.eval_loss,
            log_y: false,
        },
        Chart {
            file: "accuracy.png",
            title: format!("{split} accuracy"),
            y_label: "accuracy (%)",
            series: |r| &r.accuracy,
            log_y: false,
        },
        Chart {
            file: "lr.png",
            title: "learning rate".into(),
            y_label: "lr",
            series: |r| &r.lr,
            log_y: true,
        },
    ];
    let mut written = Vec::new();
    for chart in &charts {
        if runs.iter().all(|r| (chart.series)(r).is_empty()) {
            continue;
        }
        let path = out.join(chart.file);
        draw(chart, runs, &path).map_err(|e| PlotError::Draw(format!("{}: {e}", path.display())))?;
        written.push(path);
    }
    Ok(written)
}

fn bounds(chart: &Chart, runs: &[RunCurves]) -> ((f64, f64), (f64, f64)) {
    let points = runs.iter().flat_map(|r| (chart.series)(r).iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points.filter(|(_, y)| y.is_finite() && (!chart.log_y || *y > 0.0)) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    x0 = x0.min(0.0);
    if chart.log_y {
        (y0, y1) = (y0 / 1.5, y1 * 1.5);
    } else {
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        (y0, y1) = (y0 - pad, y1 + pad);
    }
    ((x0, x1), (y0, y1))
}

fn draw(chart: &Chart, runs: &[RunCurves], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let ((x0, x1), (y0, y1)) = bounds(chart, runs);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(&chart.title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72);
    macro_rules! finish {
        ($ctx:expr) => {{
            let mut ctx = $ctx;
            ctx.configure_mesh()
                .x_desc("epoch")
                .y_desc(chart.y_label)
                .label_style(("sans-serif", 15))
                .axis_desc_style(("sans-serif", 17))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()?;
            for (i, run) in runs.iter().enumerate() {
                let colour = COLOURS[i % COLOURS.len()];
                let pts: Vec<(f64, f64)> = (chart.series)(run)
                    .iter()
                    .copied()
                    .filter(|(_, y)| y.is_finite() && (!chart.log_y || *y > 0.0))
                    .collect();
                ctx.draw_series(LineSeries::new(pts, colour.stroke_width(2)))?
                    .label(run.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            }
            if runs.len() > 1 {
                ctx.configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 15))
                    .draw()?;
            }
        }};
    }
    if chart.log_y {
        finish!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale())?);
    } else {
        finish!(builder.build_cartesian_2d(x0..x1, y0..y1)?);
    }
    root.present()?;
    Ok(())
}
