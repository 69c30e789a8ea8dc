//! The presence data model and the JSON wire types of the HTTP API (see
//! docs/http-api.md).
//!
//! Request types carry `node_id` as a plain `String` on purpose: a body with a
//! syntactically valid JSON shape but an invalid node id is a `422 invalid_node_id`,
//! not a `400 bad_request`, so the server deserializes first and then calls
//! [`NodeId::parse`]. Unknown fields are accepted (forward compatibility); missing
//! fields and wrong types are deserialization errors.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A node's metadata: a JSON object (HP, load, address, version...).
pub type Meta = serde_json::Map<String, serde_json::Value>;

/// Longest accepted node id, in characters (all accepted characters are ASCII, so
/// this is also the length in bytes).
pub const MAX_NODE_ID_LEN: usize = 256;

/// A validated node id: 1 to 256 characters of `A-Z a-z 0-9 . _ ~ : @ + = -`.
///
/// Because every accepted character is safe in a Redis key and in a URL path
/// segment, a `NodeId` can be embedded in both without escaping.
///
/// ```
/// use presence::model::NodeId;
/// let id = NodeId::parse("node-1.eu:west@rack+2=a~b_c").unwrap();
/// assert_eq!(id.as_str(), "node-1.eu:west@rack+2=a~b_c");
/// assert!(NodeId::parse("").is_err());
/// assert!(NodeId::parse("a/b").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// Validates `s` and wraps it.
    pub fn parse(s: &str) -> Result<NodeId, InvalidNodeId> {
        validate(s)?;
        Ok(NodeId(s.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Unwraps the inner `String`.
    pub fn into_string(self) -> String {
        self.0
    }
}

fn is_node_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | ':' | '@' | '+' | '=' | '-')
}

fn validate(s: &str) -> Result<(), InvalidNodeId> {
    if s.is_empty() {
        return Err(InvalidNodeId::Empty);
    }
    if RESERVED_NODE_IDS.contains(&s) {
        return Err(InvalidNodeId::Reserved);
    }
    if let Some((index, ch)) = s.char_indices().find(|&(_, c)| !is_node_id_char(c)) {
        return Err(InvalidNodeId::InvalidChar { ch, index });
    }
    // Only ASCII is left at this point, so bytes == chars.
    if s.len() > MAX_NODE_ID_LEN {
        return Err(InvalidNodeId::TooLong { len: s.len() });
    }
    Ok(())
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeId {
    type Err = InvalidNodeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeId::parse(s)
    }
}

impl TryFrom<String> for NodeId {
    type Error = InvalidNodeId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        validate(&s)?;
        Ok(NodeId(s))
    }
}

impl TryFrom<&str> for NodeId {
    type Error = InvalidNodeId;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        NodeId::parse(s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

/// Why a string is not a valid [`NodeId`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidNodeId {
    /// The id is the empty string.
    Empty,
    /// The id is longer than [`MAX_NODE_ID_LEN`] characters.
    TooLong {
        /// Its length in characters.
        len: usize,
    },
    /// The id contains a character outside `A-Z a-z 0-9 . _ ~ : @ + = -`.
    InvalidChar {
        /// The first offending character.
        ch: char,
        /// Its byte offset in the id.
        index: usize,
    },
    /// The id is one of [`RESERVED_NODE_IDS`]: it names a route under `/presence/`.
    Reserved,
}

/// Node ids that name routes under `/presence/` (`POST /presence/login`,
/// `GET /presence/watch`, ...) and so can never be a node's: `GET /presence/{id}`
/// must mean one thing.
pub const RESERVED_NODE_IDS: [&str; 5] = ["login", "heartbeat", "logout", "watch", "stats"];

impl fmt::Display for InvalidNodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidNodeId::Empty => f.write_str("node_id must not be empty"),
            InvalidNodeId::TooLong { len } => write!(
                f,
                "node_id is {len} characters long; at most {MAX_NODE_ID_LEN} are allowed"
            ),
            InvalidNodeId::InvalidChar { ch, index } => write!(
                f,
                "node_id contains {ch:?} at byte {index}; only A-Z a-z 0-9 . _ ~ : @ + = - are allowed"
            ),
            InvalidNodeId::Reserved => write!(
                f,
                "node_id is reserved: {} name routes and cannot be node ids",
                RESERVED_NODE_IDS.join(", ")
            ),
        }
    }
}

impl std::error::Error for InvalidNodeId {}

/// How an online node says it is doing: `up` (the default), `degraded` (online,
/// impaired) or `draining` (online, finishing its work, taking no new).
///
/// ```
/// use presence::model::Status;
/// assert_eq!("draining".parse::<Status>(), Ok(Status::Draining));
/// assert_eq!(Status::default().as_str(), "up");
/// assert!("down".parse::<Status>().is_err());
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Online and well (the default).
    #[default]
    Up,
    /// Online, impaired.
    Degraded,
    /// Online, finishing its work, taking no new.
    Draining,
}

