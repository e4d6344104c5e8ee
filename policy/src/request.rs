//! The part of a request the policy reads.

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
        Self { route_name, cluster: None, method: get(":method"), path: get(":path"), authority, headers }
    }

    /// The query string, without `?` (empty when there is none).
    pub fn query(&self) -> &'a [u8] {
        crate::query::split_path(self.path).1.unwrap_or(b"")
    }
}
