//! What a person sees of a local run: on a terminal a progress bar with one line per step
//! result (or, with `--watch`, a table of steps updated in place); plain lines when stderr is
//! not a terminal; then a summary table. All live output goes to stderr, so stdout holds only
//! the summary (or the JSON of `--output json`).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::api::{StepKind, StepPhase, StepStatus, WorkflowRunStatus};
use crate::engine::Transition;

use super::runner::{Observer, Plan, Stats};

/// How the live view draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing.
    Quiet,
    /// One line per transition (not a terminal).
    Lines,
    /// A progress bar, and a line per step result above it.
    Bar,
    /// A table of steps updated in place.
    Table,
}

/// The live view.
pub struct View {
    mode: Mode,
    started: Instant,
    width: usize,
    /// Top-level steps in spec order.
    steps: Vec<String>,
    /// What a running container step is told: it runs as a local process.
    notes: HashMap<String, String>,
    bar: Option<ProgressBar>,
    multi: Option<MultiProgress>,
    rows: HashMap<String, ProgressBar>,
    /// Rows whose spinner and elapsed time run.
    ticking: HashSet<String>,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// Hides the live view while something else writes to the terminal (a question).
#[derive(Clone)]
pub enum Pause {
    Bar(ProgressBar),
    Table(MultiProgress),
    Nothing,
}

impl Pause {
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match self {
            Pause::Bar(bar) => bar.suspend(f),
            Pause::Table(multi) => multi.suspend(f),
            Pause::Nothing => f(),
        }
    }
}

impl View {
    /// What hides this view while a question is asked.
    pub fn pause(&self) -> Pause {
        match (&self.bar, &self.multi) {
            (Some(bar), _) => Pause::Bar(bar.clone()),
            (_, Some(multi)) => Pause::Table(multi.clone()),
            _ => Pause::Nothing,
        }
    }

    pub fn new(mode: Mode, plan: &Plan) -> Self {
        let steps: Vec<String> = (0..plan.dag.len()).map(|i| plan.dag.id(i).to_string()).collect();
        let mut notes = HashMap::new();
        for (i, id) in steps.iter().enumerate() {
            if let Some(c) = &crate::engine::dag::step_at(&plan.spec, i).container {
                notes.insert(id.clone(), format!("local process; image {} not used", c.image));
            }
        }
        let width = steps.iter().map(|s| s.len() + 6).max().unwrap_or(8).clamp(8, 40);
        let mut view = Self {
            mode,
            started: Instant::now(),
            width,
            steps,
            notes,
            bar: None,
            multi: None,
            rows: HashMap::new(),
            ticking: HashSet::new(),
        };
        match mode {
            Mode::Bar => {
                let bar = ProgressBar::with_draw_target(Some(plan.dag.len() as u64), ProgressDrawTarget::stderr())
                    .with_style(
                        style("{spinner} {elapsed:>4} [{bar:30}] {pos}/{len} {wide_msg}").progress_chars("=> "),
                    );
                bar.enable_steady_tick(Duration::from_millis(120));
                view.bar = Some(bar);
            }
            Mode::Table => {
                let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
                for id in view.steps.clone() {
                    let row = multi.add(ProgressBar::new_spinner());
                    view.style_row(&row, &id, None);
                    view.rows.insert(id, row);
                }
                view.multi = Some(multi);
            }
            Mode::Quiet | Mode::Lines => {}
        }
        view
    }

    fn stamp(&self) -> String {
        format!("{:>6}", fmt_duration(self.started.elapsed()))
    }

    fn line(&self, key: &str, phase: &str, detail: &str) -> String {
        let w = self.width;
        format!("{} {key:<w$} {phase:<10} {detail}", self.stamp()).trim_end().to_string()
    }

