//! Sigil's fuzz driver for the stable toolchain: no coverage instrumentation
//! (cargo-fuzz needs nightly), but a mutation engine over seed inputs that
//! keeps every input a target accepts as a new seed, so mutations reach past
//! the first parse error. Each target checks properties, not only "no panic".
//!
//! Usage: `fuzz TARGET SECONDS` (see `fuzz/run`). A crash (panic or broken
//! property) is saved under `crashes/TARGET/` and the run exits non-zero.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sigil::spiffe::{Selector, SpiffeId, TrustDomain};
use sigil::{JwtAuthority, KeyAlgorithm, PrivateKey, X509Authority, X509SvidParams};

/// xorshift64*: deterministic for a seed, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const MAX_LEN: usize = 64 * 1024;

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], dict: &[&[u8]]) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                input.insert(i, rng.next() as u8);
            }
            3 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(16)).min(len);
                input.drain(a..b);
            }
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(32)).min(len);
                let chunk = input[a..b].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, chunk);
            }
            5 if !dict.is_empty() => {
                let token = dict[rng.below(dict.len())];
                let at = rng.below(len + 1);
                input.splice(at..at, token.iter().copied());
            }
            6 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            7 if len > 0 => input.truncate(rng.below(len)),
            _ => {
                // Interesting integers at a random spot.
                let values: [u8; 6] = [0, 0x7f, 0x80, 0xff, b'%', b'/'];
                let at = rng.below(len + 1);
                input.insert(at, values[rng.below(values.len())]);
            }
        }
    }
    input.truncate(MAX_LEN);
}

/// A target: checks properties (panicking on a violation) and says whether
/// the input was accepted (then it joins the corpus).
struct Target {
    name: &'static str,
    seeds: fn() -> Vec<Vec<u8>>,
    dict: &'static [&'static [u8]],
    run: fn(&[u8]) -> bool,
}

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

fn spiffe_id(data: &[u8]) -> bool {
    let Some(s) = text(data) else { return false };
    let a = SpiffeId::new(s);
    let b: Result<SpiffeId, _> = s.parse();
    assert_eq!(a, b, "new and FromStr disagree");
    if let Ok(td) = TrustDomain::new(s) {
        assert_eq!(TrustDomain::new(&td.to_string()).ok(), Some(td.clone()));
    }
    let Ok(id) = a else { return false };
    let again = SpiffeId::new(&id.to_string()).expect("display output must parse");
    assert_eq!(again, id);
    assert!(id.as_str().len() <= sigil::spiffe::MAX_ID_LEN);
    true
}

fn selector(data: &[u8]) -> bool {
    let Some(s) = text(data) else { return false };
    let Ok(sel) = Selector::new(s) else {
        return false;
    };
    assert_eq!(Selector::new(sel.as_str()).ok(), Some(sel.clone()));
    sel.check_known().is_ok()
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").expect("valid")
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn x509_ca() -> &'static X509Authority {
    static CA: OnceLock<X509Authority> = OnceLock::new();
    CA.get_or_init(|| {
        X509Authority::self_signed(
            &td(),
            KeyAlgorithm::EcP256,
            Duration::from_secs(86_400),
            now(),
        )
        .expect("CA")
    })
}

fn csr(data: &[u8]) -> bool {
    let params = X509SvidParams {
        spiffe_id: SpiffeId::new("spiffe://example.org/fuzz").expect("valid"),
        dns_names: vec![],
        ttl: Duration::from_secs(3600),
    };
    let Ok(svid) = x509_ca().issue_from_csr(data, &params, now()) else {
        return false;
    };
    // Whatever the CSR said, the certificate names the entry's ID only.
    assert_eq!(svid.spiffe_id(), &params.spiffe_id);
    assert_eq!(
        sigil::x509::svid_id(svid.cert_der()).expect("issued SVID parses"),
        params.spiffe_id
    );
    true
}

