//! Which sandbox port a request is for. Pure.
//!
//! Two forms: the Host header `<port>-<sandbox>.<domain>` (the whole path is
//! forwarded), and the path `/sandboxes/<sandbox>/ports/<port>/<rest>` (only
//! `/<rest>` is forwarded).

/// A request's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub sandbox: String,
    pub port: u16,
    /// Path and query to send to the sandbox.
    pub path: String,
}

/// The request names no sandbox port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no sandbox in the request: use Host <port>-<sandbox>.{domain} or the path /sandboxes/<sandbox>/ports/<port>/...")]
    NoRoute { domain: String },
    #[error("port '{0}' is not a TCP port (1-65535)")]
    BadPort(String),
}

fn port(s: &str) -> Result<u16, RouteError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(RouteError::BadPort(s.into())),
    }
}

fn valid_sandbox(s: &str) -> bool {
    s.len() <= 63
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Routes a request by its Host header (without port) and path-and-query.
pub fn route(host: Option<&str>, path_and_query: &str, domain: &str) -> Result<Route, RouteError> {
    if let Some(host) = host {
        let host = host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        });
        let suffix = format!(".{domain}");
        if let Some(label) = host.to_ascii_lowercase().strip_suffix(&suffix) {
            if let Some((p, sb)) = label.split_once('-') {
                if valid_sandbox(sb) && !sb.contains('.') {
                    return Ok(Route {
                        sandbox: sb.to_string(),
                        port: port(p)?,
                        path: path_and_query.to_string(),
                    });
                }
            }
        }
    }
    if let Some(rest) = path_and_query.strip_prefix("/sandboxes/") {
        let mut parts = rest.splitn(4, '/');
        let (sb, kw, p) = (parts.next(), parts.next(), parts.next());
        if let (Some(sb), Some("ports"), Some(p)) = (sb, kw, p) {
            // `p` may carry the query when no slash follows the port.
            let (p, query) = p.split_once('?').map_or((p, None), |(a, q)| (a, Some(q)));
            if valid_sandbox(sb) {
                let tail = match (parts.next(), query) {
                    (Some(t), _) => format!("/{t}"),
                    (None, Some(q)) => format!("/?{q}"),
                    (None, None) => "/".to_string(),
                };
                return Ok(Route {
                    sandbox: sb.to_string(),
                    port: port(p)?,
                    path: tail,
                });
            }
        }
    }
    Err(RouteError::NoRoute {
        domain: domain.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_form_forwards_the_whole_path() {
        let r = route(
            Some("8080-web.hearth.localhost:7080"),
            "/a?b=1",
            "hearth.localhost",
        )
        .unwrap();
        assert_eq!(
            (r.sandbox.as_str(), r.port, r.path.as_str()),
            ("web", 8080, "/a?b=1")
        );
        let r = route(
            Some("3000-a1b2c3.HEARTH.localhost"),
            "/",
            "hearth.localhost",
        )
        .unwrap();
        assert_eq!(r.sandbox, "a1b2c3");
    }

    #[test]
    fn path_form_strips_the_prefix() {
        let r = route(Some("localhost"), "/sandboxes/web/ports/80/x/y?z", "d").unwrap();
        assert_eq!(
            (r.sandbox.as_str(), r.port, r.path.as_str()),
            ("web", 80, "/x/y?z")
        );
        assert_eq!(
            route(None, "/sandboxes/web/ports/80", "d").unwrap().path,
            "/"
        );
        assert_eq!(
            route(None, "/sandboxes/web/ports/80?q=1", "d")
                .unwrap()
                .path,
            "/?q=1"
        );
    }

    #[test]
    fn bad_ports_and_missing_routes_are_errors() {
        assert_eq!(
            route(None, "/sandboxes/web/ports/0/", "d"),
            Err(RouteError::BadPort("0".into()))
        );
        assert!(matches!(
            route(None, "/sandboxes/web/ports/99999/", "d"),
            Err(RouteError::BadPort(_))
        ));
        assert!(matches!(
            route(Some("example.com"), "/", "d"),
            Err(RouteError::NoRoute { .. })
        ));
        assert!(matches!(
            route(None, "/sandboxes/../ports/80/", "d"),
            Err(RouteError::NoRoute { .. })
        ));
    }
}
