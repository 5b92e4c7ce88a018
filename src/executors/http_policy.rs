//! Which addresses HTTP steps may reach, against server-side request forgery: a step's URL is
//! written by whoever may create WorkflowRuns, but the request leaves from the operator's pod,
//! with the operator's network position (cloud metadata services on link-local addresses, the
//! cluster API, in-cluster services).
//!
//! The policy is decided on IP addresses after DNS resolution, never on host names:
//! - names are resolved by [`PolicyResolver`], which hands the HTTP client only allowed
//!   addresses, so the addresses checked are the addresses connected to (no DNS rebinding);
//! - literal IP addresses, which the client connects to without resolving, are checked
//!   before the request is sent ([`HttpStepPolicy::check_url`]);
//! - every redirect target is checked the same way by the client's redirect policy.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:169.254.169.254`) and NAT64 addresses of the well-known
//! prefix (`64:ff9b::a9fe:a9fe`) are also judged as the IPv4 address they reach.
//!
//! The operator's own HTTP port through loopback (`127.0.0.1:8080`, `localhost:8080`,
//! `[::1]:8080`) is always denied: it serves the operator's JSON API, and a step would call it
//! from inside the operator. A host name on that port is connected to only at addresses that are
//! not loopback (see [`PolicyResolver::own_port`]); a redirect to a host name on that port is not
//! followed, since its address cannot be checked before the client connects.
//!
//! Order of the rules: an unspecified address (`0.0.0.0`, `::`, which reach this host) is
//! always denied; then `--http-step-deny` (deny wins over allow); then the cluster API's own
//! addresses, denied unless `--http-step-allow` lists that exact address (a catch-all range such
//! as `0.0.0.0/0` does not count); then the address must be in an `--http-step-allow` range.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use tracing::warn;

/// A comma-separated list of CIDRs (`10.0.0.0/8,fd00::/8`; a bare address is a single-address
/// range), as the `--http-step-allow` and `--http-step-deny` flags take it. Empty: no range.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CidrList(pub Vec<IpNet>);

impl CidrList {
    /// Parses a flag's value. The error names the entry that is not a CIDR.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net = match (part.parse::<IpNet>(), part.parse::<IpAddr>()) {
                (Ok(net), _) => net,
                (_, Ok(ip)) => IpNet::from(ip),
                _ => {
                    return Err(format!(
                        "{part:?} is not a CIDR such as 10.0.0.0/8 or fd00::/8, nor an IP address \
                         (give a comma-separated list)"
                    ));
                }
            };
            nets.push(canonical_net(net));
        }
        Ok(Self(nets))
    }
}

impl fmt::Display for CidrList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

/// A range with its host bits cleared; an IPv4-mapped IPv6 range as the IPv4 range it means.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(v4) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4.trunc());
    }
    net.trunc()
}

/// The IPv4 address an IPv6 address reaches, if it embeds one: IPv4-mapped (`::ffff:a.b.c.d`)
/// or NAT64 with the well-known prefix (`64:ff9b::a.b.c.d`, RFC 6052).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        return Some(Ipv4Addr::new(a, b, c, d));
    }
    None
}

/// Why an address is denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// In this `--http-step-deny` range.
    DenyRange(IpNet),
    /// An address of the cluster API.
    ClusterApi,
    /// In no `--http-step-allow` range.
    NotAllowed,
    /// `0.0.0.0` or `::`: this host.
    Unspecified,
    /// A loopback address on the operator's own HTTP port.
    OwnPort(u16),
    /// A redirect to a host name on the operator's own HTTP port.
    OwnPortRedirect(u16),
}

/// An address an HTTP step may not reach. It travels inside the HTTP client's errors (from the
/// resolver and the redirect policy), where [`Denied::find`] finds it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The address, as judged (IPv4 for an IPv4-mapped address).
    pub addr: IpAddr,
    pub reason: DenyReason,
    /// The host name that resolved to it, if the URL named a host.
    pub host: Option<String>,
    /// The redirect target that led to it, if a response redirected (its URL, or its host name
    /// when that name resolved to denied addresses).
    pub redirect: Option<String>,
}