fn jwt_authority() -> &'static JwtAuthority {
    static JWT: OnceLock<JwtAuthority> = OnceLock::new();
    JWT.get_or_init(|| {
        JwtAuthority::generate(KeyAlgorithm::EcP256, Duration::from_secs(86_400), now())
            .expect("JWT authority")
    })
}

fn jwt(data: &[u8]) -> bool {
    let Some(token) = text(data) else {
        return false;
    };
    let a = jwt_authority();
    let keys: sigil::jwt::JwtKeySet = [(a.kid().to_string(), a.public_key().clone())]
        .into_iter()
        .collect();
    let Ok(v) = sigil::jwt::validate(token, &td(), &keys, "fuzz", now()) else {
        return false;
    };
    // Accepted: signed by our key, for our trust domain and audience.
    assert!(v.spiffe_id.is_member_of(&td()));
    true
}

fn jwks(data: &[u8]) -> bool {
    let Some(s) = text(data) else { return false };
    let Ok(b) = sigil::Bundle::from_jwks(td(), s) else {
        return false;
    };
    let again = sigil::Bundle::from_jwks(td(), &b.to_jwks()).expect("a bundle's JWKS parses back");
    assert_eq!(again, b, "JWKS round trip");
    true
}

fn policy(data: &[u8]) -> bool {
    let Some(s) = text(data) else { return false };
    let mut set = sigil::policy::PolicySet::default();
    sigil::policy::parse_file(Path::new("fuzz.yaml"), s, &mut set).is_ok()
}

fn h2(data: &[u8]) -> bool {
    use tokio::io::AsyncReadExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut out = Vec::new();
        let ok = sigil::edge::AuthorityFix::new(data)
            .read_to_end(&mut out)
            .await
            .is_ok();
        // The layer never grows a connection's bytes without bound.
        assert!(out.len() <= data.len() * 2 + 64 * 1024);
        ok
    })
}

fn seeds_spiffe() -> Vec<Vec<u8>> {
    [
        "spiffe://example.org/ns/default/sa/api",
        "spiffe://td",
        "spiffe://a.b-c_d/x/y/z",
    ]
    .map(|s| s.as_bytes().to_vec())
    .to_vec()
}

fn seeds_selector() -> Vec<Vec<u8>> {
    [
        "unix:uid:1000",
        "unix:path:/usr/bin/x",
        "x509pop:subject:cn:node",
        "unix:sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ]
    .map(|s| s.as_bytes().to_vec())
    .to_vec()
}

fn seeds_csr() -> Vec<Vec<u8>> {
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).expect("key");
    vec![key.csr_der("spiffe://example.org/x").expect("csr")]
}

fn seeds_jwt() -> Vec<Vec<u8>> {
    let sub = SpiffeId::new("spiffe://example.org/w").expect("valid");
    let token = jwt_authority()
        .mint(
            &sub,
            &["fuzz".into()],
            Duration::from_secs(300),
            now(),
            None,
        )
        .expect("mint");
    vec![token.into_bytes()]
}

fn seeds_jwks() -> Vec<Vec<u8>> {
    let mut b = sigil::Bundle::new(td());
    b.add_x509_authority(x509_ca().cert_der()).expect("add");
    vec![b.to_jwks().into_bytes()]
}

fn seeds_policy() -> Vec<Vec<u8>> {
    vec![
        b"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: foo\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/a/sa/b\"]\n    to:\n    - operation:\n        methods: [\"GET\"]\n        paths: [\"/admin*\"]\n    when:\n    - key: request.headers[x]\n      values: [\"1\"]\n".to_vec(),
        b"apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: m\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n".to_vec(),
    ]
}

fn seeds_h2() -> Vec<Vec<u8>> {
    let mut v = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS, then a HEADERS frame with literal fields (one socket-path authority).
    v.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let mut block = Vec::new();
    for (n, val) in [
        (":method", "POST"),
        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
        (":authority", "tmp%2Fapi.sock"),
        (":scheme", "http"),
    ] {
        block.push(0x40);
        block.push(n.len() as u8);
        block.extend(n.as_bytes());
        block.push(val.len() as u8);
        block.extend(val.as_bytes());
    }
    let len = (block.len() as u32).to_be_bytes();
    v.extend(&len[1..]);
    v.extend([1, 4, 0, 0, 0, 1]);
    v.extend(block);
    vec![v]
}

