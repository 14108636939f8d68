//! What the kit prints: one line per check as it ends (plain text or TAP), a summary line, and
//! optionally a JUnit XML file for CI systems.

use std::io::Write;
use std::time::Duration;

use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};

/// How a check ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// The rule broken, and what was seen.
    Fail(String),
    /// Why the check could not run here.
    Skip(String),
}

/// One check's result.
#[derive(Clone, Debug)]
pub struct CheckResult {
    /// `group.name`, e.g. `handshake.set-features-once`.
    pub name: String,
    /// Where the rule is written, e.g. `§4.3`.
    pub spec: &'static str,
    pub outcome: Outcome,
    pub took: Duration,
    /// What the peer did, for a check that passed (a failure says it in its outcome).
    pub note: Option<String>,
}

/// The line format on standard output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Tap,
}

/// Prints each result as it comes and keeps them for the summary and the XML.
pub struct Report {
    suite: &'static str,
    format: Format,
    results: Vec<CheckResult>,
    out: Box<dyn Write>,
}

impl Report {
    pub fn new(suite: &'static str, format: Format, out: Box<dyn Write>) -> Self {
        let mut report = Self {
            suite,
            format,
            results: Vec::new(),
            out,
        };
        if format == Format::Tap {
            report.line("TAP version 13".to_owned());
        }
        report
    }

    fn line(&mut self, line: String) {
        // A closed standard output must not stop the checks; the exit status still tells.
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
    }

    pub fn push(&mut self, result: CheckResult) {
        let n = self.results.len() + 1;
        let ms = result.took.as_millis();
        let line = match (self.format, &result.outcome) {
            (Format::Text, Outcome::Pass) => {
                format!("ok    {} ({}, {ms} ms)", result.name, result.spec)
            }
            (Format::Text, Outcome::Fail(why)) => {
                format!("FAIL  {} ({}): {why}", result.name, result.spec)
            }
            (Format::Text, Outcome::Skip(why)) => {
                format!("skip  {} ({}): {why}", result.name, result.spec)
            }
            (Format::Tap, Outcome::Pass) => format!("ok {n} - {} ({})", result.name, result.spec),
            (Format::Tap, Outcome::Fail(why)) => format!(
                "not ok {n} - {} ({})\n  ---\n  message: {}\n  ...",
                result.name,
                result.spec,
                serde_json::Value::String(why.clone())
            ),
            (Format::Tap, Outcome::Skip(why)) => {
                format!("ok {n} - {} ({}) # SKIP {why}", result.name, result.spec)
            }
        };
        self.line(line);
        if let (Outcome::Pass, Some(note)) = (&result.outcome, &result.note) {
            match self.format {
                Format::Text => self.line(format!("      {note}")),
                Format::Tap => self.line(format!("# {note}")),
            }
        }
        self.results.push(result);
    }

    pub fn results(&self) -> &[CheckResult] {
        &self.results
    }

    fn count(&self, which: fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| which(&r.outcome)).count()
    }

    /// Every check passed or was skipped.
    pub fn passed(&self) -> bool {
        self.count(|o| matches!(o, Outcome::Fail(_))) == 0
    }

    /// Prints the summary (TAP: the plan, then the summary as a comment).
    pub fn finish(&mut self) {
        let summary = format!(
            "{}: {} checks, {} passed, {} failed, {} skipped",
            self.suite,
            self.results.len(),
            self.count(|o| *o == Outcome::Pass),
            self.count(|o| matches!(o, Outcome::Fail(_))),
            self.count(|o| matches!(o, Outcome::Skip(_))),
        );
        match self.format {
            Format::Text => self.line(summary),
            Format::Tap => {
                self.line(format!("1..{}", self.results.len()));
                self.line(format!("# {summary}"));
            }
        }
    }

    /// The results as JUnit XML: one `testsuite`, one `testcase` per check.
    pub fn junit(&self) -> Result<Vec<u8>, std::io::Error> {
        let mut xml = quick_xml::Writer::new_with_indent(Vec::new(), b' ', 2);
        let total: Duration = self.results.iter().map(|r| r.took).sum();
        xml.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
        let mut suite = BytesStart::new("testsuite");
        suite.push_attribute((
            "name",
            format!("tce-sidecar conformance {}", self.suite).as_str(),
        ));
        suite.push_attribute(("tests", self.results.len().to_string().as_str()));
        suite.push_attribute((
            "failures",
            self.count(|o| matches!(o, Outcome::Fail(_)))
                .to_string()
                .as_str(),
        ));
        suite.push_attribute((
            "skipped",
            self.count(|o| matches!(o, Outcome::Skip(_)))
                .to_string()
                .as_str(),
        ));
        suite.push_attribute(("time", format!("{:.3}", total.as_secs_f64()).as_str()));
        xml.write_event(Event::Start(suite))?;
        for result in &self.results {
            let (group, name) = result.name.split_once('.').unwrap_or(("", &result.name));
            let mut case = BytesStart::new("testcase");
            case.push_attribute(("classname", format!("{}.{group}", self.suite).as_str()));
            case.push_attribute(("name", name));
            case.push_attribute(("time", format!("{:.3}", result.took.as_secs_f64()).as_str()));
            let (element, message) = match (&result.outcome, &result.note) {
                (Outcome::Pass, None) => {
                    xml.write_event(Event::Empty(case))?;
                    continue;
                }
                (Outcome::Pass, Some(note)) => ("system-out", note),
                (Outcome::Fail(why), _) => ("failure", why),
                (Outcome::Skip(why), _) => ("skipped", why),
            };
            xml.write_event(Event::Start(case))?;
            let mut detail = BytesStart::new(element);
            if element != "system-out" {
                detail
                    .push_attribute(("message", format!("{} ({})", message, result.spec).as_str()));
            }
            xml.write_event(Event::Start(detail))?;
            xml.write_event(Event::Text(BytesText::new(message)))?;
            xml.write_event(Event::End(BytesEnd::new(element)))?;
            xml.write_event(Event::End(BytesEnd::new("testcase")))?;
        }
        xml.write_event(Event::End(BytesEnd::new("testsuite")))?;
        let mut bytes = xml.into_inner();
        bytes.push(b'\n');
        Ok(bytes)
    }
}