impl Denied {
    /// The `Denied` inside an error's chain of sources, if any.
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Denied> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(d) = e.downcast_ref::<Denied>() {
                return Some(d);
            }
            cur = e.source();
        }
        None
    }

    /// The failure message of a step whose URL is `url`.
    pub fn step_message(&self, url: &str) -> String {
        format!("http step url {url} is denied by the operator's HTTP step policy: {self}")
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(target) = &self.redirect {
            write!(f, "the response redirected to {target}, and ")?;
        }
        match (&self.host, &self.reason) {
            (Some(host), DenyReason::OwnPortRedirect(_)) => write!(f, "{host}")?,
            (Some(host), _) => write!(f, "{host} resolves to {}", self.addr)?,
            (None, _) => write!(f, "{}", self.addr)?,
        }
        match &self.reason {
            DenyReason::DenyRange(net) => write!(
                f,
                ", which is in {net}, a range of --http-step-deny (VOLT_HTTP_STEP_DENY); \
                 an administrator of the operator may change that flag"
            ),
            DenyReason::ClusterApi => write!(
                f,
                ", an address of the cluster API, denied unless --http-step-allow (VOLT_HTTP_STEP_ALLOW) \
                 lists that exact address; an administrator of the operator may change that flag"
            ),
            DenyReason::NotAllowed => write!(
                f,
                ", which is in no range of --http-step-allow (VOLT_HTTP_STEP_ALLOW); \
                 an administrator of the operator may change that flag"
            ),
            DenyReason::Unspecified => f.write_str(", an unspecified address (this host), which is always denied"),
            DenyReason::OwnPort(port) => {
                write!(f, " on port {port}, the operator's own HTTP port through loopback, which is always denied")
            }
            DenyReason::OwnPortRedirect(port) => write!(
                f,
                ", a host name on port {port}, the operator's own HTTP port: a redirect there is not followed \
                 (its address cannot be checked first)"
            ),
        }
    }
}

impl std::error::Error for Denied {}

/// Which addresses HTTP steps may reach.
#[derive(Debug, Clone)]
pub struct HttpStepPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    cluster_api: Vec<IpAddr>,
    /// Everything allowed, as in local mode: no check at all.
    unrestricted: bool,
    /// The operator's own HTTP port, never reached through loopback.
    own_port: Option<u16>,
}

impl HttpStepPolicy {
    /// A policy from the `--http-step-allow` and `--http-step-deny` ranges and the addresses of
    /// the cluster API.
    pub fn new(allow: &CidrList, deny: &CidrList, cluster_api: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut api: Vec<IpAddr> = cluster_api.into_iter().map(|ip| ip.to_canonical()).collect();
        api.sort();
        api.dedup();
        Self { allow: allow.0.clone(), deny: deny.0.clone(), cluster_api: api, unrestricted: false, own_port: None }
    }

    /// The same policy, also denying `port` (the operator's HTTP port) on loopback addresses.
    pub fn with_own_port(mut self, port: u16) -> Self {
        self.own_port = Some(port);
        self
    }

    /// The operator's own HTTP port, if this policy guards it.
    pub fn own_port(&self) -> Option<u16> {
        self.own_port
    }

    /// Whether an HTTP step may connect to `ip` on `port`: [`Self::check`], and never a
    /// loopback address on the operator's own port.
    pub fn check_at(&self, ip: IpAddr, port: Option<u16>) -> Result<(), Denied> {
        if let Some(own) = self.own_port
            && port == Some(own)
            && is_loopback(ip)
        {
            return Err(Denied {
                addr: ip.to_canonical(),
                reason: DenyReason::OwnPort(own),
                host: None,
                redirect: None,
            });
        }
        self.check(ip)
    }