impl Status {
    /// Every status, in the order `GET /presence/stats` lists them.
    pub const ALL: [Status; 3] = [Status::Up, Status::Degraded, Status::Draining];

    /// The status as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "up",
            Status::Degraded => "degraded",
            Status::Draining => "draining",
        }
    }

    /// Position in [`Status::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Status> for String {
    fn from(status: Status) -> String {
        status.as_str().to_owned()
    }
}

impl FromStr for Status {
    type Err = InvalidStatus;

    fn from_str(s: &str) -> Result<Status, InvalidStatus> {
        match s {
            "up" => Ok(Status::Up),
            "degraded" => Ok(Status::Degraded),
            "draining" => Ok(Status::Draining),
            other => Err(InvalidStatus(other.chars().take(64).collect())),
        }
    }
}

/// A status that is not `up`, `degraded` or `draining` (`422 invalid_status`); holds
/// the value given (its first 64 characters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidStatus(pub String);

impl fmt::Display for InvalidStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status {:?} is not one of up, degraded, draining",
            self.0
        )
    }
}

impl std::error::Error for InvalidStatus {}

/// What `GET /presence/stats` answers: how many nodes are online, in all and by
/// status, from counters the writes keep (no node is read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Nodes online.
    pub online: u64,
    /// Nodes online by status; the three add up to `online`.
    pub by_status: StatusCounts,
}

/// Node counts by [`Status`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts {
    /// Nodes `up`.
    pub up: u64,
    /// Nodes `degraded`.
    pub degraded: u64,
    /// Nodes `draining`.
    pub draining: u64,
}

impl Stats {
    /// Stats from the counts in [`Status::ALL`] order.
    pub fn from_counts(counts: [u64; 3]) -> Stats {
        let [up, degraded, draining] = counts;
        Stats {
            online: up + degraded + draining,
            by_status: StatusCounts {
                up,
                degraded,
                draining,
            },
        }
    }
}

/// One online node, as listed by `GET /presence` and returned by
/// `GET /presence/{node_id}`. All times are Unix epoch milliseconds from the store's
/// clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The node's id (always a valid [`NodeId`] when produced by a store).
    pub node_id: String,
    /// How the node says it is doing (`up` when it never said; absent from a server
    /// older than statuses, which is read as `up`).
    #[serde(default)]
    pub status: Status,
    /// The node's metadata (`{}` when none was given).
    pub meta: Meta,
    /// When the current session started (the last login).
    pub online_since_ms: u64,
    /// When the node last logged in or heartbeated.
    pub last_seen_ms: u64,
    /// When the node goes offline unless it heartbeats: `last_seen_ms + ttl`.
    pub expires_at_ms: u64,
}

/// Body of `POST /presence/login`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoginRequest {
    /// The node id, validated by the server (invalid -> `422 invalid_node_id`).
    pub node_id: String,
    /// Initial metadata; absent or `null` means `{}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// Initial status; absent or `null` means `up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

/// Successful reply to `POST /presence/login`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginResponse {
    /// The node id that logged in.
    pub node_id: String,
    /// The new lease; heartbeat and logout must carry it.
    pub lease_id: String,
    /// How long the node stays online without a heartbeat.
    pub ttl_ms: u64,
    /// The advised heartbeat interval.
    pub heartbeat_ms: u64,
    /// When the node goes offline unless it heartbeats (store clock).
    pub expires_at_ms: u64,
}

/// The name the API contract uses for a login reply.
pub type Lease = LoginResponse;

/// Body of `POST /presence/heartbeat`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// The node id, validated by the server.
    pub node_id: String,
    /// The current lease (another lease -> `409 lease_mismatch`).
    pub lease_id: String,
    /// New metadata; present replaces the stored meta, absent or `null` keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// New status; present replaces the stored one, absent or `null` keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

/// Successful reply to `POST /presence/heartbeat`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The node id.
    pub node_id: String,
    /// The (unchanged) lease.
    pub lease_id: String,
    /// The new expiry (store clock).
    pub expires_at_ms: u64,
}

/// Body of `POST /presence/logout`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogoutRequest {
    /// The node id, validated by the server.
    pub node_id: String,
    /// The current lease (another lease -> `409 lease_mismatch`).
    pub lease_id: String,
}

/// Successful reply to `POST /presence/logout`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogoutResponse {
    /// The node id.
    pub node_id: String,
    /// `true` if the node was online and is now removed, `false` if it was not online.
    pub removed: bool,
}

