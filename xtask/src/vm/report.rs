//! Reads a VM's console into results (per case, per test, with the error a kernel gave) and
//! prints the matrix. The console carries markers from `/init`: `NP-BEGIN case`,
//! `NP-END case rc=N`, `NP-INFRA what` for machinery that failed inside the VM.

use std::{collections::BTreeMap, time::Duration};

use super::{qemu::Console, Case};
use crate::util::fmt_duration;

/// The outcome of one case (one run of a test binary).
pub enum CaseResult {
    /// Every test passed.
    Passed {
        tests: usize,
    },
    /// Tests ran and some failed: what the kernel (or the test) refused.
    Failed {
        tests: usize,
        failed: Vec<(String, String)>,
    },
    /// The machinery failed: the binary did not start, the VM died or ran out of time.
    Infra(String),
    NotRun,
}

pub struct KernelResult {
    pub release: String,
    pub boot: Option<Duration>,
    pub total: Option<Duration>,
    /// Why the VM as a whole failed (download, packing, boot), if it did.
    pub infra: Option<String>,
    /// `NP-INFRA` lines from inside the VM (a module that did not load, ...).
    pub warnings: Vec<String>,
    pub cases: BTreeMap<&'static str, CaseResult>,
    /// `(case, program) -> (translated, verified)` instruction counts the verifier test printed.
    pub insns: BTreeMap<(&'static str, String), (u64, u64)>,
}

impl KernelResult {
    pub fn infra(reason: String) -> Self {
        Self {
            release: String::from("?"),
            boot: None,
            total: None,
            infra: Some(reason),
            warnings: Vec::new(),
            cases: BTreeMap::new(),
            insns: BTreeMap::new(),
        }
    }

    pub fn read(release: String, console: &Console, cases: &[Case]) -> Self {
        let mut result = Self {
            release,
            boot: console.boot,
            total: Some(console.total),
            infra: None,
            warnings: Vec::new(),
            cases: BTreeMap::new(),
            insns: BTreeMap::new(),
        };
        result.warnings = console
            .lines
            .iter()
            .filter_map(|l| l.strip_prefix("NP-INFRA "))
            .map(str::to_owned)
            .collect();
        if console.boot.is_none() {
            let tail: Vec<&str> = console
                .lines
                .iter()
                .rev()
                .take(15)
                .map(String::as_str)
                .collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            result.infra = Some(format!(
                "the VM never reached /init ({}); last console lines:\n{}",
                end_of(console),
                tail.join("\n")
            ));
            return result;
        }
        for case in cases {
            let begin = format!("NP-BEGIN {}", case.name);
            let end = format!("NP-END {} ", case.name);
            let Some(start) = console.lines.iter().position(|l| *l == begin) else {
                result.cases.insert(case.name, CaseResult::NotRun);
                continue;
            };
            let block = &console.lines[start + 1..];
            let stop = block.iter().position(|l| l.starts_with(&end));
            let lines = &block[..stop.unwrap_or(block.len())];
            let rc = stop.and_then(|i| {
                block[i]
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("rc="))
                    .and_then(|rc| rc.parse::<i32>().ok())
            });
            for (program, counts) in instruction_counts(lines) {
                result.insns.entry((case.name, program)).or_insert(counts);
            }
            let outcome = read_case(lines, rc, console);
            result.cases.insert(case.name, outcome);
        }
        result
    }

    pub fn passed(&self, cases: &[Case]) -> bool {
        self.infra.is_none()
            && cases
                .iter()
                .all(|c| matches!(self.cases.get(c.name), Some(CaseResult::Passed { .. })))
    }

    pub fn verdict(&self) -> String {
        if let Some(infra) = &self.infra {
            return format!("INFRA: {}", infra.lines().next().unwrap_or(""));
        }
        let failed = self
            .cases
            .values()
            .filter(|c| matches!(c, CaseResult::Failed { .. }))
            .count();
        let infra = self
            .cases
            .values()
            .filter(|c| matches!(c, CaseResult::Infra(_) | CaseResult::NotRun))
            .count();
        match (failed, infra) {
            (0, 0) => "all passed".into(),
            _ => format!("{failed} case(s) failed, {infra} case(s) not run by the machinery"),
        }
    }
}