    /// A policy that allows every address (local mode, where the user running the workflow is
    /// the administrator of the machine, and there is no cluster).
    pub fn allow_all() -> Self {
        Self { allow: Vec::new(), deny: Vec::new(), cluster_api: Vec::new(), unrestricted: true, own_port: None }
    }

    pub fn is_unrestricted(&self) -> bool {
        self.unrestricted
    }

    /// The cluster API's addresses this policy denies.
    pub fn cluster_api(&self) -> &[IpAddr] {
        &self.cluster_api
    }

    /// Whether an HTTP step may connect to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), Denied> {
        if self.unrestricted {
            return Ok(());
        }
        let ip = ip.to_canonical();
        let deny = |reason| Err(Denied { addr: ip, reason, host: None, redirect: None });
        // The address and, for an IPv6 address embedding an IPv4 one, that IPv4 address.
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let views = std::iter::once(ip).chain(embedded);
        for view in views.clone() {
            if view.is_unspecified() {
                return deny(DenyReason::Unspecified);
            }
            if let Some(net) = self.deny.iter().find(|n| n.contains(&view)) {
                return deny(DenyReason::DenyRange(*net));
            }
        }
        for view in views {
            let listed_exactly = self.allow.iter().any(|n| n.prefix_len() == n.max_prefix_len() && n.addr() == view);
            if self.cluster_api.contains(&view) && !listed_exactly {
                return deny(DenyReason::ClusterApi);
            }
        }
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        deny(DenyReason::NotAllowed)
    }

    /// Checks a URL whose host is a literal IP address (the HTTP client connects to those
    /// without resolving them). Host names pass here: [`PolicyResolver`] checks what they
    /// resolve to.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Denied> {
        // The URL parser has already normalised literal addresses (`0xa9.254.169.254`,
        // `2852039166`) into dotted IPv4 or bracketed IPv6.
        let host = url.host_str().unwrap_or_default();
        match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Ok(ip) => self.check_at(ip, url.port_or_known_default()),
            Err(_) => Ok(()),
        }
    }

    /// Whether `url` names a host (not an address) on the operator's own port: such requests
    /// go through a resolver that drops loopback addresses ([`PolicyResolver::own_port`]).
    pub fn names_own_port(&self, url: &reqwest::Url) -> bool {
        let host = url.host_str().unwrap_or_default();
        self.own_port.is_some_and(|own| url.port_or_known_default() == Some(own))
            && host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_err()
    }

    /// A redirect target: [`Self::check_url`], and no host name on the operator's own port.
    pub fn check_redirect(&self, url: &reqwest::Url) -> Result<(), Denied> {
        self.check_url(url)?;
        match self.own_port {
            Some(own) if self.names_own_port(url) => Err(Denied {
                addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                reason: DenyReason::OwnPortRedirect(own),
                host: url.host_str().map(str::to_string),
                redirect: None,
            }),
            _ => Ok(()),
        }
    }

    /// One line for the startup log.
    pub fn describe(&self) -> String {
        if self.unrestricted {
            return "every address allowed".into();
        }
        let list = |v: &[IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let api = self.cluster_api.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        format!("allow [{}], deny [{}], cluster API [{api}]", list(&self.allow), list(&self.deny))
    }
}

/// A loopback address, also as an IPv4-mapped or NAT64 IPv6 address.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || embedded_v4(v6).is_some_and(|v4| v4.is_loopback()),
    }
}

/// Whether `url` (an agent's `baseUrl`, an MCP server's `url`) reaches the operator's own HTTP
/// port `own_port` through loopback: a literal loopback or unspecified address, or `localhost`
/// (`*.localhost`), on that port. Names that merely resolve to loopback are not caught here
/// (agent and MCP URLs are written by whoever may create Agents).
pub fn reaches_own_port(url: &reqwest::Url, own_port: u16) -> bool {
    if url.port_or_known_default() != Some(own_port) {
        return false;
    }
    let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) => is_loopback(ip) || ip.to_canonical().is_unspecified(),
        Err(_) => {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            host == "localhost" || host.ends_with(".localhost")
        }
    }
}

