//! `apm monitor` on a terminal: an interactive view (ratatui) of the
//! workers with their CPU and memory over the last minutes, the selected
//! worker's log as it is written, and keys that start, stop and restart
//! it and filter the list. Piped, or with `--count`, `commands::monitor`
//! prints frames of lines instead.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use apm_runtime::process::supervisor::WorkerStatus;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table, TableState};

use crate::client::{self, Place};
use crate::commands::{Followed, human_bytes, log_source};
use crate::exit;
use crate::protocol::Call;

/// Samples kept per worker for its sparklines.
const KEEP: usize = 60;
/// Log lines kept for the log pane.
const LOG_KEEP: usize = 500;
/// How often the log pane looks for new lines.
const LOG_EVERY: Duration = Duration::from_millis(250);

struct Monitor {
    workers: Vec<WorkerStatus>,
    daemon_line: String,
    /// CPU (percent) and memory (bytes) samples per worker, oldest first.
    history: HashMap<String, VecDeque<(f64, u64)>>,
    selected: Option<String>,
    filter: String,
    typing_filter: bool,
    log: Option<(String, Followed)>,
    lines: VecDeque<String>,
    /// The outcome of the last key's action, or the daemon's silence.
    message: String,
}

/// Runs until `q`, Esc or Ctrl-C; the exit code.
pub fn interactive(place: &Place, interval: Duration) -> u8 {
    let mut monitor = Monitor {
        workers: Vec::new(),
        daemon_line: String::new(),
        history: HashMap::new(),
        selected: None,
        filter: String::new(),
        typing_filter: false,
        log: None,
        lines: VecDeque::new(),
        message: String::new(),
    };
    let mut terminal = ratatui::init();
    let mut next_poll = Instant::now();
    let mut next_log = Instant::now();
    let outcome = loop {
        let now = Instant::now();
        if now >= next_poll {
            monitor.poll(place);
            next_poll = now + interval;
        }
        if now >= next_log {
            monitor.follow();
            next_log = now + LOG_EVERY;
        }
        if let Err(e) = terminal.draw(|frame| monitor.draw(frame, interval)) {
            break Err(e);
        }
        let wait = next_poll
            .min(next_log)
            .saturating_duration_since(Instant::now());
        match event::poll(wait) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => break Err(e),
        }
        match event::read() {
            Ok(Event::Key(key)) if key.kind == KeyEventKind::Press => {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c
                    || (!monitor.typing_filter
                        && matches!(key.code, KeyCode::Char('q') | KeyCode::Esc))
                {
                    break Ok(());
                }
                if monitor.key(place, key.code) {
                    next_poll = Instant::now();
                }
            }
            Ok(_) => {}
            Err(e) => break Err(e),
        }
    };
    ratatui::restore();
    match outcome {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("apm: monitor: {e}");
            exit::FAILED
        }
    }
}

impl Monitor {
    fn poll(&mut self, place: &Place) {
        let response = match client::call(place, Call::List, false) {
            Ok(response) if response.ok => response,
            Ok(response) => {
                self.message = response.error.unwrap_or_default();
                return;
            }
            Err(failure) => {
                self.message = failure.message;
                return;
            }
        };
        let daemon = &response.data["daemon"];
        self.daemon_line = format!(
            "daemon pid {} using {}",
            daemon["pid"],
            human_bytes(daemon["memory_bytes"].as_u64().unwrap_or_default())
        );
        self.workers = serde_json::from_value(response.data["workers"].clone()).unwrap_or_default();
        for worker in &self.workers {
            let samples = self.history.entry(worker.name.clone()).or_default();
            let cpu = worker.instances.iter().map(|i| i.cpu_percent).sum();
            let memory = worker.instances.iter().map(|i| i.memory_bytes).sum();
            samples.push_back((cpu, memory));
            while samples.len() > KEEP {
                samples.pop_front();
            }
        }
        let names: Vec<String> = self.shown().map(|w| w.name.clone()).collect();
        if self.selected.as_ref().is_none_or(|s| !names.contains(s)) {
            self.selected = names.first().cloned();
        }
    }

    /// The workers the filter lets through.
    fn shown(&self) -> impl Iterator<Item = &WorkerStatus> {
        self.workers
            .iter()
            .filter(|w| w.name.contains(self.filter.as_str()))
    }

    /// The selected worker's new log lines; a new selection starts from its last lines.
    fn follow(&mut self) {
        let Some(name) = self.selected.clone() else {
            self.log = None;
            self.lines.clear();
            return;
        };
        if self
            .log
            .as_ref()
            .is_none_or(|(followed, _)| *followed != name)
        {
            let Some(worker) = self.workers.iter().find(|w| w.name == name) else {
                return;
            };
            let (path, only) = log_source(worker, false);
            let (followed, last) = Followed::open(path, only, LOG_KEEP);
            self.lines = last.into();
            self.log = Some((name, followed));
            return;
        }
        if let Some((_, followed)) = &mut self.log {
            let lines = &mut self.lines;
            followed.read_new(|line| {
                lines.push_back(line.to_owned());
                if lines.len() > LOG_KEEP {
                    lines.pop_front();
                }
            });
        }
    }

