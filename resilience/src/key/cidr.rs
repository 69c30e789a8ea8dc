//! [`Cidr`]: an IP network such as `10.0.0.0/8`, for lists of trusted proxies.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// An IPv4 or IPv6 network: an address and a prefix length.
///
/// Parses `"10.0.0.0/8"`, `"2001:db8::/32"`, and a bare address as a single host
/// (`"192.0.2.1"` = `/32`, `"::1"` = `/128`). An address with bits set past the prefix
/// (`"10.0.0.1/8"`) is refused rather than silently masked: in a trust list it is more
/// likely a typo than a network. IPv4-mapped IPv6 (`::ffff:10.0.0.0/104`) is stored as
/// its IPv4 network, and [`contains`](Cidr::contains) treats `::ffff:a.b.c.d` as
/// `a.b.c.d`, as dual-stack sockets report IPv4 peers that way.
///
/// ```
/// use resilience::Cidr;
///
/// let net: Cidr = "10.0.0.0/8".parse().unwrap();
/// assert!(net.contains("10.1.2.3".parse().unwrap()));
/// assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
/// assert!(!net.contains("11.0.0.1".parse().unwrap()));
/// assert!("10.0.0.1/8".parse::<Cidr>().is_err());
/// let list = Cidr::parse_list("127.0.0.1, ::1, 192.168.0.0/16").unwrap();
/// assert_eq!(list.len(), 3);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a string is not a [`Cidr`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CidrParseError {
    input: String,
    reason: &'static str,
}

impl CidrParseError {
    fn new(input: &str, reason: &'static str) -> Self {
        CidrParseError {
            input: input.to_owned(),
            reason,
        }
    }

    /// The text that failed to parse.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Why it failed.
    pub fn reason(&self) -> &str {
        self.reason
    }
}

impl fmt::Display for CidrParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid CIDR {:?}: {}", self.input, self.reason)
    }
}

impl std::error::Error for CidrParseError {}

fn mask_v4(prefix: u8) -> u32 {
    // `checked_shl` because a shift by the full width (prefix 0) is an overflow.
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl Cidr {
    /// The network `addr/prefix`. Fails when the prefix is longer than the address
    /// (32 or 128 bits) or `addr` has bits set past the prefix.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, CidrParseError> {
        let cidr = match addr {
            IpAddr::V4(v4) => {
                if prefix > 32 {
                    return Err(CidrParseError::new(
                        &format!("{addr}/{prefix}"),
                        "IPv4 prefix length must be 0 to 32",
                    ));
                }
                if u32::from(v4) & !mask_v4(prefix) != 0 {
                    return Err(CidrParseError::new(
                        &format!("{addr}/{prefix}"),
                        "address has bits set after the prefix length",
                    ));
                }
                Cidr { addr, prefix }
            }
            IpAddr::V6(v6) => {
                if prefix > 128 {
                    return Err(CidrParseError::new(
                        &format!("{addr}/{prefix}"),
                        "IPv6 prefix length must be 0 to 128",
                    ));
                }
                if u128::from(v6) & !mask_v6(prefix) != 0 {
                    return Err(CidrParseError::new(
                        &format!("{addr}/{prefix}"),
                        "address has bits set after the prefix length",
                    ));
                }
                match v6.to_ipv4_mapped() {
                    Some(v4) if prefix >= 96 => Cidr {
                        addr: IpAddr::V4(v4),
                        prefix: prefix - 96,
                    },
                    _ => Cidr { addr, prefix },
                }
            }
        };
        Ok(cidr)
    }

    /// A single host: `/32` or `/128`.
    pub fn host(addr: IpAddr) -> Cidr {
        let addr = addr.to_canonical();
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, prefix }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in this network (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask_v4(self.prefix);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask_v6(self.prefix);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }

    /// Parses a list separated by commas and/or whitespace (the format of an environment
    /// variable such as `PRESENCE_TRUSTED_PROXIES`). Empty input is an empty list.
    pub fn parse_list(s: &str) -> Result<Vec<Cidr>, CidrParseError> {
        s.split(|c: char| c == ',' || c.is_whitespace())
            .filter(|part| !part.is_empty())
            .map(str::parse)
            .collect()
    }
}

impl FromStr for Cidr {
    type Err = CidrParseError;

    fn from_str(s: &str) -> Result<Cidr, CidrParseError> {
        let trimmed = s.trim();
        match trimmed.split_once('/') {
            None => trimmed
                .parse::<IpAddr>()
                .map(Cidr::host)
                .map_err(|_| CidrParseError::new(s, "not an IP address")),
            Some((addr, prefix)) => {
                let addr = addr
                    .parse::<IpAddr>()
                    .map_err(|_| CidrParseError::new(s, "not an IP address before '/'"))?;
                if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(CidrParseError::new(s, "prefix length is not a number"));
                }
                let prefix = prefix
                    .parse::<u8>()
                    .map_err(|_| CidrParseError::new(s, "prefix length is too large"))?;
                Cidr::new(addr, prefix).map_err(|e| CidrParseError::new(s, e.reason))
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl From<Ipv4Addr> for Cidr {
    fn from(addr: Ipv4Addr) -> Cidr {
        Cidr::host(IpAddr::V4(addr))
    }
}

impl From<Ipv6Addr> for Cidr {
    fn from(addr: Ipv6Addr) -> Cidr {
        Cidr::host(IpAddr::V6(addr))
    }
}

impl From<IpAddr> for Cidr {
    fn from(addr: IpAddr) -> Cidr {
        Cidr::host(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_contains() {
        let cases = [
            ("10.0.0.0/8", "10.255.0.1", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("0.0.0.0/0", "::1", false),
            ("192.0.2.1", "192.0.2.1", true),
            ("192.0.2.1", "192.0.2.2", false),
            ("::1/128", "::1", true),
            ("::1", "::2", false),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::/0", "2001:db8::1", true),
            ("::ffff:10.0.0.0/104", "10.9.9.9", true),
            ("10.0.0.0/8", "::ffff:10.1.1.1", true),
        ];
        for (net, addr, want) in cases {
            let cidr: Cidr = net.parse().unwrap();
            assert_eq!(cidr.contains(ip(addr)), want, "{net} contains {addr}");
        }
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.1/8",
            "10.0.0.0/-1",
            "10.0.0/8",
            "nope",
            "10.0.0.0/8/8",
            "10.0.0.0/ 8",
            "10.0.0.0/999",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["10.0.0.0/8", "2001:db8::/32", "192.0.2.1/32"] {
            assert_eq!(s.parse::<Cidr>().unwrap().to_string(), s);
        }
        assert_eq!(Cidr::parse_list(" ").unwrap(), vec![]);
    }
}
