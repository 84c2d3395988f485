//! `conduit top`: a run with a live terminal view (ratatui) instead of a progress bar.
//!
//! The run's watcher hands each snapshot to a [`Live`]; the terminal thread draws the latest ten
//! times a second: an overview with a throughput sparkline, a stage table with depth gauges,
//! rates, lag and p99, end-to-end latency, and the alerts. `q` (or Esc, or Ctrl-C) stops offering
//! orders, lets those offered finish, and quits; the terminal is restored on exit and on panic
//! (`ratatui::init`), and the run's report follows on stdout.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use conduit::Snapshot;
use parking_lot::Mutex;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table};
use ratatui::Frame;

/// Throughput samples the sparkline keeps.
const HISTORY: usize = 240;

/// How often the view redraws and looks for a key.
const TICK: Duration = Duration::from_millis(100);

/// What the view shows: the latest snapshot, the one before (for rates), and a throughput history.
#[derive(Debug, Default)]
pub(crate) struct View {
    latest: Option<Snapshot>,
    previous: Option<Snapshot>,
    /// Events finished per second over all stages, one per snapshot.
    throughput: VecDeque<u64>,
    /// Set once the run's work has all finished.
    pub(crate) finished: bool,
    /// Set once the user asked to stop.
    pub(crate) stopping: bool,
    /// With `--attach`: where the figures come from, and whether it answered last time.
    pub(crate) attached: Option<(String, Result<(), String>)>,
}

impl View {
    /// Takes a new snapshot.
    // Rates to whole events a second for the sparkline.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    pub(crate) fn update(&mut self, snapshot: Snapshot) {
        if let Some(latest) = &self.latest {
            let seconds = snapshot.uptime_s - latest.uptime_s;
            if seconds > 0.0 {
                let events = snapshot.events_processed().saturating_sub(latest.events_processed());
                if self.throughput.len() == HISTORY {
                    self.throughput.pop_front();
                }
                self.throughput.push_back((events as f64 / seconds) as u64);
            }
        }
        self.previous = self.latest.replace(snapshot);
    }

    /// Events a second `stage` finished between the last two snapshots.
    #[allow(clippy::cast_precision_loss)]
    fn stage_rate(&self, index: usize) -> f64 {
        let (Some(latest), Some(previous)) = (&self.latest, &self.previous) else { return 0.0 };
        let seconds = latest.uptime_s - previous.uptime_s;
        match (latest.stages.get(index), previous.stages.get(index)) {
            (Some(now), Some(before)) if seconds > 0.0 => {
                now.processed.saturating_sub(before.processed) as f64 / seconds
            }
            _ => 0.0,
        }
    }
}

/// Draws `view` into `frame`.
pub(crate) fn draw(frame: &mut Frame<'_>, view: &View) {
    let [overview, stages, latency, alerts, help] = Layout::vertical([
        Constraint::Length(7),
        Constraint::Min(6),
        Constraint::Length(3),
        Constraint::Length(7),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    draw_overview(frame, overview, view);
    draw_stages(frame, stages, view);
    draw_latency(frame, latency, view);
    draw_alerts(frame, alerts, view);
    let attached = view.attached.as_ref().map(|(addr, answered)| match answered {
        Ok(()) => format!("attached to {addr}: q quits the view (the run goes on)"),
        Err(why) => format!("{addr} does not answer ({why}): q quits"),
    });
    let state = if let Some(attached) = &attached {
        attached.as_str()
    } else if view.finished {
        "finished: q shows the report"
    } else if view.stopping {
        "stopping: the orders offered are finishing"
    } else {
        "running: q stops offering orders and quits"
    };
    frame
        .render_widget(Paragraph::new(Line::from(vec![Span::styled(" conduit top ", bold()), Span::raw(state)])), help);
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

fn draw_overview(frame: &mut Frame<'_>, area: Rect, view: &View) {
    let [figures, sparkline] = Layout::horizontal([Constraint::Length(44), Constraint::Min(10)]).areas(area);
    let lines = match &view.latest {
        Some(s) => vec![
            Line::from(format!("uptime      {:.1} s", s.uptime_s)),
            Line::from(format!("submitted   {}", s.submitted)),
            Line::from(format!("completed   {}", s.completed)),
            Line::from(format!("in flight   {}", s.in_flight)),
            Line::from(format!("events/s    {}", view.throughput.back().copied().unwrap_or(0))),
        ],
        None => vec![Line::from("starting...")],
    };
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" overview ")),
        figures,
    );
    let data: Vec<u64> = view.throughput.iter().copied().collect();
    frame.render_widget(
        Sparkline::default()
            .block(Block::default().borders(Borders::ALL).title(" events/s "))
            .data(&data)
            .style(Style::default().fg(Color::Cyan)),
        sparkline,
    );
}