    /// Handles a key; whether the list should be asked for again now.
    fn key(&mut self, place: &Place, code: KeyCode) -> bool {
        if self.typing_filter {
            match code {
                KeyCode::Enter => self.typing_filter = false,
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            return true;
        }
        let names: Vec<String> = self.shown().map(|w| w.name.clone()).collect();
        let at = self
            .selected
            .as_ref()
            .and_then(|s| names.iter().position(|n| n == s));
        let move_to = |index: usize| names.get(index).cloned();
        match code {
            KeyCode::Down | KeyCode::Char('j') => {
                let next = at.map_or(0, |i| (i + 1).min(names.len().saturating_sub(1)));
                self.selected = move_to(next).or(self.selected.take());
                false
            }
            KeyCode::Up | KeyCode::Char('k') => {
                self.selected =
                    move_to(at.map_or(0, |i| i.saturating_sub(1))).or(self.selected.take());
                false
            }
            KeyCode::Char('/') => {
                self.typing_filter = true;
                false
            }
            KeyCode::Char(verb @ ('r' | 's' | 'x')) => {
                let Some(name) = self.selected.clone() else {
                    return false;
                };
                let (call, done) = match verb {
                    'r' => (
                        Call::Restart {
                            name: name.clone(),
                            index: None,
                            force: false,
                        },
                        "restarted",
                    ),
                    's' => (
                        Call::Start {
                            name: name.clone(),
                            index: None,
                        },
                        "started",
                    ),
                    _ => (
                        Call::Stop {
                            name: name.clone(),
                            index: None,
                        },
                        "stopped",
                    ),
                };
                self.message = match client::call(place, call, false) {
                    Ok(response) if response.ok => format!("{name} {done}"),
                    Ok(response) => response.error.unwrap_or_default(),
                    Err(failure) => failure.message,
                };
                true
            }
            _ => false,
        }
    }

    fn draw(&self, frame: &mut ratatui::Frame, interval: Duration) {
        let [top, list, log, help] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Percentage(50),
            Constraint::Min(3),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        frame.render_widget(
            Line::from(format!(
                "apm monitor — {} worker(s), {}, every {:?}   {}",
                self.workers.len(),
                self.daemon_line,
                interval,
                self.message
            )),
            top,
        );
        let rows: Vec<Row> = self
            .shown()
            .map(|w| {
                let samples = self.history.get(&w.name);
                let cpu: Vec<f64> = samples.map_or(Vec::new(), |s| s.iter().map(|s| s.0).collect());
                let memory: Vec<f64> =
                    samples.map_or(Vec::new(), |s| s.iter().map(|s| s.1 as f64).collect());
                let (now_cpu, now_memory) =
                    samples.and_then(|s| s.back()).copied().unwrap_or_default();
                let pids: Vec<String> = w
                    .instances
                    .iter()
                    .map(|i| i.pid.map_or("-".to_owned(), |p| p.to_string()))
                    .collect();
                let colour = match w.status.as_str() {
                    "running" => Color::Green,
                    "crashed" | "errored" => Color::Red,
                    "stopped" | "exited" => Color::DarkGray,
                    _ => Color::Yellow,
                };
                Row::new(vec![
                    w.name.clone().into(),
                    Line::styled(w.status.clone(), Style::new().fg(colour)),
                    pids.join(",").into(),
                    format!("{now_cpu:.1}%").into(),
                    spark(&cpu, 20).into(),
                    human_bytes(now_memory).into(),
                    spark(&memory, 20).into(),
                    w.instances
                        .iter()
                        .map(|i| i.restarts)
                        .sum::<u32>()
                        .to_string()
                        .into(),
                ])
            })
            .collect();
        let selected = self
            .selected
            .as_ref()
            .and_then(|s| self.shown().position(|w| w.name == *s));
        let table = Table::new(
            rows,
            [
                Constraint::Min(12),
                Constraint::Length(9),
                Constraint::Length(14),
                Constraint::Length(7),
                Constraint::Length(20),
                Constraint::Length(9),
                Constraint::Length(20),
                Constraint::Length(8),
            ],
        )
        .header(
            Row::new([
                "worker",
                "status",
                "pid",
                "cpu",
                "cpu, last min",
                "memory",
                "memory, last min",
                "restarts",
            ])
            .style(Style::new().add_modifier(Modifier::BOLD)),
        )
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("▶ ")
        .block(Block::bordered().title(if self.filter.is_empty() {
            " workers ".to_owned()
        } else {
            format!(" workers matching “{}” ", self.filter)
        }));
        let mut state = TableState::default().with_selected(selected);
        frame.render_stateful_widget(table, list, &mut state);
        let height = log.height.saturating_sub(2) as usize;
        let text: Vec<Line> = self
            .lines
            .iter()
            .skip(self.lines.len().saturating_sub(height))
            .map(|l| Line::from(l.as_str()))
            .collect();
        let title = format!(" log of {} ", self.selected.as_deref().unwrap_or("-"));
        frame.render_widget(
            Paragraph::new(text).block(Block::bordered().title(title)),
            log,
        );
        let keys = if self.typing_filter {
            format!("filter: {}▏ (Enter keeps it)", self.filter)
        } else {
            "↑↓ select   r restart   s start   x stop   / filter   q quit".to_owned()
        };
        frame.render_widget(Line::styled(keys, Style::new().fg(Color::DarkGray)), help);
    }
}

/// A sparkline of the last `width` values, scaled to the largest.
fn spark(values: &[f64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let shown = &values[values.len().saturating_sub(width)..];
    let top = shown.iter().copied().fold(0.0, f64::max);
    shown
        .iter()
        .map(|v| {
            if top <= 0.0 {
                BARS[0]
            } else {
                BARS[((v / top) * 7.0).round().clamp(0.0, 7.0) as usize]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparkline_scales_to_its_largest_value_and_keeps_the_last() {
        assert_eq!(spark(&[0.0, 1.0, 2.0, 4.0], 8), "▁▃▅█");
        assert_eq!(spark(&[9.0, 0.0, 0.0], 2), "▁▁");
        assert_eq!(spark(&[], 4), "");
    }
}