fn end_of(console: &Console) -> String {
    if console.timed_out {
        format!("time limit passed after {}", fmt_duration(console.total))
    } else {
        match console.exit {
            Some(status) => format!("qemu exited: {status}"),
            None => "qemu ended".into(),
        }
    }
}

/// One case from its console lines and the exit code `/init` printed (None: no end marker).
fn read_case(lines: &[String], rc: Option<i32>, console: &Console) -> CaseResult {
    // libtest's summary: `test result: FAILED. 17 passed; 1 failed; ...`, and the names of
    // the failed tests listed (indented) under the last `failures:` line.
    let summary = lines.iter().find_map(|l| l.strip_prefix("test result: "));
    let count = |what: &str| -> usize {
        summary
            .and_then(|s| {
                s.split(';').find_map(|part| {
                    part.trim()
                        .trim_start_matches(|c: char| !c.is_ascii_digit())
                        .strip_suffix(what)
                })
            })
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let failed_names: Vec<String> = match lines.iter().rposition(|l| l == "failures:") {
        Some(at) => lines[at + 1..]
            .iter()
            .take_while(|l| l.starts_with("    "))
            .map(|l| l.trim().to_owned())
            .collect(),
        None => Vec::new(),
    };
    let ran_tests = summary.is_some();
    let Some(rc) = rc else {
        let last = lines.last().map(String::as_str).unwrap_or("");
        return CaseResult::Infra(format!(
            "no end marker: the VM stopped during this case ({}); last line: {last}",
            end_of(console)
        ));
    };
    if !ran_tests {
        let text: Vec<&str> = lines.iter().rev().take(5).map(String::as_str).collect();
        return CaseResult::Infra(format!(
            "the test binary did not run its tests (exit {rc}): {}",
            text.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    let tests = count(" passed") + count(" failed");
    let failed: Vec<(String, String)> = failed_names
        .iter()
        .map(|name| (name.clone(), panic_message(lines, name)))
        .collect();
    if rc == 0 && failed.is_empty() {
        CaseResult::Passed { tests }
    } else if failed.is_empty() {
        CaseResult::Infra(format!("exit {rc} without a failed test (crash or abort?)"))
    } else {
        CaseResult::Failed { tests, failed }
    }
}

/// The panic message of test `name`, shortened; for a verifier refusal, the end of the
/// verifier's log (where it says why).
fn panic_message(lines: &[String], name: &str) -> String {
    let marker = format!("thread '{name}'");
    let Some(at) = lines
        .iter()
        .position(|l| l.starts_with(&marker) && l.contains("panicked at"))
    else {
        return "no panic message found in the console".into();
    };
    let message: Vec<&str> = lines[at + 1..]
        .iter()
        .take_while(|l| !l.is_empty() && !l.starts_with("note:") && !l.starts_with("---- "))
        .map(String::as_str)
        .collect();
    let message = message.join("\n");
    let short = |s: &str, n: usize| -> String {
        if s.chars().count() <= n {
            s.to_owned()
        } else {
            s.chars().take(n).collect::<String>() + " ..."
        }
    };
    // aya's LoadError prints the verifier's log inline, its lines joined by `\n` escapes; the
    // reason is at its end, before the statistics.
    match message.find("verifier_log: ") {
        Some(i) => {
            let log = &message[i + "verifier_log: ".len()..];
            let lines: Vec<&str> = log
                .split("\\n")
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with('}')
                        && !l.starts_with("verification time")
                        && !l.starts_with("stack depth")
                })
                .collect();
            let tail = lines[lines.len().saturating_sub(4)..]
                .iter()
                .map(|l| short(l, 200))
                .collect::<Vec<_>>()
                .join("\n      ");
            format!(
                "{}\n    verifier log, last lines:\n      {tail}",
                short(&message[..i], 300)
            )
        }
        None => short(&message, 800),
    }
}

/// `np_xdp: 27449 instructions, 120000 verified instructions (MapSizes { .. })` lines; the
/// first per program (the default map sizes come first).
fn instruction_counts(lines: &[String]) -> Vec<(String, (u64, u64))> {
    let mut out = Vec::new();
    for line in lines {
        // With --nocapture the first line follows libtest's `test NAME ... `.
        let line = line
            .rsplit_once(" ... ")
            .map_or(line.as_str(), |(_, rest)| rest);
        let Some((program, rest)) = line.split_once(": ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        if words.len() >= 5 && words[1] == "instructions," && words[3] == "verified" {
            if let (Ok(x), Ok(v)) = (words[0].parse(), words[2].parse()) {
                if !out.iter().any(|(p, _)| p == program) {
                    out.push((program.to_owned(), (x, v)));
                }
            }
        }
    }
    out
}

/// The matrix: one row per kernel, then the failures and the instruction counts.
pub fn print(results: &[(&str, &str, KernelResult)], cases: &[Case]) {
    let cell = |r: &KernelResult, case: &Case| -> String {
        if r.infra.is_some() {
            return "INFRA".into();
        }
        match r.cases.get(case.name) {
            Some(CaseResult::Passed { tests }) => format!("pass ({tests})"),
            Some(CaseResult::Failed { tests, failed }) => {
                format!("FAIL ({}/{tests} failed)", failed.len())
            }
            Some(CaseResult::Infra(_)) => "INFRA".into(),
            Some(CaseResult::NotRun) | None => "not run".into(),
        }
    };
    let mut header = vec!["kernel".to_owned(), "release".to_owned(), "boot".to_owned()];
    header.extend(cases.iter().map(|c| c.title.to_owned()));
    header.push("VM total".into());
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(version, distro, r)| {
            let mut row = vec![
                format!("{version} ({distro})"),
                r.release.clone(),
                r.boot.map_or("-".into(), fmt_duration),
            ];
            row.extend(cases.iter().map(|c| cell(r, c)));
            row.push(r.total.map_or("-".into(), fmt_duration));
            row
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let cells: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("| {} |", cells.join(" | "))
    };
    eprintln!("\nKernel matrix (boot: qemu start to /init, software emulation):");
    eprintln!("{}", line(&header));
    eprintln!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for row in &rows {
        eprintln!("{}", line(row));
    }

    for (version, _, r) in results {
        if let Some(infra) = &r.infra {
            eprintln!("\n{version}: INFRASTRUCTURE FAILED (not the kernel's verdict):\n  {infra}");
        }
        for warning in &r.warnings {
            eprintln!("\n{version}: infrastructure warning inside the VM: {warning}");
        }
        for case in cases {
            match r.cases.get(case.name) {
                Some(CaseResult::Failed { failed, .. }) => {
                    // Tests that failed the same way (e.g. every test when a program does
                    // not load) are listed once.
                    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
                    for (test, message) in failed {
                        let key = without_timing(message);
                        match groups.iter_mut().find(|(m, _)| without_timing(m) == key) {
                            Some((_, tests)) => tests.push(test),
                            None => groups.push((message.clone(), vec![test])),
                        }
                    }
                    for (message, tests) in groups {
                        eprintln!(
                            "\n{version} {}: FAILED {}:\n    {message}",
                            case.title,
                            tests.join(", ")
                        );
                    }
                }
                Some(CaseResult::Infra(why)) => eprintln!(
                    "\n{version} {}: INFRASTRUCTURE FAILED (not the kernel's verdict): {why}",
                    case.title
                ),
                _ => {}
            }
        }
    }

    let insns: Vec<String> = results
        .iter()
        .flat_map(|(version, _, r)| {
            r.insns
                .iter()
                .map(move |((case, program), (xlated, verified))| {
                    format!("  {version:<5} {case:<14} {program:<20} {xlated:>7} {verified:>9}")
                })
        })
        .collect();
    if !insns.is_empty() {
        eprintln!(
            "\nInstructions (default map sizes): kernel, case, program, translated, verified"
        );
        for l in insns {
            eprintln!("{l}");
        }
    }
}

/// `message` without the verifier's run time, which differs between otherwise equal failures.
fn without_timing(message: &str) -> String {
    message
        .lines()
        .filter(|l| !l.contains("verification time"))
        .collect::<Vec<_>>()
        .join("\n")
}
