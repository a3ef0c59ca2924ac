//! HPACK Huffman decoding (RFC 7541 §5.2): a walk down a binary tree built
//! once from the code table of the standard (Appendix B, as `httlib-huffman`
//! publishes it). `loona-hpack` decodes the same strings with two hash-map
//! lookups per bit, and rebuilds its maps for every string.

use std::sync::OnceLock;

/// Marks a child that is a symbol, not a node.
const LEAF: u16 = 0x8000;
/// The end-of-string symbol, never valid inside a string.
const EOS: u16 = 256;

/// The code tree: node 0 is the root; each node's children for bit 0 and 1,
/// either a node index or `LEAF | symbol`.
fn tree() -> &'static [[u16; 2]] {
    static TREE: OnceLock<Vec<[u16; 2]>> = OnceLock::new();
    TREE.get_or_init(|| {
        let mut nodes = vec![[0u16; 2]];
        for (symbol, &(len, code)) in httlib_huffman::encoder::table::ENCODE_TABLE
            .iter()
            .enumerate()
        {
            let mut node = 0;
            for i in (0..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    nodes[node][bit] = LEAF | symbol as u16;
                } else {
                    if nodes[node][bit] == 0 {
                        nodes.push([0, 0]);
                        nodes[node][bit] = (nodes.len() - 1) as u16;
                    }
                    node = usize::from(nodes[node][bit]);
                }
            }
        }
        nodes
    })
}

/// Appends the octets `src` encodes to `out`. Refused, as RFC 7541 §5.2
/// requires: the EOS symbol inside the string, and padding that is longer
/// than 7 bits or not the most significant bits of EOS (all ones).
pub fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    let tree = tree();
    let mut node = 0usize;
    // Bits read since the last symbol, and whether all of them were ones.
    let (mut pending, mut ones) = (0u32, true);
    for &byte in src {
        for i in (0..8).rev() {
            let bit = usize::from((byte >> i) & 1);
            let next = tree[node][bit];
            if next & LEAF != 0 {
                let symbol = next & !LEAF;
                if symbol == EOS {
                    return Err("EOS symbol inside a Huffman-coded string");
                }
                out.push(symbol as u8);
                (node, pending, ones) = (0, 0, true);
            } else if next == 0 {
                // Not reachable with the complete HPACK code; kept safe anyway.
                return Err("invalid Huffman code");
            } else {
                node = usize::from(next);
                pending += 1;
                ones &= bit == 1;
            }
        }
    }
    if pending > 7 {
        return Err("Huffman padding longer than 7 bits");
    }
    if !ones {
        return Err("Huffman padding that is not the start of EOS");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn ours(src: &[u8]) -> Result<Vec<u8>, &'static str> {
        let mut out = Vec::new();
        decode(src, &mut out).map(|()| out)
    }

    #[test]
    fn rfc_7541_examples() {
        // C.4.1: "www.example.com"; C.4.2: "no-cache"; C.4.3: "custom-key".
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        assert_eq!(
            ours(&hex("f1e3c2e5f23a6ba0ab90f4ff")).unwrap(),
            b"www.example.com"
        );
        assert_eq!(ours(&hex("a8eb10649cbf")).unwrap(), b"no-cache");
        assert_eq!(ours(&hex("25a849e95ba97d7f")).unwrap(), b"custom-key");
        assert_eq!(ours(&[]).unwrap(), b"");
        // Eight bits of padding, zero padding, EOS inside.
        assert!(ours(&[0xff]).is_err());
        assert!(ours(&[0x00]).is_err(), "'0' then zero padding");
        assert!(ours(&[0xff, 0xff, 0xff, 0xfc]).is_err());
    }

    proptest! {
        /// Whatever the bytes, the same answer as `loona-hpack`'s decoder:
        /// the same octets, or both refuse.
        #[test]
        fn decodes_as_loona_hpack_does(bytes in proptest::collection::vec(any::<u8>(), 0..24)) {
            let theirs = loona_hpack::huffman::HuffmanDecoder::new().decode(&bytes).ok();
            prop_assert_eq!(ours(&bytes).ok(), theirs);
        }

        /// Any text, encoded, decodes back; and so does `loona-hpack`.
        #[test]
        fn encoded_text_round_trips(text in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut encoded = Vec::new();
            httlib_huffman::encode(&text, &mut encoded).unwrap();
            prop_assert_eq!(ours(&encoded).unwrap(), text.clone());
            let theirs = loona_hpack::huffman::HuffmanDecoder::new().decode(&encoded).unwrap();
            prop_assert_eq!(theirs, text);
        }

        /// A valid encoding with its last byte damaged (padding or the last
        /// symbols): the same verdict as `loona-hpack`.
        #[test]
        fn damaged_endings_are_judged_alike(
            text in proptest::collection::vec(any::<u8>(), 1..32),
            flip in 1u8..=255,
        ) {
            let mut encoded = Vec::new();
            httlib_huffman::encode(&text, &mut encoded).unwrap();
            if let Some(last) = encoded.last_mut() {
                *last ^= flip;
            }
            let theirs = loona_hpack::huffman::HuffmanDecoder::new().decode(&encoded).ok();
            prop_assert_eq!(ours(&encoded).ok(), theirs);
        }
    }
}