/// Resolves host names for HTTP steps, handing the client only the addresses the policy allows.
/// When a name resolves to no allowed address the resolution fails with [`Denied`].
pub struct PolicyResolver {
    pub policy: Arc<HttpStepPolicy>,
    /// The operator's own port, when this resolver serves requests to it: loopback addresses
    /// are then denied too (a resolver does not see the port it resolves for).
    pub own_port: Option<u16>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let own_port = self.own_port;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_denied = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| match policy.check_at(a.ip(), own_port) {
                    Ok(()) => true,
                    Err(d) => {
                        first_denied.get_or_insert(d);
                        false
                    }
                })
                .collect();
            if allowed.is_empty()
                && let Some(mut denied) = first_denied
            {
                denied.host = Some(host);
                return Err(Box::new(denied) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The addresses of the cluster API: the host of the Kubernetes client's URL and
/// `KUBERNETES_SERVICE_HOST` (the `kubernetes` Service in a pod), resolved when they are names.
/// Names that do not resolve are logged and skipped.
pub async fn cluster_api_addresses(cluster_url: Option<&http::Uri>) -> Vec<IpAddr> {
    let mut hosts: Vec<(String, u16)> = Vec::new();
    if let Some(url) = cluster_url
        && let Some(host) = url.host()
    {
        hosts.push((host.trim_start_matches('[').trim_end_matches(']').to_string(), url.port_u16().unwrap_or(443)));
    }
    if let Ok(host) = std::env::var("KUBERNETES_SERVICE_HOST")
        && !host.is_empty()
    {
        hosts.push((host, 443));
    }
    let mut addrs = Vec::new();
    for (host, port) in hosts {
        if let Ok(ip) = host.parse::<IpAddr>() {
            addrs.push(ip.to_canonical());
            continue;
        }
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(found) => addrs.extend(found.map(|a| a.ip().to_canonical())),
            Err(e) => warn!(host = %host, error = %e,
                "cannot resolve the cluster API's host; HTTP steps are not kept from its addresses"),
        }
    }
    addrs.sort();
    addrs.dedup();
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn cidrs(s: &str) -> CidrList {
        CidrList::parse(s).expect("valid CIDRs")
    }

    fn defaults(api: &[&str]) -> HttpStepPolicy {
        HttpStepPolicy::new(
            &cidrs("0.0.0.0/0,::/0"),
            &cidrs("169.254.0.0/16,fe80::/10"),
            api.iter().map(|a| a.parse::<IpAddr>().expect("ip")),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidr_lists_parse_and_name_bad_entries() {
        assert_eq!(cidrs("").0, vec![]);
        assert_eq!(cidrs(" 10.0.0.0/8 , fd00::/8 ,").to_string(), "10.0.0.0/8,fd00::/8");
        assert_eq!(cidrs("10.1.2.3").to_string(), "10.1.2.3/32");
        assert_eq!(cidrs("::1").to_string(), "::1/128");
        // Host bits are cleared; mapped IPv6 ranges become IPv4 ranges.
        assert_eq!(cidrs("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidrs("::ffff:169.254.0.0/112").to_string(), "169.254.0.0/16");
        for bad in ["10.0.0.0/33", "10.0.0", "example.com", "10.0.0.0/8;fd00::/8", "fe80::/129", "*"] {
            let err = CidrList::parse(bad).expect_err(bad);
            assert!(err.contains("is not a CIDR"), "{bad}: {err}");
        }
        let err = CidrList::parse("10.0.0.0/8,nope").expect_err("one bad entry");
        assert!(err.starts_with("\"nope\""), "{err}");
    }

    #[test]
    fn defaults_deny_link_local_and_the_cluster_api_only() {
        let p = defaults(&["10.96.0.1", "192.168.1.10"]);
        for ok in ["8.8.8.8", "10.0.0.5", "127.0.0.2", "::1", "2001:db8::1", "192.168.1.11"] {
            assert_eq!(p.check(ip(ok)), Ok(()), "{ok}");
        }
        let reason = |s: &str| p.check(ip(s)).expect_err(s).reason;
        let link_local = IpNet::V4("169.254.0.0/16".parse().expect("net"));
        assert_eq!(reason("169.254.169.254"), DenyReason::DenyRange(link_local));
        assert_eq!(reason("fe80::1"), DenyReason::DenyRange("fe80::/10".parse().expect("net")));
        assert_eq!(reason("10.96.0.1"), DenyReason::ClusterApi);
        assert_eq!(reason("192.168.1.10"), DenyReason::ClusterApi);
        assert_eq!(reason("0.0.0.0"), DenyReason::Unspecified);
        assert_eq!(reason("::"), DenyReason::Unspecified);
    }

    #[test]
    fn ipv4_mapped_and_nat64_addresses_are_judged_as_ipv4() {
        let p = defaults(&["10.96.0.1"]);
        for s in ["::ffff:169.254.169.254", "::ffff:a9fe:a9fe", "64:ff9b::a9fe:a9fe"] {
            let d = p.check(ip(s)).expect_err(s);
            assert!(matches!(d.reason, DenyReason::DenyRange(_)), "{s}: {d}");
        }
        assert_eq!(p.check(ip("::ffff:169.254.169.254")).expect_err("mapped").addr, ip("169.254.169.254"));
        assert_eq!(p.check(ip("::ffff:10.96.0.1")).expect_err("mapped api").reason, DenyReason::ClusterApi);
        assert_eq!(p.check(ip("::ffff:0.0.0.0")).expect_err("mapped any").reason, DenyReason::Unspecified);
        // The cluster API given as a mapped address is the IPv4 one.
        let p = defaults(&["::ffff:10.96.0.1"]);
        assert_eq!(p.check(ip("10.96.0.1")).expect_err("api").reason, DenyReason::ClusterApi);
        // A deny range written as mapped IPv6 catches the IPv4 address too.
        let p = HttpStepPolicy::new(&cidrs("0.0.0.0/0,::/0"), &cidrs("::ffff:10.0.0.0/104"), []);
        assert!(p.check(ip("10.2.3.4")).is_err());
    }

    #[test]
    fn deny_wins_over_allow_and_allow_limits() {
        let p = HttpStepPolicy::new(&cidrs("10.0.0.0/8"), &cidrs("10.1.0.0/16"), []);
        assert_eq!(p.check(ip("10.2.0.1")), Ok(()));
        assert!(matches!(p.check(ip("10.1.0.1")).expect_err("denied").reason, DenyReason::DenyRange(_)));
        assert_eq!(p.check(ip("8.8.8.8")).expect_err("not allowed").reason, DenyReason::NotAllowed);
        assert_eq!(p.check(ip("::ffff:8.8.8.8")).expect_err("mapped").reason, DenyReason::NotAllowed);
        // An exact allow entry does not beat the deny list either.
        let p = HttpStepPolicy::new(&cidrs("0.0.0.0/0,169.254.169.254"), &cidrs("169.254.0.0/16"), []);
        assert!(p.check(ip("169.254.169.254")).is_err());
        // Nothing allowed: everything denied.
        let p = HttpStepPolicy::new(&cidrs(""), &cidrs(""), []);
        assert_eq!(p.check(ip("8.8.8.8")).expect_err("empty allow").reason, DenyReason::NotAllowed);
    }

    #[test]
    fn the_cluster_api_is_allowed_only_by_its_exact_address() {
        let api = [ip("10.96.0.1")];
        let with_allow = |allow: &str| HttpStepPolicy::new(&cidrs(allow), &cidrs("169.254.0.0/16"), api);
        // A range that contains it is not enough, catch-all or narrower.
        assert!(with_allow("0.0.0.0/0,::/0").check(api[0]).is_err());
        assert!(with_allow("10.0.0.0/8").check(api[0]).is_err());
        assert_eq!(with_allow("10.0.0.0/8").check(ip("10.96.0.2")), Ok(()));
        assert_eq!(with_allow("0.0.0.0/0,10.96.0.1/32").check(api[0]), Ok(()));
        assert_eq!(with_allow("0.0.0.0/0,10.96.0.1").check(api[0]), Ok(()));
    }

    #[test]
    fn urls_with_literal_addresses_are_checked_and_names_left_to_the_resolver() {
        let p = defaults(&["127.0.0.1"]);
        let url = |s: &str| reqwest::Url::parse(s).expect("url");
        assert!(p.check_url(&url("http://169.254.169.254/latest/meta-data/")).is_err());
        assert!(p.check_url(&url("http://[::ffff:169.254.169.254]/")).is_err());
        assert!(p.check_url(&url("http://[fe80::1]:8080/")).is_err());
        // Unusual IPv4 spellings are normalised by the URL parser.
        assert!(p.check_url(&url("http://0xa9.254.169.254/")).is_err());
        assert!(p.check_url(&url("http://2852039166/")).is_err());
        assert!(p.check_url(&url("https://127.0.0.1:6443/api")).is_err());
        assert!(p.check_url(&url("http://0.0.0.0:6443/")).is_err());
        assert_eq!(p.check_url(&url("http://127.0.0.2:8080/")), Ok(()));
        assert_eq!(p.check_url(&url("http://metadata.google.internal/")), Ok(()));
    }

    #[test]
    fn messages_name_the_url_the_address_and_the_flag() {
        let p = defaults(&["10.96.0.1"]);
        let d = p.check(ip("169.254.169.254")).expect_err("denied");
        let m = d.step_message("http://169.254.169.254/x");
        assert!(m.starts_with("http step url http://169.254.169.254/x is denied by the operator's HTTP step policy: "));
        assert!(m.contains("169.254.0.0/16") && m.contains("--http-step-deny"), "{m}");
        let mut d = p.check(ip("10.96.0.1")).expect_err("api");
        d.host = Some("kubernetes.default.svc".into());
        d.redirect = Some("https://kubernetes.default.svc/api".into());
        let m = d.to_string();
        assert!(m.contains("redirected to https://kubernetes.default.svc/api"), "{m}");
        assert!(m.contains("kubernetes.default.svc resolves to 10.96.0.1"), "{m}");
        assert!(m.contains("cluster API") && m.contains("--http-step-allow"), "{m}");
        let d = HttpStepPolicy::new(&cidrs("10.0.0.0/8"), &cidrs(""), []).check(ip("8.8.8.8")).expect_err("x");
        assert!(d.to_string().contains("no range of --http-step-allow"), "{d}");
    }

    #[test]
    fn the_operators_own_port_is_denied_through_loopback() {
        let p = defaults(&["10.96.0.1"]).with_own_port(8080);
        let url = |s: &str| reqwest::Url::parse(s).expect("url");
        for denied in [
            "http://127.0.0.1:8080/api/v1/events",
            "http://127.9.9.9:8080/",
            "http://[::1]:8080/",
            "http://[::ffff:127.0.0.1]:8080/",
            "http://2130706433:8080/",
        ] {
            let d = p.check_url(&url(denied)).expect_err(denied);
            assert_eq!(d.reason, DenyReason::OwnPort(8080), "{denied}");
            assert!(d.to_string().contains("the operator's own HTTP port through loopback"), "{d}");
        }
        for ok in ["http://127.0.0.1:8081/", "http://127.0.0.1/", "http://10.0.0.5:8080/", "http://localhost:9000/"] {
            assert_eq!(p.check_url(&url(ok)), Ok(()), "{ok}");
        }
        // Names on the port resolve without loopback; redirects to names there are refused.
        assert!(p.names_own_port(&url("http://localhost:8080/")));
        assert!(!p.names_own_port(&url("http://localhost:8081/")));
        assert!(!p.names_own_port(&url("http://127.0.0.1:8080/")));
        let d = p.check_redirect(&url("http://svc.example:8080/x")).expect_err("redirect by name");
        assert_eq!(d.reason, DenyReason::OwnPortRedirect(8080));
        assert_eq!(p.check_redirect(&url("http://svc.example:8081/x")), Ok(()));
        assert_eq!(p.check_at(ip("127.0.0.1"), Some(8080)).expect_err("resolved").reason, DenyReason::OwnPort(8080));
        // Without an own port (local mode), loopback is only what the ranges say.
        assert_eq!(defaults(&[]).check_url(&url("http://127.0.0.1:8080/")), Ok(()));
    }

    #[test]
    fn agent_and_mcp_urls_may_not_reach_the_own_port_through_loopback() {
        let url = |s: &str| reqwest::Url::parse(s).expect("url");
        for yes in [
            "http://127.0.0.1:8080/v1",
            "http://localhost:8080/mcp",
            "http://LOCALHOST.:8080",
            "http://a.localhost:8080",
            "http://[::1]:8080",
            "http://0.0.0.0:8080",
        ] {
            assert!(reaches_own_port(&url(yes), 8080), "{yes}");
        }
        for no in [
            "http://127.0.0.1:8000/v1",
            "http://10.0.0.1:8080/v1",
            "https://localhost/v1",
            "http://api.example:8080/v1",
        ] {
            assert!(!reaches_own_port(&url(no), 8080), "{no}");
        }
        assert!(reaches_own_port(&url("http://localhost/v1"), 80));
    }

    #[tokio::test]
    async fn the_own_port_resolver_drops_loopback_addresses() {
        use reqwest::dns::Resolve;
        let policy = Arc::new(defaults(&[]).with_own_port(8080));
        let name = |s: &str| reqwest::dns::Name::from_str(s).expect("name");
        let guarded = PolicyResolver { policy: policy.clone(), own_port: Some(8080) };
        let err = match guarded.resolve(name("localhost")).await {
            Ok(addrs) => panic!("localhost resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e,
        };
        let denied = Denied::find(err.as_ref()).expect("a Denied");
        assert_eq!(denied.reason, DenyReason::OwnPort(8080));
        let open = PolicyResolver { policy, own_port: None };
        assert!(open.resolve(name("localhost")).await.is_ok());
    }

    #[test]
    fn allow_all_allows_everything() {
        let p = HttpStepPolicy::allow_all();
        for s in ["169.254.169.254", "0.0.0.0", "::ffff:169.254.169.254", "127.0.0.1"] {
            assert_eq!(p.check(ip(s)), Ok(()), "{s}");
        }
    }

    #[tokio::test]
    async fn cluster_api_addresses_come_from_the_url() {
        let url: http::Uri = "https://127.0.0.1:6443".parse().expect("uri");
        let addrs = cluster_api_addresses(Some(&url)).await;
        assert!(addrs.contains(&ip("127.0.0.1")), "{addrs:?}");
        let url: http::Uri = "https://[::ffff:10.0.0.1]:6443".parse().expect("uri");
        assert!(cluster_api_addresses(Some(&url)).await.contains(&ip("10.0.0.1")));
        let url: http::Uri = "https://localhost:6443".parse().expect("uri");
        assert!(cluster_api_addresses(Some(&url)).await.iter().any(|a| a.is_loopback()));
    }
}
