//! `conduit run --hdr-out DIR` and `--plot FILE.svg`: a run's latency histograms as
//! `HdrHistogram` percentile-distribution files (the text `HdrHistogram`'s own plotter reads) and as
//! one SVG of percentile curves, a curve per stage plus end to end.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use conduit::LatencyHistograms;
use hdrhistogram::Histogram;
use plotters::prelude::*;

/// Reporting steps per halving of the distance to 100%, as in `HdrHistogram`'s own output.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// Nanoseconds per microsecond: the files and the plot are in microseconds.
const NS_PER_US: f64 = 1_000.0;

/// The non-empty histograms to write, by name: each stage's, then `end_to_end`.
fn named(latency: &LatencyHistograms) -> Vec<(&str, &Histogram<u64>)> {
    let stages = latency.stages.iter().map(|(name, histogram, _)| (name.as_str(), histogram));
    stages.chain(latency.end_to_end.iter().map(|h| ("end_to_end", h))).filter(|(_, h)| !h.is_empty()).collect()
}

/// Writes `DIR/<stage>.hgrm` and `DIR/end_to_end.hgrm`; returns the paths written.
pub(crate) fn write_hdr_dir(dir: &Path, latency: &LatencyHistograms) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (name, histogram) in named(latency) {
        let path = dir.join(format!("{name}.hgrm"));
        let mut out = io::BufWriter::new(std::fs::File::create(&path)?);
        write_percentiles(&mut out, histogram)?;
        out.flush()?;
        written.push(path);
    }
    Ok(written)
}

/// `HdrHistogram`'s percentile distribution of `histogram` (ns), values in microseconds.
// Counts and values to f64 for printing: exact below 2^53.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn write_percentiles(out: &mut impl Write, histogram: &Histogram<u64>) -> io::Result<()> {
    writeln!(out, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)")?;
    let mut total = 0u64;
    for step in histogram.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
        total += step.count_since_last_iteration();
        let value = step.value_iterated_to() as f64 / NS_PER_US;
        let quantile = step.quantile_iterated_to();
        if quantile < 1.0 {
            writeln!(out, "{value:12.3} {quantile:2.12} {total:10} {:14.2}", 1.0 / (1.0 - quantile))?;
        } else {
            writeln!(out, "{value:12.3} {quantile:2.12} {total:10}")?;
        }
    }
    // The histogram's sub-buckets per bucket: the power of two that holds its precision.
    let sub_buckets = (2 * 10u64.pow(u32::from(histogram.sigfig()))).next_power_of_two();
    writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        histogram.mean() / NS_PER_US,
        histogram.stdev() / NS_PER_US
    )?;
    writeln!(out, "#[Max     = {:12.3}, Total count    = {:12}]", histogram.max() as f64 / NS_PER_US, histogram.len())?;
    writeln!(out, "#[Buckets = {:12}, SubBuckets     = {:12}]", histogram.buckets(), sub_buckets)
}

/// The curve of one histogram: `(1 / (1 - percentile), microseconds)`, 100% left out.
#[allow(clippy::cast_precision_loss)]
fn curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    histogram
        .iter_quantiles(TICKS_PER_HALF_DISTANCE)
        .filter(|step| step.quantile_iterated_to() < 1.0)
        .map(|step| {
            (1.0 / (1.0 - step.quantile_iterated_to()), (step.value_iterated_to() as f64 / NS_PER_US).max(0.001))
        })
        .collect()
}

/// Draws the percentile curves of every histogram into an SVG at `path`.
pub(crate) fn plot_svg(path: &Path, latency: &LatencyHistograms) -> Result<(), String> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> = named(latency).into_iter().map(|(n, h)| (n, curve(h))).collect();
    let x_max = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.0)).fold(10.0, f64::max) * 1.5;
    let (y_min, y_max) = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (y_min, y_max) = if y_max > 0.0 { (y_min / 2.0, y_max * 2.0) } else { (0.001, 1.0) };
    let root = SVGBackend::new(path, (1024, 640)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("latency by percentile", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((1.0..x_max).log_scale(), (y_min..y_max).log_scale())
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (us)")
        .x_label_formatter(&|x| format!("{}%", percentile_label(*x)))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(|e| draw(&e))?;
    for (i, (name, points)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))
}

/// `1 / (1 - p)` as a percentile: 10 is 90, 1000 is 99.9.
fn percentile_label(x: f64) -> String {
    let percentile = (1.0 - 1.0 / x) * 100.0;
    let text = format!("{percentile:.4}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels_read_as_percentiles() {
        assert_eq!(percentile_label(1.0), "0");
        assert_eq!(percentile_label(10.0), "90");
        assert_eq!(percentile_label(1_000.0), "99.9");
    }
}
