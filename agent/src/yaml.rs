//! The YAML dialect of every file the agent and the CA read (config, CA config, inventory): one parser, one set of options, errors with field path and line.
//!
//! The parser is serde-saphyr (pure Rust, no `unsafe`, panic-free on malformed input, with
//! budgets on depth, nodes, aliases and documents). Its defaults are kept except where they
//! would change what a file means compared with Kubernetes' JSON view of the same object:
//! booleans are YAML 1.2 (`true`/`false` only; `yes`, `on`, `y` stay strings, as in JSON), and
//! errors carry no source snippet (callers add the file, document and field themselves).
//! Duplicate keys are an error, merge keys (`<<`) are expanded as kubectl expands them, and a
//! null is not a string (`name: ~` is refused, as JSON `null` is).
use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde_saphyr::{Localizer, Location, Options, SnippetMode, UserMessageFormatter};

/// Why a YAML text did not parse as the wanted type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message} (line {line}, column {column})")]
pub struct YamlError {
    /// Dotted path of the field that failed, e.g. `spec.mtls.mode` (`.` for the whole text).
    pub field: String,
    /// What is wrong, without the location.
    pub message: String,
    /// 1-based line in the parsed text (0 when unknown).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub column: usize,
}

/// The options every parse uses.
pub fn options() -> Options {
    serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        with_snippet: false,
        alias_limits: serde_saphyr::alias_limits! { max_total_replayed_events: 100_000 },
    }
}

/// Parses one YAML document as `T`, naming the field and line of the first error.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    let mut field = None;
    serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            field = Some(e.path().to_string());
            e.into_inner()
        })
    })
    .map_err(|e| error(text, &e, field.unwrap_or_else(|| ".".into())))
}

/// Parses every document of a multi-document YAML text as `T`; empty documents are skipped.
pub fn from_multiple<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, YamlError> {
    serde_saphyr::from_multiple_with_options(text, options())
        .map_err(|e| error(text, &e, ".".into()))
}

/// Writes `value` as YAML.
pub fn to_string<T: serde::Serialize>(value: &T) -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string(value)
}

/// The longest offending text quoted in a message.
const MAX_QUOTED: usize = 64;

fn error(text: &str, e: &serde_saphyr::Error, field: String) -> YamlError {
    let location = e.location().unwrap_or(Location::UNKNOWN);
    let formatter = UserMessageFormatter.with_localizer(&NoLocation);
    let mut message = e.render_with_options(serde_saphyr::render_options! {
        formatter: &formatter,
        snippets: SnippetMode::Off,
    });
    // The parser says what it wanted (`invalid u16`, `expected mapping start`); say what it got.
    if let Some(found) = offending(text, location) {
        if !message.contains(found) {
            // Control characters escaped: the message ends up in a log line.
            let shown: String = found
                .chars()
                .flat_map(|c| {
                    let keep = !c.is_control();
                    c.escape_default()
                        .filter(move |_| !keep)
                        .chain(keep.then_some(c))
                })
                .collect();
            message = format!("{message}: found `{shown}`");
        }
    }
    YamlError {
        field,
        message,
        line: usize::try_from(location.line()).unwrap_or(usize::MAX),
        column: usize::try_from(location.column()).unwrap_or(usize::MAX),
    }
}

/// The text of a short scalar the error points at, if it is one.
fn offending(text: &str, location: Location) -> Option<&str> {
    let span = location.span();
    let start = usize::try_from(span.byte_offset()?).ok()?;
    let len = usize::try_from(span.byte_len()?).ok()?;
    let found = text.get(start..start.checked_add(len)?)?.trim();
    (!found.is_empty() && found.len() <= MAX_QUOTED && !found.contains('\n')).then_some(found)
}

/// English messages without the `at line L, column C` suffix: [`YamlError`] keeps the
/// location apart, and the inventory turns it into a line of the whole file.
struct NoLocation;

impl Localizer for NoLocation {
    fn attach_location<'a>(&self, base: Cow<'a, str>, _loc: Location) -> Cow<'a, str> {
        base
    }
}

#[cfg(test)]
mod tests;
