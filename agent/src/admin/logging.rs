//! Logging setup with a filter that the admin API can change at run time (`/logging?level=`).
use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::LogFormat;

/// Changes the log filter of the running agent.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

/// Why a new filter was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directive does not parse.
    #[error("bad log filter `{filter}`")]
    Parse {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// The subscriber is gone.
    #[error("cannot change the log filter")]
    Reload(#[source] reload::Error),
}

impl LogControl {
    /// The filter in force (`info`, `ambit=debug,info`, ...).
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the filter (EnvFilter syntax).
    pub fn set(&self, filter: &str) -> Result<(), Error> {
        let f = EnvFilter::try_new(filter).map_err(|source| Error::Parse {
            filter: filter.to_string(),
            source,
        })?;
        self.handle.reload(f).map_err(Error::Reload)?;
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = filter.to_string();
        tracing::info!(filter, "log filter changed");
        Ok(())
    }
}

/// Installs the global subscriber (stderr; text or JSON lines); the filter starts from
/// `AMBIT_LOG` or `info`.
pub fn init(format: LogFormat) -> LogControl {
    let start = std::env::var("AMBIT_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| "info".into());
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&start));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    // A second init (tests) keeps the first subscriber; the handle then changes nothing.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    LogControl {
        handle,
        current: Mutex::new(start),
    }
}
