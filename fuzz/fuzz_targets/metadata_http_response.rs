//! Fuzzes the HTTP metadata client's incremental response decoder (what a hostile server
//! controls): no panic on any bytes, the body never exceeds the limit, and feeding the bytes
//! in pieces gives the same result as feeding them at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_metadata::http::wire::{Decoded, ResponseDecoder};

const MAX: usize = 4096;

fn whole(data: &[u8]) -> Result<Option<(Vec<u8>, u16, usize)>, String> {
    let mut d = ResponseDecoder::new(MAX);
    match d.feed(data).map_err(|e| e.to_string())? {
        Decoded::Done(r, used) => Ok(Some((r.body, r.status, used))),
        Decoded::NeedMore => Ok(None),
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&step, data)) = input.split_first() else {
        return;
    };
    let step = step as usize % 64 + 1;
    let one = whole(data);
    if let Ok(Some((body, _, used))) = &one {
        assert!(body.len() <= MAX);
        assert!(*used <= data.len());
    }
    let mut d = ResponseDecoder::new(MAX);
    let mut at = 0;
    let mut pieces = None;
    while at < data.len() {
        let end = (at + step).min(data.len());
        match d.feed(&data[at..end]) {
            Ok(Decoded::NeedMore) => at = end,
            Ok(Decoded::Done(r, used)) => {
                assert!(r.body.len() <= MAX);
                pieces = Some(Ok(Some((r.body, r.status, at + used))));
                break;
            }
            Err(e) => {
                pieces = Some(Err(e.to_string()));
                break;
            }
        }
    }
    let pieces = pieces.unwrap_or(Ok(None));
    match (&one, &pieces) {
        // An error may show earlier or later depending on where the bytes were cut, but a
        // complete response must be the same either way.
        (Ok(Some(a)), Ok(Some(b))) => assert_eq!(a, b),
        (Ok(Some(_)), Err(_)) | (Err(_), Ok(Some(_))) => panic!("{one:?} vs {pieces:?}"),
        _ => {}
    }
    // At EOF: a close-delimited body completes, anything else incomplete is an error.
    if let Ok(r) = d.finish() {
        assert!(r.body.len() <= MAX);
    }
});
