//! Rate limits and quotas (`clients[].limits`, `clients[].route_limits`,
//! `routes[].limits`) become [`Limit`]s: checked, with their field paths,
//! and digested for their bucket keys (see [`crate::limit`]).

use std::collections::HashMap;

use super::{ClientPath, ConfigError};
use crate::limit::{ClientLimits, Kind, Limit, Scope, Window, MAX_BURST, MAX_REQUESTS};
use crate::model::{Allowed, Client, Route};
use crate::raw::{RawClient, RawConfig, RawLimits, RawWindow};

/// The largest daily quota.
pub const MAX_QUOTA: u32 = 1_000_000_000;

/// One `limits` object at `path`, counted on `scope`. `{}` is refused
/// unless `may_be_empty` (a client's own limits for a route: none).
pub(super) fn compile_limits(
    raw: &RawLimits,
    path: &str,
    scope: Scope,
    may_be_empty: bool,
) -> Result<Box<[Limit]>, ConfigError> {
    if raw.rate.is_none() && raw.quota.is_none() && !may_be_empty {
        return Err(ConfigError::new(path, "must set `rate`, `quota` or both (leave `limits` out for none)"));
    }
    let mut out = Vec::with_capacity(2);
    if let Some(rate) = &raw.rate {
        let requests = bounded(rate.requests, 1, MAX_REQUESTS, &format!("{path}.rate.requests"))?;
        let burst = bounded(rate.burst, 0, MAX_BURST, &format!("{path}.rate.burst"))?;
        let window = match rate.per {
            RawWindow::Second => Window::Second,
            RawWindow::Minute => Window::Minute,
            RawWindow::Hour => Window::Hour,
        };
        out.push(Limit::new(Kind::Rate { requests, window, burst }, scope));
    }
    if let Some(quota) = &raw.quota {
        let requests = bounded(quota.requests, 1, MAX_QUOTA, &format!("{path}.quota.requests"))?;
        out.push(Limit::new(Kind::Quota { requests }, scope));
    }
    Ok(out.into_boxed_slice())
}

fn bounded(n: u64, min: u32, max: u32, path: &str) -> Result<u32, ConfigError> {
    match u32::try_from(n) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError::new(path, format!("must be a whole number from {min} to {max}"))),
    }
}

/// A client's limits: on all its routes (`limits`), and its own for some
/// routes (`route_limits`, each a route it may use, once).
pub(super) fn compile_client_limits(
    client: &RawClient<'_>,
    path: ClientPath,
    allowed: &Allowed,
    route_index: &HashMap<&str, usize>,
) -> Result<ClientLimits, ConfigError> {
    let all = match &client.limits {
        Some(raw) => compile_limits(raw, &format!("{path}.limits"), Scope::Client, false)?,
        None => Box::default(),
    };
    if client.route_limits.0.is_empty() {
        return Ok(ClientLimits { all, by_route: Box::default() });
    }
    let mut by_route: Vec<(usize, Box<[Limit]>)> = Vec::with_capacity(client.route_limits.0.len());
    for (name, raw) in &client.route_limits.0 {
        // Keys are route names (`RawRouteLimits` refuses anything else).
        let at = format!("{path}.route_limits.{name}");
        let r = super::client_route(name, &at, allowed, route_index)?;
        if by_route.iter().any(|(earlier, _)| *earlier == r) {
            return Err(ConfigError::new(at, "is given twice"));
        }
        by_route.push((r, compile_limits(raw, &at, Scope::Route, true)?));
    }
    by_route.sort_unstable_by_key(|(r, _)| *r);
    Ok(ClientLimits { all, by_route: by_route.into_boxed_slice() })
}

/// Marks on each route whether a rate, a quota can apply to its requests:
/// its own default, a client's limits on all routes (a client allowed on
/// it), a client's own limits for it.
pub(super) fn finish_limits(routes: &mut [Route], clients: &[Client]) {
    let kinds = |limits: &[Limit]| (limits.iter().any(|l| !l.is_quota()), limits.iter().any(Limit::is_quota));
    for (r, route) in routes.iter_mut().enumerate() {
        let mut limited = kinds(&route.limits);
        for client in clients.iter().filter(|c| !c.has_no_limits() && c.allowed.allows(r)) {
            for (rate, quota) in [kinds(client.limits_all()), kinds(client.limits_for_route(r).unwrap_or_default())] {
                limited = (limited.0 || rate, limited.1 || quota);
            }
        }
        route.limited = limited;
    }
}

/// Whether `limits` sets a rate or a quota.
fn sets_any(limits: &RawLimits) -> bool {
    limits.rate.is_some() || limits.quota.is_some()
}

/// The path of the first route's limit in `raw`, for a host that cannot
/// count them.
pub(super) fn first_route_limit(raw: &RawConfig) -> Option<String> {
    let r = raw.routes.iter().position(|r| r.limits.as_ref().is_some_and(sets_any))?;
    Some(format!("routes[{r}].limits"))
}

/// The path of the first limit a client sets, if it sets one.
pub(super) fn first_client_limit(client: &RawClient<'_>, path: ClientPath) -> Option<String> {
    if client.limits.as_ref().is_some_and(sets_any) {
        return Some(format!("{path}.limits"));
    }
    let (name, _) = client.route_limits.0.iter().find(|(_, l)| sets_any(l))?;
    Some(format!("{path}.route_limits.{name}"))
}
