//! The route table: every path the server answers, the methods each one takes, its
//! metrics label, and whether it is under `/presence` (behind auth, the rate limit
//! and the body limit). The status page (`/`, `/ui`, `/ui/app.js`, `/ui/style.css`)
//! is outside `/presence`, so it is served without a token: it holds no data, and it
//! is the page that asks for the token (see [`ui`](super::ui)). Dispatch, `404` / `405` + `Allow` and the metric labels all
//! read this one table, and each request is resolved against it once
//! ([`Resolved`], made by the outermost layer and carried in the request's
//! extensions).
//!
//! The table is [`Endpoint::ALL`], matched in order: static paths first, so
//! `/presence/login` is the action, then `/presence/{node_id}`, whose parameter is one
//! path segment (`/presence/a/b` is no route). It is a table of its own rather than
//! `matchit` (the router axum uses): for fourteen routes a scan costs less than
//! `matchit`'s tree walk, which took about 270 instructions of every heartbeat
//! (callgrind, in-process; see the README's design notes). `HEAD` is served wherever `GET` is
//! (RFC 9110 9.3.2): the same status and headers, no body; load balancers' health
//! probes often use it.

use http::Method;

use super::errors::ApiError;

/// One path template of the API. The order is that of [`Endpoint::ALL`] and
/// [`LABELS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Healthz,
    Readyz,
    Metrics,
    List,
    Login,
    Heartbeat,
    Logout,
    Watch,
    Stats,
    /// `/`: a redirect to the status page.
    Root,
    /// `/ui`: the status page.
    Ui,
    /// `/ui/app.js`: its script.
    UiScript,
    /// `/ui/style.css`: its style sheet.
    UiStyle,
    Node,
}

impl Endpoint {
    // The page's routes come after the API's static ones, so that the scan of a
    // heartbeat, the hot path, does not grow with them.
    const ALL: [Endpoint; 14] = [
        Endpoint::Healthz,
        Endpoint::Readyz,
        Endpoint::Metrics,
        Endpoint::List,
        Endpoint::Login,
        Endpoint::Heartbeat,
        Endpoint::Logout,
        Endpoint::Watch,
        Endpoint::Stats,
        Endpoint::Root,
        Endpoint::Ui,
        Endpoint::UiScript,
        Endpoint::UiStyle,
        Endpoint::Node,
    ];

    /// The path template, which is also the metrics label.
    pub(crate) const fn template(self) -> &'static str {
        match self {
            Endpoint::Healthz => "/healthz",
            Endpoint::Readyz => "/readyz",
            Endpoint::Metrics => "/metrics",
            Endpoint::List => "/presence",
            Endpoint::Login => "/presence/login",
            Endpoint::Heartbeat => "/presence/heartbeat",
            Endpoint::Logout => "/presence/logout",
            Endpoint::Watch => "/presence/watch",
            Endpoint::Stats => "/presence/stats",
            Endpoint::Root => "/",
            Endpoint::Ui => "/ui",
            Endpoint::UiScript => "/ui/app.js",
            Endpoint::UiStyle => "/ui/style.css",
            Endpoint::Node => "/presence/{node_id}",
        }
    }

    /// Whether the path takes a `POST` (the actions).
    fn takes_post(self) -> bool {
        matches!(
            self,
            Endpoint::Login | Endpoint::Heartbeat | Endpoint::Logout
        )
    }

    /// The `Allow` header of a `405`.
    fn allow(self) -> &'static str {
        if self.takes_post() {
            "GET, HEAD, POST"
        } else {
            "GET, HEAD"
        }
    }

    /// What `method` on this path asks for: the endpoint itself, or, for a `GET` on
    /// an action's path, the node lookup (the action names are reserved node ids,
    /// which the lookup refuses).
    fn action(self, method: &Method) -> Option<Endpoint> {
        match *method {
            Method::GET | Method::HEAD if self.takes_post() => Some(Endpoint::Node),
            Method::GET | Method::HEAD => Some(self),
            Method::POST if self.takes_post() => Some(self),
            _ => None,
        }
    }
}

/// Every metrics label, in [`Resolved::label_index`] order: the templates, then
/// `unmatched` for paths no route matches.
pub(crate) const LABELS: [&str; Endpoint::ALL.len() + 1] = {
    let mut labels = ["unmatched"; Endpoint::ALL.len() + 1];
    let mut i = 0;
    while i < Endpoint::ALL.len() {
        labels[i] = Endpoint::ALL[i].template();
        i += 1;
    }
    labels
};

