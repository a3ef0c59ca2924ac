//! Properties of SPIFFE ID parsing on arbitrary input:
//! `new` and `FromStr` agree, and anything accepted round-trips through
//! `to_string` to an equal value. Run: `cargo +nightly fuzz run spiffe_id`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sigil::spiffe::{Selector, SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let a = SpiffeId::new(s);
    let b: Result<SpiffeId, _> = s.parse();
    assert_eq!(a, b);
    if let Ok(id) = a {
        let again = SpiffeId::new(&id.to_string()).expect("display output must parse");
        assert_eq!(again, id);
        assert!(id.as_str().len() <= sigil::spiffe::MAX_ID_LEN);
        assert_eq!(TrustDomain::new(id.trust_domain_name()).ok(), Some(id.trust_domain()));
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert_eq!(TrustDomain::new(&td.to_string()).ok(), Some(td.clone()));
        assert_eq!(td.id().trust_domain(), td);
    }
    if let Ok(sel) = Selector::new(s) {
        assert_eq!(Selector::new(sel.as_str()).ok(), Some(sel));
    }
});
