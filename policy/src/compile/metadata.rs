//! Client metadata (`clients[].metadata`) and the request headers some of
//! its fields are sent upstream in (`metadata_headers`). Metadata is not
//! secret, but a misplaced value could be: errors name the field path and
//! the field name, never a value.

use super::{header_name, ConfigError};
use crate::model::Metadata;
use crate::raw::RawNamedStrings;

/// The most fields a client's metadata holds, and `metadata_headers` names.
pub const MAX_FIELDS: usize = 16;

/// The longest metadata value, in bytes.
pub const MAX_VALUE_BYTES: usize = 256;

/// A client's metadata at `path` (`clients[3]`), sorted by field name;
/// `None` (nothing allocated) for a client without any.
pub(super) fn client_metadata(
    raw: &RawNamedStrings,
    path: impl std::fmt::Display,
) -> Result<Option<Metadata>, ConfigError> {
    if raw.0.is_empty() {
        return Ok(None);
    }
    if raw.0.len() > MAX_FIELDS {
        return Err(ConfigError::new(format!("{path}.metadata"), format!("must hold at most {MAX_FIELDS} fields")));
    }
    let mut fields: Vec<(Box<str>, Box<str>)> = Vec::with_capacity(raw.0.len());
    for (name, value) in &raw.0 {
        let fit = (1..=MAX_VALUE_BYTES).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic());
        if !fit {
            return Err(ConfigError::new(
                format!("{path}.metadata.{name}"),
                format!("must be 1-{MAX_VALUE_BYTES} visible ASCII characters (no spaces)"),
            ));
        }
        fields.push((name.as_str().into(), value.as_str().into()));
    }
    fields.sort_unstable();
    Ok(Some(Metadata(fields.into_boxed_slice())))
}

/// `metadata_headers`: (field, header) pairs, each header a valid name
/// that nothing else in the configuration reads, removes or sets
/// (`taken`: header names and what they already are).
pub(super) fn metadata_headers(
    raw: &RawNamedStrings,
    taken: &[(&str, &str)],
) -> Result<Vec<(String, String)>, ConfigError> {
    if raw.0.len() > MAX_FIELDS {
        return Err(ConfigError::new("metadata_headers", format!("must name at most {MAX_FIELDS} fields")));
    }
    let mut out: Vec<(String, String)> = Vec::with_capacity(raw.0.len());
    for (field, header) in &raw.0 {
        let path = format!("metadata_headers.{field}");
        let header = header_name(header, &path)?;
        if let Some((_, what)) = taken.iter().find(|(name, _)| *name == header) {
            return Err(ConfigError::new(path, format!("is {what}; name a header of its own")));
        }
        if let Some((other, _)) = out.iter().find(|(_, h)| *h == header) {
            return Err(ConfigError::new(path, format!("is already the header of metadata field `{other}`")));
        }
        out.push((field.clone(), header));
    }
    Ok(out)
}
