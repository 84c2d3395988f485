//! `conduit tune`: throughput experiments over pool sizes and batch sizes. The order pipeline
//! (with the simulated world of a configuration file: port latencies, failure rates) runs a few
//! times per point, each run a `conduit run` process of its own; a grid of one pool size and one
//! batch size for every stage comes first, then each stage's pool size and batch size alone,
//! from the best point so far, then the best point again. Every point's throughput and end-to-end
//! p99 are reported, the frontier between them can be drawn, and the best point is written as a
//! topology file that `conduit run --topology` takes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use conduit::EngineSettings;
use conduit_orders::{self as orders, names};
use plotters::prelude::*;
use serde::Serialize;

use crate::{read_config, read_topology, Failure, Format, UsageError};

/// A stage's pool must beat the best so far by this much to replace it: runs on a shared machine
/// differ by a few percent.
const BETTER_BY: f64 = 1.03;

#[derive(Debug, clap::Args)]
pub(crate) struct TuneArgs {
    /// Orders each point runs.
    #[arg(long, default_value_t = 300_000)]
    orders: u64,
    /// Pool sizes to try, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// Batch sizes to try, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    batches: Vec<usize>,
    /// Runs of each point: its figures are those of the run with the median throughput.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// TOML file with `[engine]` and `[simulation]` tables: the engine's other settings and the
    /// simulated world every point runs in.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Topology file whose bindings and stages ordered by key every point keeps (its `[engine]`
    /// table is laid over the configuration's, as for `run`).
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// Where to write the best point, as a topology file for `conduit run --topology`.
    #[arg(long, value_name = "FILE", default_value = "tuned.toml")]
    out: PathBuf,
    /// Draw every point's throughput against its end-to-end p99, the frontier joined, into
    /// this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

/// One point of the experiment.
#[derive(Debug, Clone, Serialize)]
struct Point {
    /// `grid` (the same pool and batch size in every stage), `stage` (one stage's pool or
    /// batch size changed from the best so far) or `confirm` (the best point measured again).
    phase: &'static str,
    /// Pool size by stage.
    workers: BTreeMap<String, usize>,
    /// Batch size by stage.
    batch_events_max: BTreeMap<String, usize>,
    orders_per_sec: f64,
    /// End-to-end latency (accepted to finished), microseconds.
    end_to_end_p50_us: f64,
    end_to_end_p99_us: f64,
    /// No other point has both more throughput and a lower p99.
    frontier: bool,
}

#[derive(Debug, Serialize)]
struct TuneReport {
    orders_per_point: u64,
    points: Vec<Point>,
    /// Index of the best point (the one with the most orders a second, measured again: the
    /// last point).
    best: usize,
    /// The topology file written with the best point.
    topology: PathBuf,
}

pub(crate) fn tune(args: &TuneArgs) -> Result<ExitCode, Failure> {
    check(args)?;
    let mut file = read_config(args.config.as_deref())?;
    let topology = args.topology.as_deref().map(read_topology).transpose()?.unwrap_or_default();
    if let Some(engine) = &topology.engine {
        file.engine.overlay(engine);
    }
    // A bad configuration, or a size the engine does not take, is refused before the first
    // point runs.
    file.validate().map_err(|e| UsageError(e.to_string()))?;
    let pools = args.workers.iter().map(|&w| (w, args.batches[0]));
    for (w, b) in pools.chain(args.batches.iter().map(|&b| (args.workers[0], b))) {
        let mut sized = file.clone();
        (sized.engine.workers, sized.engine.batch_events_max) = (Some(w.into()), Some(b));
        sized.engine.stages.clear();
        sized.validate().map_err(|e| UsageError(format!("a size to try: {e}")))?;
    }
    // Each point runs as `conduit run --topology` on a scratch file beside the output: in a
    // process of its own, as the written topology will run again.
    let scratch = Scratch(args.out.with_extension("point.toml"));
    let run = |phase, workers: &BTreeMap<String, usize>, batches: &BTreeMap<String, usize>| {
        std::fs::write(&scratch.0, topology_text(&with_sizes(&topology, workers, batches), None)?)
            .map_err(|e| Failure::Run(format!("cannot write {}: {e}", scratch.0.display())))?;
        let runs = (0..args.repeat).map(|_| run_once(args, &scratch.0)).collect::<Result<Vec<_>, _>>()?;
        Ok::<_, Failure>(Point::from_median(phase, workers, batches, runs))
    };
    let uniform = |value: usize| names::ALL.iter().map(|s| ((*s).to_owned(), value)).collect::<BTreeMap<_, _>>();

    let mut points = Vec::new();
    for &w in &args.workers {
        for &b in &args.batches {
            eprintln!("tune: every stage {w} workers, batches of {b}");
            points.push(run("grid", &uniform(w), &uniform(b))?);
        }
    }
    let mut best = index_of_best(&points);
    for stage in names::ALL {
        // The stage's other pool sizes, then its other batch sizes, each from the best so far.
        let tries = args.workers.iter().map(|&w| (Some(w), None)).chain(args.batches.iter().map(|&b| (None, Some(b))));
        for (w, b) in tries {
            let (mut workers, mut batches) = (points[best].workers.clone(), points[best].batch_events_max.clone());
            let now = (workers[stage], batches[stage]);
            let next = (w.unwrap_or(now.0), b.unwrap_or(now.1));
            if next == now {
                continue;
            }
            workers.insert(stage.to_owned(), next.0);
            batches.insert(stage.to_owned(), next.1);
            eprintln!("tune: {stage} {} workers, batches of {}", workers[stage], batches[stage]);
            let point = run("stage", &workers, &batches)?;
            let improves = point.orders_per_sec > points[best].orders_per_sec * BETTER_BY;
            points.push(point);
            if improves {
                best = points.len() - 1;
            }
        }
    }
    // The best of many noisy points is likely one measured high: measured again, its figures
    // are what running the written topology gives.
    eprintln!("tune: the best point again");
    let confirmed = run("confirm", &points[best].workers.clone(), &points[best].batch_events_max.clone())?;
    points.push(confirmed);
    let best = points.len() - 1;
    mark_frontier(&mut points);
    let best_topology = with_sizes(&topology, &points[best].workers, &points[best].batch_events_max);
    std::fs::write(&args.out, topology_text(&best_topology, Some((&points[best], &args.out)))?)
        .map_err(|e| Failure::Run(format!("cannot write {}: {e}", args.out.display())))?;
    if let Some(path) = &args.plot {
        plot(path, &points, best).map_err(Failure::Run)?;
    }
    let report = TuneReport { orders_per_point: args.orders, points, best, topology: args.out.clone() };
    print(&report, args.format).map_err(|e| Failure::Run(format!("cannot write the report: {e}")))?;
    Ok(ExitCode::SUCCESS)
}

/// The scratch topology of the point running, removed however the tune ends (best effort: it
/// is only a copy of some point's topology).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

fn check(args: &TuneArgs) -> Result<(), UsageError> {
    if args.orders == 0 {
        return Err(UsageError("--orders must be at least 1".into()));
    }
    if args.repeat == 0 {
        return Err(UsageError("--repeat must be at least 1".into()));
    }
    for (flag, values) in [("--workers", &args.workers), ("--batches", &args.batches)] {
        if values.is_empty() || values.contains(&0) {
            return Err(UsageError(format!("{flag} takes sizes of at least 1, comma-separated")));
        }
    }
    Ok(())
}

/// One run's figures: orders a second, end-to-end p50 and p99 in microseconds.
type Figures = (f64, f64, f64);

/// Runs `conduit run --orders N --topology TOPOLOGY --format json` (with the configuration file,
/// if any) in a process of its own; its figures.
fn run_once(args: &TuneArgs, topology: &Path) -> Result<Figures, Failure> {
    let exe = std::env::current_exe().map_err(|e| Failure::Run(format!("cannot find this program: {e}")))?;
    let mut command = std::process::Command::new(exe);
    command.args(["run", "--quiet", "--format", "json", "--orders", &args.orders.to_string(), "--topology"]);
    command.arg(topology).env("RUST_LOG", "error");
    if let Some(config) = &args.config {
        command.arg("--config").arg(config);
    }
    let output = command.output().map_err(|e| Failure::Run(format!("cannot start a run: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Failure::Run(format!("a run failed ({}): {}", output.status, stderr.trim())));
    }
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| Failure::Run(format!("a run's report is not JSON: {e}")))?;
    let figure = |pointer: &str| {
        report
            .pointer(pointer)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| Failure::Run(format!("a run's report lacks {pointer}")))
    };
    Ok((figure("/orders_per_sec")?, figure("/end_to_end_us/p50")?, figure("/end_to_end_us/p99")?))
}

impl Point {
    /// The point's figures: those of the run with the median throughput.
    fn from_median(
        phase: &'static str,
        workers: &BTreeMap<String, usize>,
        batches: &BTreeMap<String, usize>,
        mut runs: Vec<Figures>,
    ) -> Self {
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (orders_per_sec, p50, p99) = runs[runs.len() / 2];
        Self {
            phase,
            workers: workers.clone(),
            batch_events_max: batches.clone(),
            orders_per_sec,
            end_to_end_p50_us: p50,
            end_to_end_p99_us: p99,
            frontier: false,
        }
    }
}

/// The point with the most orders a second (the first of equals).
fn index_of_best(points: &[Point]) -> usize {
    (0..points.len()).fold(0, |best, i| if points[i].orders_per_sec > points[best].orders_per_sec { i } else { best })
}

/// Marks the points no other point beats on both throughput and p99.
fn mark_frontier(points: &mut [Point]) {
    let dominated: Vec<bool> = points
        .iter()
        .map(|p| {
            points.iter().any(|q| {
                q.orders_per_sec >= p.orders_per_sec
                    && q.end_to_end_p99_us <= p.end_to_end_p99_us
                    && (q.orders_per_sec > p.orders_per_sec || q.end_to_end_p99_us < p.end_to_end_p99_us)
            })
        })
        .collect();
    for (point, dominated) in points.iter_mut().zip(dominated) {
        point.frontier = !dominated;
    }
}

/// `topology` with every stage's pool and batch size set in its `[engine]` table.
fn with_sizes(
    topology: &orders::TopologyFile,
    workers: &BTreeMap<String, usize>,
    batches: &BTreeMap<String, usize>,
) -> orders::TopologyFile {
    let mut topology = topology.clone();
    let engine = topology.engine.get_or_insert_with(EngineSettings::default);
    for stage in names::ALL {
        let settings = engine.stages.entry(stage.to_owned()).or_default();
        settings.workers = Some(workers[stage].into());
        settings.batch_events_max = Some(batches[stage]);
    }
    topology
}

/// A topology file's text; for the best point, headed by its figures and how to run it.
fn topology_text(topology: &orders::TopologyFile, best: Option<(&Point, &Path)>) -> Result<String, Failure> {
    let body = topology.to_toml_string().map_err(|e| Failure::Run(format!("cannot write the topology: {e}")))?;
    Ok(match best {
        Some((point, path)) => format!(
            "# Written by `conduit tune`: its best point, {:.0} orders/s, end-to-end p99 {:.1} ms.\n\
             # Run it again with `conduit run --topology {}`.\n\n{body}",
            point.orders_per_sec,
            point.end_to_end_p99_us / 1_000.0,
            path.display()
        ),
        None => body,
    })
}

fn print(report: &TuneReport, format: Format) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, report)?;
            writeln!(out)
        }
        Format::Human => {
            writeln!(
                out,
                "{} orders a point; pools and batches by stage in the order {}",
                report.orders_per_point,
                names::ALL.join(", ")
            )?;
            writeln!(
                out,
                "{:>3}  {:<7}  {:<16}  {:<34}  {:>10}  {:>10}  {:>10}",
                "#", "phase", "workers", "batch_events_max", "orders/s", "p50 ms", "p99 ms"
            )?;
            for (i, p) in report.points.iter().enumerate() {
                let list = |m: &BTreeMap<String, usize>| {
                    names::ALL.iter().map(|s| m[*s].to_string()).collect::<Vec<_>>().join(",")
                };
                let mark = match (i == report.best, p.frontier) {
                    (true, _) => "  best",
                    (false, true) => "  frontier",
                    (false, false) => "",
                };
                writeln!(
                    out,
                    "{i:>3}  {:<7}  {:<16}  {:<34}  {:>10.0}  {:>10.2}  {:>10.2}{mark}",
                    p.phase,
                    list(&p.workers),
                    list(&p.batch_events_max),
                    p.orders_per_sec,
                    p.end_to_end_p50_us / 1_000.0,
                    p.end_to_end_p99_us / 1_000.0,
                )?;
            }
            writeln!(out, "best: point {}, written to {}", report.best, report.topology.display())
        }
    }
}