const TARGETS: &[Target] = &[
    Target {
        name: "spiffe_id",
        seeds: seeds_spiffe,
        dict: &[b"spiffe://", b"/", b".", b"..", b"%2F", b":80", b"@"],
        run: spiffe_id,
    },
    Target {
        name: "selector",
        seeds: seeds_selector,
        dict: &[b":", b"unix", b"uid", b"path", b"x509pop", b"\n"],
        run: selector,
    },
    Target {
        name: "csr",
        seeds: seeds_csr,
        dict: &[&[0x30, 0x82], &[0x06, 0x03, 0x55, 0x1d, 0x11]],
        run: csr,
    },
    Target {
        name: "jwt",
        seeds: seeds_jwt,
        dict: &[b".", b"eyJhbGciOiJub25lIn0", b"=="],
        run: jwt,
    },
    Target {
        name: "jwks",
        seeds: seeds_jwks,
        dict: &[
            b"\"keys\"",
            b"\"x5c\"",
            b"\"kid\"",
            b"\"use\"",
            b"{",
            b"}",
            b"[",
            b"]",
            b"null",
        ],
        run: jwks,
    },
    Target {
        name: "policy",
        seeds: seeds_policy,
        dict: &[
            b"\n  ",
            b"- ",
            b": ",
            b"*",
            b"notPaths",
            b"{*}",
            b"ALLOW",
            b"CUSTOM",
        ],
        run: policy,
    },
    Target {
        name: "h2",
        seeds: seeds_h2,
        dict: &[
            &[0, 0, 0, 9, 0, 0, 0, 0, 1],
            &[0x3f, 0xe1, 0x1f],
            &[0xbe],
            &[0x88],
        ],
        run: h2,
    },
];

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(name), Some(secs)) = (args.next(), args.next()) else {
        eprintln!("usage: fuzz TARGET SECONDS  (targets: {})", names());
        std::process::exit(2);
    };
    let Some(target) = TARGETS.iter().find(|t| t.name == name) else {
        eprintln!("unknown target {name:?} (targets: {})", names());
        std::process::exit(2);
    };
    let secs: u64 = secs.parse().unwrap_or_else(|_| {
        eprintln!("SECONDS must be a number");
        std::process::exit(2);
    });
    // A panic is a finding: keep the report short, the input is saved.
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut rng = Rng(seed);
    let mut corpus = (target.seeds)();
    for s in corpus.clone() {
        assert!(
            std::panic::catch_unwind(|| (target.run)(&s)).is_ok(),
            "a seed input crashes {}",
            target.name
        );
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut execs, mut crashes) = (0u64, 0u64);
    while Instant::now() < deadline {
        let mut input = corpus[rng.below(corpus.len())].clone();
        mutate(&mut rng, &mut input, &corpus, target.dict);
        execs += 1;
        match std::panic::catch_unwind(|| (target.run)(&input)) {
            Ok(true) if corpus.len() < 20_000 => corpus.push(input),
            Ok(_) => {}
            Err(_) => {
                crashes += 1;
                let dir = Path::new("crashes").join(target.name);
                let _ = std::fs::create_dir_all(&dir);
                let file = dir.join(format!("crash-{execs}"));
                let _ = std::fs::write(&file, &input);
                eprintln!("saved {}", file.display());
            }
        }
    }
    println!(
        "{}: {execs} inputs in {secs} s, corpus {}, {crashes} crashes (seed {seed})",
        target.name,
        corpus.len()
    );
    if crashes > 0 {
        std::process::exit(1);
    }
}

fn names() -> String {
    TARGETS
        .iter()
        .map(|t| t.name)
        .collect::<Vec<_>>()
        .join(", ")
}
