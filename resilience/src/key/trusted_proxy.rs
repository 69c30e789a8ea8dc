//! [`TrustedProxyIp`]: the client address behind reverse proxies you trust.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::{header, HeaderMap, HeaderName, Request};
use ipnet::{IpNet, Ipv4Net};

use super::{missing_peer, peer_addr, KeyExtractor, KeyType, MissingKey};

/// Which header the trusted proxies write the client address into.
///
/// Exactly one is read. A proxy appends to the header it manages and passes any other
/// forwarding header through from the client verbatim, so reading both would let a
/// client forge its address in the one the proxy does not touch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx, HAProxy, most load balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client;proto=https, for="[2001:db8::1]:4711"`.
    Forwarded,
    /// Whichever of the two the request carries, for proxies of either kind. A
    /// request that carries **both** is keyed by its peer (the nearest trusted hop):
    /// one of the two came from the client, and there is no telling which, so
    /// neither is believed. A client can thereby only put itself into its proxy's
    /// bucket, never get a fresh one.
    Either,
}

fn x_forwarded_for() -> HeaderName {
    HeaderName::from_static("x-forwarded-for")
}

/// Keys requests by client IP when the server sits behind reverse proxies.
///
/// The peer of the TCP connection is a proxy; the client's address is in a forwarding
/// header that every proxy appends its own peer to. Anyone can *send* such a header, so
/// it is believed only as far as the chain of trusted proxies reaches:
///
/// - If the peer is **not** a trusted proxy, the key is the peer IP and the header is
///   ignored: a spoofed `X-Forwarded-For` from an untrusted client changes nothing.
/// - If the peer is trusted, the header's entries are walked **from the right** (the
///   newest, written by the peer). Entries that are trusted proxies are skipped; the
///   first one that is not is the client.
/// - If every entry is a trusted proxy (an internal caller), the leftmost is the key.
/// - No header from a trusted peer: the peer IP is the key (e.g. a health checker).
/// - An entry that is not an IP address (`unknown`, an obfuscated `_name`, garbage, a
///   header that is not valid text) stops the walk: the proxy that wrote it did not
///   know, or chose to hide, its peer, and nothing to its left can be trusted. The key
///   is then the nearest trusted hop seen so far (the proxy that wrote the entry,
///   which is the last address parsed, or the peer). So malformed input can only ever
///   make a request share its proxy's bucket, never buy it a fresh one.
///
/// Several header lines are one list in order (RFC 9110). Ports (`1.2.3.4:5678`,
/// `[2001:db8::1]:4711`), quoted `Forwarded` values and IPv4-mapped IPv6 are understood;
/// addresses are keyed in canonical form (`::ffff:1.2.3.4` is `1.2.3.4`).
///
/// Works on `http::Request<B>`; the peer address comes from the request extensions like
/// [`PeerIp`](super::PeerIp). A missing peer address is a [`MissingKey`] error.
///
/// The trusted networks are [`ipnet::IpNet`]s, so a list you already parse (from
/// configuration, with `"10.0.0.0/8".parse::<IpNet>()`) goes in as it is; a single
/// proxy is `IpNet::from(addr)` (a `/32` or `/128`).
///
/// ```
/// use resilience::{KeyExtractor, TrustedProxyIp};
/// use std::net::SocketAddr;
///
/// let key = TrustedProxyIp::new(vec!["10.0.0.0/8".parse().unwrap()]);
///
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert("10.0.0.5:443".parse::<SocketAddr>().unwrap());
/// req.headers_mut().insert("x-forwarded-for", "198.51.100.1, 203.0.113.9, 10.0.0.7".parse().unwrap());
/// assert_eq!(key.extract(&req).unwrap(), "203.0.113.9".parse::<std::net::IpAddr>().unwrap());
///
/// // The same header from an untrusted peer is ignored.
/// req.extensions_mut().insert("203.0.113.50:443".parse::<SocketAddr>().unwrap());
/// assert_eq!(key.extract(&req).unwrap(), "203.0.113.50".parse::<std::net::IpAddr>().unwrap());
/// ```
#[derive(Clone, Debug)]
pub struct TrustedProxyIp {
    trusted: Arc<[IpNet]>,
    /// `trusted` with IPv4-mapped IPv6 networks as IPv4, for matching canonical
    /// addresses.
    canonical: Arc<[IpNet]>,
    header: ForwardedHeader,
}

impl TrustedProxyIp {
    /// Trusts the proxies in `trusted` and reads `X-Forwarded-For`.
    ///
    /// An empty list trusts nobody: the key is always the peer IP. Networks match by
    /// their prefix (`10.0.0.1/8` is `10.0.0.0/8`), and an IPv4-mapped IPv6 network
    /// (`::ffff:10.0.0.0/104`) matches the IPv4 addresses it maps, as dual-stack
    /// sockets report IPv4 peers that way.
    pub fn new(trusted: impl IntoIterator<Item = IpNet>) -> Self {
        let trusted: Arc<[IpNet]> = trusted.into_iter().collect();
        let canonical = trusted.iter().map(|net| canonical_net(*net)).collect();
        TrustedProxyIp {
            trusted,
            canonical,
            header: ForwardedHeader::XForwardedFor,
        }
    }

    /// Reads the given header instead of `X-Forwarded-For`.
    pub fn header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// Reads RFC 7239 `Forwarded` instead of `X-Forwarded-For`.
    pub fn forwarded(self) -> Self {
        self.header(ForwardedHeader::Forwarded)
    }

    /// The trusted networks, as given to [`new`](Self::new).
    pub fn trusted(&self) -> &[IpNet] {
        &self.trusted
    }

