//! ClusterRunner's route table (spec §4.1) and the `child_routes` every GET answer carries.
//!
//! Routes are matched the way Tornado matched ClusterRunner's regexes: `^<path>/?$` (one optional
//! trailing slash) with numeric path components `\d+` only. Anything else matches nothing and is
//! a 404. A table instead of axum's router keeps those rules, the route templates (metrics
//! labels, `child_routes`) and the per-tree version tags in one place.
use serde::Serialize;
use serde::ser::SerializeMap;

/// What a route addresses (the same handler serves the v1 and v2 paths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// `/`
    Root,
    /// `/v1`: the master summary.
    ApiV1,
    /// Version info.
    Version,
    /// Prometheus text.
    Metrics,
    /// Builds: list and create.
    Builds,
    /// One build: get and cancel.
    Build,
    /// Redirect to the tar.gz.
    BuildResult,
    /// `artifacts.tar.gz`.
    ArtifactsTarGz,
    /// `artifacts.zip`.
    ArtifactsZip,
    /// A build's subjobs.
    Subjobs,
    /// One subjob.
    Subjob,
    /// A subjob's result (upload by slaves; GET is "not implemented").
    SubjobResult,
    /// A subjob's atoms.
    Atoms,
    /// One atom.
    Atom,
    /// An atom's console output.
    Console,
    /// Unfinished builds.
    Queue,
    /// Slaves: list (and ClusterRunner's registration).
    Slaves,
    /// One slave (and ClusterRunner's state notification).
    Slave,
    /// A slave's heartbeat (ClusterRunner slaves only).
    SlaveHeartbeat,
    /// Graceful shutdown of one slave.
    SlaveShutdown,
    /// Graceful shutdown of several or all slaves.
    SlavesShutdown,
    /// The master's event log.
    Eventlog,
}

/// Which family of paths a route belongs to; it decides the default API version, pagination and
/// which `child_routes` an API version sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    /// `/v1/...`: unpaginated lists, children tagged version 1.
    V1,
    /// Root paths (`/builds`, ...): paginated lists, children tagged version 2.
    V2,
    /// `/build` and `/build/<id>` as ClusterRunner's published API docs show them: served like
    /// the `/v1/build` routes (the docs predate v2).
    Docs,
}

impl Tree {
    /// API version a request gets when its `Accept` header names none.
    pub fn default_version(self) -> u8 {
        match self {
            Self::V1 | Self::Docs => 1,
            Self::V2 => 2,
        }
    }
}

/// One row of the route table.
#[derive(Debug)]
pub struct Route {
    /// What it addresses.
    pub node: Node,
    /// Its path family.
    pub tree: Tree,
    /// The route template as ClusterRunner shows it in `child_routes`, e.g.
    /// `/v1/build/[build_id]`; bracketed segments match `\d+`.
    pub template: &'static str,
}

macro_rules! routes {
    ($($node:ident $tree:ident $template:literal),* $(,)?) => {
        &[$(Route { node: Node::$node, tree: Tree::$tree, template: $template }),*]
    };
}