impl Endpoint {
    /// Whether `path` is this endpoint's: the template itself, or for
    /// `/presence/{node_id}` one path segment after `/presence/` (empty included, so
    /// that an empty id is a `422`, not a `404`).
    fn matches(self, path: &str) -> bool {
        match self {
            // The template without its `{node_id}` (a test holds the two together).
            Endpoint::Node => path
                .strip_prefix("/presence/")
                .is_some_and(|segment| !segment.contains('/')),
            _ => path == self.template(),
        }
    }

    /// The endpoint of `path`: the first of [`Endpoint::ALL`] that matches it (the
    /// static paths come before the parameter, so `/presence/login` is the action).
    fn of(path: &str) -> Option<Endpoint> {
        Endpoint::ALL
            .into_iter()
            .find(|endpoint| endpoint.matches(path))
    }
}

/// Whether `path` is `/presence` or under it: behind auth, the rate limit and the
/// body limit, whether or not a route matches (their `404` and `405` too).
fn is_presence_path(path: &str) -> bool {
    path == "/presence" || path.starts_with("/presence/")
}

/// A request resolved against the table: made once per request (by
/// [`MetricsService`](super::MetricsService), the outermost layer) and read by every
/// layer after it from the request's body ([`RequestBody`](super::RequestBody)
/// carries it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Resolved {
    endpoint: Option<Endpoint>,
    action: Option<Endpoint>,
    presence: bool,
}

impl Resolved {
    /// Resolves `method` + `path`.
    pub(crate) fn of(method: &Method, path: &str) -> Resolved {
        let endpoint = Endpoint::of(path);
        Resolved {
            endpoint,
            action: endpoint.and_then(|e| e.action(method)),
            presence: is_presence_path(path),
        }
    }

    /// The resolution carried by `req`'s body, or made now if no layer before made it.
    pub(crate) fn from_request(req: &http::Request<super::RequestBody>) -> Resolved {
        match req.body().resolved() {
            Some(resolved) => resolved,
            None => Resolved::of(req.method(), req.uri().path()),
        }
    }

    /// The index in [`LABELS`] of the metrics label: the route template (whatever
    /// the method), `unmatched` if no route matches.
    pub(crate) fn label_index(&self) -> usize {
        // `Endpoint::ALL` lists the variants in declaration order.
        self.endpoint
            .map_or(Endpoint::ALL.len(), |endpoint| endpoint as usize)
    }

    /// Whether the request is `GET /presence` (or `HEAD`), the listing.
    pub(crate) fn is_listing(&self) -> bool {
        self.action == Some(Endpoint::List)
    }

    /// Whether the request is under `/presence`.
    pub(crate) fn is_presence(&self) -> bool {
        self.presence
    }

