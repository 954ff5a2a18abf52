//! Logging setup: `tracing` to stderr, human-readable or one JSON object per line.
//!
//! stderr keeps stdout free for what a command prints as its result (`mcp-worker call`).
//!
//! Logged values are often untrusted: a job's `reply_to`, tool and ids, an MCP server's or a
//! provider's error text. The JSON format escapes them; the human format would print `%` values
//! and the message raw, so a newline in a tool name could start a forged log line. Its fields
//! therefore go through [`escaped_fields`], which escapes control characters (and the Unicode
//! line separators and direction overrides that can make a line read as something else) in
//! every field, the message included.

use std::fmt::{self, Write as _};
use std::io::IsTerminal as _;

use tracing::Subscriber;
use tracing::field::Field;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt as _;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{FormatFields, Writer};

use crate::config::{LogFormat, TelemetrySettings};

/// Installs the global subscriber. `RUST_LOG`, when set, replaces the configured filter.
pub fn init(settings: &TelemetrySettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter));
    // Colour codes only on a terminal: in a log file or collector they are noise.
    let ansi = std::io::stderr().is_terminal();
    tracing::subscriber::set_global_default(subscriber(settings.format, filter, ansi, std::io::stderr))
        .expect("the global subscriber is installed once");
}

/// The subscriber `init` installs, writing to `writer` (tests capture its output).
pub(crate) fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Human => Box::new(builder.fmt_fields(escaped_fields()).finish()),
        LogFormat::Json => Box::new(builder.json().flatten_event(true).with_current_span(true).finish()),
    }
}

/// The human format's fields: `name=value` separated by spaces, the message bare, like
/// tracing's default, but every value escaped by [`Escaping`].
fn escaped_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    tracing_subscriber::fmt::format::debug_fn(|writer: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug| {
        let mut escaping = Escaping(writer);
        if field.name() == "message" {
            write!(escaping, "{value:?}")
        } else {
            write!(escaping, "{}={value:?}", field.name())
        }
    })
    .delimited(" ")
}

/// Writes through to `W`, escaping what could break or disguise a log line.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for c in text.chars() {
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c if c.is_control()
                    || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
                {
                    write!(self.0, "{}", c.escape_unicode())?
                }
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer that keeps everything written to it.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat, emit: impl FnOnce()) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = subscriber(format, EnvFilter::new("info"), false, move || writer.clone());
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    fn forge() {
        let reply_to = "replies\n2026-01-01T00:00:00Z  INFO forged: reply_to line";
        let tool = "echo\r\n2026-01-01T00:00:00Z  INFO forged: tool line\u{1b}[2K";
        let span = tracing::info_span!("handle", tool = %tool);
        let _entered = span.enter();
        tracing::warn!(reply_to = %reply_to, detail = ?"a\nb", "the reply queue {} does not exist", "x\ny");
    }

    #[test]
    fn a_newline_in_any_field_or_the_message_does_not_start_a_line_in_the_human_format() {
        let output = logged(LogFormat::Human, forge);
        assert_eq!(output.lines().count(), 1, "{output}");
        assert!(output.contains("reply_to=replies\\n2026"), "{output}");
        assert!(output.contains("tool=echo\\r\\n2026"), "{output}");
        assert!(output.contains("\\u{1b}[2K"), "{output}");
        assert!(output.contains("queue x\\ny does not exist"), "{output}");
        assert!(!output.contains('\u{1b}'), "{output}");
    }

    #[test]
    fn the_json_format_keeps_one_object_per_line() {
        let output = logged(LogFormat::Json, forge);
        assert_eq!(output.lines().count(), 1, "{output}");
        let line: serde_json::Value = serde_json::from_str(output.trim()).unwrap();
        assert!(line["reply_to"].as_str().unwrap().contains("\n2026"), "{line}");
    }
}