/// Every route the gateway answers (besides `/healthz`).
pub static ROUTES: &[Route] = routes![
    Root V2 "/",
    ApiV1 V1 "/v1",
    Version V1 "/v1/version",
    Metrics V1 "/v1/metrics",
    Builds V1 "/v1/build",
    Build V1 "/v1/build/[build_id]",
    BuildResult V1 "/v1/build/[build_id]/result",
    ArtifactsTarGz V1 "/v1/build/[build_id]/artifacts.tar.gz",
    ArtifactsZip V1 "/v1/build/[build_id]/artifacts.zip",
    Subjobs V1 "/v1/build/[build_id]/subjob",
    Subjob V1 "/v1/build/[build_id]/subjob/[subjob_id]",
    SubjobResult V1 "/v1/build/[build_id]/subjob/[subjob_id]/result",
    Atoms V1 "/v1/build/[build_id]/subjob/[subjob_id]/atom",
    Atom V1 "/v1/build/[build_id]/subjob/[subjob_id]/atom/[atom_id]",
    Console V1 "/v1/build/[build_id]/subjob/[subjob_id]/atom/[atom_id]/console",
    Queue V1 "/v1/queue",
    Slaves V1 "/v1/slave",
    SlavesShutdown V1 "/v1/slave/shutdown",
    Slave V1 "/v1/slave/[slave_id]",
    SlaveHeartbeat V1 "/v1/slave/[slave_id]/heartbeat",
    SlaveShutdown V1 "/v1/slave/[slave_id]/shutdown",
    Eventlog V1 "/v1/eventlog",
    Version V2 "/version",
    Metrics V2 "/metrics",
    Builds V2 "/builds",
    Build V2 "/builds/[build_id]",
    BuildResult V2 "/builds/[build_id]/result",
    ArtifactsTarGz V2 "/builds/[build_id]/artifacts.tar.gz",
    ArtifactsZip V2 "/builds/[build_id]/artifacts.zip",
    Subjobs V2 "/builds/[build_id]/subjobs",
    Subjob V2 "/builds/[build_id]/subjobs/[subjob_id]",
    SubjobResult V2 "/builds/[build_id]/subjobs/[subjob_id]/result",
    Atoms V2 "/builds/[build_id]/subjobs/[subjob_id]/atoms",
    Atom V2 "/builds/[build_id]/subjobs/[subjob_id]/atoms/[atom_id]",
    Console V2 "/builds/[build_id]/subjobs/[subjob_id]/atoms/[atom_id]/console",
    Queue V2 "/queue",
    Slaves V2 "/slaves",
    SlavesShutdown V2 "/slaves/shutdown",
    Slave V2 "/slaves/[slave_id]",
    SlaveHeartbeat V2 "/slaves/[slave_id]/heartbeat",
    SlaveShutdown V2 "/slaves/[slave_id]/shutdown",
    Eventlog V2 "/eventlog",
    Builds Docs "/build",
    Build Docs "/build/[build_id]",
];

/// A request path resolved to its route.
#[derive(Debug, Clone)]
pub struct Matched {
    /// The route.
    pub route: &'static Route,
    /// The numeric path components, in order (build, subjob, atom; or slave).
    pub ids: Vec<u64>,
}

impl Matched {
    /// The `i`-th numeric path component (routes guarantee how many there are).
    pub fn id(&self, i: usize) -> u64 {
        self.ids.get(i).copied().unwrap_or_default()
    }
}

/// Resolves `path` against the table; `None` is a 404.
pub fn resolve(path: &str) -> Option<Matched> {
    // The root's regex is `^/?$`: only "/" itself.
    if path == "/" {
        return ROUTES
            .iter()
            .find(|r| r.node == Node::Root)
            .map(|route| Matched {
                route,
                ids: Vec::new(),
            });
    }
    // `^<path>/?$`: at most one trailing slash.
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    ROUTES
        .iter()
        .filter(|r| r.node != Node::Root)
        .find_map(|route| {
            let mut ids = Vec::new();
            let mut want = route.template.split('/');
            let mut got = trimmed.split('/');
            loop {
                match (want.next(), got.next()) {
                    (None, None) => return Some(Matched { route, ids }),
                    (Some(w), Some(g)) if w.starts_with('[') => {
                        if g.is_empty() || !g.bytes().all(|b| b.is_ascii_digit()) {
                            return None;
                        }
                        // Ids too large for u64 exist nowhere: no match, hence 404.
                        ids.push(g.parse().ok()?);
                    }
                    (Some(w), Some(g)) if w == g => {}
                    _ => return None,
                }
            }
        })
}

/// `child_routes` of a route: label → template, in ClusterRunner's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChildRoutes(pub Vec<(&'static str, &'static str)>);

impl Serialize for ChildRoutes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

fn template(node: Node, tree: Tree) -> &'static str {
    // Children of the docs aliases are the v1 routes they stand for.
    let tree = if tree == Tree::Docs { Tree::V1 } else { tree };
    ROUTES
        .iter()
        .find(|r| r.node == node && r.tree == tree)
        .map(|r| r.template)
        .unwrap_or("")
}

