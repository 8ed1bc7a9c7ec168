//! Feeds arbitrary bytes to the pgoutput decoder as a sequence of messages on one connection.
//!
//! Input layout: one options byte (bits 0–1: proto_version - 1, bit 2: streaming_parallel),
//! then frames of a big-endian u16 length and that many bytes; a frame whose length runs
//! past the end takes whatever is left. Seeds in corpus/decode/ are real server messages in
//! this layout.
//!
//! Checked, besides "never panics": an accepted message re-encodes to exactly its input
//! bytes (the accepted format is canonical) and those bytes decode to the same message from
//! the same state; a refused message leaves the stream state as it was.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchyard::decode::encode::encode;
use switchyard::decode::{Decoder, DecoderOptions};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let opts = DecoderOptions {
        proto_version: 1 + u32::from(flags & 0b11),
        streaming_parallel: flags & 0b100 != 0,
    };
    let mut decoder = Decoder::new(opts);
    while !rest.is_empty() {
        let (msg, tail) = match rest {
            [hi, lo, body @ ..] => {
                let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(body.len());
                body.split_at(len)
            }
            short => (short, &[][..]),
        };
        rest = tail;

        let before = decoder.clone();
        match decoder.decode(Bytes::copy_from_slice(msg)) {
            Ok(decoded) => {
                let reencoded = encode(&decoded, opts);
                assert_eq!(&reencoded[..], msg, "accepted a non-canonical encoding");
                let again = before
                    .clone()
                    .decode(reencoded.freeze())
                    .expect("re-encoded message must decode");
                assert_eq!(again, decoded);
            }
            Err(_) => {
                assert_eq!(decoder.in_stream(), before.in_stream());
                assert_eq!(decoder.stream_xid(), before.stream_xid());
            }
        }
    }
});
