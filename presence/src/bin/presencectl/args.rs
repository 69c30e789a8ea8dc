//! The command line of `presencectl` (clap derive).

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use presence::client::Filter;

/// The default `--url`: the quick start's server.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080/presence";

/// A command-line client of a presence server.
#[derive(Debug, Parser)]
#[command(name = "presencectl", version, about, max_term_width = 100)]
pub struct Cli {
    /// The API's base URL.
    #[arg(long, global = true, env = "PRESENCE_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// Bearer token for a server with auth on: the static token or a JWT.
    #[arg(long, global = true, env = "PRESENCE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the online nodes: an aligned table, or JSON with --json.
    List {
        /// Which nodes.
        #[command(flatten)]
        filter: FilterArgs,
        /// Print the nodes as the API's JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one node (exit status 1 if it is not online).
    Get {
        /// The node id.
        id: String,
        /// Print the node as the API's JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Follow the change feed: one line per event, until interrupted.
    Watch {
        /// Which nodes.
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON object per line (NDJSON): {"id", "event", "data"} as the feed
        /// sends them.
        #[arg(long)]
        json: bool,
    },
    /// Count the online nodes by status.
    Stats {
        /// Print the API's JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Mint an HS256 JWT with the secret in PRESENCE_JWT_SECRET (the server's).
    Token(TokenArgs),
}

/// The listing and watch filters, as the API has them (ANDed).
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only node ids that start with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Only these statuses (comma-separated or repeated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub status: Vec<StatusArg>,
    /// Only nodes whose meta has KEY equal to VALUE (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = key_value)]
    pub meta: Vec<(String, String)>,
}

impl FilterArgs {
    /// The SDK's filter.
    pub fn filter(&self) -> Filter {
        let mut filter = Filter::all()
            .prefix(self.prefix.clone().unwrap_or_default())
            .status(self.status.iter().map(|s| s.as_str()));
        for (key, value) in &self.meta {
            filter = filter.meta(key.clone(), value.clone());
        }
        filter
    }
}

/// A node status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    /// Online and well.
    Up,
    /// Online, impaired.
    Degraded,
    /// Online, finishing its work.
    Draining,
}

impl StatusArg {
    fn as_str(self) -> &'static str {
        match self {
            StatusArg::Up => "up",
            StatusArg::Degraded => "degraded",
            StatusArg::Draining => "draining",
        }
    }
}

/// `token`'s arguments.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The node the token is for (`sub`): the one node a write scope may write.
    #[arg(long, value_name = "NODE")]
    pub sub: Option<String>,
    /// What the token allows (comma-separated or repeated); `write` needs --sub.
    #[arg(long, value_enum, value_delimiter = ',', required = true)]
    pub scope: Vec<Scope>,
    /// How long the token is valid: a number with s, m, h or d (`90s`, `24h`).
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub ttl: Duration,
}

/// A scope of the server's JWTs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scope {
    /// `presence:read`: list, get, watch and stats.
    #[value(alias = "presence:read")]
    Read,
    /// `presence:write`: login, heartbeat and logout of the node named by --sub.
    #[value(alias = "presence:write")]
    Write,
    /// `presence:admin`: everything, any node.
    #[value(alias = "presence:admin")]
    Admin,
}

impl Scope {
    /// The scope as the server reads it.
    pub fn claim(self) -> &'static str {
        match self {
            Scope::Read => "presence:read",
            Scope::Write => "presence:write",
            Scope::Admin => "presence:admin",
        }
    }
}

/// `KEY=VALUE`, with a non-empty key.
fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// `90s`, `15m`, `24h`, `7d` (a bare number is seconds); more than zero.
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => s.split_at(at),
        None => (s, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 15m, 24h or 7d"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    match n.checked_mul(unit_secs) {
        Some(0) => Err("the duration must be more than zero".to_owned()),
        Some(secs) => Ok(Duration::from_secs(secs)),
        None => Err(format!("{s:?} is too long")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(duration("30"), Ok(Duration::from_secs(30)));
        for bad in ["", "0h", "h", "1w", "-1h", "1.5h", "99999999999999999999d"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn filters_and_pairs() {
        let cli = Cli::try_parse_from([
            "presencectl",
            "list",
            "--prefix",
            "web-",
            "--status",
            "up,degraded",
            "--meta",
            "region=eu",
            "--meta",
            "role=edge cache",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::List { filter, json } = cli.command else {
            panic!("not list: {cli:?}");
        };
        assert!(!json);
        assert_eq!(
            filter.filter().query_string(),
            "prefix=web-&status=up,degraded&meta.region=eu&meta.role=edge%20cache"
        );
        assert!(key_value("=x").is_err() && key_value("x").is_err());
        assert_eq!(key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
    }

    #[test]
    fn scopes_take_either_spelling() {
        let cli = Cli::try_parse_from([
            "presencectl",
            "token",
            "--sub",
            "n-1",
            "--scope",
            "presence:read,write",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Token(args) = cli.command else {
            panic!("not token");
        };
        assert_eq!(args.scope, [Scope::Read, Scope::Write]);
        assert_eq!(args.ttl, Duration::from_secs(86_400));
    }

    #[test]
    fn the_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
