//! The part of a request the policy reads, and what Envoy's first stage
//! hands the final one about its key.

/// The longest key keyswap will hash; a longer one is refused unhashed.
pub const MAX_KEY_BYTES: usize = 4096;

/// One request, as a host sees it at request-header time.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Envoy's route name (`xds.route_name`), when the host has one.
    pub route_name: Option<&'a str>,
    /// The upstream cluster the request goes to (`xds.cluster_name`), when
    /// the host has decided it.
    pub cluster: Option<&'a str>,
    pub method: &'a [u8],
    /// The request target: path and query.
    pub path: &'a [u8],
    pub authority: &'a [u8],
    /// Header names in lower case (pseudo-headers may be included; they
    /// are never taken for keys).
    pub headers: &'a [(String, Vec<u8>)],
    /// What the first stage read as the key, where a host decides in two
    /// stages (Envoy: the key is read and removed on the listener, the
    /// request decided on its final cluster); `None` for a host that decides
    /// in one pass: the key is read from `headers` then.
    pub key: Option<&'a KeyCheck>,
    /// The subject token of an on-behalf-of exchange as the first stage
    /// read it ([`crate::Policy::subject_token`]), where a host decides in
    /// two stages (the header is gone by the final one); with `key`
    /// `None` it is read from `headers` instead.
    pub subject: Option<&'a [u8]>,
}

impl<'a> RequestView<'a> {
    /// A view over a host's full header list, taking `:method`, `:path` and
    /// `:authority` (or `host`) from it.
    pub fn from_headers(route_name: Option<&'a str>, headers: &'a [(String, Vec<u8>)]) -> Self {
        let get = |name: &str| headers.iter().find(|(n, _)| n == name).map_or(&[][..], |(_, v)| v.as_slice());
        let mut authority = get(":authority");
        if authority.is_empty() {
            authority = get("host");
        }
        Self {
            route_name,
            cluster: None,
            method: get(":method"),
            path: get(":path"),
            authority,
            headers,
            key: None,
            subject: None,
        }
    }

    /// The query string, without `?` (empty when there is none).
    pub fn query(&self) -> &'a [u8] {
        crate::query::split_path(self.path).1.unwrap_or(b"")
    }
}

/// What a request presented as a key, as the first stage hands it to the
/// decision: never the key itself, only its SHA-256 (what the
/// configuration stores too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// No key in any key source.
    Missing,
    /// Different keys in different places.
    Ambiguous,
    /// A key longer than [`MAX_KEY_BYTES`], never hashed.
    TooLong,
    /// The SHA-256 of the one key presented.
    Digest([u8; 32]),
}

impl KeyCheck {
    /// The record the first stage leaves for the second (Envoy filter
    /// state): one tag byte, and the digest after `d`.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            KeyCheck::Missing => b"m".to_vec(),
            KeyCheck::Ambiguous => b"a".to_vec(),
            KeyCheck::TooLong => b"l".to_vec(),
            KeyCheck::Digest(d) => {
                let mut out = Vec::with_capacity(33);
                out.push(b'd');
                out.extend_from_slice(d);
                out
            }
        }
    }

    /// The record back, as the final stage reads it: a record the first
    /// stage never wrote is nobody's key, read as [`KeyCheck::Missing`].
    pub fn from_record(bytes: &[u8]) -> Self {
        Self::decode(bytes).unwrap_or(KeyCheck::Missing)
    }

    /// The record back; `None` for anything [`Self::encode`] never writes.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes {
            b"m" => Some(KeyCheck::Missing),
            b"a" => Some(KeyCheck::Ambiguous),
            b"l" => Some(KeyCheck::TooLong),
            [b'd', digest @ ..] => <[u8; 32]>::try_from(digest).ok().map(KeyCheck::Digest),
            _ => None,
        }
    }
}
