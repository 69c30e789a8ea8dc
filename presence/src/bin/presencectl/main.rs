//! `presencectl`: the presence API from a shell, through the client SDK.
//!
//! ```text
//! presencectl list [--prefix P] [--status up,degraded] [--meta KEY=VALUE]... [--json]
//! presencectl get ID [--json]
//! presencectl watch [filters] [--json]
//! presencectl stats [--json]
//! presencectl token --sub NODE --scope read,write [--ttl 24h]
//! ```
//!
//! Global flags: `--url` (else `PRESENCE_URL`, else `http://127.0.0.1:8080/presence`)
//! and `--token` (else `PRESENCE_TOKEN`). Errors go to stderr on one line; the exit
//! status is 0 on success, 1 when a call failed (the server refused, could not be
//! reached, the node is not online) and 2 for bad usage.

mod args;
mod render;
mod token;

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use futures_util::StreamExt;
use presence::client::{ClientError, PresenceClient};

use args::{Cli, Command};

/// Why the command failed, and so its exit status.
enum Failure {
    /// Bad usage (status 2): the command line, a URL, a missing secret.
    Usage(String),
    /// A call failed (status 1).
    Call(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        match e {
            // Refused before anything was sent: the URL or an argument.
            ClientError::InvalidInput(why) => Failure::Usage(why),
            other => Failure::Call(other.to_string()),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Call(format!("writing the output: {e}"))
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(Failure::Call(format!("cannot start the runtime: {e}"))),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => fail(failure),
    }
}

/// Help and version go to stdout (status 0); any other clap error is bad usage:
/// its first line on stderr, status 2.
fn usage_error(e: &clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            let text = e.render().to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("bad usage");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            fail(Failure::Usage(format!("{first} (see presencectl --help)")))
        }
    }
}

fn fail(failure: Failure) -> ExitCode {
    let (message, code) = match failure {
        Failure::Usage(m) => (m, 2),
        Failure::Call(m) => (m, 1),
    };
    // One line, whatever the error's text holds.
    let line: String = message.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("presencectl: {}", render::printable(&line));
    ExitCode::from(code)
}

fn client(cli: &Cli) -> Result<PresenceClient, Failure> {
    let mut builder = PresenceClient::builder(cli.url.trim_end_matches('/'));
    if let Some(token) = cli.token.as_deref().filter(|t| !t.is_empty()) {
        builder = builder.bearer_token(token);
    }
    Ok(builder.build()?)
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let text = match &cli.command {
        Command::List { filter, json } => {
            let nodes = client(&cli)?.list_nodes_with(&filter.filter()).await?;
            if *json {
                to_json(&nodes)? + "\n"
            } else {
                render::table(&nodes, render::now_ms())
            }
        }
        Command::Get { id, json } => {
            let Some(node) = client(&cli)?.get_node(id).await? else {
                return Err(Failure::Call(format!("node {id:?} is not online")));
            };
            if *json {
                to_json(&node)? + "\n"
            } else {
                render::node(&node, render::now_ms())
            }
        }
        Command::Stats { json } => {
            let stats = client(&cli)?.stats().await?;
            if *json {
                to_json(&stats)? + "\n"
            } else {
                render::stats(&stats)
            }
        }
        Command::Watch { filter, json } => return watch(&cli, filter, *json).await,
        Command::Token(args) => {
            let secret = std::env::var(token::SECRET_VAR).map_err(|_| {
                Failure::Usage(format!(
                    "{} is not set (the server's HS256 secret)",
                    token::SECRET_VAR
                ))
            })?;
            token::mint(args, &secret, std::time::SystemTime::now())
                .map_err(|e| Failure::Usage(e.0))?
                + "\n"
        }
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // `presencectl list | head`: the reader has what it wanted.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// `watch`: a line per event until interrupted. The SDK reconnects and resumes by
/// itself; an item that is an error is one no reconnect fixes (401, 404, a refused
/// filter), and ends the command.
async fn watch(cli: &Cli, filter: &args::FilterArgs, json: bool) -> Result<(), Failure> {
    let mut feed = client(cli)?.watch(filter.filter());
    let mut out = std::io::stdout().lock();
    while let Some(item) = feed.next().await {
        let item = item?;
        let line = if json {
            to_json(&render::event_json(&item))?
        } else {
            render::event_line(&item)
        };
        match writeln!(out, "{line}").and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Err(Failure::Call("the watch feed ended".to_owned()))
}

fn to_json(value: &impl serde::Serialize) -> Result<String, Failure> {
    serde_json::to_string(value).map_err(|e| Failure::Call(format!("encoding JSON: {e}")))
}