/// The children ClusterRunner lists for `route` when the request's API version is `version`.
/// Children are tagged with their tree's version and only shown to that version: `GET /v1/build`
/// with `Accept: ...v2+json` lists `{}` (spec §1.2).
pub fn child_routes(route: &Route, version: u8) -> ChildRoutes {
    use Node::*;
    if route.node == Root {
        return if version == 1 {
            ChildRoutes(vec![("v1", "/v1")])
        } else {
            let t = |n| template(n, Tree::V2);
            ChildRoutes(vec![
                ("metrics", t(Metrics)),
                ("version", t(Version)),
                ("builds", t(Builds)),
                ("queue", t(Queue)),
                ("slaves", t(Slaves)),
                ("eventlog", t(Eventlog)),
            ])
        };
    }
    if route.tree.default_version() != version {
        return ChildRoutes::default();
    }
    let children: &[(&str, Node)] = match route.node {
        ApiV1 => &[
            ("metrics", Metrics),
            ("version", Version),
            ("builds", Builds),
            ("queue", Queue),
            ("slaves", Slaves),
            ("eventlog", Eventlog),
        ],
        Builds => &[("build", Build)],
        Build => &[
            ("result", BuildResult),
            ("artifacts.tar.gz", ArtifactsTarGz),
            ("artifacts.zip", ArtifactsZip),
            ("subjobs", Subjobs),
        ],
        Subjobs => &[("subjob", Subjob)],
        Subjob => &[("atoms", Atoms), ("result", SubjobResult)],
        Atoms => &[("atom", Atom)],
        Atom => &[("console", Console)],
        Slaves => &[("slave", Slave), ("shutdown", SlavesShutdown)],
        Slave => &[("shutdown", SlaveShutdown), ("heartbeat", SlaveHeartbeat)],
        _ => &[],
    };
    ChildRoutes(
        children
            .iter()
            .map(|&(label, node)| (label, template(node, route.tree)))
            .collect(),
    )
}

/// The metrics label of a route: its template with `{name}` placeholders.
pub fn endpoint_label(route: Option<&Route>) -> String {
    route.map_or_else(
        || "<unmatched>".to_string(),
        |r| r.template.replace('[', "{").replace(']', "}"),
    )
}

/// Routes whose GET answers JSON (and therefore carries `child_routes`).
pub fn is_json_route(node: Node) -> bool {
    !matches!(
        node,
        Node::ArtifactsZip | Node::ArtifactsTarGz | Node::BuildResult | Node::Metrics
    )
}