    fn detail(&self, key: &str, phase: &str, message: &str, row: Option<&StepStatus>) -> String {
        let mut parts = Vec::new();
        if let Some(r) = row {
            if r.cached && phase == "Succeeded" {
                parts.push("cached".to_string());
            }
            if let Some(a) = &r.agent {
                parts.push(format!("agent {a}"));
            }
            if let Some(t) = &r.tokens {
                parts.push(format!("{}+{} tokens", t.prompt, t.completion));
            }
            if phase == "Succeeded"
                && let Some(o) = &r.output
                && r.items.is_none()
            {
                parts.push(format!("output {}", preview(o, 60)));
            }
        }
        let id = crate::naming::step_id_of(key);
        let message = if phase == "Running" && message.is_empty() {
            self.notes.get(id).cloned().unwrap_or_default()
        } else {
            message.to_string()
        };
        let routine_hit = message == "result from cache" && row.is_some_and(|r| r.cached);
        if !message.is_empty() && !routine_hit {
            parts.push(message);
        }
        parts.join("; ")
    }

    fn style_row(&mut self, row: &ProgressBar, key: &str, r: Option<&StepStatus>) {
        let w = self.width;
        let phase = r.map(|r| r.phase).unwrap_or_default();
        let mark = match phase {
            StepPhase::Succeeded => "✓",
            StepPhase::Failed => "✗",
            StepPhase::Skipped | StepPhase::Cancelled => "-",
            StepPhase::Pending => "·",
            StepPhase::Waiting => "…",
            StepPhase::Running | StepPhase::Retrying => "",
        };
        let template = if mark.is_empty() {
            format!("{{spinner}} {{prefix:<{w}}} {{msg}} {{elapsed}}")
        } else {
            format!("{mark} {{prefix:<{w}}} {{msg}}")
        };
        row.set_style(style(&template));
        row.set_prefix(key.to_string());
        let mut msg = format!("{:<10}", phase.as_str());
        if let Some(r) = r {
            if let Some(n) = r.items {
                msg.push_str(&format!(" {n} items"));
            }
            if matches!(phase, StepPhase::Running | StepPhase::Retrying) {
                if r.attempts > 1 {
                    msg.push_str(&format!(" attempt {}", r.attempts));
                }
            } else if let Some(d) = duration(r) {
                msg.push_str(&format!(" {:>6}", fmt_duration(d)));
            }
            let detail = self.detail(key, phase.as_str(), &r.message, Some(r));
            if !detail.is_empty() {
                msg.push_str("  ");
                msg.push_str(&preview(&detail, 100));
            }
        }
        row.set_message(msg);
        match phase {
            StepPhase::Running | StepPhase::Retrying => {
                if self.ticking.insert(key.to_string()) {
                    row.reset_elapsed();
                    row.enable_steady_tick(Duration::from_millis(120));
                }
            }
            _ => {
                self.ticking.remove(key);
                row.disable_steady_tick();
            }
        }
        row.tick();
    }

    fn update_table(&mut self, transitions: &[Transition], status: &WorkflowRunStatus) {
        let Some(multi) = self.multi.clone() else { return };
        for t in transitions {
            let Some(key) = &t.key else { continue };
            let row = status.steps.get(key);
            let is_child = key.contains('[');
            let active = row.is_some_and(|r| {
                matches!(r.phase, StepPhase::Running | StepPhase::Retrying | StepPhase::Failed) || !is_child
            });
            match self.rows.get(key).cloned() {
                Some(bar) if active => self.style_row(&bar, key, row),
                Some(bar) => {
                    // A fan-out child that settled well leaves the table; its parent counts it.
                    multi.remove(&bar);
                    self.rows.remove(key);
                }
                None if active => {
                    // Children in index order, right under their parent.
                    let parent = crate::naming::step_id_of(key);
                    let index =
                        |k: &str| k.strip_prefix(parent)?.strip_prefix('[')?.strip_suffix(']')?.parse::<usize>().ok();
                    let mine = index(key).unwrap_or(0);
                    let before = self
                        .rows
                        .keys()
                        .filter_map(|k| index(k).filter(|i| *i < mine).map(|i| (i, k.clone())))
                        .max()
                        .map(|(_, k)| k)
                        .unwrap_or_else(|| parent.to_string());
                    let bar = ProgressBar::new_spinner();
                    let bar = match self.rows.get(&before) {
                        Some(p) => multi.insert_after(p, bar),
                        None => multi.add(bar),
                    };
                    self.style_row(&bar, key, row);
                    self.rows.insert(key.clone(), bar);
                }
                None => {}
            }
            // The parent of a child shows how many are done.
            if is_child {
                let parent = crate::naming::step_id_of(key).to_string();
                if let Some(bar) = self.rows.get(&parent).cloned() {
                    self.style_row(&bar, &parent, status.steps.get(&parent));
                    let (done, n) = children_done(status, &parent);
                    if status.steps.get(&parent).is_some_and(|r| r.phase == StepPhase::Running) {
                        bar.set_message(format!("{:<10} {done}/{n} items done", "Running"));
                    }
                }
            }
        }
    }