    /// Whether `ip` is a trusted proxy (IPv4-mapped IPv6 counts as IPv4).
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.canonical.iter().any(|net| net.contains(&ip))
    }

    /// The client IP for a connection from `peer` carrying `headers` (the rule is in the
    /// type's docs). Always an answer: at worst the peer itself.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut nearest_trusted = peer;
        let xff = x_forwarded_for();
        let forwarded = match self.header {
            ForwardedHeader::XForwardedFor => false,
            ForwardedHeader::Forwarded => true,
            ForwardedHeader::Either => match (
                headers.contains_key(&xff),
                headers.contains_key(header::FORWARDED),
            ) {
                (true, true) => return peer,
                (false, forwarded) => forwarded,
                (true, false) => false,
            },
        };
        let name = if forwarded { header::FORWARDED } else { xff };
        for line in headers.get_all(&name).iter().rev() {
            let Ok(line) = line.to_str() else {
                return nearest_trusted;
            };
            for entry in line.rsplit(',') {
                let entry = entry.trim();
                // An empty element ("a, " or "a, , b") is malformed here: a proxy
                // always writes an address, so an empty one stops the walk too.
                let parsed = if forwarded {
                    parse_forwarded_element(entry)
                } else {
                    parse_node(entry)
                };
                let Some(ip) = parsed else {
                    return nearest_trusted;
                };
                let ip = ip.to_canonical();
                if !self.is_trusted(ip) {
                    return ip;
                }
                nearest_trusted = ip;
            }
        }
        nearest_trusted
    }
}

impl KeyType for TrustedProxyIp {
    type Key = IpAddr;
}

impl<B> KeyExtractor<Request<B>> for TrustedProxyIp {
    fn extract(&self, req: &Request<B>) -> Result<IpAddr, MissingKey> {
        let peer = peer_addr(req).ok_or_else(missing_peer)?;
        Ok(self.client_ip(peer.ip(), req.headers()))
    }
}

/// `net` with an IPv4-mapped IPv6 network (`::ffff:a.b.c.d/96+n`) as the IPv4 network
/// `a.b.c.d/n`, since addresses are compared in canonical form.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:80`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sock) = s.parse::<SocketAddr>() {
        return Some(sock.ip());
    }
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
}

/// The `for=` node of one RFC 7239 element such as `for="[2001:db8::1]:4711";proto=https`.
/// `None` when there is no `for`, more than one, or it is not an address (`unknown`,
/// an obfuscated `_identifier`, anything unparsable).
fn parse_forwarded_element(element: &str) -> Option<IpAddr> {
    let mut node = None;
    for pair in element.split(';') {
        let (name, value) = pair.split_once('=')?;
        if name.trim().eq_ignore_ascii_case("for") {
            if node.is_some() {
                return None;
            }
            node = Some(value.trim());
        }
    }
    let node = node?;
    let node = match node.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"')?,
        None => node,
    };
    if node.contains(['"', '\\']) {
        // Escapes never occur in a real address; refuse rather than interpret them.
        return None;
    }
    parse_node(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_networks_match_canonical_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let cases = [
            ("10.0.0.0/8", "10.255.0.1", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.0.0.1/8", "10.9.9.9", true),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("0.0.0.0/0", "::1", false),
            ("192.0.2.1/32", "192.0.2.1", true),
            ("192.0.2.1/32", "192.0.2.2", false),
            ("::1/128", "::1", true),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::/0", "2001:db8::1", true),
            ("::ffff:10.0.0.0/104", "10.9.9.9", true),
            ("::ffff:10.0.0.0/104", "::ffff:10.9.9.9", true),
            ("10.0.0.0/8", "::ffff:10.1.1.1", true),
        ];
        for (net, addr, want) in cases {
            let key = TrustedProxyIp::new([net.parse::<IpNet>().unwrap()]);
            assert_eq!(key.is_trusted(ip(addr)), want, "{net} contains {addr}");
        }
        let host = TrustedProxyIp::new([IpNet::from(ip("192.0.2.1"))]);
        assert!(host.is_trusted(ip("192.0.2.1")));
        assert_eq!(host.trusted(), &["192.0.2.1/32".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn nodes() {
        let ok = [
            ("1.2.3.4", "1.2.3.4"),
            ("1.2.3.4:80", "1.2.3.4"),
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[2001:db8::1]:4711", "2001:db8::1"),
        ];
        for (s, want) in ok {
            assert_eq!(parse_node(s), Some(want.parse().unwrap()), "{s}");
        }
        for bad in [
            "unknown",
            "_hidden",
            "1.2.3",
            "[1.2.3.4]",
            "1.2.3.4:",
            "[::1",
            "",
        ] {
            assert_eq!(parse_node(bad), None, "{bad}");
        }
    }

    #[test]
    fn forwarded_elements() {
        let ok = [
            ("for=192.0.2.60", "192.0.2.60"),
            ("for=192.0.2.60;proto=http;by=203.0.113.43", "192.0.2.60"),
            (
                "proto=https;For=\"[2001:db8:cafe::17]:4711\"",
                "2001:db8:cafe::17",
            ),
            ("for=\"198.51.100.17:8080\"", "198.51.100.17"),
        ];
        for (s, want) in ok {
            assert_eq!(
                parse_forwarded_element(s),
                Some(want.parse().unwrap()),
                "{s}"
            );
        }
        for bad in [
            "for=unknown",
            "for=_hidden",
            "proto=https",
            "for=1.2.3.4;for=5.6.7.8",
            "for=\"1.2.3.4",
            "for=\"1.2\\.3.4\"",
            "garbage",
        ] {
            assert_eq!(parse_forwarded_element(bad), None, "{bad}");
        }
    }
}