/// A queue's fill as a bar of `width` cells.
fn depth_bar(depth: u64, capacity: usize, width: usize) -> String {
    // Bars are a handful of cells: the ratio only needs to be rough.
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let filled = if capacity == 0 { 0 } else { ((depth as f64 / capacity as f64) * width as f64).ceil() as usize };
    let filled = filled.min(width);
    format!("{}{}", "█".repeat(filled), "·".repeat(width - filled))
}

/// Busy workers over the pool's size; for an elastic pool, its bounds and resizes too
/// (`2/5 1-16 +4-1`: 5 workers, 2 busy, between 1 and 16, grown 4 times and shrunk once).
fn pool_cell(stage: &conduit::StageSnapshot) -> String {
    let busy = format!("{}/{}", stage.busy_workers, stage.workers);
    if stage.workers_min == stage.workers_max {
        busy
    } else {
        let (min, max, grown, shrunk) = (stage.workers_min, stage.workers_max, stage.pool_grown, stage.pool_shrunk);
        format!("{busy} {min}-{max} +{grown}-{shrunk}")
    }
}

fn draw_stages(frame: &mut Frame<'_>, area: Rect, view: &View) {
    let header = Row::new([
        "stage",
        "busy/workers",
        "processed",
        "rate/s",
        "queue",
        "depth",
        "lag ms",
        "p99 us",
        "retried",
        "parked",
        "dead",
    ])
    .style(bold());
    let rows: Vec<Row<'_>> = view
        .latest
        .iter()
        .flat_map(|s| s.stages.iter().enumerate())
        .map(|(i, stage)| {
            let lagging = stage.lag_us >= 1_000_000.0;
            Row::new(vec![
                Cell::from(stage.name.clone()),
                Cell::from(pool_cell(stage)),
                Cell::from(stage.processed.to_string()),
                Cell::from(format!("{:.0}", view.stage_rate(i))),
                Cell::from(depth_bar(stage.queue_depth, stage.queue_capacity, 10)),
                Cell::from(stage.queue_depth.to_string()),
                Cell::from(format!("{:.1}", stage.lag_us / 1_000.0)).style(if lagging {
                    Style::default().fg(Color::Red)
                } else {
                    Style::default()
                }),
                Cell::from(format!("{:.1}", stage.latency_us.p99)),
                Cell::from(stage.retried.to_string()),
                Cell::from(stage.retry_parked.to_string()),
                Cell::from(stage.dead_lettered.to_string()),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(13),
        Constraint::Length(14),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(6),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(6),
    ];
    frame.render_widget(
        Table::new(rows, widths).header(header).block(Block::default().borders(Borders::ALL).title(" stages ")),
        area,
    );
}

fn draw_latency(frame: &mut Frame<'_>, area: Rect, view: &View) {
    let text = match view.latest.as_ref().and_then(|s| s.end_to_end_us) {
        Some(e) if e.count > 0 => format!(
            "p50 {:.1} us   p90 {:.1} us   p99 {:.1} us   p99.9 {:.1} us   max {:.1} us   ({} messages)",
            e.p50, e.p90, e.p99, e.p999, e.max, e.count
        ),
        _ => "no message finished yet".to_owned(),
    };
    frame.render_widget(Paragraph::new(text).block(Block::default().borders(Borders::ALL).title(" end to end ")), area);
}

fn draw_alerts(frame: &mut Frame<'_>, area: Rect, view: &View) {
    let mut lines = Vec::new();
    if let Some(s) = &view.latest {
        let dead: u64 = s.stages.iter().map(|stage| stage.dead_lettered).sum();
        lines.push(Line::from(format!(
            "{} fired, {} resolved, {} firing; dead letters {dead}",
            s.alerts.fired_total,
            s.alerts.resolved_total,
            s.alerts.firing.len()
        )));
        for alert in &s.alerts.firing {
            lines.push(Line::styled(
                format!("FIRING {} on {}: {:.4} over {}", alert.rule.name(), alert.stage, alert.value, alert.threshold),
                Style::default().fg(Color::Red),
            ));
        }
        for event in s.alerts.recent.iter().rev().filter(|e| !e.firing).take(3) {
            lines.push(Line::from(format!(
                "resolved {} on {} at {:.1} s",
                event.alert.rule.name(),
                event.alert.stage,
                event.at_s
            )));
        }
    }
    frame.render_widget(Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" alerts ")), area);
}

/// The view shared between the run's watcher (which feeds it) and the terminal (which draws it).
#[derive(Debug, Default)]
pub(crate) struct Live {
    view: Mutex<View>,
    /// Set by `q`: the run offers no more orders.
    pub(crate) stop: AtomicBool,
}

impl Live {
    /// A snapshot from the run's watcher; `last` once the run's work has finished.
    pub(crate) fn push(&self, snapshot: Snapshot, last: bool) {
        let mut view = self.view.lock();
        view.update(snapshot);
        view.finished |= last;
    }

    /// Draws until the user quits and `done` says the run has returned.
    pub(crate) fn show(&self, done: &dyn Fn() -> bool) -> std::io::Result<()> {
        let mut terminal = ratatui::init();
        let shown = self.show_on(&mut terminal, done);
        ratatui::restore();
        shown
    }

    fn show_on(&self, terminal: &mut ratatui::DefaultTerminal, done: &dyn Fn() -> bool) -> std::io::Result<()> {
        loop {
            {
                let mut view = self.view.lock();
                // A run that returned without a final snapshot (poisoned) is over too.
                view.finished |= done();
                terminal.draw(|frame| draw(frame, &view))?;
            }
            if event::poll(TICK)? {
                if let Event::Key(key) = event::read()? {
                    let quit = key.kind == KeyEventKind::Press && is_quit(key.code, key.modifiers);
                    if quit {
                        self.stop.store(true, Ordering::Release);
                        self.view.lock().stopping = true;
                    }
                }
            }
            if self.stop.load(Ordering::Acquire) && done() {
                return Ok(());
            }
        }
    }
}

/// `conduit top`: a run of its own, or `--attach` to one started elsewhere.
#[derive(Debug, clap::Args)]
pub(crate) struct TopArgs {
    /// Watch a `conduit run` started elsewhere with `--metrics-addr ADDR` (which serves its
    /// snapshot at `/snapshot`) instead of running one here; q quits the view, the run goes on.
    #[arg(long, value_name = "ADDR")]
    pub(crate) attach: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub(crate) run: crate::runcmd::RunArgs,
}

/// `conduit top --attach ADDR`: draws the snapshots `ADDR/snapshot` serves until `q`.
pub(crate) fn attach(addr: std::net::SocketAddr) -> Result<std::process::ExitCode, crate::Failure> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return Err(crate::UsageError("conduit top draws on a terminal: run it in one".into()).into());
    }
    let url = format!("http://{addr}/snapshot");
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(1)).build();
    let fetch = || -> Result<Snapshot, String> {
        let body = agent.get(&url).call().map_err(|e| e.to_string())?.into_string().map_err(|e| e.to_string())?;
        serde_json::from_str(&body).map_err(|e| format!("not a snapshot: {e}"))
    };
    let mut view = View { attached: Some((addr.to_string(), Ok(()))), ..View::default() };
    let mut terminal = ratatui::init();
    let shown = (|| -> std::io::Result<()> {
        loop {
            let answered = fetch().map(|snapshot| view.update(snapshot));
            view.attached = Some((addr.to_string(), answered));
            terminal.draw(|frame| draw(frame, &view))?;
            if event::poll(TICK)? {
                if let Event::Key(key) = event::read()? {
                    if key.kind == KeyEventKind::Press && is_quit(key.code, key.modifiers) {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    shown.map_err(|e| crate::Failure::Run(format!("the terminal failed: {e}")))?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// `q`, Esc or Ctrl-C.
fn is_quit(code: KeyCode, modifiers: KeyModifiers) -> bool {
    matches!(code, KeyCode::Char('q') | KeyCode::Esc)
        || (code == KeyCode::Char('c') && modifiers.contains(KeyModifiers::CONTROL))
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::*;

    fn screen(view: &View) -> String {
        let mut terminal = Terminal::new(TestBackend::new(110, 32)).expect("a test terminal");
        terminal.draw(|frame| draw(frame, view)).expect("draws");
        let buffer = terminal.backend().buffer().clone();
        let width = buffer.area.width as usize;
        buffer
            .content
            .chunks(width)
            .map(|row| row.iter().map(ratatui::buffer::Cell::symbol).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn snapshot(engine: &conduit::Engine<conduit_orders::OrderEvent>) -> Snapshot {
        engine.snapshot()
    }

    #[test]
    fn the_view_shows_each_stage_the_rates_and_the_alerts_of_a_real_run() {
        let pipeline = conduit_orders::OrderPipeline::start(
            &conduit::EngineConfig::default(),
            &conduit_orders::SimConfig { payment_failure_rate: 0.3, ..conduit_orders::SimConfig::default() },
        )
        .expect("starts");
        let mut view = View::default();
        assert!(screen(&view).contains("starting..."));
        view.update(snapshot(pipeline.engine()));
        pipeline.submit_many(conduit_orders::Workload::new(7, 100, 1_000).take(20_000)).expect("accepted");
        while pipeline.engine().in_flight() > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(20));
        let last = snapshot(pipeline.engine());
        let payment = last.stage("payment").expect("payment");
        let (processed, retried) = (payment.processed, payment.retried);
        assert!(retried > 0, "a third of the charges failed once");
        let fired = last.alerts.fired_total;
        view.update(last);
        let text = screen(&view);
        for stage in ["order", "payment", "inventory", "email", "sms", "shipping", "compensation"] {
            assert!(text.contains(stage), "{stage} in\n{text}");
        }
        let row = text.lines().find(|l| l.trim_start_matches('│').starts_with("payment")).expect("a payment row");
        let cells: Vec<&str> = row.trim_matches('│').split_whitespace().collect();
        assert_eq!(cells[2], processed.to_string(), "payment's processed in {row}");
        assert_eq!(cells[8], retried.to_string(), "payment's retries in {row}");
        assert!(text.contains("submitted   20000"), "{text}");
        assert!(text.contains("FIRING error_rate on payment"), "{text}");
        assert!(text.contains(&format!("{fired} fired")), "{text}");
        assert!(text.contains("p99.9"), "end to end in\n{text}");
        assert!(text.contains("running: q stops"), "{text}");
        view.finished = true;
        assert!(screen(&view).contains("finished: q shows the report"));
        // An elastic pool shows its bounds and resizes beside its busy workers.
        let mut latest = view.latest.take().expect("a snapshot");
        let email = latest.stages.iter_mut().find(|s| s.name == "email").expect("email");
        (email.busy_workers, email.workers, email.workers_min, email.workers_max) = (2, 5, 1, 16);
        (email.pool_grown, email.pool_shrunk) = (4, 1);
        view.latest = Some(latest);
        let text = screen(&view);
        let row = text.lines().find(|l| l.trim_start_matches('│').starts_with("email")).expect("an email row");
        assert!(row.contains("2/5 1-16 +4-1"), "{row}");
        pipeline.finish();
    }

    #[test]
    fn depth_bars_fill_with_the_queue() {
        assert_eq!(depth_bar(0, 100, 10), "··········");
        assert_eq!(depth_bar(50, 100, 10), "█████·····");
        assert_eq!(depth_bar(100, 100, 10), "██████████");
        assert_eq!(depth_bar(500, 100, 10), "██████████");
        assert_eq!(depth_bar(5, 0, 4), "····");
    }
}