/// Every point as throughput against end-to-end p99, the frontier joined by a line and the best
/// point ringed.
fn plot(path: &Path, points: &[Point], best: usize) -> Result<(), String> {
    let draw = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let xy = |p: &Point| (p.end_to_end_p99_us / 1_000.0, p.orders_per_sec);
    let x_max = points.iter().map(|p| xy(p).0).fold(0.0, f64::max).max(0.001) * 1.1;
    let y_max = points.iter().map(|p| xy(p).1).fold(0.0, f64::max).max(1.0) * 1.1;
    let root = SVGBackend::new(path, (1024, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("conduit tune: throughput against end-to-end p99", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(88)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("end-to-end p99 (ms)")
        .y_desc("orders/s")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| draw(&e))?;
    chart
        .draw_series(points.iter().map(|p| Circle::new(xy(p), 4, BLUE.mix(0.6).filled())))
        .map_err(|e| draw(&e))?
        .label("point")
        .legend(|(x, y)| Circle::new((x + 10, y), 4, BLUE.mix(0.6).filled()));
    let mut frontier: Vec<(f64, f64)> = points.iter().filter(|p| p.frontier).map(xy).collect();
    frontier.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart
        .draw_series(LineSeries::new(frontier, RED.stroke_width(2)))
        .map_err(|e| draw(&e))?
        .label("frontier")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .draw_series(std::iter::once(Circle::new(xy(&points[best]), 9, BLACK.stroke_width(2))))
        .map_err(|e| draw(&e))?
        .label("best")
        .legend(|(x, y)| Circle::new((x + 10, y), 6, BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))
}
