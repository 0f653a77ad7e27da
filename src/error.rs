//! The library's error type: every failure names what it is about (a file, a tensor, a field).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },
    #[error("{}: missing tensor `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{name}` has shape {found:?}, the config expects {expected:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{}: {} tensor(s) that the model does not use: {}", path.display(), names.len(), names.join(", "))]
    UnusedTensors { path: PathBuf, names: Vec<String> },
    #[error("model `{repo}`: {message}")]
    Hub { repo: String, message: String },
    #[error("unknown scheduler `{name}`; known schedulers: {known}")]
    UnknownScheduler { name: String, known: String },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("cancelled")]
    Cancelled,
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The message without the "invalid request: " label, for callers that name the field
    /// or the feature themselves.
    pub fn message(&self) -> String {
        match self {
            Error::InvalidRequest(m) => m.clone(),
            other => other.to_string(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Parses JSON that stands for the file `path` (a built-in config), naming it in any error.
pub fn parse_json<T: serde::de::DeserializeOwned>(text: &str, path: &std::path::Path) -> Result<T> {
    serde_json::from_str(text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and parses a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