/// Every error response body: `{"error": "<code>", "message": "<human sentence>"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `lease_mismatch` (the error table of
    /// docs/http-api.md lists them all).
    pub error: String,
    /// Human-readable sentence.
    pub message: String,
}

impl ErrorBody {
    /// Builds an error body.
    pub fn new(error: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody {
            error: error.into(),
            message: message.into(),
        }
    }
}

/// Length of a lease id in characters (128 bits, lowercase hex).
pub const LEASE_ID_LEN: usize = 32;

/// A fresh lease id: 128 random bits from the OS CSPRNG as 32 lowercase hex chars.
///
/// # Errors
/// Fails only if the operating system's random source fails.
pub fn try_new_lease_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(to_hex(&bytes))
}

/// A fresh lease id: 128 random bits from the OS CSPRNG as 32 lowercase hex chars.
///
/// # Panics
/// If the operating system's random source fails (it does not on supported
/// platforms once booted); a lease must never be guessable, so there is no weaker
/// fallback. Use [`try_new_lease_id`] to handle that case.
pub fn new_lease_id() -> String {
    match try_new_lease_id() {
        Ok(id) => id,
        Err(e) => panic!("the OS random number generator failed: {e}"),
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_accepts_every_allowed_character() {
        let all = "ABCXYZabcxyz0189._~:@+=-";
        assert_eq!(NodeId::parse(all).map(|n| n.into_string()), Ok(all.into()));
    }

    #[test]
    fn node_id_length_bounds() {
        assert_eq!(NodeId::parse(""), Err(InvalidNodeId::Empty));
        assert!(NodeId::parse(&"a".repeat(256)).is_ok());
        assert_eq!(
            NodeId::parse(&"a".repeat(257)),
            Err(InvalidNodeId::TooLong { len: 257 })
        );
    }

    #[test]
    fn node_id_rejects_other_characters() {
        for bad in [
            "a b", "a/b", "a{b}", "a*", "é", "a\n", "a\0", "a%20", "a?", "a#",
        ] {
            assert!(
                matches!(NodeId::parse(bad), Err(InvalidNodeId::InvalidChar { .. })),
                "{bad:?} must be rejected"
            );
        }
    }

    #[test]
    fn node_id_serde_validates() {
        let id: NodeId = serde_json::from_str("\"n-1\"").unwrap();
        assert_eq!(id.as_str(), "n-1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"n-1\"");
        assert!(serde_json::from_str::<NodeId>("\"a b\"").is_err());
    }

    #[test]
    fn requests_accept_unknown_fields_and_optional_meta() {
        let r: LoginRequest = serde_json::from_str(r#"{"node_id":"x","extra":1}"#).unwrap();
        assert_eq!(r.meta, None);
        let r: HeartbeatRequest =
            serde_json::from_str(r#"{"node_id":"x","lease_id":"l","meta":{"hp":3}}"#).unwrap();
        assert_eq!(r.meta.unwrap()["hp"], 3);
    }

    #[test]
    fn requests_reject_missing_fields_and_wrong_types() {
        assert!(serde_json::from_str::<LoginRequest>(r#"{}"#).is_err());
        assert!(serde_json::from_str::<LoginRequest>(r#"{"node_id":1}"#).is_err());
        assert!(serde_json::from_str::<LoginRequest>(r#"{"node_id":"x","meta":[]}"#).is_err());
        assert!(serde_json::from_str::<HeartbeatRequest>(r#"{"node_id":"x"}"#).is_err());
        assert!(serde_json::from_str::<LogoutRequest>(r#"{"lease_id":"l"}"#).is_err());
    }

    #[test]
    fn node_round_trips_with_the_api_field_names() {
        let n = Node {
            node_id: "a".into(),
            status: Status::Degraded,
            meta: Meta::new(),
            online_since_ms: 1,
            last_seen_ms: 2,
            expires_at_ms: 3,
        };
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"node_id":"a","status":"degraded","meta":{},"online_since_ms":1,"last_seen_ms":2,"expires_at_ms":3})
        );
        assert_eq!(serde_json::from_value::<Node>(v).unwrap(), n);
        // A node from a server older than statuses is `up`.
        let old = serde_json::json!({"node_id":"a","meta":{},"online_since_ms":1,"last_seen_ms":2,"expires_at_ms":3});
        assert_eq!(
            serde_json::from_value::<Node>(old).unwrap().status,
            Status::Up
        );
    }

    #[test]
    fn lease_ids_are_32_hex_chars_and_distinct() {
        let a = new_lease_id();
        let b = new_lease_id();
        assert_eq!(a.len(), LEASE_ID_LEN);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }
}