    /// Clears the live parts; the summary follows.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let Some(multi) = self.multi.take() {
            for row in self.rows.values() {
                row.disable_steady_tick();
            }
            let _ = multi.clear();
        }
    }
}

fn children_done(status: &WorkflowRunStatus, parent: &str) -> (usize, usize) {
    let n = status.steps.get(parent).and_then(|r| r.items).unwrap_or(0) as usize;
    let done =
        (0..n).filter(|c| status.steps.get(&format!("{parent}[{c}]")).is_some_and(|r| r.phase.is_finished())).count();
    (done, n)
}

impl Observer for View {
    fn update(&mut self, transitions: &[Transition], status: &WorkflowRunStatus) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Table => self.update_table(transitions, status),
            Mode::Lines | Mode::Bar => {
                let mut out = Vec::new();
                for t in transitions {
                    // A start is worth a line only while it runs (not for a cache hit).
                    let settled =
                        t.key.as_ref().and_then(|k| status.steps.get(k)).is_some_and(|r| r.phase.is_finished());
                    if t.phase.as_str() == "Running" && (self.mode == Mode::Bar || settled) {
                        continue;
                    }
                    let (key, row) = match &t.key {
                        Some(k) => (k.as_str(), status.steps.get(k)),
                        None => ("run", None),
                    };
                    let detail = self.detail(key, t.phase.as_str(), &t.message, row);
                    out.push(self.line(key, t.phase.as_str(), &detail));
                }
                match &self.bar {
                    Some(bar) => {
                        for l in out {
                            bar.println(l);
                        }
                        let done = status.progress.split('/').next().and_then(|d| d.parse().ok()).unwrap_or(0);
                        bar.set_position(done);
                        bar.set_message(running_summary(status));
                    }
                    None => {
                        let mut err = std::io::stderr().lock();
                        for l in out {
                            let _ = writeln!(err, "{l}");
                        }
                    }
                }
            }
        }
    }

    fn cancelling(&mut self) {
        let msg = "cancelling: stopping running steps, then running finally steps (Ctrl-C again to quit now)";
        match (&self.bar, &self.multi) {
            (Some(bar), _) => bar.println(msg),
            (_, Some(multi)) => {
                let _ = multi.println(msg);
            }
            _ if self.mode != Mode::Quiet => eprintln!("{msg}"),
            _ => {}
        }
    }
}

/// "running: a, b[2] (+3 more)" for the bar.
fn running_summary(status: &WorkflowRunStatus) -> String {
    let running: Vec<&str> = status
        .steps
        .iter()
        .filter(|(_, r)| r.phase == StepPhase::Running && r.items.is_none())
        .map(|(k, _)| k.as_str())
        .collect();
    let retrying = status.steps.values().filter(|r| r.phase == StepPhase::Retrying).count();
    let mut s = String::new();
    if !running.is_empty() {
        s.push_str("running: ");
        s.push_str(&running.iter().take(4).copied().collect::<Vec<_>>().join(", "));
        if running.len() > 4 {
            s.push_str(&format!(" (+{} more)", running.len() - 4));
        }
    }
    if retrying > 0 {
        s.push_str(&format!("{}{retrying} waiting to retry", if s.is_empty() { "" } else { "; " }));
    }
    s
}