/// Methods a route serves, for 405's `Allow`.
pub fn allowed(node: Node) -> &'static str {
    match node {
        Node::Builds | Node::SlaveShutdown | Node::SlavesShutdown => "GET, HEAD, OPTIONS, POST",
        Node::Build => "GET, HEAD, OPTIONS, PUT",
        _ => "GET, HEAD, OPTIONS",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(path: &str) -> Option<(Node, Tree, Vec<u64>)> {
        resolve(path).map(|m| (m.route.node, m.route.tree, m.ids))
    }

    #[test]
    fn matching_follows_clusterrunner_regexes() {
        assert_eq!(node("/"), Some((Node::Root, Tree::V2, vec![])));
        assert_eq!(node("/v1"), Some((Node::ApiV1, Tree::V1, vec![])));
        assert_eq!(node("/v1/"), Some((Node::ApiV1, Tree::V1, vec![])));
        assert_eq!(
            node("/v1/build/12/"),
            Some((Node::Build, Tree::V1, vec![12]))
        );
        assert_eq!(node("/build/1/"), Some((Node::Build, Tree::Docs, vec![1])));
        assert_eq!(node("/build"), Some((Node::Builds, Tree::Docs, vec![])));
        assert_eq!(
            node("/builds/3/subjobs/0/atoms/2/console"),
            Some((Node::Console, Tree::V2, vec![3, 0, 2]))
        );
        assert_eq!(
            node("/v1/slave/shutdown"),
            Some((Node::SlavesShutdown, Tree::V1, vec![]))
        );
        assert_eq!(
            node("/v1/slave/4/shutdown/"),
            Some((Node::SlaveShutdown, Tree::V1, vec![4]))
        );
        assert_eq!(
            node("/v1/build/1/artifacts.zip"),
            Some((Node::ArtifactsZip, Tree::V1, vec![1]))
        );
        // Not routes: non-numeric ids, double slashes, v2 paths under /v1, unknown paths.
        for p in [
            "/v1/build/abc",
            "/v1/build/-1",
            "/v1/build/1//",
            "//",
            "/v1/builds",
            "/v2/builds",
            "/build/1/subjob",
            "/v1/build/99999999999999999999999",
            "/v1/build/1/artifactsXzip",
        ] {
            assert_eq!(node(p), None, "{p}");
        }
    }

    #[test]
    fn child_routes_tables() {
        let m = |p: &str| resolve(p).unwrap().route;
        assert_eq!(
            child_routes(m("/"), 2).0,
            vec![
                ("metrics", "/metrics"),
                ("version", "/version"),
                ("builds", "/builds"),
                ("queue", "/queue"),
                ("slaves", "/slaves"),
                ("eventlog", "/eventlog"),
            ]
        );
        assert_eq!(child_routes(m("/"), 1).0, vec![("v1", "/v1")]);
        assert_eq!(
            child_routes(m("/v1"), 1).0,
            vec![
                ("metrics", "/v1/metrics"),
                ("version", "/v1/version"),
                ("builds", "/v1/build"),
                ("queue", "/v1/queue"),
                ("slaves", "/v1/slave"),
                ("eventlog", "/v1/eventlog"),
            ]
        );
        assert_eq!(child_routes(m("/v1/build"), 2), ChildRoutes::default());
        assert_eq!(
            child_routes(m("/v1/build"), 1).0,
            vec![("build", "/v1/build/[build_id]")]
        );
        assert_eq!(
            child_routes(m("/builds"), 2).0,
            vec![("build", "/builds/[build_id]")]
        );
        assert_eq!(
            child_routes(m("/builds/1"), 2).0,
            vec![
                ("result", "/builds/[build_id]/result"),
                ("artifacts.tar.gz", "/builds/[build_id]/artifacts.tar.gz"),
                ("artifacts.zip", "/builds/[build_id]/artifacts.zip"),
                ("subjobs", "/builds/[build_id]/subjobs"),
            ]
        );
        assert_eq!(
            child_routes(m("/v1/build/1/subjob/0"), 1).0,
            vec![
                ("atoms", "/v1/build/[build_id]/subjob/[subjob_id]/atom"),
                ("result", "/v1/build/[build_id]/subjob/[subjob_id]/result"),
            ]
        );
        assert_eq!(
            child_routes(m("/v1/build/1/subjob/0/atom/3"), 1).0,
            vec![(
                "console",
                "/v1/build/[build_id]/subjob/[subjob_id]/atom/[atom_id]/console"
            )]
        );
        assert_eq!(
            child_routes(m("/v1/slave"), 1).0,
            vec![
                ("slave", "/v1/slave/[slave_id]"),
                ("shutdown", "/v1/slave/shutdown")
            ]
        );
        assert_eq!(
            child_routes(m("/slaves/2"), 2).0,
            vec![
                ("shutdown", "/slaves/[slave_id]/shutdown"),
                ("heartbeat", "/slaves/[slave_id]/heartbeat"),
            ]
        );
        assert_eq!(
            child_routes(m("/build/1"), 1).0[0],
            ("result", "/v1/build/[build_id]/result")
        );
        assert_eq!(child_routes(m("/v1/queue"), 1), ChildRoutes::default());
        assert_eq!(
            serde_json::to_string(&child_routes(m("/v1/build"), 1)).unwrap(),
            r#"{"build":"/v1/build/[build_id]"}"#
        );
    }

    #[test]
    fn metrics_labels() {
        assert_eq!(
            endpoint_label(resolve("/v1/build/7").map(|m| m.route)),
            "/v1/build/{build_id}"
        );
        assert_eq!(endpoint_label(None), "<unmatched>");
    }
}
