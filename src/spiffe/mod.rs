//! SPIFFE domain types: pure, validating, no I/O.

mod id;
mod selector;

pub use id::{IdError, MAX_ID_LEN, MAX_TRUST_DOMAIN_LEN, SpiffeId, TrustDomain};
pub use selector::{MAX_SELECTOR_LEN, Selector, SelectorError, is_subset};

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn segment() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,12}".prop_filter("no dot segments", |s| s != "." && s != "..")
    }

    fn valid_id() -> impl Strategy<Value = String> {
        (
            "[a-zA-Z0-9._-]{1,30}",
            proptest::collection::vec(segment(), 0..6),
        )
            .prop_map(|(td, segs)| {
                let mut s = format!("spiffe://{td}");
                for seg in segs {
                    s.push('/');
                    s.push_str(&seg);
                }
                s
            })
    }

    proptest! {
        #[test]
        fn display_parses_back_to_equal(s in valid_id()) {
            let id = SpiffeId::new(&s).unwrap();
            let again: SpiffeId = id.to_string().parse().unwrap();
            prop_assert_eq!(&again, &id);
            prop_assert_eq!(again.to_string(), id.to_string());
        }

        #[test]
        fn new_and_from_str_agree(s in any::<String>()) {
            let a = SpiffeId::new(&s);
            let b: Result<SpiffeId, _> = s.parse();
            prop_assert_eq!(a.clone(), b);
            if let Ok(id) = a {
                // Anything accepted must round-trip too.
                prop_assert_eq!(SpiffeId::new(id.as_str()).unwrap(), id);
            }
        }

        #[test]
        fn near_valid_strings_agree(s in "(spiffe|SPIFFE|http)://[a-zA-Z0-9.:@%_-]{0,12}(/[a-zA-Z0-9.?#%_-]{0,6}){0,4}/?") {
            let a = SpiffeId::new(&s);
            let b: Result<SpiffeId, _> = s.parse();
            prop_assert_eq!(a.clone(), b);
            if let Ok(id) = a {
                prop_assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
            }
        }

        #[test]
        fn selector_round_trips(t in "[a-z0-9_]{1,10}", v in "[ -~]{1,40}") {
            let s = Selector::from_parts(&t, &v).unwrap();
            prop_assert_eq!(s.kind(), t.as_str());
            prop_assert_eq!(s.value(), v.as_str());
            prop_assert_eq!(Selector::new(s.as_str()).unwrap(), s);
        }
    }
}