    /// What the request asks for (`Node`: the lookup of the node the path names), or
    /// the `404` (no such path) / `405` (not with this method) error.
    pub(crate) fn action(&self, method: &Method, path: &str) -> Result<Endpoint, ApiError> {
        match (self.endpoint, self.action) {
            (_, Some(action)) => Ok(action),
            (Some(endpoint), None) => Err(ApiError::MethodNotAllowed {
                allow: endpoint.allow(),
            }),
            (None, _) => Err(ApiError::RouteNotFound {
                method: method.clone(),
                path: path.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(method: Method, path: &str) -> Result<Endpoint, ApiError> {
        Resolved::of(&method, path).action(&method, path)
    }

    #[test]
    fn statics_win_over_the_parameter_and_it_is_one_segment() {
        assert_eq!(Endpoint::of("/presence/login"), Some(Endpoint::Login));
        assert_eq!(Endpoint::of("/presence/stats"), Some(Endpoint::Stats));
        assert_eq!(Endpoint::of("/presence/n-1"), Some(Endpoint::Node));
        assert_eq!(Endpoint::of("/presence/"), Some(Endpoint::Node));
        assert_eq!(Endpoint::of("/presence/a/b"), None);
        assert_eq!(Endpoint::of("/presence"), Some(Endpoint::List));
        assert_eq!(Endpoint::of("/presencex"), None);
        assert_eq!(Endpoint::of("/healthz/"), None);
        // The parameter comes last in the table, and its prefix is its template's.
        assert_eq!(Endpoint::ALL.last(), Some(&Endpoint::Node));
        assert_eq!(
            Endpoint::Node.template().strip_suffix("{node_id}"),
            Some("/presence/")
        );
    }

    #[test]
    fn every_template_is_in_the_table_and_labelled_in_order() {
        for (i, endpoint) in Endpoint::ALL.into_iter().enumerate() {
            let path = endpoint.template().replace("{node_id}", "n-1");
            let resolved = Resolved::of(&Method::GET, &path);
            assert_eq!(resolved.endpoint, Some(endpoint));
            assert_eq!(resolved.label_index(), i);
            assert_eq!(LABELS[resolved.label_index()], endpoint.template());
        }
        assert_eq!(
            LABELS[Resolved::of(&Method::GET, "/nope").label_index()],
            "unmatched"
        );
    }

    #[test]
    fn routes() {
        assert_eq!(action(Method::GET, "/presence"), Ok(Endpoint::List));
        assert_eq!(action(Method::HEAD, "/presence"), Ok(Endpoint::List));
        assert_eq!(action(Method::GET, "/presence/stats"), Ok(Endpoint::Stats));
        assert_eq!(action(Method::HEAD, "/presence/stats"), Ok(Endpoint::Stats));
        assert_eq!(
            action(Method::POST, "/presence/stats"),
            Err(ApiError::MethodNotAllowed { allow: "GET, HEAD" })
        );
        assert_eq!(action(Method::POST, "/presence/login"), Ok(Endpoint::Login));
        assert_eq!(action(Method::GET, "/presence/login"), Ok(Endpoint::Node));
        assert_eq!(action(Method::GET, "/presence/n-1"), Ok(Endpoint::Node));
        assert_eq!(action(Method::GET, "/presence/"), Ok(Endpoint::Node));
        assert_eq!(action(Method::HEAD, "/healthz"), Ok(Endpoint::Healthz));
        assert_eq!(action(Method::GET, "/"), Ok(Endpoint::Root));
        assert_eq!(action(Method::GET, "/ui"), Ok(Endpoint::Ui));
        assert_eq!(action(Method::HEAD, "/ui/app.js"), Ok(Endpoint::UiScript));
        assert_eq!(action(Method::GET, "/ui/style.css"), Ok(Endpoint::UiStyle));
        assert_eq!(
            action(Method::POST, "/ui"),
            Err(ApiError::MethodNotAllowed { allow: "GET, HEAD" })
        );
        for path in ["/ui/", "/ui/x.js", "/ui/app.js/", "//"] {
            assert!(
                matches!(
                    action(Method::GET, path),
                    Err(ApiError::RouteNotFound { .. })
                ),
                "{path}"
            );
        }
        assert!(matches!(
            action(Method::GET, "/presence/a/b"),
            Err(ApiError::RouteNotFound { .. })
        ));
        assert!(matches!(
            action(Method::GET, "/wp-admin"),
            Err(ApiError::RouteNotFound { .. })
        ));
        assert_eq!(
            action(Method::DELETE, "/presence/login"),
            Err(ApiError::MethodNotAllowed {
                allow: "GET, HEAD, POST"
            })
        );
        assert_eq!(
            action(Method::POST, "/presence/n-1"),
            Err(ApiError::MethodNotAllowed { allow: "GET, HEAD" })
        );
    }

    #[test]
    fn labels_are_templates_and_presence_covers_unmatched_paths_under_it() {
        let label = |m: Method, p: &str| LABELS[Resolved::of(&m, p).label_index()];
        assert_eq!(label(Method::GET, "/presence/n-1"), "/presence/{node_id}");
        assert_eq!(label(Method::PUT, "/presence/n-1"), "/presence/{node_id}");
        assert_eq!(label(Method::PUT, "/presence/login"), "/presence/login");
        assert_eq!(label(Method::GET, "/wp-admin"), "unmatched");
        assert_eq!(label(Method::POST, "/healthz"), "/healthz");
        assert!(Resolved::of(&Method::GET, "/presence/a/b").is_presence());
        assert!(Resolved::of(&Method::GET, "/presence").is_presence());
        assert!(!Resolved::of(&Method::GET, "/presencex").is_presence());
        assert!(!Resolved::of(&Method::GET, "/healthz").is_presence());
        // The page is outside /presence: no token, no rate limit (it holds no data).
        for path in ["/", "/ui", "/ui/app.js", "/ui/style.css"] {
            assert!(!Resolved::of(&Method::GET, path).is_presence(), "{path}");
        }
    }
}