/// How long a step took.
pub fn duration(r: &StepStatus) -> Option<Duration> {
    let (s, f) = (r.started_at.as_ref()?, r.finished_at.as_ref()?);
    let us = f.0.as_microsecond() - s.0.as_microsecond();
    Some(Duration::from_micros(u64::try_from(us).unwrap_or(0)))
}

pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}

/// One line of at most `max` characters.
pub fn preview(s: &str, max: usize) -> String {
    let one: String = s.trim().replace(['\n', '\r'], "\\n");
    if one.chars().count() <= max {
        return one;
    }
    let cut: String = one.chars().take(max.saturating_sub(3)).collect();
    format!("{cut}...")
}

/// Most `forEach` children listed in the summary (failed ones are always listed).
const SUMMARY_CHILDREN: usize = 10;

/// The summary table.
pub fn summary(plan: &Plan, status: &WorkflowRunStatus, stats: &Stats, cache: &str, elapsed: Duration) -> String {
    let mut rows: Vec<[String; 7]> = Vec::new();
    let row_of = |shown: String, r: &StepStatus| -> [String; 7] {
        let tokens = r.tokens.map(|t| format!("{}+{}", t.prompt, t.completion)).unwrap_or_else(|| "-".into());
        let dur = duration(r).map(fmt_duration).unwrap_or_else(|| "-".into());
        let mut message = r.message.clone();
        let routine =
            message.is_empty() || message == "result from cache" || message.starts_with("ran as a local process");
        if routine
            && r.phase == StepPhase::Succeeded
            && let Some(o) = &r.output
        {
            message = format!("output: {}", preview(o, 50));
        }
        [
            shown,
            r.phase.as_str().to_string(),
            dur,
            if r.cached { "yes".into() } else { "-".into() },
            r.agent.clone().unwrap_or_else(|| "-".into()),
            tokens,
            preview(&message, 80),
        ]
    };
    for i in 0..plan.dag.len() {
        let id = plan.dag.id(i);
        let r = status.steps.get(id).cloned().unwrap_or_default();
        rows.push(row_of(id.to_string(), &r));
        if let Some(n) = r.items {
            let mut hidden = 0;
            for c in 0..n as usize {
                let key = format!("{id}[{c}]");
                let Some(cr) = status.steps.get(&key) else { continue };
                if c < SUMMARY_CHILDREN || cr.phase == StepPhase::Failed {
                    rows.push(row_of(format!("  {key}"), cr));
                } else {
                    hidden += 1;
                }
            }
            if hidden > 0 {
                rows.push([
                    format!("  ({hidden} more)"),
                    String::new(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                ]);
            }
        }
    }
    let header = ["STEP", "PHASE", "DURATION", "CACHED", "AGENT", "TOKENS", "MESSAGE"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let fmt_row = |cells: [&str; 7]| -> String {
        let mut line = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        line.trim_end().to_string()
    };
    let mut out = String::new();
    out.push_str(&fmt_row(header));
    out.push('\n');
    for r in &rows {
        out.push_str(&fmt_row([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6]]));
        out.push('\n');
    }
    let cached = status.steps.iter().filter(|(k, r)| !k.contains('[') && r.cached).count();
    out.push_str(&format!(
        "\nrun {} {} in {} ({} steps, {cached} from cache; cache {} hits, {} misses at {cache})\n",
        plan.run.name,
        status.phase.as_str(),
        fmt_duration(elapsed),
        status.progress,
        stats.cache_hits,
        stats.cache_misses,
    ));
    if !status.message.is_empty() {
        out.push_str(&format!("{}\n", status.message));
    }
    let containers: Vec<&str> = (0..plan.dag.len())
        .filter(|&i| plan.dag.kind_of(&plan.spec, plan.dag.id(i)) == Some(StepKind::Container))
        .map(|i| plan.dag.id(i))
        .collect();
    if !containers.is_empty() {
        out.push_str(&format!(
            "container steps ({}) ran as local processes; their images were not used\n",
            containers.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_previews() {
        assert_eq!(fmt_duration(Duration::from_millis(12)), "12ms");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(preview("a\nb", 10), "a\\nb");
        assert_eq!(preview(&"x".repeat(20), 10), "xxxxxxx...");
    }
}
